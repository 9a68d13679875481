"""Shared by the paged attention kernel tests: a filled page pool with shuffled block tables."""

from __future__ import annotations

import torch

from llmc.runtime import functional

# What the pages hold for each KV-cache dtype, and the per-KV-head scales quantized pages use.
PAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
               "int8": torch.int8, "float8_e4m3fn": torch.float8_e4m3fn}


def head_major(pages):
    """The same pages stored head-major, as CPU ``KVPool``s hold them (a permuted view)."""
    return pages.permute(2, 0, 1, 3).contiguous().permute(1, 2, 0, 3)


def paged_cache(seq_lens, kv_heads, head_dim, v_dim, page_size, kv_dtype, seed=0):
    """Pages holding ``seq_lens[i]`` keys of each sequence, scattered over a shuffled pool.

    Returns (k_pages, v_pages, block_tables padded with 0, k_scale, v_scale); the scales are None
    for unquantized pages. Page 0 is left full of garbage: padding entries point at it."""
    gen = torch.Generator().manual_seed(seed)
    widths = [-(-n // page_size) for n in seq_lens]
    num_blocks = sum(widths) + 1
    order = torch.randperm(num_blocks - 1, generator=gen) + 1
    tables = torch.zeros(len(seq_lens), max(widths), dtype=torch.int64)
    at = 0
    for i, w in enumerate(widths):
        tables[i, :w] = order[at:at + w]
        at += w
    k = torch.randn(num_blocks, page_size, kv_heads, head_dim, generator=gen)
    v = torch.randn(num_blocks, page_size, kv_heads, v_dim, generator=gen)
    k[0] = v[0] = 1e4  # garbage a wrong mask would let in
    if kv_dtype in ("int8", "float8_e4m3fn"):
        k_scale = torch.rand(kv_heads, generator=gen) * 0.02 + 0.01
        v_scale = torch.rand(kv_heads, generator=gen) * 0.02 + 0.01
        return (functional.quantize_kv(k, k_scale, kv_dtype), functional.quantize_kv(v, v_scale, kv_dtype),
                tables, k_scale, v_scale)
    dtype = PAGE_DTYPES[kv_dtype]
    return k.to(dtype), v.to(dtype), tables, None, None


# float32 pages: same float32 math, in another order (tiles, online softmax) -> 1e-5. bf16/fp16
# pages: the pages are exact inputs to both sides and the math is float32 in both, so the same
# 1e-5 (plus q's rounding, the same on both sides). Quantized pages: the kernel scales the scores
# instead of each key (another rounding order of float32 products): still float32 error only.
ATOL = {"float32": 2e-5, "bfloat16": 2e-5, "float16": 2e-5, "int8": 2e-5, "float8_e4m3fn": 2e-5}
