"""RMSNorm and fused residual-add + RMSNorm kernels vs runtime/functional.py under the interpreter."""

from __future__ import annotations

import pytest
import torch

from kernel_modules import kernel_module, max_error
from llmc.runtime import functional

# The kernel computes in float32 and rounds once; the reference rounds the same float32 result,
# so float32 differs only by summation order and rsqrt's last bit. For fp16 one rounding of results
# that differ by that much can land one ulp apart (2^-11 relative). For bf16 the interpreter's
# float32 -> bfloat16 cast truncates where a GPU rounds to nearest: one ulp more (2^-8 relative,
# 2^-7 just above a power of two), two where a truncated sum feeds the norm (add_rms_norm).
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
       torch.float16: dict(atol=2e-3, rtol=2e-3)}
DTYPES = list(TOL)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens, hidden, group, offset", [(5, 96, 96, 0.0), (3, 80, 16, 1.0), (1, 200, 200, 0.0)])
def test_rms_norm_matches_reference(dtype, tokens, hidden, group, offset):
    gen = torch.Generator().manual_seed(tokens * hidden)
    # A strided view (a slice of a wider row), as the fused qkv / add_rms_norm outputs are read.
    wide = torch.randn(tokens, hidden + 24, generator=gen).to(dtype)
    x = wide[:, 8:8 + hidden]
    weight = (torch.randn(group, generator=gen) * 0.1 + 1).to(dtype)
    got = kernel_module("rms_norm").rms_norm(x, weight, 1e-6, offset)
    want = functional.rms_norm(x, weight, 1e-6, offset)
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, **TOL[dtype])


def test_rms_norm_zero_tokens():
    x = torch.empty(0, 32)
    assert kernel_module("rms_norm").rms_norm(x, torch.ones(32), 1e-6, 0.0).shape == (0, 32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens, hidden", [(7, 72), (2, 128)])
def test_add_rms_norm_matches_reference(dtype, tokens, hidden):
    gen = torch.Generator().manual_seed(hidden)
    x = torch.randn(tokens, hidden, generator=gen).to(dtype)
    residual = torch.randn(tokens, 2 * hidden, generator=gen).to(dtype)[:, hidden:]  # strided rows
    weight = torch.randn(hidden, generator=gen).to(dtype)
    got = kernel_module("add_rms_norm").add_rms_norm(x, residual, weight, 1e-5, 1.0)
    want = functional.add_rms_norm(x, residual, weight, 1e-5, 1.0)
    # The sum is one rounding of the same float32 value on both sides: exact but for bf16's truncation.
    exact = dict(atol=0, rtol=2**-7 if dtype == torch.bfloat16 else 0)
    torch.testing.assert_close(got[:, hidden:], want[:, hidden:], **exact)
    torch.testing.assert_close(got, want, **TOL[dtype])
