"""The pure-Python block pool and block tables."""

import pytest

from splitserve.engine.block_pool import BlockPool, KVCacheManager, block_hashes


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


def test_chain_hashes_name_a_block_by_its_tokens_and_everything_before_it():
    a = block_hashes(list(range(10)), 4)
    assert len(a) == 2  # full blocks only
    assert block_hashes(list(range(12)), 4)[:2] == a  # equal prefixes, equal names
    assert block_hashes(list(range(8)) + [7, 7], 4, list(a[:1])) == a  # extends what it is given
    b = block_hashes([99] + list(range(1, 12)), 4)
    assert b[0] != a[0] and b[1] != a[1]  # block 1 has the same tokens, but not the same prefix
    assert len(set(a + b[:2])) == 4


def test_a_shared_prefix_is_taken_from_the_cache_freed_by_its_last_user_and_evicted_last():
    kv = KVCacheManager(num_blocks=6, block_size=4, prefix_caching=True)
    tokens = list(range(10))
    hashes = block_hashes(tokens, 4)
    assert kv.match_prefix(hashes, 10) == []  # nothing cached yet
    assert kv.allocate_prefixed("a", [], 10, 10)
    kv.cache_full_blocks("a", hashes)  # its 2 full blocks are computed
    first_two = kv.block_table("a")[:2]
    # b has the same 10-token prompt: it shares both full blocks and computes token 8.. in a block of its own
    hit = kv.match_prefix(hashes, 10)
    assert hit == first_two
    assert kv.allocate_prefixed("b", hit, 10, 10)
    assert kv.block_table("b")[:2] == first_two and kv.block_table("b")[2] != kv.block_table("a")[2]
    assert [kv.pool.ref_count(x) for x in first_two] == [2, 2] and kv.num_free_blocks == 2
    assert kv.prefix_queried_tokens == 20 and kv.prefix_hit_tokens == 8
    # an 8-token prompt equal to those blocks still computes its last token: only block 0 is a hit
    assert kv.match_prefix(hashes, 8) == first_two[:1]
    kv.free("a")
    assert [kv.pool.ref_count(x) for x in first_two] == [1, 1]  # b still holds them
    kv.free("b")
    assert kv.num_free_blocks == 6 and kv.pool.num_cached == 2 and kv.num_tracked() == 0
    # nobody holds them now, yet they stay cached: a later request takes them back
    assert kv.match_prefix(hashes, 10) == first_two
    # under pressure the never-cached blocks go first, then the cached ones, the prefix's tail before its head
    assert kv.allocate("c", 16) is not None and kv.pool.num_cached == 2
    assert kv.allocate("d", 4) == [first_two[1]] and kv.match_prefix(hashes, 10) == first_two[:1]
    assert kv.pool.num_evictions == 1
    kv.free("c"), kv.free("d")
    assert kv.num_free_blocks == 6


def test_taking_a_prefix_that_does_not_fit_changes_nothing():
    kv = KVCacheManager(num_blocks=4, block_size=4, prefix_caching=True)
    hashes = block_hashes(list(range(8)), 4)
    assert kv.allocate_prefixed("a", [], 9, 9)
    kv.cache_full_blocks("a", hashes)
    kv.free("a")
    hit = kv.match_prefix(hashes, 9)
    assert len(hit) == 2
    assert kv.allocate("x", 4) is not None  # free now: the 2 cached blocks and 1 other
    # 2 cached + 2 new blocks for 13 tokens: taking the cached ones would leave 1 of the 2 needed
    assert not kv.allocate_prefixed("b", hit, 13, 13)
    assert kv.block_table("b") == [] and kv.pool.num_cached == 2 and kv.num_free_blocks == 3
    assert kv.allocate_prefixed("b", hit, 9, 9)  # 1 new block: fits
    assert kv.num_free_blocks == 0
    kv.free("b"), kv.free("x")
    assert kv.num_free_blocks == 4 and kv.num_tracked() == 0
