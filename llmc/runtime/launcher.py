"""Running a tensor/pipeline-parallel package: one process per rank over torch.distributed.

Rank 0 is the process that loads the package (CLI, server, offline API): it runs the scheduler and
engine, and before each forward step broadcasts the step's inputs — token ids, positions, each new
token's KV slot, block tables, sequence lengths, the rows to sample, pages to copy — to the other
ranks. Every rank keeps its own KV pool with the same page ids (sized by rank 0, plus one scratch
page for bucketing's pad rows) holding its own heads (tp) or layers (pp), so one block table serves
all. Locally the workers are started here (``python -c`` in the package's own runtime, loopback
rendezvous, gloo on CPU, NCCL on CUDA); across machines ``torchrun`` starts every rank, and this
module only joins the group it describes (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT).

A lost rank leaves the group unusable, so it must end the engine, not one request: ``WorkerLost``
derives from BaseException, which the server's engine loop does not absorb as a failed step but
turns into "engine dead" (HTTP 503 for every request after it).
"""

import atexit
import os
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from .engine import LLMEngine
from .package import KVLayout, PackageError, load_model_module, load_weights, read_plan, resolve_device, stop_ids
from .paged_attention import KVPool, PagedStep
from .tokenizer import PackageTokenizer

HEADER = 9  # go, tokens, seqs, table width, decodes, logits rows (-1: all), copies, step number, spare


class WorkerLost(BaseException):
    """A rank died or stopped answering: the distributed engine cannot go on."""


def _timeout() -> timedelta:
    return timedelta(seconds=float(os.environ.get("LLMC_DIST_TIMEOUT", "30")))


def load_rank(package_dir: Path, plan: dict, rank: int, device: torch.device):
    """Rank ``rank``'s ``(forward, weights, plan)``: its model code, its weight shard, and the plan
    with its own KV layers."""
    entry = plan["parallel"]["ranks"][rank]
    module = load_model_module(package_dir / entry["model"])
    weights = module.prepare_weights(load_weights(package_dir / entry["weights"], device))
    rank_plan = {**plan, "kv_cache": {**plan.get("kv_cache", {}), "layers": entry["kv_layers"]}}
    return module.forward, weights, rank_plan


def _backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pack_step(ids, positions, kv: PagedStep, copies) -> tuple[torch.Tensor, torch.Tensor]:
    rows = kv.logits_indices
    header = torch.tensor([1, len(ids), len(kv.query_start) - 1, kv.block_tables.shape[1], kv.num_decodes,
                           -1 if rows is None else len(rows), len(copies), 0, 0], dtype=torch.int64)
    parts = [ids, positions, kv.slot_mapping, kv.block_tables.flatten(), kv.seq_lens,
             torch.tensor(kv.query_start), torch.tensor(copies, dtype=torch.int64).flatten()]
    if rows is not None:
        parts.append(rows)
    return header, torch.cat([p.to("cpu", torch.int64) for p in parts])


def _unpack_step(header: torch.Tensor, body: torch.Tensor, pool: KVPool):
    _, t, b, width, decodes, nrows, ncopies, _, _ = header.tolist()
    sizes = [t, t, t, b * width, b, b + 1, 2 * ncopies, max(nrows, 0)]
    ids, positions, slots, tables, lens, starts, copies, rows = torch.split(body.to(pool.device), sizes)
    step = PagedStep(pool, slots, tables.view(b, width), lens, starts.tolist(), decodes,
                     rows if nrows >= 0 else None)
    return ids, positions, step, copies.view(-1, 2).tolist()


class DistributedForward:
    """Rank 0's forward: broadcast the step to the other ranks, then run its own part."""

    def __init__(self, forward, workers: list[subprocess.Popen]):
        self.forward = forward
        self.workers = workers
        self.pending_copies: list = []
        self.closed = False

    def watch_copies(self, pool: KVPool) -> None:
        """Record the copy-on-write page copies the engine makes, for the other ranks to repeat."""
        copy = pool.copy_blocks

        def copy_and_record(pairs):
            self.pending_copies.extend(pairs or [])
            copy(pairs)

        pool.copy_blocks = copy_and_record

    def check_workers(self) -> None:
        dead = [(r, p.returncode) for r, p in enumerate(self.workers, 1) if p.poll() is not None]
        if dead:
            raise WorkerLost(", ".join(f"rank {r} exited with code {code}" for r, code in dead))

    def __call__(self, weights, ids, positions, kv):
        if self.closed:
            raise WorkerLost("the distributed engine was shut down")
        self.check_workers()
        header, body = _pack_step(ids, positions, kv, self.pending_copies)
        self.pending_copies = []
        try:
            dist.broadcast(header, 0)
            dist.broadcast(body, 0)
            return self.forward(weights, ids, positions, kv)
        except RuntimeError as exc:  # gloo/NCCL: a peer closed the connection or timed out
            self.closed = True
            raise WorkerLost(f"a worker rank stopped answering: {exc}") from exc

    def close(self) -> None:
        """Tell the workers to exit, then leave the process group."""
        if not self.closed:
            self.closed = True
            try:
                dist.broadcast(torch.zeros(HEADER, dtype=torch.int64), 0)
            except RuntimeError:
                pass  # a worker is already gone
        for proc in self.workers:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        if dist.is_initialized():
            dist.destroy_process_group()


def start_distributed_engine(package_dir: Path, plan: dict, device=None, config=None) -> LLMEngine:
    """Rank 0: start the other ranks (unless torchrun did), join the group, build the engine."""
    parallel = plan["parallel"]
    world = parallel["tp"] * parallel["pp"]
    dev = resolve_device(device, plan)
    workers = []
    if "RANK" not in os.environ:  # local launch: this process is rank 0 of a loopback group
        port = _free_port()
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world),
               "LLMC_PACKAGE": str(package_dir.resolve()), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        code = (f"import sys; sys.path.insert(0, {str(package_dir.resolve())!r}); "
                "from runtime.launcher import worker_main; worker_main()")
        workers = [subprocess.Popen([sys.executable, "-c", code], env={**env, "RANK": str(r)})
                   for r in range(1, world)]
        dist.init_process_group(_backend(dev), init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=world,
                                timeout=_timeout())
    else:
        if int(os.environ["RANK"]) != 0 or int(os.environ.get("WORLD_SIZE", "1")) != world:
            raise PackageError(f"this package runs on {world} ranks; launch it with WORLD_SIZE={world}")
        dist.init_process_group(_backend(dev), rank=0, world_size=world, timeout=_timeout())
    forward, weights, rank_plan = load_rank(package_dir, plan, 0, dev)
    remote = DistributedForward(forward, workers)
    tokenizer = PackageTokenizer.from_dir(package_dir)
    engine = LLMEngine(remote, weights, rank_plan, device=dev, tokenizer=tokenizer,
                       eos_ids=stop_ids(package_dir, tokenizer), config=config,
                       model_name=plan.get("package") or package_dir.resolve().name)
    remote.watch_copies(engine.pool)
    dist.broadcast(torch.tensor([engine.pool.num_blocks]), 0)  # every rank's pool has rank 0's page ids
    engine.distributed = remote
    atexit.register(remote.close)
    return engine


def worker_main() -> None:
    """A rank > 0: join the group, load this rank's part, run every step rank 0 broadcasts."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    package_dir = Path(os.environ.get("LLMC_PACKAGE") or Path(__file__).resolve().parent.parent)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    plan = read_plan(package_dir)
    dev = resolve_device(os.environ.get("LLMC_DEVICE"), plan)
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
    dist.init_process_group(_backend(dev), rank=rank, world_size=world, timeout=_timeout())
    forward, weights, rank_plan = load_rank(package_dir, plan, rank, dev)
    blocks = torch.zeros(1, dtype=torch.int64)
    dist.broadcast(blocks, 0)
    layout = KVLayout.of(rank_plan, weights)
    pool = layout.pool(int(blocks) + 1, dev)  # + bucketing's scratch page, which rank 0 appends on use
    with torch.inference_mode():
        while True:
            header = torch.zeros(HEADER, dtype=torch.int64)
            dist.broadcast(header, 0)
            if int(header[0]) == 0:
                break
            t, b, width, nrows, ncopies = (int(header[i]) for i in (1, 2, 3, 5, 6))
            body = torch.zeros(3 * t + b * width + 2 * b + 1 + 2 * ncopies + max(nrows, 0), dtype=torch.int64)
            dist.broadcast(body, 0)
            ids, positions, step, copies = _unpack_step(header, body, pool)
            pool.copy_blocks(copies)
            forward(weights, ids, positions, step)
    dist.destroy_process_group()
