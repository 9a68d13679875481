"""Static step shapes: pad every forward step to the smallest compiled bucket that holds it.

The bucketing pass records the target's buckets in plan.json (``buckets``): token counts per step
(``token``) and batch sizes of decode-only steps (``batch``). ``BucketedForward`` wraps a package's
``forward`` so that each step runs at one of those shapes — what CUDA graphs and shape-specialized
kernels need: a decode-only step of B sequences grows to the smallest batch bucket >= B with pad
decode rows, any other step to the smallest token bucket >= T with one pad prefill chunk.

Pad rows are sequences of their own over a scratch KV page appended to the pool (the block manager
never hands it out): each pad token sits at position 0 and writes its k/v to that page, so it can
neither read nor overwrite a real sequence's cache, and its output rows are dropped. CUDA-graph
capture per bucket is not done here; on CPU there is nothing to capture, and the padding (with the
shape set it produces) is what a capture would rely on.
"""

from collections import Counter
from dataclasses import replace

import torch


def smallest_at_least(buckets, size):
    """The smallest bucket >= size, or None when every bucket is smaller."""
    return next((b for b in buckets if b >= size), None)


class BucketedForward:
    """``forward(weights, ids, positions, kv)`` run at bucketed shapes; counts what it ran."""

    def __init__(self, forward, token_buckets, batch_buckets):
        self.forward = forward
        self.token_buckets = sorted(token_buckets)
        self.batch_buckets = sorted(batch_buckets)
        self.shapes = Counter()        # ("tokens", T) / ("batch", B) -> steps run at that shape
        self.real_tokens = 0
        self.padded_tokens = 0

    @property
    def padding_waste(self):
        """Fraction of the rows computed that were padding."""
        total = self.real_tokens + self.padded_tokens
        return self.padded_tokens / total if total else 0.0

    def metrics(self):
        return {"bucket_padding_waste": self.padding_waste, "bucket_real_tokens": self.real_tokens,
                "bucket_padded_tokens": self.padded_tokens}

    def __call__(self, weights, ids, positions, kv):
        tokens, seqs = len(ids), len(kv.query_start) - 1
        decode_only = kv.num_decodes == seqs
        kind, size = ("batch", smallest_at_least(self.batch_buckets, seqs)) if decode_only else (
            "tokens", smallest_at_least(self.token_buckets, tokens))
        if size is None:  # larger than every bucket (only a direct prefill call can be): run as is
            self.shapes[("unbucketed", tokens)] += 1
            return self.forward(weights, ids, positions, kv)
        self.shapes[(kind, size)] += 1
        pad = size - tokens
        self.real_tokens += tokens
        self.padded_tokens += pad
        if pad == 0:
            return self.forward(weights, ids, positions, kv)
        out = self.forward(weights, *self._padded(ids, positions, kv, pad, decode_only))
        if kv.logits_indices is None:  # every row came back: drop the pad rows
            out = {name: value[:tokens] for name, value in out.items()}
        return out

    def _padded(self, ids, positions, kv, pad, decode_only):
        scratch = scratch_page(kv.pool)
        dev = ids.device
        zeros = torch.zeros(pad, dtype=ids.dtype, device=dev)
        slots = torch.full((pad,), scratch * kv.pool.block_size, dtype=kv.slot_mapping.dtype, device=dev)
        rows = 1 if not decode_only else pad  # one pad prefill chunk, or pad one-token decodes
        table = torch.zeros(rows, kv.block_tables.shape[1], dtype=kv.block_tables.dtype, device=dev)
        table[:, 0] = scratch
        end = kv.query_start[-1]
        starts = list(kv.query_start) + ([end + pad] if not decode_only else [end + i + 1 for i in range(pad)])
        step = replace(kv, slot_mapping=torch.cat([kv.slot_mapping, slots]),
                       block_tables=torch.cat([kv.block_tables, table]),
                       seq_lens=torch.cat([kv.seq_lens, torch.ones(rows, dtype=kv.seq_lens.dtype, device=dev)]),
                       query_start=starts, num_decodes=kv.num_decodes + (pad if decode_only else 0))
        return torch.cat([ids, zeros]), torch.cat([positions, zeros.to(positions.dtype)]), step


def scratch_page(pool):
    """The id of the pool's scratch page (one past the pages the block manager owns), appended to
    every layer's pages on first use."""
    if getattr(pool, "scratch_page", None) is None:
        pool.scratch_page = pool.add_page()
    return pool.scratch_page


def bucketed(forward, plan):
    """``forward`` wrapped in ``BucketedForward`` when plan.json enables buckets, else as is."""
    buckets = plan.get("buckets") or {}
    if not buckets.get("enabled"):
        return forward
    return BucketedForward(forward, buckets["token"], buckets["batch"])
