"""Pool management: start, name, place and stop the worker actors.

Disaggregated: ``replicas`` prefill actors and ``replicas`` decode actors,
named ``{prefix}-prefill-{i}`` / ``{prefix}-decode-{i}``. Each reserves
``threads`` CPUs (and its torch uses that many threads) plus the pool's extra
Ray ``resources``, so a cluster can put prefill on GPU nodes and decode on CPU
nodes by giving each pool a resource only those nodes offer. Colocated: the
same number of single-engine actors (the baseline).
"""

from __future__ import annotations

import asyncio
import os

import ray

from splitserve.decode.worker import STREAM_BACKPRESSURE, reap_stalled_forever

from splitserve.engine.sampling_params import SamplingParams
from splitserve.platform.config import ServeConfig, engine_kwargs


class ColocatedWorkerImpl:
    """Prefill and decode in one engine (with or without chunked prefill)."""

    def __init__(self, kwargs: dict):
        from splitserve.engine.async_engine import AsyncEngine
        from splitserve.engine.engine import LLMEngine
        self.engine = LLMEngine(**kwargs)
        self.aengine = AsyncEngine(self.engine)
        self._stall_reaper = None

    @ray.method(num_returns="streaming", _generator_backpressure_num_objects=STREAM_BACKPRESSURE)
    async def generate(self, request_id: str, prompt_token_ids: list[int], params: dict):
        if self._stall_reaper is None:
            self._stall_reaper = asyncio.create_task(reap_stalled_forever(self))
        async for out in self.aengine.generate(prompt_token_ids, SamplingParams(**params), request_id=request_id):
            yield out

    def abort(self, request_id: str) -> bool:
        return self.aengine.abort_request(request_id)

    def stats(self) -> dict:
        # Lock-free on purpose: counters read between steps are good enough for routing, and
        # taking the engine lock would stall this actor's event loop (and its gRPC server) a step.
        return {**self.engine.stats(), "pid": os.getpid()}


ColocatedWorker = ray.remote(ColocatedWorkerImpl)


class Pools:
    def __init__(self, cfg: ServeConfig, prefix: str = "splitserve"):
        self.cfg, self.prefix = cfg, prefix
        self.prefill: dict = {}
        self.decode: dict = {}
        self.colocated: dict = {}
        self.decode_addresses: dict[str, str] = {}

    def _options(self, name: str, pool) -> dict:
        return {"name": name, "num_cpus": pool.threads, "resources": dict(pool.resources),
                "max_concurrency": 1000}

    def start(self) -> "Pools":
        from splitserve.decode.worker import DecodeWorker
        from splitserve.prefill.worker import PrefillWorker

        cfg = self.cfg
        if cfg.mode == "colocated":
            pool = cfg.decode
            for i in range(pool.replicas):
                name = f"{self.prefix}-colocated-{i}"
                self.colocated[name] = ColocatedWorker.options(**self._options(name, pool)).remote(
                    engine_kwargs(cfg, pool))
            ray.get([w.stats.remote() for w in self.colocated.values()])  # wait until loaded
            return self
        for i in range(cfg.prefill.replicas):
            name = f"{self.prefix}-prefill-{i}"
            self.prefill[name] = PrefillWorker.options(**self._options(name, cfg.prefill)).remote(
                engine_kwargs(cfg, cfg.prefill, decodes=False), cfg.cluster_token, cfg.kv_wire_codec)
        for i in range(cfg.decode.replicas):
            name = f"{self.prefix}-decode-{i}"
            self.decode[name] = DecodeWorker.options(**self._options(name, cfg.decode)).remote(
                engine_kwargs(cfg, cfg.decode), cfg.cluster_token, cfg.kv_host)
        addresses = ray.get([d.start.remote() for d in self.decode.values()])
        self.decode_addresses = {name: ident["address"] for name, ident in zip(self.decode, addresses)}
        ray.get([p.stats.remote() for p in self.prefill.values()])  # wait until loaded
        return self

    def handles(self) -> dict:
        """What the front door needs to build its router (actor handles travel with it)."""
        return {"mode": self.cfg.mode, "prefill": self.prefill, "decode": self.decode,
                "decode_addresses": self.decode_addresses, "colocated": self.colocated,
                "block_size": self.cfg.block_size, "max_wait_s": self.cfg.max_queue_wait_s,
                "max_inflight": self.cfg.max_queued_requests}

    def all_stats(self) -> dict:
        actors = {**self.prefill, **self.decode, **self.colocated}
        return dict(zip(actors, ray.get([a.stats.remote() for a in actors.values()])))

    def shutdown(self) -> None:
        for d in self.decode.values():
            try:
                ray.get(d.stop.remote(), timeout=10)
            except Exception:
                pass
        for a in [*self.prefill.values(), *self.decode.values(), *self.colocated.values()]:
            ray.kill(a)
        self.prefill.clear(), self.decode.clear(), self.colocated.clear()


def make_router(h: dict):
    from splitserve.platform.router import ColocatedRouter, Router
    if h["mode"] == "colocated":
        return ColocatedRouter(h["colocated"], h["max_inflight"])
    return Router(h["prefill"], h["decode"], h["decode_addresses"], h["block_size"], h["max_wait_s"],
                  h["max_inflight"])
