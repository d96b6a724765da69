"""The KV port: the small interface through which the KV plane reads and writes one engine's KV.

The transfer client and server (``splitserve/kvtransfer``) never touch engine
internals or its lock: they call a port. Control calls take the engine lock
(owned by ``AsyncEngine``); the data calls ``read`` / ``write`` do not, because
they only touch blocks no engine step reads or writes (pinned, held or
reserved), so a chunk never waits out a step.

    model_config, kv_spec                 the layout (the KV plane fingerprints it)

    receiving:  reserve(rid, n) -> (blocks | None, free)   extend(rid, n) -> bool
                write(rid, layer, first_block, data)        commit(snapshot)      cancel(rid)

    sending:    held_snapshot(rid) / held_table(rid)        a request already suspended (prefill role)
                begin_live(rid)                             live migration: checks, remembers preemptions
                pin(rid) -> block ids                       full blocks, pinned while they are read
                suspend(rid) -> (snapshot, block table)     the last stage: out of the batch
                read(block_ids, layer)                      [n, 2, bs, Hkv, D]
                release(rid, status, moved_to)              the receiver committed: blocks freed
                unsuspend(rid) / unpin(rid)                 the move failed: it goes on here
"""

from __future__ import annotations

import torch

from splitserve.engine.request import RequestSnapshot, RequestStatus
from splitserve.errors import RequestStateError, UnknownRequestError


class EngineKVPort:
    """``lock``: the engine's (AsyncEngine owns it); ``wake()``: outputs were queued outside a step;
    ``commit(snapshot)``: replaces the default join (e.g. to open the request's output stream with it);
    ``settle()``: (lock held) applies the control calls queued outside the lock, e.g. aborts, so that a
    request aborted before its stop is not moved after all."""

    def __init__(self, engine, lock, wake=lambda: None, commit=None, settle=lambda: None):
        self.engine, self.lock, self._wake = engine, lock, wake
        self._commit, self._settle = commit, settle
        self._preemptions: dict[str, int] = {}  # live migrations: preemption count at the start

    @property
    def model_config(self):
        return self.engine.model_config

    @property
    def kv_spec(self):
        return self.engine.kv_spec

    # -- receiving ----------------------------------------------------------------------

    def reserve(self, rid: str, num_tokens: int) -> tuple[list[int] | None, int]:
        with self.lock:
            return self.engine.reserve(rid, num_tokens), self.engine.kv.num_free_blocks

    def extend(self, rid: str, num_tokens: int) -> bool:
        with self.lock:
            return self.engine.extend_reservation(rid, num_tokens)

    def reserved_blocks(self, rid: str) -> int:
        with self.lock:
            return self.engine.reserved_blocks(rid)

    def write(self, rid: str, layer: int, first_block: int, data: torch.Tensor) -> None:
        self.engine.write_kv(rid, layer, first_block, data)  # reserved blocks: no step touches them

    def commit(self, snapshot: RequestSnapshot) -> None:
        if self._commit is not None:  # e.g. AsyncEngine.adopt: commit and open the output stream atomically
            self._commit(snapshot)
            return
        with self.lock:
            self.engine.commit(snapshot)
        self._wake()

    def cancel(self, rid: str) -> bool:
        with self.lock:
            return self.engine.cancel_reservation(rid)

    # -- sending --------------------------------------------------------------------------

    def held_snapshot(self, rid: str) -> RequestSnapshot:
        with self.lock:
            return self.engine.held_snapshot(rid)

    def held_table(self, rid: str) -> list[int]:
        with self.lock:
            return list(self.engine.held_block_table(rid))

    def begin_live(self, rid: str) -> int:
        """Start a live migration of a queued/running request; returns its current number of tokens."""
        with self.lock:
            req = self.engine.requests.get(rid)
            if req is None:
                if rid in self.engine.held or rid in self._preemptions:
                    raise RequestStateError(f"request {rid!r} is already being moved")
                raise UnknownRequestError(f"no request {rid!r} is running on this worker (unknown or finished)")
            if rid in self._preemptions:
                raise RequestStateError(f"request {rid!r} is already being moved")
            self._preemptions[rid] = req.num_preemptions
            return req.num_tokens

    def pin(self, rid: str) -> list[int]:
        with self.lock:
            self._check_live(rid)
            return self.engine.pin_full_blocks(rid)

    def suspend(self, rid: str) -> tuple[RequestSnapshot, list[int]]:
        with self.lock:
            self._check_live(rid)
            self.engine.suspend(rid)
            return self.engine.held_snapshot(rid), list(self.engine.held_block_table(rid))

    def read(self, block_ids: list[int], layer: int) -> torch.Tensor:
        return self.engine.read_kv(block_ids, layer)  # pinned or held blocks: no step writes them

    def release(self, rid: str, status: RequestStatus = RequestStatus.FINISHED_PREFILLED,
                moved_to: str | None = None) -> int:
        with self.lock:
            n = self.engine.release(rid, status, moved_to)
        self._wake()
        return n

    def unsuspend(self, rid: str) -> None:
        with self.lock:
            self.engine.unsuspend(rid)
        self._wake()

    def end_live(self, rid: str) -> None:
        """Always, when a live migration ends (moved or not): its pins go."""
        with self.lock:
            self._preemptions.pop(rid, None)
            self.engine.unpin(rid)

    def moving(self) -> set[str]:
        return set(self._preemptions)

    def _check_live(self, rid: str) -> None:
        self._settle()
        req = self.engine.requests.get(rid)
        if req is None:
            raise RequestStateError(f"request {rid!r} finished or was aborted while it was being moved")
        if req.num_preemptions != self._preemptions.get(rid):
            raise RequestStateError(f"request {rid!r} was preempted while it was being moved (its KV is "
                                    f"recomputed here)")
