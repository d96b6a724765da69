"""Iteration-level scheduler: pure Python, no torch.

One call to :meth:`Scheduler.schedule` plans one engine step under a token
budget (``max_num_batched_tokens``):

1. **Running requests first**, oldest first. A decoding request needs one
   token (plus its speculative drafts, if the engine proposed any and they
   fit without preempting anyone); a request still in (chunked) prefill gets as much of its remaining
   prompt as the budget allows. If the KV pool cannot hold the new tokens,
   the newest running request is **preempted** (blocks freed, computed tokens
   forgotten, put back at the head of the waiting queue to be recomputed)
   until it fits. A request is never dropped.
2. **Waiting requests**, FCFS, while budget, ``max_num_seqs`` and free blocks
   allow. The head of the queue is never skipped (no starvation): if it does
   not fit, admission stops for this step. With prefix caching, an admitted
   request starts from the cached blocks of its longest cached prefix and
   computes only the rest.

The plan is a :class:`SchedulerOutput`; the engine runs it, then calls
:meth:`Scheduler.on_step_finished` so computed-token counts move forward (and
blocks that became full of computed KV enter the prefix cache).
Requests leave through :meth:`Scheduler.finish`, which frees their blocks.
"""

from __future__ import annotations

import time

from collections import deque
from dataclasses import dataclass

from splitserve.engine.block_pool import KVCacheManager, block_hashes
from splitserve.engine.request import Request, RequestStatus


@dataclass(frozen=True)
class ScheduledChunk:
    """``num_new_tokens`` tokens of one request, starting at ``start``."""

    request: Request
    start: int
    num_new_tokens: int
    block_table: tuple[int, ...]
    samples: bool  # the chunk reaches the last known token, so the step samples a new one
    num_draft_tokens: int = 0  # speculative drafts appended after the last known token

    @property
    def end(self) -> int:
        return self.start + self.num_new_tokens


@dataclass(frozen=True)
class SchedulerOutput:
    chunks: tuple[ScheduledChunk, ...]
    preempted_ids: tuple[str, ...]

    @property
    def num_tokens(self) -> int:
        return sum(c.num_new_tokens for c in self.chunks)

    @property
    def empty(self) -> bool:
        return not self.chunks


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_batched_tokens: int, max_num_seqs: int):
        if max_num_batched_tokens < 1 or max_num_seqs < 1:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be >= 1")
        self.kv = kv
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    # -- queue management ------------------------------------------------

    def add(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        self.waiting.append(request)

    def finish(self, request: Request, status: RequestStatus) -> None:
        """Take a request out of whichever queue holds it and free its blocks."""
        assert status.finished
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.kv.free(request.request_id)
        request.status = status

    def detach(self, request: Request, status: RequestStatus) -> None:
        """Take a request out of the queues but keep its blocks (its KV is being moved)."""
        if request in self.running:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        request.status = status

    def add_running(self, request: Request) -> None:
        """Join a request whose KV is already in its blocks (received from a prefill worker)."""
        request.status = RequestStatus.RUNNING
        self.running.append(request)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- planning ----------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        preempted: list[str] = []

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if req.draft_token_ids:  # a decode with speculative drafts: verify them in this chunk
                del req.draft_token_ids[max(0, budget - 1):]
                n = 1 + len(req.draft_token_ids)
                if not self.kv.can_allocate(req.request_id, req.num_computed_tokens + n):
                    req.draft_token_ids.clear()  # speculation never preempts anybody
                    n = 1
            while not self.kv.can_allocate(req.request_id, req.num_computed_tokens + n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is req:
                    break
            if req.status is not RequestStatus.RUNNING:
                break  # req preempted itself: everything after it is gone too
            self.kv.allocate(req.request_id, req.num_computed_tokens + n)
            chunks.append(self._chunk(req, n, len(req.draft_token_ids)))
            budget -= n
            i += 1

        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            if preempted and req.request_id in preempted:
                break  # do not readmit what we just evicted in the same step
            cached = self.kv.match_prefix(self._hashes(req, req.num_tokens // self.kv.block_size), req.num_tokens)
            start = len(cached) * self.kv.block_size
            n = min(req.num_tokens - start, budget)
            if not self.kv.allocate_prefixed(req.request_id, cached, start + n, req.num_tokens):
                break
            req.num_computed_tokens = start
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            if req.scheduled_at is None:
                req.scheduled_at = time.monotonic()
            self.running.append(req)
            chunks.append(self._chunk(req, n))
            budget -= n

        return SchedulerOutput(tuple(chunks), tuple(preempted))

    def on_step_finished(self, output: SchedulerOutput) -> None:
        bs, caching = self.kv.block_size, self.kv.prefix_caching
        for c in output.chunks:  # drafts count once verified (the engine adds the accepted ones)
            req = c.request
            req.num_computed_tokens = c.end - c.num_draft_tokens
            if caching and req.num_computed_tokens // bs > self.kv.num_cached_blocks(req.request_id):
                full = req.num_computed_tokens // bs
                self.kv.cache_full_blocks(req.request_id, self._hashes(req, full)[:full])

    # -- helpers -----------------------------------------------------------

    def _hashes(self, req: Request, num_blocks: int) -> list[bytes]:
        """The chain hashes of the request's first ``num_blocks`` full blocks (kept on the request: its
        tokens never change); none without prefix caching."""
        if not self.kv.prefix_caching:
            return []
        if len(req.block_hashes) < num_blocks:
            block_hashes(req.token_ids(0, num_blocks * self.kv.block_size), self.kv.block_size, req.block_hashes)
        return req.block_hashes

    def _chunk(self, req: Request, n: int, drafts: int = 0) -> ScheduledChunk:
        start = req.num_computed_tokens
        return ScheduledChunk(req, start, n, tuple(self.kv.block_table(req.request_id)),
                              samples=start + n - drafts == req.num_tokens, num_draft_tokens=drafts)

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        req.draft_token_ids.clear()
        self.kv.free(req.request_id)
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)
        self.num_preemptions += 1
