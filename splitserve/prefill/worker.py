"""The prefill worker: a Ray actor wrapping an engine in the prefill role.

A request passes through::

    reserve on the chosen decode worker ("no_capacity": the router picks another;
                                         "decode_failed": unreachable or refused, likewise)
      -> prefill (chunked, batched with other prompts) -> next token sampled, request suspended (held)
      -> KV and snapshot streamed to the decode worker until it commits
       (a failed transfer is retried once with a new reservation; then "transfer_failed": the
        router places the request again, with the token sampled here)
      -> local blocks released -> the token goes back to the router

A request recovering from a lost decode worker comes with a snapshot
(``resume``): its prompt and the tokens the client already has are
recomputed here, and the next token is sampled exactly as it would have been.
If the sampled token already ends the request (EOS, stop string, max_tokens)
the reservation is given back and the request completes here.
"""

from __future__ import annotations

import os
import time
import uuid

import ray

from splitserve.autoscaler.signals import Recorder, engine_gauges, step_recorder
from splitserve.platform.metrics import WorkerMetrics
from splitserve.decode.worker import ray_node_id
from splitserve.engine.request import RequestSnapshot
from splitserve.engine.sampling_params import SamplingParams
from splitserve.errors import NoCapacityError, TransferFailedError, describe


class PrefillWorkerImpl:
    def __init__(self, engine_kwargs: dict, cluster_token: str, kv_codec: str = "raw", name: str = "prefill",
                 kv_tls=None):
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
        self.queued_prompt_tokens = 0
        self.num_prefills = 0
        self.num_transfer_retries = 0
        self.recorder = Recorder()
        self.engine.on_step = step_recorder(self.recorder, "prefill")
        self.metrics = WorkerMetrics("prefill", name)

    async def start(self) -> dict:
        """Idempotent; the worker's identity (prefill workers serve no KV address)."""
        self.metrics.start_export(self.stats)
        return {"name": self.name, "address": None, "pid": os.getpid(), "incarnation": self.incarnation,
                "node_id": ray_node_id()}

    async def prefill(self, request_id: str, prompt_token_ids: list[int], params: dict, decode_address: str,
                      resume: dict | None = None) -> dict:
        """Returns {"status": "transferred" | "finished" | "no_capacity" | "decode_failed" | "transfer_failed"
        | "error", ...}; ``resume``: a RequestSnapshot (as a dict) to continue by recompute."""
        snapshot = RequestSnapshot.from_dict(resume) if resume is not None else None
        if snapshot is not None and snapshot.request_id != request_id:
            return {"status": "error", "error": f"the snapshot is for {snapshot.request_id!r}, not {request_id!r}"}
        n = snapshot.num_tokens if snapshot is not None else len(prompt_token_ids)
        try:
            await self.sender.reserve(decode_address, request_id, n, self.layout)
        except NoCapacityError as e:
            return {"status": "no_capacity", "error": str(e)}
        except TransferFailedError as e:
            status = "error" if e.code == "INVALID_ARGUMENT" else "decode_failed"  # can never fit / try another
            return {"status": status, "code": e.code, "error": f"reserve failed: {e}"}
        self.queued_prompt_tokens += n
        self.recorder.record("arrival", n)
        start = time.perf_counter()
        first = None
        try:
            run = self.aengine.generate(snapshot=snapshot, hold_kv=True) if snapshot is not None else \
                self.aengine.generate(prompt_token_ids, SamplingParams(**params), request_id=request_id, hold_kv=True)
            async for out in run:
                first = out
        finally:
            self.queued_prompt_tokens -= n
            if first is None or first.finish_reason != "prefilled":
                await self._give_back(decode_address, request_id)
        prefilled = time.perf_counter()
        result = {"first": first, "prefill_s": prefilled - start, "pid": os.getpid()}
        if first.finish_reason != "prefilled":
            return {"status": "finished", **result}
        held = self.engine.held.get(request_id)
        if held is not None and held.scheduled_at is not None:  # perf_counter and monotonic: one clock on Linux
            self.recorder.record("queue_s", max(0.0, held.scheduled_at - start))
            self.metrics.queued(max(0.0, held.scheduled_at - start))
            self.recorder.record("prefill_s", prefilled - max(start, held.scheduled_at))
        try:
            ack = await self._send_with_retry(decode_address, request_id, n)
        except (NoCapacityError, TransferFailedError) as e:
            self.metrics.transfer_failed(getattr(e, "code", None) or type(e).__name__)
            return {"status": "transfer_failed", "error": f"KV transfer failed: {describe(e)}", **result}
        finally:
            self.port.release(request_id)
        done = time.perf_counter()
        self.metrics.transferred(done - prefilled, ack.num_bytes)
        self.recorder.record("transfer_s", done - prefilled)
        self.recorder.record("ttft_s", done - start)
        self.num_prefills += 1
        return {"status": "transferred", "kv_bytes": ack.num_bytes, "kv_chunks": ack.num_chunks, **result}

    async def _send_with_retry(self, address: str, request_id: str, num_tokens: int, attempts: int = 2):
        """Stream the KV; a failed transfer (the receiver dropped its reservation) is retried once
        with a fresh reservation, since the blocks are still held here."""
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
            await self.sender.release(address, request_id)
        except Exception:  # the reservation also expires on its own
            pass

    def abort(self, request_id: str) -> bool:
        return self.aengine.abort_request(request_id)

    def stats(self) -> dict:
        # Lock-free on purpose: counters read between steps are good enough for routing, and
        # taking the engine lock would stall this actor's event loop (and its gRPC server) a step.
        return {"queued_prompt_tokens": self.queued_prompt_tokens, "num_prefills": self.num_prefills,
                "num_transfer_retries": self.num_transfer_retries, "name": self.name, "pid": os.getpid(),
                **self.engine.stats()}

    def signals(self) -> dict:
        """What the autoscaler reads (``autoscaler/signals.py``): gauges now, timed samples over the window."""
        return {"gauges": {**engine_gauges(self.engine), "queued_prompt_tokens": self.queued_prompt_tokens},
                **self.recorder.export()}

    def leaks(self) -> dict:
        """Every per-request structure on this worker, by size: all zero when it is idle."""
        return {**self.engine.leaks(), **self.aengine.leaks()}

    async def stop(self) -> None:
        self.metrics.stop_export()
        await self.sender.close()
        self.aengine.shutdown()


PrefillWorker = ray.remote(PrefillWorkerImpl)
