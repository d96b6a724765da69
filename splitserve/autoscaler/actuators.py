"""Actuators: what carries a decision out.

Workers (``RayActuator``), on the controller actor that owns the pools:

    add      controller.add_worker(pool, instance_type, wait=False): the worker asks Ray for
             its type's resources/labels, so it lands on a node of that type; it is STARTING
             until its model is loaded, then UP (the router picks it)
    drain    controller.remove_worker(name), in the background: the worker leaves the
             router's picks, its running requests migrate live to the other workers, then it
             stops; no client sees an error
    migrate  controller.rebalance(hot, cold, count), in the background

Nodes, after every round (``provision``), by one of:

    RayNodes       ray.autoscaler.sdk.request_resources(bundles=...): one bundle of the type's
                   node resources per instance, so Ray's autoscaler (or KubeRay's in-tree one)
                   starts nodes ahead of the workers' own demand and, after a drain, stops
                   asking for the drained one's node (Ray removes it once idle)
    KubeRayNodes   (``kuberay.py``) the worker group replicas and workersToDelete of the
                   RayCluster a RayService owns, when no Ray autoscaler runs there
"""

from __future__ import annotations

import asyncio
import logging

from splitserve.autoscaler.catalog import Catalog
from splitserve.autoscaler.decision import Action

logger = logging.getLogger("splitserve.autoscaler")


class RayNodes:
    """Nodes through Ray's autoscaler: one bundle of the type's node resources per instance that exists,
    is starting or is draining (``request_resources``); a drained instance's node is no longer asked
    for, and Ray removes it once idle."""

    def __init__(self, catalog: Catalog):
        self.catalog = catalog

    def provision(self, members: list[dict], released: list[dict]) -> dict:
        from ray.autoscaler.sdk import request_resources
        bundles = [dict(self.catalog.get(m["node_type"]).node_resources) for m in members
                   if m["state"] != "dead" and m["node_type"] in self.catalog.types
                   and self.catalog.get(m["node_type"]).node_resources]
        request_resources(bundles=bundles)
        return {"bundles": len(bundles)}

    def release(self) -> None:
        from ray.autoscaler.sdk import request_resources
        request_resources(bundles=[])


class RayActuator:
    """Workers through the controller; nodes through ``nodes`` (``RayNodes``, ``kuberay.KubeRayNodes``,
    or None: the cluster's nodes are someone else's business)."""

    def __init__(self, controller, catalog: Catalog, nodes=None):
        self.controller, self.catalog, self.nodes = controller, catalog, nodes
        self.background: set[asyncio.Task] = set()
        self.released: list[dict] = []  # drained workers whose nodes can go: {"instance_type", "node_id"}

    async def act(self, action: Action, record: dict) -> None:
        """Carry one action out; what happened goes into ``record["results"]`` (drains and migrations
        fill it in when they finish)."""
        results = record.setdefault("results", [])
        if action.kind == "add":
            for _ in range(action.count):
                try:
                    name = await self.controller.add_worker.remote(action.pool, action.instance_type, False)
                    results.append({"added": name, "pool": action.pool, "instance_type": action.instance_type})
                except Exception as e:  # noqa: BLE001 - reported in the decision's record
                    results.append({"add_failed": action.pool, "error": str(e)})
        elif action.kind == "drain":
            def done(result):
                self.released.append({"instance_type": action.instance_type, "node_id": result.get("node_id")})
            self._spawn(self.controller.remove_worker.remote(action.worker), results, {"drained": action.worker},
                        done)
        elif action.kind == "migrate":
            self._spawn(self.controller.rebalance.remote(action.worker, action.target, action.count), results,
                        {"rebalanced": action.worker})
        else:
            raise ValueError(f"unknown action kind {action.kind!r}")

    def _spawn(self, ref, results: list, label: dict, on_done=None) -> None:
        async def wait():
            try:
                result = await ref
                results.append({**label, **result})
                if on_done is not None:
                    on_done(result)
            except Exception as e:  # noqa: BLE001
                results.append({**label, "error": str(e)})
                logger.warning("autoscaler: %s failed: %s", label, e)
        task = asyncio.get_running_loop().create_task(wait())
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def provision(self, members: list[dict]) -> dict | None:
        """Bring the cluster's nodes in line with the instances (``members``: membership rows)."""
        if self.nodes is None:
            return None
        released, self.released = self.released, []
        try:
            return await asyncio.to_thread(self.nodes.provision, members, released)
        except Exception:
            self.released = released + self.released  # try again next round
            raise

    def release_nodes(self) -> None:
        if self.nodes is not None and hasattr(self.nodes, "release"):
            self.nodes.release()

    async def settle(self) -> None:
        """Wait for drains and migrations under way (shutdown, tests)."""
        while self.background:
            await asyncio.gather(*list(self.background), return_exceptions=True)
