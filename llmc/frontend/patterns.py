"""Raising patterns: ATen ops (with what is known of their operands) -> llmc IR.

Each pattern is one entry in ``PATTERNS``: the ATen op names it fires on, a function that returns
the raised value (or None when it does not apply) and a one-line comment with the algebra. Order
matters only among patterns of the same op. Multi-op idioms (RMSNorm, rotate-half rotary, eager
softmax attention, logit soft-capping) go through ``Partial`` states: each op adds one step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from llmc.frontend.values import Act, Axis, Ids, ParamRef, Partial, Static, token_major_axes


@dataclass(frozen=True)
class Pattern:
    ops: tuple[str, ...]
    fn: Callable[..., Any]
    doc: str


PATTERNS: list[Pattern] = []


def pattern(*ops: str, doc: str):
    def wrap(fn):
        PATTERNS.append(Pattern(ops, fn, doc))
        return fn
    return wrap


def num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def heads_slice(x):
    """An Act with a head axis (or a slice of one) as Partial('hslice', base, start, stop)."""
    if isinstance(x, Act) and len(x.features) >= 2:
        return Partial("hslice", {"base": x, "start": 0, "stop": x.head_dim})
    if isinstance(x, Partial) and x.kind == "hslice":
        return x
    return None


def last_dim(x, dim: int) -> bool:
    n = len(x.axes)
    return dim in (-1, n - 1)


# ---- plumbing ----------------------------------------------------------------------------------

@pattern("alias", "contiguous", "clone", "dropout", "detach", "lift_fresh_copy", "to", "type_as",
         "_to_copy", doc="no-op at inference: dropout is off; same-dtype casts are identity")
def passthrough(rx, node, a):
    x = a["self"]
    if isinstance(x, Act):
        want = rx.dtype_of(node)
        if want != rx.builder.type_of(x.ref).dtype:
            return Act(rx.emit(node, "cast", [x.ref], dtype=want), x.axes, x.rep)
        return x
    if isinstance(x, (Partial, ParamRef, Ids)):
        return x
    return None


@pattern("view", "reshape", "_unsafe_view", doc="reshape that keeps [T, features] order -> no op")
def reshape(rx, node, a):
    x = a["self"]
    if isinstance(x, Ids):
        return x
    if not isinstance(x, Act):
        return None
    shape = rx.shape_of(node)
    out = token_major_axes(shape)
    kinds = [ax.kind for ax in x.axes]
    if x.token_major and [ax.kind for ax in out if ax.kind != "1"][0] == "T":
        return Act(x.ref, out, x.rep)                                   # split/merge feature dims
    if len(shape) == len(x.axes) and all(
            ax.kind == "T" or ax.size == s for ax, s in zip(x.axes, shape)):
        return x                                                        # same shape
    if kinds == ["1", "F", "R", "T", "F"] and len(shape) == 4:          # [1,Hkv,R,T,D] -> [1,H,T,D]
        h, r, d = x.axes[1].size, x.axes[2].size, x.axes[4].size
        return Act(x.ref, (Axis("1", 1), Axis("F", h * r), Axis("T"), Axis("F", d)), x.rep * r)
    return None


@pattern("transpose", doc="transpose keeping feature order (heads before head_dim) -> no op")
def transpose(rx, node, a):
    x = a["self"]
    if not isinstance(x, Act):
        return None
    axes = list(x.axes)
    i, j = a["dim0"] % len(axes), a["dim1"] % len(axes)
    axes[i], axes[j] = axes[j], axes[i]
    feats = [ax for ax in axes if ax.kind == "F"]
    if [f.size for f in feats] != list(x.features):
        return None  # would reorder stored features: not expressible without a copy
    return x.with_axes(axes)


@pattern("unsqueeze", doc="unit axis -> no op")
def unsqueeze(rx, node, a):
    x = a["self"]
    if not isinstance(x, Act):
        return None
    axes = list(x.axes)
    dim = a["dim"] % (len(axes) + 1)
    axes.insert(dim, Axis("1", 1))
    return x.with_axes(axes)


@pattern("expand", doc="broadcast a unit axis (GQA repeat_kv) -> R axis, no copy")
def expand(rx, node, a):
    x = a["self"]
    if not isinstance(x, Act):
        return None
    axes = []
    for ax, size in zip(x.axes, rx.shape_of(node)):
        if ax.kind == "1" and isinstance(size, int) and size > 1:
            axes.append(Axis("R", size))
        else:
            axes.append(ax)
    return x.with_axes(axes)


@pattern("split", "chunk", doc="split of a fused projection along features -> slice per part")
def split(rx, node, a):
    x = a["self"]
    if not isinstance(x, Act) or not last_dim(x, a["dim"]) or len(x.features) != 1:
        return None
    parts, start = [], 0
    for shape in rx.shape_of(node, multi=True):
        stop = start + shape[-1]
        parts.append(Act(rx.emit(node, "slice", [x.ref], start=start, stop=stop), token_major_axes(shape)))
        start = stop
    return parts


@pattern("getitem", doc="pick one output of split/chunk")
def getitem(rx, node, a):
    seq, i = a["self"], a["index"]
    return seq[i] if isinstance(seq, list) else None


@pattern("slice", doc="x[..., a:b] -> IR slice (flat) or a head-feature slice (rotary); x[:, 0:] -> x")
def slice_(rx, node, a):
    x, dim, start, end = a["self"], a["dim"], a["start"] or 0, a["end"]
    if isinstance(x, Act) and x.axes[dim].kind in ("T", "1") and start == 0 and (end is None or end >= 2**62):
        return x
    hs = heads_slice(x)
    if hs is not None and last_dim(hs.base, dim):
        width = hs.stop - hs.start
        stop = width if end is None or end >= width else end
        return hs.but(start=hs.start + start, stop=hs.start + stop)
    if isinstance(x, Act) and len(x.features) == 1 and last_dim(x, dim):
        stop = x.features[0] if end is None or end >= x.features[0] else end
        return Act(rx.emit(node, "slice", [x.ref], start=start, stop=stop), token_major_axes(rx.shape_of(node)))
    return None


# ---- embeddings and projections ----------------------------------------------------------------

@pattern("embedding", doc="embedding(W, ids | positions) -> embedding (token or learned position)")
def embedding(rx, node, a):
    w, idx = a["weight"], a["indices"]
    if not isinstance(w, ParamRef):
        return None
    if isinstance(idx, Ids):
        src = "%input_ids"
    elif isinstance(idx, Static) and idx.is_positions:
        src = "%positions"
    else:
        return None
    return Act(rx.emit(node, "embedding", [src, rx.param(w)]), token_major_axes(rx.shape_of(node)))


@pattern("linear", doc="linear(x, W[out,in], b) -> linear")
def linear(rx, node, a):
    x, w, b = a["input"], a["weight"], a.get("bias")
    if not (isinstance(x, Act) and x.token_major and isinstance(w, ParamRef)):
        return None
    ins = [x.ref, rx.param(w)] + ([rx.param(b)] if isinstance(b, ParamRef) else [])
    return Act(rx.emit(node, "linear", ins), token_major_axes(rx.shape_of(node)))


@pattern("addmm", doc="addmm(b, x, W[in,out]) (GPT-2 Conv1D) -> linear with W transposed on load")
def addmm(rx, node, a):
    b, x, w = a["self"], a["mat1"], a["mat2"]
    if not (isinstance(x, Act) and isinstance(w, ParamRef) and isinstance(b, ParamRef)):
        return None
    if a.get("beta", 1) != 1 or a.get("alpha", 1) != 1:
        return None
    ref = rx.emit(node, "linear", [x.ref, rx.param(w, transpose=True), rx.param(b)])
    return Act(ref, token_major_axes(rx.shape_of(node)))


# ---- RMSNorm: x * rsqrt(mean(x**2) + eps) * w --------------------------------------------------

@pattern("pow", doc="x ** 2 -> Partial sq(x)  (RMSNorm step 1)")
def pow_(rx, node, a):
    x = a["self"]
    if isinstance(x, Act) and a["exponent"] == 2:
        return Partial("sq", {"x": x})
    return None


@pattern("mean", doc="mean(sq(x), -1, keepdim) -> Partial mean_sq(x)  (RMSNorm step 2)")
def mean(rx, node, a):
    s = a["self"]
    if isinstance(s, Partial) and s.kind == "sq" and list(a["dim"]) in ([-1], [len(s.x.axes) - 1]) and a["keepdim"]:
        return s.but("mean_sq")
    return None


@pattern("rsqrt", doc="rsqrt(mean_sq(x) + eps) -> Partial rrms(x, eps)  (RMSNorm step 4)")
def rsqrt(rx, node, a):
    s = a["self"]
    if isinstance(s, Partial) and s.kind == "mean_sq_eps":
        return s.but("rrms")
    return None


# ---- elementwise and idiom steps for add / mul / div -------------------------------------------

@pattern("add", doc="mean_sq + eps; w + c (Gemma 1+w); rope cos+sin terms; scores + mask; a + b")
def add(rx, node, a):
    x, y = a["self"], a["other"]
    if a.get("alpha", 1) != 1:
        return None
    if isinstance(x, Partial) and x.kind == "mean_sq" and num(y):
        return x.but("mean_sq_eps", eps=float(y))
    if isinstance(x, ParamRef) and num(y):
        return ParamRef(x.key, x.plus + float(y))
    if isinstance(x, Partial) and isinstance(y, Partial) and {x.kind, y.kind} == {"cos_term", "sin_term"}:
        c, s = (x, y) if x.kind == "cos_term" else (y, x)
        if (c.base, c.start, c.stop) == (s.base, s.start, s.stop) and c.table.inv_freq == s.table.inv_freq:
            roped = c.but("roped", sin_table=s.table)
            return rx.finish_rope(node, roped) if c.start == 0 and c.stop == c.base.head_dim else roped
    if isinstance(x, Partial) and x.kind == "scores" and isinstance(y, Static):
        return x.but(mask=y)
    if isinstance(x, Act) and isinstance(y, Act) and x.axes == y.axes and x.rep == y.rep == 1:
        return Act(rx.emit(node, "add", [x.ref, y.ref]), x.axes)
    return None


def _scalar(rx, y):
    if num(y):
        return float(y)
    if isinstance(y, Static):
        value = rx.static_value(y)
        if hasattr(value, "numel") and value.numel() == 1:
            return float(value.reshape(()))
    return None


@pattern("mul", doc="x*rrms -> normed; normed*w -> rms_norm; x*cos, rot*sin -> rope; scores*c; a*b; x*c")
def mul(rx, node, a):
    x, y = a["self"], a["other"]
    for p, q in ((x, y), (y, x)):
        if isinstance(p, Partial) and p.kind == "rrms" and isinstance(q, Act) and q == p.x:
            return p.but("normed")                                           # x * rsqrt(..)
        if isinstance(p, Partial) and p.kind == "normed" and isinstance(q, ParamRef):
            return rx.emit_rms_norm(node, p, q)                              # normed * w
        if isinstance(q, Static) and (hs := heads_slice(p)) is not None:
            table = rx.rope_table(q, hs.stop - hs.start)
            if table is not None and table.kind == "cos":
                return hs.but("cos_term", table=table)                       # x * cos
        if isinstance(p, Partial) and p.kind == "rot_half" and isinstance(q, Static):
            table = rx.rope_table(q, p.stop - p.start)
            if table is not None and table.kind == "sin":
                return p.but("sin_term", table=table)                        # rotate_half(x) * sin
        if isinstance(p, Partial) and p.kind == "scores" and (c := _scalar(rx, q)) is not None:
            if p.get_div is not None:
                return None
            return p.but(scale=p.scale * c)                                  # scores * scaling
        if isinstance(p, Partial) and p.kind == "scores_tanh" and num(q) and q == p.get_div:
            return p.but("scores", softcap=float(q), get_div=None)           # cap * tanh(s / cap)
    if isinstance(x, Act) and isinstance(y, Act) and x.axes == y.axes and x.rep == y.rep == 1:
        return Act(rx.emit(node, "mul", [x.ref, y.ref]), x.axes)
    for p, q in ((x, y), (y, x)):
        if isinstance(p, Act) and (c := _scalar(rx, q)) is not None:
            return Act(rx.emit(node, "scale", [p.ref], factor=c), p.axes, p.rep)
    return None


@pattern("div", doc="scores / cap -> softcap step; x / c -> scale(1/c)")
def div(rx, node, a):
    x, y = a["self"], a["other"]
    if isinstance(x, Partial) and x.kind == "scores" and num(y):
        return x.but(get_div=float(y))
    if isinstance(x, Act) and num(y):
        return Act(rx.emit(node, "scale", [x.ref], factor=1.0 / float(y)), x.axes, x.rep)
    return None


@pattern("neg", doc="-x[..., h:] -> rotate-half step")
def neg(rx, node, a):
    x = a["self"]
    if isinstance(x, Partial) and x.kind == "hslice":
        return x.but("neg_hslice")
    return None


@pattern("cat", doc="cat(-x2, x1) -> rot_half(x); cat(rope(x[..:r]), x[r:]) -> partial rotary")
def cat(rx, node, a):
    parts, dim = a["tensors"], a["dim"]
    if len(parts) != 2 or not all(isinstance(p, Partial) for p in parts):
        return None
    p, q = parts
    if not last_dim(p.base, dim) or p.base != q.base:
        return None
    if p.kind == "neg_hslice" and q.kind == "hslice" and q.stop == p.start and \
            p.stop - p.start == q.stop - q.start:
        return Partial("rot_half", {"base": p.base, "start": q.start, "stop": p.stop})
    if p.kind == "roped" and q.kind == "hslice" and p.start == 0 and p.stop == q.start and \
            q.stop == p.base.head_dim:
        return rx.finish_rope(node, p)
    return None


@pattern("tanh", doc="tanh(scores / cap) -> softcap step; tanh(x) -> tanh")
def tanh(rx, node, a):
    x = a["self"]
    if isinstance(x, Partial) and x.kind == "scores" and x.get_div is not None:
        return x.but("scores_tanh")
    if isinstance(x, Act):
        return Act(rx.emit(node, "tanh", [x.ref]), x.axes, x.rep)
    return None


@pattern("silu", "relu", "gelu", doc="activation functions -> silu / relu / gelu / gelu_tanh")
def activation(rx, node, a):
    x = a["self"]
    if not isinstance(x, Act):
        return None
    op = rx.op_name(node)
    if op == "gelu" and a.get("approximate", "none") == "tanh":
        op = "gelu_tanh"
    return Act(rx.emit(node, op, [x.ref]), x.axes, x.rep)


# ---- attention ---------------------------------------------------------------------------------

@pattern("scaled_dot_product_attention", doc="sdpa(q, k, v, mask) -> attention (causal/window from the mask)")
def sdpa(rx, node, a):
    q, k, v, mask = a["query"], a["key"], a["value"], a.get("attn_mask")
    if not all(isinstance(t, Act) for t in (q, k, v)) or a.get("dropout_p", 0.0):
        return None
    scale = a.get("scale")
    scale = 1.0 / math.sqrt(q.head_dim) if scale is None else scale
    return rx.emit_attention(node, q, k, v, mask, bool(a.get("is_causal")), scale, None)


@pattern("matmul", doc="q @ k^T -> scores; softmax(scores) @ v -> attention (eager path)")
def matmul(rx, node, a):
    x, y = a["self"], a["other"]
    if isinstance(x, Act) and isinstance(y, Act) and [ax.kind for ax in y.axes] == ["1", "F", "F", "T"]:
        return Partial("scores", {"q": x, "k": y.with_axes((y.axes[0], y.axes[1], y.axes[3], y.axes[2])),
                                  "scale": 1.0, "softcap": None, "mask": None, "get_div": None})
    if isinstance(x, Partial) and x.kind == "probs" and isinstance(y, Act):
        return rx.emit_attention(node, x.q, x.k, y, x.mask, x.mask is None, x.scale, x.softcap)
    return None


@pattern("softmax", "_softmax", doc="softmax(scores, -1) -> probs")
def softmax(rx, node, a):
    x = a["self"]
    if isinstance(x, Partial) and x.kind == "scores" and a["dim"] in (-1, 3) and x.get_div is None:
        return x.but("probs")
    return None


@pattern("layer_norm", doc="layer_norm(x, [F], w, b, eps) -> layer_norm")
def layer_norm(rx, node, a):
    x, w, b = a["input"], a.get("weight"), a.get("bias")
    if not (isinstance(x, Act) and isinstance(w, ParamRef) and isinstance(b, ParamRef)):
        return None
    if w.plus or list(a["normalized_shape"]) != [x.axes[-1].size]:
        return None
    return Act(rx.emit(node, "layer_norm", [x.ref, rx.param(w), rx.param(b)], eps=float(a["eps"])), x.axes, x.rep)
