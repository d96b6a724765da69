"""Batched output streams (decode/outbox.py) over a real engine: one message per engine step carries
every request's tokens in order; the fan-out gives each request exactly its stream; a reader that
leaves, a worker that dies and a reader that stalls each stop what they must, and nothing leaks."""

import asyncio

import pytest

from conftest import assert_no_leaks
from splitserve.decode.outbox import Demux, Outbox
from splitserve.engine.sampling_params import SamplingParams
from splitserve.errors import WorkerLostError

PROMPTS = {"a": "one", "b": "two two", "c": "three three three", "d": "four"}
PARAMS = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)


def _worker(aengine, fail_after: int | None = None):
    """A worker's two calls over one Outbox (claim starts the request), as the decode worker wires them;
    ``fail_after``: the batch stream dies after that many batches (the worker's process died)."""
    box, batches = Outbox(), []

    async def open_batches(reader):
        while fail_after is None or len(batches) < fail_after:
            batches.append(await box.take())
            yield batches[-1]
        raise WorkerLostError("decode-0", "actor died")

    async def claim(wid, reader, wait_s):
        box.claim(wid, aengine.generate(PROMPTS[wid], PARAMS, request_id=wid))

    return box, batches, open_batches, claim


async def _wait_engine_idle(aengine):
    for _ in range(500):
        if not aengine.engine.has_unfinished() and not aengine._control:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the engine did not go idle")


def test_one_message_per_step_carries_every_requests_tokens_in_order(aengine):
    box, batches, open_batches, claim = _worker(aengine)
    aborted = []
    demux = Demux("decode-0", open_batches, claim, aborted.append)

    async def main():
        streams = await asyncio.gather(*(_collect(demux.stream(wid)) for wid in PROMPTS))
        await _wait_engine_idle(aengine)
        return dict(zip(PROMPTS, streams))

    streams = asyncio.run(main())
    expected = aengine.engine.generate(list(PROMPTS.values()), PARAMS)
    for (wid, outs), want in zip(streams.items(), expected):
        assert [t for o in outs for t in o.new_token_ids] == want.token_ids
        starts = [sum(len(o.new_token_ids) for o in outs[:i]) for i in range(len(outs))]
        assert [o.index for o in outs] == starts  # in order, no gap, no repeat
        assert outs[-1].finished and not any(o.finished for o in outs[:-1])
    outputs = sum(len(b) for b in batches)
    assert outputs == demux.num_outputs == sum(len(want.token_ids) for want in expected)  # a token each
    # a step of all four goes out as one message (a reader that lags takes several steps in one)
    assert max(len(b) for b in batches) >= len(PROMPTS)
    assert len(batches) <= outputs // 2  # most messages carried several requests' tokens
    for b in batches:  # within a message, each request's outputs keep their order
        for wid in PROMPTS:
            idx = [o.index for w, o in b if w == wid]
            assert idx == sorted(idx)
    assert aborted == [] and demux.leaks() == {"demux_streams": 0, "demux_reads": 0} and box.pumps == {}
    demux.close()
    assert_no_leaks(aengine.engine)


def test_a_reader_that_leaves_aborts_its_request_and_the_others_go_on(aengine):
    box, batches, open_batches, claim = _worker(aengine)
    demux = Demux("decode-0", open_batches, claim, aengine.abort)

    async def main():
        async def leave_early():
            got = []
            async for out in demux.stream("a"):
                got.append(out)
                if len(got) == 2:
                    break
            return got
        early, rest = await asyncio.gather(leave_early(), _collect(demux.stream("b")))
        await _wait_engine_idle(aengine)
        return early, rest

    early, rest = asyncio.run(main())
    assert len(early) == 2 and not early[-1].finished
    assert rest[-1].finished and rest[-1].finish_reason == "length" and len(rest) == PARAMS.max_tokens
    assert box.pumps == {} and demux.leaks()["demux_streams"] == 0
    assert_no_leaks(aengine.engine)


def test_a_dead_worker_fails_every_stream_and_a_stalled_reader_loses_its_requests(aengine):
    box, batches, open_batches, claim = _worker(aengine, fail_after=3)
    ended = []
    demux = Demux("decode-0", open_batches, claim, aengine.abort, on_end=lambda: ended.append(True))

    async def main():
        results = await asyncio.gather(*(_collect(demux.stream(wid)) for wid in ("a", "b")), return_exceptions=True)
        with pytest.raises(WorkerLostError):  # the demux is done: a new stream fails at once
            await _collect(demux.stream("c"))
        box.close()  # (what the worker does when its batch stream ends)
        await _wait_engine_idle(aengine)
        return results

    results = asyncio.run(main())
    assert all(isinstance(r, WorkerLostError) for r in results) and ended == [True]
    assert_no_leaks(aengine.engine)

    # a reader that takes no batch: its outbox says stalled, and closing it aborts its requests
    stalled = Outbox()

    async def stall():
        stalled.claim("d", aengine.generate(PROMPTS["d"], PARAMS, request_id="d"))
        while not stalled.items:
            await asyncio.sleep(0.01)
        assert not stalled.stalled(idle_s=10.0)
        stalled._taken_at -= 11.0  # (as if 11 s had passed since a batch was last taken)
        assert stalled.stalled(idle_s=10.0)
        stalled.close()
        await asyncio.sleep(0.05)
        assert stalled.pumps == {}
        await _wait_engine_idle(aengine)

    asyncio.run(stall())
    assert_no_leaks(aengine.engine)


async def _collect(stream):
    return [o async for o in stream]


def test_outputs_that_piled_up_go_to_a_busy_consumer_as_one_delta():
    """Three deltas of one request in one message, read after the consumer was busy: one delta with all
    three tokens; a notice that the request is about to move and the final output stay apart."""
    from splitserve.engine.output import RequestOutput

    def out(i, finished=False, moved_to=None, reason=None):
        return RequestOutput("r", [] if moved_to and not finished else [10 + i], "" if moved_to else f"<{i}>",
                             finished, reason, 3, i + (0 if moved_to and not finished else 1), moved_to=moved_to)

    message = [("r", out(0)), ("r", out(1)), ("r", out(2)), ("r", out(3, moved_to="d1")),
               ("r", out(3)), ("r", out(4, finished=True, reason="length"))]
    sent = asyncio.Event()

    async def open_batches(reader):
        yield message[:1]
        await sent.wait()
        yield message[1:]
        await asyncio.Event().wait()  # the worker stays up

    async def claim(wid, reader, wait_s):
        pass

    demux = Demux("decode-0", open_batches, claim, lambda wid: None)

    async def main():
        got = []
        async for o in demux.stream("r"):
            got.append(o)
            sent.set()
            await asyncio.sleep(0.05)  # busy: the rest arrives meanwhile
        demux.close()
        return got

    got = asyncio.run(main())
    assert [(o.new_token_ids, o.new_text, o.index, o.moved_to, o.finished) for o in got] == [
        ([10], "<0>", 0, None, False),
        ([11, 12], "<1><2>", 1, None, False),  # piled up: one delta
        ([], "", 3, "d1", False),  # the notice on its own
        ([13, 14], "<3><4>", 3, None, True)]  # the final output joins the one before it, and stays final
