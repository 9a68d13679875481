"""The engines timed side by side: the llmc package and the peers a user would pick instead.

Every engine answers the same two questions with the same requests:

- ``decode(request)``: one request alone; the time of the first token and of each later one.
- ``offline(requests)``: all requests at once; wall time for all of them.

Peers run from their real packages: HF transformers eager ``generate`` (offline as static batches
of ``batch_size`` in submission order, left-padded, each batch generating until its longest request
is done, the only way ``generate`` batches requests of different lengths), HF with
``torch.compile`` and a static KV cache (gpt-fast style), and llama.cpp through llama-cpp-python on
a GGUF written from the same checkpoint (``gguf_export.py``; it serves one sequence at a time).
A peer that cannot be imported is reported as skipped with the reason, never faked.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .workloads import Request


class PeerUnavailable(Exception):
    """The peer cannot run here (not installed, no checkpoint, wrong architecture); says why."""


@dataclass
class DecodeRun:
    tokens: list[int]
    token_times: list[float]  # seconds after submission at which each new token was available

    @property
    def ttft(self) -> float:
        return self.token_times[0]

    @property
    def tpot(self) -> float:
        """Mean time per output token after the first (the decode step time at batch 1)."""
        n = len(self.token_times)
        return (self.token_times[-1] - self.token_times[0]) / (n - 1) if n > 1 else float("nan")


@dataclass
class OfflineRun:
    seconds: float
    outputs: list[list[int]]
    extra: dict = field(default_factory=dict)


# ---- llmc ----------------------------------------------------------------------------------------

class LlmcEngine:
    name = "llmc"

    def __init__(self, package: Path, *, max_num_seqs: int, max_num_batched_tokens: int | None = None) -> None:
        from llmc.runtime.llm import LLM

        self.llm = LLM(package, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens)
        self.engine = self.llm.engine
        self._ids = 0

    def decode(self, request: Request) -> DecodeRun:
        from llmc.runtime.sampler import SamplingParams

        self._ids += 1
        request_id = f"bench-{self._ids}"
        start = time.perf_counter()
        self.engine.add_request(request_id, request.prompt, SamplingParams(max_tokens=request.max_tokens,
                                                                           ignore_eos=True))
        tokens, times = [], []
        while True:
            for out in self.engine.step():
                if out.request_id == request_id:
                    now = time.perf_counter() - start
                    tokens += out.new_token_ids
                    times += [now] * len(out.new_token_ids)
                    if out.finished:
                        return DecodeRun(tokens, times)

    def offline(self, requests: list[Request]) -> OfflineRun:
        from llmc.runtime.sampler import SamplingParams

        params = [SamplingParams(max_tokens=r.max_tokens, ignore_eos=True) for r in requests]
        steps = self.engine.scheduler.counters.steps
        start = time.perf_counter()
        outs = self.llm.generate([r.prompt for r in requests], params)
        seconds = time.perf_counter() - start
        return OfflineRun(seconds, [o.output_token_ids for o in outs],
                          {"steps": self.engine.scheduler.counters.steps - steps})


# ---- HF transformers -----------------------------------------------------------------------------

class _Timer:
    """A ``generate`` streamer that records when each new token arrives (the first call is the prompt)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter() - self.start)

    def end(self) -> None:
        pass


class HFEngine:
    """HF eager ``generate``; with ``compiled=True`` the forward runs through ``torch.compile`` over a
    static KV cache (the recipe of the transformers docs' "static cache and torch.compile")."""

    def __init__(self, checkpoint: Path | None, *, batch_size: int, compiled: bool = False) -> None:
        if checkpoint is None:
            raise PeerUnavailable("no HF checkpoint: pass --model CHECKPOINT with a package directory")
        import transformers

        self.name = "hf-compile" if compiled else "hf"
        self.model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
        self.model.generation_config.eos_token_id = None
        self.model.generation_config.pad_token_id = 0
        self.batch_size = batch_size
        self.compiled = compiled
        self.extra: dict = {}
        if compiled:
            self.model.generation_config.cache_implementation = "static"
            self.model.forward = torch.compile(self.model.forward, fullgraph=True, dynamic=False)

    def _generate(self, prompts: list[list[int]], new_tokens: int, streamer=None):
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])  # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with torch.inference_mode():
            out = self.model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                      do_sample=False, streamer=streamer)
        return out[:, width:].tolist()

    def decode(self, request: Request) -> DecodeRun:
        timer = _Timer()
        tokens = self._generate([request.prompt], request.max_tokens, streamer=timer)[0]
        return DecodeRun(tokens, timer.times)

    def offline(self, requests: list[Request]) -> OfflineRun:
        if self.compiled:
            # Every batch has its own prompt width and length, so the static cache and the compiled
            # graph would be rebuilt per batch: the timing would be compile time, not generation.
            raise PeerUnavailable("hf-compile runs the decode workload only (each offline batch shape recompiles)")
        start = time.perf_counter()
        outputs, padded = [], 0
        for i in range(0, len(requests), self.batch_size):
            batch = requests[i:i + self.batch_size]
            longest = max(r.max_tokens for r in batch)
            padded += sum(longest - r.max_tokens for r in batch)
            generated = self._generate([r.prompt for r in batch], longest)
            outputs += [g[:r.max_tokens] for g, r in zip(generated, batch)]
        return OfflineRun(time.perf_counter() - start, outputs, {"wasted_tokens": padded})


# ---- llama.cpp -----------------------------------------------------------------------------------

class LlamaCppEngine:
    """llama.cpp (llama-cpp-python) on a GGUF written from the checkpoint, ``threads`` CPU threads."""

    name = "llama.cpp"

    def __init__(self, checkpoint: Path | None, gguf_dir: Path, *, weight_type: str, threads: int,
                 n_ctx: int) -> None:
        if checkpoint is None:
            raise PeerUnavailable("no HF checkpoint: pass --model CHECKPOINT with a package directory")
        try:
            import llama_cpp
        except ImportError:
            raise PeerUnavailable("llama-cpp-python is not installed (pip install 'llmc[bench]'; it builds "
                                  "llama.cpp from source)") from None
        from .gguf_export import write_gguf

        path = write_gguf(checkpoint, gguf_dir / f"{checkpoint.name}-{weight_type}.gguf", weight_type)
        _probe_llama_cpp(path, threads)
        self.weight_type = weight_type
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                                   n_batch=512, verbose=False)

    def decode(self, request: Request) -> DecodeRun:
        self.llm.reset()
        start = time.perf_counter()
        tokens, times = [], []
        for token in self.llm.generate(request.prompt, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0,
                                       reset=True):
            tokens.append(int(token))
            times.append(time.perf_counter() - start)
            if len(tokens) == request.max_tokens:
                break
        return DecodeRun(tokens, times)

    def offline(self, requests: list[Request]) -> OfflineRun:
        start = time.perf_counter()
        outputs = [self.decode(r).tokens for r in requests]
        return OfflineRun(time.perf_counter() - start, outputs, {"batching": "none (one sequence at a time)"})


_PROBE = """
import sys, llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=64, n_threads=int(sys.argv[2]), verbose=False)
for n, _ in enumerate(llm.generate([1, 2, 3, 4], top_k=1, temp=0.0, reset=True)):
    if n == 2:
        break
"""


def _probe_llama_cpp(path: Path, threads: int) -> None:
    """Load ``path`` and generate 3 tokens in a child process first: llama.cpp's native code can
    crash the process (seen: a Q8_0 GGUF segfaults in llama-cpp-python 0.3.36 on a Xeon with AMX),
    which would take the whole bench and every figure measured so far with it."""
    import subprocess
    import sys

    try:
        done = subprocess.run([sys.executable, "-c", _PROBE, str(path), str(threads)], capture_output=True,
                              text=True, timeout=300)
    except subprocess.TimeoutExpired:
        raise PeerUnavailable(f"llama.cpp did not load and run {path.name} within 300 s") from None
    if done.returncode != 0:
        how = f"signal {-done.returncode}" if done.returncode < 0 else f"exit status {done.returncode}"
        tail = done.stderr.strip().splitlines()[-1:] or [""]
        raise PeerUnavailable(f"llama.cpp crashed ({how}) running {path.name} on this machine {tail[0]}".rstrip()
                              + "; try another --gguf-type")
