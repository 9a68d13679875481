"""GPTQ and round-to-nearest weight quantization of one linear ``W [out, in]``; used by the quantize pass.

GPTQ (Frantar et al. 2022) quantizes the columns of ``W`` one at a time and spreads each column's
rounding error over the columns not yet quantized, weighted by the inverse Hessian of the layer's
proxy loss ``||(W - Q) X^T||_F^2`` (``H = sum over tokens of x x^T``). As in the reference code:
dead inputs (``H_ii == 0``) get ``H_ii = 1`` and a zero weight column; ``damp * mean(diag H)`` is added
to the diagonal; the updates run on the upper Cholesky factor of ``H^-1``, applied lazily per block.

Grids (both functions return the same layout, ``GPTQResult``):

- symmetric, per output channel when ``group_size`` is None: ``w = q * scale[o]``,
  ``q`` int8 in ``[-(2^(b-1) - 1), 2^(b-1) - 1]``;
- asymmetric, per ``(row, group of group_size consecutive inputs)``: ``w = (q - zero) * scale``,
  ``q`` and ``zero`` uint8 in ``[0, 2^b - 1]``; the range is ``[min, max]`` of the group widened to
  include 0, so 0 is exact.

Without ``act_order`` a group's scale/zero come from its current (error-updated) weights when the
first column of the group is reached. With ``act_order`` columns go by decreasing ``H_ii`` and every
group's scale/zero are fixed up front from the original weights ("static groups"), so the stored
layout stays the plain one: groups of consecutive ORIGINAL columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmc.errors import LlmcError


@dataclass(frozen=True)
class GPTQResult:
    q: torch.Tensor            # [out, in]: int8 when symmetric, else uint8 in [0, 2^bits - 1]
    scale: torch.Tensor        # float32 [out, in // group_size], or [out] per channel
    zero: torch.Tensor | None  # uint8 shaped like scale; None when symmetric
    dequantized: torch.Tensor  # float32 [out, in]: exactly (q - zero) * scale under the layout
    loss: float | None = None  # GPTQ's own running estimate of ||(W - dequantized) X^T||_F^2 (damped H)


def _qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    return (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if symmetric else (0, 2 ** bits - 1)


def grid_params(w: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (and integer-valued float zero point) covering each row of ``w [..., k]`` over its last dim."""
    lo, hi = _qrange(bits, symmetric)
    if symmetric:
        scale = w.abs().amax(dim=-1) / hi
        return torch.where(scale > 0, scale, 1.0), None  # an all-zero row quantizes to 0 with any scale
    wmin, wmax = w.amin(dim=-1).clamp(max=0), w.amax(dim=-1).clamp(min=0)
    scale = (wmax - wmin) / hi
    scale = torch.where(scale > 0, scale, 1.0)
    return scale, torch.round(-wmin / scale).clamp(lo, hi)


def _quantize(w, scale, zero, bits: int, symmetric: bool) -> torch.Tensor:
    """Integer values (still float) of ``w`` on the grid; ``scale``/``zero`` broadcast against ``w``."""
    lo, hi = _qrange(bits, symmetric)
    q = torch.round(w / scale)
    return (q if zero is None else q + zero).clamp(lo, hi)


def _dequantize(q, scale, zero) -> torch.Tensor:
    return q * scale if zero is None else (q - zero) * scale


def _per_column(t: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """Per-row ``[out]`` or per-group ``[out, groups]`` values -> broadcastable against ``[out, in]``."""
    return t[:, None] if group_size is None else t.repeat_interleave(group_size, dim=1)


def _result(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group_size: int | None,
            loss: float | None = None) -> GPTQResult:
    """Cast to the storage dtypes and dequantize from exactly what is stored."""
    if group_size is None:  # [out, 1] -> [out]
        scale, zero = scale.reshape(-1), None if zero is None else zero.reshape(-1)
    scale = scale.float()
    deq = _dequantize(q, _per_column(scale, group_size), None if zero is None else _per_column(zero, group_size))
    if zero is None:
        return GPTQResult(q.to(torch.int8), scale, None, deq, loss)
    return GPTQResult(q.to(torch.uint8), scale, zero.to(torch.uint8), deq, loss)


def _check(weight: torch.Tensor, bits: int, group_size: int | None, symmetric: bool) -> None:
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out, in], got shape {tuple(weight.shape)}")
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    if group_size is not None and (group_size <= 0 or weight.shape[1] % group_size):
        raise ValueError(f"group_size {group_size} does not divide the {weight.shape[1]} input features")


def rtn_quantize(weight: torch.Tensor, bits: int, group_size: int | None, symmetric: bool) -> GPTQResult:
    """Round-to-nearest on the same grids and layout as ``gptq_quantize``."""
    _check(weight, bits, group_size, symmetric)
    w = weight.detach().float()
    out, n = w.shape
    g = group_size or n
    groups = w.reshape(out, n // g, g)
    scale, zero = grid_params(groups, bits, symmetric)
    q = _quantize(groups, scale[..., None], None if zero is None else zero[..., None], bits, symmetric)
    return _result(q.reshape(out, n), scale, zero, group_size)


def _inverse_cholesky(h: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``h^-1`` (``h^-1 = U^T U``), float64."""
    lower, info = torch.linalg.cholesky_ex(h)
    if info == 0:
        upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
        if info == 0:
            return upper
    raise LlmcError("gptq: the dampened Hessian is not positive definite; raise `damp` (e.g. 0.1) "
                    "or use more calibration tokens")


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, *, bits: int, group_size: int | None,
                  symmetric: bool, act_order: bool = False, damp: float = 0.01,
                  block_size: int = 128) -> GPTQResult:
    """GPTQ of ``weight [out, in]`` given ``hessian = sum x x^T [in, in]`` of its inputs (module docstring)."""
    _check(weight, bits, group_size, symmetric)
    out, n = weight.shape
    if hessian.shape != (n, n):
        raise ValueError(f"hessian shape {tuple(hessian.shape)} does not match the {n} input features")
    w = weight.detach().float().clone()
    h = hessian.detach().to(w.device, torch.float64, copy=True)
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0

    g = group_size or n
    static = group_size is None or act_order  # grids fixed up front from the original weights
    if static:
        scale, zero = grid_params(w.reshape(out, n // g, g), bits, symmetric)
    else:
        scale = torch.empty(out, n // g, device=w.device)
        zero = None if symmetric else torch.empty(out, n // g, device=w.device)
        block_size = -(-block_size // g) * g  # whole groups per block: a group's grid sees its current weights

    if act_order:  # most important inputs first, while the most unquantized columns remain to absorb error
        perm = torch.argsort(h.diagonal(), descending=True, stable=True)
    else:
        perm = torch.arange(n, device=h.device)
    w, h = w[:, perm], h[perm][:, perm]
    h.diagonal().add_(damp * h.diagonal().mean())
    hinv = _inverse_cholesky(h).float()
    group_of = (perm // g).tolist()  # each processed column's ORIGINAL group

    q = torch.empty_like(w)
    loss = torch.zeros((), dtype=torch.float64, device=w.device)
    for b0 in range(0, n, block_size):
        b1 = min(b0 + block_size, n)
        w_block, hinv_block = w[:, b0:b1], hinv[b0:b1, b0:b1]  # w_block is a view: updates land in w
        err_block = torch.zeros_like(w_block)
        for i in range(b1 - b0):
            col = b0 + i
            if not static and col % g == 0:
                s, z = grid_params(w_block[:, i:i + g], bits, symmetric)
                scale[:, col // g] = s
                if zero is not None:
                    zero[:, col // g] = z
            s, z = scale[:, group_of[col]], None if zero is None else zero[:, group_of[col]]
            q[:, col] = _quantize(w_block[:, i], s, z, bits, symmetric)
            err = (w_block[:, i] - _dequantize(q[:, col], s, z)) / hinv_block[i, i]
            loss += err.double().square().sum()  # OBS: this column's added proxy loss, (w - q)^2 / [H^-1]_ii
            w_block[:, i:].addr_(err, hinv_block[i, i:], alpha=-1)
            err_block[:, i] = err
        w[:, b1:].addmm_(err_block, hinv[b0:b1, b1:], alpha=-1)  # the lazy update of later blocks

    q = q[:, torch.argsort(perm)]
    return _result(q, scale, zero, group_size, float(loss))
