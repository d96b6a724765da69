"""The engine's side of moving a request to another engine (mixed into ``LLMEngine``).

One path serves every move: the prefill->decode handoff, decode->decode live
migration, and recovery elsewhere by recompute. Callers hold the engine lock
for every method here except the ``read_kv`` / ``write_kv`` data calls, which
touch only blocks that no step reads or writes (pinned, held or reserved).

Sending side::

    suspend(rid)                         RUNNING/WAITING -> HELD: out of the batch, blocks kept
                                         (prefill role: the engine suspends by itself after the first
                                         token, ``hold_kv``); ``held_snapshot(rid)`` is its snapshot
    pin_full_blocks(rid) -> block ids    live migration: blocks whose KV is final, pinned (ref + 1) so a
                                         preemption cannot hand them to someone else while they are read
    read_kv(block_ids, layer)            [n, 2, bs, Hkv, D]: the wire payload
    release(rid, status, moved_to)       the receiver committed: blocks freed; a migrated request's
                                         stream ends with a "migrated" output naming where it went
    unsuspend(rid)                       the move failed before the commit: HELD -> RUNNING, it goes on here
    unpin(rid)                           always, when a live migration ends

Receiving side::

    reserve(rid, num_tokens) -> block ids | None    (None: no room; the sender tries elsewhere)
    extend_reservation(rid, num_tokens) -> bool     (a live migration's request grew meanwhile)
    write_kv(rid, layer, first_block, data)         (chunks, in any order)
    commit(snapshot)                                joins the running batch; nothing is decoded before
    cancel_reservation(rid)                         failed / timed-out transfer: blocks freed
    resume(snapshot)                                no KV with it: queued, its KV is recomputed here

A request arriving by ``commit`` or ``resume`` is an ordinary request from
then on: if it is preempted later, this engine recomputes its KV itself.
"""

from __future__ import annotations

import torch

from splitserve.engine.device import to_host
from splitserve.engine.output import RequestOutput, TextState
from splitserve.engine.request import Request, RequestSnapshot, RequestStatus
from splitserve.errors import InvalidRequestError, RequestStateError, UnknownRequestError

_MOVED = (RequestStatus.FINISHED_PREFILLED, RequestStatus.FINISHED_MIGRATED)


class MovesMixin:
    """Uses LLMEngine's kv (KVCacheManager), kv_cache, scheduler, tokenizer and request maps:
    ``requests`` (queued or running), ``held`` (suspended), ``reserved`` (KV arriving), ``pinned``."""

    # -- sending side ---------------------------------------------------------------

    def suspend(self, request_id: str) -> None:
        req = self.requests.get(request_id)
        if req is None:
            if request_id in self.held:
                raise RequestStateError(f"request {request_id!r} is already being moved")
            raise UnknownRequestError(f"no request {request_id!r} is queued or running on this engine")
        self.scheduler.detach(req, RequestStatus.HELD)
        req.draft_token_ids, req.draft_probs = [], None
        self._end_speculation(request_id)  # the draft model's KV is recomputed wherever it continues
        self.kv_streams.pop(request_id, None)  # held: its KV is complete (its consumer ends the stream)
        self.requests.pop(request_id)
        self.held[request_id] = req

    def held_snapshot(self, request_id: str) -> RequestSnapshot:
        return self._held(request_id).snapshot()

    def held_block_table(self, request_id: str) -> list[int]:
        self._held(request_id)
        return self.kv.block_table(request_id)

    def num_full_blocks(self, request_id: str) -> int:
        """Blocks of a queued/running request whose every slot holds computed KV (they never change)."""
        req = self.requests.get(request_id) or self._held(request_id)
        return req.num_computed_tokens // self.kv.block_size

    def pin_full_blocks(self, request_id: str) -> list[int]:
        """Pin the request's full blocks not pinned yet; returns the block ids pinned, in table order."""
        pinned = self.pinned.setdefault(request_id, [])
        table = self.kv.block_table(request_id)
        new = table[len(pinned):self.num_full_blocks(request_id)]
        self.kv.pool.incref(new)
        pinned.extend(new)
        return list(pinned)

    def unpin(self, request_id: str) -> None:
        self.kv.pool.free(self.pinned.pop(request_id, []))

    def read_kv(self, block_ids: list[int], layer: int) -> torch.Tensor:
        """KV of the given blocks for one layer: [n, 2, bs, Hkv, D] (a copy in host memory)."""
        return to_host(self.kv_cache[layer, torch.tensor(block_ids, dtype=torch.long, device=self.kv_cache.device)])

    def release(self, request_id: str, status: RequestStatus = RequestStatus.FINISHED_PREFILLED,
                moved_to: str | None = None) -> int:
        """A held request's KV was delivered (or the handoff was abandoned): free its blocks. A migrated
        request's stream gets its final output here."""
        assert status in _MOVED or status is RequestStatus.FINISHED_ABORTED
        req = self._held(request_id)
        del self.held[request_id]
        req.status = status
        if status is not RequestStatus.FINISHED_PREFILLED:  # prefill: the "prefilled" output went out at hold
            self._pending.append(RequestOutput(request_id, [], "", True, status.finish_reason, req.num_prompt_tokens,
                                               req.num_output_tokens, moved_to=moved_to))
        return self.kv.free(request_id)

    def unsuspend(self, request_id: str) -> None:
        req = self._held(request_id)
        del self.held[request_id]
        self.requests[request_id] = req
        self.scheduler.add_running(req)

    def _held(self, request_id: str) -> Request:
        req = self.held.get(request_id)
        if req is None:
            raise UnknownRequestError(f"no suspended request {request_id!r} is held by this engine")
        return req

    # -- receiving side -----------------------------------------------------------------

    def can_reserve(self, num_tokens: int) -> bool:
        return num_tokens < self.max_model_len and self.kv.pool.can_allocate(self.kv.blocks_needed(num_tokens))

    def reserve(self, request_id: str, num_tokens: int) -> list[int] | None:
        self._check_new_id(request_id)
        if num_tokens >= self.max_model_len:
            raise InvalidRequestError("prompt", f"{num_tokens} tokens do not fit this engine's max_model_len "
                                                f"({self.max_model_len})")
        blocks = self.kv.allocate(request_id, num_tokens)
        if blocks is not None:
            self.reserved[request_id] = num_tokens
        return blocks

    def extend_reservation(self, request_id: str, num_tokens: int) -> bool:
        if request_id not in self.reserved:
            raise UnknownRequestError(f"no reservation {request_id!r}")
        if num_tokens >= self.max_model_len or self.kv.allocate(request_id, num_tokens) is None:
            return False
        self.reserved[request_id] = max(self.reserved[request_id], num_tokens)
        return True

    def reserved_blocks(self, request_id: str) -> int:
        return len(self.kv.block_table(request_id)) if request_id in self.reserved else 0

    def write_kv(self, request_id: str, layer: int, first_block: int, data: torch.Tensor) -> None:
        """Place [n, 2, bs, Hkv, D] of received KV into the reservation's blocks first_block.. first_block+n."""
        if request_id not in self.reserved:
            raise UnknownRequestError(f"no reservation {request_id!r}")
        table = self.kv.block_table(request_id)
        n = data.shape[0]
        if not (0 <= layer < self.kv_cache.shape[0]) or first_block < 0 or first_block + n > len(table):
            raise InvalidRequestError("kv", f"chunk (layer {layer}, blocks {first_block}..{first_block + n}) is "
                                            f"outside the reservation ({len(table)} blocks)")
        ids = torch.tensor(table[first_block:first_block + n], dtype=torch.long, device=self.kv_cache.device)
        self.kv_cache[layer, ids] = data.to(self.kv_cache.device, self.kv_cache.dtype)  # host -> device

    def commit(self, snap: RequestSnapshot) -> None:
        """Join a request whose KV (its first ``num_computed_tokens`` tokens) arrived into its reservation."""
        rid = snap.request_id
        if rid not in self.reserved:
            raise UnknownRequestError(f"no reservation {rid!r}")
        snap.check()
        have = len(self.kv.block_table(rid)) * self.kv.block_size
        if snap.num_computed_tokens > have or snap.num_tokens >= self.max_model_len:
            raise InvalidRequestError("kv", f"the snapshot has {snap.num_computed_tokens} computed tokens of "
                                            f"{snap.num_tokens}; the reservation holds {have} tokens and "
                                            f"max_model_len is {self.max_model_len}")
        del self.reserved[rid]
        self.kv.trim(rid, snap.num_tokens)  # blocks reserved beyond the request go back
        req = self._request_from(snap)
        self.requests[rid] = req
        self.scheduler.add_running(req)

    def cancel_reservation(self, request_id: str) -> bool:
        if self.reserved.pop(request_id, None) is None:
            return False
        self.kv.free(request_id)
        return True

    def resume(self, snap: RequestSnapshot, hold_kv: bool = False, kv_stream=None) -> str:
        """Queue a request from a snapshot without its KV: this engine recomputes it (prompt and the
        outputs already produced), then samples the next output token (``kv_stream``: as in
        ``add_request``)."""
        snap.check()
        self._check_new_id(snap.request_id)
        if snap.num_tokens >= self.max_model_len:
            raise InvalidRequestError("prompt", f"{snap.num_tokens} tokens do not fit this engine's max_model_len "
                                                f"({self.max_model_len})")
        req = self._request_from(snap, hold_kv=hold_kv)
        req.num_computed_tokens = 0
        self._queue(req, kv_stream)
        return req.request_id

    def _request_from(self, snap: RequestSnapshot, hold_kv: bool = False) -> Request:
        params = snap.sampling_params()
        req = Request(snap.request_id, list(snap.prompt_token_ids), params, next(self._arrivals),
                      output_token_ids=list(snap.output_token_ids), num_computed_tokens=snap.num_computed_tokens,
                      hold_kv=hold_kv, spec_acceptance=snap.spec_acceptance)
        req.text = TextState.restore(self.tokenizer, params.stop, req.output_token_ids, snap.text, snap.text_emitted)
        return req

    def _check_new_id(self, request_id: str) -> None:
        if request_id in self.requests or request_id in self.held or request_id in self.reserved:
            raise InvalidRequestError("request_id", f"request id {request_id!r} is already in use")
