"""KV transfer over real gRPC on loopback, between two engines of a tiny model:
the handoff equals single-engine generation; every failure frees its blocks."""

import asyncio
import threading
import time

import grpc
import pytest

from conftest import assert_no_leaks
from helpers import make_tiny_model
from splitserve.engine.engine import LLMEngine
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.kv_port import EngineKVPort
from splitserve.errors import NoCapacityError, TransferFailedError as TransferError
from splitserve.kvtransfer.client import KVSender
from splitserve.kvtransfer.server import KVTransferServicer, start_server
from splitserve.kvtransfer.wire import fingerprint

TOKEN = "test-cluster-token"


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_kv")
    make_tiny_model(str(path), "llama", max_position_embeddings=512)
    return str(path)


def port(engine):
    """The KV port of an engine driven by hand in the test (its own lock)."""
    return EngineKVPort(engine, threading.Lock())


def make_engine(path, **kw):
    kw.setdefault("num_kv_blocks", 64)
    kw.setdefault("block_size", 4)
    return LLMEngine(model=path, dtype="float32", show_progress=False, **kw)


def prefill(engine, prompt, params, rid="r1"):
    engine.add_request(prompt, params, request_id=rid, hold_kv=True)
    outs = []
    while not outs or not outs[-1].finished:
        outs += [o for o in engine.step() if o.request_id == rid]
    return outs[-1]


def decode_all(engine, rid="r1"):
    outs = []
    while engine.has_unfinished():
        outs += [o for o in engine.step() if o.request_id == rid]
    return outs


class Harness:
    """A decode engine behind a real gRPC KV server, and a sender."""

    def __init__(self, decode_engine, ttl=30.0, token=TOKEN):
        self.engine, self.lock = decode_engine, threading.Lock()
        self.servicer = KVTransferServicer(EngineKVPort(decode_engine, self.lock), TOKEN, reservation_ttl_s=ttl)
        self.sender = KVSender(token)

    async def __aenter__(self):
        self.server, port = await start_server(self.servicer)
        self.address = f"127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc):
        await self.sender.close()
        await self.server.stop(None)


@pytest.mark.parametrize("params", [SamplingParams(max_tokens=20, temperature=0, ignore_eos=True),
                                    SamplingParams(max_tokens=20, temperature=0.8, seed=7, ignore_eos=True)])
def test_handoff_equals_single_engine(tiny_path, params):
    prompt = "a prompt long enough to fill several blocks of four"
    reference = make_engine(tiny_path).generate([prompt], params)[0]
    p_eng, d_eng = make_engine(tiny_path), make_engine(tiny_path)

    async def run():
        async with Harness(d_eng) as h:
            first = prefill(p_eng, prompt, params)
            assert first.finish_reason == "prefilled" and len(first.new_token_ids) == 1
            held_blocks = len(p_eng.kv.block_table("r1"))
            await h.sender.reserve(h.address, "r1", first.num_prompt_tokens, fingerprint(p_eng.model_config,
                                                                                       p_eng.kv_spec))
            ack = await h.sender.send(h.address, port(p_eng), "r1")
            # the bytes moved are exactly the sequence's blocks, every layer, K and V
            assert ack.num_bytes == held_blocks * p_eng.kv_spec.bytes_per_block
            assert p_eng.release("r1") == held_blocks
            return first

    first = asyncio.run(run())
    rest = decode_all(d_eng)
    tokens = first.new_token_ids + [t for o in rest for t in o.new_token_ids]
    text = first.new_text + "".join(o.new_text for o in rest)
    assert tokens == reference.token_ids and text == reference.text
    assert rest[-1].finish_reason == "length"
    assert_no_leaks(p_eng)
    assert_no_leaks(d_eng)


def test_failures_free_the_reservation(tiny_path):
    p_eng, d_eng = make_engine(tiny_path), make_engine(tiny_path, num_kv_blocks=20)
    params = SamplingParams(max_tokens=5, temperature=0)
    layout = fingerprint(p_eng.model_config, p_eng.kv_spec)

    async def run():
        async with Harness(d_eng) as h:
            prefill(p_eng, "x" * 30, params)
            # 1. no cluster token: refused, nothing reserved
            async with Harness(d_eng, token="wrong") as bad:
                bad.servicer = h.servicer
                with pytest.raises(TransferError, match="UNAUTHENTICATED"):
                    await bad.sender.reserve(h.address, "r1", 31, layout)
            # 2. a sender with another layout (block size 8 vs 4) is refused before any byte
            other = fingerprint(p_eng.model_config, make_engine(tiny_path, block_size=8).kv_spec)
            with pytest.raises(TransferError, match="FAILED_PRECONDITION.*block_size"):
                await h.sender.reserve(h.address, "r1", 31, other)
            # 3. a corrupt chunk: DATA_LOSS, the reservation is dropped
            await h.sender.reserve(h.address, "r1", 31, layout)
            assert d_eng.kv.num_free_blocks < d_eng.kv.num_blocks
            with pytest.raises(TransferError, match="DATA_LOSS.*CRC32C"):
                await h.sender.send(h.address, port(p_eng), "r1", corrupt_chunk=1)
            assert d_eng.kv.num_free_blocks == d_eng.kv.num_blocks and not d_eng.requests
            # 4. a transfer without a reservation is refused
            with pytest.raises(TransferError, match="FAILED_PRECONDITION.*no open reservation"):
                await h.sender.send(h.address, port(p_eng), "r1")
            # 5. a full worker: RESOURCE_EXHAUSTED, so the router can try another; it fits once released
            await h.sender.reserve(h.address, "hog", 60, layout)  # 15 of 20 blocks
            stats = d_eng.stats()
            assert (stats.num_reserved, stats.num_reserved_blocks, stats.num_free_kv_blocks) == (1, 15, 5)
            assert p_eng.stats().num_held_blocks == len(p_eng.kv.block_table("r1")) == 8  # 31 tokens, blocks of 4
            with pytest.raises(NoCapacityError, match="no room for 31 tokens"):
                await h.sender.reserve(h.address, "r1", 31, layout)
            assert await h.sender.release(h.address, "hog")
            # a request that can never fit is a different error
            with pytest.raises(TransferError, match="INVALID_ARGUMENT.*max_model_len"):
                await h.sender.reserve(h.address, "huge", 200, layout)
            # 6. a stream cut before its commit
            await h.sender.reserve(h.address, "r1", 31, layout)
            stub_call = h.sender._stub(h.address).Transfer(_header_only(p_eng), metadata=h.sender.metadata)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub_call
            assert info.value.code() == grpc.StatusCode.ABORTED
            # 7. an abandoned reservation expires
            h.servicer.ttl = 0.0
            await h.sender.reserve(h.address, "r2", 31, layout)
            await asyncio.sleep(0.01)
            assert h.servicer.expire_reservations() == 1
            assert h.servicer.num_transfers_committed == 0
        p_eng.release("r1")

    asyncio.run(run())
    assert_no_leaks(p_eng)
    assert_no_leaks(d_eng)


async def _header_only(engine):
    from splitserve.kvtransfer import kvtransfer_pb2 as pb
    yield pb.TransferMessage(header=pb.TransferHeader(request_id="r1", layout=fingerprint(engine.model_config,
                                                                                          engine.kv_spec)))


def test_prefill_worker_retries_a_failed_transfer(tiny_path):
    """Injected transfer faults (the fault campaign's hook): a transfer cut after its first chunk is
    retried with a fresh reservation and the request completes as if nothing happened; two failures
    in a row (a corrupt chunk, then a cut) answer "transfer_failed" for the router to place it again;
    the receiver drops every failed reservation and the next request goes through. An unknown fault
    is refused."""
    from splitserve.errors import InvalidRequestError
    from splitserve.prefill.worker import PrefillWorkerImpl

    prompt, params = list(range(5, 40)), {"max_tokens": 6, "temperature": 0, "ignore_eos": True}
    expected = make_engine(tiny_path).generate([prompt], SamplingParams(**params))[0].token_ids
    d_eng = make_engine(tiny_path)
    worker = PrefillWorkerImpl(dict(model=tiny_path, dtype="float32", show_progress=False, block_size=4,
                                    num_kv_blocks=64), TOKEN, layer_overlap=False)
    with pytest.raises(InvalidRequestError, match="unknown transfer faults \\['drop'\\]"):
        worker.inject_transfer_faults(["drop"])

    async def run():
        async with Harness(d_eng) as h:
            assert worker.inject_transfer_faults(["cut"]) == 1
            retried = await worker.prefill("r1", prompt, params, h.address)
            rest = decode_all(d_eng)
            worker.inject_transfer_faults(["corrupt", "cut"])
            failed = await worker.prefill("r2", prompt, params, h.address)
            events = [e async for e in worker.prefill_stream("r3", prompt, params, [h.address])]
            # the router's call: "reserved" (the first token may go out) before the KV has moved
            assert [e["status"] for e in events] == ["reserved", "transferred"]
            assert events[0]["decode"] == h.address and events[0]["first"] == events[1]["first"]
            after = events[1]
            await worker.sender.close()
            return retried, rest, failed, after, h.servicer.num_transfers_failed

    try:
        retried, rest, failed, after, num_failed = asyncio.run(run())
    finally:
        worker.aengine.shutdown()
    assert retried["status"] == "transferred" and worker.num_transfer_retries == 2
    assert retried["first"].new_token_ids + [t for o in rest for t in o.new_token_ids] == expected
    assert failed["status"] == "transfer_failed" and "cut after its first chunk" in failed["error"]
    assert after["status"] == "transferred" and not worker.sender.faults and num_failed == 3
    assert [t for o in decode_all(d_eng, "r3") for t in o.new_token_ids] == expected[1:]
    assert_no_leaks(worker.engine)
    assert_no_leaks(d_eng)
    assert all(v == 0 for v in worker.leaks().values()), worker.leaks()


def test_prefill_worker_admission_is_bounded_and_reserves_decode_room_only_to_send(tiny_path):
    """Decode room is reserved once the prompt is computed (never while it waits), on the first worker
    of the list with room; a full queue says "busy"; a request that cannot start in time, or finds no
    decode room in time, is refused with its reason; every block comes back on every side."""
    from splitserve.prefill.worker import PrefillWorkerImpl

    prompt, params = list(range(5, 40)), {"max_tokens": 6, "temperature": 0, "ignore_eos": True}
    expected = make_engine(tiny_path).generate([prompt], SamplingParams(**params))[0].token_ids
    d_full, d_ok = make_engine(tiny_path, num_kv_blocks=16), make_engine(tiny_path)
    # the hog below must outlast r3's 0.2 s deadline: the Python decode path (the C++ step is ~6x faster),
    # and KV room for all of its 506 tokens (in 64 blocks the KV capped its length: it ended 250 tokens in,
    # and r3 started within its deadline when the machine was fast)
    worker = PrefillWorkerImpl(dict(model=tiny_path, dtype="float32", show_progress=False, block_size=4,
                                    num_kv_blocks=128, max_num_seqs=1, fused_decode=False), TOKEN, queue_limit=1,
                               layer_overlap=False)
    real_reserve, reserved_while = worker.sender.reserve, []

    async def reserve(address, rid, n, layout):
        reserved_while.append(rid in worker.engine.held)  # prefilled and suspended, ready to send
        return await real_reserve(address, rid, n, layout)

    worker.sender.reserve = reserve

    async def run():
        async with Harness(d_full) as full, Harness(d_ok) as ok:
            assert d_full.reserve("squatter", 60) is not None  # 15 of its 16 blocks: no room for 35 tokens
            sent = await worker.prefill("r1", prompt, params, [full.address, ok.address])
            refused = await worker.prefill("r2", prompt, params, [full.address], wait_s=0.3)
            # one sequence at a time: a long request holds the engine, the next waits past its deadline
            hog = worker.aengine.generate(list(range(3, 9)), SamplingParams(max_tokens=500, ignore_eos=True))
            await hog.__anext__()
            late = asyncio.create_task(worker.prefill("r3", prompt, params, [ok.address], wait_s=0.2))
            await asyncio.sleep(0.05)
            busy = await worker.prefill("r4", prompt, params, [ok.address])  # r3 fills the queue (limit 1)
            timed_out = await late
            await hog.aclose()
            d_full.cancel_reservation("squatter")
            await worker.sender.close()
            assert sent["decode"] == ok.address
            return sent, refused, busy, timed_out

    try:
        sent, refused, busy, timed_out = asyncio.run(run())
        deadline = time.monotonic() + 5
        while worker.engine.has_unfinished() and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        worker.aengine.shutdown()
    assert sent["status"] == "transferred"
    rest = decode_all(d_ok)
    assert sent["first"].new_token_ids + [t for o in rest for t in o.new_token_ids] == expected
    assert reserved_while and all(reserved_while)  # never before the prompt was computed
    assert refused["status"] == "no_capacity" and "no decode worker had room" in refused["error"]
    assert refused["first"].finish_reason == "prefilled"  # computed, then refused: nothing was sent
    assert timed_out["status"] == "queue_timeout" and "did not start within 0.2s" in timed_out["error"]
    assert busy["status"] == "busy" and "queue_limit" in busy["error"]
    assert worker.num_refused == {"busy": 1, "queue_timeout": 1, "no_capacity": 1}
    series = worker.recorder.export()["series"]  # what the autoscaler reads: demand that never ran
    assert sum(v for _, v in series["refused"]) == 2 and sum(v for _, v in series["refused_decode"]) == 1
    assert_no_leaks(worker.engine)
    assert all(v == 0 for v in worker.leaks().values()), worker.leaks()
    assert_no_leaks(d_ok)
    assert_no_leaks(d_full)


def test_int8_wire_codec_sends_fewer_bytes_and_close_values(tiny_path):
    """int8 on the wire: the decode side holds the prefill KV within half a quantization step per
    (token, head) row, for about a third of fp32's bytes; an unknown codec is refused and cleaned up."""
    import torch

    from splitserve.kvtransfer import kvtransfer_pb2 as pb
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    p_eng, d_eng = make_engine(tiny_path), make_engine(tiny_path)
    layout = fingerprint(p_eng.model_config, p_eng.kv_spec)

    async def run():
        async with Harness(d_eng) as h:
            h.sender = KVSender(TOKEN, kv_codec="int8")
            first = prefill(p_eng, "a prompt that spans a few blocks", params)
            await h.sender.reserve(h.address, "r1", first.num_prompt_tokens, layout)
            ack = await h.sender.send(h.address, port(p_eng), "r1")
            blocks = len(p_eng.kv.block_table("r1"))
            raw_bytes = blocks * p_eng.kv_spec.bytes_per_block  # fp32
            d = p_eng.kv_spec.head_dim
            assert ack.num_bytes == raw_bytes // 4 * (d + 4) // d  # int8 values + one fp32 scale per D values
            src = p_eng.kv_cache[:, torch.tensor(p_eng.kv.block_table("r1"))]  # [L, n, 2, bs, H, D]
            dst = d_eng.kv_cache[:, torch.tensor(d_eng.kv.block_table("r1"))]
            step = src.abs().amax(dim=-1, keepdim=True) / 127
            assert ((dst - src).abs() <= step / 2 + 1e-6).all()
            assert not torch.equal(dst, src)  # it really went through int8
            p_eng.release("r1")
            # an unknown codec: INVALID_ARGUMENT naming the allowed ones; the reservation is freed
            prefill(p_eng, "another prompt", params, rid="r2")
            await h.sender.reserve(h.address, "r2", 14, layout)

            async def bad_header():
                yield pb.TransferMessage(header=pb.TransferHeader(request_id="r2", layout=layout, kv_codec="zstd"))
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await h.sender._stub(h.address).Transfer(bad_header(), metadata=h.sender.metadata)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "raw" in info.value.details()
            p_eng.release("r2")

    asyncio.run(run())
    assert [t for o in decode_all(d_eng) for t in o.new_token_ids]  # decoding goes on from the int8 KV
    with pytest.raises(ValueError, match="kv_codec must be one of"):
        KVSender(TOKEN, kv_codec="fp8")
    assert_no_leaks(p_eng)
    assert_no_leaks(d_eng)


def _token_kv(engine, rid, n):
    """The KV of a request's first n tokens on an engine: [L, 2, n, Hkv, D]."""
    import torch
    kv = engine.kv_cache[:, torch.tensor(engine.kv.block_table(rid))]  # [L, nb, 2, bs, Hkv, D]
    return kv.transpose(1, 2).flatten(2, 3)[:, :, :n].clone()


def test_layer_overlapped_transfer_gives_identical_kv_and_output(tiny_path):
    """The prefill worker's default path: decode room reserved first, each layer's KV sent as each
    prefill step computes it (chunked prefill, a cached prefix), the rest and the commit once held.
    The decode side holds exactly the KV of a plain prefill and continues to the reference tokens;
    chunks arrive while the prompt is still computing. A cut stream falls back to sending the held
    blocks; a request that ends in its prefill step gives its reservation back. Nothing leaks."""
    from splitserve.prefill.worker import PrefillWorkerImpl

    engine_kw = dict(model=tiny_path, dtype="float32", show_progress=False, block_size=4, num_kv_blocks=64,
                     max_num_batched_tokens=12)  # 35 tokens: three prefill steps
    p1 = list(range(5, 40))
    p2 = p1[:24] + list(range(60, 75))  # 6 cached blocks, then its own
    params = {"max_tokens": 6, "temperature": 0, "ignore_eos": True}
    ref = make_engine(tiny_path, max_num_batched_tokens=12)
    expected, ref_kv = {}, {}
    for rid, prompt in (("r1", p1), ("r2", p2)):
        expected[rid] = make_engine(tiny_path).generate([prompt], SamplingParams(**params))[0].token_ids
        prefill(ref, prompt, SamplingParams(**params), rid)
        ref_kv[rid] = _token_kv(ref, rid, len(prompt))
        ref.release(rid)
    d_eng = make_engine(tiny_path)
    worker = PrefillWorkerImpl(engine_kw, TOKEN)
    step_done = worker.engine.on_step
    worker.engine.on_step = lambda load: (step_done(load), time.sleep(0.05))  # room to see the overlap
    written_while_computing = []

    async def run():
        async with Harness(d_eng) as h:
            real_write = h.servicer.port.write

            def write(rid, layer, first_block, data):
                written_while_computing.append(rid in worker.engine.requests)  # not yet held: computing
                real_write(rid, layer, first_block, data)

            h.servicer.port.write = write
            got = {}
            for rid, prompt in (("r1", p1), ("r2", p2)):
                got[rid] = await worker.prefill(rid, prompt, params, [h.address])
                got[rid]["kv"] = _token_kv(d_eng, rid, len(prompt))
                got[rid]["rest"] = decode_all(d_eng, rid)
            worker.inject_transfer_faults(["cut"])
            got["cut"] = await worker.prefill("r3", p1, params, [h.address])
            got["cut"]["rest"] = decode_all(d_eng, "r3")
            got["short"] = await worker.prefill("r4", p1, {**params, "max_tokens": 1}, [h.address])
            # cut again, and then no decode worker has room: the token was announced, so the router must
            # place it again ("transfer_failed"), not refuse a request whose client has output
            worker.inject_transfer_faults(["cut"])
            real_reserve, events = worker.sender.reserve, []

            async def reserve_once(*args):
                if events:
                    raise NoCapacityError("full")
                return await real_reserve(*args)

            worker.sender.reserve = reserve_once
            got["full"] = await worker.prefill("r5", p1, params, [h.address], wait_s=0.3, on_reserved=events.append)
            got["full"]["events"] = events
            await worker.sender.close()
            return got, h.servicer.num_transfers_failed

    try:
        got, num_failed = asyncio.run(run())
    finally:
        worker.aengine.shutdown()
    layers = worker.engine.kv_spec.num_layers
    for rid in ("r1", "r2"):
        r = got[rid]
        assert r["status"] == "transferred"
        assert torch_equal(r["kv"], ref_kv[rid]), f"{rid}: the decode side's KV differs from a plain prefill"
        assert r["first"].new_token_ids + [t for o in r["rest"] for t in o.new_token_ids] == expected[rid]
    assert got["r1"]["kv_chunks"] == 3 * layers  # one piece per layer per prefill step
    assert got["r2"]["kv_chunks"] == 2 * layers  # the cached prefix went with its first step's pieces
    assert any(written_while_computing) and not all(written_while_computing)
    assert got["cut"]["status"] == "transferred"  # cut: sent again from the held blocks
    assert got["cut"]["first"].new_token_ids + [t for o in got["cut"]["rest"] for t in o.new_token_ids] == \
        expected["r1"]
    assert got["short"]["status"] == "finished"
    assert got["full"]["status"] == "transfer_failed" and [e["status"] for e in got["full"]["events"]] == ["reserved"]
    assert num_failed == 3  # the cut streams, the unused reservation
    assert worker.num_overlapped == 5 and worker.num_overlap_fallbacks == 2
    assert_no_leaks(worker.engine)
    assert all(v == 0 for v in worker.leaks().values()), worker.leaks()
    assert_no_leaks(d_eng)


def torch_equal(a, b) -> bool:
    import torch
    return a.shape == b.shape and torch.equal(a, b)
