"""The block pool and per-sequence block tables: pure Python, no torch.

The KV cache is a preallocated pool of fixed-size blocks (``block_size`` token
slots each; see ``kv_cache.py`` for the memory layout). This module only does
the bookkeeping of which block belongs to whom:

* :class:`BlockPool` hands out block ids from a free list and takes them back
  when their reference count drops to zero. It knows nothing of requests.
* :class:`KVCacheManager` keeps one block table (list of block ids, in token
  order) per request and grows it on demand: ``can_allocate`` / ``allocate``
  ask for enough blocks to hold a given number of tokens; ``free`` returns
  them all.

Token ``i`` of a request lives in block ``block_table[i // block_size]`` at
offset ``i % block_size``; its flat "slot" in the pool is
``block_id * block_size + offset``.

Lifecycle of a block: free -> allocated (ref 1) -> [shared, ref > 1] -> freed
when the last holder lets go -> free. A leak check is simply
``pool.num_free == pool.num_blocks``.
"""

from __future__ import annotations

from collections import deque


class BlockPool:
    """Reference-counted block ids with a FIFO free list."""

    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._ref_counts = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` free blocks (ref count 1 each). Raises if there are too few."""
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} blocks but only {len(self._free)} are free")
        block_ids = [self._free.popleft() for _ in range(n)]
        for b in block_ids:
            self._ref_counts[b] = 1
        return block_ids

    def incref(self, block_ids: list[int]) -> None:
        """Share already-allocated blocks with one more holder."""
        for b in block_ids:
            if self._ref_counts[b] < 1:
                raise RuntimeError(f"block {b} is free; only allocated blocks can be shared")
            self._ref_counts[b] += 1

    def free(self, block_ids: list[int]) -> None:
        """Drop one reference to each block; blocks nobody holds go back to the free list."""
        for b in block_ids:
            if self._ref_counts[b] < 1:
                raise RuntimeError(f"double free of block {b}")
            self._ref_counts[b] -= 1
            if self._ref_counts[b] == 0:
                self._free.append(b)

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]


class KVCacheManager:
    """Block tables per request on top of a :class:`BlockPool`."""

    def __init__(self, num_blocks: int, block_size: int):
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self._tables: dict[str, list[int]] = {}

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
        # Free in reverse so the tail blocks (least likely shared) go back first.
        self.pool.free(list(reversed(table)))
        return len(table)

    def holders(self) -> list[str]:
        return list(self._tables)
