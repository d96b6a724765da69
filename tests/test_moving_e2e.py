"""Requests that move, end to end: a real local Ray, 1 prefill and 2 decode actors on the real SmolLM2
(fp32, so greedy text compares exactly with the single-process engine), Ray Serve's gRPC and HTTP
proxies, tritonclient, and the admin API. Live migration mid-stream, a decode actor killed under 6
streams, a prefill actor killed mid-prefill, decode workers added and removed under load: every
stream completes with the text of an undisturbed run, each output index once, and every per-request
structure on every worker (and the router) is empty afterwards."""

import os
import signal
import threading
import time
import urllib.request

import pytest

from helpers import admin, free_port, kserve_inputs

pytestmark = pytest.mark.real_model

MODEL = "smollm2"
PROMPTS = ["The three primary colors are", "Once upon a time, a small robot", "def add(a, b):",
           "The capital of France is", "Water boils at", "A haiku about the sea:"]



@pytest.fixture(scope="module")
def server(real_model_path):
    import ray
    from splitserve.platform.config import PoolConfig, ServeConfig
    from splitserve.platform.server import start_server

    cfg = ServeConfig(model=real_model_path, model_name=MODEL, dtype="float32", http_port=free_port(),
                      grpc_port=free_port(), max_queue_wait_s=60.0,
                      prefill=PoolConfig(threads=1, kv_cache_memory_mb=128, max_num_batched_tokens=256),
                      decode=PoolConfig(replicas=2, threads=1, kv_cache_memory_mb=96))
    assert not ray.is_initialized(), "an earlier test left Ray initialized (its resources would be used)"
    srv = start_server(cfg, num_cpus=8, log=lambda m: None)
    yield srv
    srv.shutdown()
    assert not ray.is_initialized()


@pytest.fixture(scope="module")
def triton(server):
    import tritonclient.grpc as tg
    client = tg.InferenceServerClient(server.endpoints["grpc"])
    yield client
    client.close()


def expected(real_engine, prompt, max_tokens):
    return expected_all(real_engine, [prompt], max_tokens)[0]


def expected_all(real_engine, prompts, max_tokens) -> list[str]:
    """The undisturbed greedy texts, in one batch (one by one, six 96-token answers took a minute)."""
    from splitserve.engine.sampling_params import SamplingParams
    outs = real_engine.generate(list(prompts), SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
    return [o.text for o in outs]


def _inputs(prompt, max_tokens):
    return kserve_inputs(prompt, {"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}, stream=True)


class Streams:
    """Streamed KServe requests on one bidi stream: text, output indices and arrival times per request."""

    def __init__(self, server):
        import tritonclient.grpc as tg
        self.client = tg.InferenceServerClient(server.endpoints["grpc"])
        self.got: dict[str, dict] = {}
        self.errors: list = []
        self.done = threading.Event()
        self.lock = threading.Lock()
        self.client.start_stream(callback=self._on)

    def _on(self, result, error):
        with self.lock:
            if error is not None:
                self.errors.append(str(error))
                return
            r = result.get_response()
            g = self.got[r.id]
            g["text"] += result.as_numpy("text_output")[0].decode()
            start, count = r.parameters["output_index"].int64_param, r.parameters["num_output_tokens"].int64_param
            g["indices"] += list(range(start, start + count))
            g["times"].append(time.monotonic())
            if r.parameters["triton_final_response"].bool_param:
                g["final"] = result.as_numpy("finish_reason")[0].decode()

    def send(self, rid, prompt, max_tokens):
        self.got[rid] = {"text": "", "indices": [], "times": [], "final": None, "max_tokens": max_tokens}
        self.client.async_stream_infer(MODEL, _inputs(prompt, max_tokens), request_id=rid,
                                       enable_empty_final_response=True)

    def tokens(self, rid) -> int:
        return len(self.got[rid]["indices"])

    def wait(self, timeout=240):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.errors:
            if all(g["final"] is not None for g in self.got.values()):
                break
            time.sleep(0.05)
        self.client.stop_stream()
        self.client.close()
        assert not self.errors, self.errors
        for rid, g in self.got.items():
            assert g["final"] == "length", (rid, g)
            assert g["indices"] == list(range(g["max_tokens"])), rid  # each output index exactly once

    def pause(self, rid) -> float:
        times = self.got[rid]["times"]
        return max(b - a for a, b in zip(times, times[1:]))


def wait_until(predicate, timeout=120, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def assert_no_leaks(server, timeout=30):
    """Every per-request structure on every worker is empty, and the router tracks nothing."""
    def idle():
        leaks = server.pools.leaks()
        return leaks if all(not any(v.values()) for v in leaks.values()) else None
    try:
        leaks = wait_until(idle, timeout, "every worker to be idle")
    except AssertionError:
        raise AssertionError(f"leaked: {server.pools.leaks()}") from None
    assert admin(server, "GET", "/admin/requests")[1] == {"requests": {}, "open_streams": 0}  # the front door's
    return leaks


def decode_workers(server) -> dict:
    return {m.name: m for m in server.pools.view().members if m.pool == "decode" and m.state.value == "up"}


def test_live_migration_mid_stream_through_the_admin_api(server, triton, real_engine):
    streams = Streams(server)
    streams.send("m", PROMPTS[0], 40)
    wait_until(lambda: streams.tokens("m") >= 6, what="a few tokens")
    requests = admin(server, "GET", "/admin/requests")[1]["requests"]
    (rid, info), = requests.items()
    assert info["client_id"] == "m"  # listed under the id the KServe client gave
    target = next(n for n in decode_workers(server) if n != info["worker"])
    before = server.pools.all_stats()
    status, result = admin(server, "POST", f"/admin/requests/{rid}/migrate", {"target": target})
    assert status == 200 and result["status"] == "migrated" and result["source"] == info["worker"], result
    streams.wait()
    assert streams.got["m"]["text"] == expected(real_engine, PROMPTS[0], 40)
    after = server.pools.all_stats()
    assert after[target].transfers_committed == before[target].transfers_committed + 1
    assert after[info["worker"]].migrated_out == before[info["worker"]].migrated_out + 1
    # bad migrations: a clear error, nothing disturbed
    assert admin(server, "POST", f"/admin/requests/{rid}/migrate", {"target": target})[0] == 404  # finished
    assert admin(server, "POST", "/admin/requests/x/migrate", {})[0] == 400  # no target
    req = urllib.request.Request(server.endpoints["http"] + "/admin/requests")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=30)  # no token
    assert info.value.code == 401
    assert_no_leaks(server)


def test_killed_decode_worker_costs_a_pause_not_a_stream(server, triton, real_engine):
    decodes = sorted(decode_workers(server))
    victim, survivor = decodes
    admin(server, "POST", f"/admin/workers/{survivor}/drain")  # all six streams land on the victim
    streams = Streams(server)
    for i, p in enumerate(PROMPTS):  # long enough that none ends before the kill, whatever the load
        streams.send(f"k{i}", p, 96)
    wait_until(lambda: all(streams.tokens(f"k{i}") >= 3 for i in range(6)), what="six running streams")
    on_victim = admin(server, "GET", "/admin/requests")[1]["requests"]
    assert len(on_victim) == 6 and {r["worker"] for r in on_victim.values()} == {victim}
    admin(server, "POST", f"/admin/workers/{survivor}/undrain")
    old = server.pools.view().get(victim)
    os.kill(server.pools.all_stats()[victim].pid, signal.SIGKILL)  # a crash, not a clean stop
    assert triton.is_server_ready()  # the survivor serves: the server stays ready
    streams.wait()
    for i, want in enumerate(expected_all(real_engine, PROMPTS, 96)):
        assert streams.got[f"k{i}"]["text"] == want, i
        assert streams.pause(f"k{i}") < 30
    # Ray restarts the actor; the controller registers the new process, which takes traffic again
    new = wait_until(lambda: (m := server.pools.view().get(victim)) and m.state.value == "up"
                     and m.generation > old.generation and m, what="the replacement")
    admin(server, "POST", f"/admin/workers/{survivor}/drain")
    later = Streams(server)
    later.send("after", PROMPTS[3], 8)
    later.wait()
    admin(server, "POST", f"/admin/workers/{survivor}/undrain")
    assert later.got["after"]["text"] == expected(real_engine, PROMPTS[3], 8)
    assert server.pools.all_stats()[victim].transfers_committed >= 1 and new.kv_address != old.kv_address
    assert_no_leaks(server)


def test_killed_prefill_worker_mid_prefill_is_retried(server, triton, real_engine):
    long_prompt = "The history of science is long. " * 90  # ~720 tokens: a few seconds of prefill
    (prefill,) = [m for m in server.pools.view().members if m.pool == "prefill"]
    streams = Streams(server)
    streams.send("p0", long_prompt, 6)
    wait_until(lambda: server.pools.all_stats()[prefill.name].queued_prompt_tokens > 0, what="prefill")
    os.kill(server.pools.all_stats()[prefill.name].pid, signal.SIGKILL)
    streams.wait()
    assert streams.got["p0"]["text"] == expected(real_engine, long_prompt, 6)
    assert server.pools.view().get(prefill.name).generation > prefill.generation
    assert_no_leaks(server)


def test_decode_workers_added_and_removed_under_load(server, triton, real_engine):
    streams = Streams(server)
    jobs = [(f"l{i}", PROMPTS[i % len(PROMPTS)]) for i in range(10)]
    for rid, p in jobs[:5]:
        streams.send(rid, p, 40)
    status, added = admin(server, "POST", "/admin/workers", {"pool": "decode"})
    assert status == 200, added
    for rid, p in jobs[5:]:
        streams.send(rid, p, 40)
    wait_until(lambda: any(r["worker"] == added["added"] for r in
                           admin(server, "GET", "/admin/requests")[1]["requests"].values())
               or all(g["final"] for g in streams.got.values()), what="traffic on the new worker")
    busiest = max(decode_workers(server), key=lambda n: sum(
        r["worker"] == n for r in admin(server, "GET", "/admin/requests")[1]["requests"].values()))
    status, removed = admin(server, "DELETE", f"/admin/workers/{busiest}")  # drains it by live migration
    assert status == 200 and removed["remaining"] == 0, removed
    streams.wait()
    want = dict(zip(PROMPTS, expected_all(real_engine, PROMPTS, 40)))
    for rid, p in jobs:
        assert streams.got[rid]["text"] == want[p], rid
    assert busiest not in {m.name for m in server.pools.view().members}
    assert admin(server, "DELETE", "/admin/workers/no-such-worker")[0] == 404
    assert_no_leaks(server)


def test_a_worker_gone_for_good_is_replaced(server, triton, real_engine):
    """Killed with no restart left (not a crash Ray restarts): the controller starts a new worker."""
    import ray
    before = set(decode_workers(server))
    victim = sorted(before)[0]
    ray.kill(server.pools.view().get(victim).handle, no_restart=True)
    wait_until(lambda: victim not in {m.name for m in server.pools.view().members}, what="the dead one dropped")
    new = wait_until(lambda: set(decode_workers(server)) - before, what="a replacement")
    assert len(decode_workers(server)) == len(before)
    (name,) = new
    admin(server, "POST", f"/admin/workers/{next(iter(before - {victim}))}/drain")  # so the new one serves
    streams = Streams(server)
    streams.send("n", PROMPTS[4], 8)
    streams.wait()
    admin(server, "POST", f"/admin/workers/{next(iter(before - {victim}))}/undrain")
    assert streams.got["n"]["text"] == expected(real_engine, PROMPTS[4], 8)
    assert server.pools.all_stats()[name].transfers_committed == 1
    assert_no_leaks(server)
