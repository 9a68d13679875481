"""pp=2 packages of the tiny Llama and Qwen2 on real gloo worker processes against pp=1: the same
greedy tokens and prefill logits within 1e-4 (stages run the same ops on the same values; only the
hidden state travels between processes, so the logits come out equal), stages split by the cost model."""

from __future__ import annotations

import json

import pytest

from llmc.compiler import compile_model
from llmc.examples_tiny import save_tiny_model
from llmc.runtime.llm import LLM
from llmc.runtime.sampler import SamplingParams

PROMPT = [5, 17, 99, 3, 42, 8, 11, 64, 1, 2, 77, 31, 9, 120]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_pp2_matches_pp1_on_gloo_workers(arch, tmp_path):
    model = save_tiny_model(arch, tmp_path / "model")
    one = compile_model(model, "cpu", tmp_path / "pp1", quality_tokens=0)
    two = compile_model(model, "cpu", tmp_path / "pp2", overrides=["shard.pp=2"], quality_tokens=0)
    stats = next(r.stats for r in two.report.records if r.name == "shard")
    assert stats["stage_layers"] == [[0], [1]]  # two equal layers: one per stage
    plan = json.loads((two.out_dir / "plan.json").read_text())
    assert [r["model"] for r in plan["parallel"]["ranks"]] == ["model.py", "model_rank1.py"]
    assert list(plan["parallel"]["ranks"][1]["kv_layers"]) == ["1"]
    reference = LLM(one.out_dir)
    want_logits = reference.engine.prefill(PROMPT)
    want = [o.output_token_ids for o in reference.generate([PROMPT, PROMPT[:5]], SamplingParams(max_tokens=8))]
    llm = LLM(two.out_dir, pp=2)
    try:
        got_logits = llm.engine.prefill(PROMPT)
        got = [o.output_token_ids for o in llm.generate([PROMPT, PROMPT[:5]], SamplingParams(max_tokens=8))]
    finally:
        llm.engine.distributed.close()
    diff = (got_logits - want_logits).abs().max().item()
    print(f"{arch} pp=2 vs pp=1: max |logit diff| {diff:.3g}")
    assert got == want and diff < 1e-4
