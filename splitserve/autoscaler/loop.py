"""The autoscaler: one Ray actor that runs the policy against the live cluster.

Every ``period_s``::

    collect   controller.signals(): membership rows + each worker's signals export
              -> signals.aggregate -> Snapshot
    decide    policy.decide(snapshot, catalog, objectives, state) -> Decision (it has an id)
    act       the actuator carries out its actions (adds at once; drains and migrations in the
              background, their outcome lands in the decision's record)
    nodes     the actuator brings the nodes in line: Ray's autoscaler (request_resources) or
              KubeRay (worker group replicas), ``autoscale.nodes``
    record    the decision goes into a ring (``history``), the log (when it acts or its reasons
              change) and Ray metrics (the dashboard's Prometheus endpoint)

It is a named actor (``{prefix}-autoscaler``): a second one cannot be created,
so one autoscaler acts at a time. ``tick()`` runs one round on demand (tests,
``--autoscale-period 0``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

import ray

from splitserve.autoscaler.actuators import RayActuator
from splitserve.autoscaler.catalog import Catalog
from splitserve.autoscaler.decision import Objectives, PolicyState
from splitserve.autoscaler.policy import decide
from splitserve.autoscaler.signals import WINDOW_S, aggregate

logger = logging.getLogger("splitserve.autoscaler")


class _Metrics:
    """Ray metrics (exported on the dashboard's Prometheus endpoint); no-ops where they can't be made."""

    def __init__(self):
        try:
            from ray.util.metrics import Counter, Gauge
            self.actions = Counter("splitserve_autoscaler_actions_total", "actions taken by the autoscaler",
                                   tag_keys=("pool", "kind"))
            self.target = Gauge("splitserve_autoscaler_target_instances", "instances the policy wants",
                                tag_keys=("pool", "instance_type"))
            self.instances = Gauge("splitserve_pool_instances", "instances up or starting",
                                   tag_keys=("pool", "instance_type"))
            self.latency = Gauge("splitserve_pool_latency_seconds", "server-side latency percentile over the window",
                                 tag_keys=("pool", "metric", "percentile"))
            self.demand = Gauge("splitserve_pool_demand", "arrivals/s (prefill) or output tokens/s (decode)",
                                tag_keys=("pool",))
        except Exception:  # noqa: BLE001 - metrics are an extra; never stop the loop for them
            self.actions = None

    def record(self, snapshot, decision) -> None:
        if self.actions is None:
            return
        for a in decision.actions:
            self.actions.inc(a.count if a.kind == "add" else 1, tags={"pool": a.pool, "kind": a.kind})
        for pool, mix in decision.targets.items():
            for kind, n in mix.items():
                self.target.set(n, tags={"pool": pool, "instance_type": kind})
        for pool, ps in snapshot.pools.items():
            for kind, n in ps.instances.items():
                self.instances.set(n, tags={"pool": pool, "instance_type": kind})
            for metric in ("ttft_s", "tpot_s", "queue_s"):
                for p in (50, 90, 99):
                    self.latency.set(getattr(ps, metric).at(p),
                                     tags={"pool": pool, "metric": metric[:-2], "percentile": str(p)})
        for pool, model in decision.model.items():
            self.demand.set(model["demand"], tags={"pool": pool})


class AutoscalerImpl:
    def __init__(self, controller, catalog: dict, objectives: dict, period_s: float = 5.0,
                 nodes: str = "none", kuberay: dict | None = None, window_s: float = WINDOW_S, history: int = 500):
        self.controller, self.period_s, self.window_s = controller, period_s, window_s
        self.catalog = Catalog.from_dict(catalog)
        self.objectives = Objectives(**objectives)
        self.state = PolicyState()
        self.actuator = RayActuator(controller, self.catalog, make_nodes(nodes, self.catalog, kuberay or {}))
        self.history: deque = deque(maxlen=history)
        self.last_snapshot = None
        self._last_reasons = None
        self._task = None
        self._metrics = _Metrics()

    async def start(self) -> None:
        if self._task is None and self.period_s > 0:
            self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception:  # noqa: BLE001 - one bad round must not end the loop
                logger.exception("autoscaler: a round failed")
            await asyncio.sleep(self.period_s)

    async def tick(self) -> dict:
        """One round: collect, decide, act. Returns the decision's record."""
        raw = await self.controller.signals.remote()
        snapshot = aggregate(raw["members"], raw["exports"], self.window_s)
        self.last_snapshot = snapshot
        decision = decide(snapshot, self.catalog, self.objectives, self.state, now=time.time())
        record = {**decision.to_dict(), "results": []}
        self.history.append(record)
        for action in decision.actions:
            await self.actuator.act(action, record)
        try:
            record["nodes"] = await self.actuator.provision(await self.controller.members.remote())
        except Exception as e:  # noqa: BLE001 - the workers are fine; the nodes are tried again next round
            record["nodes"] = {"error": str(e)}
            logger.warning("autoscaler %s: provisioning nodes failed: %s", decision.id, e)
        if decision.actions or decision.reasons != self._last_reasons:
            logger.info("autoscaler %s: actions=%s reasons=%s", decision.id,
                        [f"{a.kind} {a.pool} {a.instance_type or ''} x{a.count} {a.worker or ''}".strip()
                         for a in decision.actions], list(decision.reasons))
        self._last_reasons = decision.reasons
        self._metrics.record(snapshot, decision)
        return record

    def decisions(self, last: int = 50, acted_only: bool = False) -> list[dict]:
        rows = [r for r in self.history if r["actions"]] if acted_only else list(self.history)
        return rows[-last:]

    def snapshot(self) -> dict | None:
        return self.last_snapshot.to_dict() if self.last_snapshot is not None else None

    async def settle(self) -> None:
        await self.actuator.settle()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        await self.actuator.settle()
        self.actuator.release_nodes()


def make_nodes(kind: str, catalog: Catalog, kuberay: dict):
    """The node provisioner for ``autoscale.nodes``: none | ray | kuberay."""
    if kind == "none":
        return None
    if kind == "ray":
        from splitserve.autoscaler.actuators import RayNodes
        return RayNodes(catalog)
    if kind == "kuberay":
        from splitserve.autoscaler.kuberay import KubeRayNodes
        return KubeRayNodes.from_config(catalog, **kuberay)
    raise ValueError(f"autoscale.nodes must be 'none', 'ray' or 'kuberay'; got {kind!r}")


Autoscaler = ray.remote(AutoscalerImpl)
