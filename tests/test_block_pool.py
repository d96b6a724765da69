"""The pure-Python block pool and block tables."""

import pytest

from splitserve.engine.block_pool import BlockPool, KVCacheManager


def test_allocate_free_and_refcounts():
    pool = BlockPool(4)
    a = pool.allocate(3)
    assert len(set(a)) == 3 and pool.num_free == 1
    assert not pool.can_allocate(2) and pool.can_allocate(1)
    with pytest.raises(RuntimeError, match="only 1 are free"):
        pool.allocate(2)
    pool.incref(a[:1])
    pool.free(a)
    assert pool.num_free == 3 and pool.ref_count(a[0]) == 1  # still shared once
    pool.free(a[:1])
    assert pool.num_free == 4
    with pytest.raises(RuntimeError, match="double free"):
        pool.free(a[:1])


def test_block_tables_grow_by_block_and_free_everything():
    kv = KVCacheManager(num_blocks=5, block_size=4)
    assert kv.allocate("a", 1) is not None and len(kv.block_table("a")) == 1
    assert kv.allocate("a", 4) == [] and len(kv.block_table("a")) == 1  # same block still has room
    assert len(kv.allocate("a", 9)) == 2
    assert kv.num_new_blocks("b", 12) == 3 and not kv.can_allocate("b", 12)
    assert kv.allocate("b", 12) is None and kv.block_table("b") == []  # refused: nothing changed
    assert kv.allocate("b", 8) is not None
    assert kv.num_free_blocks == 0
    assert kv.free("a") == 3 and kv.free("b") == 2
    assert kv.num_free_blocks == 5 and kv.holders() == []
