"""The router: picks a prefill and a decode worker per request, drives it through them, and follows it.

Policy (pure, no Ray; ``routing.py``): ``pick_prefill`` takes the prefill
worker that would finish the prompt first, KV-aware (its cached prefix
skipped) and speed-aware (``PrefillSpeeds``: each worker's prompt tokens per
second of busy time, timed from this router's dispatches to their first
tokens); ``rank_decodes`` orders the decode workers that can hold the
request by free KV blocks (ties: the smaller running batch), skipping
workers that just refused. The prefill worker reserves on the first
of that list with room once the prompt is computed, so decode blocks are not
tied up while a prompt waits. Only live members of the membership
(``cluster.view()``, read on every pick) are candidates.

Admission is bounded in time: a request that has not started within
``max_wait_s`` of its arrival (a slot among ``max_inflight``, a prefill worker
that is not full, its first prefill step, then decode room) is refused with
NoCapacityError (RESOURCE_EXHAUSTED / 429) before the client has any output.

Path of one request through :meth:`Router.generate` (a :class:`Track` holds
where it is and what the client already has)::

    place   pick P, rank Ds -> P.prefill(wid, ..., the Ds' KV addresses, resume snapshot or None, time left)
              "busy"                        -> another P, or wait for one
              "queue_timeout", "no_capacity" -> refused (the time is up)
              "decode_failed"               -> the unreachable Ds reported lost, placed again
              P lost                        -> reported, another P (recovery_wait_s more to wait)
              "reserved"                    -> a D holds room: the token goes out at once (TTFT)
                                               while the KV moves; then one of:
              "transfer_failed"             -> its token goes out (if not yet); placed again from a
                                               snapshot
              "finished"                    -> that token ended the request
              "transferred"                 -> the token goes out (if not yet), then follow
    follow  D.stream(wid) ... "migrated" (moved_to B) -> B.stream(wid) ... until finished
              D lost mid-stream -> reported; placed again from a snapshot of what the client has
              (prompt + tokens sent + text sent, no KV): a prefill worker recomputes it and samples
              the next token exactly as D would have; the client sees a pause, then the same tokens
    no room within max_wait_s -> NoCapacityError; workers lost too often -> WorkerLostError
    client gone at any point  -> abort on whichever worker holds the request

Every placement gets a fresh work id (``wid``: request id @ attempt), so a
late message about an abandoned attempt can never touch the new one. Each
delta is checked to start at the output index where the last one ended, so a
request that moved or recovered reaches the client as one gapless stream.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from typing import AsyncIterator

from splitserve.engine.output import RequestOutput
from splitserve.engine.request import RequestSnapshot
from splitserve.errors import (InvalidRequestError, NoCapacityError, RequestFailedError, RequestStateError,
                               UnknownRequestError, WorkerLostError)
from splitserve.platform.membership import WorkerState
from splitserve.platform.metrics import request_metrics
from splitserve.platform.routing import DecodeLoad, PrefillLoad, PrefillSpeeds, PrefixIndex, pick_prefill, rank_decodes

UNREACHABLE = (None, "UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED", "UNKNOWN")  # KV-plane codes of a dead peer


def _incarnation(member) -> str:
    """A worker's cache lives as long as its process: a restarted worker (a new generation) starts empty."""
    return f"{member.name}#{member.generation}"


@dataclass
class Track:
    """One request as the router follows it: where it is, and what its client already has."""

    request_id: str
    prompt_token_ids: list[int]
    params: dict
    label: str | None = None  # the id the client knows it by (KServe request id), when it differs
    token_ids: list[int] = field(default_factory=list)  # output tokens the client has
    num_chars: int = 0  # characters of output text the client has
    attempt: int = 0
    wid: str = ""  # the work id of the current placement
    decode: object = None  # the Member holding it while it decodes
    prompt_hashes: list = field(default_factory=list)  # its prompt's blocks (PrefixIndex.hashes)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.token_ids)

    def next_placement(self) -> dict | None:
        """A new work id; the snapshot to continue from (None: nothing was sent yet, start afresh)."""
        self.attempt += 1
        self.wid = f"{self.request_id}@{self.attempt}"
        if not self.token_ids:
            return None
        return RequestSnapshot(self.wid, self.prompt_token_ids, list(self.token_ids), 0, self.params, None,
                               self.num_chars).to_dict()

    def accept(self, out: RequestOutput, final: bool | None = None) -> RequestOutput:
        """Record a delta going to the client; it must start exactly where the last one ended."""
        if out.index != len(self.token_ids):
            raise RequestFailedError(f"output stream out of order: a delta at index {out.index}, "
                                     f"the client has {len(self.token_ids)} tokens")
        self.token_ids.extend(out.new_token_ids)
        self.num_chars += len(out.new_text)
        if final is False:  # the first token of a request that goes on elsewhere
            out = replace(out, finished=False, finish_reason=None)
        return replace(out, request_id=self.request_id)


class Router:
    """Shell over the policy: reads membership and load, drives requests, follows them as they move."""

    def __init__(self, cluster, block_size: int, max_wait_s: float = 30.0, max_inflight: int = 256,
                 max_recoveries: int = 3, model_name: str = "default", recovery_wait_s: float = 60.0,
                 early_first_token: bool = True, prefix_caching: bool = True):
        self.cluster, self.block_size, self.model_name = cluster, block_size, model_name
        self.max_wait_s, self.max_recoveries, self.max_inflight = max_wait_s, max_recoveries, max_inflight
        # a request whose worker died (or whose transfer failed) waits this long to be placed again: long
        # enough for a worker to restart, so that a lost worker costs a pause, not the request
        self.recovery_wait_s = max(recovery_wait_s, max_wait_s)
        self.early_first_token = early_first_token  # False: the first token waits for the KV to move
        self._inflight = asyncio.Semaphore(max_inflight)  # the bounded queue in front of the pools
        self._prefill_tokens: dict[str, int] = {}  # prompt tokens this router has in flight per prefill worker
        self.prefixes = PrefixIndex(block_size) if prefix_caching else None  # None: route by queues alone
        self.speeds = PrefillSpeeds()  # per prefill worker incarnation
        self.tracks: dict[str, Track] = {}  # request id -> its track, while it runs
        self.num_recoveries = 0  # placements made again after a worker was lost (prefill or decode)

    # -- reads ------------------------------------------------------------------------

    async def ready(self) -> bool:
        view = await self.cluster.view()
        return bool(view.live("prefill")) and bool(view.live("decode"))

    def requests(self) -> dict:
        return {rid: {"worker": t.decode.name if t.decode is not None else None, "work_id": t.wid,
                      "client_id": t.label, "output_tokens": len(t.token_ids)} for rid, t in self.tracks.items()}

    def _prefill_loads(self, prefills, refused: set[str], track: Track) -> list[PrefillLoad]:
        live = {_incarnation(m) for m in prefills}
        self.speeds.retain(live)
        if self.prefixes is not None:
            self.prefixes.retain(live)
        return [PrefillLoad(m.name, self._prefill_tokens.get(m.name, 0), self._cached(m, track),
                            self.speeds.speed(_incarnation(m)))
                for m in prefills if m.name not in refused]

    def _cached(self, member, track: Track) -> int:
        return 0 if self.prefixes is None else self.prefixes.cached_tokens(_incarnation(member), track.prompt_hashes)

    async def _decode_loads(self, members) -> list[DecodeLoad]:
        stats = await asyncio.gather(*(m.handle.stats() for m in members), return_exceptions=True)
        loads = []
        for m, s in zip(members, stats):
            if isinstance(s, WorkerLostError):
                await self.cluster.report_lost(m)
            elif s is not None:  # None: it did not answer in time (busy, not lost): not a candidate now
                loads.append(DecodeLoad(m.name, s.engine.num_free_kv_blocks, s.engine.num_running, self.block_size))
        return loads

    # -- requests -------------------------------------------------------------------------

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: dict,
                       label: str | None = None) -> AsyncIterator[RequestOutput]:
        track = Track(request_id, list(prompt_token_ids), params, label)
        if self.prefixes is not None:
            track.prompt_hashes = self.prefixes.hashes(track.prompt_token_ids)
        finished = False
        try:
            async with aclosing(request_metrics().observe(self.model_name, len(prompt_token_ids),
                                                          self._admit(track))) as outs:
                async for out in outs:
                    finished = out.finished
                    yield out
        finally:
            self.tracks.pop(request_id, None)
            if not finished and track.decode is not None:
                track.decode.handle.abort(track.wid)

    async def _admit(self, track: Track):
        """A slot among ``max_inflight`` within the wait (else refused), then the request's run."""
        deadline = time.monotonic() + self.max_wait_s
        try:
            await asyncio.wait_for(self._inflight.acquire(), self.max_wait_s)
        except asyncio.TimeoutError:
            raise NoCapacityError(f"the server holds {self.max_inflight} requests (max_queued_requests) and none "
                                  f"finished within {self.max_wait_s:.0f}s") from None
        self.tracks[track.request_id] = track
        try:
            async with aclosing(self._run(track, deadline)) as outs:
                async for out in outs:
                    yield out
        finally:
            self._inflight.release()

    async def _run(self, track: Track, deadline: float):
        recoveries = 0
        while True:
            sent = False  # this placement's token already went out (on "reserved")
            async for first, placed in self._place(track, deadline):
                if first is not None:
                    yield track.accept(first, final=False)
                    sent = True
            result, d = placed
            deadline = None  # a placement after a loss (or a failed transfer) may wait recovery_wait_s
            first = result["first"]
            if result["status"] == "finished":  # the first token ended it
                yield track.accept(first)
                return
            if result["status"] == "transfer_failed":  # the token goes out; placed again from a snapshot
                if not sent:
                    yield track.accept(first, final=False)
                continue
            track.decode = d  # from now on, a client leaving aborts it there
            if not sent:
                yield track.accept(first, final=False)
            try:
                async for out in self._follow(track):
                    yield out
                return
            except WorkerLostError:
                await self.cluster.report_lost(track.decode)
                track.decode = None
                recoveries += 1
                self.num_recoveries += 1
                if recoveries > self.max_recoveries:
                    raise

    async def _follow(self, track: Track):
        """The decode worker's stream, and after a migration the new worker's, until finished. A notice
        that the request is about to move opens the target's stream at once, so the switch does not
        wait for a new call to start."""
        early = None  # _EarlyStream: the target's stream, opened on a migration notice
        try:
            while True:
                d = track.decode
                if early is not None and early.member.name == d.name:
                    source, early = early, None
                else:
                    source = d.handle.stream(track.wid)
                async for out in source:
                    if out.moved_to is not None and not out.finished:  # about to move: open the target
                        if early is None or early.member.name != out.moved_to:
                            if early is not None:
                                early.close(track.wid)
                            early = _EarlyStream(await self._member(out.moved_to), track.wid)
                        continue
                    if out.finish_reason == "migrated":
                        track.decode = await self._member(out.moved_to)
                        break
                    if early is not None:  # tokens after a notice: that migration failed, it stays here
                        early.close(track.wid)
                        early = None
                    yield track.accept(out)
                    if out.finished:
                        return
                else:
                    raise WorkerLostError(d.name, "its stream ended before the request finished")
        finally:
            if early is not None:
                early.close(track.wid)

    async def _member(self, name: str):
        m = self.cluster.cached(name)
        if m is not None:
            return m
        view = await self.cluster.view()
        m = view.get(name)
        if m is None:
            raise WorkerLostError(name, "the request moved to a worker this router does not know")
        return m

    async def _place(self, track: Track, deadline: float | None):
        """Prefill the request (again, from a snapshot, after a loss) and hand it to a decode worker by
        ``deadline`` (None, a request recovering from a loss: ``recovery_wait_s`` from now; a prefill
        worker lost on the way gives it that long again, up to ``max_recoveries`` times). Yields (first
        token, None) when a decode worker holds room (the token may go out while the KV moves), then
        (None, (prefill result, decode member))."""
        started = time.monotonic()
        deadline = deadline if deadline is not None else started + self.recovery_wait_s
        refused: set[str] = set()  # workers that just said no (busy, unreachable): skipped for a round
        losses = 0
        while True:
            view = await self.cluster.view()
            prefills, decodes = view.live("prefill"), view.live("decode")
            ranked = rank_decodes(await self._decode_loads(decodes), track.num_tokens, refused)
            p_name = pick_prefill(self._prefill_loads(prefills, refused, track), track.num_tokens)
            left = deadline - time.monotonic()
            if not ranked or p_name is None:
                if left <= 0:
                    raise NoCapacityError(self._why_not(view, track.num_tokens, not ranked,
                                                        time.monotonic() - started))
                await asyncio.sleep(0.05)
                refused.clear()
                continue
            p, ds = view.get(p_name), [view.get(name) for name in ranked]
            computes = track.num_tokens - self._cached(p, track)  # the tokens it must compute
            if self.prefixes is not None:
                self.prefixes.record(_incarnation(p), track.prompt_hashes)  # it computes (or has) these now
            resume = track.next_placement()
            n = track.num_tokens
            self._prefill_tokens[p.name] = self._prefill_tokens.get(p.name, 0) + n
            self.speeds.sent(_incarnation(p), time.monotonic())
            result, timed = None, False
            try:
                async with aclosing(p.handle.prefill(track.wid, track.prompt_token_ids, track.params,
                                                     [d.kv_address for d in ds], resume, max(left, 0.1))) as events:
                    async for event in events:
                        if not timed and event["status"] in ("reserved", "transferred", "finished", "transfer_failed"):
                            self.speeds.done(_incarnation(p), computes, time.monotonic())  # the prompt is computed
                            timed = True
                        if event["status"] == "reserved":
                            if self.early_first_token:
                                yield event["first"], None
                        else:
                            result = event
                if result is None:
                    raise WorkerLostError(p.name, "its prefill stream ended without a result")
            except WorkerLostError:
                await self.cluster.report_lost(p)
                losses += 1
                self.num_recoveries += 1
                if losses > self.max_recoveries:
                    raise
                deadline = max(deadline, time.monotonic() + self.recovery_wait_s)  # wait out its restart
                continue
            except (asyncio.CancelledError, GeneratorExit):  # client gone during prefill or transfer: stop it
                p.handle.abort(track.wid)                         # everywhere
                for d in ds:
                    d.handle.abort(track.wid)
                raise
            finally:
                self._prefill_tokens[p.name] -= n
                if not timed:
                    self.speeds.dropped(_incarnation(p), time.monotonic())
            status = result["status"]
            for d in ds:  # decode workers the prefill worker could not reach on the KV plane
                if d.kv_address in result.get("failed", {}):
                    refused.add(d.name)
                    if result["failed"][d.kv_address] in UNREACHABLE:
                        await self.cluster.report_lost(d)
            if status in ("transferred", "finished", "transfer_failed"):
                d = next((d for d in ds if d.kv_address == result.get("decode")), None)
                if status == "transferred" and d is None:
                    raise RequestFailedError(f"{p.name} sent the request to {result.get('decode')!r}, "
                                             f"a decode worker it was not offered")
                yield None, (result, d)
                return
            if status in ("queue_timeout", "no_capacity"):
                raise NoCapacityError(result["error"])
            if status == "error":
                raise RequestFailedError(result["error"])
            if status == "busy":
                refused.add(p.name)
            # "decode_failed": none of the decode workers it was given could be reached; placed again

    @staticmethod
    def _why_not(view, num_tokens: int, no_decode: bool, waited: float) -> str:
        pool = "decode" if no_decode else "prefill"
        if not view.live(pool):
            return f"no {pool} worker is up (waited {waited:.0f}s for one to come back)"
        if not no_decode:
            return f"every prefill worker was full (prefill_queue_limit) for {waited:.0f}s"
        return f"no decode worker had room for {num_tokens} tokens within {waited:.0f}s"

    # -- moving requests -------------------------------------------------------------------

    async def migrate(self, request_id: str, target: str) -> dict:
        """Move a decoding request to another decode worker, live; its stream follows it."""
        track = self.tracks.get(request_id)
        if track is None:
            raise UnknownRequestError(f"no request {request_id!r} is running on this router (unknown or finished)")
        if track.decode is None:
            raise RequestStateError(f"request {request_id!r} is not decoding yet (it is being prefilled or "
                                    f"placed); only a decoding request can migrate")
        view = await self.cluster.view()
        m = view.get(target)
        if m is None or m.pool != "decode":
            names = [w.name for w in view.pool("decode")]
            raise InvalidRequestError("target", f"no decode worker named {target!r}; decode workers: {names}")
        if m.state is not WorkerState.UP:
            raise RequestStateError(f"{target} is {m.state.value}; only a live decode worker can take a request")
        source = track.decode
        if source.name == target:
            raise RequestStateError(f"request {request_id!r} is already on {target}")
        result = await source.handle.migrate(track.wid, m.name, m.kv_address)
        return {"request_id": request_id, "source": source.name, **result}


class _EarlyStream:
    """A decode worker's stream opened before the request arrives there (it waits for the commit);
    read ahead into a bounded queue, so the first output is at hand when the switch comes."""

    WAIT_S = 30.0  # as long as a migration may take

    def __init__(self, member, wid: str):
        self.member = member
        self._queue: asyncio.Queue = asyncio.Queue(maxsize=16)
        self._task = asyncio.create_task(self._pull(member.handle.stream(wid, wait_s=self.WAIT_S)))

    async def _pull(self, stream) -> None:
        try:
            async for out in stream:
                await self._queue.put(out)
            await self._queue.put(None)
        except Exception as e:  # handed to the reader
            await self._queue.put(e)

    def __aiter__(self):
        return self

    async def __anext__(self):
        item = await self._queue.get()
        if item is None:
            raise StopAsyncIteration
        if isinstance(item, Exception):
            raise item
        return item

    def close(self, wid: str) -> None:
        self._task.cancel()
        self.member.handle.cancel_wait(wid)


class ColocatedRouter:
    """The baseline: one engine does prefill and decode; requests go to the least-loaded worker."""

    def __init__(self, cluster, max_inflight: int = 256, model_name: str = "default"):
        self.cluster, self.model_name = cluster, model_name
        self._load: dict[str, int] = {}
        self._inflight = asyncio.Semaphore(max_inflight)
        self.tracks: dict = {}

    async def ready(self) -> bool:
        return bool((await self.cluster.view()).live("colocated"))

    def requests(self) -> dict:
        return {}

    async def migrate(self, request_id: str, target: str) -> dict:
        raise RequestStateError("colocated mode has no decode pool to migrate between")

    async def generate(self, request_id, prompt_token_ids, params, label=None):
        async with self._inflight:
            workers = (await self.cluster.view()).live("colocated")
            if not workers:
                raise NoCapacityError("no worker is up")
            w = min(workers, key=lambda m: (self._load.get(m.name, 0), m.name))
            self._load[w.name] = self._load.get(w.name, 0) + 1
            finished = False
            try:
                async with aclosing(request_metrics().observe(self.model_name, len(prompt_token_ids),
                                                              w.handle.generate(request_id, prompt_token_ids,
                                                                                params))) as outs:
                    async for out in outs:
                        finished = out.finished
                        yield out
            finally:
                self._load[w.name] -= 1
                if not finished:
                    w.handle.abort(request_id)
