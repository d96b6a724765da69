"""The paged KV cache tensor and its memory layout.

One preallocated tensor holds every layer's K and V for every block::

    kv_cache: [num_layers, num_blocks, 2, block_size, num_kv_heads, head_dim]

                      one (layer, block) slab: contiguous, 2*bs*H*D elements
                     +----------------------------------------------------+
    kv_cache[l, b] = | K: token 0 [H, D] | token 1 | ... | token bs-1     |
                     | V: token 0 [H, D] | token 1 | ... | token bs-1     |
                     +----------------------------------------------------+

    layer l:  | block 0 slab | block 1 slab | block 2 slab | ... | block N-1 slab |
    layer l+1:| block 0 slab | ...

Why this order:

* ``kv_cache[l]`` is one contiguous ``[num_blocks, 2, bs, H, D]`` tensor, so a
  layer's attention indexes it by block id with no copy of the pool.
* One sequence's KV for layer ``l`` is ``kv_cache[l, block_table]``: an
  index-select of *its own* slabs only (``len(block_table)`` contiguous pieces
  of ``2*bs*H*D`` elements), never a gather over the whole pool. That is what
  a KV transfer serializes, layer by layer, so the sender can ship layer ``l``
  while layer ``l+1`` is still being computed.
* K and V of a block sit side by side, so one slab is one wire chunk.

A token at position ``p`` of a sequence is at
``kv_cache[l, block_table[p // bs], {0: K, 1: V}, p % bs]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from splitserve.engine.config import ModelConfig


@dataclass(frozen=True)
class KVCacheSpec:
    num_layers: int
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.num_layers, self.num_blocks, 2, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def bytes_per_block(self) -> int:
        """Bytes of one block across all layers (what one block costs to hold or send)."""
        elem = torch.empty((), dtype=self.dtype, device="cpu").element_size()
        return self.num_layers * 2 * self.block_size * self.num_kv_heads * self.head_dim * elem

    @classmethod
    def for_memory(cls, cfg: ModelConfig, memory_bytes: int, block_size: int, dtype: torch.dtype) -> "KVCacheSpec":
        probe = cls(cfg.num_layers, 1, block_size, cfg.num_kv_heads, cfg.head_dim, dtype)
        num_blocks = max(1, memory_bytes // probe.bytes_per_block)
        return cls(cfg.num_layers, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim, dtype)


def allocate_kv_cache(spec: KVCacheSpec, device: torch.device = torch.device("cpu")) -> torch.Tensor:
    # Zeroed so that padded (masked) slots never hold NaN/inf garbage.
    return torch.zeros(spec.shape, dtype=spec.dtype, device=device)

