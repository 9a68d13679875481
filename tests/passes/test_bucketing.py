"""bucketing: a run of random request sizes gives the same tokens with and without bucketing, the
shapes it executed are exactly the bucket set, and the padding waste is reported."""

from __future__ import annotations

import random

import pytest
import torch

from llmc.compiler import compile_model
from llmc.examples_tiny import save_tiny_model
from llmc.runtime.llm import LLM
from llmc.runtime.sampler import SamplingParams

TOKENS, BATCH = [8, 16, 32], [1, 2, 4]
SMALL = [f"runtime.token_buckets={TOKENS}", f"runtime.batch_buckets={BATCH}",
         "runtime.max_num_batched_tokens=32", "runtime.max_num_seqs=4"]


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    root = tmp_path_factory.mktemp("bucketing")
    model = save_tiny_model("llama", root / "model")
    return {on: compile_model(model, "cpu", root / f"pkg-{on}", overrides=[*SMALL, f"bucketing.enabled={on}"],
                              quality_tokens=0).out_dir for on in ("true", "false")}


def random_requests(seed=0, n=12):
    rng = random.Random(seed)
    return ([[rng.randrange(128) for _ in range(rng.randint(1, 40))] for _ in range(n)],
            [SamplingParams(max_tokens=rng.randint(1, 12), logprobs=1) for _ in range(n)])


def test_same_tokens_and_shapes_are_the_buckets(packages):
    prompts, params = random_requests()
    plain = LLM(packages["false"]).generate(prompts, params)
    llm = LLM(packages["true"])
    bucketed = llm.generate(prompts, params)
    for a, b in zip(plain, bucketed):
        assert a.output_token_ids == b.output_token_ids
        for la, lb in zip(a.logprobs, b.logprobs):
            assert la.logprob == pytest.approx(lb.logprob, abs=1e-5)
    forward = llm.engine.forward
    executed = set(forward.shapes)
    print(f"shapes run: {dict(forward.shapes)}; padding waste {forward.padding_waste:.1%} "
          f"({forward.padded_tokens} pad rows / {forward.real_tokens} real)")
    assert executed == {("tokens", t) for t in TOKENS} | {("batch", b) for b in BATCH}
    assert 0 < forward.padding_waste < 1
    assert forward.metrics()["bucket_padding_waste"] == forward.padding_waste
    assert not hasattr(LLM(packages["false"]).engine.forward, "shapes")  # off: forward runs as is


def test_pad_rows_never_touch_real_pages(packages):
    llm = LLM(packages["true"])
    prompts, params = random_requests(seed=1, n=5)
    llm.generate(prompts, params)
    pool = llm.engine.pool
    assert pool.scratch_page == pool.num_blocks  # past every page the block manager can hand out
    for pages in pool.k.values():
        assert pages.shape[0] == pool.num_blocks + 1 and torch.isfinite(pages).all()


def test_padding_waste_is_in_engine_metrics_and_the_servers_metrics(packages):
    from tests.server.server_helpers import serving

    llm = LLM(packages["true"])
    prompts, params = random_requests(seed=3, n=5)
    llm.generate(prompts, params)
    waste = llm.metrics()["bucket_padding_waste"]
    assert 0 < waste < 1 and waste == llm.engine.forward.padding_waste
    with serving(llm.engine) as server:
        import httpx

        reply = httpx.post(f"{server.url}/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 3})
        assert reply.status_code == 200
        text = httpx.get(f"{server.url}/metrics").text
    assert f"llmc_bucket_padding_waste_ratio {llm.engine.forward.padding_waste}" in text
    assert "bucket_padding_waste" not in LLM(packages["false"]).metrics()
