"""Streaming generation: deltas end with a finish reason; a consumer that stops
early (break or task cancel) aborts its request and frees its blocks; control
calls never wait behind a stream of engine steps."""

import asyncio
import threading
import time

import pytest

from conftest import assert_no_leaks
from splitserve.engine.async_engine import FairLock
from splitserve.errors import InvalidRequestError, RequestStateError
from splitserve.engine.sampling_params import SamplingParams


def _wait_idle(aengine, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with aengine.lock:
            if not aengine.engine.has_unfinished() and not aengine._control:
                return
        time.sleep(0.01)
    raise AssertionError("engine did not go idle")


def test_stream_matches_batch_result_and_ends_with_reason(aengine):
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)

    async def collect(prompt):
        return [o async for o in aengine.generate(prompt, params)]

    async def main():
        return await asyncio.gather(*(collect(p) for p in ["one", "two two", "three three three"]))

    streams = asyncio.run(main())
    _wait_idle(aengine)
    with aengine.lock:
        expected = aengine.engine.generate(["one", "two two", "three three three"], params)
    for outs, exp in zip(streams, expected):
        assert [t for o in outs for t in o.new_token_ids] == exp.token_ids
        assert "".join(o.new_text for o in outs) == exp.text
        assert outs[-1].finished and outs[-1].finish_reason == "length"
        assert not any(o.finished for o in outs[:-1])
    assert_no_leaks(aengine.engine)


def test_consumer_that_stops_early_frees_its_blocks(aengine):
    params = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)

    async def read_three():
        n = 0
        async for _ in aengine.generate("stop reading me", params):
            n += 1
            if n == 3:
                break  # the generator is closed: the request is aborted

    async def cancel_mid_stream():
        streaming = asyncio.Event()

        async def reader():
            async for _ in aengine.generate("cancel me", params):
                streaming.set()
                await asyncio.Event().wait()  # a slow consumer: cancelled while its stream is open
        task = asyncio.create_task(reader())
        await streaming.wait()  # (not a fixed sleep: 400 tiny-model tokens take well under 0.2 s)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(read_three())
    asyncio.run(cancel_mid_stream())
    _wait_idle(aengine)
    assert_no_leaks(aengine.engine)


def test_a_prefill_reader_gone_before_the_handoff_frees_the_held_blocks(aengine):
    """The engine suspends a hold_kv request after its first token; if the reader is cancelled before
    it takes that "prefilled" output, nobody will hand the KV off: the held blocks must be freed."""
    params = SamplingParams(max_tokens=5, temperature=0)

    async def main():
        async def reader():
            async for _ in aengine.generate("hand me off", params, hold_kv=True):
                pass
        task = asyncio.create_task(reader())
        await asyncio.sleep(0)  # the request is in, its reader waits on the queue
        deadline = time.monotonic() + 10
        while True:  # the event loop is blocked: the output can't be delivered before the cancel
            with aengine.lock:
                if aengine.engine.held:
                    break
            assert time.monotonic() < deadline, "the request was never suspended"
            time.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    _wait_idle(aengine)
    assert_no_leaks(aengine.engine)


def test_bad_input_raises_before_streaming(aengine):
    async def main():
        async for _ in aengine.generate("", SamplingParams()):
            pass

    with pytest.raises(InvalidRequestError, match="prompt is empty"):
        asyncio.run(main())
    assert_no_leaks(aengine.engine)


def test_a_reader_that_vanishes_without_closing_is_reported_stalled(aengine):
    """The safety net behind the workers' reapers: outputs pile up unread -> stalled -> aborted."""
    params = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)

    async def main():
        gen = aengine.generate("nobody reads me", params)
        await gen.__anext__()  # read one output, then stop reading without closing
        await asyncio.sleep(0.05)  # the engine keeps producing into the queue (the tiny model is fast)
        stalled = aengine.stalled(idle_s=0.01)
        assert len(stalled) == 1 and aengine.stalled(idle_s=60) == []
        for rid in stalled:
            aengine.abort_request(rid)
        return gen

    gen = asyncio.run(main())
    del gen
    _wait_idle(aengine)
    assert_no_leaks(aengine.engine)


def test_fair_lock_serves_a_waiter_before_a_thread_that_takes_it_back_at_once():
    """The engine loop's pattern: release after a step, ask again at once. A caller that was
    already waiting gets the lock first (a plain lock lets the releasing thread win), so it
    waits one step, not until the loop goes idle."""
    lock, order = FairLock(), []

    def caller():
        with lock:
            order.append("caller")

    lock.acquire()  # the loop thread, in a step
    t = threading.Thread(target=caller)
    t.start()
    while not lock._waiters:  # the caller is now waiting
        time.sleep(0.001)
    lock.release()  # the step ends ...
    with lock:  # ... and the loop asks again at once
        order.append("loop")
    t.join()
    assert order == ["caller", "loop"]
    assert not lock.locked()


def test_an_abort_does_not_wait_for_the_engine_lock(aengine):
    """A router's abort while a long step holds the lock returns at once; the loop applies it
    before its next step and the reader gets the final "abort"."""
    params = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)

    async def main():
        gen = aengine.generate("abort me while the lock is held", params)
        first = await gen.__anext__()
        aengine.lock.acquire()  # as if the loop thread were in a very long step
        try:
            start = time.monotonic()
            assert aengine.abort_request(first.request_id) is True
            elapsed = time.monotonic() - start
        finally:
            aengine.lock.release()
        last = first
        async for out in gen:
            last = out
        return elapsed, last

    elapsed, last = asyncio.run(main())
    assert elapsed < 0.05
    assert last.finished and last.finish_reason == "abort"
    _wait_idle(aengine)
    assert_no_leaks(aengine.engine)
    assert all(v == 0 for v in aengine.leaks().values()), aengine.leaks()


def test_an_abort_queued_before_a_move_stops_the_request_is_not_lost_to_the_move(aengine):
    """A client's abort is queued for the loop thread; a move's stop (the KV port's ``suspend``)
    that comes before the loop's next step applies it first and fails, rather than carrying the
    request away from its abort."""
    params = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)

    async def main():
        gen = aengine.generate("abort me just before I move", params)
        first = await gen.__anext__()
        rid = first.request_id
        port = aengine.kv_port()
        port.begin_live(rid)
        aengine._stopped = True  # the loop thread between two steps, for as long as the test needs
        aengine._wake.set()
        aengine._thread.join(timeout=10)
        assert aengine.abort_request(rid) is True and aengine._control
        with pytest.raises(RequestStateError, match="aborted"):
            port.suspend(rid)
        port.end_live(rid)
        assert rid not in aengine.engine.requests and rid not in aengine.engine.held
        for out in aengine.engine.step():  # deliver as the loop would
            aengine._streams.pop(out.request_id)[1].put_nowait(out)
        last = first
        async for out in gen:
            last = out
        assert last.finished and last.finish_reason == "abort"

    asyncio.run(main())
    assert_no_leaks(aengine.engine)
    assert all(v == 0 for v in aengine.leaks().values()), aengine.leaks()
