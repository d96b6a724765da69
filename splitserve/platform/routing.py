"""The router's pure policy: which prefill worker, which decode workers (no Ray, no asyncio).

* ``pick_prefill``: the prefill worker that would be done first with this
  prompt: its queued prompt tokens plus the tokens of this prompt it must
  compute, its cached prefix skipped. A worker holding a long shared prefix
  (a system prompt) wins unless its queue outweighs the saving.
* :class:`PrefixIndex`: what each prefill worker probably holds in its prefix
  cache (``engine/block_pool.py``), from the prompts sent to it.
* ``rank_decodes``: the decode workers that can hold the request, most free
  KV blocks first (ties: the smaller running batch), skipping those that just
  refused.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from splitserve.engine.block_pool import block_hashes


@dataclass(frozen=True)
class PrefillLoad:
    name: str
    queued_prompt_tokens: int
    cached_tokens: int = 0  # of this prompt, how many the worker probably holds in its prefix cache


@dataclass(frozen=True)
class DecodeLoad:
    name: str
    free_blocks: int
    running: int
    block_size: int


def pick_prefill(loads: list[PrefillLoad], num_tokens: int = 0) -> str | None:
    """The worker that would be done first with a prompt of ``num_tokens``: queued tokens + the prompt's
    uncached tokens (ties: the name)."""
    return min(loads, key=lambda w: (w.queued_prompt_tokens + num_tokens - w.cached_tokens, w.name)).name \
        if loads else None


class PrefixIndex:
    """Which prompt blocks each prefill worker probably holds in its prefix cache: the chain hashes
    (``block_pool.block_hashes``) of the prompts this router sent it, least recently sent forgotten
    first beyond ``capacity`` blocks per worker. A hint, not a promise: the worker may have evicted
    them (it then computes them; the output is the same either way)."""

    def __init__(self, block_size: int, capacity: int = 1 << 14):
        self.block_size, self.capacity = block_size, capacity
        self._held: dict[str, OrderedDict[bytes, None]] = {}  # worker -> its blocks' hashes, oldest first

    def hashes(self, token_ids: list[int]) -> list[bytes]:
        """The hashes of a prompt's full blocks but the one holding its last token (never a hit)."""
        return block_hashes(token_ids[:len(token_ids) - 1], self.block_size)

    def cached_tokens(self, worker: str, hashes: list[bytes]) -> int:
        held = self._held.get(worker)
        n = 0
        while held and n < len(hashes) and hashes[n] in held:
            n += 1
        return n * self.block_size

    def record(self, worker: str, hashes: list[bytes]) -> None:
        held = self._held.setdefault(worker, OrderedDict())
        for h in hashes:
            held[h] = None
            held.move_to_end(h)
        while len(held) > self.capacity:
            held.popitem(last=False)

    def retain(self, workers: set[str]) -> None:
        """Forget the workers not in ``workers`` (lost, drained, restarted: their caches are gone)."""
        for name in [w for w in self._held if w not in workers]:
            del self._held[name]

    def __len__(self) -> int:
        return len(self._held)


def rank_decodes(loads: list[DecodeLoad], num_tokens: int, exclude: set[str] = frozenset()) -> list[str]:
    """Decode workers that can hold ``num_tokens``, best first: most free blocks, then the smaller batch."""
    fits = [w for w in loads if w.name not in exclude and w.free_blocks * w.block_size >= num_tokens]
    return [w.name for w in sorted(fits, key=lambda w: (-w.free_blocks, w.running, w.name))]
