"""Speculation leaks no KV pages and caches no rejected k/v.

200 requests per proposer arrive in waves on a KV cache small enough to preempt: greedy and
seeded sampled ones, n = 2, stop ids, shared prefixes, repetitive prompts, aborts mid-flight.
After every step the block managers' books are checked (each page's ref count is the number of
block tables holding it, free pages are exactly those with none, no sequence holds a page past its
tokens, the draft never knows more of a sequence than the model computed); at the end every page
of both pools is free again and every prefix-cache entry hashes real tokens of some request, never
a rejected proposal. A warm prefix cache left by speculative runs then serves new requests with the
outputs of a cold plain engine.
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest
import torch

from llmc.compiler import compile_model
from llmc.examples_tiny import save_tiny_model
from llmc.runtime.block_manager import KVBlockManager
from llmc.runtime.engine import EngineConfig, LLMEngine
from llmc.runtime.sampler import SamplingParams

REQUESTS = 200
pytestmark = pytest.mark.slow  # compiles models, runs thousands of requests

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    from test_speculative_greedy import bench_module

    root = tmp_path_factory.mktemp("speculative-pages")
    model = save_tiny_model("llama", root / "model", max_position_embeddings=512)
    draft = bench_module().truncated_checkpoint(model, root / "draft", 1)
    return compile_model(model, "cpu", root / "pkg", draft=draft).out_dir


def requests(seed: int):
    """REQUESTS (prompt, params, n) of every kind, in arrival order."""
    rng = random.Random(seed)
    shared = [rng.randrange(128) for _ in range(48)]
    out = []
    for i in range(REQUESTS):
        kind = i % 4
        if kind == 0:
            prompt = [rng.randrange(128) for _ in range(rng.randint(1, 120))]
        elif kind == 1:
            phrase = [rng.randrange(128) for _ in range(rng.randint(2, 10))]
            prompt = (phrase * 12)[:rng.randint(8, 90)]
        else:
            prompt = shared + [rng.randrange(128) for _ in range(rng.randint(0, 20))]
        sampled = i % 3 == 1
        params = SamplingParams(temperature=0.8 if sampled else 0.0, top_p=0.95, seed=i if sampled else None,
                                max_tokens=rng.randint(1, 40), repetition_penalty=1.2 if i % 5 == 2 else 1.0,
                                stop_token_ids=[rng.randrange(128)] if i % 6 == 5 else [])
        out.append((prompt, params, 2 if i % 25 == 7 else 1))
    return out


def check_books(engine: LLMEngine) -> None:
    """Every page's ref count is the number of tables holding it; free pages are those with none."""
    seqs = [*engine.scheduler.running, *engine.scheduler.waiting]
    books = [(engine.blocks, [s.table for s in seqs])]
    if engine.speculator.config.method == "draft":
        books.append((engine.speculator.proposer.blocks, [s.state.spec.draft_table for s in seqs]))
    for blocks, tables in books:
        held = Counter(b for t in tables for b in t.blocks)
        assert all(blocks.ref_counts[b] == held.get(b, 0) for b in range(blocks.num_blocks))
        assert set(blocks.free) == {b for b in range(blocks.num_blocks) if not held.get(b)}
    for seq in engine.scheduler.running:
        need = engine.blocks.blocks_needed(seq.num_tokens + len(seq.spec_token_ids))
        assert len(seq.table.blocks) <= need, f"{seq.request_id} holds pages past its tokens"
        assert len(seq.table.hashes) <= seq.num_tokens // engine.block_size
        assert seq.state.spec.draft_computed <= seq.num_computed + len(seq.spec_token_ids)


def real_hashes(blocks: KVBlockManager, sequences: list[list[int]]) -> set[bytes]:
    return {h for tokens in sequences for h in blocks.full_block_hashes(tokens)}


@pytest.mark.parametrize("method", ["draft", "ngram"])
def test_no_page_leaks_after_200_speculative_requests(package, method):
    probe = LLMEngine.from_package(package, config=EngineConfig(speculative="off"))
    per_block = probe.kv_cache_bytes // probe.blocks.num_blocks
    engine = LLMEngine.from_package(package, config=EngineConfig(
        speculative=method, num_speculative_tokens=4, adaptive_speculation=False,
        kv_cache_bytes=per_block * 48, max_num_seqs=12, max_num_batched_tokens=96))
    assert engine.blocks.num_blocks == 48  # 768 tokens for 12 sequences of up to 160: preemption
    initial = engine.blocks.num_free_blocks
    draft_initial = engine.speculator.proposer.blocks.num_free_blocks if method == "draft" else None
    pending = requests(seed=3)
    finished: dict[str, list[int]] = {}
    live: dict[str, list[int]] = {}
    aborted = 0
    step = 0
    while pending or engine.has_unfinished_requests():
        if step % 3 == 0:
            for _ in range(min(4, len(pending))):
                prompt, params, n = pending.pop(0)
                rid = f"r{REQUESTS - len(pending)}"
                for request_id in engine.add_request(rid, prompt, params, n=n):
                    live[request_id] = list(prompt)
        if step % 29 == 13 and engine.scheduler.running:  # a client goes away mid-flight
            victim = engine.scheduler.running[-1]
            out = engine.abort_request(victim.request_id)
            finished[out.request_id] = out.prompt_token_ids + out.output_token_ids
            live.pop(out.request_id)
            aborted += 1
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out.prompt_token_ids + out.output_token_ids
                live.pop(out.request_id)
        check_books(engine)
        step += 1
    assert len(finished) == REQUESTS + sum(n - 1 for _, _, n in requests(seed=3)) and aborted > 3
    metrics = engine.metrics()
    assert metrics["preemptions"] > 0 and metrics["spec_accepted_tokens"] > 0
    assert metrics["spec_draft_tokens"] > metrics["spec_accepted_tokens"], "some proposals must be rejected"
    assert engine.blocks.num_free_blocks == initial == engine.blocks.num_blocks
    assert not any(engine.blocks.ref_counts)
    if method == "draft":
        draft = engine.speculator.proposer.blocks
        assert draft.num_free_blocks == draft_initial == draft.num_blocks and not any(draft.ref_counts)
    assert set(engine.blocks.cached) <= real_hashes(engine.blocks, list(finished.values())), \
        "a prefix-cache entry hashes tokens no request has: a rejected proposal was registered"


def test_warm_prefix_cache_after_speculation_serves_plain_outputs(package):
    """Greedy requests extend earlier requests' prompt + output, so their prefixes come from pages
    written during speculative steps; a cold plain engine without prefix caching agrees."""
    engine = LLMEngine.from_package(package, config=EngineConfig(speculative="draft", num_speculative_tokens=4,
                                                                 adaptive_speculation=False))
    rng = random.Random(5)
    phrases = [[rng.randrange(128) for _ in range(rng.randint(2, 6))] for _ in range(16)]
    prompts = [(phrase * 20)[:rng.randint(20, 70)] for phrase in phrases]
    extras = [rng.randrange(128) for _ in prompts]
    first = [prompt + engine.generate(prompt, 40) for prompt in prompts]
    assert engine.metrics()["spec_accepted_tokens"] > 0
    hits_before = engine.metrics()["prefix_cache_hits"]
    warm = [engine.generate(tokens + [extra], 12) for tokens, extra in zip(first, extras)]
    assert engine.metrics()["prefix_cache_hits"] - hits_before > 16 * 32, "the extended prompts must hit the cache"
    cold = LLMEngine.from_package(package, config=EngineConfig(speculative="off", enable_prefix_caching=False))
    assert warm == [cold.generate(tokens + [extra], 12) for tokens, extra in zip(first, extras)]
