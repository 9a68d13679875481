"""`llmc bench`: one run times llmc and its peers on the same model, requests and machine.

Order of a run: measure memory bandwidth; then per workload, per engine: one warm-up run (offline:
on two requests), then ``repeats`` timed runs, the median kept. Engines run one after another (never two at once: each
would steal the other's cores and memory bandwidth); a peer is loaded only for its turn and freed
after it. Ratios are llmc over the peer, so >1 means llmc is faster.
"""

from __future__ import annotations

import gc
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import roofline
from .engines import HFEngine, LlamaCppEngine, LlmcEngine, PeerUnavailable
from .models import BenchSubject, cache_root
from .workloads import decode_request, describe, poisson_arrivals, spread_requests

BASELINES = ("hf", "hf-compile", "llama.cpp")
WORKLOADS = ("decode", "offline", "online")


@dataclass
class BenchOptions:
    baselines: tuple[str, ...] = BASELINES
    workloads: tuple[str, ...] = ("decode", "offline")
    repeats: int = 3
    threads: int | None = None
    decode_prompt: int = 128
    decode_tokens: int = 128
    offline_requests: int = 32
    batch_size: int = 16               # llmc's max_num_seqs and HF's static batch size
    online_requests: int = 32
    rates: tuple[float, ...] = (1.0,)
    ttft_slo: float = 1.0              # seconds
    itl_slo: float = 0.2               # seconds
    gguf_type: str | None = None       # None: the llmc package's weight precision (f32 / bf16 / q8_0 / q4_0)
    seed: int = 0
    command: str = ""
    extra_runs: dict = field(default_factory=dict)


def _median_run(fn: Callable, repeats: int, warm_up: Callable | None = None):
    """Warm up once (``warm_up``, else ``fn``), run ``fn`` ``repeats`` times; the run with the median
    wall time, and all the times."""
    (warm_up or fn)()
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        runs.append((time.perf_counter() - start, result))
    runs.sort(key=lambda r: r[0])
    return runs[len(runs) // 2][1], [round(t, 4) for t, _ in runs]


def _agreement(a: list[int], b: list[int]) -> int:
    """Length of the common prefix of two token lists (greedy engines agree until a near-tie)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


GGUF_TYPE_OF_SCHEME = {"bf16": "bf16", "int8": "q8_0", "w8a8": "q8_0", "fp8": "q8_0", "int4": "q4_0"}


def package_weight_type(package: Path) -> str:
    """The GGUF type matching the package's linears: bf16 for bf16, q8_0 for the 8-bit schemes,
    q4_0 for int4, else f32."""
    import json

    passes = json.loads((package / "plan.json").read_text(encoding="utf-8"))["report"]["passes"]
    for record in passes:
        if record["name"] == "quantize" and record["changed"]:
            return GGUF_TYPE_OF_SCHEME.get(record["stats"].get("scheme"), "f32")  # "none": overrides only
    return "f32"


def _make_peer(name: str, subject: BenchSubject, options: BenchOptions, n_ctx: int, gguf_type: str):
    if name in ("hf", "hf-compile"):
        return HFEngine(subject.checkpoint, batch_size=options.batch_size, compiled=name == "hf-compile")
    if name == "llama.cpp":
        return LlamaCppEngine(subject.checkpoint, cache_root() / "gguf", weight_type=gguf_type,
                              threads=options.threads or torch.get_num_threads(), n_ctx=n_ctx)
    raise ValueError(f"unknown baseline {name!r}; choose from {', '.join(BASELINES)}")


def machine_info() -> dict:
    import transformers

    info = {"cpu": _cpu_name(), "cores": torch.get_num_threads(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import llama_cpp
        info["llama_cpp_python"] = llama_cpp.__version__
    except ImportError:
        pass
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_bench(subject: BenchSubject, options: BenchOptions, notify: Callable[[str], None] = print) -> dict:
    import json

    if options.threads:
        torch.set_num_threads(options.threads)
    plan = json.loads((subject.package / "plan.json").read_text(encoding="utf-8"))
    vocab, max_len = plan["model"]["vocab_size"], plan["model"]["max_positions"]
    gguf_type = options.gguf_type or package_weight_type(subject.package)
    notify("measuring memory bandwidth (256 MiB copy)")
    bandwidth = roofline.measure_bandwidth()
    results: dict = {"date": time.strftime("%Y-%m-%d"), "command": options.command, "model": subject.label,
                     "package": str(subject.package), "target": plan["target"]["name"], "machine": machine_info(),
                     "bandwidth_bytes_per_s": bandwidth, "gguf_type": gguf_type, "workloads": {}, "skipped": {}}

    llmc = LlmcEngine(subject.package, max_num_seqs=options.batch_size)
    weight_bytes = roofline.decode_weight_bytes(subject.package, llmc.engine.weights)
    kv_per_token = roofline.kv_bytes_per_context_token(subject.package)
    results["llmc_decode_weight_bytes"] = weight_bytes
    peers = list(options.baselines)

    if "decode" in options.workloads:
        request = decode_request(vocab, options.decode_prompt, options.decode_tokens, options.seed)
        bytes_per_token = roofline.decode_bytes_per_token(weight_bytes, kv_per_token, options.decode_prompt,
                                                          options.decode_tokens)
        rows = {}
        for name in ["llmc", *peers]:
            notify(f"decode: {name} (prompt {options.decode_prompt}, {options.decode_tokens} new tokens, "
                   f"{options.repeats} runs)")
            engine = llmc if name == "llmc" else _try_peer(name, subject, options, max_len, gguf_type, results)
            if engine is None:
                continue
            run, times = _median_run(lambda: engine.decode(request), options.repeats)
            rows[name] = {"tokens_per_s": 1 / run.tpot, "ttft_s": run.ttft, "tpot_s": run.tpot,
                          "run_seconds": times, "tokens": len(run.tokens),
                          "agree_with_llmc": _agreement(run.tokens, rows["llmc"]["_tokens"]) if rows else None,
                          "_tokens": run.tokens}
            if name == "llmc":
                rows[name]["roofline"] = bytes_per_token / run.tpot / bandwidth
                rows[name]["bytes_per_token"] = bytes_per_token
            notify(f"  {name}: {1 / run.tpot:.1f} tokens/s, TTFT {run.ttft * 1e3:.0f} ms, "
                   f"{run.tpot * 1e3:.1f} ms/token (runs: {times} s)")
            if engine is not llmc:
                del engine
                gc.collect()
        for row in rows.values():
            row.pop("_tokens")
        results["workloads"]["decode"] = {"prompt_tokens": options.decode_prompt,
                                          "new_tokens": options.decode_tokens, "engines": rows}

    if "offline" in options.workloads:
        requests = spread_requests(vocab, options.offline_requests, max_model_len=max_len, seed=options.seed)
        useful = sum(r.max_tokens for r in requests)
        rows = {}
        for name in ["llmc", *[p for p in peers if p != "hf-compile"]]:
            notify(f"offline: {name} ({len(requests)} requests, batch {options.batch_size}, {options.repeats} runs)")
            engine = llmc if name == "llmc" else _try_peer(name, subject, options, max_len, gguf_type, results)
            if engine is None:
                continue
            # Warm-up on two requests: it is there for first-call allocations and thread pools, and a
            # full pass of a sequential peer (llama.cpp) would cost as much as the timed runs.
            run, times = _median_run(lambda: engine.offline(requests), options.repeats,
                                     warm_up=lambda: engine.offline(requests[:2]))
            rows[name] = {"tokens_per_s": useful / run.seconds, "seconds": run.seconds, "run_seconds": times,
                          "requests_per_s": len(requests) / run.seconds, **run.extra}
            notify(f"  {name}: {useful / run.seconds:.1f} tokens/s (runs: {times} s)")
            if engine is not llmc:
                del engine
                gc.collect()
        if "hf-compile" in peers:
            results["skipped"]["hf-compile offline"] = "runs the decode workload only: each offline batch " \
                                                       "shape would recompile the static-cache graph"
        results["workloads"]["offline"] = {**describe(requests), "useful_output_tokens": useful, "engines": rows}

    del llmc
    gc.collect()
    if "online" in options.workloads:
        from .online import run_online

        base = spread_requests(vocab, options.online_requests, max_model_len=max_len, seed=options.seed + 7)
        by_rate = {}
        for rate in options.rates:
            notify(f"online: llmc server, {len(base)} requests at {rate:g} req/s (Poisson)")
            by_rate[f"{rate:g}"] = run_online(subject.package, poisson_arrivals(base, rate, options.seed),
                                              max_num_seqs=options.batch_size, threads=options.threads,
                                              ttft_slo=options.ttft_slo, itl_slo=options.itl_slo)
        results["workloads"]["online"] = {**describe(base), "engines": {"llmc": by_rate}}
        results["skipped"]["online peers"] = "HF transformers and llama-cpp-python ship no continuous-batching " \
                                             "server to compare against"
    return results


def _try_peer(name, subject, options, max_len, gguf_type, results):
    try:
        return _make_peer(name, subject, options, max_len, gguf_type)
    except PeerUnavailable as exc:
        results["skipped"][name] = str(exc)
        return None
