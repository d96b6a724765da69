"""End to end: a real local Ray, Ray Serve's gRPC and HTTP proxies, prefill and
decode actors on the real SmolLM2, and the real clients (tritonclient, openai).

The server runs in fp32 so that its greedy text can be compared exactly with
the single-process engine (``real_engine``)."""

import os
import queue
import time

import numpy as np
import pytest

from helpers import admin, free_port, kserve_inputs

pytestmark = pytest.mark.real_model

MODEL = "smollm2"
PROMPTS = ["The three primary colors are", "Once upon a time, a small robot", "def add(a, b):"]



@pytest.fixture(scope="module")
def server(real_model_path):
    import ray
    from splitserve.platform.config import PoolConfig, ServeConfig
    from splitserve.platform.server import start_server

    cfg = ServeConfig(model=real_model_path, model_name=MODEL, dtype="float32", http_port=free_port(),
                      grpc_port=free_port(), max_queue_wait_s=3.0,
                      prefill=PoolConfig(threads=1, kv_cache_memory_mb=128, max_num_batched_tokens=256),
                      decode=PoolConfig(threads=1, kv_cache_memory_mb=96))
    assert not ray.is_initialized(), "an earlier test left Ray initialized (its resources would be used)"
    # every Ray process of this module reports its metrics each 0.5 s (Ray reads RAY_<setting> at start)
    os.environ["RAY_metrics_report_interval_ms"] = "500"
    try:
        srv = start_server(cfg, num_cpus=4, log=lambda m: None)
        srv.metrics_url = f"http://127.0.0.1:{ray._private.worker._global_node.metrics_export_port}/metrics"
        yield srv
        srv.shutdown()
    finally:
        os.environ.pop("RAY_metrics_report_interval_ms", None)
    assert not ray.is_initialized()


@pytest.fixture(scope="module")
def triton(server):
    import tritonclient.grpc as tg
    client = tg.InferenceServerClient(server.endpoints["grpc"])
    yield client
    client.close()


@pytest.fixture(scope="module")
def oai(server):
    import openai
    return openai.OpenAI(base_url=server.endpoints["openai"], api_key="unused")


def _expected(real_engine, prompt=None, messages=None, max_tokens=24):
    from splitserve.engine.sampling_params import SamplingParams
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    if messages is not None:
        return real_engine.generate([messages], params, use_chat=True)[0]
    return real_engine.generate([prompt], params)[0]


def _inputs(prompt, params=None, stream=None, exclude=True):
    return kserve_inputs(prompt, params, stream, exclude)


def _wait_idle(server, timeout=30):
    deadline = time.monotonic() + timeout
    while True:
        stats = server.pools.all_stats()
        busy = [n for n, s in stats.items() if s.engine.num_free_kv_blocks != s.engine.num_kv_blocks
                or s.engine.num_running or s.engine.num_waiting or s.engine.num_held or s.engine.num_reserved]
        if not busy:
            return stats
        if time.monotonic() > deadline:
            raise AssertionError(f"blocks still held on {busy}: {stats}")
        time.sleep(0.1)


def _scrape(server) -> list:
    """Every sample on Ray's Prometheus endpoint: [(name, labels, value)]."""
    import urllib.request
    from prometheus_client.parser import text_string_to_metric_families
    with urllib.request.urlopen(server.metrics_url, timeout=10) as r:
        text = r.read().decode()
    return [(s.name, s.labels, s.value) for f in text_string_to_metric_families(text) for s in f.samples]


def _metric(samples, name, **labels) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    return sum(v for n, lab, v in samples if n == name and all(lab.get(k) == w for k, w in labels.items()))


def _metrics_settle(server, check, timeout=30):
    """Scrape until ``check(samples)`` holds (Ray reports metrics every 0.5 s here); the last samples."""
    deadline = time.monotonic() + timeout
    while True:
        samples = _scrape(server)
        if check(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.5)


def _metrics_steady(server, timeout=30):
    """Samples once two scrapes 1.5 s apart agree on the request and token counters (what earlier tests
    served has all been reported)."""
    keys = ("ray_splitserve_requests_total", "ray_splitserve_output_tokens_total",
            "ray_splitserve_kv_transfer_bytes_total")
    last = _scrape(server)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(1.5)
        now = _scrape(server)
        if all(_metric(now, k) == _metric(last, k) for k in keys):
            return now
        last = now
    raise AssertionError("the metrics kept changing with nothing being served")


def test_health_and_metadata(triton):
    assert triton.is_server_live() and triton.is_server_ready() and triton.is_model_ready(MODEL)
    assert not triton.is_model_ready("other-model")
    meta = triton.get_model_metadata(MODEL)
    assert {i.name for i in meta.inputs} >= {"text_input", "stream", "sampling_parameters"}
    assert triton.get_server_metadata().name == "splitserve"


def test_kserve_infer_equals_single_process_engine(triton, real_engine, server):
    before = _wait_idle(server)
    result = triton.infer(MODEL, _inputs(PROMPTS[0], {"max_tokens": 24, "temperature": 0}))
    expected = _expected(real_engine, PROMPTS[0])
    assert result.as_numpy("text_output")[0].decode() == expected.text
    assert result.as_numpy("finish_reason")[0].decode() == expected.finish_reason
    after = _wait_idle(server)
    # prefill and decode ran in different processes, and the KV that crossed is exactly the prompt's blocks
    prefill = next(s for n, s in after.items() if "prefill" in n)
    decode = next(s for n, s in after.items() if "decode" in n)
    assert prefill.pid != decode.pid
    moved = decode.kv_bytes_received - next(s for n, s in before.items() if "decode" in n).kv_bytes_received
    spec = real_engine.kv_spec
    num_blocks = -(-expected.num_prompt_tokens // spec.block_size)
    assert moved == num_blocks * spec.bytes_per_block


def test_kserve_streams_concurrently_on_one_stream_and_across_streams(triton, real_engine, server):
    import tritonclient.grpc as tg
    results: queue.Queue = queue.Queue()
    triton.start_stream(callback=lambda result, error: results.put((result, error)))
    second = tg.InferenceServerClient(server.endpoints["grpc"])
    results2: queue.Queue = queue.Queue()
    second.start_stream(callback=lambda result, error: results2.put((result, error)))
    try:
        for i, p in enumerate(PROMPTS):
            triton.async_stream_infer(MODEL, _inputs(p, {"max_tokens": 16, "temperature": 0}, stream=True),
                                      request_id=f"s{i}", enable_empty_final_response=True)
        second.async_stream_infer(MODEL, _inputs(PROMPTS[1], {"max_tokens": 16, "temperature": 0}, stream=True),
                                  request_id="other", enable_empty_final_response=True)
        texts, order, done = {}, [], set()
        deadline = time.monotonic() + 120
        while len(done) < len(PROMPTS) and time.monotonic() < deadline:
            result, error = results.get(timeout=60)
            assert error is None, error
            rid = result.get_response().id
            order.append(rid)
            texts[rid] = texts.get(rid, "") + result.as_numpy("text_output")[0].decode()
            if result.get_response().parameters["triton_final_response"].bool_param:
                done.add(rid)
        result, error = results2.get(timeout=60)
        other = ""
        while True:
            assert error is None, error
            other += result.as_numpy("text_output")[0].decode()
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
            result, error = results2.get(timeout=60)
    finally:
        triton.stop_stream()
        second.stop_stream()
        second.close()
    for i, p in enumerate(PROMPTS):
        assert texts[f"s{i}"] == _expected(real_engine, p, max_tokens=16).text
    assert other == _expected(real_engine, PROMPTS[1], max_tokens=16).text
    # served concurrently: the streams' responses interleave rather than arriving one request after another
    firsts = [order.index(f"s{i}") for i in range(3)]
    lasts = [len(order) - 1 - order[::-1].index(f"s{i}") for i in range(3)]
    assert max(firsts) < min(lasts)
    _wait_idle(server)


def _prefix_hits(server) -> int:
    return sum(s.engine.prefix_hit_tokens for n, s in server.pools.all_stats().items() if "prefill" in n)


def test_openai_chat_and_completions(oai, real_engine, server):
    """Each request is asked twice: the second finds the first's prompt blocks in the prefill worker's
    prefix cache, and still gives the text of the reference engine, which has no cache."""
    hits = _prefix_hits(server)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    chat = oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0)
    expected_chat = _expected(real_engine, messages=messages)
    assert chat.choices[0].message.content == expected_chat.text
    assert "Paris" in chat.choices[0].message.content
    assert chat.usage.completion_tokens == len(expected_chat.token_ids)
    stream = oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected_chat.text
    assert chunks[-1].choices[0].finish_reason == "stop"
    comp = oai.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=24, temperature=0)
    assert comp.choices[0].text == _expected(real_engine, PROMPTS[2]).text
    streamed = "".join(c.choices[0].text for c in oai.completions.create(
        model=MODEL, prompt=PROMPTS[2], max_tokens=24, temperature=0, stream=True))
    assert streamed == comp.choices[0].text
    assert [m.id for m in oai.models.list().data] == [MODEL]
    _wait_idle(server)
    chat_blocks = (expected_chat.num_prompt_tokens - 1) // server.cfg.block_size
    assert chat_blocks >= 2 and _prefix_hits(server) - hits >= chat_blocks * server.cfg.block_size


def test_cancel_mid_stream_frees_every_block(oai, triton, server):
    """Requests far too long to finish within the wait: only cancellation can free their blocks."""
    from tritonclient.utils import InferenceServerException
    stream = oai.completions.create(model=MODEL, prompt=PROMPTS[1], temperature=0, stream=True,
                                    max_tokens=2000, extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()  # the client goes away mid-stream
    _wait_idle(server, timeout=10)
    with pytest.raises(InferenceServerException, match="Deadline"):  # a KServe client that gives up
        triton.infer(MODEL, _inputs(PROMPTS[0], {"max_tokens": 2000, "ignore_eos": True}), client_timeout=2)
    _wait_idle(server, timeout=10)
    # A KServe stream cancelled by its client: Ray Serve 2.60's gRPC proxy passes the cancellation on
    # to the replica only when it lands while the proxy awaits the next response, not while it sends
    # one (then the stream looks half-closed and the proxy keeps reading it). So the requests are
    # freed at once, or when they end: bounded, never held forever.
    results: queue.Queue = queue.Queue()
    triton.start_stream(callback=lambda result, error: results.put((result, error)))
    for i in range(2):
        triton.async_stream_infer(MODEL, _inputs(PROMPTS[i], {"max_tokens": 150, "ignore_eos": True}, stream=True),
                                  request_id=f"c{i}")
    results.get(timeout=60)
    results.get(timeout=60)
    triton.stop_stream(cancel_requests=True)
    _wait_idle(server, timeout=60)


def test_bad_input_is_rejected_with_its_reason(triton, oai, server):
    import openai
    from tritonclient.utils import InferenceServerException

    def status(call):
        with pytest.raises(InferenceServerException) as info:
            call()
        return info.value.status(), info.value.message()

    code, msg = status(lambda: triton.infer("no-such-model", _inputs("hi")))
    assert code == "StatusCode.NOT_FOUND" and "no-such-model" in msg
    import tritonclient.grpc as tg
    code, msg = status(lambda: triton.infer(MODEL, [tg.InferInput("prompt", [1], "BYTES")]))
    assert code == "StatusCode.INVALID_ARGUMENT" and "unknown input 'prompt'" in msg
    wrong = tg.InferInput("text_input", [1], "INT32")
    wrong.set_data_from_numpy(np.array([3], dtype=np.int32))
    code, msg = status(lambda: triton.infer(MODEL, [wrong]))
    assert code == "StatusCode.INVALID_ARGUMENT" and "text_input" in msg and "BYTES" in msg
    bad_json = _inputs("hi")
    s = tg.InferInput("sampling_parameters", [1], "BYTES")
    s.set_data_from_numpy(np.array([b"{not json"], dtype=object))
    code, msg = status(lambda: triton.infer(MODEL, bad_json + [s]))
    assert code == "StatusCode.INVALID_ARGUMENT" and "not valid JSON" in msg
    code, msg = status(lambda: triton.infer(MODEL, _inputs("hi", {"temperature": -1})))
    assert code == "StatusCode.INVALID_ARGUMENT" and "temperature" in msg
    code, msg = status(lambda: triton.infer(MODEL, _inputs("word " * 5000, {"max_tokens": 2})))
    assert code == "StatusCode.INVALID_ARGUMENT" and "prompt" in msg and "at most" in msg
    with pytest.raises(openai.BadRequestError) as info:
        oai.completions.create(model=MODEL, prompt="hi", temperature=-2)
    assert info.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        oai.completions.create(model="gpt-4", prompt="hi")
    _wait_idle(server)


def test_no_capacity_answers_resource_exhausted_not_a_hang(triton, real_engine, server):
    """The decode pool's free blocks all reserved on its KV plane (as prefill workers would, for KV on its
    way): one more request waits the bounded time, then is refused with RESOURCE_EXHAUSTED; once the
    room is given back, the same request is served."""
    import asyncio
    from tritonclient.utils import InferenceServerException
    from splitserve.kvtransfer.client import KVSender
    from splitserve.kvtransfer.wire import fingerprint
    (decode,) = [m for m in server.pools.view().members if m.pool == "decode"]
    free = server.pools.all_stats()[decode.name].engine.num_free_kv_blocks * server.cfg.block_size
    squats = {"squat0": free // 2, "squat1": free - free // 2}  # each under the worker's max_model_len
    layout = fingerprint(real_engine.model_config, real_engine.kv_spec)  # the same model, dtype and blocks

    async def kv(call):
        sender = KVSender(server.cfg.cluster_token)
        try:
            for rid, n in squats.items():
                await (sender.reserve(decode.kv_address, rid, n, layout) if call == "reserve"
                       else sender.release(decode.kv_address, rid))
        finally:
            await sender.close()

    prompt = "The history of science " * 50
    asyncio.run(kv("reserve"))
    try:
        assert server.pools.all_stats()[decode.name].engine.num_free_kv_blocks == 0
        start = time.monotonic()
        with pytest.raises(InferenceServerException) as info:
            triton.infer(MODEL, _inputs(prompt, {"max_tokens": 4}), client_timeout=60)
        assert info.value.status() == "StatusCode.RESOURCE_EXHAUSTED" and "had room" in info.value.message()
        assert 2.5 < time.monotonic() - start < 30  # max_queue_wait_s is 3
    finally:
        asyncio.run(kv("release"))
    served = triton.infer(MODEL, _inputs(prompt, {"max_tokens": 4}), client_timeout=60)
    assert served.as_numpy("text_output")[0]
    _wait_idle(server, timeout=60)


def test_a_request_that_fails_says_so_on_every_protocol(triton, oai, server):
    """With the only decode worker draining, nothing can take a request: after the bounded wait each
    protocol reports the failure with its reason (a 429 with Retry-After before any byte, streamed
    or not; a gRPC status; a KServe stream error), never a normal "stop"."""
    import openai
    (decode,) = [m.name for m in server.pools.view().members if m.pool == "decode"]
    before = _metrics_steady(server)
    assert admin(server, "POST", f"/admin/workers/{decode}/drain")[0] == 200
    try:
        assert not triton.is_server_ready()  # no decode worker takes traffic
        for stream in (True, False):  # refused before any byte: the stream never starts
            with pytest.raises(openai.RateLimitError) as info:
                oai.with_options(max_retries=0).completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=4,
                                                                   stream=stream)
            assert info.value.status_code == 429 and "no decode worker is up" in str(info.value)
            assert info.value.response.headers["retry-after"] == str(server.cfg.retry_after_s)
            assert info.value.body["type"] == "rate_limit_error"
        results: queue.Queue = queue.Queue()
        triton.start_stream(callback=lambda result, error: results.put((result, error)))
        triton.async_stream_infer(MODEL, _inputs(PROMPTS[0], {"max_tokens": 4}, stream=True), request_id="f")
        _, error = results.get(timeout=60)
        triton.stop_stream()
        assert error is not None and "no decode worker is up" in str(error)
        # each of the three counts once, under its error code
        refused = lambda s: _metric(s, "ray_splitserve_requests_total", outcome="error", code="RESOURCE_EXHAUSTED")
        after = _metrics_settle(server, lambda s: refused(s) - refused(before) >= 3)
        assert refused(after) - refused(before) == 3
        assert _metric(after, "ray_splitserve_requests_total", outcome="ok") == _metric(before, "ray_splitserve_requests_total", outcome="ok")
    finally:
        assert admin(server, "POST", f"/admin/workers/{decode}/undrain")[0] == 200
    assert triton.is_server_ready()
    _wait_idle(server)


@pytest.mark.parametrize("protocol", ["kserve", "openai"])
def test_bench_command_against_the_live_server(server, real_model_path, tmp_path, protocol):
    """`splitserve bench` over the real clients: every request completes with exactly the asked tokens."""
    import json
    from splitserve.platform.cli import main
    url = server.endpoints["grpc"] if protocol == "kserve" else server.endpoints["openai"]
    args = ["bench", "--url", url, "--protocol", protocol, "--model", MODEL, "--tokenizer-model", real_model_path,
            "--duration", "3", "--warmup", "0.5", "--max-tokens", "6", "--no-progress", "--out", str(tmp_path)]
    args += ["--rate", "2"] if protocol == "kserve" else ["--rates", "1,2", "--slo-ttft", "5", "--slo-tpot", "1"]
    assert main(args) == 0
    doc = json.loads((tmp_path / "bench.json").read_text())
    assert doc["records"] and all(r["error"] is None for r in doc["records"])
    assert all(r["output_tokens"] == 6 for r in doc["records"])
    assert doc["summary"]["ttft_s"]["p50"] > 0 and doc["summary"]["num_errors"] == 0
    assert (tmp_path / "latency_cdf.png").exists()
    if protocol == "openai":  # a sweep: the goodput follows from each rate's measured attainment (not a set
        # number: whether 2 req/s meets TTFT <= 5 s depends on how busy the machine is)
        from splitserve.bench.metrics import goodput
        att = {float(rate): a for rate, a in doc["sweep"]["attainment"].items()}
        meets = [r["ttft"] <= 5 and (r["tpot"] is None or r["tpot"] <= 1) for r in doc["records"]]
        assert att[max(att)] == pytest.approx(sum(meets) / len(meets))  # the last rate's, from its records
        assert min(att) == 1.0 and (2.0 in att) == (att[1.0] >= 0.9)  # the sweep goes on past a pass only
        assert doc["sweep"]["goodput"] == goodput(att) and (tmp_path / "slo_attainment.png").exists()
    _wait_idle(server)


def test_metrics_on_rays_prometheus_endpoint_match_what_was_served(triton, oai, real_engine, server):
    """Three requests over both protocols: the request, token and latency metrics grow by exactly what
    was served, and the KV bytes the prefill worker exported equal what the decode worker received."""
    _wait_idle(server)
    received = lambda: sum(getattr(s, "kv_bytes_received", 0) for s in server.pools.all_stats().values())
    ok = dict(model=MODEL, outcome="ok", code="")
    before, bytes_before = _metrics_steady(server), received()
    expected = _expected(real_engine, PROMPTS[1], max_tokens=12)
    result = triton.infer(MODEL, _inputs(PROMPTS[1], {"max_tokens": 12}))
    assert result.as_numpy("text_output")[0].decode() == expected.text
    usage = [oai.completions.create(model=MODEL, prompt=p, max_tokens=n).usage for p, n in ((PROMPTS[0], 5),
                                                                                              (PROMPTS[2], 9))]
    outputs = len(expected.token_ids) + sum(u.completion_tokens for u in usage)
    prompts = expected.num_prompt_tokens + sum(u.prompt_tokens for u in usage)
    grew = lambda s, name, **lab: _metric(s, name, **lab) - _metric(before, name, **lab)
    # each process reports on its own 0.5 s clock: wait until every count below has come in (or 30 s)
    after = _metrics_settle(server, lambda s: grew(s, "ray_splitserve_requests_total", **ok) >= 3
                            and grew(s, "ray_splitserve_output_tokens_total", model=MODEL) >= outputs
                            and grew(s, "ray_splitserve_inter_token_latency_seconds_count", model=MODEL) >= outputs - 3
                            and grew(s, "ray_splitserve_queue_time_seconds_count", pool="prefill") >= 3
                            and grew(s, "ray_splitserve_kv_transfer_seconds_count", pool="prefill") >= 3
                            and grew(s, "ray_splitserve_kv_transfer_bytes_total", pool="prefill")
                            >= received() - bytes_before
                            and _metric(s, "ray_splitserve_prefix_cache_hit_tokens_total", pool="prefill")
                            >= _prefix_hits(server))
    assert grew(after, "ray_splitserve_requests_total", **ok) == 3
    assert grew(after, "ray_splitserve_output_tokens_total", model=MODEL) == outputs
    assert grew(after, "ray_splitserve_prompt_tokens_total", model=MODEL) == prompts
    for hist in ("time_to_first_token", "request_latency", "time_per_output_token"):
        assert grew(after, f"ray_splitserve_{hist}_seconds_count", model=MODEL) == 3, hist
    assert grew(after, "ray_splitserve_inter_token_latency_seconds_count", model=MODEL) == outputs - 3
    assert grew(after, "ray_splitserve_queue_time_seconds_count", pool="prefill") == 3
    assert grew(after, "ray_splitserve_kv_transfer_seconds_count", pool="prefill") == 3
    assert grew(after, "ray_splitserve_kv_transfer_bytes_total", pool="prefill") == received() - bytes_before > 0
    assert _metric(after, "ray_splitserve_prefix_cache_hit_tokens_total", pool="prefill") == _prefix_hits(server)
    # the worker gauges: every block is free again, the blocks total is the pools'
    stats = _wait_idle(server)
    total = sum(s.engine.num_kv_blocks for s in stats.values())
    status, listed = admin(server, "GET", "/admin/workers")  # the same readings, as the admin API's flat JSON
    assert status == 200 and sum(w["stats"]["num_kv_blocks"] for w in listed["workers"]) == total
    assert {w["name"]: w["stats"]["pid"] for w in listed["workers"]} == {n: s.pid for n, s in stats.items()}
    after = _metrics_settle(server, lambda s: _metric(s, "ray_splitserve_kv_blocks", state="used") == 0
                            and _metric(s, "ray_splitserve_kv_blocks", state="total") == total)
    assert _metric(after, "ray_splitserve_kv_blocks", state="total") == total
    assert _metric(after, "ray_splitserve_kv_blocks", state="used") == 0
    assert _metric(after, "ray_splitserve_running_requests") == 0


def test_client_request_ids_are_labels_not_keys(triton, real_engine, server):
    """Clients may share a request id (unary calls, or several requests on one stream) and reuse one at
    once after a cancel: the server keys requests by its own ids and echoes the client's."""
    from tritonclient.utils import InferenceServerException
    params = {"max_tokens": 4, "temperature": 0}
    expected = {_expected(real_engine, p, max_tokens=4).text for p in PROMPTS[:2]}
    unary: queue.Queue = queue.Queue()
    for p in PROMPTS[:2]:  # concurrent, both "1"
        triton.async_infer(MODEL, _inputs(p, params), lambda result, error: unary.put((result, error)), request_id="1")
    streamed: queue.Queue = queue.Queue()
    triton.start_stream(callback=lambda result, error: streamed.put((result, error)))
    try:
        for p in PROMPTS[:2]:  # two in flight on one stream, both "dup"
            triton.async_stream_infer(MODEL, _inputs(p, params), request_id="dup")
        for q, rid in ((unary, "1"), (streamed, "dup")):
            results = [q.get(timeout=120) for _ in range(2)]
            assert [error for _, error in results] == [None, None]
            assert [r.get_response().id for r, _ in results] == [rid, rid]
            assert {r.as_numpy("text_output")[0].decode() for r, _ in results} == expected
    finally:
        triton.stop_stream()
    with pytest.raises(InferenceServerException, match="Deadline"):  # cancelled by its client
        triton.infer(MODEL, _inputs(PROMPTS[0], {"max_tokens": 2000, "ignore_eos": True}), request_id="again",
                     client_timeout=2)
    result = triton.infer(MODEL, _inputs(PROMPTS[1], params), request_id="again")  # the same id, at once
    assert result.get_response().id == "again"
    assert result.as_numpy("text_output")[0].decode() == _expected(real_engine, PROMPTS[1], max_tokens=4).text
    _wait_idle(server)


def test_openai_fields_are_honoured_or_refused_by_name(oai, server):
    import openai
    messages = [{"role": "user", "content": "Hi"}]
    for field, call in (
            ("max_tokens", lambda: oai.completions.create(model=MODEL, prompt="hi", max_tokens=0)),
            ("tools", lambda: oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, tools=[
                {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}])),
            ("top_logprobs", lambda: oai.chat.completions.create(model=MODEL, messages=messages, top_logprobs=2)),
            ("min_p", lambda: oai.completions.create(model=MODEL, prompt="hi", extra_body={"min_p": 0.1}))):
        with pytest.raises(openai.BadRequestError) as info:
            call()
        assert info.value.status_code == 400 and info.value.body["param"] == field and field in info.value.message
    echoed = oai.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=4, temperature=0, echo=True,
                                    extra_body={"ignore_eos": True})
    assert echoed.choices[0].text.startswith(PROMPTS[0]) and len(echoed.choices[0].text) > len(PROMPTS[0])
    chunks = list(oai.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=4, temperature=0, seed=1,
                                         stream=True, stream_options={"include_usage": True}, extra_body={
                                             "ignore_eos": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    assert "".join(c.choices[0].text for c in chunks[:-1]) == echoed.choices[0].text[len(PROMPTS[0]):]
    _wait_idle(server)


def test_logprobs_and_penalties_are_the_engines_across_prefill_and_decode(oai, real_engine, server):
    """A disaggregated request's log-probabilities (its first token from the prefill worker, the rest from
    a decode worker) equal the single-process engine's, in the chat shape (streamed and whole) and the
    completions shape, their token bytes spelling the text; penalties give the engine's tokens."""
    from splitserve.engine.sampling_params import SamplingParams
    messages = [{"role": "user", "content": "Name three fruits and a vegetable."}]
    want = real_engine.generate([messages], SamplingParams(max_tokens=12, temperature=0, logprobs=2,
                                                           ignore_eos=True), use_chat=True)[0]
    whole = oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0, logprobs=True,
                                        top_logprobs=2, extra_body={"ignore_eos": True})
    streamed = [c.choices[0].logprobs.content for c in oai.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=12, temperature=0, logprobs=True, top_logprobs=2, stream=True,
        extra_body={"ignore_eos": True}) if c.choices and c.choices[0].logprobs]
    for content in (whole.choices[0].logprobs.content, [e for chunk in streamed for e in chunk]):
        assert len(content) == 12
        assert [e.logprob for e in content] == pytest.approx([lp for lp, _ in want.logprobs], abs=2e-3)
        assert [[t.logprob for t in e.top_logprobs] for e in content] == \
            [pytest.approx([v for _, v in top], abs=2e-3) for _, top in want.logprobs]
        assert bytes(b for e in content for b in e.bytes).decode() == want.text == whole.choices[0].message.content
        assert content[0].token == content[0].top_logprobs[0].token  # greedy: the most likely one
    completion = oai.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=6, temperature=0, logprobs=3,
                                        frequency_penalty=1.0, presence_penalty=0.5, extra_body={"ignore_eos": True})
    want = real_engine.generate([PROMPTS[0]], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=3,
                                                             frequency_penalty=1.0, presence_penalty=0.5))[0]
    lp = completion.choices[0].logprobs
    assert completion.choices[0].text == want.text and "".join(lp.tokens) == want.text
    assert lp.token_logprobs == pytest.approx([v for v, _ in want.logprobs], abs=2e-3)
    assert all(len(top) == 3 for top in lp.top_logprobs) and lp.text_offset[0] == 0
    _wait_idle(server)


def test_overload_is_refused_before_any_output_and_leaves_nothing_behind(oai, real_engine, server):
    """Three times as many long requests at once as the decode pool holds, on one prefill thread and a
    3 s wait: each request either completes with the undisturbed text, or is refused with a 429, its
    Retry-After and the reason, before the stream gives any output. None hangs; nothing leaks."""
    import openai
    from concurrent.futures import ThreadPoolExecutor
    prompt, n = "The history of science " * 225, 24  # ~900 tokens: the decode pool holds two at once
    from splitserve.engine.sampling_params import SamplingParams
    want = real_engine.generate([prompt], SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))[0].text
    client = oai.with_options(max_retries=0, timeout=120)

    def one(_):
        try:
            stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=n, temperature=0,
                                               stream=True, extra_body={"ignore_eos": True})
        except openai.RateLimitError as e:  # refused before the stream started
            return "refused", e
        text = "".join(chunk.choices[0].text for chunk in stream)
        return "completed", text

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(one, range(6)))
    completed = [r for kind, r in results if kind == "completed"]
    refused = [r for kind, r in results if kind == "refused"]
    assert completed and refused, results  # overloaded: some served, some refused
    assert all(text == want for text in completed)
    for e in refused:
        assert e.status_code == 429 and e.response.headers["retry-after"] == str(server.cfg.retry_after_s)
        assert any(why in e.message for why in ("did not start within", "had room", "max_queued_requests")), e.message
    _wait_idle(server, timeout=60)
    leaks = server.pools.leaks()
    assert all(not any(v.values()) for v in leaks.values()), leaks
