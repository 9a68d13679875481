"""Rotary embedding kernel vs runtime/functional.py ``rope`` under the interpreter."""

from __future__ import annotations

import pytest
import torch

from kernel_modules import kernel_module
from llmc.runtime import functional

# float32: cos/sin and the products differ from ATen's in the last bits (angles up to ~300 rad).
# bf16/fp16: the reference rounds each product and the sum (three roundings), the kernel once,
# and the interpreter's bfloat16 cast truncates (see test_rms_norm).
TOL = {torch.float32: dict(atol=2e-5, rtol=1e-5), torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
       torch.float16: dict(atol=3e-3, rtol=3e-3)}


def inv_freq(rotary_dim, base=10000.0):
    return 1.0 / base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim)


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("heads, head_dim, rotary_dim, interleaved", [
    (3, 16, 16, False),   # Llama, an odd head count
    (2, 24, 12, False),   # partial rotary (Phi-3), head_dim not a power of two
    (4, 8, 8, True),      # GPT-J pairs
    (1, 12, 4, True),
])
def test_rope_matches_reference(dtype, heads, head_dim, rotary_dim, interleaved):
    gen = torch.Generator().manual_seed(heads * head_dim + rotary_dim)
    tokens = 6
    wide = torch.randn(tokens, heads * head_dim + 5, generator=gen).to(dtype)
    x = wide[:, 2:2 + heads * head_dim]  # strided rows, as a slice of the fused qkv output
    positions = torch.tensor([0, 1, 2, 17, 130, 301])
    got = kernel_module("rope").rope(x, positions, inv_freq(rotary_dim), head_dim, rotary_dim, interleaved, 0.5)
    want = functional.rope(x, positions, inv_freq(rotary_dim), head_dim, rotary_dim, interleaved, 0.5)
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got, want, **TOL[dtype])
    rest = torch.arange(heads * head_dim) % head_dim >= rotary_dim
    assert torch.equal(got[:, rest], x[:, rest])  # past rotary_dim: copied untouched
