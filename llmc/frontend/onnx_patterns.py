"""ONNX raising patterns: ONNX nodes (with what is known of their operands) -> llmc IR.

Each pattern is one entry in ``PATTERNS``: the ONNX op types it fires on, a function
``fn(rx, node, args, attrs)`` returning the raised value (a list for multi-output nodes) or None
when it does not apply, and a one-line comment with the rewrite. Multi-node idioms (silu as
``x * sigmoid(x)``, Gemma's ``1 + w`` norm scale, dequantize-then-Gemm, add+norm packed by a
Concat) go through ``Partial`` states, as in ``patterns.py`` for ATen graphs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from llmc.frontend.onnx_import import Act, Init, Partial, PastKV, Static, attention_scale, mask_kind, rope_match
from llmc.ir.ops_fused import GATE_ACTIVATIONS
from llmc.ir.types import DTYPE_NAMES


@dataclass(frozen=True)
class Pattern:
    ops: tuple[str, ...]
    fn: Callable[..., Any]
    doc: str


PATTERNS: list[Pattern] = []
ONNX_TO_DTYPE = {1: "float32", 10: "float16", 16: "bfloat16", 7: "int64", 6: "int32", 3: "int8", 2: "uint8"}


def pattern(*ops: str, doc: str):
    def wrap(fn):
        PATTERNS.append(Pattern(ops, fn, doc))
        return fn
    return wrap


def plain(x) -> bool:
    """An IR activation in its own [T, F] layout."""
    return isinstance(x, Act) and not x.batched and not x.group


# ---- plumbing ----------------------------------------------------------------------------------

@pattern("Identity", doc="Identity(x) -> x")
def identity(rx, node, a, attrs):
    return a[0] if isinstance(a[0], (Act, Partial)) else None


@pattern("Unsqueeze", "Squeeze", doc="x[None] / x[0] around opset-23 [batch, seq, hidden] ops -> a view")
def batch_axis(rx, node, a, attrs):
    x, axes = a[0], rx.ints(a[1])
    if not isinstance(x, Act) or x.group or axes != [0] or x.batched != (node.op_type == "Squeeze"):
        return None
    return Act(x.ref, batched=node.op_type == "Unsqueeze")


@pattern("Reshape", doc="[T, F] <-> [T, F/g, g] for per-head norms -> a view")
def reshape(rx, node, a, attrs):
    x, shape = a[0], rx.ints(a[1])
    if not isinstance(x, Act) or x.batched or shape is None or shape[0] != 0 or attrs.get("allowzero", 0):
        return None
    features = rx.features(x)
    if not x.group and len(shape) == 3 and shape[1] * shape[2] == features:
        return Act(x.ref, group=shape[2])
    if x.group and shape == [0, features]:
        return Act(x.ref)
    return None


@pattern("Cast", doc="Cast(x, to) -> cast (dropped when the dtype is already x's)")
def cast(rx, node, a, attrs):
    x = a[0]
    if isinstance(x, Partial) and x.kind == "dequant":
        return x                                                    # Cast of a dequantized weight: Gemm reads it
    if not plain(x) or attrs["to"] not in ONNX_TO_DTYPE:
        return None
    dtype = ONNX_TO_DTYPE[attrs["to"]]
    return x if rx.type_of(x).dtype == dtype else Act(rx.emit(node, "cast", [x.ref], dtype=dtype))


@pattern("Slice", doc="Slice(x, [a], [b], axes=[1]) -> slice(x)[:, a:b]")
def slice_(rx, node, a, attrs):
    x = a[0]
    starts, ends = rx.ints(a[1]), rx.ints(a[2])
    axes = rx.ints(a[3]) if len(a) > 3 and a[3] is not None else None
    steps = rx.ints(a[4]) if len(a) > 4 and a[4] is not None else [1]
    if not plain(x) or axes not in ([1], [-1]) or steps != [1] or len(starts or []) != 1:
        return None
    return Act(rx.emit(node, "slice", [x.ref], start=starts[0], stop=min(ends[0], rx.features(x))))


@pattern("Split", doc="Split(x, 2, axis=1) -> slice(x)[:, :F/2], slice(x)[:, F/2:]")
def split(rx, node, a, attrs):
    x = a[0]
    if not plain(x) or attrs.get("axis") not in (1, -1) or len(node.output) != 2 or len(a) > 1:
        return None
    half = rx.features(x) // 2
    return [Act(rx.emit(node, "slice", [x.ref], start=0, stop=half)),
            Act(rx.emit(node, "slice", [x.ref], start=half, stop=2 * half))]


# ---- elementwise -------------------------------------------------------------------------------

@pattern("Add", doc="a + b -> add; w + c (initializers) -> norm scale (Gemma's 1 + w)")
def add(rx, node, a, attrs):
    x, y = a
    if plain(x) and plain(y):
        return Act(rx.emit(node, "add", [x.ref, y.ref]))
    if isinstance(x, Init) and (c := rx.scalar(y)) is not None and rx.tensor(x.name).dim() == 1:
        return Partial("norm_scale", {"weight": x, "offset": c})
    return None


@pattern("Sigmoid", doc="sigmoid(x) -> silu step")
def sigmoid(rx, node, a, attrs):
    return Partial("sigmoid", {"x": a[0]}) if plain(a[0]) else None


@pattern("Mul", doc="x * sigmoid(x) -> silu; a * b -> mul; x * c -> scale")
def mul(rx, node, a, attrs):
    x, y = a
    for p, q in ((x, y), (y, x)):
        if isinstance(q, Partial) and q.kind == "sigmoid" and q.x == p:
            return Act(rx.emit(node, "silu", [p.ref]))
    if plain(x) and plain(y):
        return gated(rx, node, x, y) or gated(rx, node, y, x) or Act(rx.emit(node, "mul", [x.ref, y.ref]))
    for p, q in ((x, y), (y, x)):
        if plain(p) and (c := rx.scalar(q)) is not None:
            return Act(rx.emit(node, "scale", [p.ref], factor=c))
    return None


def gated(rx, node, gate: Act, up: Act) -> Act | None:
    """act(g) * u -> act_mul(g, u); act(x[:, :I]) * x[:, I:] -> act_mul_packed(x) (the fused forms)."""
    act = rx.ir_node(gate.ref)
    if act is None or act.op.name not in GATE_ACTIVATIONS:
        return None
    g, u = rx.ir_node(act.inputs[0]), rx.ir_node(up.ref)
    if g is not None and u is not None and g.op.name == u.op.name == "slice" and g.inputs == u.inputs and \
            g.attr("start") == 0 and g.attr("stop") == u.attr("start") and \
            2 * g.attr("stop") == u.attr("stop") == rx.builder.type_of(g.inputs[0]).shape[1]:
        return Act(rx.emit(node, "act_mul_packed", list(g.inputs), act=act.op.name))
    if rx.type_of(gate) != rx.type_of(up):
        return None
    return Act(rx.emit(node, "act_mul", [act.inputs[0], up.ref], act=act.op.name))


@pattern("Gelu", "Relu", "Tanh", doc="Gelu(approximate) / Relu / Tanh -> gelu, gelu_tanh / relu / tanh")
def unary(rx, node, a, attrs):
    if not plain(a[0]):
        return None
    op = {"Relu": "relu", "Tanh": "tanh"}.get(node.op_type)
    op = op or ("gelu_tanh" if attrs.get("approximate", b"none") in (b"tanh", "tanh") else "gelu")
    return Act(rx.emit(node, op, [a[0].ref]))


@pattern("Gather", doc="Gather(W, ids or positions, axis=0) -> embedding (token or learned position)")
def gather(rx, node, a, attrs):
    w, ids = a
    ids = "%input_ids" if ids == Act("%input_ids") else "%positions" if ids == Static("positions") else None
    if isinstance(w, Init) and ids and attrs.get("axis", 0) == 0:
        return Act(rx.emit(node, "embedding", [ids, rx.param(w.name)]))
    return None


# ---- linear ------------------------------------------------------------------------------------

@pattern("DequantizeLinear", doc="DequantizeLinear(q int8|fp8, s, axis=0) -> quantized weight step")
def dequantize(rx, node, a, attrs):
    q, s = a[0], a[1]
    if not (isinstance(q, Init) and isinstance(s, Init)) or len(a) > 2 or attrs.get("axis", 1) != 0:
        return None
    dtype = DTYPE_NAMES[rx.tensor(q.name).dtype]
    op = {"int8": "linear_int8", "float8_e4m3fn": "linear_fp8"}.get(dtype)
    return Partial("dequant", {"op": op, "q": q, "s": s}) if op else None


@pattern("Gemm", doc="Gemm(x, W, b, transB=1) -> linear; Gemm(x, dequant(q, s), b) -> linear_int8 / linear_fp8")
def gemm(rx, node, a, attrs):
    x, w, bias = a[0], a[1], a[2] if len(a) > 2 else None
    if not plain(x) or attrs.get("transB", 0) != 1 or attrs.get("transA", 0) or \
            attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
        return None
    if bias is not None and not isinstance(bias, Init):
        return None
    extra = [rx.param(bias.name)] if bias is not None else []
    if isinstance(w, Init):
        return Act(rx.emit(node, "linear", [x.ref, rx.param(w.name), *extra]))
    if isinstance(w, Partial) and w.kind == "dequant":
        return Act(rx.emit(node, w.op, [x.ref, rx.param(w.q.name), rx.param(w.s.name), *extra]))
    return None


@pattern("MatMulNBits", doc="com.microsoft.MatMulNBits(x, B, scales, zp, bias, bits=4) -> linear_int4")
def matmulnbits(rx, node, a, attrs):
    x, b, s, z = (a + [None] * 4)[:4]
    bias = a[5] if len(a) > 5 else None
    if node.domain != "com.microsoft" or attrs.get("bits") != 4 or not plain(x) or \
            not all(isinstance(t, Init) for t in (b, s, z)) or (len(a) > 4 and a[4] is not None):
        return None
    n, k, g = attrs["N"], attrs["K"], attrs["block_size"]
    blocks = k // g
    zp = rx.tensor(z.name)
    if zp.dtype != torch.uint8 or zp.numel() != n * ((blocks + 1) // 2):
        return None  # float zero points (or none) have no llmc int4 layout
    packed = zp.reshape(n, -1)
    zeros = torch.stack((packed & 15, packed >> 4), dim=-1).reshape(n, -1)[:, :blocks].contiguous()
    storage = [rx.param(b.name, rx.tensor(b.name).reshape(n, k // 2), "int4"),
               rx.param(s.name, rx.tensor(s.name).reshape(n, blocks).float(), "int4"),
               rx.param(z.name, zeros, "int4")]
    extra = [rx.param(bias.name)] if isinstance(bias, Init) else []
    return Act(rx.emit(node, "linear_int4", [x.ref, *storage, *extra], group_size=g))


# ---- normalization -----------------------------------------------------------------------------

def _norm_weight(rx, scale) -> tuple[str, float] | None:
    if isinstance(scale, Init):
        return rx.param(scale.name), 0.0
    if isinstance(scale, Partial) and scale.kind == "norm_scale":
        return rx.param(scale.weight.name), scale.offset
    return None


@pattern("RMSNormalization", doc="RMSNormalization(x, offset + w, axis=-1) -> rms_norm (whole row or per head)")
def rms_norm(rx, node, a, attrs):
    x, w = a[0], _norm_weight(rx, a[1])
    if not isinstance(x, Act) or x.batched or w is None or attrs.get("axis", -1) != -1:
        return None
    ref = rx.emit(node, "rms_norm", [x.ref, w[0]], eps=float(attrs.get("epsilon", 1e-5)), offset=w[1])
    return Act(ref, group=x.group)


@pattern("Concat", doc="Concat(rms_norm(x + r), x + r, axis=1) -> add_rms_norm(x, r)")
def concat(rx, node, a, attrs):
    if len(a) != 2 or not all(plain(t) for t in a) or attrs.get("axis") not in (1, -1):
        return None
    norm, summed = rx.ir_node(a[0].ref), rx.ir_node(a[1].ref)
    if norm is None or summed is None or norm.op.name != "rms_norm" or summed.op.name != "add" or \
            norm.inputs[0] != summed.ref or rx.builder.type_of(norm.inputs[1]).shape[0] != rx.features(a[1]):
        return None
    return Act(rx.emit(node, "add_rms_norm", [*summed.inputs, norm.inputs[1]], eps=norm.attr("eps"),
                       offset=norm.attr("offset")))


@pattern("LayerNormalization", doc="LayerNormalization(x, w, b, axis=-1) -> layer_norm")
def layer_norm(rx, node, a, attrs):
    x, w, b = (a + [None])[:3]
    if not plain(x) or not isinstance(w, Init) or not isinstance(b, Init) or attrs.get("axis", -1) not in (-1, 1):
        return None
    return Act(rx.emit(node, "layer_norm", [x.ref, rx.param(w.name), rx.param(b.name)],
                       eps=float(attrs.get("epsilon", 1e-5))))


# ---- rotary and attention ----------------------------------------------------------------------

@pattern("RotaryEmbedding", doc="RotaryEmbedding(x[1,T,F], cos, sin) with cos/sin = f(positions * inv_freq) -> rope")
def rotary(rx, node, a, attrs):
    x, cos, sin = a[0], a[1], a[2]
    if not (isinstance(x, Act) and x.batched and isinstance(cos, Static) and isinstance(sin, Static)) or \
            (len(a) > 3 and a[3] is not None) or "num_heads" not in attrs:
        return None
    head_dim = rx.features(x) // attrs["num_heads"]
    rotary_dim = attrs.get("rotary_embedding_dim", 0) or head_dim
    c, s = rope_match(rx, cos, "cos", rotary_dim), rope_match(rx, sin, "sin", rotary_dim)
    if c is None or c != s:
        return None
    ref = rx.emit(node, "rope", [x.ref, "%positions", rx.param(c[0])], head_dim=head_dim, rotary_dim=rotary_dim,
                  interleaved=bool(attrs.get("interleaved", 0)), scaling=c[1])
    return Act(ref, batched=True)


@pattern("Attention", doc="Attention(q, k, v, mask, past_k, past_v) -> attention (causal/window from the mask)")
def attention(rx, node, a, attrs):
    q, k, v, mask = (a + [None] * 4)[:4]
    past = a[4:6]
    if not all(isinstance(t, Act) and t.batched for t in (q, k, v)) or len(past) != 2 or \
            not all(isinstance(p, PastKV) for p in past) or past[0].layer != past[1].layer or \
            (mask is not None and not isinstance(mask, Static)) or len(node.output) != 3 or attrs.get("is_causal"):
        return None
    h, kvh = attrs["q_num_heads"], attrs["kv_num_heads"]
    head_dim = rx.features(q) // h
    causal, window = mask_kind(rx, mask)
    layer = past[0].layer
    rx.layers.add(layer)
    softcap = attrs.get("softcap", 0.0) or None
    inputs, rope = [q.ref, k.ref, v.ref, "%positions"], {}
    rq, rk = rx.ir_node(q.ref), rx.ir_node(k.ref)
    if rq is not None and rk is not None and rq.op.name == rk.op.name == "rope" and \
            rq.inputs[1:] == rk.inputs[1:] and rq.attrs == rk.attrs and rq.attr("head_dim") == head_dim:
        # rope(q), rope(k) -> attention(q, k, ..., inv_freq) {rope_dim}: the fused form the exporter unfolded
        inputs = [rq.inputs[0], rk.inputs[0], v.ref, "%positions", rq.inputs[2]]
        rope = dict(rope_dim=rq.attr("rotary_dim"), rope_interleaved=rq.attr("interleaved"),
                    rope_scaling=rq.attr("scaling"))
    ref = rx.emit(node, "attention", inputs, layer=layer, num_heads=h, num_kv_heads=kvh, head_dim=head_dim,
                  scale=attention_scale(attrs, head_dim), causal=causal, sliding_window=window, softcap=softcap,
                  **rope)
    present = Partial("present", {"layer": layer})
    return [Act(ref, batched=True), present, present]
