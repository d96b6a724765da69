"""Requests that move, between real decode workers (in-process, real gRPC on loopback, a tiny model):
live migration mid-stream equals an unmigrated run token for token; every failure leaves the
request running where it was; resume by recompute continues exactly; nothing leaks anywhere."""

import asyncio
import time

import pytest

from helpers import make_tiny_model
from splitserve.decode.worker import DecodeWorkerImpl
from splitserve.engine.engine import LLMEngine
from splitserve.engine.request import RequestSnapshot, serialize_params
from splitserve.engine.sampling_params import SamplingParams
from splitserve.errors import InvalidRequestError, RequestStateError, UnknownRequestError

TOKEN = "migration-test-token"
PROMPT = "migrate me: a prompt that fills a few blocks of four tokens"
GREEDY = SamplingParams(max_tokens=120, temperature=0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=120, temperature=0.9, top_k=40, seed=11, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_mig")
    make_tiny_model(str(path), "llama", max_position_embeddings=512)
    return str(path)


def engine_kwargs(path, **kw):
    return dict(model=path, dtype="float32", show_progress=False, block_size=4, num_kv_blocks=96,
                spec_calibrate=False, **kw)


def reference(path, params, **kw):
    return LLMEngine(**engine_kwargs(path, **kw)).generate([PROMPT], params)[0]


def assert_idle(*workers):
    for w in workers:
        leaks = w.leaks()
        assert not any(leaks.values()), (w.name, leaks)


async def pair(path, codec="raw", step_s=0.008, **kw):
    """Two decode workers; their steps take at least ``step_s``, as a real model's do (the tiny model's
    take well under a millisecond, so a request would finish before its migration could)."""
    a = DecodeWorkerImpl(engine_kwargs(path, **kw), TOKEN, name="A", kv_codec=codec)
    b = DecodeWorkerImpl(engine_kwargs(path, **kw), TOKEN, name="B", kv_codec=codec)
    for w in (a, b):
        real_step = w.engine.step

        def step(real_step=real_step):
            time.sleep(step_s)
            return real_step()
        w.engine.step = step
        await w.start()
    return a, b


async def stop(*workers):
    for w in workers:
        await w.stop()


def slow_first_stage(worker, blocks=4):
    """Hold stage 1 until the request has filled ``blocks`` more blocks on A, so that a second
    live stage is needed."""
    real = worker.sender.migrate

    async def migrate(*args, **kw):
        async def on_stage(stage):
            if stage == 0:
                target = worker.engine.num_full_blocks("r") + blocks
                while "r" in worker.engine.requests and worker.engine.num_full_blocks("r") < target:
                    await asyncio.sleep(0.002)
        return await real(*args, on_stage=on_stage, **kw)

    worker.sender.migrate = migrate


async def stream_with_migration(a, b, params, after=8):
    """Run on A, migrate to B after ``after`` outputs; returns (A's outputs, B's outputs, migrate result)."""
    outs_a, task = [], None
    async for out in a.aengine.generate(PROMPT, params, request_id="r"):
        outs_a.append(out)
        if len(outs_a) == after:
            task = asyncio.create_task(a.migrate("r", "B", b.address))
    result = await task
    outs_b = [o async for o in b.stream("r")] if result["status"] == "migrated" else []
    return outs_a, outs_b, result


def check_exact(outs, expected):
    tokens = [t for o in outs for t in o.new_token_ids]
    assert tokens == expected.token_ids
    assert "".join(o.new_text for o in outs) == expected.text
    # every output index exactly once, in order: no gap, no repeat across the switch
    indices = [o.index + i for o in outs for i in range(len(o.new_token_ids))]
    assert indices == list(range(len(expected.token_ids)))
    assert outs[-1].finish_reason == expected.finish_reason


@pytest.mark.parametrize("params,spec,codec", [
    (GREEDY, "off", "raw"), (SEEDED, "off", "raw"), (GREEDY, "ngram", "raw"), (SEEDED, "ngram", "raw"),
    (GREEDY, "off", "int8"),
], ids=["greedy", "seeded", "greedy-ngram", "seeded-ngram", "greedy-int8-wire"])
def test_live_migration_mid_stream_equals_an_unmigrated_run(tiny_path, params, spec, codec):
    expected = reference(tiny_path, params, speculative=spec)

    async def run():
        a, b = await pair(tiny_path, codec, speculative=spec)
        slow_first_stage(a)
        try:
            outs_a, outs_b, result = await stream_with_migration(a, b, params)
            await asyncio.sleep(0.05)
            assert_idle(a, b)
            return outs_a, outs_b, result
        finally:
            await stop(a, b)

    outs_a, outs_b, result = asyncio.run(run())
    assert result["status"] == "migrated", result
    assert outs_a[-1].finish_reason == "migrated" and outs_a[-1].moved_to == "B"
    assert outs_b and outs_b[0].index == outs_a[-1].num_output_tokens  # B picks up where A stopped
    assert result["num_stages"] >= 2  # blocks were copied while the request kept decoding on A
    # the stop-and-copy stage is small: at most 2 full blocks not sent and the partial one when the last
    # stage starts, plus what one engine step can add before the stop (1 token; 1 + 4 drafts speculating)
    assert result["last_stage_blocks"] <= (4 if spec != "off" else 3)
    check_exact(outs_a[:-1] + outs_b, expected)


def test_a_request_that_outgrows_its_reservation_before_any_block_is_sent_grows_it(tiny_path):
    """A short request migrated before it fills one block: the first live stage has nothing full to send;
    while it waits the request fills that block and more, then the last stage stops it with two blocks to
    send into a one-block reservation. The last stage must grow the reservation first (it once did so only
    after a live stage had sent blocks: DATA_LOSS, "chunk outside the reservation")."""
    prompt, params = "h", SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    expected = LLMEngine(**engine_kwargs(tiny_path)).generate([prompt], params)[0]

    async def run():
        a, b = await pair(tiny_path, step_s=0.05)  # slow steps: the migration begins within one
        real_migrate, real_begin, reserved = a.sender.migrate, a.port.begin_live, []

        def begin_live(rid):
            reserved.append(real_begin(rid))
            return reserved[-1]

        async def migrate(*args, **kw):
            async def on_stage(stage):
                if stage == 0:  # nothing was full to send; wait until 5 more tokens: two blocks to send
                    while "r" in a.engine.requests and a.engine.requests["r"].num_tokens < reserved[0] + 5:
                        await asyncio.sleep(0.002)
            return await real_migrate(*args, on_stage=on_stage, **kw)

        a.port.begin_live, a.sender.migrate = begin_live, migrate
        try:
            outs_a, task = [], None
            async for out in a.aengine.generate(prompt, params, request_id="r"):
                outs_a.append(out)
                if len(outs_a) == 1:
                    task = asyncio.create_task(a.migrate("r", "B", b.address))
            result = await task
            outs_b = [o async for o in b.stream("r")] if result["status"] == "migrated" else []
            await asyncio.sleep(0.05)
            assert_idle(a, b)
            return outs_a, outs_b, result, reserved
        finally:
            await stop(a, b)

    outs_a, outs_b, result, reserved = asyncio.run(run())
    assert reserved and reserved[0] <= 4  # room for one block of 4 tokens, none of it full yet
    assert result["status"] == "migrated", result
    assert result["last_stage_blocks"] >= 2  # more blocks in the last stage than the first reservation held
    check_exact(outs_a[:-1] + outs_b, expected)


def test_failures_before_the_commit_leave_the_request_running_on_the_source(tiny_path):
    """A corrupt chunk, a receiver that is cut off, a receiver with another KV layout, a full receiver:
    each time the request goes on at A, its text equals an unmigrated run, and B holds nothing."""
    expected = reference(tiny_path, GREEDY)

    async def attempt(a, b, fault):
        outs, results = [], []
        async for out in a.aengine.generate(PROMPT, GREEDY, request_id="r"):
            outs.append(out)
            if len(outs) == 6:
                results.append(await fault(a, b))
        return outs, results[0]

    async def corrupt(a, b):
        real = a.sender.migrate
        a.sender.migrate = lambda *args, **kw: real(*args, corrupt_chunk=3, **kw)
        try:
            return await a.migrate("r", "B", b.address)
        finally:
            a.sender.migrate = real

    async def cut(a, b):
        async def on_stage(stage):
            await b.server.stop(None)  # the receiver goes away mid-transfer
        real = a.sender.migrate
        a.sender.migrate = lambda *args, **kw: real(*args, on_stage=on_stage, **kw)
        try:
            return await a.migrate("r", "B", b.address)
        finally:
            a.sender.migrate = real

    async def full(a, b):
        with b.aengine.lock:
            b.engine.reserve("hog", 90 * 4 - 1)
        try:
            return await a.migrate("r", "B", b.address)
        finally:
            with b.aengine.lock:
                b.engine.cancel_reservation("hog")

    async def run():
        results = {}
        for name, fault in (("corrupt", corrupt), ("full", full), ("cut", cut)):
            a, b = await pair(tiny_path)
            try:
                outs, result = await attempt(a, b, fault)
                check_exact(outs, expected)
                results[name] = result
                await asyncio.sleep(0.05)
                assert_idle(a, b)
                assert b.servicer.num_transfers_committed == 0
            finally:
                await stop(a, b)
        # another layout (block size 8): refused at Reserve, before any byte of KV moves
        a, b = await pair(tiny_path)
        c = DecodeWorkerImpl(dict(engine_kwargs(tiny_path), block_size=8), TOKEN, name="C")
        await c.start()
        try:
            outs, results["layout"] = await attempt(a, c, lambda a, c: a.migrate("r", "C", c.address))
            check_exact(outs, expected)
            assert c.servicer.num_bytes_received == 0 and a.sender.num_bytes_sent == 0
            assert_idle(a, c)
        finally:
            await stop(a, b, c)
        return results

    results = asyncio.run(run())
    assert all(r["status"] == "failed" for r in results.values()), results
    assert "DATA_LOSS" in results["corrupt"]["error"] and "CRC32C" in results["corrupt"]["error"]
    assert "no room" in results["full"]["error"]
    assert "FAILED_PRECONDITION" in results["layout"]["error"] and "block_size" in results["layout"]["error"]
    assert results["cut"]["error"]


def test_bad_migrations_are_refused_and_disturb_nothing(tiny_path):
    expected = reference(tiny_path, GREEDY)

    async def run():
        a, b = await pair(tiny_path)
        errors = {}
        try:
            with pytest.raises(UnknownRequestError, match="no request 'nope'"):
                await a.migrate("nope", "B", b.address)
            outs = []
            async for out in a.aengine.generate(PROMPT, GREEDY, request_id="r"):
                outs.append(out)
                if len(outs) == 5:
                    with pytest.raises(RequestStateError, match="already on B"):
                        await a.migrate("r", "B", a.address)
                    first = asyncio.create_task(a.migrate("r", "B", b.address))
                    await asyncio.sleep(0)  # the first migration has begun
                    with pytest.raises(RequestStateError, match="already being moved") as info:
                        await a.migrate("r", "B", b.address)
                    errors["moving"] = str(info.value)
            result = await first
            outs_b = [o async for o in b.stream("r")]
            check_exact(outs[:-1] + outs_b, expected)
            assert result["status"] == "migrated"
            with pytest.raises(UnknownRequestError, match="unknown or finished"):  # it finished (on B)
                await b.migrate("r", "A", a.address)
            await asyncio.sleep(0.05)
            assert_idle(a, b)
        finally:
            await stop(a, b)

    asyncio.run(run())


@pytest.mark.parametrize("when", ["live-stage", "after-commit"])
def test_cancel_during_migration_frees_blocks_on_both_workers(tiny_path, when):
    """The client goes away while its request moves: before the stop (the request ends at A, the
    migration is abandoned), or while it is stopped (it is aborted where it ends up, B)."""
    async def run():
        a, b = await pair(tiny_path)
        real = a.sender.migrate

        async def migrate(*args, **kw):
            async def on_stage(stage):
                if when == "live-stage":
                    a.abort("r")
            if when == "after-commit":  # abort once the request is stopped on A, before B's ack arrives
                real_suspend = a.port.suspend

                def suspend(rid):
                    snap = real_suspend(rid)
                    a.abort(rid)
                    return snap
                a.port.suspend = suspend
            return await real(*args, on_stage=on_stage, **kw)

        a.sender.migrate = migrate
        outs = []
        try:
            async for out in a.aengine.generate(PROMPT, GREEDY, request_id="r"):
                outs.append(out)
                if len(outs) == 6:
                    task = asyncio.create_task(a.migrate("r", "B", b.address))
            result = await task
            for _ in range(50):
                await asyncio.sleep(0.02)
                if not any(a.leaks().values()) and not any(b.leaks().values()):
                    break
            assert_idle(a, b)
            return outs, result
        finally:
            await stop(a, b)

    outs, result = asyncio.run(run())
    if when == "live-stage":
        assert outs[-1].finish_reason == "abort" and result["status"] == "failed"
    else:
        assert outs[-1].finish_reason == "migrated" and result["status"] == "migrated"


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_resume_by_recompute_from_what_the_client_has(tiny_path, params):
    """A snapshot built only from the outputs a client received (no KV, no text state) continues on
    another engine with exactly the tokens and text of an uninterrupted run."""
    expected = reference(tiny_path, params)
    first = LLMEngine(**engine_kwargs(tiny_path))
    rid = first.add_request(PROMPT, params, request_id="r")
    got = []
    while len(got) < 23:  # stop partway, as if the worker died here
        got += first.step()
    snap = RequestSnapshot("r", first.requests[rid].prompt_token_ids, [t for o in got for t in o.new_token_ids],
                           0, serialize_params(params), None, len("".join(o.new_text for o in got)))
    snap = RequestSnapshot.from_dict(snap.to_dict())  # plain data both ways
    second = LLMEngine(**engine_kwargs(tiny_path))
    second.resume(snap)
    rest = []
    while second.has_unfinished():
        rest += second.step()
    check_exact(got + rest, expected)
    first.abort(rid)
    first.step()
    assert not any(first.leaks().values()) and not any(second.leaks().values())


def test_snapshots_are_validated():
    good = dict(request_id="r", prompt_token_ids=[1, 2], output_token_ids=[3], num_computed_tokens=2,
                params={"max_tokens": 4, "temperature": 0})
    assert RequestSnapshot.from_dict(good).next_output_index == 1
    with pytest.raises(InvalidRequestError, match="num_computed_tokens must be in"):
        RequestSnapshot.from_dict({**good, "num_computed_tokens": 3})
    with pytest.raises(InvalidRequestError, match="temperature"):
        RequestSnapshot.from_dict({**good, "params": {"temperature": -1}})
    with pytest.raises(InvalidRequestError, match="malformed snapshot"):
        RequestSnapshot.from_dict({**good, "colour": "red"})
