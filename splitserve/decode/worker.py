"""The decode worker: a Ray actor wrapping an engine in the decode role, serving the KV plane.

A request passes through (on this worker)::

    RESERVED (blocks allocated by a prefill worker's Reserve)
      -> TRANSFERRING (chunks written into the reserved blocks)
      -> committed: joins the running batch (continuous batching with everything else)
      -> its outputs wait in a queue until the router calls ``stream`` -> finished: blocks freed

A router that stops reading (client cancel) aborts the request. An abort can
race the commit (the client left while its KV was in flight), so aborted ids
are remembered for ``tombstone_ttl_s`` and a later commit of one is dropped;
and a committed request nobody claims within ``unclaimed_ttl_s`` is aborted,
so nothing is held forever. Output streams are backpressured: a reader that stops
reading without closing its stream stalls it, and a request stalled for
``STALLED_READER_S`` is aborted.
"""

from __future__ import annotations

import asyncio
import os
import time

import ray

STREAM_BACKPRESSURE = 16  # outputs Ray buffers for a stream's reader before the generator waits
STALLED_READER_S = 10.0


async def reap_stalled_forever(worker, period_s: float = 1.0) -> None:
    """Abort requests whose reader vanished without closing the stream (outputs pile up unread)."""
    while True:
        await asyncio.sleep(period_s)
        for rid in worker.aengine.stalled(STALLED_READER_S):
            worker.abort(rid)


class DecodeWorkerImpl:
    def __init__(self, engine_kwargs: dict, cluster_token: str, kv_host: str = "127.0.0.1",
                 unclaimed_ttl_s: float = 30.0, tombstone_ttl_s: float = 120.0):
        from splitserve.engine.async_engine import AsyncEngine
        from splitserve.engine.engine import LLMEngine

        self.engine = LLMEngine(**engine_kwargs)
        self.aengine = AsyncEngine(self.engine)
        self.token, self.kv_host = cluster_token, kv_host
        self.queues: dict[str, asyncio.Queue] = {}
        self.address = None
        self.unclaimed_ttl_s, self.tombstone_ttl_s = unclaimed_ttl_s, tombstone_ttl_s
        self.tombstones: dict[str, float] = {}  # aborted request id -> when
        self.num_dropped_after_abort = 0
        self.num_unclaimed_aborted = 0

    async def start(self) -> str:
        """Start the KV server on a free port in this actor's event loop; returns host:port."""
        from splitserve.kvtransfer.server import EngineKVSink, KVTransferServicer, start_server

        if self.address:
            return self.address
        loop = asyncio.get_running_loop()

        def adopt(state):
            rid = state.request_id
            if rid in self.tombstones:  # aborted while its KV was in flight: never run it
                with self.aengine._lock:
                    self.engine.cancel_reservation(rid)
                self.num_dropped_after_abort += 1
                return
            self.queues[rid] = self.aengine.adopt(state, loop)
            loop.call_later(self.unclaimed_ttl_s, self._abort_if_unclaimed, rid)

        sink = EngineKVSink(self.engine, self.aengine._lock, commit=adopt)
        self.servicer = KVTransferServicer(sink, self.token)
        self.server, port = await start_server(self.servicer, self.kv_host, 0)
        self._reaper = asyncio.create_task(self.servicer.reap_forever())
        self._stall_reaper = asyncio.create_task(reap_stalled_forever(self))
        self.address = f"{self.kv_host}:{port}"
        return self.address

    @ray.method(num_returns="streaming", _generator_backpressure_num_objects=STREAM_BACKPRESSURE)
    async def stream(self, request_id: str):
        """Yield the request's outputs (RequestOutput deltas) until it finishes."""
        queue = self.queues.pop(request_id, None)
        if queue is None:
            raise KeyError(f"request {request_id!r} was not committed to this decode worker")
        async for out in self.aengine.stream(request_id, queue):
            yield out

    def _abort_if_unclaimed(self, request_id: str) -> None:
        if request_id in self.queues:  # nobody called stream(): the router is gone
            self.num_unclaimed_aborted += 1
            self.abort(request_id)

    def abort(self, request_id: str) -> bool:
        now = time.monotonic()
        self.tombstones = {r: t for r, t in self.tombstones.items() if now - t < self.tombstone_ttl_s}
        self.tombstones[request_id] = now
        self.queues.pop(request_id, None)
        return self.aengine.abort_request(request_id)

    def stats(self) -> dict:
        # Lock-free on purpose: counters read between steps are good enough for routing, and
        # taking the engine lock would stall this actor's event loop (and its gRPC server) a step.
        s = self.engine.stats()
        return {**s, "pid": os.getpid(), "address": self.address,
                "kv_bytes_received": getattr(self, "servicer", None) and self.servicer.num_bytes_received,
                "transfers_committed": getattr(self, "servicer", None) and self.servicer.num_transfers_committed,
                "transfers_failed": getattr(self, "servicer", None) and self.servicer.num_transfers_failed,
                "dropped_after_abort": self.num_dropped_after_abort, "unclaimed_aborted": self.num_unclaimed_aborted}

    async def stop(self) -> None:
        if getattr(self, "server", None) is not None:
            self._reaper.cancel()
            self._stall_reaper.cancel()
            await self.server.stop(None)
        self.aengine.shutdown()


DecodeWorker = ray.remote(DecodeWorkerImpl)
