"""API keys, the standard gRPC health service and server reflection on the front door.

Fast tests first: the key check itself (headers, constant-time comparison, keys from the
environment, a key file, the config and the CLI flag) and the health answers of the front
door's own methods. Then one real server with keys on (Ray, Serve's gRPC and HTTP proxies, one
colocated worker on the real SmolLM2), driven by the real clients: grpc's health stub and
reflection client (what ``grpcurl`` and a Kubernetes gRPC probe do), tritonclient and openai,
with a key, with a wrong one and with none. "Keys off" is every other end-to-end test: they
send no key.
"""

import asyncio
import json
import types
import urllib.error
import urllib.request

import pytest

from helpers import admin, free_port, kserve_inputs

MODEL = "smollm2"
KEY, OTHER_KEY = "sk-test-0123456789", "sk-second-key"

# -- the key check (pure) -----------------------------------------------------------------------


def test_a_request_without_a_key_is_told_how_to_send_one():
    from splitserve.errors import AuthenticationError
    from splitserve.platform.auth import ApiKeys
    keys = ApiKeys([KEY])
    with pytest.raises(AuthenticationError, match=r"carried none: send the header 'Authorization: Bearer <key>'"):
        keys.check(None, None, "http")
    with pytest.raises(AuthenticationError, match=r"send the metadata 'authorization: Bearer <key>'"):
        keys.check("", "  ", "grpc")


@pytest.mark.parametrize("header", ["Basic " + KEY, KEY, "Bearer", "Bearer    ", "Token " + KEY])
def test_a_malformed_authorization_header_says_the_form_and_never_echoes_the_key(header):
    from splitserve.errors import AuthenticationError
    from splitserve.platform.auth import ApiKeys
    with pytest.raises(AuthenticationError, match=r"must read 'Bearer <key>'") as info:
        ApiKeys([KEY]).check(header, None, "http")
    assert KEY not in str(info.value)


def test_a_wrong_key_is_not_valid_and_is_never_echoed():
    from splitserve.errors import AuthenticationError
    from splitserve.platform.auth import ApiKeys
    keys = ApiKeys([KEY, OTHER_KEY])
    for authorization, x_api_key in ((f"Bearer {KEY}x", None), (None, "sk-guess")):
        with pytest.raises(AuthenticationError, match="the API key is not valid") as info:
            keys.check(authorization, x_api_key, "http")
        assert "sk-guess" not in str(info.value) and KEY not in str(info.value)


def test_any_of_the_keys_passes_in_either_header_and_no_keys_means_open():
    from splitserve.platform.auth import ApiKeys
    keys = ApiKeys([KEY, OTHER_KEY])
    keys.check(f"Bearer {KEY}", None, "http")
    keys.check(f"bearer  {OTHER_KEY} ", None, "http")  # the scheme is case-insensitive, as in RFC 7235
    keys.check(None, OTHER_KEY, "http")
    keys.check_grpc([("x-api-key", KEY), ("user-agent", "grpc-python")])
    keys.check_grpc([("authorization", f"Bearer {OTHER_KEY}")])
    open_door = ApiKeys()
    assert not open_door.enabled and keys.enabled and len(keys) == 2
    open_door.check(None, None, "http")
    open_door.check_grpc([])


def test_keys_are_compared_in_constant_time(monkeypatch):
    """Every stored key is compared, whichever matches (no early exit), always as two SHA-256 digests:
    the time does not depend on where, or how far, a guess matches."""
    import hmac

    from splitserve.platform import auth
    calls = []
    real = hmac.compare_digest

    def counting(a, b):
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    keys = auth.ApiKeys(["k1", "k2", "k3"])
    for presented, expected in (("k1", True), ("k3", True), ("k", False), ("x" * 1000, False)):
        calls.clear()
        assert keys.matches(presented) is expected
        assert calls == [(32, 32)] * 3
    assert not hasattr(keys, "keys") and all(isinstance(d, bytes) for d in keys._digests)  # digests only


def test_keys_from_the_environment():
    from splitserve.platform.auth import keys_from_env
    assert keys_from_env({}) == ()
    assert keys_from_env({"SPLITSERVE_API_KEYS": "  "}) == ()
    assert keys_from_env({"SPLITSERVE_API_KEYS": f" {KEY} ,{OTHER_KEY},"}) == (KEY, OTHER_KEY)
    with pytest.raises(ValueError, match=r"\$SPLITSERVE_API_KEYS is set but holds no key"):
        keys_from_env({"SPLITSERVE_API_KEYS": " , ,"})
    with pytest.raises(ValueError, match=r"\$SPLITSERVE_API_KEYS: key #2 is not a usable API key") as info:
        keys_from_env({"SPLITSERVE_API_KEYS": "good,bad key"})
    assert "bad key" not in str(info.value)


def test_keys_from_a_file(tmp_path):
    from splitserve.platform.auth import load_key_file
    good = tmp_path / "keys"
    good.write_text(f"# rotated 2026-11\n{KEY}\n\n  {OTHER_KEY}  \n")
    assert load_key_file(str(good)) == (KEY, OTHER_KEY)
    for text in ("", "\n\n", "# only a comment\n"):
        (tmp_path / "empty").write_text(text)
        with pytest.raises(ValueError, match=r"holds no key; write one key per line"):
            load_key_file(str(tmp_path / "empty"))
    (tmp_path / "spaced").write_text(f"{KEY}\nmy secret key\n")
    with pytest.raises(ValueError, match=r"line 2 is not a usable API key") as info:
        load_key_file(str(tmp_path / "spaced"))
    assert "secret" not in str(info.value)
    with pytest.raises(ValueError, match=r"--api-key-file: no file"):
        load_key_file(str(tmp_path / "missing"))


def test_serve_config_takes_keys_from_yaml_or_environment_and_hides_them(tmp_path, monkeypatch):
    from splitserve.platform.config import ServeConfig
    monkeypatch.delenv("SPLITSERVE_API_KEYS", raising=False)
    assert ServeConfig().api_keys == ()
    monkeypatch.setenv("SPLITSERVE_API_KEYS", f"{KEY},{OTHER_KEY}")
    cfg = ServeConfig()
    assert cfg.api_keys == (KEY, OTHER_KEY) and KEY not in repr(cfg)
    f = tmp_path / "serve.yaml"
    f.write_text(f"api_keys: [{OTHER_KEY}]\n")
    assert ServeConfig.from_yaml(str(f)).api_keys == (OTHER_KEY,)  # the file's keys, not the environment's
    f.write_text(f"api_keys: {KEY}\n")
    with pytest.raises(ValueError, match="api_keys must be a list of keys, got str"):
        ServeConfig.from_yaml(str(f))


def test_cli_key_file_errors_before_anything_starts(tmp_path, capsys, monkeypatch):
    import ray

    from splitserve.platform import cli
    monkeypatch.delenv("SPLITSERVE_API_KEYS", raising=False)
    empty = tmp_path / "keys"
    empty.write_text("# no keys yet\n")
    assert cli.main(["serve", "--api-key-file", str(empty)]) == 2
    assert "holds no key" in capsys.readouterr().err
    assert cli.main(["serve", "--api-key-file", str(tmp_path / "nope")]) == 2
    assert "--api-key-file: no file" in capsys.readouterr().err
    assert not ray.is_initialized()


def test_authentication_error_is_401_and_unauthenticated_through_the_one_table():
    from splitserve.errors import AuthenticationError, status_of
    from splitserve.platform.openai_api import error_body
    e = AuthenticationError("the API key is not valid")
    assert status_of(e) == ("UNAUTHENTICATED", 401, "authentication_error")
    assert error_body(e) == (401, {"error": {"message": "the API key is not valid", "type": "authentication_error",
                                             "param": None, "code": None}})


# -- the front door's health methods, without Ray -------------------------------------------------


class _Context:
    """What Serve hands a method as ``grpc_context``: metadata in, code and details out."""

    def __init__(self, metadata=()):
        self.metadata, self.code, self.details = list(metadata), None, None

    def invocation_metadata(self):
        return self.metadata

    def set_code(self, code):
        self.code = code

    def set_details(self, details):
        self.details = details


def _front_door(ready: list[bool], api_keys=()):
    """The FrontDoor's own methods bound to a stand-in holding a router whose readiness we set."""
    from splitserve.platform.auth import ApiKeys
    from splitserve.platform.frontdoor import FrontDoor

    class Router:
        async def ready(self):
            return ready[0]

    cls = FrontDoor.func_or_class
    door = types.SimpleNamespace(router=Router(), api_keys=ApiKeys(api_keys))
    for name in ("_ready", "_health_status", "Check", "Watch", "_authenticate"):
        setattr(door, name, types.MethodType(getattr(cls, name), door))
    return door


def test_health_check_follows_readiness_and_knows_its_services():
    import grpc
    from grpc_health.v1 import health_pb2
    ready = [True]
    door = _front_door(ready, api_keys=[KEY])  # health stays open with keys on: no metadata here
    check = lambda service: asyncio.run(door.Check(health_pb2.HealthCheckRequest(service=service), _Context()))
    assert check("").status == health_pb2.HealthCheckResponse.SERVING
    assert check("inference.GRPCInferenceService").status == health_pb2.HealthCheckResponse.SERVING
    ready[0] = False  # a pool with no live worker
    assert check("").status == health_pb2.HealthCheckResponse.NOT_SERVING
    ctx = _Context()
    asyncio.run(door.Check(health_pb2.HealthCheckRequest(service="nope.Service"), ctx))
    assert ctx.code == grpc.StatusCode.NOT_FOUND and "unknown service 'nope.Service'" in ctx.details


def test_health_watch_sends_the_status_then_each_change(monkeypatch):
    from grpc_health.v1 import health_pb2

    from splitserve.platform import kserve_front
    monkeypatch.setattr(kserve_front, "HEALTH_POLL_S", 0.01)
    ready = [True]
    door = _front_door(ready)

    async def watch():
        seen, stream = [], door.Watch(health_pb2.HealthCheckRequest())
        seen.append((await anext(stream)).status)
        ready[0] = False
        seen.append((await anext(stream)).status)
        ready[0] = True
        seen.append((await anext(stream)).status)
        await stream.aclose()
        return seen

    s = health_pb2.HealthCheckResponse
    assert asyncio.run(watch()) == [s.SERVING, s.NOT_SERVING, s.SERVING]


def test_grpc_calls_need_a_key_in_their_metadata():
    from splitserve.errors import AuthenticationError
    door = _front_door([True], api_keys=[KEY])
    door._authenticate(_Context([("authorization", f"Bearer {KEY}")]))
    with pytest.raises(AuthenticationError, match="carried none"):
        door._authenticate(_Context([("user-agent", "grpc-python")]))
    _front_door([True])._authenticate(_Context())  # no keys: open


# -- one real server with keys on ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(real_model_path):
    import ray
    from splitserve.platform.config import PoolConfig, ServeConfig
    from splitserve.platform.server import start_server

    cfg = ServeConfig(model=real_model_path, model_name=MODEL, dtype="float32", mode="colocated",
                      http_port=free_port(), grpc_port=free_port(), max_queue_wait_s=10.0,
                      decode=PoolConfig(threads=1, kv_cache_memory_mb=32, max_num_batched_tokens=128),
                      api_keys=(KEY, OTHER_KEY))
    assert not ray.is_initialized(), "an earlier test left Ray initialized (its resources would be used)"
    srv = start_server(cfg, num_cpus=2, log=lambda m: None)
    yield srv
    srv.shutdown()
    assert not ray.is_initialized()


@pytest.fixture(scope="module")
def channel(server):
    import grpc
    with grpc.insecure_channel(server.endpoints["grpc"]) as ch:
        yield ch


@pytest.fixture(scope="module")
def triton(server):
    import tritonclient.grpc as tg
    client = tg.InferenceServerClient(server.endpoints["grpc"])
    yield client
    client.close()


PARAMS = {"max_tokens": 4, "temperature": 0}


@pytest.mark.real_model
def test_grpc_health_check_and_watch_without_a_key(channel):
    """What ``grpcurl -plaintext HOST:PORT grpc.health.v1.Health/Check`` and a Kubernetes gRPC probe do."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "inference.GRPCInferenceService"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=30)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as info:
        health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=30)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND and "unknown service" in info.value.details()
    watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=30)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    watch.cancel()


@pytest.mark.real_model
def test_reflection_lists_and_describes_the_services(channel):
    """What ``grpcurl -plaintext HOST:PORT list`` and ``describe`` do, with grpc's own reflection client."""
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
    db = ProtoReflectionDescriptorDatabase(channel)
    services = set(db.get_services())
    assert {"inference.GRPCInferenceService", "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection"} <= services, services
    assert "ray.serve.RayServeAPIService" not in services
    pool = DescriptorPool(db)  # its own pool: tritonclient's messages live in the default one
    kserve = pool.FindServiceByName("inference.GRPCInferenceService")
    assert {"ModelInfer", "ModelStreamInfer", "ServerLive"} <= {m.name for m in kserve.methods}
    assert kserve.methods_by_name["ModelInfer"].input_type.full_name == "inference.ModelInferRequest"
    check = pool.FindServiceByName("grpc.health.v1.Health").methods_by_name["Check"]
    assert check.output_type.fields_by_name["status"].enum_type.values_by_name["SERVING"].number == 1
    # grpcurl asks reflection v1 first and falls back to v1alpha (all grpcio-reflection 1.81 serves) on
    # UNIMPLEMENTED: that answer, not a hang or another error, is what it needs
    import grpc
    v1 = channel.stream_stream("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                               request_serializer=lambda b: b, response_deserializer=lambda b: b)
    with pytest.raises(grpc.RpcError) as info:
        next(iter(v1(iter([b""]), timeout=30)))
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


@pytest.mark.real_model
def test_kserve_needs_a_key(triton):
    from tritonclient.utils import InferenceServerException
    assert triton.is_server_live() and triton.is_server_ready()  # probes: open
    with pytest.raises(InferenceServerException) as info:
        triton.infer(MODEL, kserve_inputs("Hello", PARAMS))
    assert info.value.status() == "StatusCode.UNAUTHENTICATED"
    assert "requires an API key" in info.value.message()
    assert "authorization: Bearer <key>" in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        triton.infer(MODEL, kserve_inputs("Hello", PARAMS), headers={"authorization": "Bearer sk-guess"})
    assert info.value.status() == "StatusCode.UNAUTHENTICATED" and "not valid" in info.value.message()
    assert "sk-guess" not in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        triton.is_model_ready(MODEL)
    assert info.value.status() == "StatusCode.UNAUTHENTICATED"

    for headers in ({"authorization": f"Bearer {KEY}"}, {"x-api-key": OTHER_KEY}):
        assert triton.is_model_ready(MODEL, headers=headers)
        assert triton.get_model_metadata(MODEL, headers=headers).name == MODEL
        out = triton.infer(MODEL, kserve_inputs("The capital of France is", PARAMS, exclude=True), headers=headers)
        assert out.as_numpy("text_output")[0].decode().strip()


def _stream(triton, headers):
    """One streamed request on a KServe bidi stream; (texts, error) from the callback."""
    import queue
    results: queue.Queue = queue.Queue()
    triton.start_stream(callback=lambda result, error: results.put((result, error)), headers=headers)
    try:
        triton.async_stream_infer(MODEL, kserve_inputs("Once upon a time", PARAMS, stream=True),
                                  enable_empty_final_response=True)
        texts = []
        while True:
            result, error = results.get(timeout=120)
            if error is not None:
                return texts, error
            texts.append(result.as_numpy("text_output")[0].decode())
            if result.get_response().parameters["triton_final_response"].bool_param:
                return texts, None
    finally:
        triton.stop_stream()


@pytest.mark.real_model
def test_kserve_stream_needs_a_key(triton):
    texts, error = _stream(triton, None)
    assert texts == [] and error is not None
    assert error.status() == "StatusCode.UNAUTHENTICATED" and "requires an API key" in error.message()
    texts, error = _stream(triton, {"authorization": f"Bearer {KEY}"})
    assert error is None and "".join(texts).strip()


def _http(server, method, path, headers=None, body=None):
    req = urllib.request.Request(server.endpoints["http"] + path, method=method, headers=headers or {},
                                 data=json.dumps(body).encode() if body is not None else None)
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.real_model
def test_openai_needs_a_key(server):
    import openai
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    for path, body in (("/v1/chat/completions", chat), ("/v1/models", None)):
        status, reply = _http(server, "POST" if body else "GET", path, {"content-type": "application/json"}, body)
        assert status == 401 and reply["error"]["type"] == "authentication_error"
        assert "send the header 'Authorization: Bearer <key>'" in reply["error"]["message"]

    wrong = openai.OpenAI(base_url=server.endpoints["openai"], api_key="sk-guess", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        wrong.chat.completions.create(model=MODEL, messages=chat["messages"], max_tokens=4)
    assert info.value.status_code == 401 and "the API key is not valid" in str(info.value)
    assert "sk-guess" not in str(info.value)

    oai = openai.OpenAI(base_url=server.endpoints["openai"], api_key=OTHER_KEY, max_retries=0)
    assert [m.id for m in oai.models.list()] == [MODEL]
    reply = oai.chat.completions.create(model=MODEL, messages=chat["messages"], max_tokens=4)
    assert reply.choices[0].message.content
    stream = oai.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=4, stream=True)
    assert "".join(c.choices[0].text for c in stream)


@pytest.mark.real_model
def test_health_and_admin_keep_their_own_rules(server):
    assert _http(server, "GET", "/health") == (200, {"ready": True})  # a probe: open
    assert admin(server, "GET", "/admin/workers")[0] == 200  # the cluster token, no API key
    status, reply = _http(server, "GET", "/admin/workers", {"authorization": f"Bearer {KEY}"})
    assert status == 401 and reply["error"]["type"] == "authentication_error"  # an API key is not the token
    assert "x-splitserve-token" in reply["error"]["message"]
