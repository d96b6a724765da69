"""The decode worker: a Ray actor wrapping an engine in the decode role, serving the KV plane.

A request passes through (on this worker)::

    RESERVED (blocks allocated by a sender's Reserve: a prefill worker, or a decode worker migrating)
      -> TRANSFERRING (chunks written into the reserved blocks)
      -> committed: joins the running batch (continuous batching with everything else)
      -> its outputs wait in a queue until a router claims it (``claim``: its outputs go out in the
         reader's batches, one message per engine step for all of that reader's requests; see
         ``outbox.py``; ``stream`` is the same, one request per call) -> finished: blocks freed
         or MIGRATING (``migrate``: its KV goes to another decode worker while it keeps decoding;
         when it stops for the last stage, its stream says where it is going, so the reader can open
         that worker's stream at once (``stream(wait_s=...)`` waits for the commit); then its stream
         ends with a "migrated" output naming the new worker; on failure it goes on here)

A router that stops reading (client cancel) aborts the request. An abort can
race the commit (the client left while its KV was in flight), so aborted ids
are remembered for ``tombstone_ttl_s`` and a later commit of one is dropped;
an abort during a migration is carried out where the request ends up; and a
committed request nobody claims within ``unclaimed_ttl_s`` is aborted, so
nothing is held forever. Output streams are backpressured: a reader that
stops reading without closing its stream stalls it, and a request stalled for
``STALLED_READER_S`` is aborted (a batch reader that takes nothing for that
long has all its requests aborted).

``start`` is idempotent and returns the worker's identity (KV address, pid,
incarnation): the controller calls it to (re)register the worker, after Ray
restarted it too. ``set_draining`` refuses new reservations while the
controller migrates everything away.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid

import ray

from splitserve.autoscaler.signals import Recorder, engine_gauges, step_recorder
from splitserve.decode.outbox import Outbox
from splitserve.platform.metrics import WorkerMetrics
from splitserve.engine.output import RequestOutput
from splitserve.errors import NoCapacityError, TransferFailedError, describe
from splitserve.stats import DecodeStats

STREAM_BACKPRESSURE = 16  # outputs Ray buffers for a stream's reader before the generator waits
STALLED_READER_S = 10.0


def ray_node_id() -> str | None:
    """The Ray node this worker runs on (None outside Ray: a worker class used directly, in tests);
    never starts Ray itself."""
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def ray_node_ip() -> str | None:
    """This node's IP as Ray knows it (None outside Ray)."""
    return ray.util.get_node_ip_address() if ray.is_initialized() else None


async def reap_stalled_forever(worker, period_s: float = 1.0) -> None:
    """Abort requests whose reader vanished without closing the stream (outputs pile up unread)."""
    while True:
        await asyncio.sleep(period_s)
        for rid in worker.aengine.stalled(STALLED_READER_S):
            worker.abort(rid)
        for reader, outbox in list(getattr(worker, "outboxes", {}).items()):
            if outbox.stalled(STALLED_READER_S):
                del worker.outboxes[reader]
                outbox.close()


class DecodeWorkerImpl:
    def __init__(self, engine_kwargs: dict, cluster_token: str, kv_host: str = "127.0.0.1", name: str = "decode",
                 kv_codec: str = "raw", unclaimed_ttl_s: float = 30.0, tombstone_ttl_s: float = 120.0,
                 kv_port: int = 0, kv_tls=None):
        from splitserve.engine.async_engine import AsyncEngine
        from splitserve.engine.engine import LLMEngine
        from splitserve.kvtransfer.client import KVSender

        self.engine = LLMEngine(**engine_kwargs)
        self.aengine = AsyncEngine(self.engine)
        self.name, self.token = name, cluster_token
        self.kv_host, self.kv_port, self.kv_tls = kv_host, kv_port, kv_tls  # bind host, port (0: any), KVTLS
        self.incarnation = uuid.uuid4().hex[:12]  # a new one each time the process (re)starts
        self.sender = KVSender(cluster_token, kv_codec=kv_codec, tls=kv_tls)
        self.queues: dict = {}  # committed request id -> its output queue, until the router claims it
        self.waiters: dict[str, asyncio.Future] = {}  # request id -> a reader already waiting for its commit
        self.outboxes: dict[str, Outbox] = {}  # reader id -> the batched outputs of the requests it claimed
        self.address = None
        self.draining = False
        self.unclaimed_ttl_s, self.tombstone_ttl_s = unclaimed_ttl_s, tombstone_ttl_s
        self.tombstones: dict[str, float] = {}  # aborted request id -> when
        self.abort_after_move: set[str] = set()  # aborted while migrating: carried out where it ends up
        self.num_dropped_after_abort = 0
        self.num_unclaimed_aborted = 0
        self.num_migrated_out = self.num_migrations_failed = 0
        self.recorder = Recorder()
        self.engine.on_step = step_recorder(self.recorder, "decode")
        self.metrics = WorkerMetrics("decode", name)

    async def start(self) -> dict:
        """Start the KV server in this actor's event loop (once); returns the identity, with the address
        senders dial: this node's own (``kvtransfer.endpoint.advertised_host``)."""
        from splitserve.kvtransfer.server import KVTransferServicer, start_server
        from splitserve.kvtransfer.endpoint import ADVERTISE_ENV, advertised_host, join_host_port

        self.metrics.start_export(self.stats)
        if self.address is None:
            loop = asyncio.get_running_loop()
            self.port = self.aengine.kv_port(commit=lambda snapshot: self._adopt(snapshot, loop))
            self.servicer = KVTransferServicer(self.port, self.token, on_release=self._release_committed,
                                               accepting=lambda: not self.draining)
            self.server, port = await start_server(self.servicer, self.kv_host, self.kv_port, tls=self.kv_tls)
            self._reapers = [asyncio.create_task(self.servicer.reap_forever()),
                             asyncio.create_task(reap_stalled_forever(self))]
            host = advertised_host(self.kv_host, ray_node_ip(), os.environ.get(ADVERTISE_ENV))
            self.address = join_host_port(host, port)
        return {"name": self.name, "address": self.address, "pid": os.getpid(), "incarnation": self.incarnation,
                "node_id": ray_node_id()}

    def _adopt(self, snapshot, loop) -> None:
        rid = snapshot.request_id
        if rid in self.tombstones:  # aborted while its KV was in flight: never run it
            self.port.cancel(rid)
            self.num_dropped_after_abort += 1
            return
        self.queues[rid] = self.aengine.adopt(snapshot, loop)
        waiter = self.waiters.pop(rid, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        loop.call_later(self.unclaimed_ttl_s, self._abort_if_unclaimed, rid)

    @ray.method(num_returns="streaming", _generator_backpressure_num_objects=STREAM_BACKPRESSURE)
    async def stream(self, request_id: str, wait_s: float = 0.0):
        """Yield the request's outputs (RequestOutput deltas) until it finishes or moves. ``wait_s``: a
        request on its way here (a migration in its last stage) may commit within this time."""
        async for out in self._outputs(request_id, await self._committed(request_id, wait_s)):
            yield out

    async def claim(self, request_id: str, reader: str, wait_s: float = 0.0) -> None:
        """As ``stream``, but the outputs go into ``reader``'s batches (``outputs``)."""
        queue = await self._committed(request_id, wait_s)
        self.outboxes.setdefault(reader, Outbox()).claim(request_id, self._outputs(request_id, queue))

    @ray.method(num_returns="streaming", _generator_backpressure_num_objects=STREAM_BACKPRESSURE)
    async def outputs(self, reader: str):
        """One reader's batches: [(request id, RequestOutput)], all its requests' outputs since the last."""
        outbox = self.outboxes.setdefault(reader, Outbox())
        try:
            while True:
                yield await outbox.take()
        finally:  # the reader closed it (or its process ended): its requests stop
            if self.outboxes.get(reader) is outbox:
                del self.outboxes[reader]
            outbox.close()

    async def _committed(self, request_id: str, wait_s: float):
        """The output queue of a request committed here (waiting up to ``wait_s`` for the commit); it is
        then the caller's: KeyError if there is none."""
        if request_id not in self.queues and wait_s > 0 and request_id not in self.waiters:
            self.waiters[request_id] = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(asyncio.shield(self.waiters[request_id]), wait_s)
            except asyncio.TimeoutError:
                pass
            finally:
                self.waiters.pop(request_id, None)
        queue = self.queues.pop(request_id, None)
        if queue is None:
            raise KeyError(f"request {request_id!r} was not committed to this decode worker")
        return queue

    async def _outputs(self, request_id: str, queue):
        """The request's outputs from the engine, recorded for the autoscaler's signals."""
        first_at, tokens = None, 0
        async for out in self.aengine.stream(request_id, queue):
            if out.new_token_ids:
                self.recorder.count("tokens", len(out.new_token_ids))
                first_at = first_at or time.monotonic()
                tokens += len(out.new_token_ids)
            if out.finished:
                if tokens > 1:  # this request's mean time per output token here
                    self.recorder.record("tpot_s", (time.monotonic() - first_at) / (tokens - 1))
                if out.finish_reason != "migrated":
                    self.recorder.record("output_tokens", out.num_output_tokens)
            yield out

    def cancel_wait(self, request_id: str) -> None:
        """A reader waiting for a commit that will not come (the migration failed) gives up."""
        waiter = self.waiters.pop(request_id, None)
        if waiter is not None and not waiter.done():
            waiter.cancel()

    def inject_transfer_faults(self, faults: list[str]) -> int:
        """The fault campaign: the next transfers this worker sends fail, one fault each ("corrupt",
        "cut"; ``KVSender.inject``). Returns how many are queued."""
        return self.sender.inject(faults)

    async def migrate(self, request_id: str, target_name: str, target_address: str) -> dict:
        """Move a running request to another decode worker, live. {"status": "migrated", ...} or
        {"status": "failed", "error"} (it goes on here); UnknownRequestError / RequestStateError when
        there is nothing to move (unknown, finished, already moving)."""
        if target_address == self.address:
            from splitserve.errors import RequestStateError
            raise RequestStateError(f"request {request_id!r} is already on {target_name}")
        def announce(snapshot):  # the reader may open the target's stream while the last stage runs
            self.aengine.notify(request_id, RequestOutput(
                request_id, [], "", False, None, len(snapshot.prompt_token_ids), len(snapshot.output_token_ids),
                moved_to=target_name))

        try:
            result = await self.sender.migrate(target_address, self.port, request_id, moved_to=target_name,
                                               on_suspend=announce)
        except (NoCapacityError, TransferFailedError) as e:
            self.num_migrations_failed += 1
            if request_id in self.abort_after_move:  # the client left meanwhile: the request is back here
                self.abort_after_move.discard(request_id)
                self.aengine.abort_request(request_id)
            return {"status": "failed", "error": describe(e)}
        self.num_migrated_out += 1
        self.metrics.migrated(result.stopped_s)
        if request_id in self.abort_after_move:  # the client left meanwhile: abort it where it went
            self.abort_after_move.discard(request_id)
            await self.sender.release(target_address, request_id)
        return {"status": "migrated", "target": target_name, **result.__dict__}

    def request_ids(self) -> list[str]:
        """Requests running here (or committed and not yet claimed): what a drain moves."""
        with self.aengine.lock:
            return list(self.engine.requests)

    def set_draining(self, draining: bool) -> None:
        self.draining = draining

    def _abort_if_unclaimed(self, request_id: str) -> None:
        if request_id in self.queues:  # nobody called stream(): the router is gone
            self.num_unclaimed_aborted += 1
            self.abort(request_id)

    def _release_committed(self, request_id: str) -> bool:
        """A KV-plane Release for a request that is no longer a reservation: its client left while it
        migrated here. Abort it."""
        return self.abort(request_id)

    def abort(self, request_id: str) -> bool:
        now = time.monotonic()
        self.tombstones = {r: t for r, t in self.tombstones.items() if now - t < self.tombstone_ttl_s}
        self.tombstones[request_id] = now
        self.queues.pop(request_id, None)
        if self.address is not None and request_id in self.port.moving():
            self.abort_after_move.add(request_id)
        return self.aengine.abort_request(request_id)

    def stats(self) -> DecodeStats:
        # Lock-free on purpose: counters read between steps are good enough for routing, and
        # taking the engine lock would stall this actor's event loop (and its gRPC server) a step.
        servicer = getattr(self, "servicer", None)
        return DecodeStats(
            name=self.name, pid=os.getpid(), engine=self.engine.stats(), address=self.address,
            draining=self.draining, kv_bytes_received=servicer.num_bytes_received if servicer else 0,
            transfers_committed=servicer.num_transfers_committed if servicer else 0,
            transfers_failed=servicer.num_transfers_failed if servicer else 0,
            kv_bytes_sent=self.sender.num_bytes_sent, migrated_out=self.num_migrated_out,
            migrations_failed=self.num_migrations_failed, dropped_after_abort=self.num_dropped_after_abort,
            unclaimed_aborted=self.num_unclaimed_aborted)

    def signals(self) -> dict:
        """What the autoscaler reads (``autoscaler/signals.py``): gauges now, timed samples over the window."""
        return {"gauges": engine_gauges(self.engine), **self.recorder.export()}

    def leaks(self) -> dict:
        """Every per-request structure on this worker, by size: all zero when it is idle."""
        servicer = getattr(self, "servicer", None)
        return {**self.engine.leaks(), **self.aengine.leaks(), "queues": len(self.queues),
                "stream_waiters": len(self.waiters),
                "output_pumps": sum(len(o.pumps) for o in self.outboxes.values()),
                "outbox_items": sum(len(o.items) for o in self.outboxes.values()),
                "moving": len(self.port.moving()) if self.address else 0,
                "abort_after_move": len(self.abort_after_move),
                "kv_reservations": len(servicer._reservations) if servicer else 0,
                "kv_in_transfer": len(servicer._in_transfer) if servicer else 0}

    async def stop(self) -> None:
        self.metrics.stop_export()
        if getattr(self, "server", None) is not None:
            for task in self._reapers:
                task.cancel()
            await self.server.stop(None)
        await self.sender.close()
        self.aengine.shutdown()


DecodeWorker = ray.remote(DecodeWorkerImpl)
