"""The router's pure policy: which prefill worker, which decode workers (no Ray, no asyncio).

* ``pick_prefill``: the prefill worker that would be done first with this
  prompt: its queued prompt tokens plus the tokens of this prompt it must
  compute, its cached prefix skipped, over its speed. A worker holding a long
  shared prefix (a system prompt) wins unless its queue outweighs the saving.
* :class:`PrefillSpeeds`: each prefill worker's speed, measured by the router
  from its own dispatches (pools of mixed node types: a GPU worker with a
  longer queue is still done first).
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
    tokens_per_s: float | None = None  # its measured speed (PrefillSpeeds); None: not known yet


@dataclass(frozen=True)
class DecodeLoad:
    name: str
    free_blocks: int
    running: int
    block_size: int


def pick_prefill(loads: list[PrefillLoad], num_tokens: int = 0) -> str | None:
    """The worker that would be done first with a prompt of ``num_tokens``: (queued tokens + the prompt's
    uncached tokens) / its speed. A worker of unknown speed (new: just added, or restarted) counts as fast
    as the fastest known one, so that it is given work and measured; with none known, queues alone decide
    (ties: the name)."""
    if not loads:
        return None
    fastest = max((w.tokens_per_s for w in loads if w.tokens_per_s), default=1.0)
    return min(loads, key=lambda w: ((w.queued_prompt_tokens + num_tokens - w.cached_tokens)
                                     / (w.tokens_per_s or fastest), w.name)).name


class PrefillSpeeds:
    """Prompt tokens per second of busy time, per prefill worker, as one router sees them: while a worker
    has requests of this router, the time since its last completion (or since it went busy) went into the
    request that completes now (a worker computes its queue in order). Tokens and seconds are summed with
    a decay of ``decay`` per completion, so a few prompts give a figure and it follows a worker that slows
    down. Work other routers give the worker counts as its slowness: the figure is what this router gets."""

    def __init__(self, decay: float = 0.9):
        self.decay = decay
        self._out: dict[str, int] = {}  # worker -> requests of this router it holds
        self._mark: dict[str, float] = {}  # worker -> when the time now being measured began
        self._sum: dict[str, tuple[float, float]] = {}  # worker -> (decayed tokens, decayed seconds)

    def sent(self, worker: str, now: float) -> None:
        if not self._out.get(worker):
            self._mark[worker] = now
        self._out[worker] = self._out.get(worker, 0) + 1

    def done(self, worker: str, tokens: int, now: float) -> None:
        """A request of ``tokens`` computed prompt tokens finished its prefill on ``worker``."""
        if not self._out.get(worker):
            return
        tok, sec = self._sum.get(worker, (0.0, 0.0))
        self._sum[worker] = (self.decay * tok + tokens, self.decay * sec + max(0.0, now - self._mark[worker]))
        self._mark[worker] = now
        self._out[worker] -= 1

    def dropped(self, worker: str, now: float) -> None:
        """A request left ``worker`` without a prefill to measure (refused, lost, aborted)."""
        if self._out.get(worker):
            self._out[worker] -= 1
            self._mark[worker] = now

    def speed(self, worker: str) -> float | None:
        tok, sec = self._sum.get(worker, (0.0, 0.0))
        return tok / sec if tok > 0 and sec > 0 else None

    def retain(self, workers: set[str]) -> None:
        """Forget the workers not in ``workers`` (a restarted one may run elsewhere, at another speed)."""
        for table in (self._out, self._mark, self._sum):
            for name in [w for w in table if w not in workers]:
                del table[name]


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
