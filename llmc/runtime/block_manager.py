"""The KV block manager: which pages each sequence owns, shared prefixes, copy-on-write, eviction.

Pages (blocks) are ref-counted. A *full* block is identified by the hash chain of its tokens
(``hash(previous block's hash, this block's token ids)``), so equal prefixes — a shared system
prompt, a repeated document, a preempted sequence coming back — map to the same blocks and are
computed once. A block whose ref count drops to 0 keeps its contents and its hash in the free list
(least recently freed first), so it can still be hit until an allocation takes it over: that is the
LRU eviction. A block shared by several sequences is never written in place: a sequence about to
write into a shared, partly filled block gets a private copy first (copy-on-write; it arises when a
sequence is forked, e.g. several samples of one prompt).

The manager only does bookkeeping in Python; the engine performs the copies it asks for on the
``KVPool`` tensors. Hashes are blake2b digests (collision-safe, unlike Python's ``hash``).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Sequence


def block_hash(previous: bytes | None, tokens: Sequence[int]) -> bytes:
    """The identity of a full block: its tokens, chained to everything before it."""
    digest = hashlib.blake2b(previous or b"", digest_size=16)
    digest.update(array("q", tokens).tobytes())
    return digest.digest()


@dataclass
class BlockTable:
    """One sequence's pages in order, and the hashes of its full blocks (a prefix of them)."""

    blocks: list[int] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)


class KVBlockManager:
    """Allocates, shares and frees the ``num_blocks`` pages of ``block_size`` tokens."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one token, got {num_blocks} x {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))  # LRU first
        self.cached: dict[bytes, int] = {}       # full-block hash -> block holding those tokens
        self.hash_of: dict[int, bytes] = {}      # block -> its hash while registered in ``cached``
        self.pending_copies: list[tuple[int, int]] = []  # (src, dst) for the engine to apply before the step
        self.num_copies = 0  # copy-on-writes so far

    # ---- queries ---------------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by some sequence (cached free blocks count as free)."""
        return 1 - len(self.free) / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefix caching --------------------------------------------------------------------------

    def full_block_hashes(self, tokens: Sequence[int], known: list[bytes] | None = None) -> list[bytes]:
        """Hash chain of every full block of ``tokens``, extending ``known`` (already-hashed blocks)."""
        hashes = list(known or [])
        bs = self.block_size
        for i in range(len(hashes), len(tokens) // bs):
            hashes.append(block_hash(hashes[-1] if hashes else None, tokens[i * bs:(i + 1) * bs]))
        return hashes

    def match_prefix(self, table: BlockTable, tokens: Sequence[int]) -> int:
        """Take the cached blocks of the longest cached prefix of ``tokens`` into ``table``; return
        how many tokens they hold. At least one token is always left to compute (its logits are
        needed), so a fully cached prompt leaves its last block to recompute."""
        assert not table.blocks, "match_prefix is for a sequence that holds no blocks yet"
        if not self.enable_prefix_caching:
            return 0
        usable = (len(tokens) - 1) // self.block_size
        for h in self.full_block_hashes(tokens[: usable * self.block_size]):
            block = self.cached.get(h)
            if block is None:
                break
            self._take(block)
            table.blocks.append(block)
            table.hashes.append(h)
        return len(table.blocks) * self.block_size

    def register_full_blocks(self, table: BlockTable, tokens: Sequence[int], num_tokens: int) -> None:
        """Record the hashes of the blocks that ``num_tokens`` (computed or scheduled) tokens fill.

        Called when a step is scheduled, before it runs: attention writes every new k/v before any
        query reads, so a sequence admitted later in the same step can already share these blocks.
        """
        if not self.enable_prefix_caching:
            return
        full = min(num_tokens, len(tokens)) // self.block_size
        if full <= len(table.hashes):
            return
        table.hashes = self.full_block_hashes(tokens[: full * self.block_size], table.hashes)
        for block, h in zip(table.blocks[:full], table.hashes):
            if h not in self.cached and block not in self.hash_of:
                self.cached[h] = block
                self.hash_of[block] = h

    # ---- allocation ------------------------------------------------------------------------------

    def can_allocate(self, table: BlockTable, num_computed: int, num_tokens: int) -> bool:
        """Whether ``table`` can grow to hold ``num_tokens`` tokens (counting a copy-on-write)."""
        need = max(0, self.blocks_needed(num_tokens) - len(table.blocks))
        return need + self._needs_copy(table, num_computed) <= len(self.free)

    def allocate(self, table: BlockTable, num_computed: int, num_tokens: int) -> None:
        """Grow ``table`` to hold ``num_tokens`` tokens, of which ``num_computed`` are already
        written; a shared block the new tokens would write into is copied first."""
        if not self.can_allocate(table, num_computed, num_tokens):
            raise MemoryError("out of KV blocks")  # callers check can_allocate; this is a bug guard
        if self._needs_copy(table, num_computed):
            i = num_computed // self.block_size
            old = table.blocks[i]
            new = self._pop_free()
            self.pending_copies.append((old, new))
            self.num_copies += 1
            self._release(old)
            table.blocks[i] = new
            del table.hashes[i:]  # the copy is private: it gets its own registration when full
        while len(table.blocks) < self.blocks_needed(num_tokens):
            table.blocks.append(self._pop_free())

    def fork(self, table: BlockTable) -> BlockTable:
        """A second sequence sharing all of ``table``'s blocks (each ref count goes up by one)."""
        for block in table.blocks:
            self._take(block)
        return BlockTable(list(table.blocks), list(table.hashes))

    def free_table(self, table: BlockTable) -> None:
        """Give back every block of ``table``; the last block goes first into the LRU list, so a
        sequence's tail is evicted before the prefix others are likelier to share."""
        for block in reversed(table.blocks):
            self._release(block)
        table.blocks.clear()
        table.hashes.clear()

    def truncate(self, table: BlockTable, num_tokens: int) -> None:
        """Give back the blocks past the first ``num_tokens`` tokens: the slots of speculative tokens
        that verification rejected. Those blocks were never registered in the prefix cache (only
        blocks full of a sequence's known tokens are), so nothing cached points at rejected k/v."""
        keep = self.blocks_needed(num_tokens)
        assert len(table.hashes) <= keep, "a block past the sequence's tokens was registered in the prefix cache"
        for block in reversed(table.blocks[keep:]):
            self._release(block)
        del table.blocks[keep:]

    def take_copies(self) -> list[tuple[int, int]]:
        copies, self.pending_copies = self.pending_copies, []
        return copies

    # ---- internals -------------------------------------------------------------------------------

    def _needs_copy(self, table: BlockTable, num_computed: int) -> bool:
        """Whether the partly filled block the next token writes into is shared with another sequence."""
        i = num_computed // self.block_size
        return (num_computed % self.block_size != 0 and i < len(table.blocks)
                and self.ref_counts[table.blocks[i]] > 1)

    def _take(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            del self.free[block]
        self.ref_counts[block] += 1

    def _release(self, block: int) -> None:
        self.ref_counts[block] -= 1
        assert self.ref_counts[block] >= 0, f"block {block} freed twice"
        if self.ref_counts[block] == 0:
            self.free[block] = None  # most recently freed: evicted last

    def _pop_free(self) -> int:
        block, _ = self.free.popitem(last=False)  # least recently freed
        h = self.hash_of.pop(block, None)
        if h is not None:  # evict: its old contents are about to be overwritten
            del self.cached[h]
        self.ref_counts[block] = 1
        return block
