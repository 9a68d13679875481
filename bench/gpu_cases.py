"""The kernel cases of bench/gpu.py: for each Triton template, random inputs at a shape, its torch
reference, and the bytes the op must move at least (inputs read once, outputs written once).

Activations are bfloat16; quantized weights are stored by the quantize pass's own code, so the
kernels read the layouts a compiled package holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable

import torch


@dataclass
class Shapes:
    tokens: tuple        # token counts of the linear rows (decode ... prefill)
    rows: int            # tokens of the elementwise kernels
    hidden: int
    inter: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    batch: int           # sequences of the decode attention
    context: int         # cached tokens per sequence
    page: int = 16


FULL = Shapes((1, 16, 512), 4096, 2048, 5632, 32, 4, 64, 32000, 8, 2048)
SMOKE = Shapes((1, 17), 5, 128, 96, 4, 2, 16, 256, 2, 37)


@dataclass
class Case:
    label: str
    fn: str                       # the wrapper's name in the kernel module
    args: tuple
    reference: Callable | None    # None: a baseline row, timed only
    nbytes: int
    tolerance: float = 2e-2       # bfloat16 outputs: a few 2^-9 steps of the output scale
    result_arg: int | None = None  # the op writes into args[result_arg] (KV pages) instead of returning


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def clone_args(args):
    return tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)


# ---- kernel cases: name -> cases on random inputs (bfloat16 activations) ----------------------------

def linear_cases(name, s: Shapes, dev):
    """The up projection's weight stored by the quantize pass's own code (the layouts a package holds)."""
    from llmc.ir.types import Param, TensorType
    from llmc.passes.quantize import QuantizeOptions, _storage
    from llmc.runtime import quant

    gen = torch.Generator().manual_seed(0)
    n, k = s.inter, s.hidden
    weight = torch.randn(n, k, generator=gen) * 0.02
    scheme = name.removeprefix("linear_")
    node = SimpleNamespace(ref="%up")
    stats = None
    if scheme == "w8a8":  # calibration absmax: smooth factors away from 1
        absmax = torch.rand(k, generator=gen) * 4 + 0.5
        stats = SimpleNamespace(by_node={node.ref: SimpleNamespace(absmax=absmax, hessian=None)})
    param = Param("up.weight", TensorType((n, k), "float32"), loader=lambda: weight)
    _, storage, attrs = _storage(scheme, QuantizeOptions(scheme=scheme, group_size=128 if k % 128 == 0 else 32), node, param, stats)
    stored = tuple(p.load().to(dev) for p in storage)
    cases = []
    for t in s.tokens:
        x = torch.randn(t, k, generator=gen).to(dev, torch.bfloat16)
        args = (x, *stored, None, attrs["group_size"]) if "group_size" in attrs else (x, *stored)
        cases.append(Case(f"{name} T={t} [{n}x{k}]", name, args, getattr(quant, name),
                          nbytes(x, *stored) + t * n * 2))
    return cases


def cublas_cases(s: Shapes, dev):
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(s.inter, s.hidden, generator=gen) * 0.02).to(dev, torch.bfloat16)
    return [Case(f"torch F.linear bf16{' (cuBLAS)' if dev.type == 'cuda' else ''} T={t} [{s.inter}x{s.hidden}]", "", (torch.randn(
        t, s.hidden, generator=gen).to(dev, torch.bfloat16), w), None, nbytes(w) + t * (s.hidden + s.inter) * 2)
        for t in s.tokens]


def elementwise_cases(name, s: Shapes, dev):
    from llmc.runtime import functional as F

    gen = torch.Generator().manual_seed(1)
    rnd = lambda *shape: torch.randn(*shape, generator=gen).to(dev, torch.bfloat16)  # noqa: E731
    t, h = s.rows, s.hidden
    if name == "rms_norm":
        x, w = rnd(t, h), rnd(h)
        return [Case(f"rms_norm [{t}x{h}]", name, (x, w, 1e-6, 0.0), F.rms_norm, 2 * nbytes(x) + nbytes(w))]
    if name == "add_rms_norm":
        x, r, w = rnd(t, h), rnd(t, h), rnd(h)
        return [Case(f"add_rms_norm [{t}x{h}]", name, (x, r, w, 1e-6, 0.0), F.add_rms_norm, 4 * nbytes(x) + nbytes(w))]
    if name == "rope":
        d = s.head_dim
        x, pos = rnd(t, s.heads * d), torch.randint(0, 4096, (t,), generator=gen).to(dev)
        inv = (1.0 / 10000 ** (torch.arange(0, d, 2).float() / d)).to(dev)
        return [Case(f"rope [{t}x{s.heads}x{d}]", name, (x, pos, inv, d, d, False, 1.0), F.rope,
                     2 * nbytes(x) + nbytes(pos))]
    if name == "act_mul":
        g, u = rnd(t, s.inter), rnd(t, s.inter)
        return [Case(f"act_mul silu [{t}x{s.inter}]", name, (g, u, "silu"), F.act_mul, 3 * nbytes(g))]
    if name == "embedding":
        table, ids = rnd(s.vocab, h), torch.randint(0, s.vocab, (t,), generator=gen).to(dev)
        return [Case(f"embedding [{t} of {s.vocab}x{h}]", name, (ids, table), torch.nn.functional.embedding,
                     2 * t * h * 2 + nbytes(ids))]
    return []


def attention_cases(name, s: Shapes, dev):
    from llmc.runtime import paged_attention as P

    gen = torch.Generator().manual_seed(2)
    per_seq = -(-s.context // s.page)
    pages = s.batch * per_seq + 1
    kp = torch.randn(pages, s.page, s.kv_heads, s.head_dim, generator=gen).to(dev, torch.bfloat16)
    vp = torch.randn(pages, s.page, s.kv_heads, s.head_dim, generator=gen).to(dev, torch.bfloat16)
    tables = (torch.randperm(pages - 1, generator=gen)[: s.batch * per_seq] + 1).reshape(s.batch, per_seq).to(dev)
    kv_read = 2 * s.batch * s.context * s.kv_heads * s.head_dim * 2
    scale = s.head_dim ** -0.5
    if name == "kv_cache_write":
        k = torch.randn(s.rows, s.kv_heads, s.head_dim, generator=gen).to(dev, torch.bfloat16)
        slots = torch.randperm(pages * s.page, generator=gen)[: s.rows].to(dev)
        return [Case(f"kv_cache_write [{s.rows}x{s.kv_heads}x{s.head_dim}]", "write_kv", (kp, vp, k, k.clone(), slots),
                     P.write_kv, 4 * nbytes(k) + nbytes(slots), result_arg=0)]
    if name == "paged_decode_attention":
        q = torch.randn(s.batch, s.heads * s.head_dim, generator=gen).to(dev, torch.bfloat16)
        lens = torch.full((s.batch,), s.context, device=dev)
        args = (q, kp, vp, tables, lens, lens - 1, s.heads, s.head_dim, scale, True, None, None)
        return [Case(f"paged_decode_attention B={s.batch} ctx={s.context} GQA {s.heads}/{s.kv_heads}", name, args,
                     P.paged_decode_attention, kv_read + 2 * nbytes(q))]
    if name == "paged_prefill_attention":
        tq = min(s.context, max(s.tokens))
        q = torch.randn(tq, s.heads * s.head_dim, generator=gen).to(dev, torch.bfloat16)
        pos = torch.arange(s.context - tq, s.context, device=dev)
        args = (q, kp, vp, tables[0], s.context, pos, s.heads, s.head_dim, scale, True, None, None)
        return [Case(f"paged_prefill_attention Tq={tq} ctx={s.context}", name, args, P.paged_prefill_attention,
                     kv_read // s.batch + 2 * nbytes(q))]
    return []


def kernel_cases(name, s, dev):
    if name.startswith("linear_"):
        return linear_cases(name, s, dev)
    return elementwise_cases(name, s, dev) or attention_cases(name, s, dev)
