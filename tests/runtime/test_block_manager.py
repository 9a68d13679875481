"""KVBlockManager: allocation, ref counts, prefix caching by hash chain, LRU eviction, copy-on-write."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from llmc.runtime.block_manager import BlockTable, KVBlockManager, block_hash


def grow(manager, table, computed, total):
    assert manager.can_allocate(table, computed, total)
    manager.allocate(table, computed, total)
    manager.register_full_blocks(table, TOKENS, total)


TOKENS = list(range(100, 200))


def test_allocate_and_free_counts_blocks():
    m = KVBlockManager(8, 4)
    t = BlockTable()
    grow(m, t, 0, 10)                       # 10 tokens -> 3 blocks
    assert len(t.blocks) == 3 and m.num_free_blocks == 5
    grow(m, t, 10, 12)                      # still fits in the third block
    assert len(t.blocks) == 3
    grow(m, t, 12, 13)
    assert len(t.blocks) == 4
    assert not m.can_allocate(t, 13, 40)     # 10 blocks > 8
    m.free_table(t)
    assert m.num_free_blocks == 8 and m.usage == 0 and t.blocks == []


def test_prefix_hit_shares_blocks_and_leaves_one_token_to_compute():
    m = KVBlockManager(16, 4)
    a = BlockTable()
    grow(m, a, 0, 10)                       # blocks 0,1 full (hashed), block 2 partial
    assert len(a.hashes) == 2
    b = BlockTable()
    assert m.match_prefix(b, TOKENS[:10]) == 8          # two full blocks
    assert b.blocks == a.blocks[:2] and all(m.ref_counts[x] == 2 for x in b.blocks)
    c = BlockTable()
    assert m.match_prefix(c, TOKENS[:8]) == 4           # fully cached prompt: recompute its last block
    d = BlockTable()
    assert m.match_prefix(d, [1] + TOKENS[1:10]) == 0   # first block differs: nothing matches
    e = BlockTable()
    assert m.match_prefix(e, TOKENS[:4] + [0] * 6) == 4  # the chain: block 2 differs, block 1 still hit


def test_hash_chain_depends_on_everything_before():
    assert block_hash(None, [1, 2]) != block_hash(block_hash(None, [0, 0]), [1, 2])
    assert block_hash(None, [1, 2]) == block_hash(None, (1, 2))


def test_freed_blocks_stay_cached_until_evicted_least_recent_first():
    m = KVBlockManager(4, 2)
    a, b = BlockTable(), BlockTable()
    grow(m, a, 0, 4)                         # 2 full blocks, cached
    m.free_table(a)                          # still cached, now free (tail block freed first)
    hit = BlockTable()
    assert m.match_prefix(hit, TOKENS[:5]) == 4
    m.free_table(hit)
    # Allocating 3 blocks takes the 2 never-used blocks first, then the least recently freed
    # cached one: the tail (second) block, freed before the head.
    m.allocate(b, 0, 5)
    assert len(m.cached) == 1
    again = BlockTable()
    assert m.match_prefix(again, TOKENS[:5]) == 2  # the head block is still a hit


def test_tail_is_evicted_before_the_shared_head():
    m = KVBlockManager(3, 2)
    a = BlockTable()
    grow(m, a, 0, 6)  # three full blocks, all cached
    m.free_table(a)   # freed tail first: LRU order is block 2, 1, 0
    b = BlockTable()
    m.allocate(b, 0, 1)  # takes one block: the tail's
    probe = BlockTable()
    assert m.match_prefix(probe, TOKENS[:6] + [0]) == 4  # the first two blocks survive


def test_fork_then_copy_on_write():
    m = KVBlockManager(8, 4)
    parent = BlockTable()
    grow(m, parent, 0, 6)                   # block 0 full, block 1 holds 2 tokens
    child = m.fork(parent)
    assert m.ref_counts[parent.blocks[1]] == 2
    # The child writes token 6 into the shared partial block: it gets a private copy first.
    assert m.can_allocate(child, 6, 7)
    m.allocate(child, 6, 7)
    copies = m.take_copies()
    assert copies == [(parent.blocks[1], child.blocks[1])] and child.blocks[1] != parent.blocks[1]
    assert child.blocks[0] == parent.blocks[0] and m.ref_counts[parent.blocks[0]] == 2
    assert m.ref_counts[parent.blocks[1]] == 1
    # The parent now owns its block alone and writes in place: no copy.
    m.allocate(parent, 6, 7)
    assert m.take_copies() == []


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["grow", "free", "fork", "match"]), st.integers(0, 5),
                          st.integers(1, 9)), max_size=40))
def test_ref_counts_always_match_the_tables(ops):
    """Any sequence of operations keeps: ref count == tables holding the block; free == ref 0."""
    m = KVBlockManager(12, 3)
    tables: list[tuple[BlockTable, list[int], int]] = []   # (table, tokens, computed)
    for op, which, n in ops:
        if op == "grow" or not tables:
            tokens = [which] * 30
            t = BlockTable()
            computed = m.match_prefix(t, tokens[:n])
            if m.can_allocate(t, computed, n):
                m.allocate(t, computed, n)
                m.register_full_blocks(t, tokens, n)
                tables.append((t, tokens, n))
            else:
                m.free_table(t)
        elif op == "free":
            t, _, _ = tables.pop(which % len(tables))
            m.free_table(t)
        elif op == "fork":
            t, tokens, computed = tables[which % len(tables)]
            tables.append((m.fork(t), tokens, computed))
        else:
            t, tokens, computed = tables[which % len(tables)]
            if m.can_allocate(t, computed, computed + 1):
                m.allocate(t, computed, computed + 1)
                m.register_full_blocks(t, tokens, computed + 1)
                tables[which % len(tables)] = (t, tokens, computed + 1)
        m.take_copies()
        held = [0] * m.num_blocks
        for t, _, _ in tables:
            for b in t.blocks:
                held[b] += 1
        assert held == m.ref_counts
        assert set(m.free) == {b for b in range(m.num_blocks) if held[b] == 0}
        assert all(m.hash_of[b] == h for h, b in m.cached.items())
