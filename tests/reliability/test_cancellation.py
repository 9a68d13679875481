"""Cancellation: streams the client closes mid-generation give back every KV page within 2 s.

100 streaming requests run at once against a small KV cache; each client reads its first one to
three events and closes the connection. Some are chat (the opening event comes before the request
is scheduled, so some are aborted while still waiting), some ask for ``n=2`` and some share a
prompt prefix (prefix-cached pages with several owners). Afterwards the block manager's free page
count is back at its idle value, no page has an owner, every engine request was counted as
aborted, and a new request completes normally.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from server_helpers import load_engine, metric, poll_until, serving

REQUESTS = 100
FREE_WITHIN_S = 2.0
MAX_TOKENS = 180  # far more than a client waits for: every request is cut mid-generation
SHARED_PREFIX = "A system prompt shared by many: "  # two full 16-token pages


def request(i: int) -> tuple[str, dict, int]:
    """(route, body, events to read before closing) of request ``i``."""
    text = (SHARED_PREFIX if i % 3 == 0 else "") + f"cancel me {i}"
    common = {"max_tokens": MAX_TOKENS, "ignore_eos": True, "temperature": 0.8, "seed": i, "stream": True,
              "n": 2 if i % 10 == 0 else 1}
    if i % 2 == 0:
        return "/v1/completions", {"prompt": text, **common}, 1 + i % 3
    return "/v1/chat/completions", {"messages": [{"role": "user", "content": text}], **common}, 1 + i % 3


@pytest.fixture(scope="module")
def engine(reliability_package):
    # 4 MiB of KV: 512 pages of 16 tokens; 8 sequences run at once, the rest wait.
    return load_engine(reliability_package, kv_cache_bytes=4 << 20, max_num_seqs=8)


async def cancel_after_events(client: httpx.AsyncClient, i: int, engine, peak: list[int]) -> bool:
    """Send request ``i``, read its first events, close. True if the stream was still going."""
    route, body, events = request(i)
    async with client.stream("POST", route, json=body) as response:
        assert response.status_code == 200, await response.aread()
        seen = 0
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                assert line != "data: [DONE]", f"request {i} finished before it was cancelled"
                seen += 1
                if seen == events:
                    break
        peak[0] = max(peak[0], engine.blocks.num_blocks - engine.blocks.num_free_blocks)
    # Leaving the block closes the half-read response, and with it the connection.
    return seen == events


async def cancel_all(url: str, engine, peak: list[int]) -> list[bool]:
    limits = httpx.Limits(max_connections=REQUESTS, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        return await asyncio.gather(*(cancel_after_events(client, i, engine, peak) for i in range(REQUESTS)))


def engine_requests() -> int:
    return sum(request(i)[1]["n"] for i in range(REQUESTS))


def test_cancelled_streams_free_all_pages(engine):
    blocks = engine.blocks
    with serving(engine) as server:
        async_engine = server.app.state.served.async_engine
        idle_free = blocks.num_free_blocks
        assert idle_free == blocks.num_blocks
        scrape = lambda: httpx.get(f"{server.url}/metrics", timeout=10).text  # noqa: E731
        aborted_before = metric(scrape(), "llmc_requests_finished_total", 'finish_reason="abort"')

        peak = [0]
        start = time.perf_counter()
        cut = asyncio.run(cancel_all(server.url, engine, peak))
        closed_at = time.perf_counter()
        assert all(cut) and len(cut) == REQUESTS
        assert peak[0] > 0  # pages were held while the streams ran

        def quiet() -> bool:
            return (blocks.num_free_blocks == idle_free and not engine.has_unfinished_requests()
                    and async_engine.num_in_flight == 0)

        poll_until(quiet, deadline_s=FREE_WITHIN_S, what=f"all KV pages free within {FREE_WITHIN_S} s")
        free_s = time.perf_counter() - closed_at
        leaked = idle_free - blocks.num_free_blocks
        assert leaked == 0 and all(count == 0 for count in blocks.ref_counts)
        def scraped_when_free() -> str | None:
            text = scrape()
            return text if metric(text, "llmc_kv_cache_free_blocks") == idle_free else None

        text = poll_until(scraped_when_free, deadline_s=FREE_WITHIN_S, what="/metrics to show every page free")
        aborted = metric(text, "llmc_requests_finished_total", 'finish_reason="abort"') - aborted_before
        assert aborted == engine_requests()

        reply = httpx.post(f"{server.url}/v1/completions", timeout=60,
                           json={"prompt": SHARED_PREFIX + "after", "max_tokens": 8, "ignore_eos": True})
        assert reply.status_code == 200
        assert reply.json()["choices"][0]["finish_reason"] == "length"
        assert reply.json()["usage"]["completion_tokens"] == 8
        poll_until(lambda: blocks.num_free_blocks == idle_free, deadline_s=FREE_WITHIN_S, what="pages freed again")

    print(f"\n[cancellation] {REQUESTS} streams ({engine_requests()} engine requests) cancelled mid-stream in "
          f"{closed_at - start:.2f} s; peak {peak[0]}/{blocks.num_blocks} pages in use; pages leaked: {leaked}; "
          f"all pages free {free_s * 1000:.0f} ms after the last close (limit {FREE_WITHIN_S:.0f} s); "
          f"{aborted:.0f} aborts counted; a new request then completed normally")
