"""Paged decode attention kernel vs runtime/paged_attention.py under the interpreter."""

from __future__ import annotations

import pytest
import torch

from attention_cases import ATOL, head_major, paged_cache
from kernel_modules import kernel_module, max_error
from llmc.runtime import paged_attention as ref

HEAD_DIM = 16


def run(kv_dtype, heads, kv_heads, seq_lens, page_size, target="h100", v_dim=HEAD_DIM, num_splits=None,
        sliding_window=None, softcap=None, q_dtype=torch.float32, positions=None, layout="page-major"):
    k_pages, v_pages, tables, k_scale, v_scale = paged_cache(seq_lens, kv_heads, HEAD_DIM, v_dim, page_size, kv_dtype)
    if layout == "head-major":
        k_pages, v_pages = head_major(k_pages), head_major(v_pages)
    gen = torch.Generator().manual_seed(len(seq_lens))
    q = torch.randn(len(seq_lens), heads * HEAD_DIM, generator=gen).to(q_dtype)
    lens = torch.tensor(seq_lens)
    positions = lens - 1 if positions is None else torch.tensor(positions)
    args = (q, k_pages, v_pages, tables, lens, positions, heads, HEAD_DIM, 0.3, True, sliding_window, softcap,
            k_scale, v_scale)
    got = kernel_module("paged_decode_attention", target).paged_decode_attention(*args, num_splits=num_splits)
    want = ref.paged_decode_attention(*args)
    assert got.shape == want.shape and got.dtype == want.dtype == torch.float32
    return got, want


@pytest.mark.parametrize("kv_dtype", list(ATOL))
@pytest.mark.parametrize("heads, kv_heads", [(2, 2), (8, 2), (8, 1)])  # GQA ratios 1, 4, 8
def test_decode_matches_reference(kv_dtype, heads, kv_heads):
    # Lengths at, just past and just before page boundaries (page 16), and one key.
    got, want = run(kv_dtype, heads, kv_heads, [16, 17, 1, 47], page_size=16,
                    q_dtype=torch.bfloat16 if kv_dtype == "bfloat16" else torch.float32)
    assert max_error(got, want) <= ATOL[kv_dtype]


@pytest.mark.parametrize("kv_dtype", ["float32", "int8"])
def test_decode_reads_head_major_pages(kv_dtype):
    """The kernel addresses pages through their strides: head-major storage (CPU pools) gives the
    same result as the reference over page-major pages."""
    got, _ = run(kv_dtype, 8, 2, [16, 17, 1, 47], page_size=16, layout="head-major")
    _, want = run(kv_dtype, 8, 2, [16, 17, 1, 47], page_size=16)
    assert max_error(got, want) <= ATOL[kv_dtype]


@pytest.mark.parametrize("num_splits", [1, 3, 8])  # 8 splits of 3 tiles: some splits are empty
def test_decode_splits_merge(num_splits):
    # target a100: 32-key tiles over 5-key pages, so tiles straddle pages; 100 keys = 4 tiles.
    got, want = run("float32", 4, 2, [100, 33, 7], page_size=5, target="a100", num_splits=num_splits)
    assert max_error(got, want) <= ATOL["float32"]


@pytest.mark.parametrize("num_splits", [1, 2])
def test_decode_sliding_window_and_softcap(num_splits):
    got, want = run("bfloat16", 4, 2, [90, 9, 40], page_size=16, target="a100", num_splits=num_splits,
                    sliding_window=8, softcap=0.5)  # softcap < |scores|: tanh saturates
    assert max_error(got, want) <= ATOL["bfloat16"]


def test_decode_v_head_dim_and_odd_position():
    # v heads narrower than k's; a query position short of the sequence end (causal cuts keys).
    got, want = run("float16", 6, 3, [20, 31], page_size=8, v_dim=12, positions=[11, 30], sliding_window=16)
    assert max_error(got, want) <= ATOL["float16"]


def test_decode_quantized_pages_need_scales():
    k = torch.zeros(2, 4, 1, HEAD_DIM, dtype=torch.int8)
    with pytest.raises(ValueError, match="need k_scale"):
        kernel_module("paged_decode_attention").paged_decode_attention(
            torch.ones(1, HEAD_DIM), k, k, torch.tensor([[1]]), torch.tensor([3]), torch.tensor([2]),
            1, HEAD_DIM, 1.0, True, None, None)
