"""quantize, three ways on a tiny Llama: numbers vs the reference interpreter, match counts, ops
before/after; plus option errors and compiled packages on the CPU fast paths.

Numbers: a weight-only quantized graph must equal the ORIGINAL graph run with the dequantized
weights (same float32 math, the weight is just stored differently): 1e-5 covers summation order.
W8A8 also quantizes activations, so it is held to the original within a bound instead.
"""

from __future__ import annotations

import pytest
import torch

from llmc.errors import LlmcError
from llmc.examples_tiny import save_tiny_model
from llmc.frontend.hf import load_hf
from llmc.ir import ExecutionContext, Interpreter
from llmc.passes.rewrite import DEFAULT_EXCLUDE, matches
from llmc.pipeline import PASSES, PassContext
from llmc.runtime import quant
from llmc.target import load_target

PROMPT = [5, 17, 99, 3, 42, 8, 11, 64, 1, 2, 77, 31, 9, 120, 45, 6, 23]
WEIGHT_ONLY = {"bf16": "linear_bf16", "int8": "linear_int8", "int4": "linear_int4", "fp8": "linear_fp8"}
FP8_TARGET = ["dtypes=[float32, bfloat16, float16, float8_e4m3fn]"]


def run_pass(graph, target=None, **options):
    info = PASSES["quantize"]
    return info.fn(graph, PassContext(target=target or load_target("cpu", FP8_TARGET),
                                      options=info.options.model_validate(options)))


def logits(graph, weights=None):
    ids = torch.tensor(PROMPT)
    return Interpreter(graph, weights).run({"input_ids": ids, "positions": torch.arange(len(ids))},
                                           ExecutionContext.for_graph(graph))["logits"]


def dequantized_weights(graph, quantized):
    """Original weight name -> its dequantized value, from the quantized graph's storage."""
    params = {p.name: p.load() for p in quantized.params}
    out = {}
    for node in quantized.nodes:
        if not node.op.name.startswith("linear_"):
            continue
        stored = [params[r[1:]] for r in node.inputs[1:] if r.startswith("@")]
        source = quantized.param_map[node.inputs[1][1:]].quant["source"]
        if node.op.name == "linear_bf16":
            out[source] = stored[0].float()
        elif node.op.name == "linear_int8":
            out[source] = quant.dequantize_int8(*stored[:2])
        elif node.op.name == "linear_int4":
            out[source] = quant.dequantize_int4(*stored[:3], node.attr("group_size"))
        elif node.op.name == "linear_fp8":
            out[source] = quant.dequantize_fp8(*stored[:2])
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_hf(save_tiny_model("llama", tmp_path_factory.mktemp("llama"))).graph


def expected_linears(graph):
    return [n for n in graph.nodes if n.op.name == "linear" and matches(n.inputs[1][1:], ["*"], DEFAULT_EXCLUDE)]


@pytest.mark.parametrize("scheme", ["int8", "int4", "fp8"])
def test_weight_only_equals_the_original_graph_on_dequantized_weights(tiny, scheme):
    result = run_pass(tiny, scheme=scheme, group_size=32)
    weights = {p.name: p.load() for p in tiny.params}
    weights.update(dequantized_weights(tiny, result.graph))
    assert len(weights) and (logits(result.graph) - logits(tiny, weights)).abs().max().item() < 1e-5
    # and quantization really happened: the output moved, a little
    moved = (logits(result.graph) - logits(tiny)).abs().max().item()
    assert 0 < moved < 0.5 * logits(tiny).abs().max().item()


def test_bf16_rounds_weights_activations_and_outputs_once(tiny):
    """bf16 stores W rounded to bfloat16 and its GEMM rounds x and the result: against the original
    graph on the same rounded weights only the activation roundings remain (~0.4% each, well under
    2% of the logits' scale), and the stored weight is W rounded to nearest."""
    result = run_pass(tiny, scheme="bf16")
    weights = {p.name: p.load() for p in tiny.params}
    rounded = dequantized_weights(tiny, result.graph)
    assert all(torch.equal(w, weights[name].to(torch.bfloat16).float()) for name, w in rounded.items())
    weights.update(rounded)
    got, ref = logits(result.graph), logits(tiny, weights)
    assert 0 < (got - ref).abs().max().item() < 0.02 * ref.abs().max().item()
    assert result.stats["bytes_after"] * 2 == result.stats["bytes_before"] == result.stats["bf16_bytes"] * 2


@pytest.mark.parametrize("rows,out_features,in_features", [(1, 5, 7), (3, 33, 20), (17, 8, 129), (70, 9, 31)])
def test_linear_bf16_math_and_cpu_paths(rows, out_features, in_features):
    """linear_bf16 = float32 sums of bf16-rounded products, rounded to bf16; the CPU path (bf16
    GEMM: mv for 1 row, transposed for 2-64, F.linear past) and its float32 fallback (a CPU without bf16 dot products) agree."""
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, in_features, generator=gen)
    w = torch.randn(out_features, in_features, generator=gen).to(torch.bfloat16)
    bias = torch.randn(out_features, generator=gen)
    exact = x.to(torch.bfloat16).double() @ w.double().t()
    plain, got = quant.linear_bf16(x, w), quant.linear_bf16(x, w, bias)
    assert got.dtype == torch.float32 and torch.equal(plain, plain.to(torch.bfloat16).float())
    assert torch.equal(got, plain + bias)
    assert (plain.double() - exact).abs().max() <= exact.abs().max() * 2 ** -8
    assert (quant.linear_bf16_cpu(x, w, bias) - got).abs().max() <= exact.abs().max() * 2 ** -7
    fallback = quant.linear_bf16_cpu(x, w.float(), bias)  # prepare_bf16_cpu without bf16 hardware
    assert ((fallback - bias).double() - x.double() @ w.double().t()).abs().max() < 1e-4
    assert quant.prepare_bf16_cpu(w).dtype == (torch.bfloat16 if quant.has_bf16_dot() else torch.float32)


@pytest.mark.parametrize("scheme", ["bf16", "int8", "int4", "fp8", "w8a8"])
def test_match_counts_and_ops_before_after(tiny, scheme):
    result = run_pass(tiny, scheme=scheme, group_size=32)
    n = len(expected_linears(tiny))
    op = WEIGHT_ONLY.get(scheme, "linear_w8a8")
    assert result.changed and result.stats["quantized"] == n > 0
    before, after = tiny.op_counts(), result.graph.op_counts()
    assert after[op] == n and after["linear"] == before["linear"] - n
    assert len(result.graph.nodes) == len(tiny.nodes)
    assert result.stats["bytes_after"] < result.stats["bytes_before"]


def test_w8a8_with_smoothquant_stays_close_and_uses_calibration(tiny):
    result = run_pass(tiny, scheme="w8a8", calibration={"sequences": 2, "length": 16})
    assert result.stats["calibration"].startswith("random ids")  # the tiny model names no train files
    reference = logits(tiny)
    error = (logits(result.graph) - reference).abs().max().item()
    assert 0 < error < 0.1 * reference.abs().max().item()
    smooth = next(p for p in result.graph.params if p.name.endswith(".smooth")).load()
    assert not torch.equal(smooth, torch.ones_like(smooth))  # alpha 0.5 moved some scale into W


def test_include_exclude_globs_choose_the_layers(tiny):
    result = run_pass(tiny, scheme="int8", include=["*mlp*"], exclude=["*down_proj*"])
    names = {tiny.param_map[n.inputs[1][1:]].name for n in expected_linears(tiny)}
    chosen = {n for n in names if "mlp" in n and "down_proj" not in n}
    assert result.stats["quantized"] == len(chosen) > 0
    sources = {p.quant["source"] for p in result.graph.params if p.quant}
    assert sources == chosen


def test_scheme_none_changes_nothing(tiny):
    result = run_pass(tiny)
    assert not result.changed and result.graph is tiny


def test_errors_name_the_weight_or_the_target(tiny):
    with pytest.raises(LlmcError, match=r"q_proj.weight has 64 input features, not a multiple of group_size 128"):
        run_pass(tiny, scheme="int4", group_size=128)
    with pytest.raises(LlmcError, match="does not list float8_e4m3fn"):
        run_pass(tiny, target=load_target("cpu"), scheme="fp8")


@pytest.mark.parametrize("scheme", ["bf16", "int8", "int4", "fp8", "w8a8"])
def test_compiled_package_runs_the_scheme_on_cpu(tmp_path, scheme):
    """The package (CPU fast paths: ATen int8/int4 kernels with bfloat16 activations; fp8 expanded
    at load) agrees with the interpreter on the quantized graph. bfloat16 activations round to 8
    bits of mantissa, so logits agree to ~1% of their scale and the greedy tokens agree."""
    from llmc.compiler import compile_model
    from llmc.runtime.engine import LLMEngine

    model = save_tiny_model("llama", tmp_path / "m")
    sets = [f"quantize.scheme={scheme}", "quantize.group_size=32", "quantize.calibration.sequences=2",
            *FP8_TARGET]
    result = compile_model(model, "cpu", tmp_path / "pkg", overrides=sets, quality_tokens=64)
    assert result.compile_report["quality"]["tokens"] == 64
    engine = LLMEngine.from_package(tmp_path / "pkg")
    got = engine.prefill(PROMPT)
    want = logits(result.graph)
    assert (got - want).abs().max().item() < 0.02 * want.abs().max().item()
    tokens = engine.generate(PROMPT, max_tokens=6, ignore_eos=True)
    from llmc.ir import generate_greedy
    assert tokens == generate_greedy(result.graph, PROMPT, 6)[0]


def test_overrides_give_the_linears_they_name_another_scheme(tiny):
    """int4 everywhere but the MLP down projections, which stay bf16: match counts per scheme, the ops
    after, and the numbers equal the original graph run on the dequantized weights."""
    before = {n.ref for n in expected_linears(tiny)}
    result = run_pass(tiny, scheme="int4", group_size=32, overrides={"*.mlp.down_proj.*": "bf16"})
    ops = {n.ref: n.op.name for n in result.graph.nodes if n.ref in before}
    down = {n.ref for n in expected_linears(tiny) if "down_proj" in n.inputs[1]}
    assert down and {ops[r] for r in down} == {"linear_bf16"}
    assert {ops[r] for r in before - down} == {"linear_int4"}
    assert result.stats["quantized"] == len(before)
    assert result.stats["by_scheme"] == {"bf16": len(down), "int4": len(before) - len(down)}
    weights = {p.name: p.load() for p in tiny.params}
    weights.update(dequantized_weights(tiny, result.graph))
    got, want = logits(result.graph), logits(tiny, weights)
    # bf16 also rounds the down projections' inputs and outputs to bf16 (test_bf16_...): same bound
    assert (got - want).abs().max().item() < 0.02 * want.abs().max().item()


def test_an_override_reaches_excluded_linears_and_must_match_something(tiny):
    head = [n for n in tiny.nodes if n.op.name == "linear" and not matches(n.inputs[1][1:], ["*"], DEFAULT_EXCLUDE)]
    result = run_pass(tiny, overrides={head[0].inputs[1][1:]: "bf16"})  # scheme none: only the override
    assert result.changed and result.stats["quantized"] == 1
    assert [n.op.name for n in result.graph.nodes if n.name == head[0].name] == ["linear_bf16"]
    with pytest.raises(LlmcError, match=r"quantize.overrides: 'lm_hed.\*' matches no linear weight"):
        run_pass(tiny, scheme="int4", overrides={"lm_hed.*": "bf16"})
