"""Paged attention (torch implementation) vs the contiguous reference ``functional.attention``.

A batch mixes decodes and prefill chunks of sequences whose pages are scattered over the pool in
random order; each sequence's result must equal attention over its keys kept contiguously.
Tolerance: both compute in float32 but reduce in a different order (batched matmul over padded
keys vs per-sequence), so results agree to float32 rounding, ~1e-6; 1e-5 leaves margin.
"""

from __future__ import annotations

import pytest
import torch

from llmc.ir.interpreter import ContiguousKVCache
from llmc.runtime import functional
from llmc.runtime.paged_attention import KVPool, PagedStep, decode_groups, paged_attention

ATOL = 1e-5


def run_case(seed, heads, kv_heads, head_dim, block_size, seqs, sliding_window=None, softcap=None, quant=None,
             head_major=True, scattered=True, repeat=1):
    """``seqs``: (cached tokens before the step, new tokens) per sequence, decodes (new == 1) first.
    ``quant``: the kv_dtype / k_scale / v_scale attrs of a quantized cache (pages of that dtype).
    ``head_major``: the pool's storage layout (CPU pools are head-major, GPU pools page-major).
    ``scattered``: pages handed out in random order, else in order (as from a fresh pool).
    ``repeat``: run the step's attention that many times (as every layer does), the last result."""
    g = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-(c + n) // block_size) for c, n in seqs) + 3
    pool = KVPool(num_blocks, block_size, getattr(torch, quant["kv_dtype"]) if quant else torch.float32,
                  head_major=head_major)
    order = torch.randperm(num_blocks, generator=g).tolist() if scattered else list(range(num_blocks))[::-1]
    attrs = dict(layer=0, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
                 scale=head_dim ** -0.5, causal=True, sliding_window=sliding_window, softcap=softcap,
                 **(quant or {}))
    tables, expected = [], []
    qs, ks, vs, pos, slots, starts, lens = [], [], [], [], [], [0], []
    for cached, new in seqs:
        total = cached + new
        table = [order.pop() for _ in range(-(-total // block_size))]
        tables.append(table)
        k_all = torch.randn(total, kv_heads * head_dim, generator=g)
        v_all = torch.randn(total, kv_heads * head_dim, generator=g)
        q_new = torch.randn(new, heads * head_dim, generator=g)
        # The reference: a contiguous cache filled with the earlier tokens, then this step.
        ref_kv = ContiguousKVCache()
        positions = torch.arange(total)
        if cached:
            functional.attention(torch.zeros(cached, heads * head_dim), k_all[:cached], v_all[:cached],
                                 positions[:cached], ref_kv, **attrs)
            # ...and the pool holds the earlier tokens in their pages, as an earlier step left them.
            kp, vp = pool.layer(0, kv_heads, head_dim, head_dim)
            for p in range(cached):
                kp[table[p // block_size], p % block_size] = as_stored(k_all[p].view(kv_heads, head_dim), quant, "k")
                vp[table[p // block_size], p % block_size] = as_stored(v_all[p].view(kv_heads, head_dim), quant, "v")
        expected.append(functional.attention(q_new, k_all[cached:], v_all[cached:], positions[cached:], ref_kv,
                                             **attrs))
        qs.append(q_new), ks.append(k_all[cached:]), vs.append(v_all[cached:]), pos.append(positions[cached:])
        slots.extend(table[p // block_size] * block_size + p % block_size for p in range(cached, total))
        starts.append(starts[-1] + new)
        lens.append(total)
    width = max(map(len, tables))
    step = PagedStep(pool, torch.tensor(slots), torch.tensor([t + [0] * (width - len(t)) for t in tables]),
                     torch.tensor(lens), starts, sum(1 for _, n in seqs if n == 1))
    for _ in range(repeat):
        out = paged_attention(torch.cat(qs), torch.cat(ks), torch.cat(vs), torch.cat(pos), step, **attrs)
    return out, torch.cat(expected)


def as_stored(x, quant, which):
    """What a page holds for ``x`` [kv_heads, D]: ``x``, or ``x`` quantized with the layer's scales."""
    return functional.quantize_kv(x, quant[f"{which}_scale"], quant["kv_dtype"]) if quant else x


@pytest.mark.parametrize("head_major", [True, False], ids=["head-major", "page-major"])
@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", [(4, 2, 16, 4), (6, 3, 8, 5), (3, 1, 12, 16),
                                                                (2, 2, 10, 1)])
def test_mixed_batch_matches_contiguous_attention(heads, kv_heads, head_dim, block_size, head_major):
    seqs = [(0, 1), (6, 1), (17, 1), (0, 9), (5, 7), (11, 3)]   # 3 decodes, a fresh prompt, 2 later chunks
    out, expected = run_case(0, heads, kv_heads, head_dim, block_size, seqs, head_major=head_major)
    assert out.shape == expected.shape
    assert (out - expected).abs().max().item() < ATOL


def test_decodes_of_very_different_lengths_attend_in_groups():
    """Decodes attend in groups of similar length (keys padded per group, not to the batch's
    longest); the rows come back in the step's order with the same numbers."""
    assert decode_groups(torch.tensor([300, 4, 151, 3, 291]), 4) == [[0, 4], [2], [1, 3]]
    assert decode_groups(torch.tensor([40, 30, 20]), 4) == [[0, 1, 2]]  # padding under the overhead
    seqs = [(299, 1), (3, 1), (150, 1), (2, 1), (290, 1), (0, 5)]
    for head_major in (True, False):
        out, expected = run_case(4, 4, 2, 8, 4, seqs, head_major=head_major)
        assert (out - expected).abs().max().item() < ATOL


@pytest.mark.parametrize("window,softcap", [(4, None), (None, 5.0), (3, 2.0)])
def test_sliding_window_and_softcap(window, softcap):
    seqs = [(9, 1), (2, 1), (0, 13), (7, 6)]
    out, expected = run_case(1, 4, 2, 8, 4, seqs, sliding_window=window, softcap=softcap)
    assert (out - expected).abs().max().item() < ATOL


def test_a_wrong_block_table_gives_wrong_numbers():
    """The check above can fail: swap two pages of one sequence's table and the result changes.
    (Full causal attention of one query is blind to the order of its keys; a window is not.)"""
    seqs = [(10, 1)]
    out, expected = run_case(2, 2, 1, 8, 4, seqs, sliding_window=4)
    assert (out - expected).abs().max().item() < ATOL
    # Same case with the table's first two pages swapped in the step metadata.
    g_out, _ = run_case_swapped(2, 2, 1, 8, 4, seqs, 4)
    assert (g_out - expected).abs().max().item() > 1e-3


def run_case_swapped(*args):
    original = PagedStep.__init__

    def swapped(self, pool, slot_mapping, block_tables, seq_lens, query_start, num_decodes):
        tables = block_tables.clone()
        tables[:, [0, 1]] = tables[:, [1, 0]]
        original(self, pool, slot_mapping, tables, seq_lens, query_start, num_decodes)

    PagedStep.__init__ = swapped
    try:
        return run_case(*args)
    finally:
        PagedStep.__init__ = original


def test_pool_layouts():
    """CPU pools store K/V head-major behind the same [pages, rows, heads, D] indexing; pages
    added later (the bucketing scratch page) keep the layout and the contents."""
    pool = KVPool(3, 4, layer_shapes={0: (2, 8, 8)})
    assert pool.head_major and pool.k[0].shape == (3, 4, 2, 8)
    assert pool.k[0].permute(2, 0, 1, 3).is_contiguous() and not pool.k[0].is_contiguous()
    pool.k[0][1, 2, 1] = 7.0
    assert pool.add_page() == 3 and pool.k[0].shape == (4, 4, 2, 8) and pool.k[0].permute(2, 0, 1, 3).is_contiguous()
    assert pool.k[0][1, 2, 1].eq(7.0).all() and pool.k[0].sum() == 7.0 * 8
    assert KVPool(3, 4, device="meta", layer_shapes={0: (2, 8, 8)}).k[0].is_contiguous()  # non-CPU: page-major


@pytest.mark.parametrize("head_major", [True, False], ids=["head-major", "page-major"])
def test_pool_copy_blocks_copies_every_layer(head_major):
    pool = KVPool(4, 2, layer_shapes={0: (1, 2, 2), 3: (2, 2, 2)}, head_major=head_major)
    for layer in (0, 3):
        pool.k[layer][1] = layer + 1.0
        pool.v[layer][1] = layer + 2.0
    pool.copy_blocks([(1, 2)])
    for layer in (0, 3):
        assert torch.equal(pool.k[layer][2], pool.k[layer][1]) and torch.equal(pool.v[layer][2], pool.v[layer][1])
    assert not torch.equal(pool.k[0][0], pool.k[0][1])
    assert KVPool.bytes_per_block(2, {0: (1, 2, 2), 3: (1, 2, 2)}, 4) == 2 * 4 * 2 * (2 + 2)


# Scales near max|x| / 127 of the unit-normal test data (some values saturate, as in real use).
KV_QUANT = dict(k_scale=(0.03, 0.04), v_scale=(0.035, 0.025))


@pytest.mark.parametrize("head_major", [True, False], ids=["head-major", "page-major"])
@pytest.mark.parametrize("kv_dtype", ["int8", "float8_e4m3fn"])
def test_quantized_pages_match_the_quantized_contiguous_reference(kv_dtype, head_major):
    """int8 / fp8 pages (written by write_kv, read back dequantized) give what the contiguous
    reference computes over dequantize(quantize(k)); and not what unquantized attention gives."""
    seqs = [(0, 1), (6, 1), (17, 1), (0, 9), (5, 7)]
    out, expected = run_case(3, 4, 2, 8, 4, seqs, quant=dict(KV_QUANT, kv_dtype=kv_dtype), head_major=head_major)
    assert (out - expected).abs().max().item() < ATOL
    plain, _ = run_case(3, 4, 2, 8, 4, seqs)
    assert (out - plain).abs().max().item() > 1e-4


def test_kv_quantization_round_trip_error_and_saturation():
    x = torch.randn(50, 3, 8, generator=torch.Generator().manual_seed(0)) * torch.tensor([0.5, 1.0, 4.0])[:, None]
    absmax = x.abs().amax(dim=(0, 2))
    scale = absmax / 127
    q = functional.quantize_kv(x, tuple(scale.tolist()), "int8")
    assert q.dtype == torch.int8 and q.abs().max().item() == 127
    assert ((functional.dequantize_kv(q, scale) - x).abs() <= scale[:, None] / 2 * (1 + 1e-5)).all()  # half a step
    scale = absmax / 448
    q = functional.quantize_kv(x, scale, "float8_e4m3fn")
    assert q.dtype == torch.float8_e4m3fn
    err = (functional.dequantize_kv(q, scale) - x).abs()
    # e4m3: 3 mantissa bits, so rounding is within 2^-4 of the value (2^-10 of the scale below 2^-6).
    assert (err <= torch.maximum(x.abs() * 2**-4, scale[:, None] * 2**-10) * (1 + 1e-5)).all()
    big = torch.full((1, 3, 8), 1e4)
    assert functional.quantize_kv(big, scale, "int8").max().item() == 127
    assert functional.quantize_kv(-big, scale, "float8_e4m3fn").float().min().item() == -448


@pytest.mark.parametrize("head_major", [True, False], ids=["head-major", "page-major"])
@pytest.mark.parametrize("seqs", [[(20, 1)], [(9, 1), (9, 1), (9, 1)], [(30, 1), (4, 1)], [(13, 5)]],
                         ids=["one-decode", "equal-decodes", "unequal-decodes", "one-prefill-chunk"])
@pytest.mark.parametrize("sliding_window", [None, 6])
def test_pages_in_order_and_reused_step_metadata_match_contiguous_attention(seqs, sliding_window, head_major):
    """The fast paths: one sequence on consecutive pages attends to a view of them (no gather),
    decodes of equal length need no mask, and the second and later layers of a step reuse what
    the first derived from the block tables (``repeat``)."""
    for scattered in (False, True):
        out, expected = run_case(3, 4, 2, 8, 4, seqs, sliding_window=sliding_window, head_major=head_major,
                                 scattered=scattered, repeat=3)
        assert (out - expected).abs().max().item() < ATOL

