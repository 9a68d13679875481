"""Attention over a paged KV cache: the page pool, one step's attention metadata, and the math.

The KV cache of every layer is a pool of fixed-size pages, ``[num_blocks, block_size, kv_heads,
head_dim]`` as indexed (on CPU a view of head-major storage ``[kv_heads, num_blocks, block_size,
head_dim]``, see ``KVPool``); a sequence owns a list of page ids (its *block table*) and token ``i`` of the sequence
lives in page ``block_table[i // block_size]`` at row ``i % block_size``. One forward step runs the
tokens of many sequences flattened together (``[T, features]``): decodes (one query token each)
first, then prefill chunks. ``paged_attention`` first writes every new token's k/v into its slot
(``slot_mapping``), then each query attends to its sequence's keys through the block table — so a
sequence may read pages another sequence of the same step writes (a shared prefix), and a prefill
chunk sees the pages computed in earlier steps.

The functions here are the torch (ATen) implementation: a gather of the block table's pages and a
masked softmax in float32, the same math as ``functional.attention``. llmc's IR reference for the
``paged_attention`` op calls ``paged_attention``, and the torch backend copies this module's
functions into every generated model.py. Key ``j`` of a sequence sits at position ``j``: the
runtime always fills a sequence's cache from position 0 without gaps.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .functional import dequantize_kv, quantize_kv, rope, rope_tables


class KVPool:
    """The K and V pages of every layer, allocated up front (``layer_shapes``) or on first use.

    ``dtype`` is the activations' dtype, or ``torch.int8`` / ``torch.float8_e4m3fn`` when the graph
    quantizes the KV cache (one byte per element: a quarter of float32's pages' bytes).

    Every layer's pages are indexed ``[num_blocks, block_size, kv_heads, head_dim]``. With
    ``head_major`` (the default on CPU) that is a permuted view of storage laid out ``[kv_heads,
    num_blocks, block_size, head_dim]``: a page of one KV head is then one contiguous
    ``block_size * head_dim`` run, so ``gather_pages`` gathers a batch's pages straight into the
    head-major layout ``attend`` multiplies, one pass over the cache instead of a gather and a
    transposing copy (bench/RESULTS.md). Code that uses strides (the Triton kernels) reads either."""

    def __init__(self, num_blocks, block_size, dtype=torch.float32, device="cpu", layer_shapes=None,
                 head_major=None):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.dtype = dtype
        self.device = torch.device(device)
        self.head_major = self.device.type == "cpu" if head_major is None else head_major
        self.extra_pages = 0  # pages past num_blocks the block manager never hands out (add_page)
        self.k = {}
        self.v = {}
        for layer, (kv_heads, head_dim, v_head_dim) in (layer_shapes or {}).items():
            self._allocate(layer, kv_heads, head_dim, v_head_dim)

    def _pages(self, num_blocks, kv_heads, head_dim):
        if self.head_major:
            storage = torch.zeros(kv_heads, num_blocks, self.block_size, head_dim, dtype=self.dtype, device=self.device)
            return storage.permute(1, 2, 0, 3)
        return torch.zeros(num_blocks, self.block_size, kv_heads, head_dim, dtype=self.dtype, device=self.device)

    def _allocate(self, layer, kv_heads, head_dim, v_head_dim):
        pages = self.num_blocks + self.extra_pages
        self.k[layer] = self._pages(pages, kv_heads, head_dim)
        self.v[layer] = self._pages(pages, kv_heads, v_head_dim)

    def layer(self, layer, kv_heads, head_dim, v_head_dim):
        """The (k, v) pages of ``layer``; allocated on the first call when not sized up front."""
        if layer not in self.k:
            self._allocate(layer, kv_heads, head_dim, v_head_dim)
        return self.k[layer], self.v[layer]

    def add_page(self):
        """Append one zeroed page to every layer (same layout) and return its id; the block manager
        never hands it out (the bucketing pass's scratch page)."""
        page = self.num_blocks + self.extra_pages
        for pages in (self.k, self.v):
            for layer, tensor in list(pages.items()):
                grown = self._pages(page + 1, tensor.shape[2], tensor.shape[3])
                grown[:page] = tensor
                pages[layer] = grown
        self.extra_pages += 1
        return page

    @staticmethod
    def bytes_per_block(block_size, layer_shapes, dtype_bytes):
        """Bytes one page id costs across all layers (K and V)."""
        return block_size * dtype_bytes * sum(kvh * (hd + vhd) for kvh, hd, vhd in layer_shapes.values())

    def copy_blocks(self, pairs):
        """Copy page ``src`` to page ``dst`` in every layer (copy-on-write of a shared page)."""
        if not pairs:
            return
        src = torch.tensor([s for s, _ in pairs], device=self.device)
        dst = torch.tensor([d for _, d in pairs], device=self.device)
        for pages in (*self.k.values(), *self.v.values()):
            pages[dst] = pages[src]


def head_major_storage(pages):
    """The ``[kv_heads, num_blocks, block_size, D]`` storage behind head-major ``pages``, or None
    when the pages are laid out as indexed."""
    storage = pages.permute(2, 0, 1, 3)
    return storage if storage.is_contiguous() and not pages.is_contiguous() else None


@dataclass
class PagedStep:
    """Attention metadata of one forward step over ``B`` sequences and ``T`` tokens.

    Sequences ``0 .. num_decodes-1`` contribute one query token each; the rest are prefill chunks.
    ``query_start[i]:query_start[i+1]`` are sequence i's rows of the step, ``seq_lens[i]`` its cached
    length after the step, ``block_tables[i]`` its page ids (padded with 0 past its last page).
    """

    pool: KVPool
    slot_mapping: torch.Tensor   # [T] int64: page * block_size + row of each new token
    block_tables: torch.Tensor   # [B, max pages] int64
    seq_lens: torch.Tensor       # [B] int64
    query_start: list            # B + 1 python ints
    num_decodes: int
    logits_indices: torch.Tensor = None  # [S] rows whose logits are sampled (select_rows); None = all
    decode_groups: tuple = None  # (the decodes grouped by length (``decode_groups``) with what every
                                 # layer's attention reuses, the order to put their rows back in),
                                 # set by the first layer's paged_attention
    rope_tables: tuple = None    # (rope arguments, ``rope_tables``) of this step, set by the first layer

    def begin_step(self, positions):
        """Nothing to prepare: the runtime built this step's metadata (single-sequence caches do more)."""


def write_kv(k_pages, v_pages, k, v, slot_mapping, kv_dtype=None, k_scale=None, v_scale=None):
    """Store this step's ``k`` [T, kv_heads, D] / ``v`` into their slots of the layer's pages;
    with ``kv_dtype`` quantized first with the per-KV-head scales (``quantize_kv``)."""
    if kv_dtype:
        k, v = quantize_kv(k, k_scale, kv_dtype), quantize_kv(v, v_scale, kv_dtype)
    for pages, new in ((k_pages, k), (v_pages, v)):
        new = new.to(pages.dtype)
        storage = head_major_storage(pages)
        if storage is not None:  # [KVH, slots, D]: each head's rows of this step, [KVH, T, D]
            flat, new, dim = storage.view(storage.shape[0], -1, storage.shape[3]), new.transpose(0, 1), 1
        else:
            flat, dim = pages.view(-1, *pages.shape[2:]), 0
        if pages.element_size() == 1:  # copied as bytes: there is no CPU index_copy_ for float8
            flat, new = flat.view(torch.uint8), new.view(torch.uint8)
        flat.index_copy_(dim, slot_mapping, new)


def attention_probs(q, keys, q_pos, k_len, scale, causal, sliding_window, softcap):
    """The attention weights of ``q`` [B, Tq, H, D] over ``keys`` [KVH, B, S, D] (head-major, as
    ``gather_pages`` returns them): [KVH, B, G, Tq, S], G = H // KVH query heads per KV head.

    Key j of row b sits at position j and exists when ``j < k_len[b]`` (``k_len`` None: all S keys
    exist); query t of row b is at ``q_pos[b, t]``. GQA groups queries per KV head instead of
    repeating K. float32 math.
    """
    b, tq, h, d = q.shape
    kvh, s = keys.shape[0], keys.shape[2]
    g = h // kvh
    # Queries grouped per KV head, [KVH*B, G*Tq, D]: one batched matmul per (KV head, sequence)
    # reads each key once. Head-major K flattens to the batch dim as a view, and Kᵀ is a
    # transposed view BLAS takes as is: no copy of the cache beyond the gather.
    qg = q.float().reshape(b, tq, kvh, g, d).permute(2, 0, 3, 1, 4).reshape(kvh * b, g * tq, d)
    scores = torch.bmm(qg, keys.flatten(0, 1).transpose(1, 2)).view(kvh, b, g, tq, s) * scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    if k_len is None and not causal and not sliding_window:
        return torch.softmax(scores, -1)
    kpos = torch.arange(s, device=q.device)
    if k_len is None:
        allowed = torch.ones(b, 1, s, dtype=torch.bool, device=q.device)
    else:
        allowed = kpos[None, None, :] < k_len[:, None, None]                 # [B, 1, S]
    if causal:
        allowed = allowed & (kpos[None, None, :] <= q_pos[:, :, None])       # [B, Tq, S]
    if sliding_window:
        allowed = allowed & (q_pos[:, :, None] - kpos[None, None, :] < sliding_window)
    scores = scores.masked_fill(~allowed[None, :, None], -math.inf)          # [KVH, B, G, Tq, S]
    return torch.softmax(scores, -1)


def attend(q, keys, values, q_pos, k_len, scale, causal, sliding_window, softcap):
    """Attention of ``q`` [B, Tq, H, D] over ``keys`` [KVH, B, S, D] / ``values`` [KVH, B, S, Dv]
    (``attention_probs``, then one batched matmul with the values): [B, Tq, H*Dv], float32."""
    probs = attention_probs(q, keys, q_pos, k_len, scale, causal, sliding_window, softcap)
    kvh, b, g, tq, s = probs.shape
    out = torch.bmm(probs.view(kvh * b, g * tq, s), values.flatten(0, 1)).view(kvh, b, g, tq, -1)
    return out.permute(1, 3, 0, 2, 4).reshape(b, tq, -1)


def memoized(memo, key, compute):
    """``compute()``, kept in ``memo`` under ``key`` for the next call (``memo`` None: no keeping)."""
    if memo is None:
        return compute()
    if key not in memo:
        memo[key] = compute()
    return memo[key]


def weighted_value_rows(storage, block_tables, probs, memo=None):
    """``probs`` [KVH, B, G, 1, S] times each sequence's values, read in place from head-major
    value storage [KVH, pages, block_size, Dv] through the block tables: [B, KVH*G*Dv].

    One ``embedding_bag`` (a weighted sum of table rows per bag) per call: every (KV head,
    sequence, query head) is a bag of its S value rows weighted by its probabilities, so the
    values are read once and never gathered (7x the gather + bmm it replaces for a batch of 16
    decodes at 288 keys, float32, on the dev machine; bench/RESULTS.md). ``memo``: see
    ``paged_decode_attention``."""
    kvh, num_blocks, block_size, dv = storage.shape
    _, b, g, _, s = probs.shape

    def bags():
        width = -(-s // block_size)  # pages holding the S keys (the last one maybe in part)
        slots = (block_tables[:, :width, None] * block_size
                 + torch.arange(block_size, device=probs.device)).view(b, -1)[:, :s]          # [B, S]
        heads = torch.arange(kvh, device=probs.device).view(kvh, 1, 1) * (num_blocks * block_size)
        rows = (heads + slots).view(kvh, b, 1, s).expand(kvh, b, g, s).reshape(-1)
        return rows, torch.arange(0, rows.numel(), s, device=probs.device)

    rows, offsets = memoized(memo, ("value rows", kvh, num_blocks, g, s), bags)
    out = F.embedding_bag(rows, storage.view(-1, dv), offsets, mode="sum", per_sample_weights=probs.reshape(-1))
    return out.view(kvh, b, g, dv).permute(1, 0, 2, 3).reshape(b, -1)


def slot_mapping(block_tables, rows, positions, block_size):
    """The slot of each new token: the page its sequence (``rows[t]``, a row of ``block_tables``)
    holds position ``positions[t]`` in, times the page size, plus the offset in that page."""
    return block_tables[rows, positions // block_size] * block_size + positions % block_size


def batch_step(pool, chunks, logits_rows):
    """The inputs of one forward step over several sequences: ``(input_ids, positions, PagedStep)``.

    ``chunks[i] = (tokens, start, blocks)``: sequence i computes ``tokens`` at positions ``start,
    start + 1, ...`` and owns the pages ``blocks``; one-token chunks (decodes) come first.
    ``logits_rows`` are the rows of the flattened step whose logits the step computes."""
    as_tensor = lambda x: torch.tensor(x, dtype=torch.int64, device=pool.device)  # noqa: E731
    ids, positions, starts, seq_lens = [], [], [0], []
    for tokens, start, _ in chunks:
        ids.extend(tokens)
        positions.extend(range(start, start + len(tokens)))
        starts.append(starts[-1] + len(tokens))
        seq_lens.append(start + len(tokens))
    width = max(len(blocks) for _, _, blocks in chunks)
    tables = as_tensor([list(blocks) + [0] * (width - len(blocks)) for _, _, blocks in chunks])
    positions = as_tensor(positions)
    token_rows = torch.repeat_interleave(torch.arange(len(chunks), device=pool.device),
                                         as_tensor([len(tokens) for tokens, _, _ in chunks]))
    slots = slot_mapping(tables, token_rows, positions, pool.block_size)
    num_decodes = next((i for i, (tokens, _, _) in enumerate(chunks) if len(tokens) != 1), len(chunks))
    step = PagedStep(pool, slots, tables, as_tensor(seq_lens), starts, num_decodes, as_tensor(logits_rows))
    return as_tensor(ids), positions, step


def sequence_step(pool, blocks, positions, logits_indices=None):
    """The metadata of a step computing ``positions`` (consecutive) of one sequence owning ``blocks``."""
    table = torch.tensor([blocks], dtype=torch.int64, device=pool.device)
    positions = positions.to(pool.device)
    slots = slot_mapping(table, torch.zeros_like(positions), positions, pool.block_size)
    lens = torch.tensor([int(positions[-1]) + 1], device=pool.device)
    return PagedStep(pool, slots, table, lens, [0, len(positions)], int(len(positions) == 1), logits_indices)


def gather_pages(pages, block_tables, length, scale=None, memo=None):
    """The cached rows of each sequence's first ``length`` positions, float32 and head-major
    [KVH, B, S, D] with S = ``length`` rounded up to whole pages (rows past a sequence's length
    are whatever its pages hold: ``attend`` masks them); dequantized with the per-KV-head
    ``scale`` when the pages are int8/fp8.

    Head-major pages (``KVPool``): one ``index_select`` of whole pages per head is the result, or
    for one sequence whose pages are consecutive (a fresh pool hands them out in order) a view of
    them, no copy at all (float32 pages). Otherwise one row gather of whole pages and a copy into
    the head-major layout. ``memo``: see ``paged_decode_attention``."""
    num_blocks, block_size, kvh, d = pages.shape
    width = -(-length // block_size)  # pages that hold them
    storage = head_major_storage(pages)

    def page_index():
        index = block_tables[:, :width].flatten()
        if storage is not None and len(block_tables) == 1 and torch.equal(index, torch.arange(
                int(index[0]), int(index[0]) + width, device=index.device)):
            return int(index[0])  # the first of the consecutive pages
        return index

    index = memoized(memo, ("pages", width), page_index)
    flat = storage.view(kvh, num_blocks, -1) if storage is not None else pages.view(num_blocks, -1)
    if pages.element_size() == 1:  # gathered as bytes: there is no CPU index_select for float8
        flat = flat.view(torch.uint8)
    if storage is not None:
        if isinstance(index, int):
            rows = flat.narrow(1, index, width)
        else:  # one index_select over [KVH * pages, page]: 4x the same select along dim 1 (B=16, 19 pages)
            flat_index = memoized(memo, ("head pages", width, kvh, num_blocks), lambda: (
                torch.arange(kvh, device=index.device)[:, None] * num_blocks + index[None, :]).reshape(-1))
            rows = flat.reshape(kvh * num_blocks, -1).index_select(0, flat_index)
        rows = rows.view(pages.dtype).view(kvh, len(block_tables), width * block_size, d)
        if scale is not None:
            return rows.float() * scale.view(kvh, 1, 1, 1)
        return rows.float()
    rows = flat.index_select(0, index).view(pages.dtype).view(len(block_tables), width * block_size, kvh, d)
    if scale is not None:  # quantized pages: float32 values before attention
        rows = dequantize_kv(rows, scale)
    out = torch.empty((kvh, len(block_tables), width * block_size, d), dtype=torch.float32, device=pages.device)
    return out.copy_(rows.permute(2, 0, 1, 3))


def decode_groups(seq_lens, block_size, overhead=256):
    """The decode rows in groups of similar length, longest first: each group attends over keys
    padded to its own longest sequence, not the batch's. Greedy over the rows by decreasing
    length: a new group starts when keeping the rest in the current one would pad them by more
    than ``overhead`` key rows in total (the cost of one more attention call, in gathered rows)."""
    lens = [-(-n // block_size) * block_size for n in seq_lens.tolist()]
    order = sorted(range(len(lens)), key=lambda i: -lens[i])
    groups, top = [], None
    for n, i in enumerate(order):
        if top is None or (top - lens[i]) * (len(order) - n) > overhead:
            groups.append([])
            top = lens[i]
        groups[-1].append(i)
    return groups


def paged_decode_attention(q, k_pages, v_pages, block_tables, seq_lens, positions, num_heads, head_dim,
                           scale, causal, sliding_window, softcap, k_scale=None, v_scale=None, memo=None):
    """One query token per sequence (``q`` [B, H*D]) over each sequence's pages, batched. Float32
    head-major value pages (CPU pools) are read in place (``weighted_value_rows``).

    The runtime's decodes query their sequence's last token (key j sits at position j, the query
    at ``seq_len - 1``), so causality excludes nothing the length mask keeps: no causal mask then.
    When every sequence also has the same length (one decode, or a group of equal ones) the keys
    are cut to it and need no mask at all.

    ``memo``: a dict that lives for one step's call on these block tables in every layer; what the
    first layer derives from them (lengths, page and value-row indices) the others reuse, about a
    dozen small ops per layer."""
    memo = {} if memo is None else memo
    if "longest" not in memo:
        memo["longest"] = int(seq_lens.max())
        memo["causal"] = causal and not torch.equal(positions, seq_lens - 1)
        memo["equal"] = int(seq_lens.min()) == memo["longest"] and not memo["causal"]
    longest, causal = memo["longest"], memo["causal"]
    keys = gather_pages(k_pages, block_tables, longest, k_scale, memo)
    lens = seq_lens
    if memo["equal"]:
        keys, lens = keys[:, :, :longest], None
    q = q.reshape(len(q), 1, num_heads, head_dim)
    storage = head_major_storage(v_pages)
    in_place = isinstance(memo.get(("pages", -(-longest // k_pages.shape[1]))), int)  # values are a view too
    if storage is not None and v_pages.dtype == torch.float32 and v_scale is None and not in_place:
        probs = attention_probs(q, keys, positions[:, None], lens, scale, causal, sliding_window, softcap)
        return weighted_value_rows(storage, block_tables, probs, memo)
    values = gather_pages(v_pages, block_tables, longest, v_scale, memo)[:, :, :keys.shape[2]]
    out = attend(q, keys, values, positions[:, None], lens, scale, causal, sliding_window, softcap)
    return out.reshape(len(q), -1)


def paged_prefill_attention(q, k_pages, v_pages, block_table, seq_len, positions, num_heads, head_dim,
                            scale, causal, sliding_window, softcap, k_scale=None, v_scale=None):
    """A chunk of one sequence's tokens (``q`` [Tq, H*D]) over its pages (earlier chunks included)."""
    keys = gather_pages(k_pages, block_table[None], seq_len, k_scale)
    values = gather_pages(v_pages, block_table[None], seq_len, v_scale)
    lens = torch.tensor([seq_len], device=q.device)
    out = attend(q.reshape(1, len(q), num_heads, head_dim), keys, values, positions[None], lens,
                 scale, causal, sliding_window, softcap)
    return out.reshape(len(q), -1)


def paged_attention(q, k, v, positions, kv, layer, num_heads, num_kv_heads, head_dim, scale, causal,
                    sliding_window, softcap, kv_dtype=None, k_scale=None, v_scale=None,
                    inv_freq=None, rope_dim=0, rope_interleaved=False, rope_scaling=1.0):
    """Write this step's k/v into the pages, then decode and prefill attention over them.

    With ``kv_dtype`` ("int8" / "float8_e4m3fn") the pages hold k/v quantized with static
    per-KV-head ``k_scale`` / ``v_scale``, dequantized to float32 when read. ``rope_dim`` > 0
    applies ``rope`` to q and k first, so the pages hold rotated keys (as when rope is its own op)."""
    if rope_dim:
        # Every layer of a step rotates by the same angles: the tables are computed once per step
        # (a third of a batch-1 decode layer's attention time on CPU when done per layer).
        key, cached = (id(inv_freq), rope_dim, rope_interleaved, rope_scaling, q.dtype), getattr(kv, "rope_tables", None)
        if cached is None or cached[0] != key:
            cached = kv.rope_tables = (key, rope_tables(positions, inv_freq, rope_scaling, rope_interleaved, q.dtype))
        q = rope(q, positions, inv_freq, head_dim, rope_dim, rope_interleaved, rope_scaling, cached[1])
        k = rope(k, positions, inv_freq, head_dim, rope_dim, rope_interleaved, rope_scaling, cached[1])
    k = k.reshape(len(k), num_kv_heads, head_dim)
    v = v.reshape(len(v), num_kv_heads, -1)
    k_pages, v_pages = kv.pool.layer(layer, num_kv_heads, head_dim, v.shape[-1])
    if kv_dtype:
        k_scale = torch.tensor(k_scale, dtype=torch.float32, device=q.device)
        v_scale = torch.tensor(v_scale, dtype=torch.float32, device=q.device)
    elif k_pages.element_size() == 1:
        raise ValueError(f"layer {layer}: the KV pages are {k_pages.dtype} but the graph does not quantize k/v")
    write_kv(k_pages, v_pages, k, v, kv.slot_mapping, kv_dtype, k_scale, v_scale)
    options = dict(num_heads=num_heads, head_dim=head_dim, scale=scale, causal=causal,
                   sliding_window=sliding_window, softcap=softcap, k_scale=k_scale, v_scale=v_scale)
    parts = []  # (first row, output rows)
    nd = kv.num_decodes
    if nd:
        if getattr(kv, "decode_groups", None) is None:  # once per step (every layer groups alike)
            groups = [torch.tensor(group, device=q.device)
                      for group in decode_groups(kv.seq_lens[:nd], k_pages.shape[1])]
            # ([(rows, their block tables, lengths, positions, memo) per group], the order to put
            # the rows back in: None for one group of all the decodes in order)
            if len(groups) == 1:
                kv.decode_groups = ([(None, kv.block_tables[:nd], kv.seq_lens[:nd], positions[:nd], {})], None)
            else:
                kv.decode_groups = ([(rows, kv.block_tables.index_select(0, rows), kv.seq_lens.index_select(0, rows),
                                      positions.index_select(0, rows), {}) for rows in groups], torch.cat(groups))
        groups, order = kv.decode_groups
        if order is None:
            _, tables, lens, pos, memo = groups[0]
            out = paged_decode_attention(q[:nd], k_pages, v_pages, tables, lens, pos, **options, memo=memo)
        else:  # one call per group of similar lengths, the rows put back in order
            got = torch.cat([paged_decode_attention(q.index_select(0, rows), k_pages, v_pages, tables, lens, pos,
                                                    **options, memo=memo)
                             for rows, tables, lens, pos, memo in groups])
            out = torch.empty_like(got).index_copy_(0, order, got)
        parts.append((0, out))
    chunks = [(kv.query_start[i], kv.query_start[i + 1], i) for i in range(nd, len(kv.query_start) - 1)]
    # Short chunks (up to 16 tokens: speculative verification runs k + 1) share one attention call,
    # each padded to the longest with copies of its last query (computed, then dropped): one call
    # per layer instead of one per sequence, the per-call overhead that dominated such steps on CPU.
    short = [c for c in chunks if c[1] - c[0] <= 16]
    if len(short) > 1:
        width = max(stop - start for start, stop, _ in short)
        rows = torch.tensor([min(start + t, stop - 1) for start, stop, _ in short for t in range(width)],
                            device=q.device)
        seqs = torch.tensor([i for _, _, i in short], device=q.device)
        lens, tables = kv.seq_lens.index_select(0, seqs), kv.block_tables.index_select(0, seqs)
        longest = int(lens.max())
        out = attend(q.index_select(0, rows).reshape(len(short), width, num_heads, head_dim),
                     gather_pages(k_pages, tables, longest, k_scale), gather_pages(v_pages, tables, longest, v_scale),
                     positions.index_select(0, rows).view(len(short), width), lens, scale, causal, sliding_window,
                     softcap)
        parts += [(start, out[j, :stop - start]) for j, (start, stop, _) in enumerate(short)]
        chunks = [c for c in chunks if c[1] - c[0] > 16]
    for start, stop, i in chunks:
        parts.append((start, paged_prefill_attention(q[start:stop], k_pages, v_pages, kv.block_tables[i],
                                                     int(kv.seq_lens[i]), positions[start:stop], **options)))
    parts.sort(key=lambda part: part[0])
    out = parts[0][1] if len(parts) == 1 else torch.cat([rows for _, rows in parts])
    return out.to(q.dtype)


def select_rows(x, kv):
    """The rows of ``x`` the step samples from (``kv.logits_indices``); all rows if it names none."""
    rows = getattr(kv, "logits_indices", None)
    return x if rows is None else x.index_select(0, rows)
