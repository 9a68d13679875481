"""Quantized and sparse weight formats: the storage layouts, their dequantization, and the matmuls.

These functions are the math of llmc's quantized ops (``linear_bf16``, ``linear_int8``, ``linear_int4``,
``linear_fp8``, ``linear_w8a8``, ``linear_24``): the IR references in ``llmc/ir/ops_quant.py`` call
them, the quantize/prune passes produce the layouts, and the torch backend copies them into every
generated model.py. Runtime code: imports torch only.

Layouts (weights are ``[out, in]`` like ``F.linear``; a GPU kernel reads exactly these bytes):

- **bf16**: ``qweight`` bfloat16 ``[out, in]``, the weight rounded to nearest (half float32's bytes).
- **int8** (weight-only, symmetric, per output channel): ``qweight`` int8 ``[out, in]``, ``scale``
  float32 ``[out]``; ``w = qweight * scale[:, None]``.
- **int4** (weight-only, asymmetric, group-wise along ``in``): ``qweight`` uint8 ``[out, in // 2]``,
  byte ``j`` of row ``o`` holds element ``2j`` in its low nibble and ``2j + 1`` in its high nibble;
  ``scales`` float32 and ``zeros`` uint8 (0..15), both ``[out, in // group_size]``;
  ``w[o, i] = (q[o, i] - zeros[o, i // g]) * scales[o, i // g]``.
- **fp8** (weight-only, e4m3fn, per output channel): ``qweight`` float8_e4m3fn ``[out, in]``,
  ``scale`` float32 ``[out]``; ``w = qweight.float() * scale[:, None]``.
- **w8a8**: int8 weights as above, plus ``smooth`` float32 ``[in]`` (SmoothQuant: the activations are
  divided by it and the weight columns were multiplied by it before quantization) and dynamic
  per-token symmetric int8 activations; the product is accumulated in int32.
- **2:4 sparse**: of every 4 consecutive weights of a row at most 2 are nonzero; ``values``
  ``[out, in // 2]`` keeps the 2 kept weights of each group in order, ``meta`` uint8 ``[out, in // 8]``
  their positions in the group (2 bits each): byte ``j`` describes groups ``2j`` (low nibble) and
  ``2j + 1`` (high nibble); within a nibble bits 0-1 are the first kept index, bits 2-3 the second.
"""

import torch
import torch.nn.functional as F

from .functional import linear_cpu

FP8_MAX = 448.0  # largest finite float8_e4m3fn


# ---- bf16 ----------------------------------------------------------------------------------------

def linear_bf16(x, qweight, bias=None):
    """``x`` in bfloat16 times the bfloat16 weight (float32 accumulation, bfloat16 result), in x's
    dtype, ``+ bias``."""
    y = F.linear(x.to(torch.bfloat16), qweight).to(x.dtype)
    return y if bias is None else y + bias


# ---- int8 ----------------------------------------------------------------------------------------

def dequantize_int8(qweight, scale):
    """int8 ``[out, in]`` x per-row float32 scale -> float32 weight."""
    return qweight.float() * scale.float()[:, None]


def linear_int8(x, qweight, scale, bias=None):
    """``x @ dequantize_int8(qweight, scale).T + bias`` (the reference, in x's dtype)."""
    return F.linear(x, dequantize_int8(qweight, scale).to(x.dtype), bias)


# ---- int4 ----------------------------------------------------------------------------------------

def pack_int4(q):
    """uint8 values 0..15 ``[out, in]`` -> ``[out, in // 2]``: even column low nibble, odd high."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed):
    """The inverse of ``pack_int4``: ``[out, in // 2]`` -> uint8 ``[out, in]``."""
    out = torch.empty(packed.shape[0], packed.shape[1] * 2, dtype=torch.uint8, device=packed.device)
    out[:, 0::2] = packed & 15
    out[:, 1::2] = packed >> 4
    return out


def dequantize_int4(qweight, scales, zeros, group_size):
    """Packed int4 with per-group scales and integer zero points -> float32 ``[out, in]``."""
    q = unpack_int4(qweight).float()
    s = scales.float().repeat_interleave(group_size, dim=1)
    z = zeros.float().repeat_interleave(group_size, dim=1)
    return (q - z) * s


def linear_int4(x, qweight, scales, zeros, bias=None, group_size=128):
    return F.linear(x, dequantize_int4(qweight, scales, zeros, group_size).to(x.dtype), bias)


# ---- fp8 -----------------------------------------------------------------------------------------

def dequantize_fp8(qweight, scale):
    return qweight.float() * scale.float()[:, None]


def linear_fp8(x, qweight, scale, bias=None):
    return F.linear(x, dequantize_fp8(qweight, scale).to(x.dtype), bias)


# ---- w8a8 ----------------------------------------------------------------------------------------

def quantize_per_token_int8(x):
    """Dynamic symmetric int8 per row: (int8 ``[T, in]``, float32 scale ``[T]``)."""
    scale = x.float().abs().amax(dim=1).clamp(min=1e-8) / 127.0
    q = torch.round(x.float() / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def linear_w8a8(x, qweight, scale, smooth, bias=None):
    """int8 x int8 -> int32 matmul of smoothed per-token-quantized activations and int8 weights."""
    xq, xscale = quantize_per_token_int8(x.float() / smooth.float())
    acc = torch.matmul(xq.to(torch.int32), qweight.to(torch.int32).t())  # exact integer accumulation
    y = acc.float() * xscale[:, None] * scale.float()[None, :]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


# ---- 2:4 sparse ----------------------------------------------------------------------------------

def compress_24(weight):
    """A 2:4-sparse ``[out, in]`` weight -> (values ``[out, in // 2]``, meta uint8 ``[out, in // 8]``).

    Each group of 4 keeps its 2 largest-magnitude entries (the pruned ones are already zero, so this
    keeps the survivors; ties keep the earlier index), in index order."""
    out, n = weight.shape
    groups = weight.reshape(out, n // 4, 4)
    idx = groups.abs().topk(2, dim=-1, sorted=False).indices.sort(dim=-1).values  # [out, G, 2]
    values = groups.gather(-1, idx).reshape(out, n // 2)
    nibble = (idx[..., 0] | (idx[..., 1] << 2)).to(torch.uint8)                  # [out, G]
    meta = nibble[:, 0::2] | (nibble[:, 1::2] << 4)
    return values.contiguous(), meta.contiguous()


def decompress_24(values, meta):
    """The inverse of ``compress_24``: the dense ``[out, in]`` weight with zeros filled in."""
    out, half = values.shape
    nibble = torch.empty(out, meta.shape[1] * 2, dtype=torch.int64, device=meta.device)
    nibble[:, 0::2] = (meta & 15).long()
    nibble[:, 1::2] = (meta >> 4).long()
    idx = torch.stack((nibble & 3, nibble >> 2), dim=-1)                        # [out, G, 2]
    dense = torch.zeros(out, half // 2, 4, dtype=values.dtype, device=values.device)
    dense.scatter_(-1, idx, values.reshape(out, half // 2, 2))
    return dense.reshape(out, half * 2)


def linear_24(x, values, meta, bias=None):
    return F.linear(x, decompress_24(values, meta).to(x.dtype), bias)


# ---- CPU fast paths (chosen by the torch backend for device cpu; measured in bench/RESULTS.md) ----

def has_bf16_dot():
    """Whether this CPU multiplies bfloat16 natively (AVX-512 BF16 or AMX); elsewhere a bfloat16
    GEMM is emulated and runs slower than float32."""
    check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return bool(check and check()) or bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def prepare_bf16_cpu(qweight):
    """The CPU layout of a bf16 linear's weight: itself where the CPU has bf16 dot products, else
    expanded to float32 once at load (then the linear is a float32 GEMM, exact in the weight)."""
    return qweight if has_bf16_dot() else qweight.float()


def linear_bf16_cpu(x, weight, bias=None):
    """``linear_bf16`` on the CPU target. bfloat16 weights: one row as ``W @ x`` (``torch.mv``), 2-64
    rows as ``(W @ xᵀ)ᵀ``, more as ``F.linear``: on a Xeon with AMX, 12 layers of a 150M Llama took
    12.1 ms by ``mv`` against 18.1 ms by ``F.linear`` at 1 row (the GEMM's one-row path reads the
    bf16 weights at two thirds of the speed), 12.3 vs 18.6 ms transposed at 16 rows, and ``F.linear``
    wins from ~65 rows (70 vs 149 ms at 512; bench/RESULTS.md). float32 weights (no bf16 hardware,
    ``prepare_bf16_cpu``): the float32 linear."""
    if weight.dtype != torch.bfloat16:
        return linear_cpu(x, weight, bias)
    xb = x.to(torch.bfloat16)
    rows = len(x) if x.dim() == 2 else 0
    if rows == 1:
        y = torch.mv(weight, xb[0])[None]
    elif 2 <= rows <= 64:
        y = torch.mm(weight, xb.t()).t()
    else:
        y = F.linear(xb, weight)
    y = y.to(x.dtype)
    return y if bias is None else y + bias


def linear_int8_cpu(x, qweight, scale, bias=None):
    """ATen's weight-only int8 GEMM; its fast path wants bfloat16 activations and scales."""
    y = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), qweight, scale.to(torch.bfloat16)).to(x.dtype)
    return y if bias is None else y + bias


def linear_w8a8_cpu(x, qweight, scale, smooth, bias=None):
    """W8A8 through the weight-only int8 kernel: the int8 activation values are exact in bfloat16
    (|q| <= 127 needs 7 bits), so the kernel multiplies the same integers; the per-token scale is
    applied after."""
    xq, xscale = quantize_per_token_int8(x.float() / smooth.float())
    y = torch.ops.aten._weight_int8pack_mm(xq.to(torch.bfloat16), qweight, scale.to(torch.bfloat16))
    y = (y.float() * xscale[:, None]).to(x.dtype)
    return y if bias is None else y + bias


def prepare_int4_cpu(qweight, scales, zeros, group_size):
    """Our int4 layout -> ATen's CPU int4 layout (machine-specific, so done at load time): the
    packed weight and ``scales_and_zeros`` ``[in // g, out, 2]`` bfloat16 for ``w = (q - 8) * s + z``
    (so ``z = (8 - zero) * s``)."""
    q = unpack_int4(qweight).to(torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
    s = scales.float()
    z = (8.0 - zeros.float()) * s
    return packed, torch.stack((s.t(), z.t()), dim=-1).to(torch.bfloat16).contiguous()


def linear_int4_cpu(x, packed, scales_and_zeros, bias=None, group_size=128):
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), packed, group_size,
                                                   scales_and_zeros).to(x.dtype)
    return y if bias is None else y + bias
