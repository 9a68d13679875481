"""tp=2 packages of the tiny Llama and Qwen2 on real gloo worker processes (loopback) against tp=1:
the same greedy tokens, prefill logits within 1e-4 (float32; the row-parallel sums only reorder
additions, ~1e-7 here), and the shard pass's structure (two all_reduces per layer, one for the
embedding, an all_gather of the logits, per-rank weights of half the split tensors)."""

from __future__ import annotations

import json

import pytest

from llmc.compiler import compile_model
from llmc.examples_tiny import save_tiny_model
from llmc.runtime.llm import LLM
from llmc.runtime.sampler import SamplingParams

PROMPT = [5, 17, 99, 3, 42, 8, 11, 64, 1, 2, 77, 31, 9, 120]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def packages(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"tp-{request.param}")
    model = save_tiny_model(request.param, root / "model")
    one = compile_model(model, "cpu", root / "tp1", quality_tokens=0)
    two = compile_model(model, "cpu", root / "tp2", overrides=["shard.tp=2"], quality_tokens=0)
    return one, two


def test_tp2_matches_tp1_on_gloo_workers(packages):
    one, two = packages
    reference = LLM(one.out_dir)
    want_logits = reference.engine.prefill(PROMPT)
    want = [o.output_token_ids for o in reference.generate([PROMPT, PROMPT[:5]], SamplingParams(max_tokens=8))]
    llm = LLM(two.out_dir, tp=2)
    try:
        assert len(llm.engine.distributed.workers) == 1 and llm.engine.distributed.workers[0].poll() is None
        got_logits = llm.engine.prefill(PROMPT)
        got = [o.output_token_ids for o in llm.generate([PROMPT, PROMPT[:5]], SamplingParams(max_tokens=8))]
    finally:
        llm.engine.distributed.close()
    diff = (got_logits - want_logits).abs().max().item()
    print(f"tp=2 vs tp=1: max |logit diff| {diff:.3g}")
    assert got == want and diff < 1e-4


def test_shard_structure_and_rank_weights(packages):
    one, two = packages
    layers = one.graph.meta["layers"]
    stats = next(r.stats for r in two.report.records if r.name == "shard")
    assert stats["all_reduce"] == 2 * layers + 1 and stats["all_gather"] == 1
    assert stats["rank_weight_bytes"][0] == stats["rank_weight_bytes"][1] < one.graph.param_bytes()
    plan = json.loads((two.out_dir / "plan.json").read_text())
    assert plan["parallel"]["tp"] == 2 and plan["weights"]["file"] == ["weights/rank0.safetensors",
                                                                       "weights/rank1.safetensors"]
    assert plan["kv_cache"]["layers"]["0"][0] == 1  # 2 KV heads over 2 ranks: one each
    assert (two.out_dir / "weights" / "rank1.safetensors").is_file()


def test_tp_flag_must_match_the_package(packages):
    from llmc.runtime.package import PackageError

    with pytest.raises(PackageError, match="compiled for tp=2"):
        LLM(packages[1].out_dir, tp=4)
