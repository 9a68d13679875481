"""ONNX raising patterns for graphs ``torch.onnx.export`` (dynamo) writes of an HF decoder.

Such a graph has no fused ops: RMSNorm is ``x * 1/sqrt(mean(x^2) + eps) * w``, a linear is
``MatMul(x, W^T)`` (+ ``Add(bias)``), heads are ``Reshape``/``Transpose`` views, rotary embedding is
``x * cos + rotate_half(x) * sin`` over position tables, GQA repeats k/v with ``Expand`` and scaled
dot-product attention is spelled out (``MatMul``, mask ``Add``, ``Softmax``, NaN guard, ``MatMul``).
The chains go through ``Partial`` states and raise to the IR ops the torch frontend produces
(rms_norm, linear, rope, attention). Activations ``[1, T, F]`` are the IR's ``[T, F]`` (batch 1).
A ``heads`` Partial is a view of an IR activation ``x`` ``[T, h * d]`` as ``[1, T, h, d]``, with
``tr`` (heads before tokens: ``[1, h, T, d]``), ``kt`` (last two axes swapped: k transposed),
``rep`` (each of ``h / rep`` heads repeated ``rep`` times) and ``scale`` (a factor still to apply).
"""

from __future__ import annotations

import math

import torch

from llmc.frontend.onnx_import import Act, Init, Partial, Static, mask_kind, module_of
from llmc.frontend.onnx_patterns import pattern, plain


def kind(x, name: str) -> bool:
    return isinstance(x, Partial) and x.kind == name


def heads(p: Partial, **changes) -> Partial:
    return Partial("heads", {**p.fields, **changes})


def weight_name(rx, node, init: Init, suffix: str) -> str:
    """The HF param name from the node's module (the exporter names initializers val_N and merges
    equal ones, e.g. all-ones norm weights), else the initializer's own name."""
    module = module_of(node)
    return f"{module}.{suffix}" if module else init.name


def static_of(rx, x) -> torch.Tensor | None:
    return rx.static_value(x) if isinstance(x, Static) else rx.tensor(x.name) if isinstance(x, Init) else None


# ---- RMSNorm: w * (x * 1 / sqrt(mean(x ** 2, -1) + eps)) ----------------------------------------

@pattern("Pow", doc="x ** 2 -> rms_norm step")
def square(rx, node, a, attrs):
    return Partial("sq", {"x": a[0]}) if plain(a[0]) and rx.scalar(a[1]) == 2.0 else None


@pattern("ReduceMean", doc="mean(x ** 2, -1, keepdim) -> rms_norm step")
def mean_square(rx, node, a, attrs):
    axes = rx.ints(a[1]) if len(a) > 1 else attrs.get("axes")
    if not kind(a[0], "sq") or axes not in ([-1], [2]) or not attrs.get("keepdims", 1):
        return None
    return Partial("ms", {"x": a[0].x})


@pattern("Add", doc="mean(x ** 2) + eps -> rms_norm step; linear(x) + b -> linear(x, W, b); rope halves summed")
def add_torch(rx, node, a, attrs):
    for p, q in (a, a[::-1]):
        if kind(p, "ms") and (eps := rx.scalar(q)) is not None:
            return Partial("ms_eps", {"x": p.x, "eps": eps})
        lin = rx.ir_node(p.ref) if plain(p) else None
        if lin is not None and lin.op.name == "linear" and len(lin.inputs) == 2 and isinstance(q, Init) and \
                rx.tensor(q.name).shape == (rx.features(p),):
            bias = rx.param(weight_name(rx, node, q, "bias"), rx.tensor(q.name))
            return Act(rx.emit(node, "linear", [*lin.inputs, bias]))
    if kind(a[0], "scores") and isinstance(a[1], Static) and a[0].mask is None:
        return Partial("scores", {**a[0].fields, "mask": a[1]})
    return rope_sum(rx, node, a)


@pattern("Sqrt", doc="sqrt(mean + eps) -> rms_norm step")
def sqrt(rx, node, a, attrs):
    return Partial("rms", a[0].fields) if kind(a[0], "ms_eps") else None


@pattern("Reciprocal", doc="1 / rms -> rms_norm step")
def reciprocal(rx, node, a, attrs):
    return Partial("inv_rms", a[0].fields) if kind(a[0], "rms") else None


@pattern("Mul", doc="x * inv_rms -> normed; w * normed -> rms_norm; heads * c -> scale; heads * cos|sin -> rope")
def mul_torch(rx, node, a, attrs):
    for p, q in (a, a[::-1]):
        if kind(q, "inv_rms") and p == q.x:
            return Partial("normed", q.fields)
        if kind(q, "normed") and isinstance(p, Init) and rx.tensor(p.name).shape == (rx.features(q.x),):
            weight = rx.param(weight_name(rx, node, p, "weight"), rx.tensor(p.name))
            return Act(rx.emit(node, "rms_norm", [q.x.ref, weight], eps=q.eps, offset=0.0))
        if kind(p, "heads") and (c := rx.scalar(q)) is not None:
            return heads(p, scale=p.scale * c)
        if (kind(p, "heads") or kind(p, "rotated")) and isinstance(q, Static):
            return Partial("rope_term", {"x": p, "table": q})
    return None


# ---- linear and heads views --------------------------------------------------------------------

@pattern("MatMul", doc="MatMul(x, W^T) -> linear; q @ k^T -> scores; softmax @ v -> attention")
def matmul(rx, node, a, attrs):
    x, w = a
    if plain(x) and isinstance(w, Init) and rx.tensor(w.name).dim() == 2 and \
            rx.tensor(w.name).shape[0] == rx.features(x):
        weight = rx.param(weight_name(rx, node, w, "weight"), rx.tensor(w.name).t().contiguous())
        return Act(rx.emit(node, "linear", [x.ref, weight]))
    if kind(x, "heads") and kind(w, "heads") and x.tr and not x.kt and w.tr and w.kt and x.h == w.h:
        return Partial("scores", {"q": x, "k": w, "mask": None})
    if kind(x, "probs") and kind(w, "heads") and w.tr and not w.kt and w.rep == x.k.rep and w.h == x.q.h:
        return attention(rx, node, x, w)
    return None


@pattern("Reshape", doc="[1, T, h*d] <-> [1, T, h, d] (heads view); [1, kvh, rep, T, d] -> [1, h, T, d] (GQA)")
def reshape_torch(rx, node, a, attrs):
    x, target = a
    if kind(target, "shape") and kind(x, "heads") and target.of.x == x.x:
        return x  # a view built from x's own shape (k transposed through a 3-D view): same tensor
    shape = rx.ints(target)
    if shape is None:
        return None
    if plain(x) and len(shape) == 4 and shape[:2] in ([1, -1], [1, 0]) and shape[2] * shape[3] == rx.features(x):
        return Partial("heads", {"x": x, "h": shape[2], "d": shape[3], "tr": False, "kt": False, "rep": 1,
                                 "scale": 1.0})
    if kind(x, "heads") and not x.tr and not x.kt and x.rep == 1 and x.scale == 1.0 and \
            shape in ([1, -1, x.h * x.d], [1, 0, x.h * x.d]):
        return x.x
    if kind(x, "repeat") and len(shape) == 4 and shape[1] == x.heads.h * x.n and shape[3] == x.heads.d:
        return heads(x.heads, h=shape[1], rep=x.n)
    return None


@pattern("Transpose", doc="swap tokens and heads / the last two axes of a heads view")
def transpose(rx, node, a, attrs):
    x, perm = a[0], list(attrs.get("perm", []))
    if not kind(x, "heads"):
        return None
    if perm == [0, 2, 1, 3]:
        return heads(x, tr=not x.tr)
    if perm in ([0, 1, 3, 2], [0, 2, 1]):  # [0, 2, 1]: over the 3-D view [-1, T, d] of a heads view
        return heads(x, kt=not x.kt)
    return None


@pattern("Shape", "Slice", "Concat", doc="shape arithmetic over a heads view's own shape -> a view's target")
def shape_of(rx, node, a, attrs):
    if node.op_type == "Shape" and kind(a[0], "heads"):
        return Partial("shape", {"of": a[0]})
    shapes = [x for x in a if kind(x, "shape")]
    if shapes and all(kind(x, "shape") or rx.ints(x) is not None for x in a if x is not None):
        return shapes[0]
    return None


@pattern("Unsqueeze", "Expand", doc="k[:, :, None].expand(1, kvh, rep, T, d) -> GQA repeat")
def repeat_kv(rx, node, a, attrs):
    x = a[0]
    if node.op_type == "Unsqueeze" and kind(x, "heads") and x.tr and x.rep == 1 and rx.ints(a[1]) == [2]:
        return Partial("repeat", {"heads": x, "n": 1})
    target = static_of(rx, a[1]) if node.op_type == "Expand" and kind(x, "repeat") else None
    if target is None or target.numel() != 5 or int(target[1]) != x.heads.h or int(target[4]) != x.heads.d:
        return None
    return Partial("repeat", {"heads": x.heads, "n": int(target[2])})


# ---- rotary: x * cos + rotate_half(x) * sin -----------------------------------------------------

@pattern("Slice", doc="heads[..., a:b] -> rotate_half step")
def half(rx, node, a, attrs):
    x = a[0]
    starts, ends, axes = rx.ints(a[1]), rx.ints(a[2]), rx.ints(a[3]) if len(a) > 3 else None
    steps = rx.ints(a[4]) if len(a) > 4 and a[4] is not None else [1]
    if not kind(x, "heads") or axes not in ([3], [-1]) or steps != [1]:
        return None
    return Partial("half", {"x": x, "start": starts[0], "stop": min(ends[0], x.d)})


@pattern("Neg", doc="-x[..., d/2:] -> rotate_half step")
def neg(rx, node, a, attrs):
    return Partial("neg_half", a[0].fields) if kind(a[0], "half") else None


@pattern("Concat", doc="cat(-x[..., d/2:], x[..., :d/2]) -> rotate_half(x)")
def rotate_half(rx, node, a, attrs):
    if len(a) != 2 or not kind(a[0], "neg_half") or not kind(a[1], "half") or attrs.get("axis") not in (3, -1):
        return None
    hi, lo = a[0], a[1]
    d = hi.x.d
    if hi.x != lo.x or (hi.start, hi.stop, lo.start, lo.stop) != (d // 2, d, 0, d // 2):
        return None
    return Partial("rotated", {"x": hi.x})


def rope_sum(rx, node, a):
    """x * cos + rotate_half(x) * sin -> rope(x) (cos/sin read off the probe, inv_freq their source)."""
    if not all(kind(t, "rope_term") for t in a):
        return None
    plain_term, rot_term = sorted(a, key=lambda t: kind(t.x, "rotated"))
    x = plain_term.x
    if not kind(plain_term.x, "heads") or not kind(rot_term.x, "rotated") or rot_term.x.x != x or \
            not x.tr or x.kt or x.rep != 1 or x.scale != 1.0:
        return None
    cos, sin = rope_table(rx, plain_term.table, "cos", x.d), rope_table(rx, rot_term.table, "sin", x.d)
    if cos is None or cos != sin:
        return None
    ref = rx.emit(node, "rope", [x.x.ref, "%positions", rx.param(cos[0])], head_dim=x.d, rotary_dim=x.d,
                  interleaved=False, scaling=cos[1])
    return heads(x, x=Act(ref))


def rope_table(rx, table: Static, fn: str, d: int) -> tuple[str, float] | None:
    """(inv_freq initializer, scaling) when the probe value of ``table`` is ``scaling * cos/sin(pos *
    inv_freq)`` repeated over both halves (HF's ``cat(freqs, freqs)``, [.., T, d])."""
    pos = rx.static_value(Static("positions")).double()
    value = rx.static_value(table).double()
    if value.numel() != pos.numel() * d:
        return None
    value = value.reshape(-1, d)
    if not torch.equal(value[:, : d // 2], value[:, d // 2:]):
        return None
    for name in rx.ancestor_inits(table.name):
        inv_freq = rx.tensor(name)
        if inv_freq.dim() != 1 or inv_freq.numel() != d // 2 or not inv_freq.is_floating_point():
            continue
        ref = getattr(torch, fn)(pos[:, None] * inv_freq.double()[None, :])
        scaling = float(f"{float((value[:, : d // 2] * ref).sum() / (ref * ref).sum()):.7g}")
        if (value[:, : d // 2] - scaling * ref).abs().max() <= 1e-5 * max(1.0, abs(scaling)):
            return name, scaling
    return None


# ---- attention: softmax(q k^T * scale + mask) v -------------------------------------------------

@pattern("Softmax", doc="softmax(scores, -1) -> attention step")
def softmax(rx, node, a, attrs):
    return Partial("probs", a[0].fields) if kind(a[0], "scores") and attrs.get("axis", -1) in (-1, 3) else None


@pattern("IsNaN", "Where", doc="where(isnan(p), 0, p) (rows with every key masked) -> p")
def nan_guard(rx, node, a, attrs):
    if node.op_type == "IsNaN":
        return Partial("nan", {"p": a[0]}) if kind(a[0], "probs") else None
    cond, zero, p = a
    return p if kind(cond, "nan") and cond.p == p and rx.scalar(zero) == 0.0 else None


def attention(rx, node, probs: Partial, v: Partial) -> Partial:
    q, k = probs.q, probs.k
    layer = len(rx.layers)
    rx.layers.add(layer)
    causal, window = mask_kind(rx, probs.mask)
    scale = q.scale * k.scale  # sdpa splits the scale as sqrt(scale) on q and on k
    if math.isclose(scale, 1 / math.sqrt(q.d), rel_tol=1e-6):
        scale = 1 / math.sqrt(q.d)
    ref = rx.emit(node, "attention", [q.x.ref, k.x.ref, v.x.ref, "%positions"], layer=layer, num_heads=q.h,
                  num_kv_heads=q.h // k.rep, head_dim=q.d, scale=scale, causal=causal, sliding_window=window,
                  softcap=None)
    return Partial("heads", {"x": Act(ref), "h": q.h, "d": q.d, "tr": True, "kt": False, "rep": 1, "scale": 1.0})
