"""The math of the ops whose reference is more than one torch call: RMSNorm, rotary, attention.

One implementation serves both sides: llmc's reference interpreter calls these functions, and the torch
backend copies their source into every generated model.py (so a package needs no llmc). Plain,
float32 where HF computes in float32, and obviously right rather than fast.
"""

import math

import torch
import torch.nn.functional as F


def linear_cpu(x, weight, bias=None):
    """``F.linear`` for the CPU target: with 2-64 rows computed as ``(W @ xᵀ)ᵀ``, because MKL's GEMM
    for few rows by many output features runs 1.2-3x faster transposed (decode batches through a
    150M model's layer shapes, float32, on the dev machines' AMD EPYC); from ~128 rows (prefill) the
    plain GEMM is as fast or faster (1.5x at 512 rows by 6144 outputs: the transposed result's copy
    back costs more than it saves). Past 8 rows the rows are padded with zeros to a multiple of 8:
    MKL takes up to 2x longer for 13-15 or 31 rows than for 16 or 32 (bench/RESULTS.md). Same
    products, another summation order."""
    rows = x.shape[0] if x.dim() == 2 else 0
    if not 2 <= rows <= 64 or x.dtype != torch.float32:
        return F.linear(x, weight, bias)
    if rows > 8 and rows % 8:
        padded = x.new_zeros(rows + (-rows) % 8, x.shape[1])
        padded[:rows] = x
        y = torch.mm(weight, padded.t())[:, :rows].t().contiguous()
    else:
        y = torch.mm(weight, x.t()).t().contiguous()
    return y if bias is None else y + bias


def rms_norm(x, weight, eps, offset):
    """RMSNorm in float32 over groups of ``weight.numel()`` features: ``x / rms(x) * (offset + weight)``.

    ``F.rms_norm`` computes ``x * rsqrt(mean(x²) + eps) * w`` as HF's RMSNorm modules do (bit-equal
    in float32) in one fused pass: 2.5x faster than the same five ops spelled out, per decode row."""
    group = weight.shape[0]
    xf = x.float().reshape(x.shape[0], x.shape[1] // group, group)  # no -1: zero rows are valid
    scale = weight.float() if offset == 0 else offset + weight.float()
    return F.rms_norm(xf, (group,), scale, eps).reshape(x.shape).to(x.dtype)


def rope_tables(positions, inv_freq, scaling, interleaved, dtype):
    """What ``rope`` multiplies by: cos and sin of the angles ``positions * inv_freq`` (times
    ``scaling``) in ``dtype``, [T, 1, rotary_dim / 2] for interleaved pairs, repeated to
    [T, 1, rotary_dim] for rotated halves. The same for every layer of a step, so a step may
    compute them once (``paged_attention`` does)."""
    freqs = positions.float()[:, None] * inv_freq.float()[None, :]  # [T, rotary_dim / 2]
    cos = (freqs.cos() * scaling).to(dtype)[:, None, :]
    sin = (freqs.sin() * scaling).to(dtype)[:, None, :]
    if interleaved:
        return cos, sin
    return torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)


def rope(x, positions, inv_freq, head_dim, rotary_dim, interleaved, scaling, tables=None):
    """Rotary embedding on each head's first ``rotary_dim`` features, angles ``positions * inv_freq``
    (``tables``: ``rope_tables`` of the same arguments, when the caller has them)."""
    xh = x.reshape(x.shape[0], -1, head_dim)
    cos, sin = tables if tables is not None else rope_tables(positions, inv_freq, scaling, interleaved, x.dtype)
    rot, rest = xh[..., :rotary_dim], xh[..., rotary_dim:]
    if interleaved:  # GPT-J: rotate pairs (2i, 2i+1)
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    else:  # Llama: rotate halves
        x1, x2 = rot[..., : rotary_dim // 2], rot[..., rotary_dim // 2:]
        out = rot * cos + torch.cat((-x2, x1), -1) * sin
    if rotary_dim == head_dim:
        return out.reshape(x.shape)
    return torch.cat((out, rest), -1).reshape(x.shape)


def attention(q, k, v, positions, kv, layer, num_heads, num_kv_heads, head_dim, scale, causal,
              sliding_window, softcap, kv_dtype=None, k_scale=None, v_scale=None,
              inv_freq=None, rope_dim=0, rope_interleaved=False, rope_scaling=1.0):
    """Multi-head attention with GQA over this step's tokens and the layer's cached keys/values.

    Query at position p attends to cached keys at positions in ``(p - sliding_window, p]``;
    ``softcap`` applies ``softcap * tanh(scores / softcap)`` before the softmax (Gemma 2).
    With ``kv_dtype`` the cache keeps what a quantized page holds (``quantize_kv`` then
    ``dequantize_kv`` with the per-KV-head scales), so this matches the paged runtime.
    ``rope_dim`` > 0 applies ``rope`` to q and k first (rotary folded in by the fuse pass).
    """
    if rope_dim:
        q = rope(q, positions, inv_freq, head_dim, rope_dim, rope_interleaved, rope_scaling)
        k = rope(k, positions, inv_freq, head_dim, rope_dim, rope_interleaved, rope_scaling)
    k = k.reshape(len(k), num_kv_heads, head_dim)
    v = v.reshape(len(v), num_kv_heads, -1)
    if kv_dtype:
        k = dequantize_kv(quantize_kv(k, k_scale, kv_dtype), k_scale)
        v = dequantize_kv(quantize_kv(v, v_scale, kv_dtype), v_scale)
    k_all, v_all, kpos = kv.append(layer, k, v, positions)
    qh = q.reshape(len(q), num_heads, head_dim).transpose(0, 1).float()                  # [H, Tq, D]
    kh = k_all.transpose(0, 1).float().repeat_interleave(num_heads // num_kv_heads, 0)  # [H, S, D]
    vh = v_all.transpose(0, 1).float().repeat_interleave(num_heads // num_kv_heads, 0)
    scores = (qh @ kh.transpose(1, 2)) * scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    if causal:
        allowed = kpos[None, :] <= positions[:, None]
    else:
        allowed = torch.ones(len(positions), len(kpos), dtype=torch.bool, device=positions.device)
    if sliding_window:
        allowed &= positions[:, None] - kpos[None, :] < sliding_window
    scores = scores.masked_fill(~allowed, -math.inf)
    out = torch.softmax(scores, -1) @ vh                                                 # [H, Tq, Dv]
    return out.transpose(0, 1).reshape(len(q), -1).to(q.dtype)


def quantize_kv(x, scale, kv_dtype):
    """``x`` [..., kv_heads, D] -> ``kv_dtype`` ("int8" or "float8_e4m3fn") storage of ``x / scale``
    with one float32 scale per KV head: int8 rounds to nearest and clamps to [-127, 127]
    (symmetric); float8 clamps to its largest finite value (448) and the cast rounds."""
    dtype = getattr(torch, kv_dtype)
    y = x.float() / torch.as_tensor(scale, dtype=torch.float32, device=x.device)[:, None]
    if dtype.is_floating_point:
        top = torch.finfo(dtype).max
        return y.clamp(-top, top).to(dtype)
    top = torch.iinfo(dtype).max
    return y.round().clamp(-top, top).to(dtype)


def dequantize_kv(x, scale):
    """Quantized K or V [..., kv_heads, D] -> float32 values (``x * scale`` per KV head)."""
    return x.float() * torch.as_tensor(scale, dtype=torch.float32, device=x.device)[:, None]


def add_rms_norm(x, residual, weight, eps, offset):
    """``s = x + residual`` and ``rms_norm(s)`` in one call, packed ``[T, 2H]``: normed | s."""
    h = x.shape[1]
    out = torch.empty(x.shape[0], 2 * h, dtype=x.dtype, device=x.device)
    summed = torch.add(x, residual, out=out[:, h:])
    out[:, :h] = rms_norm(summed, weight, eps, offset)
    return out


def act_mul(gate, up, act):
    """``act(gate) * up`` (gated MLP), ``act`` one of silu, gelu, gelu_tanh, relu."""
    if act == "gelu_tanh":
        return torch.nn.functional.gelu(gate, approximate="tanh") * up
    return getattr(torch.nn.functional, act)(gate) * up


def act_mul_packed(gate_up, act):
    """``act_mul`` of the two halves of a fused gate|up projection ``[T, 2I]`` (vLLM's silu_and_mul)."""
    half = gate_up.shape[1] // 2
    return act_mul(gate_up[:, :half], gate_up[:, half:], act)
