"""The Ray Serve application a RayService runs: ``import_path: splitserve.platform.app:build``.

``splitserve serve`` starts everything imperatively (``server.start_server``). On
Kubernetes, KubeRay hands Ray Serve a declarative ``serveConfigV2`` instead, and
Serve calls this application builder with the application's ``args`` (the fields
of ``ServeConfig``, the same as ``splitserve serve --config FILE``)::

    Serve (a build task on the head)  build(args)
        args -> ServeConfig.from_dict           unknown key / bad value: ValueError naming it
        find the named actor "splitserve-pools"
            found, same config  -> reuse it     (a Serve controller restart, a redeploy of the same config)
            found, other config -> stop it      (its pools with it), then start anew
            not found           -> start it     (lifetime detached, on the head, num_cpus 0)
        PoolsHost.__init__                      Pools(cfg).start(): controller, workers, autoscaler
        -> FrontDoor.bind(handles, ..., keys)   Serve deploys it; the proxies' ports and gRPC services
                                                come from serveConfigV2's http_options / grpc_options

Why a host actor: Serve runs the builder in a task, and actors a task creates die
with that task's worker process. The detached host owns the ``Pools`` (so the
controller, the workers and the autoscaler live as long as the cluster) and
keeps the config it was started with, so a second build can tell whether the
running pools are the ones asked for.

The pools end with the Ray cluster (KubeRay deletes the old RayCluster after a
new one took over), or when a build with another config replaces them: that
in-place change fails the requests running on the old pools, which is why the
Helm chart puts a checksum of the args on the head pod, so a change of the args
makes KubeRay roll out a new cluster without downtime instead.

The cluster token is the same on every pod (``SPLITSERVE_CLUSTER_TOKEN``, from a
Secret); it is left out of the comparison: pools that are reused keep theirs,
and the front door takes it from them. The API keys are read where the builder
runs (``$SPLITSERVE_API_KEYS`` on the head, or ``api_keys`` in the args).
"""

from __future__ import annotations

import time
from dataclasses import asdict, replace

import ray

from splitserve.platform.config import ServeConfig

POOLS_ACTOR = "splitserve-pools"
NAMESPACE = "splitserve"  # named actors are looked up in this Ray namespace
ON_HEAD = {"node:__internal_head__": 0.001}  # = pools.ON_HEAD (the control plane stays on the head)


def same_pools(a: ServeConfig, b: ServeConfig) -> bool:
    """Whether pools started for ``a`` serve ``b`` (everything but the cluster token)."""
    return asdict(replace(a, cluster_token="")) == asdict(replace(b, cluster_token=""))


@ray.remote(num_cpus=0)
class PoolsHost:
    """Owns one ``Pools`` (and so its controller, workers and autoscaler) for the life of the cluster."""

    def __init__(self, cfg: ServeConfig):
        from splitserve.platform.pools import Pools
        self.cfg = cfg
        self.pools = Pools(cfg).start()  # every worker loaded and registered

    def config(self) -> ServeConfig:
        return self.cfg

    def handles(self) -> dict:
        return self.pools.handles()

    def shutdown(self) -> None:
        self.pools.shutdown()


def find_or_start_pools(cfg: ServeConfig):
    """The running host for ``cfg``, or a new one (replacing a host started for another config)."""
    try:
        host = ray.get_actor(POOLS_ACTOR, namespace=NAMESPACE)
    except ValueError:  # no such actor
        host = None
    if host is not None:
        if same_pools(ray.get(host.config.remote()), cfg):
            return host
        ray.get(host.shutdown.remote())
        ray.kill(host)
        _wait_name_free(POOLS_ACTOR)
    return PoolsHost.options(name=POOLS_ACTOR, namespace=NAMESPACE, lifetime="detached",
                             resources=ON_HEAD).remote(cfg)


def _wait_name_free(name: str, timeout_s: float = 60.0) -> None:
    """ray.kill returns before the GCS frees the actor's name."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            return
        time.sleep(0.2)
    raise RuntimeError(f"the killed actor {NAMESPACE}/{name} still holds its name after {timeout_s} s")


def build(args: dict):
    """Ray Serve application builder: ``args`` (ServeConfig fields) -> the bound front door."""
    cfg = ServeConfig.from_dict(dict(args or {}), where="args")
    host = find_or_start_pools(cfg)
    from splitserve.platform.auth import ApiKeys
    from splitserve.platform.frontdoor import FrontDoor
    return FrontDoor.bind(ray.get(host.handles.remote()), cfg.model_name, cfg.model, ApiKeys(cfg.api_keys))
