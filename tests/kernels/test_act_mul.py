"""Gated activation kernels (act_mul, act_mul_packed) vs runtime/functional.py under the interpreter."""

from __future__ import annotations

import pytest
import torch

from kernel_modules import kernel_module
from llmc.runtime import functional

# float32: exp/erf differ from ATen's in the last bits. bf16: the reference rounds act(gate) before
# the product (two roundings) and the interpreter's bfloat16 cast truncates (see test_rms_norm):
# two ulps of 2^-8. fp16: two roundings of 2^-11.
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
       torch.float16: dict(atol=2e-3, rtol=2e-3)}
ACTS = ["silu", "gelu", "gelu_tanh", "relu"]


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("act", ACTS)
def test_act_mul_packed_matches_reference(act, dtype):
    gen = torch.Generator().manual_seed(len(act))
    gate_up = (torch.randn(3, 2 * 1100, generator=gen) * 4).to(dtype)  # 1100: two blocks, a ragged tail
    got = kernel_module("act_mul").act_mul_packed(gate_up, act)
    want = functional.act_mul_packed(gate_up, act)
    assert got.shape == want.shape == (3, 1100)
    torch.testing.assert_close(got, want, **TOL[dtype])


@pytest.mark.parametrize("act", ACTS)
def test_act_mul_strided_inputs(act):
    gen = torch.Generator().manual_seed(7)
    gate = torch.randn(5, 40, generator=gen)[:, 3:36]
    up = torch.randn(5, 33, generator=gen)
    torch.testing.assert_close(kernel_module("act_mul").act_mul(gate, up, act), functional.act_mul(gate, up, act),
                               **TOL[torch.float32])


def test_act_mul_rejects_unknown_activation():
    with pytest.raises(ValueError, match="unknown activation 'mish'"):
        kernel_module("act_mul").act_mul(torch.ones(1, 4), torch.ones(1, 4), "mish")
