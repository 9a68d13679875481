"""Fused ops made by the fuse pass: each computes exactly what the unfused ops it replaces compute.

- ``add_rms_norm(x, residual, weight)``: a residual add and the RMSNorm of its sum. IR nodes have
  one result, and both are needed (the sum is the next residual), so the result is packed
  ``[T, 2H]`` = normed | sum, read by two ``slice`` nodes (free column views in torch; a GPU kernel
  writes both halves in one pass over the row). Packing beats two ops sharing hidden state (the
  IR would lie about data flow) and beats recomputing the sum (a second read of both inputs).
- ``act_mul(gate, up)``: ``act(gate) * up`` of a gated MLP (SwiGLU, GeGLU), one pass over the
  intermediate instead of two.
- ``act_mul_packed(gate_up)``: the same on a fused gate|up projection ``[T, 2I]`` (vLLM's
  ``silu_and_mul``), so the gate_up fusion needs no slice nodes at all.
"""

from __future__ import annotations

from llmc.errors import IRError
from llmc.ir.opdef import register_op
from llmc.ir.types import TensorType
from llmc.runtime import functional

GATE_ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")  # the unary ops act_mul folds in


def _features(t: TensorType, op: str) -> int:
    if len(t.shape) != 2 or not isinstance(t.shape[1], int):
        raise IRError(f"{op}: expected a token-flattened [T, features] tensor, got {t}")
    return t.shape[1]


def _check_act(attrs, op: str) -> None:
    if attrs["act"] not in GATE_ACTIVATIONS:
        raise IRError(f"{op}: act {attrs['act']!r} is not one of {', '.join(GATE_ACTIVATIONS)}")


@register_op("add_rms_norm", ("x", "residual", "weight"), {"eps": 1e-6, "offset": 0.0})
class AddRMSNorm:
    """``s = x + residual``; returns ``[T, 2H]``: ``rms_norm(s)`` in ``[:, :H]``, ``s`` in ``[:, H:]``.

    Whole-row norms only (``weight`` has H values); ``eps`` and ``offset`` as in ``rms_norm``.
    """

    @staticmethod
    def infer(types, attrs):
        x, r, w = types
        h = _features(x, "add_rms_norm")
        if r != x or w.shape != (h,):
            raise IRError(f"add_rms_norm: x {x}, residual {r} and weight {w} do not match")
        return TensorType((x.shape[0], 2 * h), x.dtype)

    @staticmethod
    def reference(ctx, inputs, attrs):
        return functional.add_rms_norm(*inputs, eps=attrs["eps"], offset=attrs["offset"])


@register_op("act_mul", ("gate", "up"), {"act": "silu"})
class ActMul:
    """``act(gate) * up`` for ``act`` in silu, gelu (erf), gelu_tanh, relu."""

    @staticmethod
    def infer(types, attrs):
        _check_act(attrs, "act_mul")
        gate, up = types
        _features(gate, "act_mul")
        if gate != up:
            raise IRError(f"act_mul: gate {gate} and up {up} do not match")
        return gate

    @staticmethod
    def reference(ctx, inputs, attrs):
        return functional.act_mul(*inputs, act=attrs["act"])


@register_op("act_mul_packed", ("gate_up",), {"act": "silu"})
class ActMulPacked:
    """``act(x[:, :I]) * x[:, I:]`` of a fused gate|up projection ``x`` [T, 2I] -> [T, I]."""

    @staticmethod
    def infer(types, attrs):
        _check_act(attrs, "act_mul_packed")
        x = types[0]
        if _features(x, "act_mul_packed") % 2:
            raise IRError(f"act_mul_packed: {x} does not split into two halves")
        return TensorType((x.shape[0], x.shape[1] // 2), x.dtype)

    @staticmethod
    def reference(ctx, inputs, attrs):
        return functional.act_mul_packed(inputs[0], act=attrs["act"])
