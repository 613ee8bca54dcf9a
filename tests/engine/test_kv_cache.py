"""Block bookkeeping: sharing, copy on write, freeing."""

from __future__ import annotations

import pytest

from nextok.engine.kv_cache import BlockManager


def test_allocate_and_free_return_every_block():
    bm = BlockManager(num_blocks=8, block_size=4)
    table = bm.allocate(9)  # 3 blocks
    assert len(table) == 3 and bm.num_free == 5
    bm.free(table)
    assert bm.num_free == 8 and table == []


def test_fork_shares_blocks_until_a_write():
    bm = BlockManager(num_blocks=8, block_size=4)
    parent = bm.allocate(6)  # blocks hold tokens 0-3 and 4-5; the next token (index 6) goes in block 1
    child = bm.fork(parent)
    assert child == parent and bm.num_free == 6
    assert [bm.ref_counts[b] for b in parent] == [2, 2]
    # The child writes token 6 into the shared second block: it gets a private copy of that block only.
    copy = bm.prepare_write(child, 7)
    assert copy == (parent[1], child[1]) and child[0] == parent[0] and child[1] != parent[1]
    assert bm.ref_counts[parent[0]] == 2 and bm.ref_counts[parent[1]] == 1
    # The parent is now the only owner of its block: no copy.
    assert bm.prepare_write(parent, 7) is None


def test_new_block_when_the_last_one_is_full():
    bm = BlockManager(num_blocks=4, block_size=4)
    table = bm.allocate(4)
    child = bm.fork(table)
    assert bm.prepare_write(child, 5) is None  # token 4 starts a fresh block: nothing to copy
    assert len(child) == 2 and child[0] == table[0]


def test_freeing_a_fork_keeps_the_shared_blocks():
    bm = BlockManager(num_blocks=4, block_size=4)
    table = bm.allocate(8)
    child = bm.fork(table)
    bm.free(table)
    assert bm.num_free == 2
    bm.free(child)
    assert bm.num_free == 4


def test_out_of_blocks_raises_memory_error():
    bm = BlockManager(num_blocks=2, block_size=4)
    with pytest.raises(MemoryError):
        bm.allocate(9)


def test_slots_needed_counts_new_and_copied_blocks():
    bm = BlockManager(num_blocks=8, block_size=4)
    table = bm.allocate(5)
    assert bm.slots_needed(table, 6) == 0  # token 5 fits in the private block 1
    assert bm.slots_needed(table, 9) == 1  # token 8 needs block 2
    bm.fork(table)
    assert bm.slots_needed(table, 6) == 1  # shared: a copy is needed
