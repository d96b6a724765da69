"""The KubeRay actuator against a server that speaks the Kubernetes API over HTTP (kmock; no real API
server installs offline), through the official ``kubernetes`` client: the exact patches sent, 409
Conflict retries, and nothing changed outside replicas / workersToDelete."""

import asyncio
import copy
import json

import kmock
import pytest

from splitserve.autoscaler.catalog import Catalog, InstanceType, PrefillModel, StepModel
from splitserve.autoscaler.kuberay import KubeRayConflictError, KubeRayNodes

# kmock's server runs in the test's event loop (the client in a thread); its scaffold speaks the API's
# shape and errors, and FakeCluster below keeps the objects (with resourceVersion checks)
pytestmark = [pytest.mark.asyncio, pytest.mark.kmock(cls=kmock.KubernetesScaffold)]

NS, SERVICE, CLUSTER = "serving", "splitserve", "splitserve-raycluster-x7k2p"
BASE = f"/apis/ray.io/v1/namespaces/{NS}"
CATALOG = Catalog([InstanceType(n, c, PrefillModel(0.01, 0.001), StepModel(0.02, 0.001))
                   for n, c in (("cpu-small", 0.1), ("cpu-large", 0.4))])


def group(name, replicas, **extra):
    return {"groupName": name, "replicas": replicas, "minReplicas": 0, "maxReplicas": 5,
            "rayStartParams": {"resources": json.dumps({name: 1})},
            "template": {"spec": {"containers": [{"name": "ray-worker", "image": "splitserve:0.1",
                                                  "resources": {"limits": {"cpu": "2"}}}]}}, **extra}


class FakeCluster:
    """The RayService and its RayCluster as the API server keeps them (resourceVersion checked on PATCH)."""

    def __init__(self):
        self.cluster = {"apiVersion": "ray.io/v1", "kind": "RayCluster",
                        "metadata": {"name": CLUSTER, "namespace": NS, "resourceVersion": "100"},
                        "spec": {"rayVersion": "2.60.0", "headGroupSpec": {"rayStartParams": {"num-cpus": "0"}},
                                 "workerGroupSpecs": [group("cpu-small", 1), group("cpu-large", 0)]},
                        "status": {"state": "ready"}}
        self.service = {"apiVersion": "ray.io/v1", "kind": "RayService",
                        "metadata": {"name": SERVICE, "namespace": NS, "resourceVersion": "7"},
                        "spec": {"rayClusterConfig": {"rayVersion": "2.60.0"}},
                        "status": {"activeServiceStatus": {"rayClusterName": CLUSTER}}}
        self.concurrent_writes = 0  # writes by someone else (KubeRay) just before our next PATCHes

    def patch(self, request):
        body = request.data
        if self.concurrent_writes:
            self.concurrent_writes -= 1
            self.cluster["status"]["lastUpdateTime"] = f"t{self.concurrent_writes}"  # KubeRay's own update
            self._bump()
        if body["metadata"]["resourceVersion"] != self.cluster["metadata"]["resourceVersion"]:
            return kmock.Response(status=409, payload={
                "kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict", "code": 409,
                "message": f"Operation cannot be fulfilled on rayclusters.ray.io {CLUSTER!r}: the object has been "
                           f"modified; please apply your changes to the latest version and try again"})
        for key, value in body["spec"].items():  # JSON merge patch: a list replaces the list
            self.cluster["spec"][key] = value
        self._bump()
        return kmock.Response(status=200, payload=copy.deepcopy(self.cluster))

    def _bump(self):
        self.cluster["metadata"]["resourceVersion"] = str(int(self.cluster["metadata"]["resourceVersion"]) + 1)


@pytest.fixture()
def fake(kmock):
    state = FakeCluster()
    kmock[f"get {BASE}/rayservices/{SERVICE}"] << (lambda: copy.deepcopy(state.service))
    kmock[f"get {BASE}/rayclusters/{CLUSTER}"] << (lambda: copy.deepcopy(state.cluster))
    kmock[f"patch {BASE}/rayclusters/{CLUSTER}"] << state.patch
    return state


def actuator(kmock, **kw):
    return KubeRayNodes.from_config(CATALOG, namespace=NS, rayservice=SERVICE, host=str(kmock.url).rstrip("/"), **kw)


def members(*types):
    return [{"name": f"w{i}", "pool": "decode", "state": "up", "node_type": t} for i, t in enumerate(types)]


def without_scaling_fields(cluster):
    c = copy.deepcopy(cluster)
    del c["metadata"]["resourceVersion"]
    c.get("status", {}).pop("lastUpdateTime", None)
    for g in c["spec"]["workerGroupSpecs"]:
        g.pop("replicas")
        g.pop("scaleStrategy", None)
    return c


async def test_scale_out_and_in_patches_only_replicas_and_workers_to_delete(kmock, fake):
    before = without_scaling_fields(fake.cluster)
    nodes = actuator(kmock)
    # two cpu-small instances and one cpu-large: replicas 2 and 1
    sent = await asyncio.to_thread(nodes.provision, members("cpu-small", "cpu-small", "cpu-large"), [])
    assert sent["metadata"] == {"resourceVersion": "100"} and set(sent) == {"metadata", "spec"}
    assert set(sent["spec"]) == {"workerGroupSpecs"}
    assert [(g["groupName"], g["replicas"]) for g in fake.cluster["spec"]["workerGroupSpecs"]] == \
        [("cpu-small", 2), ("cpu-large", 1)]
    # nothing to change: no PATCH at all
    patches = len(kmock["patch"])
    assert await asyncio.to_thread(nodes.provision, members("cpu-small", "cpu-small", "cpu-large"), []) is None
    assert len(kmock["patch"]) == patches
    # a drained cpu-large worker: its pod goes into workersToDelete, replicas 0
    nodes_of = {"node-abc": "splitserve-raycluster-x7k2p-cpu-large-worker-9xq2z"}
    import splitserve.autoscaler.kuberay as kuberay
    original, kuberay._pod_of = kuberay._pod_of, nodes_of.get
    try:
        await asyncio.to_thread(nodes.provision, members("cpu-small", "cpu-small"),
                                [{"instance_type": "cpu-large", "node_id": "node-abc"}])
    finally:
        kuberay._pod_of = original
    large = fake.cluster["spec"]["workerGroupSpecs"][1]
    assert large["replicas"] == 0
    assert large["scaleStrategy"] == {"workersToDelete": ["splitserve-raycluster-x7k2p-cpu-large-worker-9xq2z"]}
    assert without_scaling_fields(fake.cluster) == before  # nothing else in the cluster changed
    assert [r.method for r in kmock["patch"]] == ["PATCH", "PATCH"]
    assert all(r.headers["Content-Type"] == "application/merge-patch+json" for r in kmock["patch"])
    assert nodes.sent == [r.data for r in kmock["patch"]]


async def test_a_conflict_is_retried_on_a_fresh_read(kmock, fake):
    fake.concurrent_writes = 2  # KubeRay writes the object just before each of our first two PATCHes
    nodes = actuator(kmock)
    sent = await asyncio.to_thread(nodes.provision, members("cpu-small", "cpu-small", "cpu-small"), [])
    versions = [r.data["metadata"]["resourceVersion"] for r in kmock["patch"]]
    assert versions == ["100", "101", "102"]  # two 409s, each followed by a fresh GET
    assert sent["metadata"]["resourceVersion"] == "102"
    assert fake.cluster["spec"]["workerGroupSpecs"][0]["replicas"] == 3
    assert fake.cluster["status"]["lastUpdateTime"] == "t0"  # the other writer's change survived
    fake.concurrent_writes = 10
    with pytest.raises(KubeRayConflictError, match="5 conflicts in a row"):
        await asyncio.to_thread(nodes.provision, members("cpu-small"), [])


async def test_bad_configuration_is_a_clear_error(kmock, fake):
    nodes = actuator(kmock, groups={"cpu-large": "gpu-group"})
    with pytest.raises(ValueError, match=r"no worker group \['gpu-group'\]; it has \['cpu-large', 'cpu-small'\]"):
        await asyncio.to_thread(nodes.provision, members("cpu-large"), [])
    assert len(kmock["patch"]) == 0
    # replicas stay within the group's bounds
    await asyncio.to_thread(actuator(kmock).provision, members(*["cpu-small"] * 9), [])
    assert fake.cluster["spec"]["workerGroupSpecs"][0]["replicas"] == 5
    with pytest.raises(ValueError, match="unknown keys \\['zone'\\]"):
        KubeRayNodes.from_config(CATALOG, namespace=NS, rayservice=SERVICE, zone="a")
    with pytest.raises(ValueError, match="needs the RayService"):
        KubeRayNodes(None, CATALOG, NS)
