"""Embedding gather kernel vs F.embedding under the interpreter: a gather is exact in every dtype."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernel_modules import kernel_module


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens, vocab, hidden", [(9, 50, 72), (1, 3, 1500)])  # 1500: two blocks, ragged
def test_embedding_matches_reference(dtype, tokens, vocab, hidden):
    gen = torch.Generator().manual_seed(vocab)
    weight = torch.randn(vocab, hidden, generator=gen).to(dtype)
    ids = torch.randint(0, vocab, (tokens,), generator=gen)
    ids[0] = vocab - 1  # the last row
    got = kernel_module("embedding").embedding(ids, weight)
    assert torch.equal(got, F.embedding(ids, weight))


def test_embedding_no_tokens():
    assert kernel_module("embedding").embedding(torch.empty(0, dtype=torch.int64), torch.ones(4, 8)).shape == (0, 8)
