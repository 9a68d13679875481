"""Paged prefill attention kernel (one sequence, and varlen over several) vs runtime/paged_attention.py."""

from __future__ import annotations

import pytest
import torch

from attention_cases import ATOL, paged_cache
from kernel_modules import kernel_module, max_error
from llmc.runtime import paged_attention as ref

HEAD_DIM = 16


def prefill(target="h100"):
    return kernel_module("paged_prefill_attention", target)


@pytest.mark.parametrize("kv_dtype", list(ATOL))
@pytest.mark.parametrize("heads, kv_heads", [(3, 3), (8, 2), (8, 1)])  # GQA ratios 1, 4, 8
def test_prefill_chunk_over_cached_prefix(kv_dtype, heads, kv_heads):
    # 13 new tokens after a 20-token cached prefix: 33 keys over 16-key pages (three pages, the last
    # partly filled); the queries cross a page boundary too.
    seq_len, new = 33, 13
    k_pages, v_pages, tables, k_scale, v_scale = paged_cache([seq_len], kv_heads, HEAD_DIM, HEAD_DIM, 16, kv_dtype)
    gen = torch.Generator().manual_seed(heads)
    q = torch.randn(new, heads * HEAD_DIM, generator=gen)
    positions = torch.arange(seq_len - new, seq_len)
    args = (q, k_pages, v_pages, tables[0], seq_len, positions, heads, HEAD_DIM, 0.25, True, None, None,
            k_scale, v_scale)
    got = prefill().paged_prefill_attention(*args)
    want = ref.paged_prefill_attention(*args)
    assert got.shape == want.shape and got.dtype == want.dtype == torch.float32
    assert max_error(got, want) <= ATOL[kv_dtype]


@pytest.mark.parametrize("sliding_window, softcap", [(None, None), (6, None), (5, 0.7)])
def test_prefill_varlen_matches_per_sequence_reference(sliding_window, softcap):
    """Three sequences in one launch (after 2 decode rows the launch must not touch): a whole
    prompt, a chunk after a prefix, a single token; pages of 5 keys under a100's 32-key tiles."""
    heads, kv_heads = 4, 2
    chunks = [(0, 37), (11, 19), (4, 5)]  # (cached before, length after) per sequence
    seq_lens = [end for _, end in chunks]
    k_pages, v_pages, tables, _, _ = paged_cache(seq_lens, kv_heads, HEAD_DIM, 8, 5, "float32", seed=3)
    starts, positions = [2], [7, 9]
    for before, end in chunks:
        starts.append(starts[-1] + end - before)
        positions += range(before, end)
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(starts[-1], heads * HEAD_DIM, generator=gen)
    positions = torch.tensor(positions)
    opts = dict(num_heads=heads, head_dim=HEAD_DIM, scale=0.3, causal=True, sliding_window=sliding_window,
                softcap=softcap)
    out = torch.full((len(q), heads * 8), 7.0)
    prefill("a100").paged_prefill_attention_varlen(q, k_pages, v_pages, tables, torch.tensor(seq_lens), starts,
                                                   positions, **opts, out=out)
    assert torch.equal(out[:2], torch.full((2, heads * 8), 7.0))  # rows of other sequences untouched
    for i, (a, b) in enumerate(zip(starts, starts[1:])):
        want = ref.paged_prefill_attention(q[a:b], k_pages, v_pages, tables[i], seq_lens[i], positions[a:b], **opts)
        assert max_error(out[a:b], want) <= ATOL["float32"], f"sequence {i}"


def test_prefill_not_causal_bf16_queries():
    k_pages, v_pages, tables, _, _ = paged_cache([21], 1, HEAD_DIM, HEAD_DIM, 16, "bfloat16")
    q = torch.randn(21, 2 * HEAD_DIM).to(torch.bfloat16)
    args = (q, k_pages, v_pages, tables[0], 21, torch.arange(21), 2, HEAD_DIM, 0.25, False, None, None)
    assert max_error(prefill().paged_prefill_attention(*args), ref.paged_prefill_attention(*args)) <= ATOL["bfloat16"]
