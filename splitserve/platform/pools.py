"""Pools of worker actors: how one is placed and started, and the driver's handle on all of them.

``spawn(cfg, pool, name)`` starts one worker actor: ``threads`` Ray CPUs (and
torch threads) plus the pool's extra Ray ``resources``, so a cluster can put
prefill on GPU nodes and decode on CPU nodes by giving each pool a resource
only those nodes offer. Ray restarts a crashed worker (``max_restarts``); the
controller re-registers it, or replaces one that is gone for good.

:class:`Pools` is what the process that started the server holds: it starts
the controller actor (``controller.py``), which owns the workers and their
membership, and forwards to it (add, drain, remove, stats, leak checks).
Colocated mode runs single-engine actors (the baseline) under the same
controller.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from dataclasses import replace

import ray

from splitserve.decode.worker import STREAM_BACKPRESSURE, ray_node_id, reap_stalled_forever
from splitserve.engine.sampling_params import SamplingParams
from splitserve.platform.config import PoolConfig, ServeConfig, engine_kwargs
from splitserve.stats import WorkerStats

MAX_RESTARTS = 3  # Ray restarts a crashed worker this often; after that the controller replaces it
# The control plane (controller, autoscaler, front door) lives on the head node (Ray's own head resource):
# a zero-CPU actor could otherwise land on any worker node and keep it busy, so Ray's autoscaler could
# never take that node back after a scale-in.
ON_HEAD = {"node:__internal_head__": 0.001}


class ColocatedWorkerImpl:
    """Prefill and decode in one engine (with or without chunked prefill)."""

    def __init__(self, kwargs: dict, name: str = "colocated"):
        from splitserve.engine.async_engine import AsyncEngine
        from splitserve.engine.engine import LLMEngine
        self.engine = LLMEngine(**kwargs)
        self.aengine = AsyncEngine(self.engine)
        self.name, self.incarnation = name, uuid.uuid4().hex[:12]
        self._stall_reaper = None

    async def start(self) -> dict:
        return {"name": self.name, "address": None, "pid": os.getpid(), "incarnation": self.incarnation,
                "node_id": ray_node_id()}

    @ray.method(num_returns="streaming", _generator_backpressure_num_objects=STREAM_BACKPRESSURE)
    async def generate(self, request_id: str, prompt_token_ids: list[int], params: dict):
        if self._stall_reaper is None:
            self._stall_reaper = asyncio.create_task(reap_stalled_forever(self))
        async for out in self.aengine.generate(prompt_token_ids, SamplingParams(**params), request_id=request_id):
            yield out

    def abort(self, request_id: str) -> bool:
        return self.aengine.abort_request(request_id)

    def stats(self) -> WorkerStats:
        # Lock-free on purpose: counters read between steps are good enough for routing, and
        # taking the engine lock would stall this actor's event loop (and its gRPC server) a step.
        return WorkerStats(name=self.name, pid=os.getpid(), engine=self.engine.stats())

    def leaks(self) -> dict:
        return {**self.engine.leaks(), **self.aengine.leaks()}

    def stop(self) -> None:
        self.aengine.shutdown()


ColocatedWorker = ray.remote(ColocatedWorkerImpl)


def actor_options(cfg: ServeConfig, pool: str, name: str, itype=None) -> tuple[dict, PoolConfig]:
    """(Ray actor options, the pool's config as this worker gets it) for one worker of ``pool``: its CPUs
    (threads), a GPU for a cuda pool, the pool's resources, and with ``itype`` (an autoscaler catalog
    ``InstanceType``) its threads and the Ray resources and labels that put the worker on a node of that type."""
    pc = cfg.decode if pool in ("decode", "colocated") else cfg.prefill
    if itype is not None:
        pc = replace(pc, threads=itype.threads, resources={**pc.resources, **itype.worker_resources})
    options = {"name": name, "num_cpus": pc.threads, "resources": dict(pc.resources), "max_concurrency": 1000,
               "max_restarts": MAX_RESTARTS}
    if pc.device == "cuda":
        options["num_gpus"] = 1  # Ray assigns the GPU (CUDA_VISIBLE_DEVICES): the engine's "cuda" is it
    if itype is not None and itype.labels:
        options["label_selector"] = dict(itype.labels)
    return options, pc


def spawn(cfg: ServeConfig, pool: str, name: str, itype=None):
    """Start one worker actor of ``pool`` (it loads its model in the background; ``start()`` waits);
    ``itype``: see ``actor_options``."""
    from splitserve.decode.worker import DecodeWorker
    from splitserve.prefill.worker import PrefillWorker

    options, pc = actor_options(cfg, pool, name, itype)
    if pool == "prefill":
        return PrefillWorker.options(**options).remote(engine_kwargs(cfg, pc, decodes=False), cfg.cluster_token,
                                                       cfg.kv_wire_codec, name, kv_tls=cfg.kv_tls,
                                                       queue_limit=cfg.prefill_queue_limit,
                                                       layer_overlap=cfg.kv_layer_overlap)
    if pool == "decode":
        return DecodeWorker.options(**options).remote(engine_kwargs(cfg, pc), cfg.cluster_token, cfg.kv_host, name,
                                                      cfg.kv_wire_codec, kv_port=cfg.kv_port, kv_tls=cfg.kv_tls)
    return ColocatedWorker.options(**options).remote(engine_kwargs(cfg, pc), name)


class Pools:
    """The driver's side: starts the controller and the configured workers; forwards to the controller."""

    def __init__(self, cfg: ServeConfig, prefix: str = "splitserve"):
        self.cfg, self.prefix = cfg, prefix
        self.controller = self.autoscaler = None

    def start(self) -> "Pools":
        from splitserve.platform.controller import Controller
        catalog = None
        if self.cfg.autoscale is not None:
            catalog, objectives = self.cfg.autoscale.load()
            self.cfg = with_instance_types(self.cfg, catalog)
        self.controller = Controller.options(name=f"{self.prefix}-controller", num_cpus=0, resources=ON_HEAD,
                                             max_concurrency=1000).remote(self.cfg, self.prefix,
                                                                          catalog=catalog and catalog.to_dict())
        ray.get(self.controller.start.remote())  # every worker loaded and registered
        if catalog is not None:
            from splitserve.autoscaler.loop import Autoscaler
            a = self.cfg.autoscale
            self.autoscaler = Autoscaler.options(name=f"{self.prefix}-autoscaler", num_cpus=0,
                                                 resources=ON_HEAD).remote(
                self.controller, catalog.to_dict(), a.objectives, a.period_s, a.nodes, a.kuberay, a.window_s)
            ray.get(self.autoscaler.start.remote())
        return self

    def handles(self) -> dict:
        """What the front door needs to build its router (the controller handle travels with it)."""
        return {"mode": self.cfg.mode, "controller": self.controller, "block_size": self.cfg.block_size,
                "max_wait_s": self.cfg.max_queue_wait_s, "max_inflight": self.cfg.max_queued_requests,
                "retry_after_s": self.cfg.retry_after_s, "recovery_wait_s": self.cfg.recovery_wait_s,
                "early_first_token": self.cfg.early_first_token,
                "prefix_caching": self.cfg.prefix_caching, "batched_outputs": self.cfg.batched_outputs,
                "cluster_token": self.cfg.cluster_token, "autoscaler": self.autoscaler,
                "model_name": self.cfg.model_name}

    def view(self):
        return ray.get(self.controller.view.remote())

    def all_stats(self) -> dict:
        return ray.get(self.controller.stats.remote())

    def leaks(self) -> dict:
        """Every worker's per-request structures by size (all zero when idle)."""
        return ray.get(self.controller.leaks.remote())

    def add_worker(self, pool: str) -> str:
        return ray.get(self.controller.add_worker.remote(pool))

    def drain(self, name: str) -> dict:
        return ray.get(self.controller.drain.remote(name))

    def undrain(self, name: str) -> dict:
        return ray.get(self.controller.undrain.remote(name))

    def remove_worker(self, name: str) -> dict:
        return ray.get(self.controller.remove_worker.remote(name))

    def shutdown(self) -> None:
        if self.autoscaler is not None:
            try:
                ray.get(self.autoscaler.stop.remote(), timeout=30)
            except Exception:
                pass
            ray.kill(self.autoscaler)
            self.autoscaler = None
        if self.controller is None:
            return
        try:
            ray.get(self.controller.shutdown.remote(), timeout=30)
        except Exception:
            pass
        ray.kill(self.controller)
        self.controller = None


def with_instance_types(cfg: ServeConfig, catalog) -> ServeConfig:
    """An autoscaled pool without an instance type starts on the catalog's cheapest type for it."""
    pools = {}
    for name in ("prefill", "decode"):
        pc = getattr(cfg, name)
        if pc.instance_type is None:
            kinds = catalog.for_pool(name)
            if not kinds:
                raise ValueError(f"the autoscale catalog has no instance type for the {name} pool")
            pc = replace(pc, instance_type=min(kinds, key=lambda t: (t.cost_per_hour, t.name)).name)
        elif pc.instance_type not in catalog.types:
            raise ValueError(f"{name}.instance_type {pc.instance_type!r} is not in the autoscale catalog; "
                             f"it has {sorted(catalog.types)}")
        pools[name] = pc
    return replace(cfg, **pools)


def make_router(h: dict):
    from splitserve.platform.cluster import RayCluster
    from splitserve.platform.router import ColocatedRouter, Router
    cluster = RayCluster(h["controller"], h.get("batched_outputs", True))
    if h["mode"] == "colocated":
        return ColocatedRouter(cluster, h["max_inflight"], model_name=h.get("model_name", "default"))
    return Router(cluster, h["block_size"], h["max_wait_s"], h["max_inflight"], model_name=h.get("model_name", "default"),
                  recovery_wait_s=h.get("recovery_wait_s", 60.0),
                  early_first_token=h.get("early_first_token", True), prefix_caching=h.get("prefix_caching", True))
