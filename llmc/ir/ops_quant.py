"""Quantized and sparse linear ops: ``linear`` with its weight stored in a compressed layout.

Each takes the activation ``x`` [T, in] first and the weight's storage tensors after it (layouts in
``llmc/runtime/quant.py``), and returns what ``linear`` on the dequantized weight returns. The
quantize and prune passes produce them; ``x`` keeps its dtype.
"""

from __future__ import annotations

from llmc.errors import IRError
from llmc.ir.opdef import register_op
from llmc.ir.types import TensorType
from llmc.runtime import quant


def _check(name: str, x: TensorType, out: int, in_features: int, storage: dict[str, tuple[TensorType, tuple, str]],
           bias: TensorType | None) -> TensorType:
    """Shared checks: x is [T, in]; each storage tensor has its expected shape and dtype."""
    if len(x.shape) != 2 or x.shape[1] != in_features:
        raise IRError(f"{name}: input {x} does not have {in_features} features")
    for what, (t, shape, dtype) in storage.items():
        if t.shape != shape or t.dtype != dtype:
            raise IRError(f"{name}: {what} is {t}, expected {dtype}[{', '.join(map(str, shape))}]")
    if bias is not None and bias.shape != (out,):
        raise IRError(f"{name}: bias {bias} does not match {out} output features")
    return TensorType((x.shape[0], out), x.dtype)



@register_op("linear_bf16", ("x", "qweight", "bias?"))
class LinearBf16:
    """bfloat16 weight and GEMM: ``x`` rounded to bfloat16, products accumulated in float32, the
    result rounded to bfloat16 and returned in ``x``'s dtype, then ``+ bias``. Half float32's bytes,
    and the CPU's native bf16 dot products (AVX-512 BF16, AMX) where it has them."""

    @staticmethod
    def infer(types, attrs):
        x, q = types[:2]
        out, n = q.shape
        return _check("linear_bf16", x, out, n, {"qweight": (q, (out, n), "bfloat16")},
                      types[2] if len(types) > 2 else None)

    @staticmethod
    def reference(ctx, inputs, attrs):
        return quant.linear_bf16(*inputs)


@register_op("linear_int8", ("x", "qweight", "scale", "bias?"))
class LinearInt8:
    """Weight-only int8, symmetric per output channel: ``x @ (q * scale[:, None]).T + bias``."""

    @staticmethod
    def infer(types, attrs):
        x, q, s = types[:3]
        out, n = q.shape
        return _check("linear_int8", x, out, n, {"qweight": (q, (out, n), "int8"),
                                                  "scale": (s, (out,), "float32")}, types[3] if len(types) > 3 else None)

    @staticmethod
    def reference(ctx, inputs, attrs):
        return quant.linear_int8(*inputs)


@register_op("linear_int4", ("x", "qweight", "scales", "zeros", "bias?"), {"group_size": 128})
class LinearInt4:
    """Weight-only int4, asymmetric group-wise: ``w = (q - zero) * scale`` per ``group_size`` inputs;
    two values per byte (``quant.pack_int4``)."""

    @staticmethod
    def infer(types, attrs):
        x, q, s, z = types[:4]
        g = attrs["group_size"]
        out, n = q.shape[0], q.shape[1] * 2
        if g <= 0 or n % g:
            raise IRError(f"linear_int4: group_size {g} does not divide {n} input features")
        return _check("linear_int4", x, out, n, {"qweight": (q, (out, n // 2), "uint8"),
                                                  "scales": (s, (out, n // g), "float32"),
                                                  "zeros": (z, (out, n // g), "uint8")},
                      types[4] if len(types) > 4 else None)

    @staticmethod
    def reference(ctx, inputs, attrs):
        return quant.linear_int4(*inputs[:4], inputs[4] if len(inputs) > 4 else None, group_size=attrs["group_size"])


@register_op("linear_fp8", ("x", "qweight", "scale", "bias?"))
class LinearFp8:
    """Weight-only float8 e4m3fn with a float32 scale per output channel."""

    @staticmethod
    def infer(types, attrs):
        x, q, s = types[:3]
        out, n = q.shape
        return _check("linear_fp8", x, out, n, {"qweight": (q, (out, n), "float8_e4m3fn"),
                                                 "scale": (s, (out,), "float32")}, types[3] if len(types) > 3 else None)

    @staticmethod
    def reference(ctx, inputs, attrs):
        return quant.linear_fp8(*inputs)


@register_op("linear_w8a8", ("x", "qweight", "scale", "smooth", "bias?"))
class LinearW8A8:
    """int8 weights (per channel) x dynamic per-token int8 activations of ``x / smooth``
    (SmoothQuant), accumulated in int32."""

    @staticmethod
    def infer(types, attrs):
        x, q, s, m = types[:4]
        out, n = q.shape
        return _check("linear_w8a8", x, out, n, {"qweight": (q, (out, n), "int8"),
                                                  "scale": (s, (out,), "float32"),
                                                  "smooth": (m, (n,), "float32")}, types[4] if len(types) > 4 else None)

    @staticmethod
    def reference(ctx, inputs, attrs):
        return quant.linear_w8a8(*inputs)


@register_op("linear_24", ("x", "values", "meta", "bias?"))
class Linear24:
    """2:4 semi-structured sparse weight stored compressed: the 2 kept values of every 4 inputs and
    their 2-bit positions (``quant.compress_24``)."""

    @staticmethod
    def infer(types, attrs):
        x, v, m = types[:3]
        out, n = v.shape[0], v.shape[1] * 2
        if n % 8:
            raise IRError(f"linear_24: {n} input features is not a multiple of 8")
        return _check("linear_24", x, out, n, {"values": (v, (out, n // 2), x.dtype),
                                                "meta": (m, (out, n // 8), "uint8")},
                      types[3] if len(types) > 3 else None)

    @staticmethod
    def reference(ctx, inputs, attrs):
        return quant.linear_24(*inputs)
