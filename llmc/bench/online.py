"""Online serving: Poisson arrivals against the package's real HTTP server, streamed.

The package is started as users start it (``python PKG serve``) on a free loopback port; requests
go to ``/v1/completions`` as token ids with ``stream=true``, each sent at its arrival time whether or
not earlier ones have finished (an open-loop client, as vLLM's serving benchmark is). Per request:
TTFT (send -> first streamed token) and the gaps between later chunks (inter-token latency).
Goodput counts the requests per second that met both latency targets (DistServe's definition).
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from llmc.errors import LlmcError

from .workloads import Request

STARTUP_SECONDS = 120.0


@dataclass
class StreamedRequest:
    sent: float
    chunk_times: list[float] = field(default_factory=list)
    tokens: int = 0
    error: str | None = None

    @property
    def ttft(self) -> float:
        return self.chunk_times[0] - self.sent

    @property
    def gaps(self) -> list[float]:
        return list(np.diff(self.chunk_times))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(package: Path, *, max_num_seqs: int, threads: int | None) -> tuple[subprocess.Popen, str]:
    import httpx

    port = _free_port()
    cmd = [sys.executable, str(package), "serve", "--port", str(port), "--max-num-seqs", str(max_num_seqs)]
    if threads:
        cmd += ["--threads", str(threads)]
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise LlmcError(f"`{' '.join(cmd)}` exited with {process.returncode}: {process.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    process.terminate()
    raise LlmcError(f"the package's server did not answer {url}/health within {STARTUP_SECONDS:.0f} s")


async def _one(client, url: str, request: Request, start: float) -> StreamedRequest:
    await asyncio.sleep(max(0.0, start + request.arrival - time.perf_counter()))
    record = StreamedRequest(time.perf_counter())
    body = {"prompt": request.prompt, "max_tokens": request.max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            if response.status_code != 200:
                record.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return record
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("choices"):
                    record.chunk_times.append(time.perf_counter())
                if chunk.get("usage"):
                    record.tokens = chunk["usage"]["completion_tokens"]
    except Exception as exc:  # a dropped connection is a failed request, reported, not a crash
        record.error = f"{type(exc).__name__}: {exc}"
    return record


async def _run(url: str, requests: list[Request]) -> tuple[list[StreamedRequest], float]:
    import httpx

    limits = httpx.Limits(max_connections=len(requests) + 1)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None), limits=limits) as client:
        start = time.perf_counter()
        records = await asyncio.gather(*(_one(client, url, r, start) for r in requests))
        return list(records), time.perf_counter() - start


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": float("nan"), "p90": float("nan"), "p99": float("nan")}
    return {f"p{q}": float(np.percentile(values, q)) for q in (50, 90, 99)}


def run_online(package: Path, requests: list[Request], *, max_num_seqs: int, threads: int | None,
               ttft_slo: float, itl_slo: float) -> dict:
    """Serve ``requests`` (with arrival times) and summarize latency, throughput and goodput."""
    process, url = start_server(package, max_num_seqs=max_num_seqs, threads=threads)
    try:
        records, seconds = asyncio.run(_run(url, requests))
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
    ok = [r for r in records if r.error is None and r.chunk_times]
    gaps = [g for r in ok for g in r.gaps]
    good = [r for r in ok if r.ttft <= ttft_slo and (not r.gaps or float(np.mean(r.gaps)) <= itl_slo)]
    tokens = sum(r.tokens for r in ok)
    return {"requests": len(records), "failed": len(records) - len(ok),
            "errors": sorted({r.error for r in records if r.error})[:3],
            "seconds": seconds, "output_tokens_per_s": tokens / seconds, "requests_per_s": len(ok) / seconds,
            "ttft_s": _percentiles([r.ttft for r in ok]), "itl_s": _percentiles(gaps),
            "slo": {"ttft_s": ttft_slo, "itl_s": itl_slo},
            "goodput_requests_per_s": len(good) / seconds, "slo_attainment": len(good) / max(len(records), 1),
            "ttft_samples_s": sorted(r.ttft for r in ok), "itl_samples_s": sorted(gaps)}
