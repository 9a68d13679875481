"""The CPU target's float32 linear (``functional.linear_cpu``): every GEMM form it picks by row
count (plain, transposed, transposed over rows padded to a multiple of 8) computes ``F.linear``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llmc.runtime.functional import linear_cpu


@pytest.mark.parametrize("rows", [1, 2, 7, 8, 9, 15, 16, 31, 64, 65, 200])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_cpu_matches_f_linear(rows, with_bias):
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 37, generator=gen)
    w = torch.randn(53, 37, generator=gen)
    b = torch.randn(53, generator=gen) if with_bias else None
    got = linear_cpu(x, w, b)
    assert got.shape == (rows, 53) and got.is_contiguous()
    assert (got - F.linear(x, w, b)).abs().max().item() < 1e-5


def test_linear_cpu_keeps_other_inputs_on_f_linear():
    w = torch.randn(6, 4)
    x3 = torch.randn(2, 3, 4)
    assert torch.equal(linear_cpu(x3, w), F.linear(x3, w))
    xb = torch.randn(5, 4).to(torch.bfloat16)
    assert torch.equal(linear_cpu(xb, w.to(torch.bfloat16)), F.linear(xb, w.to(torch.bfloat16)))
