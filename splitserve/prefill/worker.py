"""The prefill worker: a Ray actor wrapping an engine in the prefill role.

A request passes through::

    admitted if fewer than ``queue_limit`` requests are on this worker ("busy": the router tries
      another prefill worker, or waits)
      -> (``layer_overlap``, and its prefill starts within about a step) a reservation on the first decode
         worker of the router's list with room right now, and a transfer opened there: each layer's KV
         goes out while the next layers compute (``engine/kv_stream.py``); no room: the steps below
      -> waits for its first prefill step at most ``wait_s`` ("queue_timeout": refused, nothing was
         computed or sent)
      -> prefill (chunked, batched with other prompts) -> next token sampled, request suspended (held)
      -> overlapped: the rest of its KV and the commit (failed: the steps below, from the held blocks)
      -> a reservation on the first decode worker of the router's list with room, tried in order
         and again until the same deadline, at least once ("no_capacity"; every one unreachable:
         "decode_failed"): decode blocks are taken only now, when the KV is about to move
      -> (``prefill_stream``) "reserved", with the token: it may go to the client now, the KV follows
      -> KV and snapshot streamed to that decode worker until it commits
       (a failed transfer is retried once with a new reservation; then "transfer_failed": the
        router places the request again, with the token sampled here)
      -> local blocks released -> the token goes back to the router, with the decode worker's address

A request recovering from a lost decode worker comes with a snapshot
(``resume``): its prompt and the tokens the client already has are
recomputed here, and the next token is sampled exactly as it would have been.
If the sampled token already ends the request (EOS, stop string, max_tokens)
it completes here and no decode worker is asked.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

import ray

from splitserve.autoscaler.signals import Recorder, engine_gauges, step_recorder
from splitserve.platform.metrics import WorkerMetrics
from splitserve.decode.worker import ray_node_id
from splitserve.engine.request import RequestSnapshot
from splitserve.engine.sampling_params import SamplingParams
from splitserve.errors import NoCapacityError, TransferFailedError, describe
from splitserve.stats import PrefillStats

if TYPE_CHECKING:
    from splitserve.engine.kv_stream import KVStream


@dataclass
class _Overlap:
    """A request's layer-overlapped transfer: reserved at ``address``, fed by ``kv`` (``KVStream``)."""
    address: str
    kv: KVStream
    task: asyncio.Task  # KVSender.stream: -> TransferAck


class PrefillWorkerImpl:
    RESERVE_RETRY_S = (0.02, 0.5)  # waiting for decode room: first and longest pause between rounds

    def __init__(self, engine_kwargs: dict, cluster_token: str, kv_codec: str = "raw", name: str = "prefill",
                 kv_tls=None, queue_limit: int = 32, layer_overlap: bool = True):
        from splitserve.engine.async_engine import AsyncEngine
        from splitserve.engine.engine import LLMEngine
        from splitserve.kvtransfer.client import KVSender
        from splitserve.kvtransfer.wire import fingerprint

        self.engine = LLMEngine(**engine_kwargs)
        self.aengine = AsyncEngine(self.engine)
        self.port = self.aengine.kv_port()
        self.sender = KVSender(cluster_token, kv_codec=kv_codec, tls=kv_tls)  # kv_tls: a KVTLS, or None
        self.layout = fingerprint(self.engine.model_config, self.engine.kv_spec)
        self.name = name
        self.incarnation = uuid.uuid4().hex[:12]
        self.queue_limit = queue_limit  # requests on this worker at once (waiting, prefilling or sending)
        self.num_inflight = 0
        self.queued_prompt_tokens = 0
        self.num_prefills = 0
        self.num_refused = {"busy": 0, "queue_timeout": 0, "no_capacity": 0}
        self.num_transfer_retries = 0
        # send each layer's KV while the next computes (False: after the prefill, the baseline of
        # benchmarks/bench_first_token.py)
        self.layer_overlap = layer_overlap
        self.overlaps: dict[str, _Overlap] = {}  # request id -> its overlapped transfer, while it runs
        self.num_overlapped = 0
        self.num_overlap_fallbacks = 0
        self.recorder = Recorder()
        self.engine.on_step = step_recorder(self.recorder, "prefill")
        self.metrics = WorkerMetrics("prefill", name)

    async def start(self) -> dict:
        """Idempotent; the worker's identity (prefill workers serve no KV address)."""
        self.metrics.start_export(self.stats)
        return {"name": self.name, "address": None, "pid": os.getpid(), "incarnation": self.incarnation,
                "node_id": ray_node_id()}

    async def prefill_stream(self, request_id: str, prompt_token_ids: list[int], params: dict, decodes,
                             resume: dict | None = None, wait_s: float = 30.0):
        """``prefill``, streamed (the router's call): {"status": "reserved", "first", "decode"} as soon as
        a decode worker holds room for the request, so that its first token goes to the client while the
        KV is still moving; then ``prefill``'s result. Closing the stream stops the request here."""
        events: asyncio.Queue = asyncio.Queue()
        task = asyncio.create_task(self.prefill(request_id, prompt_token_ids, params, decodes, resume, wait_s,
                                                on_reserved=events.put_nowait))
        task.add_done_callback(lambda _: events.put_nowait(None))
        try:
            while (event := await events.get()) is not None:
                yield event
            yield task.result()
        finally:
            if not task.done():
                task.cancel()

    async def prefill(self, request_id: str, prompt_token_ids: list[int], params: dict, decodes,
                      resume: dict | None = None, wait_s: float = 30.0, on_reserved=None) -> dict:
        """Returns {"status": ..., ...}: "transferred" (with "decode": the address that took it), "finished",
        "busy", "queue_timeout", "no_capacity", "decode_failed", "transfer_failed" or "error"; once the
        prompt is computed, also "failed": {address: gRPC code} of decode workers it could not reach.
        ``decodes``: decode workers' KV addresses, the router's preference
        first (or one address); ``resume``: a RequestSnapshot (as a dict) to continue by recompute;
        ``wait_s``: from now, how long it may take to start and then to find decode room;
        ``on_reserved(event)``: called with {"status": "reserved", "first", "decode"} once room is held."""
        decodes = [decodes] if isinstance(decodes, str) else list(decodes)
        snapshot = RequestSnapshot.from_dict(resume) if resume is not None else None
        if snapshot is not None and snapshot.request_id != request_id:
            return {"status": "error", "error": f"the snapshot is for {snapshot.request_id!r}, not {request_id!r}"}
        if self.num_inflight >= self.queue_limit:
            self.num_refused["busy"] += 1
            self.recorder.count("refused", 1)
            return {"status": "busy", "error": f"{self.name} already has {self.num_inflight} requests "
                                               f"(its queue_limit)"}
        n = snapshot.num_tokens if snapshot is not None else len(prompt_token_ids)
        self.num_inflight += 1
        self.queued_prompt_tokens += n
        self.recorder.record("arrival", n)
        start, deadline = time.perf_counter(), time.monotonic() + wait_s
        try:
            return await self._prefill(request_id, prompt_token_ids, params, decodes, snapshot, n, wait_s, start,
                                       deadline, on_reserved)
        finally:
            overlap = self.overlaps.pop(request_id, None)
            if overlap is not None and not overlap.task.done():  # it ended before its transfer did
                await self._stop_overlap(request_id, overlap)

    async def _prefill(self, request_id, prompt_token_ids, params, decodes, snapshot, n, wait_s, start, deadline,
                       on_reserved) -> dict:
        first, expired = None, []
        watchdog = asyncio.get_running_loop().call_later(wait_s, self._expire_unstarted, request_id, expired)
        try:
            overlap = await self._open_overlap(request_id, n, decodes)
            kv = overlap.kv if overlap is not None else None
            run = self.aengine.generate(snapshot=snapshot, hold_kv=True, kv_stream=kv) if snapshot is not None else \
                self.aengine.generate(prompt_token_ids, SamplingParams(**params), request_id=request_id, hold_kv=True,
                                      kv_stream=kv)
            async for out in run:
                first = out
        finally:
            watchdog.cancel()
            self.queued_prompt_tokens -= n
            if first is None or first.finish_reason != "prefilled":
                self.num_inflight -= 1
        if expired and first.finish_reason == "abort":
            self.num_refused["queue_timeout"] += 1
            self.recorder.count("refused", 1)
            return {"status": "queue_timeout", "error": f"it did not start within {wait_s:.1f}s on {self.name} "
                                                        f"(requests ahead of it: {self.num_inflight})"}
        prefilled = time.perf_counter()
        result = {"first": first, "prefill_s": prefilled - start, "pid": os.getpid()}
        if first.finish_reason != "prefilled":
            return {"status": "finished", **result}
        held = self.engine.held.get(request_id)
        if held is not None and held.scheduled_at is not None:  # perf_counter and monotonic: one clock on Linux
            self.recorder.record("queue_s", max(0.0, held.scheduled_at - start))
            self.metrics.queued(max(0.0, held.scheduled_at - start))
            self.recorder.record("prefill_s", prefilled - max(start, held.scheduled_at))
        try:  # decode room by the same deadline (at least one round of asking)
            return await self._hand_off(request_id, n, decodes, deadline - time.monotonic(), prefilled, start,
                                        result, on_reserved, self.overlaps.get(request_id))
        finally:
            self.num_inflight -= 1
            self.port.release(request_id)

    async def _open_overlap(self, request_id: str, n: int, decodes: list[str]) -> _Overlap | None:
        """Reserve on the first decode worker of ``decodes`` with room now (one round, no waiting) and open the
        transfer there, fed layer by layer by the prefill. Only when the prompt's prefill starts within about a
        step: decode blocks reserved for a request still queued here would be idle. None: the classic path."""
        if not self.layer_overlap or self.queued_prompt_tokens - n > self.engine.config.max_num_batched_tokens:
            return None
        from splitserve.engine.kv_stream import KVStream
        for address in decodes:
            try:
                await self.sender.reserve(address, request_id, n, self.layout)
            except (NoCapacityError, TransferFailedError):  # the classic path asks again, and waits
                continue
            kv = KVStream(self.engine.kv_spec.num_layers, asyncio.get_running_loop())
            task = asyncio.create_task(self.sender.stream(address, self.port, request_id, kv))
            task.add_done_callback(lambda _: kv.close())  # a failed transfer: the forward stops offering
            overlap = self.overlaps[request_id] = _Overlap(address, kv, task)
            self.num_overlapped += 1
            return overlap
        return None

    async def _finish_overlap(self, request_id: str, overlap: _Overlap):
        """The request is held: the rest of its KV and the commit. Returns the TransferAck, or None when the
        overlapped transfer failed (its reservation is given back; the caller sends from the held blocks)."""
        overlap.kv.end()
        try:
            return await asyncio.wait_for(overlap.task, self.sender.timeout_s)
        except Exception as e:  # a failed or cut transfer, a receiver gone, a stuck commit
            self.num_overlap_fallbacks += 1
            self.metrics.transfer_failed(getattr(e, "code", None) or type(e).__name__)
            await self._give_back(overlap.address, request_id)
            return None

    async def _stop_overlap(self, request_id: str, overlap: _Overlap) -> None:
        """The request ends here (finished, refused, aborted): its transfer stops without a commit."""
        overlap.kv.close()
        overlap.task.cancel()
        try:
            await overlap.task
        except BaseException:
            pass
        await self._give_back(overlap.address, request_id)

    def _expire_unstarted(self, request_id: str, expired: list) -> None:
        """The admission deadline: a request still waiting for its first step is aborted (refused)."""
        req = self.engine.requests.get(request_id)  # lock-free reads: a stale answer only delays this
        if req is not None and req.scheduled_at is None:
            expired.append(True)
            self.aengine.abort_request(request_id)

    async def _hand_off(self, request_id: str, n: int, decodes: list[str], wait_s: float, prefilled: float,
                        start: float, result: dict, on_reserved=None, overlap: _Overlap | None = None) -> dict:
        """Finish the overlapped transfer; without one, or when it failed, reserve on a decode worker with
        room, then stream the KV there from the held blocks. Once the first token was announced, any
        failure is "transfer_failed": the router places the request again from a snapshot holding it."""
        failed: dict[str, str | None] = {}  # decode workers whose KV plane failed -> the gRPC code
        result["failed"] = failed
        announced, ack = False, None
        if overlap is not None:
            announced = self._announce(on_reserved, result, overlap.address, start)
            ack = await self._finish_overlap(request_id, overlap)
            address = overlap.address
        if ack is None:
            try:
                address = await self._reserve_any(decodes, request_id, n, wait_s, failed)
            except (NoCapacityError, TransferFailedError) as e:
                return self._refused(e, result, announced)
            if not announced:
                self._announce(on_reserved, result, address, start)
            try:
                ack = await self._send_with_retry(address, request_id, n)
            except (NoCapacityError, TransferFailedError) as e:
                self.metrics.transfer_failed(getattr(e, "code", None) or type(e).__name__)
                await self._give_back(address, request_id)
                return {"status": "transfer_failed", "error": f"KV transfer failed: {describe(e)}", **result}
        done = time.perf_counter()
        self.metrics.transferred(done - prefilled, ack.num_bytes)
        self.recorder.record("transfer_s", done - prefilled)
        if on_reserved is None:  # the first token goes out with this answer
            self.recorder.record("ttft_s", done - start)
        self.num_prefills += 1
        return {"status": "transferred", "decode": address, "kv_bytes": ack.num_bytes, "kv_chunks": ack.num_chunks,
                **result}

    def _refused(self, e: Exception, result: dict, announced: bool) -> dict:
        """No decode worker took the prefilled request (``e`` from ``_reserve_any``)."""
        if announced:  # its first token is out: placed again from a snapshot holding it
            return {"status": "transfer_failed", "error": f"KV transfer failed, then no decode worker took it: "
                                                          f"{describe(e)}", **result}
        if isinstance(e, NoCapacityError):
            self.num_refused["no_capacity"] += 1
            self.recorder.count("refused_decode", 1)
            return {"status": "no_capacity", "error": str(e), **result}
        if e.code == "INVALID_ARGUMENT":  # can never fit there, or a layout mismatch
            return {"status": "error", "code": e.code, "error": f"reserve failed: {e}", **result}
        return {"status": "decode_failed", "code": e.code,
                "error": f"reserve failed on every decode worker asked: {e}", **result}

    def _announce(self, on_reserved, result: dict, address: str, start: float) -> bool:
        """Room is held at ``address``: the first token may go to the client now (its TTFT). Returns whether
        it was announced."""
        if on_reserved is None:
            return False
        on_reserved({"status": "reserved", "first": result["first"], "decode": address})
        self.recorder.record("ttft_s", time.perf_counter() - start)
        return True

    async def _reserve_any(self, decodes: list[str], request_id: str, n: int, wait_s: float,
                           failed: dict) -> str:
        """The first decode worker of ``decodes`` that reserves room for ``n`` tokens; rounds over the
        list, pausing longer each time, until ``wait_s`` has passed (then NoCapacityError). A worker
        whose KV plane fails is dropped (into ``failed``: address -> code); all of them failing raises
        the last TransferFailedError."""
        if not decodes:
            raise NoCapacityError("no decode worker was offered to take the request")
        deadline = time.monotonic() + max(wait_s, 0.0)
        pause = self.RESERVE_RETRY_S[0]
        alive, last_failure = list(decodes), None
        while True:
            for address in list(alive):
                try:
                    await self.sender.reserve(address, request_id, n, self.layout)
                    return address
                except NoCapacityError:
                    continue
                except TransferFailedError as e:
                    if e.code == "INVALID_ARGUMENT":
                        raise
                    alive.remove(address)
                    failed[address] = e.code
                    last_failure = e
            if not alive:
                raise last_failure
            if time.monotonic() + pause > deadline:
                raise NoCapacityError(f"no decode worker had room for {n} tokens by the request's deadline "
                                      f"({len(alive)} asked)")
            await asyncio.sleep(pause)
            pause = min(2 * pause, self.RESERVE_RETRY_S[1])

    async def _send_with_retry(self, address: str, request_id: str, num_tokens: int, attempts: int = 2):
        """Stream the KV (already reserved there); a failed transfer (the receiver dropped its reservation)
        is retried once with a fresh reservation, since the blocks are still held here."""
        for attempt in range(attempts):
            try:
                if attempt:
                    await self.sender.reserve(address, request_id, num_tokens, self.layout)
                return await self.sender.send(address, self.port, request_id)
            except TransferFailedError:
                if attempt == attempts - 1:
                    raise
                self.num_transfer_retries += 1

    async def _give_back(self, address: str, request_id: str) -> None:
        try:
            await asyncio.wait_for(self.sender.release(address, request_id), 2.0)
        except Exception:  # the reservation also expires on its own
            pass

    def abort(self, request_id: str) -> bool:
        return self.aengine.abort_request(request_id)

    def inject_transfer_faults(self, faults: list[str]) -> int:
        """The fault campaign: the next transfers this worker sends fail, one fault each ("corrupt",
        "cut"; ``KVSender.inject``). Returns how many are queued."""
        return self.sender.inject(faults)

    def stats(self) -> PrefillStats:
        return PrefillStats(name=self.name, pid=os.getpid(), engine=self.engine.stats(),
                            queued_prompt_tokens=self.queued_prompt_tokens, num_inflight=self.num_inflight,
                            queue_limit=self.queue_limit, num_prefills=self.num_prefills,
                            num_refused=dict(self.num_refused), num_transfer_retries=self.num_transfer_retries,
                            num_overlapped=self.num_overlapped, num_overlap_fallbacks=self.num_overlap_fallbacks)

    def signals(self) -> dict:
        """What the autoscaler reads (``autoscaler/signals.py``): gauges now, timed samples over the window."""
        return {"gauges": {**engine_gauges(self.engine), "queued_prompt_tokens": self.queued_prompt_tokens},
                **self.recorder.export()}

    def leaks(self) -> dict:
        """Every per-request structure on this worker, by size: all zero when it is idle."""
        return {**self.engine.leaks(), **self.aengine.leaks(), "inflight": self.num_inflight,
                "overlaps": len(self.overlaps)}

    async def stop(self) -> None:
        self.metrics.stop_export()
        await self.sender.close()
        self.aengine.shutdown()


PrefillWorker = ray.remote(PrefillWorkerImpl)
