"""The built-in LLM-level ops, in token-flattened layout ``[T, features]``, with torch references.

References compute in float32 where HF does (norms, softmax) and are the oracle for every pass and
kernel: keep them plain and obviously right rather than fast. The multi-step ones live in
``llmc/runtime/functional.py`` so the generated packages run the very same code.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from llmc.errors import IRError
from llmc.ir.opdef import register_op
from llmc.ir.types import DTYPES, TensorType
from llmc.runtime import functional, paged_attention


def _same(types: list[TensorType], attrs: dict[str, Any]) -> TensorType:
    first = types[0]
    for other in types[1:]:
        if other.shape != first.shape:
            raise IRError(f"shape mismatch: {first} vs {other}")
    return first


def _features(t: TensorType) -> int:
    if len(t.shape) != 2 or not isinstance(t.shape[1], int):
        raise IRError(f"expected a token-flattened [T, features] tensor, got {t}")
    return t.shape[1]


# ---- embeddings and linear algebra ---------------------------------------------------------------

@register_op("embedding", ("ids", "weight"))
class Embedding:
    """Gather rows of ``weight`` [V, H] for token ids [T] -> [T, H]."""

    @staticmethod
    def infer(types, attrs):
        return TensorType((types[0].shape[0], types[1].shape[1]), types[1].dtype)

    @staticmethod
    def reference(ctx, inputs, attrs):
        return F.embedding(inputs[0], inputs[1])


@register_op("linear", ("x", "weight", "bias?"))
class Linear:
    """``x @ weight.T + bias`` with weight in [out, in] layout."""

    @staticmethod
    def infer(types, attrs):
        x, w = types[0], types[1]
        if _features(x) != w.shape[1]:
            raise IRError(f"linear: input has {x.shape[1]} features but weight is {w}")
        if len(types) > 2 and types[2].shape != (w.shape[0],):
            raise IRError(f"linear: bias {types[2]} does not match weight {w}")
        return TensorType((x.shape[0], w.shape[0]), x.dtype)

    @staticmethod
    def reference(ctx, inputs, attrs):
        return F.linear(*inputs)


# ---- normalization -------------------------------------------------------------------------------

@register_op("rms_norm", ("x", "weight"), {"eps": 1e-6, "offset": 0.0})
class RMSNorm:
    """RMSNorm in float32 over groups of ``weight.numel()`` features: ``x/rms(x) * (offset + w)``.

    The group is the whole row for layer norms and one head for per-head q/k norms (Qwen3);
    ``offset=1`` is Gemma's ``(1 + w)`` form.
    """

    @staticmethod
    def infer(types, attrs):
        x, w = types
        if _features(x) % w.shape[0]:
            raise IRError(f"rms_norm: {x} is not a multiple of weight {w}")
        return x

    @staticmethod
    def reference(ctx, inputs, attrs):
        return functional.rms_norm(*inputs, eps=attrs["eps"], offset=attrs["offset"])


@register_op("layer_norm", ("x", "weight", "bias"), {"eps": 1e-5})
class LayerNorm:
    """LayerNorm over the feature dim."""

    @staticmethod
    def infer(types, attrs):
        return types[0]

    @staticmethod
    def reference(ctx, inputs, attrs):
        x, w, b = inputs
        return F.layer_norm(x, (x.shape[-1],), w, b, attrs["eps"])


# ---- positions -----------------------------------------------------------------------------------

@register_op("rope", ("x", "positions", "inv_freq"),
             {"head_dim": 0, "rotary_dim": 0, "interleaved": False, "scaling": 1.0})
class Rope:
    """Rotary embedding on each head's first ``rotary_dim`` features, angles ``pos * inv_freq``.

    ``interleaved`` rotates pairs (2i, 2i+1) (GPT-J style) instead of halves (rotate-half, Llama);
    ``scaling`` multiplies cos/sin (YaRN-style attention factor). Rope scaling variants that change
    the frequencies are already folded into ``inv_freq``.
    """

    @staticmethod
    def infer(types, attrs):
        x = types[0]
        hd, rd = attrs["head_dim"], attrs["rotary_dim"]
        if hd <= 0 or _features(x) % hd or not 0 < rd <= hd or rd % 2:
            raise IRError(f"rope: bad head_dim={hd} rotary_dim={rd} for {x}")
        if types[2].shape != (rd // 2,):
            raise IRError(f"rope: inv_freq {types[2]} does not match rotary_dim={rd}")
        return x

    @staticmethod
    def reference(ctx, inputs, attrs):
        return functional.rope(*inputs, **attrs)


# ---- attention -----------------------------------------------------------------------------------

KV_DTYPES = ("int8", "float8_e4m3fn")  # storage of a quantized KV cache (one byte per element)


def _check_kv_quantization(attrs: dict[str, Any]) -> None:
    kv_dtype, kvh = attrs["kv_dtype"], attrs["num_kv_heads"]
    if kv_dtype is None:
        if attrs["k_scale"] is not None or attrs["v_scale"] is not None:
            raise IRError("attention: k_scale/v_scale are set but kv_dtype is not")
        return
    if kv_dtype not in KV_DTYPES:
        raise IRError(f"attention: kv_dtype {kv_dtype!r} is not one of {', '.join(KV_DTYPES)}")
    for name in ("k_scale", "v_scale"):
        scale = attrs[name]
        if not (isinstance(scale, tuple) and len(scale) == kvh
                and all(isinstance(s, float) and s > 0 for s in scale)):
            raise IRError(f"attention: {name} must be a tuple of {kvh} positive floats (one per KV head), "
                          f"got {scale!r}")


def _check_rope(types: list[TensorType], attrs: dict[str, Any]) -> None:
    rd, d = attrs["rope_dim"], attrs["head_dim"]
    if not rd:
        if len(types) > 4:
            raise IRError("attention: an inv_freq input is given but rope_dim is 0")
        return
    if not 0 < rd <= d or rd % 2 or len(types) < 5 or types[4].shape != (rd // 2,):
        raise IRError(f"attention: rope_dim={rd} needs an even rope_dim <= head_dim={d} and an inv_freq "
                      f"of {rd // 2} values, got {types[4] if len(types) > 4 else 'none'}")


@register_op("attention", ("q", "k", "v", "positions", "inv_freq?"),
             {"layer": 0, "num_heads": 0, "num_kv_heads": 0, "head_dim": 0, "scale": 0.0,
              "causal": True, "sliding_window": None, "softcap": None,
              "kv_dtype": None, "k_scale": None, "v_scale": None,
              "rope_dim": 0, "rope_interleaved": False, "rope_scaling": 1.0}, stateful=True)
class Attention:
    """Causal multi-head attention with GQA, over this step's tokens and the layer's KV cache.

    Writes this step's k/v into the cache at ``positions``, then each query at position p attends to
    cached keys at positions in ``(p - sliding_window, p]``; ``softcap`` applies
    ``softcap * tanh(scores / softcap)`` before the softmax (Gemma 2). ``kv_dtype`` ("int8" or
    "float8_e4m3fn", set by the quantize_kv pass) stores k/v quantized with the static per-KV-head
    scales ``k_scale`` / ``v_scale`` (tuples of floats), read back dequantized. ``rope_dim`` > 0
    (set by the fuse pass) applies ``rope`` to q and k first, with ``inv_freq`` (the 5th input),
    ``rotary_dim=rope_dim``, ``interleaved=rope_interleaved``, ``scaling=rope_scaling``; 0 means none.
    """

    @staticmethod
    def infer(types, attrs):
        _check_kv_quantization(attrs)
        _check_rope(types, attrs)
        q, k, v = types[:3]
        h, kvh, d = attrs["num_heads"], attrs["num_kv_heads"], attrs["head_dim"]
        if h <= 0 or kvh <= 0 or h % kvh:
            raise IRError(f"attention: num_heads={h} must be a positive multiple of num_kv_heads={kvh}")
        if not attrs["scale"] > 0:  # the default 0.0 would silently give uniform attention
            raise IRError(f"attention: scale must be set and positive, got {attrs['scale']}")
        if _features(q) != h * d or _features(k) != kvh * d or _features(v) % kvh:
            raise IRError(f"attention: q {q}, k {k}, v {v} do not match heads {h}/{kvh} x {d}")
        return TensorType((q.shape[0], h * (_features(v) // kvh)), q.dtype)

    @staticmethod
    def reference(ctx, inputs, attrs):
        return functional.attention(*inputs[:4], ctx.kv, inv_freq=inputs[4] if len(inputs) > 4 else None, **attrs)


@register_op("paged_attention", ("q", "k", "v", "positions", "inv_freq?"), dict(Attention.attrs), stateful=True)
class PagedAttention:
    """``attention`` over the paged KV cache (after the attention_lowering pass): the step's tokens
    of many sequences, k/v written to their slots, decodes batched, prefill chunks per sequence.

    Same math and attrs as ``attention``; ``ctx.kv`` is the step's paged metadata (block tables,
    slot mapping, sequence lengths) instead of a contiguous per-sequence cache.
    """

    infer = staticmethod(Attention.infer)

    @staticmethod
    def reference(ctx, inputs, attrs):
        return paged_attention.paged_attention(*inputs[:4], ctx.kv, inv_freq=inputs[4] if len(inputs) > 4 else None,
                                               **attrs)


@register_op("select_rows", ("x",), {}, stateful=True)
class SelectRows:
    """The rows of ``x`` whose next-token logits this step samples (``ctx.kv.logits_indices``, the
    last token of each sequence that finished its known tokens); every row when the step does not
    say. Placed before the LM head, it keeps prefill chunks from computing logits nobody reads.
    Stateful: it reads the step's batch layout, like attention."""

    @staticmethod
    def infer(types, attrs):
        x = types[0]
        if len(x.shape) != 2:
            raise IRError(f"select_rows: expected [T, features], got {x}")
        return TensorType(("S", x.shape[1]), x.dtype)

    @staticmethod
    def reference(ctx, inputs, attrs):
        return paged_attention.select_rows(inputs[0], ctx.kv)


# ---- elementwise ---------------------------------------------------------------------------------

def _unary(name: str, fn, doc: str, attrs: dict[str, Any] | None = None):
    cls = type(name, (), {
        "__doc__": doc,
        "infer": staticmethod(lambda types, attrs: types[0]),
        "reference": staticmethod(lambda ctx, inputs, attrs: fn(inputs[0], attrs)),
    })
    return register_op(name, ("x",), attrs)(cls)


def _binary(name: str, fn, doc: str):
    cls = type(name, (), {
        "__doc__": doc,
        "infer": staticmethod(_same),
        "reference": staticmethod(lambda ctx, inputs, attrs: fn(inputs[0], inputs[1])),
    })
    return register_op(name, ("a", "b"))(cls)


_binary("add", torch.add, "Elementwise a + b (residual connections).")
_binary("mul", torch.mul, "Elementwise a * b (gated MLPs).")
_unary("silu", lambda x, a: F.silu(x), "SiLU / swish.")
_unary("gelu", lambda x, a: F.gelu(x), "GELU, exact erf form.")
_unary("gelu_tanh", lambda x, a: F.gelu(x, approximate="tanh"), "GELU, tanh approximation (gelu_new).")
_unary("relu", lambda x, a: F.relu(x), "ReLU.")
_unary("tanh", lambda x, a: torch.tanh(x), "tanh (logit soft-capping).")
_unary("scale", lambda x, a: x * a["factor"], "Multiply by a constant (Gemma's sqrt(hidden) embed scale).",
       {"factor": 1.0})


@register_op("slice", ("x",), {"start": 0, "stop": 0})
class Slice:
    """Features ``[start, stop)`` of every token (split of a fused qkv or gate_up projection)."""

    @staticmethod
    def infer(types, attrs):
        x = types[0]
        start, stop = attrs["start"], attrs["stop"]
        if not 0 <= start < stop <= _features(x):
            raise IRError(f"slice: [{start}, {stop}) out of range for {x}")
        return TensorType((x.shape[0], stop - start), x.dtype)

    @staticmethod
    def reference(ctx, inputs, attrs):
        return inputs[0][:, attrs["start"]: attrs["stop"]]


@register_op("cast", ("x",), {"dtype": "float32"})
class Cast:
    """Convert to another dtype."""

    @staticmethod
    def infer(types, attrs):
        return TensorType(types[0].shape, attrs["dtype"])

    @staticmethod
    def reference(ctx, inputs, attrs):
        return inputs[0].to(DTYPES[attrs["dtype"]])

