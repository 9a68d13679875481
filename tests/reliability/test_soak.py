"""Soak: a bounded loopback load on ``python PKG serve``, then the server must look as it did before.

16 client threads send a fixed, seeded mix of requests: completions and chat, streamed and whole,
prompt lengths from 1 to 190 tokens, max_tokens from 1 to 40, greedy, seeded and unseeded sampling.
Checked: no request fails; every greedy or seeded request answers exactly what it answered alone on
the idle server before the load; once idle again the server holds no more KV pages than at the start;
its RSS (``/proc/PID/status``) does not grow from the first quarter of the run to the last.

CI runs ``CI_REQUESTS``; ``pytest --full-load`` runs ``FULL_REQUESTS`` (figures in RESULTS.md).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from server_helpers import free_port, metric, poll_until, wait_healthy

CI_REQUESTS = 400
FULL_REQUESTS = 2000
CLIENTS = 16  # twice the engine's 8 running slots, so requests also wait in its queue
# 512 KiB of KV is 64 pages of 16 tokens; 8 running sequences of up to 230 tokens may want 120, so
# the LRU list evicts cached prefixes all through the run and long batches preempt (and recompute).
KV_CACHE = "512KiB"
POOL = 32  # distinct checked requests (greedy or seeded), each served alone first for its reference
CHECKED_SHARE = 0.75  # the rest: unseeded sampling over fresh prompts, checked only for their shape
# RSS bound, last quarter's peak over the first quarter's. The KV pool is allocated at start and the
# first quarter already runs every batch shape (allocator and torch caches warm), so nothing the
# server keeps should grow with the requests it has served: measured +0.2 MiB (CI) and +1.5 MiB
# (full count), and 8,000 requests level off at +0.7 MiB (RESULTS.md). 8 MiB leaves room for
# allocator noise and still catches a leak of 6 KiB per request at the full count (1,500 requests
# from the end of the first quarter to the end of the last), 28 KiB at CI's (300).
RSS_GROWTH_BOUND_MIB = 8
# One torch thread in the server (serve --threads 1): the machine's 2 cores also run the 16 clients,
# and torch's intra-op pool spinning against them (and other work) made decode steps ~15x slower
# (11 ms -> 120-170 ms).
SERVER_THREADS = ("--threads", "1")

PREAMBLE = "You are a terse assistant; answer in one line.\n"  # 47 chars: shared full pages of 16 tokens
ALPHABET = "abcdefghijklmnopqrstuvwxyz     ,.?"
COMPLETION_LENGTHS = (1, 7, 20, 48, 90, 150, 190)  # prompt tokens (char tokenizer: one per char)
CHAT_LENGTHS = (1, 7, 20, 48, 90, 140)  # message chars; the template and system turn add up to ~75
MAX_TOKENS = (1, 6, 16, 40)
SEEDED = {"temperature": 0.8, "top_p": 0.95}


@dataclass(frozen=True)
class Spec:
    """One request as the client sends it, less the ``stream`` fields."""

    route: str  # "/v1/completions" or "/v1/chat/completions"
    body: str   # JSON, so a Spec is hashable and reproducible
    checked: bool  # greedy or seeded: its output must equal its reference


@dataclass
class Answer:
    text: str
    finish_reason: str
    completion_tokens: int


@dataclass
class Outcome:
    spec: Spec
    stream: bool
    seconds: float = 0.0
    answer: Answer | None = None
    error: str | None = None


@dataclass
class Figures:
    outcomes: list[Outcome] = field(default_factory=list)
    rss_samples: list[tuple[int, int]] = field(default_factory=list)  # (requests done, RSS bytes)
    seconds: float = 0.0


# ---- the workload --------------------------------------------------------------------------------

def text_of(rng: random.Random, length: int, shared_prefix: bool) -> str:
    prefix = PREAMBLE[:length] if shared_prefix else ""
    return prefix + "".join(rng.choices(ALPHABET, k=length - len(prefix)))


def random_spec(rng: random.Random, sampling: dict, checked: bool) -> Spec:
    max_tokens = rng.choice(MAX_TOKENS)
    shared = rng.random() < 0.5
    if rng.random() < 0.5:
        body = {"prompt": text_of(rng, rng.choice(COMPLETION_LENGTHS), shared), "max_tokens": max_tokens}
        route = "/v1/completions"
    else:
        messages = [{"role": "user", "content": text_of(rng, rng.choice(CHAT_LENGTHS), False)}]
        if shared:
            messages.insert(0, {"role": "system", "content": PREAMBLE})
        body = {"messages": messages, "max_tokens": max_tokens}
        route = "/v1/chat/completions"
    return Spec(route, json.dumps({**body, **sampling}), checked)


def workload(count: int, seed: int = 0) -> list[tuple[Spec, bool]]:
    """``count`` (spec, stream) pairs: checked ones drawn from a pool (so each repeats under load), the
    rest fresh unseeded ones."""
    rng = random.Random(seed)
    pool = [random_spec(rng, {"temperature": 0} if i % 2 == 0 else {**SEEDED, "seed": rng.randrange(2**32)}, True)
            for i in range(POOL)]
    plan = []
    for _ in range(count):
        spec = rng.choice(pool) if rng.random() < CHECKED_SHARE else random_spec(rng, {"temperature": 1.0}, False)
        plan.append((spec, rng.random() < 0.5))
    return plan


# ---- one request ---------------------------------------------------------------------------------

def send(client: httpx.Client, url: str, spec: Spec, stream: bool) -> Answer:
    """The answer to ``spec``; raises AssertionError on anything but a complete, well-formed one."""
    body = json.loads(spec.body)
    chat = spec.route.endswith("chat/completions")
    if not stream:
        response = client.post(url + spec.route, json=body)
        assert response.status_code == 200, f"{response.status_code}: {response.text}"
        data = response.json()
        choice = data["choices"][0]
        text = choice["message"]["content"] if chat else choice["text"]
        return Answer(text, choice["finish_reason"], data["usage"]["completion_tokens"])
    body.update(stream=True, stream_options={"include_usage": True})
    pieces, finish_reason, events = [], None, []
    with client.stream("POST", url + spec.route, json=body) as response:
        assert response.status_code == 200, f"{response.status_code}: {response.read().decode()}"
        events = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert events and events[-1] == "[DONE]", f"the stream did not end with [DONE]: {events[-2:]}"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "error" not in chunks[-1], chunks[-1]
    for chunk in chunks[:-1]:
        assert "error" not in chunk, chunk
        choice = chunk["choices"][0]
        pieces.append(choice["delta"].get("content", "") if chat else choice["text"])
        finish_reason = choice["finish_reason"] or finish_reason
    return Answer("".join(pieces), finish_reason, chunks[-1]["usage"]["completion_tokens"])


def check_shape(spec: Spec, answer: Answer) -> None:
    max_tokens = json.loads(spec.body)["max_tokens"]
    assert answer.finish_reason in ("stop", "length"), answer
    assert 0 <= answer.completion_tokens <= max_tokens, answer
    assert answer.finish_reason == "stop" or answer.completion_tokens == max_tokens, answer


# ---- the server ----------------------------------------------------------------------------------

class ServerProcess:
    """``python PKG serve`` with its output in a file (a pipe nobody reads would fill up and block it)."""

    def __init__(self, package: Path, log: Path, *args: str) -> None:
        self.url = ""
        self.command = [sys.executable, str(package), "serve", "--port", str(free_port()), *SERVER_THREADS, *args]
        self.log_path = log
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> "ServerProcess":
        self.log = self.log_path.open("w")
        self.process = subprocess.Popen(self.command, stdout=self.log, stderr=subprocess.STDOUT, text=True,
                                        env=dict(os.environ))
        self.url = f"http://127.0.0.1:{self.command[self.command.index('--port') + 1]}"
        try:
            wait_healthy(self.url, deadline_s=120)  # two cores shared with other work: torch imports slowly
        except AssertionError:
            self.__exit__()
            raise AssertionError(f"the server did not start:\n{self.log_path.read_text()}") from None
        return self

    def __exit__(self, *exc) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.log.close()

    def rss(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024  # reported in kB
        raise AssertionError(f"no VmRSS in /proc/{self.process.pid}/status")

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=10).text

    def idle_kv_pages_in_use(self) -> tuple[int, int]:
        """(pages in use, pages in all) once nothing runs or waits (prefix-cached free pages are free)."""
        def idle_text():
            text = self.metrics()
            busy = metric(text, "llmc_num_requests_running") + metric(text, "llmc_num_requests_waiting")
            return text if busy == 0 else None

        text = poll_until(idle_text, what="the server to go idle")
        total = metric(text, "llmc_kv_cache_blocks")
        return int(total - metric(text, "llmc_kv_cache_free_blocks")), int(total)


# ---- the load ------------------------------------------------------------------------------------

def run_load(server: ServerProcess, plan: list[tuple[Spec, bool]], clients: int) -> Figures:
    figures = Figures(outcomes=[Outcome(spec, stream) for spec, stream in plan])
    next_index = iter(range(len(plan)))
    lock = threading.Lock()
    done = [0]
    finished = threading.Event()

    def client_loop() -> None:
        with httpx.Client(timeout=300) as client:
            while True:
                with lock:
                    index = next(next_index, None)
                if index is None:
                    return
                outcome = figures.outcomes[index]
                start = time.perf_counter()
                try:
                    outcome.answer = send(client, server.url, outcome.spec, outcome.stream)
                    check_shape(outcome.spec, outcome.answer)
                except Exception as exc:  # noqa: BLE001 - every failure is counted and reported
                    outcome.error = f"{type(exc).__name__}: {exc}"
                outcome.seconds = time.perf_counter() - start
                with lock:
                    done[0] += 1

    def sample_rss() -> None:
        while not finished.wait(0.05):
            figures.rss_samples.append((done[0], server.rss()))

    sampler = threading.Thread(target=sample_rss, daemon=True)
    threads = [threading.Thread(target=client_loop, daemon=True) for _ in range(clients)]
    start = time.perf_counter()
    sampler.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    figures.seconds = time.perf_counter() - start
    finished.set()
    sampler.join()
    return figures


def references(server: ServerProcess, specs: set[Spec]) -> dict[Spec, Answer]:
    """Each checked request served alone on the idle server, whole (not streamed)."""
    with httpx.Client(timeout=60) as client:
        return {spec: send(client, server.url, spec, stream=False) for spec in sorted(specs, key=lambda s: s.body)}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def quarter_peaks(samples: list[tuple[int, int]], total: int) -> list[int]:
    """Peak RSS while each quarter of the requests was being served (by requests completed)."""
    peaks = [0, 0, 0, 0]
    for done, rss in samples:
        quarter = min(3, done * 4 // total)
        peaks[quarter] = max(peaks[quarter], rss)
    return peaks


@pytest.mark.slow  # a server subprocess and a few hundred requests: ~40 s on the 2-core machine
def test_soak(reliability_package, full_load, tmp_path):
    count = FULL_REQUESTS if full_load else CI_REQUESTS
    plan = workload(count)
    checked = {spec for spec, _ in plan if spec.checked}
    with ServerProcess(reliability_package, tmp_path / "server.log", "--kv-cache-bytes", KV_CACHE) as server:
        expected = references(server, checked)
        pages_start, pages_total = server.idle_kv_pages_in_use()
        figures = run_load(server, plan, CLIENTS)
        pages_end, _ = server.idle_kv_pages_in_use()
        final_metrics = server.metrics()
    log = (tmp_path / "server.log").read_text()

    outcomes = figures.outcomes
    failed = [o for o in outcomes if o.error is not None]
    differing = [o for o in outcomes if o.answer is not None and o.spec.checked and o.answer != expected[o.spec]]
    latencies = [o.seconds for o in outcomes]
    tokens = sum(o.answer.completion_tokens for o in outcomes if o.answer is not None)
    peaks = quarter_peaks(figures.rss_samples, count)
    growth_mib = (peaks[3] - peaks[0]) / 2**20
    print(f"\nsoak: {count} requests ({len(checked)} distinct checked, {sum(o.stream for o in outcomes)} streamed), "
          f"{CLIENTS} clients, KV cache {KV_CACHE} ({pages_total} pages)\n"
          f"  failed {len(failed)}, differing from their reference {len(differing)}\n"
          f"  {figures.seconds:.1f} s: {count / figures.seconds:.1f} requests/s, {tokens / figures.seconds:.0f} "
          f"generated tokens/s; latency p50 {percentile(latencies, 0.5) * 1e3:.0f} ms, "
          f"p99 {percentile(latencies, 0.99) * 1e3:.0f} ms\n"
          f"  preemptions {metric(final_metrics, 'llmc_preemptions_total'):.0f}, prefix cache hit rate "
          f"{metric(final_metrics, 'llmc_prefix_cache_hit_rate'):.2f}\n"
          f"  KV pages in use when idle: start {pages_start}, end {pages_end}\n"
          f"  RSS peak per quarter (MiB): {' '.join(f'{p / 2**20:.1f}' for p in peaks)}; "
          f"growth {growth_mib:+.1f} MiB (bound {RSS_GROWTH_BOUND_MIB})")

    assert not failed, f"{len(failed)} failed, e.g. {failed[0].spec.body} -> {failed[0].error}"
    assert not differing, (f"{len(differing)} differ from the request served alone, e.g. {differing[0].spec.body}: "
                           f"{differing[0].answer} != {expected[differing[0].spec]}")
    assert pages_end == pages_start
    assert all(peaks), f"a quarter has no RSS sample: {peaks}"
    assert growth_mib <= RSS_GROWTH_BOUND_MIB
    assert "Traceback" not in log and "ERROR" not in log, log[-4000:]
