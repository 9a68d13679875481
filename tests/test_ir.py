"""The IR on its own: op registry, builder, verifier, printer, networkx view, and the reference
interpreter checked op by op against independent torch/HF-style implementations.

Tolerances: everything runs in float32 on CPU. Op references are compared at 1e-5 (a few ulps of
re-associated sums); the KV-cache test compares logits of magnitude ~1 at 1e-5 because cached and
uncached runs only differ in matmul shapes, not in the math.
"""

from __future__ import annotations

import dataclasses
import math

import networkx as nx
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from llmc.errors import IRError
from llmc.ir import (OPS, ContiguousKVCache, ExecutionContext, Graph, GraphBuilder, Interpreter, Node,
                     OpRegistry, Param, T, TensorType, generate_greedy, register_op, verify)
from llmc.ir.types import dtype_name

ATOL = 1e-5


def randn(*shape: int, seed: int = 0, std: float = 1.0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * std


def run_ref(op_name: str, *inputs: torch.Tensor, ctx: ExecutionContext | None = None, **attrs) -> torch.Tensor:
    """Run one op's reference and check that its inferred type describes the tensor it returned."""
    op = OPS[op_name]
    full = op.check_attrs(attrs)
    out = op.reference(ctx or ExecutionContext(), list(inputs), full)
    types = [TensorType(tuple(x.shape), dtype_name(x.dtype)) for x in inputs]
    assert op.infer(types, full) == TensorType(tuple(out.shape), dtype_name(out.dtype))
    return out


# ---- a tiny one-layer model built by hand ----------------------------------------------------------

VOCAB, HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 50, 64, 4, 2, 16


def inv_freq(rotary_dim: int, base: float = 10000.0) -> torch.Tensor:
    return 1.0 / base ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim)


def build_tiny_graph() -> tuple[Graph, dict[str, str]]:
    b = GraphBuilder()
    ids = b.input("input_ids", TensorType((T,), "int64"))
    pos = b.input("positions", TensorType((T,), "int64"))

    def param(name: str, shape: tuple[int, ...], seed: int, std: float, mean: float = 0.0, **kw) -> str:
        return b.param(Param(name, TensorType(shape, "float32"),
                             loader=lambda: mean + randn(*shape, seed=seed, std=std), **kw))

    kv = KV_HEADS * HEAD_DIM
    embed = param("model.embed_tokens.weight", (VOCAB, HIDDEN), 1, 1.0)
    norm_w = param("model.layers.0.input_layernorm.weight", (HIDDEN,), 2, 0.1, mean=1.0)
    wq = param("model.layers.0.self_attn.q_proj.weight", (HIDDEN, HIDDEN), 3, HIDDEN ** -0.5)
    bq = param("model.layers.0.self_attn.q_proj.bias", (HIDDEN,), 4, 0.1)
    wk = param("model.layers.0.self_attn.k_proj.weight", (kv, HIDDEN), 5, HIDDEN ** -0.5)
    wv = param("model.layers.0.self_attn.v_proj.weight", (kv, HIDDEN), 6, HIDDEN ** -0.5)
    wo = param("model.layers.0.self_attn.o_proj.weight", (HIDDEN, HIDDEN), 7, HIDDEN ** -0.5)
    head = param("lm_head.weight", (VOCAB, HIDDEN), 8, HIDDEN ** -0.5)
    freqs = b.param(Param("model.rotary_emb.inv_freq", TensorType((HEAD_DIM // 2,), "float32"),
                          source="computed", loader=lambda: inv_freq(HEAD_DIM)))

    h = b.add("embedding", [ids, embed])
    x = b.add("rms_norm", [h, norm_w], eps=1e-5)
    q = b.add("linear", [x, wq, bq])
    k = b.add("linear", [x, wk])
    v = b.add("linear", [x, wv])
    q_rot = b.add("rope", [q, pos, freqs], head_dim=HEAD_DIM, rotary_dim=HEAD_DIM)
    k_rot = b.add("rope", [k, pos, freqs], head_dim=HEAD_DIM, rotary_dim=HEAD_DIM)
    attn = b.add("attention", [q_rot, k_rot, v, pos], layer=0, num_heads=HEADS, num_kv_heads=KV_HEADS,
                 head_dim=HEAD_DIM, scale=HEAD_DIM ** -0.5)
    o = b.add("linear", [attn, wo])
    h2 = b.add("add", [h, o])
    logits = b.add("linear", [h2, head])
    b.output("logits", logits)
    refs = dict(h=h, x=x, q=q, k=k, v=v, q_rot=q_rot, k_rot=k_rot, attn=attn, o=o, h2=h2, logits=logits)
    return b.build(meta={"model": "tiny"}), refs


def run_graph(interp: Interpreter, tokens: list[int], start: int = 0,
              ctx: ExecutionContext | None = None) -> torch.Tensor:
    inputs = {"input_ids": torch.tensor(tokens), "positions": torch.arange(start, start + len(tokens))}
    return interp.run(inputs, ctx)["logits"]


TOKENS = [3, 17, 42, 7, 0, 49, 25, 11, 30]


# ---- OpRegistry ----------------------------------------------------------------------------------

def test_registering_a_name_twice_raises():
    registry = OpRegistry()

    class Identity:
        """Returns its input."""
        infer = staticmethod(lambda types, attrs: types[0])
        reference = staticmethod(lambda ctx, inputs, attrs: inputs[0])

    op = register_op("identity", ("x",), registry=registry)(Identity)
    assert registry["identity"] is op and "identity" in registry and "identity" not in OPS
    with pytest.raises(IRError, match="already registered"):
        register_op("identity", ("x",), registry=registry)(Identity)
    with pytest.raises(IRError, match="already registered"):
        OPS.register(dataclasses.replace(OPS["add"]))


def test_unknown_op_suggests_the_closest_name():
    with pytest.raises(IRError, match=r"unknown op 'rms_nrom'.*did you mean rms_norm"):
        OPS["rms_nrom"]
    with pytest.raises(IRError, match="did you mean.*attention"):
        GraphBuilder().add("atention", [])


def test_every_builtin_op_has_infer_reference_and_doc():
    names = OPS.names()
    for expected in ("embedding", "linear", "rms_norm", "layer_norm", "rope", "attention", "add"):
        assert expected in names
    for op in OPS:
        assert callable(op.infer), op.name
        assert callable(op.reference), op.name
        assert op.doc.strip(), f"op {op.name} has no docstring"
        assert op.min_inputs >= 1, op.name


# ---- GraphBuilder --------------------------------------------------------------------------------

def test_builder_infers_types():
    graph, r = build_tiny_graph()
    f32 = "float32"
    assert graph.type_of(r["h"]) == TensorType((T, HIDDEN), f32)
    assert graph.type_of(r["q_rot"]) == TensorType((T, 64), f32)
    assert graph.type_of(r["k"]) == TensorType((T, KV_HEADS * HEAD_DIM), f32)
    assert graph.type_of(r["attn"]) == TensorType((T, HEADS * HEAD_DIM), f32)
    assert graph.type_of(r["logits"]) == TensorType((T, VOCAB), f32)
    assert graph.outputs == (("logits", r["logits"]),)
    assert graph.op_counts() == {"linear": 5, "rope": 2, "embedding": 1, "rms_norm": 1, "attention": 1,
                                 "add": 1}
    assert len(graph.params) == 9  # all used, each once
    # Defaults are filled in, so every node carries every attribute of its op.
    attn = next(n for n in graph.nodes if n.op.name == "attention")
    assert attn.attr("sliding_window") is None and attn.attr("causal") is True


def test_builder_rejects_attribute_typos_and_bad_inputs():
    b = GraphBuilder()
    x = b.input("x", TensorType((T, 8), "float32"))
    w = b.param(Param("w", TensorType((8,), "float32")))
    w_bad = b.param(Param("w_bad", TensorType((4, 6), "float32")))
    with pytest.raises(IRError, match="unknown attribute.*epz"):
        b.add("rms_norm", [x, w], epz=1e-5)
    with pytest.raises(IRError, match="linear takes 2..3 inputs, got 1"):
        b.add("linear", [x])
    with pytest.raises(IRError, match="add takes 2..2 inputs, got 3"):
        b.add("add", [x, x, x])
    with pytest.raises(IRError, match="%nope is not defined"):
        b.add("silu", ["%nope"])
    with pytest.raises(IRError, match="linear: input has 8 features"):
        b.add("linear", [x, w_bad])
    with pytest.raises(IRError, match="added twice"):
        b.param(Param("w", TensorType((9,), "float32")))
    assert b.add("rms_norm", [x, w], eps=1e-5) == "%0"  # failed adds leave no node behind


def test_build_keeps_params_that_only_outputs_use():
    b = GraphBuilder()
    b.input("x", TensorType((T, 4), "float32"))
    b.param(Param("unused", TensorType((4,), "float32")))
    b.output("table", b.param(Param("table", TensorType((4,), "float32"))))
    graph = b.build()
    assert [p.name for p in graph.params] == ["table"]
    verify(graph)


# ---- verifier ------------------------------------------------------------------------------------

def _replace_node(graph: Graph, index: int, **changes) -> Graph:
    nodes = list(graph.nodes)
    nodes[index] = dataclasses.replace(nodes[index], **changes)
    return dataclasses.replace(graph, nodes=tuple(nodes))


def _index(graph: Graph, ref: str) -> int:
    return next(i for i, n in enumerate(graph.nodes) if n.ref == ref)


def test_verify_accepts_the_built_graph():
    graph, _ = build_tiny_graph()
    verify(graph)


def test_verify_names_the_node_using_an_undefined_value():
    graph, r = build_tiny_graph()
    node = graph.nodes[_index(graph, r["o"])]
    bad = _replace_node(graph, _index(graph, r["o"]), inputs=("%nope",) + node.inputs[1:])
    with pytest.raises(IRError, match=rf"node {r['o']} \(linear\): input %nope is used before it is defined"):
        verify(bad)
    # Swapping two dependent nodes breaks SSA order the same way.
    nodes = list(graph.nodes)
    i, j = _index(graph, r["h"]), _index(graph, r["x"])
    nodes[i], nodes[j] = nodes[j], nodes[i]
    with pytest.raises(IRError, match=rf"node {r['x']} \(rms_norm\): input {r['h']} is used before"):
        verify(dataclasses.replace(graph, nodes=tuple(nodes)))


def test_verify_names_the_node_with_a_wrong_recorded_type():
    graph, r = build_tiny_graph()
    bad = _replace_node(graph, _index(graph, r["q"]), type=TensorType((T, 65), "float32"))
    with pytest.raises(IRError, match=rf"node {r['q']} \(linear\): recorded type float32\[T, 65\]"):
        verify(bad)
    bad = _replace_node(graph, _index(graph, r["x"]), attrs=(("epz", 1e-5),))
    with pytest.raises(IRError, match=rf"node {r['x']} \(rms_norm\).*unknown attribute.*epz"):
        verify(bad)


def test_verify_rejects_outputs_of_undefined_values_and_duplicates():
    graph, r = build_tiny_graph()
    with pytest.raises(IRError, match=r"output 'logits' refers to undefined value %999"):
        verify(dataclasses.replace(graph, outputs=(("logits", "%999"),)))
    with pytest.raises(IRError, match="no outputs"):
        verify(dataclasses.replace(graph, outputs=()))
    with pytest.raises(IRError, match=rf"node {r['h']} \(embedding\): value defined twice"):
        verify(dataclasses.replace(graph, nodes=graph.nodes[:1] + graph.nodes))


def test_graph_and_nodes_are_immutable():
    graph, _ = build_tiny_graph()
    with pytest.raises(dataclasses.FrozenInstanceError):
        graph.nodes = ()
    with pytest.raises(dataclasses.FrozenInstanceError):
        graph.nodes[0].name = "x"
    with pytest.raises(dataclasses.FrozenInstanceError):
        graph.params[0].name = "x"
    assert isinstance(graph.nodes, tuple) and isinstance(graph.nodes[0], Node)
    assert isinstance(graph.nodes[0].attrs, tuple)


# ---- printer and networkx view -------------------------------------------------------------------

def test_printer_shows_every_op_and_param_one_line_per_node():
    graph, r = build_tiny_graph()
    text = str(graph)
    lines = text.splitlines()
    assert lines[0] == "graph(%input_ids: int64[T], %positions: int64[T]) {"
    assert lines[-2:] == [f"  return logits={r['logits']}", "}"]
    for op in graph.op_counts():
        assert f"= {op}(" in text
    for p in graph.params:
        assert sum(line.startswith(f"  @{p.name}: {p.type}") for line in lines) == 1
    assert "source=computed" in text  # the rotary inv_freq buffer
    for node in graph.nodes:
        (line,) = [line for line in lines if line.startswith(f"  {node.ref}: ")]
        assert f"= {node.op.name}({', '.join(node.inputs)})" in line
    assert len(lines) == 1 + len(graph.params) + len(graph.nodes) + 2


def test_to_networkx_follows_data_flow():
    graph, r = build_tiny_graph()
    g = graph.to_networkx()
    assert g.number_of_nodes() == len(graph.inputs) + len(graph.params) + len(graph.nodes) + len(graph.outputs)
    assert g.number_of_edges() == sum(len(set(n.inputs)) for n in graph.nodes) + len(graph.outputs)
    for node in graph.nodes:
        assert g.nodes[node.ref]["op"] == node.op.name and g.nodes[node.ref]["type"] == node.type
        assert set(g.predecessors(node.ref)) == set(node.inputs)
        for i, ref in enumerate(node.inputs):
            assert g.edges[ref, node.ref]["index"] == i
    assert g.has_edge(r["logits"], "out:logits")
    assert g.nodes["@lm_head.weight"]["kind"] == "param" and g.nodes["%positions"]["kind"] == "input"
    assert nx.is_directed_acyclic_graph(g)
    # The node order is a valid topological order: every edge goes forward in it.
    order = {name: -1 for name in g if name[0] in "%@"}
    order.update({n.ref: i for i, n in enumerate(graph.nodes)})
    order.update({name: len(graph.nodes) for name in g if name.startswith("out:")})
    assert all(order[u] < order[v] for u, v in g.edges)
    assert len(list(nx.topological_sort(g))) == g.number_of_nodes()


# ---- op references vs independent implementations ------------------------------------------------

def test_rms_norm_matches_plain_formula():
    x, w = randn(7, 24, seed=1), randn(24, seed=2)
    rms = torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(run_ref("rms_norm", x, w), x / rms * w, atol=ATOL, rtol=ATOL)
    # Gemma: (1 + w).
    torch.testing.assert_close(run_ref("rms_norm", x, w, offset=1.0), x / rms * (1 + w), atol=ATOL, rtol=ATOL)
    # Per-head q/k norm (Qwen3): weight of size head_dim normalizes each head separately.
    heads, hd = 4, 6
    wh = randn(hd, seed=3)
    xh = x.reshape(7, heads, hd)
    expected = xh / torch.sqrt(xh.pow(2).mean(-1, keepdim=True) + 1e-5) * wh
    out = run_ref("rms_norm", x, wh, eps=1e-5)
    torch.testing.assert_close(out, expected.reshape(7, 24), atol=ATOL, rtol=ATOL)
    assert not torch.allclose(out, x / rms * wh.repeat(heads), atol=1e-3)


def test_layer_norm_matches_plain_formula():
    x, w, b = randn(7, 13, seed=1) * 3 + 1, randn(13, seed=2), randn(13, seed=3)
    mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    expected = (x - mean) / torch.sqrt(var + 1e-5) * w + b
    torch.testing.assert_close(run_ref("layer_norm", x, w, b), expected, atol=ATOL, rtol=ATOL)


def hf_rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def hf_apply_rotary_pos_emb(x, positions, inv_freq, rotary_dim, attention_scaling=1.0):
    """HF Llama/NeoX style on [T, H, D]: rotate-half on the first ``rotary_dim`` features."""
    freqs = torch.outer(positions.float(), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = (emb.cos() * attention_scaling)[:, None, :], (emb.sin() * attention_scaling)[:, None, :]
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    return torch.cat((x_rot * cos + hf_rotate_half(x_rot) * sin, x_pass), dim=-1)


def gptj_apply_rotary_pos_emb(x, positions, inv_freq, rotary_dim):
    """HF GPT-J style on [T, H, D]: rotate every two on the first ``rotary_dim`` features."""
    freqs = torch.outer(positions.float(), inv_freq)
    sin = freqs.sin().repeat_interleave(2, dim=-1)[:, None, :]
    cos = freqs.cos().repeat_interleave(2, dim=-1)[:, None, :]
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    x1, x2 = x_rot[..., ::2], x_rot[..., 1::2]
    rotated = torch.stack((-x2, x1), dim=-1).flatten(-2)
    return torch.cat((x_rot * cos + rotated * sin, x_pass), dim=-1)


POSITIONS = torch.tensor([0, 3, 4, 9, 10, 11, 20])  # T=7, not contiguous


@pytest.mark.parametrize("rotary_dim", [10, 6])
def test_rope_rotate_half_matches_hf(rotary_dim):
    heads, hd = 3, 10
    x = randn(7, heads * hd, seed=4)
    freqs = inv_freq(rotary_dim)
    out = run_ref("rope", x, POSITIONS, freqs, head_dim=hd, rotary_dim=rotary_dim)
    expected = hf_apply_rotary_pos_emb(x.reshape(7, heads, hd), POSITIONS, freqs, rotary_dim)
    torch.testing.assert_close(out, expected.reshape(7, -1), atol=ATOL, rtol=ATOL)
    if rotary_dim < hd:  # the pass-through features are untouched
        torch.testing.assert_close(out.reshape(7, heads, hd)[..., rotary_dim:],
                                   x.reshape(7, heads, hd)[..., rotary_dim:], atol=0, rtol=0)
    scaled = run_ref("rope", x, POSITIONS, freqs, head_dim=hd, rotary_dim=rotary_dim, scaling=1.3)
    expected = hf_apply_rotary_pos_emb(x.reshape(7, heads, hd), POSITIONS, freqs, rotary_dim, 1.3)
    torch.testing.assert_close(scaled, expected.reshape(7, -1), atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("rotary_dim", [10, 4])
def test_rope_interleaved_matches_gptj(rotary_dim):
    heads, hd = 3, 10
    x = randn(7, heads * hd, seed=5)
    freqs = inv_freq(rotary_dim)
    out = run_ref("rope", x, POSITIONS, freqs, head_dim=hd, rotary_dim=rotary_dim, interleaved=True)
    expected = gptj_apply_rotary_pos_emb(x.reshape(7, heads, hd), POSITIONS, freqs, rotary_dim)
    torch.testing.assert_close(out, expected.reshape(7, -1), atol=ATOL, rtol=ATOL)
    half = run_ref("rope", x, POSITIONS, freqs, head_dim=hd, rotary_dim=rotary_dim)
    assert not torch.allclose(out, half, atol=1e-3)  # the two layouts really differ


def test_rope_rejects_inconsistent_attrs():
    x, freqs = TensorType((T, 30), "float32"), TensorType((5,), "float32")
    pos = TensorType((T,), "int64")
    rope = OPS["rope"]
    for bad in ({"head_dim": 7, "rotary_dim": 6}, {"head_dim": 10, "rotary_dim": 12},
                {"head_dim": 10, "rotary_dim": 5}, {"head_dim": 10, "rotary_dim": 8}):
        with pytest.raises(IRError, match="rope"):
            rope.infer([x, pos, freqs], rope.check_attrs(bad))


def sdpa_reference(q, k, v, heads, kv_heads, head_dim, scale, is_causal=True, attn_mask=None):
    """torch SDPA on token-flattened q/k/v, kv heads repeated for GQA."""
    t = len(q)
    qh = q.reshape(t, heads, head_dim).transpose(0, 1)
    kh = k.reshape(t, kv_heads, head_dim).transpose(0, 1).repeat_interleave(heads // kv_heads, 0)
    vh = v.reshape(t, kv_heads, -1).transpose(0, 1).repeat_interleave(heads // kv_heads, 0)
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=attn_mask, is_causal=is_causal, scale=scale)
    return out.transpose(0, 1).reshape(t, -1)


def _attention(q, k, v, positions, heads, kv_heads, head_dim, **attrs):
    return run_ref("attention", q, k, v, positions, num_heads=heads, num_kv_heads=kv_heads,
                   head_dim=head_dim, scale=head_dim ** -0.5, **attrs)


def _qkv(t, heads, kv_heads, head_dim, seed, v_head_dim=None):
    return (randn(t, heads * head_dim, seed=seed), randn(t, kv_heads * head_dim, seed=seed + 1),
            randn(t, kv_heads * (v_head_dim or head_dim), seed=seed + 2))


@pytest.mark.parametrize("causal", [True, False])
def test_attention_gqa_matches_sdpa(causal):
    t, heads, kv_heads, hd = 7, 6, 2, 5
    q, k, v = _qkv(t, heads, kv_heads, hd, seed=10)
    out = _attention(q, k, v, torch.arange(t), heads, kv_heads, hd, causal=causal)
    expected = sdpa_reference(q, k, v, heads, kv_heads, hd, hd ** -0.5, is_causal=causal)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=ATOL)


def test_attention_value_head_dim_may_differ():
    t, heads, kv_heads, hd, vd = 7, 4, 2, 5, 3
    q, k, v = _qkv(t, heads, kv_heads, hd, seed=20, v_head_dim=vd)
    out = _attention(q, k, v, torch.arange(t), heads, kv_heads, hd)
    assert out.shape == (t, heads * vd)
    torch.testing.assert_close(out, sdpa_reference(q, k, v, heads, kv_heads, hd, hd ** -0.5),
                               atol=ATOL, rtol=ATOL)


def test_attention_sliding_window_matches_explicit_mask():
    t, heads, kv_heads, hd, window = 7, 4, 1, 5, 3
    q, k, v = _qkv(t, heads, kv_heads, hd, seed=30)
    i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
    allowed = (j <= i) & (i - j < window)
    out = _attention(q, k, v, torch.arange(t), heads, kv_heads, hd, sliding_window=window)
    expected = sdpa_reference(q, k, v, heads, kv_heads, hd, hd ** -0.5, is_causal=False, attn_mask=allowed)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=ATOL)
    assert not torch.allclose(out, _attention(q, k, v, torch.arange(t), heads, kv_heads, hd), atol=1e-3)


def test_attention_softcap_matches_formula():
    t, heads, kv_heads, hd, cap = 7, 4, 2, 5, 2.0
    q, k, v = _qkv(t, heads, kv_heads, hd, seed=40)
    q = q * 3  # scores well beyond the cap, so capping changes the result
    out = _attention(q, k, v, torch.arange(t), heads, kv_heads, hd, softcap=cap)
    qh = q.reshape(t, heads, hd).transpose(0, 1)
    kh = k.reshape(t, kv_heads, hd).transpose(0, 1).repeat_interleave(heads // kv_heads, 0)
    vh = v.reshape(t, kv_heads, hd).transpose(0, 1).repeat_interleave(heads // kv_heads, 0)
    scores = cap * torch.tanh(qh @ kh.transpose(1, 2) / math.sqrt(hd) / cap)
    scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    expected = (scores.softmax(-1) @ vh).transpose(0, 1).reshape(t, -1)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=ATOL)
    assert not torch.allclose(out, _attention(q, k, v, torch.arange(t), heads, kv_heads, hd), atol=1e-3)


@settings(max_examples=20, deadline=None)
@given(t=st.integers(1, 12), kv_heads=st.integers(1, 3), group=st.integers(1, 4),
       head_dim=st.integers(1, 9), start=st.integers(0, 5), seed=st.integers(0, 2 ** 16))
def test_attention_gqa_property(t, kv_heads, group, head_dim, start, seed):
    heads = kv_heads * group
    q, k, v = _qkv(t, heads, kv_heads, head_dim, seed=seed)
    # A uniform position offset must not matter: only relative order is masked.
    out = _attention(q, k, v, torch.arange(start, start + t), heads, kv_heads, head_dim)
    expected = sdpa_reference(q, k, v, heads, kv_heads, head_dim, head_dim ** -0.5)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=ATOL)


# ---- KV cache and the interpreter ----------------------------------------------------------------

def test_prefill_then_decode_matches_one_full_run():
    graph, _ = build_tiny_graph()
    interp = Interpreter(graph)
    full = run_graph(interp, TOKENS)
    assert full.shape == (len(TOKENS), VOCAB)
    ctx = ExecutionContext()
    steps = [run_graph(interp, TOKENS[:5], 0, ctx)]
    for pos in range(5, len(TOKENS)):
        steps.append(run_graph(interp, [TOKENS[pos]], pos, ctx))
        assert ctx.kv.length == pos + 1
    torch.testing.assert_close(torch.cat(steps), full, atol=ATOL, rtol=0)
    # Without the cache a decode step sees only itself, so the cache is what makes them agree.
    alone = run_graph(interp, [TOKENS[5]], 5)
    assert not torch.allclose(alone, full[5:6], atol=1e-3)


def test_rewinding_drops_the_stale_tail():
    graph, _ = build_tiny_graph()
    interp = Interpreter(graph)
    ctx = ExecutionContext()
    run_graph(interp, TOKENS, 0, ctx)
    assert ctx.kv.length == len(TOKENS)
    new_tail = [1, 2, 4, 8]
    rerun = run_graph(interp, new_tail, 3, ctx)
    assert ctx.kv.length == 3 + len(new_tail)
    expected = run_graph(interp, TOKENS[:3] + new_tail)[3:]
    torch.testing.assert_close(rerun, expected, atol=ATOL, rtol=0)


def test_contiguous_kv_cache_append_semantics():
    cache = ContiguousKVCache()
    k, v = randn(9, 2, 3, seed=1), randn(9, 2, 3, seed=2)
    cache.append(0, k[:5], v[:5], torch.arange(5))
    k_all, v_all, pos = cache.append(0, k[5:], v[5:], torch.arange(5, 9))
    assert torch.equal(k_all, k) and torch.equal(v_all, v) and pos.tolist() == list(range(9))
    k_new, v_new = randn(1, 2, 3, seed=3), randn(1, 2, 3, seed=4)
    k_all, v_all, pos = cache.append(0, k_new, v_new, torch.tensor([3]))
    assert pos.tolist() == [0, 1, 2, 3] and cache.length == 4
    assert torch.equal(k_all, torch.cat((k[:3], k_new))) and torch.equal(v_all, torch.cat((v[:3], v_new)))
    cache.append(1, k[:2], v[:2], torch.arange(2))  # layers are independent
    assert len(cache.layers[0][2]) == 4 and len(cache.layers[1][2]) == 2


def test_interpreter_checks_its_inputs():
    graph, _ = build_tiny_graph()
    interp = Interpreter(graph)
    with pytest.raises(IRError, match="missing graph input %positions"):
        interp.run({"input_ids": torch.tensor([1, 2])})
    with pytest.raises(IRError, match="input %positions: expected int64\\[T\\]"):
        interp.run({"input_ids": torch.tensor([1, 2]), "positions": torch.arange(3)})  # T must agree
    with pytest.raises(IRError, match="input %input_ids"):
        interp.run({"input_ids": torch.tensor([1.0, 2.0]), "positions": torch.arange(2)})


def test_generate_greedy_matches_stepwise_argmax():
    graph, _ = build_tiny_graph()
    interp = Interpreter(graph)
    prompt = TOKENS[:4]
    tokens, prefill_logits = generate_greedy(graph, prompt, max_new_tokens=5, interpreter=interp)
    assert len(tokens) == 5 and all(0 <= tok < VOCAB for tok in tokens)
    torch.testing.assert_close(prefill_logits, run_graph(interp, prompt), atol=ATOL, rtol=0)
    seq = list(prompt)
    for tok in tokens:  # recompute each step from scratch, without a cache
        assert int(run_graph(interp, seq)[-1].argmax()) == tok
        seq.append(tok)
    assert generate_greedy(graph, prompt, max_new_tokens=0, interpreter=interp)[0] == []
