"""The block pool and per-sequence block tables, with a prefix cache: pure Python, no torch.

The KV cache is a preallocated pool of fixed-size blocks (``block_size`` token
slots each; see ``kv_cache.py`` for the memory layout). This module only does
the bookkeeping of which block belongs to whom:

* :class:`BlockPool` hands out block ids and takes them back when their
  reference count drops to zero. It knows nothing of requests.
* :class:`KVCacheManager` keeps one block table (list of block ids, in token
  order) per request and grows it on demand: ``can_allocate`` / ``allocate``
  ask for enough blocks to hold a given number of tokens; ``free`` returns
  them all.

Token ``i`` of a request lives in block ``block_table[i // block_size]`` at
offset ``i % block_size``; its flat "slot" in the pool is
``block_id * block_size + offset``.

**Prefix caching.** A *full* block (all its slots hold computed KV) is named by
a chain hash: the hash of its tokens and of the hash of the block before it
(:func:`block_hashes`), so equal hashes mean equal tokens from position 0 on,
and so equal KV. Once computed, a full block is registered under its hash
(``cache_full_blocks``); a new request whose prompt starts with the same blocks
takes them (``match_prefix`` + ``allocate_prefixed``: shared, reference
counted) and computes only the rest. Cached blocks are never written: a
request writes only at positions past its computed tokens, which lie in
blocks of its own. A cached block nobody holds stays in the pool's *evictable*
list, least recently freed first out, and is reused for new allocations only
when no never-cached block is free (its hash is then forgotten).

Lifecycle of a block: free -> allocated (ref 1) -> [registered under its hash]
-> [shared, ref > 1] -> the last holder lets go -> free (evictable while it has
a hash) -> allocated again (a cache hit keeps its hash; an eviction drops it).
Evictable blocks count as free: a leak check is simply
``pool.num_free == pool.num_blocks``.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from typing import Sequence


def block_hashes(token_ids: Sequence[int], block_size: int, into: list[bytes] | None = None) -> list[bytes]:
    """Chain hashes of the full blocks of ``token_ids``: ``into`` (hashes already known for the first
    blocks, extended in place) grown to ``len(token_ids) // block_size`` entries. Pure: the router and
    every engine get the same names for the same tokens."""
    hashes = [] if into is None else into
    for i in range(len(hashes), len(token_ids) // block_size):
        h = hashlib.blake2b(hashes[-1] if hashes else b"", digest_size=16)
        h.update(array("q", token_ids[i * block_size:(i + 1) * block_size]).tobytes())
        hashes.append(h.digest())
    return hashes


class BlockPool:
    """Reference-counted block ids: a FIFO free list, and an LRU list of free blocks that keep cached KV."""

    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))  # free, holding nothing anyone can look up
        self._evictable: OrderedDict[int, None] = OrderedDict()  # free, still cached (oldest first)
        self._ref_counts = [0] * num_blocks
        self._hash_of: dict[int, bytes] = {}  # cached blocks (held or evictable) -> their chain hash
        self._block_of: dict[bytes, int] = {}  # and back
        self.num_evictions = 0

    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def num_cached(self) -> int:
        return len(self._hash_of)

    def can_allocate(self, n: int) -> bool:
        return n <= self.num_free

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` free blocks (ref count 1 each), evicting cached ones only when no other is free."""
        if n > self.num_free:
            raise RuntimeError(f"asked for {n} blocks but only {self.num_free} are free")
        block_ids = []
        for _ in range(n):
            if self._free:
                b = self._free.popleft()
            else:
                b, _ = self._evictable.popitem(last=False)
                del self._block_of[self._hash_of.pop(b)]
                self.num_evictions += 1
            self._ref_counts[b] = 1
            block_ids.append(b)
        return block_ids

    def incref(self, block_ids: list[int]) -> None:
        """Share already-allocated blocks with one more holder."""
        for b in block_ids:
            if self._ref_counts[b] < 1:
                raise RuntimeError(f"block {b} is free; only allocated blocks can be shared")
            self._ref_counts[b] += 1

    def free(self, block_ids: list[int]) -> None:
        """Drop one reference to each block; blocks nobody holds become free (evictable if cached)."""
        for b in block_ids:
            if self._ref_counts[b] < 1:
                raise RuntimeError(f"double free of block {b}")
            self._ref_counts[b] -= 1
            if self._ref_counts[b] == 0:
                if b in self._hash_of:
                    self._evictable[b] = None
                else:
                    self._free.append(b)

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    # -- the prefix cache -----------------------------------------------------------

    def lookup(self, hashes: Sequence[bytes]) -> list[int]:
        """The cached blocks of the longest prefix of ``hashes`` (a chain: stops at the first miss)."""
        found = []
        for h in hashes:
            b = self._block_of.get(h)
            if b is None:
                break
            found.append(b)
        return found

    def register(self, block_id: int, h: bytes) -> None:
        """Name an allocated, full block by its chain hash (a hash already cached keeps its first block)."""
        if self._ref_counts[block_id] < 1:
            raise RuntimeError(f"block {block_id} is free; only a held block can be cached")
        if h not in self._block_of and block_id not in self._hash_of:
            self._block_of[h] = block_id
            self._hash_of[block_id] = h

    def take_cached(self, block_ids: list[int]) -> None:
        """One more holder for each cached block, bringing back those nobody held (no longer evictable)."""
        for b in block_ids:
            if b not in self._hash_of:
                raise RuntimeError(f"block {b} is not cached")
            if self._ref_counts[b] == 0:
                del self._evictable[b]
            self._ref_counts[b] += 1

    def num_unheld(self, block_ids: list[int]) -> int:
        """How many of these blocks nobody holds (taking them uses up that many free blocks)."""
        return sum(1 for b in block_ids if self._ref_counts[b] == 0)


class KVCacheManager:
    """Block tables per request on top of a :class:`BlockPool`; with ``prefix_caching``, full blocks are
    shared between requests through the pool's prefix cache."""

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = False):
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.pool = BlockPool(num_blocks)
        self._tables: dict[str, list[int]] = {}
        self._num_cached: dict[str, int] = {}  # request id -> leading blocks of its table already registered
        self.prefix_queried_tokens = 0  # tokens looked up on admission (a request's prompt and any outputs)
        self.prefix_hit_tokens = 0  # of which found cached (their prefill is skipped)

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def capacity_tokens(self) -> int:
        return self.pool.num_blocks * self.block_size

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_table(self, request_id: str) -> list[int]:
        return self._tables.get(request_id, [])

    def num_new_blocks(self, request_id: str, num_tokens: int) -> int:
        """How many more blocks ``request_id`` needs to hold ``num_tokens`` tokens."""
        return max(0, self.blocks_needed(num_tokens) - len(self.block_table(request_id)))

    def can_allocate(self, request_id: str, num_tokens: int) -> bool:
        return self.pool.can_allocate(self.num_new_blocks(request_id, num_tokens))

    def allocate(self, request_id: str, num_tokens: int) -> list[int] | None:
        """Grow the request's table to hold ``num_tokens`` tokens.

        Returns the newly added block ids, or ``None`` (and changes nothing)
        when the pool has too few free blocks.
        """
        n = self.num_new_blocks(request_id, num_tokens)
        if not self.pool.can_allocate(n):
            return None
        new_blocks = self.pool.allocate(n)
        self._tables.setdefault(request_id, []).extend(new_blocks)
        return new_blocks

    # -- prefix caching -----------------------------------------------------------------

    def match_prefix(self, hashes: Sequence[bytes], num_tokens: int) -> list[int]:
        """Cached blocks a new request of ``num_tokens`` tokens (``hashes``: its full blocks') can start
        from. At least its last token is left to compute (the step that computes it samples)."""
        if not self.prefix_caching:
            return []
        return self.pool.lookup(hashes[:(num_tokens - 1) // self.block_size])

    def allocate_prefixed(self, request_id: str, cached: list[int], num_tokens: int, num_looked_up: int) -> bool:
        """A request's first allocation: its table starts with the ``cached`` blocks (shared) and grows
        to ``num_tokens`` tokens; ``num_looked_up``: the request's tokens the lookup covered (the hit
        rate's denominator). False (and nothing changes) when the pool has too few free blocks."""
        if request_id in self._tables:
            raise RuntimeError(f"request {request_id} already has a block table")
        n = max(0, self.blocks_needed(num_tokens) - len(cached))
        if not self.pool.can_allocate(n + self.pool.num_unheld(cached)):
            return False
        self.pool.take_cached(cached)
        self._tables[request_id] = list(cached) + self.pool.allocate(n)
        self._num_cached[request_id] = len(cached)
        if self.prefix_caching:
            self.prefix_queried_tokens += num_looked_up
            self.prefix_hit_tokens += len(cached) * self.block_size
        return True

    def cache_full_blocks(self, request_id: str, hashes: Sequence[bytes]) -> None:
        """Register the request's blocks named by ``hashes`` (its first full, computed blocks)."""
        if not self.prefix_caching:
            return
        table = self._tables.get(request_id, [])
        done = self._num_cached.get(request_id, 0)
        for i in range(done, min(len(hashes), len(table))):
            self.pool.register(table[i], hashes[i])
        self._num_cached[request_id] = max(done, min(len(hashes), len(table)))

    def num_cached_blocks(self, request_id: str) -> int:
        return self._num_cached.get(request_id, 0)

    # -- tables ---------------------------------------------------------------------------

    def adopt(self, request_id: str, block_ids: list[int]) -> None:
        """Attach blocks allocated elsewhere (e.g. reserved for a KV transfer)."""
        if request_id in self._tables:
            raise RuntimeError(f"request {request_id} already has a block table")
        self._tables[request_id] = list(block_ids)

    def trim(self, request_id: str, num_tokens: int) -> int:
        """Give back trailing blocks beyond what ``num_tokens`` tokens need (speculative rollback);
        returns how many were freed."""
        table = self._tables.get(request_id, [])
        keep = self.blocks_needed(num_tokens)
        extra = table[keep:]
        if extra:
            del table[keep:]
            self.pool.free(list(reversed(extra)))
        return len(extra)

    def free(self, request_id: str) -> int:
        """Release every block of the request; returns how many were held."""
        table = self._tables.pop(request_id, [])
        self._num_cached.pop(request_id, None)
        # Free in reverse: a prefix's tail blocks become evictable before its head.
        self.pool.free(list(reversed(table)))
        return len(table)

    def holders(self) -> list[str]:
        return list(self._tables)

    def num_tracked(self) -> int:
        """Per-request entries of every map here (a leak check: 0 when no request holds blocks)."""
        return len(self._tables) + len(self._num_cached)
