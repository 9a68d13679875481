"""fuse, on tiny models and hand-built graphs: numbers vs the unfused graph through the reference
interpreter (prefill and greedy decode), match counts per fusion, ops before/after, each option
off, what must not fuse, layer functions in the generated code, and a compiled package.

Tolerance: add_rms_norm, act_mul and rope-in-attention run the very same torch calls as the ops they
replace, so they are bit-exact; the concatenated qkv / gate_up projections compute each output as
the same dot product, but BLAS may block one [T, 3N] product differently from three [T, N] ones and
reorder the sums: 0 to ~1e-7 on these logits. 1e-5 leaves margin, while a wrong slice offset, a
dropped bias or a missed rotation moves logits by ~1e-1.
"""

from __future__ import annotations

import re

import pytest
import torch

from llmc.codegen import emit_package
from llmc.codegen.torch_backend import render_model
from llmc.compiler import compile_model
from llmc.examples_tiny import save_tiny_model
from llmc.frontend.hf import load_hf
from llmc.ir import Graph, GraphBuilder, Interpreter, Param, T, TensorType, generate_greedy
from llmc.ir.ops_fused import GATE_ACTIVATIONS
from llmc.pipeline import PASSES, PassContext, run_pipeline
from llmc.runtime.engine import LLMEngine
from llmc.target import load_target
from package_helpers import lowered, target_with

ATOL = 1e-5
PROMPT = [5, 17, 99, 3, 42, 8, 11, 64, 1, 2, 77, 31, 9, 120, 45, 6, 23]  # crosses the window of 8
FUSIONS = ("qkv", "gate_up", "silu_mul", "add_rms_norm", "rope")
ALL = dict.fromkeys(FUSIONS, 2)  # one match per layer of the 2-layer tiny models
# Phi-3 and GPT-2 arrive with fused qkv (and Phi-3 with gate_up); GPT-2 has LayerNorm, a plain
# GELU MLP and learned positions: nothing to fuse. add_rms_norm is the post-attention (Gemma 2:
# pre-feedforward) norm of each layer; the adds at layer boundaries stay (see passes/fuse.py).
EXPECTED = {
    "llama": ALL,
    "qwen3": ALL,
    "gemma2": ALL,
    "phi3": {**ALL, "qkv": 0, "gate_up": 0},
    "gpt2": dict.fromkeys(FUSIONS, 0),
}


def fuse(graph: Graph, **options):
    info = PASSES["fuse"]
    return info.fn(graph, PassContext(target=load_target("cpu"), options=info.options(**options)))


def assert_same_outputs(before: Graph, after: Graph, steps: int = 4) -> None:
    logits_before, logits_after = [], []
    tokens_before, prefill_before = generate_greedy(before, PROMPT, steps, step_logits=logits_before)
    tokens_after, prefill_after = generate_greedy(after, PROMPT, steps, step_logits=logits_after)
    assert (prefill_after - prefill_before).abs().max().item() < ATOL
    assert tokens_after == tokens_before
    for a, b in zip(logits_after, logits_before):
        assert (a - b).abs().max().item() < ATOL


_IMPORTED: dict[str, tuple] = {}


def import_tiny(arch: str, tmp_path_factory) -> tuple:
    """(checkpoint dir, imported graph) of the tiny ``arch``, once per session (import is the slow part)."""
    if arch not in _IMPORTED:
        path = save_tiny_model(arch, tmp_path_factory.mktemp(arch))
        _IMPORTED[arch] = (path, load_hf(path).graph)
    return _IMPORTED[arch]


@pytest.fixture(scope="module", params=list(EXPECTED))
def imported(request, tmp_path_factory):
    return request.param, import_tiny(request.param, tmp_path_factory)[1]


# ---- tiny models ---------------------------------------------------------------------------------

def test_outputs_equal_the_unfused_graph(imported):
    arch, graph = imported
    assert_same_outputs(graph, fuse(graph).graph)


def test_match_counts_and_fewer_ops(imported):
    arch, graph = imported
    result = fuse(graph)
    assert result.stats == EXPECTED[arch]
    before, after = graph.op_counts(), result.graph.op_counts()
    if not any(EXPECTED[arch].values()):
        assert not result.changed and result.graph is graph
        return
    assert result.changed and sum(after.values()) < sum(before.values())
    assert after["rope"] == 0 and after["silu"] + after["gelu_tanh"] == 0 and after["mul"] == 0
    assert after["act_mul_packed"] == 2  # gate|up pairs (ours or Phi-3's) need no slices
    assert after["add_rms_norm"] == 2 and after["add"] == before["add"] - 2
    if arch == "llama":  # the whole change, op by op
        delta = {op: after[op] - before[op] for op in before.keys() | after.keys() if after[op] != before[op]}
        assert delta == {"linear": -6, "rope": -4, "silu": -2, "mul": -2, "add": -2, "rms_norm": -2,
                         "slice": 10, "act_mul_packed": 2, "add_rms_norm": 2}


def test_fusing_twice_changes_nothing(imported):
    once = fuse(imported[1]).graph
    again = fuse(once)
    assert not again.changed and again.graph is once and again.stats == dict.fromkeys(FUSIONS, 0)


def test_paged_attention_fuses_alike(imported):
    """After attention_lowering: the same matches, the same numbers through the paged cache."""
    arch, graph = imported
    paged = lowered(graph)
    result = fuse(paged)
    assert result.stats == EXPECTED[arch]
    assert_same_outputs(paged, result.graph, steps=2)


def test_layer_functions_are_still_one_per_kind(imported):
    """Fusion keeps every decoder layer the same code: codegen factors them as before."""
    arch, graph = imported
    fused = lowered(fuse(graph).graph)

    def kinds(g):
        source = render_model(g, target_name="cpu", device="cpu", backend="torch")
        return re.findall(r"^def (\w+)\(w, layer, kv", source, re.MULTILINE)

    assert kinds(fused) and kinds(fused) == kinds(lowered(graph))  # the same kinds as unfused


@pytest.mark.parametrize("off", FUSIONS)
def test_each_fusion_can_be_switched_off(off, tmp_path_factory):
    graph = import_tiny("llama", tmp_path_factory)[1]
    result = fuse(graph, **{off: False})
    assert result.stats == {**ALL, off: 0}
    after = result.graph.op_counts()
    left = {"qkv": after["linear"] == 13,  # 15, less one per gate_up pair
            "gate_up": after["act_mul"] == 2 and after["act_mul_packed"] == 0,
            "silu_mul": after["silu"] == 2 and after["mul"] == 2,
            "add_rms_norm": after["add_rms_norm"] == 0,
            "rope": after["rope"] == 4}
    assert left[off], (off, after)
    assert_same_outputs(graph, result.graph, steps=2)


def test_all_off_leaves_the_graph_alone(tmp_path_factory):
    graph = import_tiny("llama", tmp_path_factory)[1]
    result = fuse(graph, **dict.fromkeys(FUSIONS, False))
    assert not result.changed and result.graph is graph and result.stats == dict.fromkeys(FUSIONS, 0)


# ---- hand-built graphs: what must (not) fuse -----------------------------------------------------

LOADS: list[str] = []


def param(name: str, *shape: int) -> Param:
    def load():
        LOADS.append(name)
        seeded = torch.Generator().manual_seed(len(name) * 7 + shape[0])
        return torch.randn(*shape, generator=seeded) / shape[-1] ** 0.5  # logits of order 1, as in a model
    return Param(name, TensorType(shape, "float32"), loader=load)


def attention_block(bias=("q", "k", "v"), k_inv_freq="inv_freq", extra_rope_user=False,
                    norm_group=16, act="silu") -> Graph:
    """One pre-norm block: qkv projections, rope, attention, residual add + norm, gated MLP."""
    b = GraphBuilder()
    b.input("input_ids", TensorType((T,), "int64"))
    pos = b.input("positions", TensorType((T,), "int64"))
    x = b.add("embedding", ["%input_ids", b.param(param("embed", 128, 16))])
    proj = {}
    for name, out in (("q", 16), ("k", 8), ("v", 8)):
        inputs = [x, b.param(param(f"attn.{name}_proj.weight", out, 16))]
        if name in bias:
            inputs.append(b.param(param(f"attn.{name}_proj.bias", out)))
        proj[name] = b.add("linear", inputs, meta={"module": f"attn.{name}_proj"})
    rope = dict(head_dim=4, rotary_dim=4)
    q = b.add("rope", [proj["q"], pos, b.param(param("inv_freq", 2))], **rope)
    k = b.add("rope", [proj["k"], pos, b.param(param(k_inv_freq, 2))], **rope)
    a = b.add("attention", [q, k, proj["v"], pos], num_heads=4, num_kv_heads=2, head_dim=4, scale=0.5)
    h = b.add("add", [x, a])
    n = b.add("rms_norm", [h, b.param(param("norm.weight", norm_group))])
    gate = b.add("linear", [n, b.param(param("mlp.gate_proj.weight", 24, 16))], meta={"module": "mlp.gate_proj"})
    up = b.add("linear", [n, b.param(param("mlp.up_proj.weight", 24, 16))], meta={"module": "mlp.up_proj"})
    m = b.add("linear", [b.add("mul", [b.add(act, [gate]), up]), b.param(param("mlp.down_proj.weight", 16, 24))])
    out = b.add("add", [h, m])
    if extra_rope_user:
        out = b.add("add", [out, q])
    b.output("logits", b.add("linear", [out, "@embed"]))
    return b.build()


def test_a_whole_block_fuses_with_weights_concatenated_only_when_loaded():
    graph = attention_block()
    LOADS.clear()
    result = fuse(graph)
    assert LOADS == [] and result.stats == {**dict.fromkeys(FUSIONS, 1)}
    fused = result.graph.param_map
    assert fused["attn.qkv_proj.weight"].source == "derived" and fused["attn.qkv_proj.weight"].type.shape == (32, 16)
    assert fused["attn.qkv_proj.bias"].type.shape == (32,)
    assert fused["mlp.gate_up_proj.weight"].type.shape == (48, 16)
    parts = [graph.param_map[f"attn.{n}_proj.weight"].load() for n in "qkv"]
    assert torch.equal(fused["attn.qkv_proj.weight"].load(), torch.cat(parts))
    # The sum is read again (the second residual add): normed | sum, both sliced out.
    slices = [n for n in result.graph.nodes if n.op.name == "slice" and "add_rms_norm" in n.inputs[0]]
    assert sorted((n.attr("start"), n.attr("stop")) for n in slices) == [(0, 16), (16, 32)]
    assert_same_outputs(graph, result.graph, steps=2)


@pytest.mark.parametrize("change, unfused", [
    (dict(bias=("q", "v")), "qkv"),                        # bias on some projections only
    (dict(k_inv_freq="other_inv_freq"), "rope"),           # q and k rotated differently
    (dict(extra_rope_user=True), "rope"),                  # the rotated q is read elsewhere too
    (dict(norm_group=4), "add_rms_norm"),                  # a per-head norm, not the whole row
    (dict(act="tanh"), "gate_up"),                         # not a gated-MLP activation
])
def test_what_must_not_fuse_stays(change, unfused):
    graph = attention_block(**change)
    result = fuse(graph)
    assert result.stats[unfused] == 0
    if unfused == "gate_up":
        assert result.stats["silu_mul"] == 0
    assert_same_outputs(graph, result.graph, steps=2)


@pytest.mark.parametrize("act", GATE_ACTIVATIONS)
@pytest.mark.parametrize("gate_up", [True, False])
def test_every_gated_activation_fuses_packed_or_not(act, gate_up):
    graph = attention_block(act=act)
    result = fuse(graph, gate_up=gate_up)
    op = "act_mul_packed" if gate_up else "act_mul"
    [node] = [n for n in result.graph.nodes if n.op.name == op]
    assert node.attr("act") == act and result.graph.op_counts()[act] == 0
    assert_same_outputs(graph, result.graph, steps=2)


def test_a_sum_nobody_else_reads_gets_no_slice():
    b = GraphBuilder()
    x = b.input("x", TensorType((T, 8), "float32"))
    r = b.input("r", TensorType((T, 8), "float32"))
    b.output("y", b.add("rms_norm", [b.add("add", [x, r]), b.param(param("w", 8))], eps=1e-5, offset=1.0))
    graph = b.build()
    result = fuse(graph)
    assert result.stats["add_rms_norm"] == 1
    assert [n.op.name for n in result.graph.nodes] == ["add_rms_norm", "slice"]
    inputs = {"x": torch.randn(5, 8), "r": torch.randn(5, 8)}
    assert torch.equal(Interpreter(result.graph).run(inputs)["y"], Interpreter(graph).run(inputs)["y"])


# ---- a compiled package --------------------------------------------------------------------------

@pytest.mark.slow  # `llmc compile` imports the checkpoint again (torch.export): ~5 s
def test_a_package_compiled_with_fuse_generates_the_unfused_tokens(tmp_path, tmp_path_factory):
    checkpoint, graph = import_tiny("llama", tmp_path_factory)
    pipeline = [{"pass": "canonicalize"}, {"pass": "fuse"}, {"pass": "attention_lowering"},
                {"pass": "select_logits"}]
    _, fused_target = target_with(tmp_path, pipeline)
    result = compile_model(checkpoint, fused_target, tmp_path / "fused", quality_tokens=0)
    assert result.report.records[1].name == "fuse" and result.report.records[1].stats == ALL
    plain_target, _ = target_with(tmp_path, [p for p in pipeline if p["pass"] != "fuse"], "plain.yaml")
    plain = emit_package(run_pipeline(graph, plain_target).graph, plain_target, tmp_path / "plain",
                         checkpoint_dir=checkpoint, report={})
    source = (tmp_path / "fused" / "model.py").read_text()
    assert source.count("def llama_decoder_layer(w, layer, kv") == 1
    assert "act_mul_packed(" in source and "add_rms_norm(" in source and "rope_dim=16" in source
    fused_engine, plain_engine = LLMEngine.from_package(tmp_path / "fused"), LLMEngine.from_package(plain)
    for prompt in ([1, 2, 3], PROMPT):
        assert fused_engine.generate(prompt, 8) == plain_engine.generate(prompt, 8)
