"""KV-cache write kernel vs runtime/paged_attention.py ``write_kv`` under the interpreter."""

from __future__ import annotations

import pytest
import torch

from kernel_modules import kernel_module
from llmc.runtime import paged_attention as ref

BLOCKS, PAGE = 6, 5  # a page size that is not a power of two: slots cross pages at odd places


def pages(dtype, kv_heads, dim):
    return torch.zeros(BLOCKS, PAGE, kv_heads, dim, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_write_kv_unquantized_is_exact(dtype):
    gen = torch.Generator().manual_seed(0)
    t, kvh, d, dv = 7, 3, 12, 10  # v head dim differs from k's
    kv = torch.randn(t, kvh * (d + dv) + 4, generator=gen).to(dtype)
    k = kv[:, :kvh * d].unflatten(1, (kvh, d))  # strided views of one fused projection
    v = kv[:, kvh * d:kvh * (d + dv)].unflatten(1, (kvh, dv))
    slots = torch.tensor([0, 4, 5, 9, 17, 29, 12])
    got_k, got_v, want_k, want_v = pages(dtype, kvh, d), pages(dtype, kvh, dv), pages(dtype, kvh, d), pages(dtype, kvh, dv)
    kernel_module("kv_cache_write").write_kv(got_k, got_v, k, v, slots)
    ref.write_kv(want_k, want_v, k, v, slots)
    assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)


@pytest.mark.parametrize("kv_dtype", ["int8", "float8_e4m3fn"])
def test_write_kv_quantized(kv_dtype):
    gen = torch.Generator().manual_seed(1)
    t, kvh, d = 9, 2, 16
    k = torch.randn(t, kvh, d, generator=gen) * 3
    v = torch.randn(t, kvh, d, generator=gen)
    k[0, 0, :4] = torch.tensor([0.5, 1.5, -2.5, 1000.0]) * 0.04  # ties (round half to even) and a clamp
    k_scale, v_scale = [0.04, 0.03], [0.01, 0.02]
    slots = torch.randperm(BLOCKS * PAGE, generator=gen)[:t]
    dtype = getattr(torch, kv_dtype)
    got_k, got_v, want_k, want_v = (pages(dtype, kvh, d) for _ in range(4))
    kernel_module("kv_cache_write").write_kv(got_k, got_v, k, v, slots, kv_dtype, k_scale, v_scale)
    ref.write_kv(want_k, want_v, k, v, slots, kv_dtype, torch.tensor(k_scale), torch.tensor(v_scale))
    # Same float32 division, same rounding (int8: half to even; fp8: to nearest on the e4m3 grid,
    # done in float32 by the kernel): identical bytes.
    assert torch.equal(got_k.view(torch.uint8), want_k.view(torch.uint8))
    assert torch.equal(got_v.view(torch.uint8), want_v.view(torch.uint8))


def test_write_kv_fp8_rounds_like_aten():
    """Every float8 e4m3 rounding case: subnormals, exponent boundaries, ties, the clamp at 448."""
    x = torch.cat([torch.linspace(-460, 460, 4001), torch.linspace(-0.02, 0.02, 999),
                   torch.tensor([7.9, 7.5, 0.0029296875, 240.0, 248.0, 464.0])])
    k = x.reshape(1, 1, -1)  # one token, one head: one program (the interpreter pays per program)
    got, want = (torch.zeros(1, 1, 1, len(x), dtype=torch.float8_e4m3fn) for _ in range(2))
    spare = torch.zeros(1, 1, 1, len(x), dtype=torch.float8_e4m3fn)
    slots = torch.tensor([0])
    kernel_module("kv_cache_write").write_kv(got, spare.clone(), k, k, slots, "float8_e4m3fn", [1.0], [1.0])
    ref.write_kv(want, spare.clone(), k, k, slots, "float8_e4m3fn", torch.tensor([1.0]), torch.tensor([1.0]))
    bad = got.view(torch.uint8) != want.view(torch.uint8)
    assert not bad.any(), f"{x[bad.flatten()][:5].tolist()} -> {got[bad][:5].tolist()}, ATen {want[bad][:5].tolist()}"
