"""gqa_rewrite, three ways on tiny models: numbers vs the reference interpreter (exact where the
rewrite is exact: an unchanged head count, deduplicated repeats; the pooled K/V equal the mean of
the original heads otherwise), match counts, ops before/after; then end to end through a package.

Tolerance: mean-pooling the projection instead of K itself only reorders float32 sums (~1e-7 on
these values), and a deduplicated model computes the same attention with each KV head read by
more query heads, so only the summation order differs: 1e-5 leaves margin while a wrong group or
offset would be off by ~1e-1.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from llmc.errors import LlmcError, TargetError
from llmc.examples_tiny import HEADS, LAYERS, save_char_tokenizer, save_tiny_model
from llmc.frontend.hf import load_hf
from llmc.ir import Graph, GraphBuilder, Interpreter, Param, T, TensorType, generate_greedy
from llmc.pipeline import PASSES, PassContext, validate_pipeline
from package_helpers import cpu_target, lowered, target_with

ATOL = 1e-5
PROMPT = [5, 17, 99, 3, 42, 8, 11, 64, 1, 2, 77, 31]
HEAD_DIM = 16


def gqa(graph: Graph, **options):
    info = PASSES["gqa_rewrite"]
    return info.fn(graph, PassContext(target=cpu_target(), options=info.options(**options)))


def attentions(graph: Graph):
    return [n for n in graph.nodes if n.op.name in ("attention", "paged_attention")]


def weight(graph: Graph, name: str) -> torch.Tensor:
    return graph.param_map[name].load()


def pooled_heads(rows: torch.Tensor, groups: int) -> torch.Tensor:
    """The reference math: rows of ``[heads * HEAD_DIM, ...]`` averaged over contiguous groups."""
    heads = rows.reshape(-1, HEAD_DIM, *rows.shape[1:])
    return heads.reshape(groups, -1, *heads.shape[1:]).mean(1).reshape(-1, *rows.shape[1:])


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("gqa")
    return {"mha_llama": save_tiny_model("llama", root / "mha_llama", num_key_value_heads=HEADS),
            "gpt2": save_tiny_model("gpt2", root / "gpt2"),
            "phi3": save_tiny_model("phi3", root / "phi3"),
            "qwen3": save_tiny_model("qwen3", root / "qwen3")}


@pytest.fixture(scope="module")
def models(checkpoints):
    return {name: load_hf(path).graph for name, path in checkpoints.items()}


@pytest.fixture(scope="module")
def repeated(tmp_path_factory):
    """A tiny GQA llama (2 KV heads, HF eager) and the graph of the MHA checkpoint made from it by
    writing HF's ``repeat_kv`` into the weights (each KV head's rows twice, as query heads 2j and
    2j+1 read them)."""
    import transformers

    root = tmp_path_factory.mktemp("repeated")
    source = save_tiny_model("llama", root / "gqa_llama")
    gqa_model = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    config = gqa_model.config
    config.num_key_value_heads = HEADS
    mha_model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {}
    for key, value in gqa_model.state_dict().items():
        if key.endswith(("k_proj.weight", "v_proj.weight")):
            heads = value.reshape(-1, HEAD_DIM, value.shape[1])
            value = heads.repeat_interleave(HEADS // 2, 0).reshape(-1, value.shape[1])
        state[key] = value
    mha_model.load_state_dict(state)
    mha_model.save_pretrained(root / "mha_llama", safe_serialization=True)
    save_char_tokenizer(root / "mha_llama")
    return gqa_model.eval(), load_hf(root / "mha_llama").graph


# ---- no-ops are exact ------------------------------------------------------------------------------

def test_the_current_kv_head_count_changes_nothing(models):
    for graph, kv_heads in ((models["mha_llama"], HEADS), (models["phi3"], 2), (models["qwen3"], 2)):
        result = gqa(graph, kv_heads=kv_heads)
        assert not result.changed and result.graph is graph
        assert result.stats["layers_rewritten"] == 0 and result.stats["repeat_factor"] == 1
        assert result.stats["kv_bytes_per_token_before"] == result.stats["kv_bytes_per_token_after"]
    tokens, logits = generate_greedy(models["phi3"], PROMPT, 4)
    again, logits_again = generate_greedy(gqa(models["phi3"], kv_heads=2).graph, PROMPT, 4)
    assert again == tokens and torch.equal(logits_again, logits)


def test_defaults_leave_ordinary_checkpoints_alone_and_read_one_layer(models):
    """Dedupe is on by default; a checkpoint without repeats stops after layer 0's K/V rows."""
    graph = models["mha_llama"]
    loads = []

    def counted(p: Param) -> Param:
        return dataclasses.replace(p, loader=lambda p=p: (loads.append(p.name), p.loader())[1])

    counting = dataclasses.replace(graph, params=tuple(counted(p) for p in graph.params))
    result = gqa(counting)
    assert not result.changed and result.stats["repeat_factor"] == 1
    assert sorted(loads) == ["model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.v_proj.weight"]
    assert gqa(graph, dedupe_repeated=False).stats == {"layers_rewritten": 0}


# ---- mean pooling: three ways ------------------------------------------------------------------

# (model, kv_heads wanted, kv_heads it has, the K/V path ops to carry)
POOLING = [("mha_llama", 2, HEADS), ("gpt2", 2, HEADS), ("phi3", 1, 2), ("qwen3", 1, 2)]


@pytest.mark.parametrize("name, kv_heads, before", POOLING)
def test_pooling_three_ways(models, name, kv_heads, before):
    graph = models[name]
    result = gqa(graph, kv_heads=kv_heads)
    new = result.graph

    # match counts: every layer rewritten, KV bytes per token drop by the group factor
    factor = before // kv_heads
    bytes_before = LAYERS * before * 2 * HEAD_DIM * 4
    assert result.changed and result.stats == {
        "layers_rewritten": LAYERS, "pooled_layers": LAYERS, "deduped_layers": 0, "repeat_factor": 1,
        "kv_heads_before": before, "kv_heads_after": kv_heads,
        "kv_bytes_per_token_before": bytes_before, "kv_bytes_per_token_after": bytes_before // factor}

    # ops before/after: the same ops; only num_kv_heads (and fused slice offsets) change
    assert new.op_counts() == graph.op_counts()
    for old, rewritten in zip(attentions(graph), attentions(new)):
        assert rewritten.attr("num_kv_heads") == kv_heads
        assert {**old.attr_dict, "num_kv_heads": kv_heads} == rewritten.attr_dict
        assert new.type_of(rewritten.inputs[1]).shape[1] == kv_heads * HEAD_DIM

    # numbers: it runs and decodes greedily through the KV cache
    tokens, logits = generate_greedy(new, PROMPT, 4)
    assert len(tokens) == 4 and torch.isfinite(logits).all()


@pytest.mark.parametrize("name", ["mha_llama", "gpt2"])
def test_pooled_kv_equal_the_mean_of_the_original_heads(models, name):
    """Reference math twice: the pooled weights are the group means of the original heads, and so
    are the K and V layer 0's attention reads (rope is linear and alike on every head)."""
    graph = models[name]
    new = gqa(graph, kv_heads=2).graph
    if name == "mha_llama":
        for kind in ("k_proj", "v_proj"):
            original = weight(graph, f"model.layers.1.self_attn.{kind}.weight")
            torch.testing.assert_close(weight(new, f"model.layers.1.self_attn.{kind}.gqa.weight"),
                                       pooled_heads(original, 2), atol=1e-7, rtol=0)
    else:  # fused c_attn: q rows copied, k and v rows pooled, bias alike; the slices move
        for kind in ("weight", "bias"):
            original = weight(graph, f"transformer.h.1.attn.c_attn.{kind}")
            fused = weight(new, f"transformer.h.1.attn.c_attn.gqa.{kind}")
            assert torch.equal(fused[:64], original[:64])
            torch.testing.assert_close(fused[64:96], pooled_heads(original[64:128], 2), atol=1e-7, rtol=0)
            torch.testing.assert_close(fused[96:128], pooled_heads(original[128:192], 2), atol=1e-7, rtol=0)
        slices = [(n.attr("start"), n.attr("stop")) for n in new.nodes if n.op.name == "slice"]
        assert slices == [(0, 64), (64, 96), (96, 128)] * LAYERS

    ids = torch.tensor(PROMPT)
    step = {"input_ids": ids, "positions": torch.arange(len(ids))}
    before = Interpreter(graph).run(step, keep=True)
    after = Interpreter(new).run(step, keep=True)
    old, rewritten = attentions(graph)[0], attentions(new)[0]  # later layers see changed inputs
    for operand in (1, 2):
        expected = pooled_heads(before[old.inputs[operand]].T, 2).T
        torch.testing.assert_close(after[rewritten.inputs[operand]], expected, atol=ATOL, rtol=0)


def test_pooling_after_lowering_updates_the_recorded_kv_shapes(models):
    paged = lowered(models["mha_llama"])
    assert paged.meta["kv_layers"] == {"0": [HEADS, HEAD_DIM, HEAD_DIM], "1": [HEADS, HEAD_DIM, HEAD_DIM]}
    new = gqa(paged, kv_heads=1).graph
    assert new.meta["kv_layers"] == {"0": [1, HEAD_DIM, HEAD_DIM], "1": [1, HEAD_DIM, HEAD_DIM]}
    tokens, logits = generate_greedy(new, PROMPT, 3)
    assert len(tokens) == 3 and torch.isfinite(logits).all()


def test_head_counts_that_do_not_divide_are_errors_naming_the_layer(models):
    with pytest.raises(LlmcError, match=r"layer 0 \(model\.layers\.0\.self_attn\): num_heads=4 is not divisible "
                                        r"by kv_heads=3"):
        gqa(models["mha_llama"], kv_heads=3)
    with pytest.raises(LlmcError, match=r"layer 0 .*kv_heads=4 does not divide the layer's 2 KV heads"):
        gqa(models["phi3"], kv_heads=4)


def test_a_kv_path_it_cannot_carry_is_an_error_only_when_pooling_is_asked():
    b = GraphBuilder()
    x = b.input("x", TensorType((T, 32), "float32"))
    pos = b.input("positions", TensorType((T,), "int64"))
    w = [b.param(Param(f"{n}.weight", TensorType((32, 32), "float32"), loader=lambda: torch.randn(32, 32)))
         for n in "qkv"]
    q, k, v = (b.add("linear", [x, wi]) for wi in w)
    b.output("out", b.add("attention", [q, b.add("relu", [k]), v, pos], num_heads=2, num_kv_heads=2,
                          head_dim=16, scale=0.25, layer=0))
    graph = b.build()
    result = gqa(graph)
    assert not result.changed
    assert "relu %3 lies between the k projection and attention" in result.stats["dedupe_skipped"]
    with pytest.raises(LlmcError, match=r"gqa_rewrite: layer 0 \(%4\): relu %3 lies between"):
        gqa(graph, kv_heads=1)


def test_options_are_validated(tmp_path):
    for options, key in (({"kv_heads": 0}, "kv_heads"), ({"kv_heads": "2"}, "kv_heads"), ({"kv_head": 2}, "kv_head")):
        target, source = target_with(tmp_path, [{"pass": "gqa_rewrite", "options": options}])
        with pytest.raises(TargetError, match=rf"pipeline\[0\]\.options\.{key}"):
            validate_pipeline(target, source)


# ---- exact dedupe of repeated heads ------------------------------------------------------------

def test_repeated_kv_heads_are_deduplicated_exactly(repeated):
    source, mha = repeated
    result = gqa(mha)  # defaults: no pooling, dedupe on
    assert result.changed and result.stats == {
        "layers_rewritten": LAYERS, "pooled_layers": 0, "deduped_layers": LAYERS, "repeat_factor": 2,
        "kv_heads_before": HEADS, "kv_heads_after": 2,
        "kv_bytes_per_token_before": LAYERS * HEADS * 2 * HEAD_DIM * 4,
        "kv_bytes_per_token_after": LAYERS * 2 * 2 * HEAD_DIM * 4}
    assert result.graph.op_counts() == mha.op_counts()
    assert [n.attr_dict for n in attentions(result.graph)] == [
        {**n.attr_dict, "num_kv_heads": 2} for n in attentions(mha)]
    # The kept heads are copies of the first of each repeat, bit for bit: the GQA checkpoint's own.
    state = source.state_dict()
    for kind in ("k_proj", "v_proj"):
        assert torch.equal(weight(result.graph, f"model.layers.0.self_attn.{kind}.gqa.weight"),
                           state[f"model.layers.0.self_attn.{kind}.weight"])

    steps_mha, steps_new = [], []
    tokens, logits = generate_greedy(mha, PROMPT, 5, step_logits=steps_mha)
    tokens_new, logits_new = generate_greedy(result.graph, PROMPT, 5, step_logits=steps_new)
    assert tokens_new == tokens
    torch.testing.assert_close(logits_new, logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(torch.stack(steps_new), torch.stack(steps_mha), atol=ATOL, rtol=0)
    with torch.no_grad():  # and they are the GQA model's own logits
        hf_logits = source(torch.tensor([PROMPT])).logits[0]
    torch.testing.assert_close(logits_new, hf_logits, atol=ATOL, rtol=0)

    assert not gqa(mha, dedupe_repeated=False).changed
    # Pooling the repeats to one head works from the same groups; dedupe finds nothing more.
    pooled = gqa(mha, kv_heads=1)
    assert pooled.stats["kv_heads_after"] == 1 and pooled.stats["repeat_factor"] == 1


# ---- end to end: a package compiled with gqa_rewrite in its pipeline ------------------------------

def test_compiled_package_has_the_reduced_kv_cache_and_generates(checkpoints, tmp_path):
    from typer.testing import CliRunner

    from llmc.cli import app
    from llmc.runtime.engine import LLMEngine
    from llmc.runtime.sampler import SamplingParams

    model = checkpoints["mha_llama"]
    target, source = target_with(tmp_path, [{"pass": "canonicalize"}, {"pass": "gqa_rewrite"},
                                            {"pass": "attention_lowering"}, {"pass": "select_logits"}])
    out = tmp_path / "pkg"
    result = CliRunner().invoke(app, ["compile", str(model), "--target", source, "-o", str(out),
                                      "--set", "gqa_rewrite.kv_heads=2"])
    assert result.exit_code == 0, result.output
    plan = json.loads((out / "plan.json").read_text())
    assert plan["kv_cache"]["layers"] == {"0": [2, HEAD_DIM, HEAD_DIM], "1": [2, HEAD_DIM, HEAD_DIM]}
    [record] = [p for p in plan["report"]["passes"] if p["name"] == "gqa_rewrite"]
    assert record["changed"] and record["stats"]["kv_heads_after"] == 2
    engine = LLMEngine.from_package(out)
    engine.add_request("r", PROMPT, SamplingParams(max_tokens=4))
    outputs = [o for _ in range(4) for o in engine.step()]
    assert outputs[-1].finished and len(outputs[-1].output_token_ids) == 4
