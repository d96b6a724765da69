"""KubeRay nodes: the autoscaler's instances as worker group replicas of the RayCluster a RayService owns.

For a cluster where no Ray autoscaler runs (``enableInTreeAutoscaling: false``),
the autoscaler loop (``loop.py``) sets the replicas itself after each round,
through the official ``kubernetes`` client::

    provision(members, released)
        replicas[group]          = instances of the group's type (up, starting or draining)
        workersToDelete[group]  += the pods of drained workers (their Ray node's hostname is
                                   the pod name), so KubeRay deletes those, not any pod
        -> GET the RayCluster; change only those two fields of the groups concerned;
           PATCH (JSON merge) with the resourceVersion read: a 409 Conflict (someone,
           e.g. KubeRay, changed it meanwhile) re-reads and retries

Only ``spec.workerGroupSpecs[*].replicas`` and ``scaleStrategy.workersToDelete``
change, and on the RayCluster, never on the RayService: a change anywhere else
in the RayService's ``rayClusterConfig`` makes KubeRay roll out a whole new
cluster. The RayCluster's name comes from the RayService's status (or is given).
Instance type -> worker group: ``groups`` (default: the type's own name).
The head pod needs RBAC to get and patch ``rayclusters`` and get ``rayservices``.
"""

from __future__ import annotations

import copy
import logging

from splitserve.autoscaler.catalog import Catalog

logger = logging.getLogger("splitserve.autoscaler")

GROUP, VERSION = "ray.io", "v1"


class KubeRayConflictError(RuntimeError):
    pass


class KubeRayNodes:
    def __init__(self, api, catalog: Catalog, namespace: str, rayservice: str | None = None,
                 raycluster: str | None = None, groups: dict | None = None, max_retries: int = 5):
        if not (rayservice or raycluster):
            raise ValueError("the KubeRay actuator needs the RayService (or RayCluster) it scales: "
                             "autoscale.kuberay: {namespace: ..., rayservice: ...}")
        self.api, self.catalog, self.namespace = api, catalog, namespace
        self.rayservice, self.raycluster, self.max_retries = rayservice, raycluster, max_retries
        self.groups = {t: (groups or {}).get(t, t) for t in catalog.types}
        self.sent: list[dict] = []  # every patch body, in order (what the cluster was asked for)

    @classmethod
    def from_config(cls, catalog: Catalog, namespace: str = "default", rayservice: str | None = None,
                    raycluster: str | None = None, groups: dict | None = None, host: str | None = None,
                    **unknown) -> "KubeRayNodes":
        """In the cluster (the head pod's service account), or from a kubeconfig; ``host``: a given API URL."""
        if unknown:
            raise ValueError(f"autoscale.kuberay: unknown keys {sorted(unknown)}; allowed: namespace, "
                             f"rayservice, raycluster, groups, host")
        from kubernetes import client, config
        if host is not None:
            configuration = client.Configuration()
            configuration.host = host
            api_client = client.ApiClient(configuration)
        else:
            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            api_client = client.ApiClient()
        return cls(client.CustomObjectsApi(api_client), catalog, namespace, rayservice, raycluster, groups)

    def cluster_name(self) -> str:
        if self.raycluster:
            return self.raycluster
        svc = self.api.get_namespaced_custom_object(GROUP, VERSION, self.namespace, "rayservices", self.rayservice)
        name = ((svc.get("status") or {}).get("activeServiceStatus") or {}).get("rayClusterName")
        if not name:
            raise RuntimeError(f"RayService {self.namespace}/{self.rayservice} has no active RayCluster yet")
        return name

    def provision(self, members: list[dict], released: list[dict]) -> dict | None:
        replicas: dict[str, int] = {}
        for m in members:
            if m["state"] != "dead" and m["node_type"] in self.groups:
                group = self.groups[m["node_type"]]
                replicas[group] = replicas.get(group, 0) + 1
        delete: dict[str, list[str]] = {}
        for r in released:
            pod = _pod_of(r.get("node_id"))
            if pod and r.get("instance_type") in self.groups:
                delete.setdefault(self.groups[r["instance_type"]], []).append(pod)
                replicas.setdefault(self.groups[r["instance_type"]], 0)
        return self.scale(replicas, delete)

    def scale(self, replicas: dict[str, int], delete: dict[str, list[str]] | None = None) -> dict | None:
        """Set the groups' replicas (and pods to delete); the patch sent, or None when nothing changes."""
        delete = delete or {}
        name = self.cluster_name()
        for _ in range(self.max_retries):
            obj = self.api.get_namespaced_custom_object(GROUP, VERSION, self.namespace, "rayclusters", name)
            specs = copy.deepcopy(obj["spec"].get("workerGroupSpecs") or [])
            known = {s["groupName"] for s in specs}
            unknown = (set(replicas) | set(delete)) - known
            if unknown:
                raise ValueError(f"RayCluster {self.namespace}/{name} has no worker group {sorted(unknown)}; "
                                 f"it has {sorted(known)} (autoscale.kuberay.groups maps instance types to them)")
            for spec in specs:
                group = spec["groupName"]
                if group in replicas:
                    lo, hi = spec.get("minReplicas", 0), spec.get("maxReplicas", 2**31)
                    spec["replicas"] = max(lo, min(hi, replicas[group]))
                if delete.get(group):
                    strategy = spec.setdefault("scaleStrategy", {})
                    strategy["workersToDelete"] = sorted(set(strategy.get("workersToDelete") or []) | set(delete[group]))
            if specs == obj["spec"].get("workerGroupSpecs"):
                return None
            body = {"metadata": {"resourceVersion": obj["metadata"]["resourceVersion"]},
                    "spec": {"workerGroupSpecs": specs}}
            try:
                self.api.patch_namespaced_custom_object(GROUP, VERSION, self.namespace, "rayclusters", name, body)
            except Exception as e:  # kubernetes.client.ApiException: 409 means it changed since we read it
                if getattr(e, "status", None) == 409:
                    logger.info("autoscaler: RayCluster %s changed meanwhile (409): reading it again", name)
                    continue
                raise
            self.sent.append(body)
            return body
        raise KubeRayConflictError(f"RayCluster {self.namespace}/{name} kept changing: {self.max_retries} "
                                   f"conflicts in a row")


def _pod_of(node_id: str | None) -> str | None:
    """A Ray node's pod: on KubeRay the node's hostname is its pod's name."""
    if not node_id:
        return None
    import ray
    for n in ray.nodes():
        if n["NodeID"] == node_id:
            return n.get("NodeManagerHostname")
    return None
