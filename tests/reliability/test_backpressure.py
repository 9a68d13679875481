"""Backpressure: one running slot and a queue of one admit exactly two of ten simultaneous requests.

The other eight get 429 at once, each with ``Retry-After`` and an OpenAI-style error, and the
server serves normally afterwards. The engine is held (its ``step()`` does nothing) until the
eight refusals are in, so the two admitted requests are still in flight however fast the model
decodes: the counts are exact, not a race.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import threading
import time

import httpx
import pytest

from server_helpers import load_engine, metric, poll_until, serving

REQUESTS = 10
ADMITTED = 2  # max_num_seqs=1 running + max_queue=1 waiting
MAX_TOKENS = 24
DEADLINE_S = 60


class HeldEngine:
    """The real engine whose ``step()`` does nothing until ``released`` is set.

    The engine thread keeps taking commands (add, abort) meanwhile, so admitted requests stay in
    flight, holding their slot and queue place, for as long as the test needs.
    """

    def __init__(self, engine) -> None:
        self._engine = engine
        self.released = threading.Event()

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def step(self):
        if not self.released.wait(0.001):
            return []
        return self._engine.step()


@pytest.fixture(scope="module")
def engine(reliability_package) -> HeldEngine:
    return HeldEngine(load_engine(reliability_package, max_num_seqs=1, kv_cache_bytes=1 << 20))


def body(i: int) -> dict:
    # Half streamed: a full queue must be refused before any event is sent, not as an event.
    return {"prompt": f"request {i}", "max_tokens": MAX_TOKENS, "ignore_eos": True, "temperature": 0,
            "stream": i % 2 == 1}


async def send(client: httpx.AsyncClient, i: int) -> tuple[int, dict, dict | str, float]:
    """(status, headers, JSON body or the event text, seconds to the whole answer) of request ``i``."""
    start = time.perf_counter()
    async with client.stream("POST", "/v1/completions", json=body(i)) as response:
        raw = (await response.aread()).decode()
    seconds = time.perf_counter() - start
    content = raw if response.status_code == 200 and body(i)["stream"] else json.loads(raw)
    return response.status_code, dict(response.headers), content, seconds


async def storm(url: str, engine: HeldEngine) -> tuple[list, list]:
    """Fire all requests at once; release the engine once every refusal has come back.

    Returns (answers in request order, indices answered while the engine was held).
    """
    limits = httpx.Limits(max_connections=REQUESTS, max_keepalive_connections=REQUESTS)
    async with httpx.AsyncClient(base_url=url, timeout=DEADLINE_S, limits=limits) as client:
        tasks = [asyncio.create_task(send(client, i)) for i in range(REQUESTS)]
        deadline = time.monotonic() + DEADLINE_S
        pending = set(tasks)
        while len(pending) > ADMITTED:
            done, pending = await asyncio.wait(pending, timeout=deadline - time.monotonic(),
                                               return_when=asyncio.FIRST_COMPLETED)
            assert done, f"only {REQUESTS - len(pending)} answers within {DEADLINE_S} s while the engine was held"
        answered_while_held = [i for i, task in enumerate(tasks) if task.done()]
        engine.released.set()
        return await asyncio.gather(*tasks), answered_while_held


def test_ten_simultaneous_requests_two_served_eight_refused(engine):
    engine.released.clear()
    with serving(engine, max_queue=1) as server:
        async_engine = server.app.state.served.async_engine
        assert async_engine.capacity == ADMITTED
        start = time.perf_counter()
        answers, while_held = asyncio.run(storm(server.url, engine))
        storm_s = time.perf_counter() - start

        statuses = [status for status, *_ in answers]
        served = [i for i, s in enumerate(statuses) if s == 200]
        refused = [i for i, s in enumerate(statuses) if s in (429, 503)]
        assert len(served) == ADMITTED and len(refused) == REQUESTS - ADMITTED, statuses
        assert sorted(while_held) == refused  # refused at once, while the admitted two were still held
        for i in refused:
            status, headers, error_body, _ = answers[i]
            assert int(headers["retry-after"]) >= 1
            assert headers["content-type"].startswith("application/json")
            error = error_body["error"]
            assert set(error) == {"message", "type", "param", "code"}
            assert error["type"] == "rate_limit_error" and error["code"] == "queue_full"
            assert "busy" in error["message"] and "retry" in error["message"]
        for i in served:
            _, _, content, _ = answers[i]
            if body(i)["stream"]:
                assert content.rstrip().endswith("data: [DONE]") and '"finish_reason":"length"' in content
            else:
                assert content["usage"]["completion_tokens"] == MAX_TOKENS
                assert content["choices"][0]["finish_reason"] == "length"

        # Afterwards: nothing is left counted in flight, and the server serves normally.
        poll_until(lambda: async_engine.num_in_flight == 0, what="no request in flight")
        after_start = time.perf_counter()
        with httpx.Client(base_url=server.url, timeout=DEADLINE_S) as client:
            sequential = [client.post("/v1/completions", json={**body(0), "max_tokens": 4}).status_code
                          for _ in range(3)]
        pair = asyncio.run(_pair(server.url))
        after_s = time.perf_counter() - after_start
        assert sequential == [200] * 3 and pair == [200] * ADMITTED
        text = httpx.get(f"{server.url}/metrics", timeout=10).text
        assert metric(text, "llmc_requests_rejected_total") == REQUESTS - ADMITTED
        assert metric(text, "llmc_kv_cache_usage_ratio") == 0

    refusal_ms = [answers[i][3] * 1000 for i in refused]
    print(f"\n[backpressure] {REQUESTS} simultaneous requests, 1 running slot + queue of 1: "
          f"{len(served)} served, {len(refused)} refused with 429 (Retry-After {answers[refused[0]][1]['retry-after']} s); "
          f"refusal latency median {statistics.median(refusal_ms):.1f} ms, max {max(refusal_ms):.1f} ms; "
          f"storm answered in {storm_s:.2f} s; afterwards {len(sequential) + len(pair)}/"
          f"{len(sequential) + len(pair)} served in {after_s:.2f} s")


async def _pair(url: str) -> list[int]:
    """Two requests at once: both fit (the slot and the queue place are free again)."""
    async with httpx.AsyncClient(base_url=url, timeout=DEADLINE_S) as client:
        replies = await asyncio.gather(*(client.post("/v1/completions", json={**body(0), "max_tokens": 4})
                                         for _ in range(ADMITTED)))
    return [r.status_code for r in replies]
