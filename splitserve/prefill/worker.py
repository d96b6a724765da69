"""The prefill worker: a Ray actor wrapping an engine in the prefill role.

A request passes through::

    reserve on the chosen decode worker (RESOURCE_EXHAUSTED -> "no_capacity": the router picks another)
      -> prefill (chunked, batched with other prompts) -> first token sampled, blocks held
      -> KV streamed to the decode worker, layer by layer, until it commits
       (a failed transfer is retried once with a new reservation; then the request fails with the reason)
      -> local blocks released -> the first token goes back to the router

If the first token already ends the request (EOS, stop string, max_tokens=1)
the reservation is given back and the request completes here.
"""

from __future__ import annotations

import os
import time

import ray

from splitserve.engine.sampling_params import SamplingParams


class PrefillWorkerImpl:
    def __init__(self, engine_kwargs: dict, cluster_token: str, kv_codec: str = "raw"):
        from splitserve.engine.async_engine import AsyncEngine
        from splitserve.engine.engine import LLMEngine
        from splitserve.kvtransfer.client import KVSender
        from splitserve.kvtransfer.wire import fingerprint

        self.engine = LLMEngine(**engine_kwargs)
        self.aengine = AsyncEngine(self.engine)
        self.sender = KVSender(cluster_token, kv_codec=kv_codec)
        self.layout = fingerprint(self.engine.model_config, self.engine.kv_spec)
        self.queued_prompt_tokens = 0
        self.num_prefills = 0
        self.num_transfer_retries = 0

    async def prefill(self, request_id: str, prompt_token_ids: list[int], params: dict,
                      decode_address: str) -> dict:
        """Returns {"status": "transferred" | "finished" | "no_capacity" | "error", ...}."""
        from splitserve.kvtransfer.client import NoCapacityError, TransferError

        n = len(prompt_token_ids)
        try:
            await self.sender.reserve(decode_address, request_id, n, self.layout)
        except NoCapacityError as e:
            return {"status": "no_capacity", "error": str(e)}
        except TransferError as e:
            return {"status": "error", "error": f"reserve failed: {e}"}
        self.queued_prompt_tokens += n
        start = time.perf_counter()
        first = None
        try:
            async for out in self.aengine.generate(prompt_token_ids, SamplingParams(**params),
                                                   request_id=request_id, hold_kv=True):
                first = out
        finally:
            self.queued_prompt_tokens -= n
            if first is None or first.finish_reason != "prefilled":
                await self._give_back(decode_address, request_id)
        result = {"first": first, "prefill_s": time.perf_counter() - start, "pid": os.getpid()}
        if first.finish_reason != "prefilled":
            return {"status": "finished", **result}
        try:
            ack = await self._send_with_retry(decode_address, request_id, n)
        except TransferError as e:
            return {"status": "error", "error": f"KV transfer failed: {e}", **result}
        finally:
            with self.aengine._lock:
                self.engine.release(request_id)
        self.num_prefills += 1
        return {"status": "transferred", "kv_bytes": ack.num_bytes, "kv_chunks": ack.num_chunks, **result}

    async def _send_with_retry(self, address: str, request_id: str, num_tokens: int, attempts: int = 2):
        """Stream the KV; a failed transfer (the receiver dropped its reservation) is retried once
        with a fresh reservation, since the blocks are still held here."""
        from splitserve.kvtransfer.client import TransferError
        for attempt in range(attempts):
            try:
                if attempt:
                    await self.sender.reserve(address, request_id, num_tokens, self.layout)
                return await self.sender.send(address, self.engine, self.aengine._lock, request_id)
            except TransferError:
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
                "num_transfer_retries": self.num_transfer_retries, "pid": os.getpid(), **self.engine.stats()}


PrefillWorker = ray.remote(PrefillWorkerImpl)
