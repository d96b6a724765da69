"""Batched output streams: one message per engine step for all the requests a reader follows.

A token used to cross the actor boundary as one Ray object per token per
request (a streaming call per request). Now each reader process (a router)
holds one streaming call per decode worker, and each message carries what the
worker produced for all of that reader's requests since the last message
(one engine step's tokens, at the pace the reader takes them)::

    decode worker                                         reader's process
    engine step -> request queue -> pump --+
    engine step -> request queue -> pump --+-> Outbox --- one batch per message ---> Demux -> a queue per request
                                                 (``outputs(reader)``: one Ray streaming call)      -> stream(wid)

Lifecycle of one request on it: the reader opens the request's queue in its
:class:`Demux`, then *claims* the request on the worker (``claim(wid,
reader)``), which starts a pump from the request's engine queue into the
reader's :class:`Outbox`. Its final output (finished, or "migrated") ends the
pump and the reader's stream. A reader that stops reading a request early
aborts it on the worker. The batch stream failing (the worker died) fails
every stream of that reader with the error. Nothing waits forever: the
worker drops an outbox whose reader has not taken a batch for ``idle_s``
(its pumps are cancelled, which aborts their requests), and the reader
aborts a request whose consumer left ``STALLED_BACKLOG`` outputs unread for
``STALLED_READER_S``. Outputs of one request that piled up while its consumer
was busy are handed over as one delta (``output.merge_outputs``).

Pure asyncio: the Ray calls are passed in (``decode/worker.py`` and
``platform/cluster.py`` are the shells).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import AsyncIterator, Awaitable, Callable

from splitserve.engine.output import merge_outputs
from splitserve.errors import RequestFailedError, WorkerLostError

STALLED_READER_S = 10.0
STALLED_BACKLOG = 256  # outputs of one request left unread before the reader side calls it stalled


class Outbox:
    """(Worker side.) The outputs of the requests one reader claimed, taken as batches."""

    def __init__(self):
        self.items: list[tuple[str, object]] = []  # (request id, RequestOutput) in the order produced
        self.pumps: dict[str, asyncio.Task] = {}  # claimed request id -> the task moving its outputs here
        self._ready = asyncio.Event()
        self._taking = False  # a reader is waiting in take()
        self._taken_at = time.monotonic()

    def put(self, request_id: str, out) -> None:
        self.items.append((request_id, out))
        self._ready.set()

    async def take(self) -> list[tuple[str, object]]:
        """Everything produced since the last take (waits for at least one output)."""
        self._taking = True
        try:
            await self._ready.wait()
        finally:
            self._taking = False
        self._ready.clear()
        batch, self.items = self.items, []
        self._taken_at = time.monotonic()
        return batch

    def claim(self, request_id: str, outputs: AsyncIterator) -> None:
        """Move the request's outputs here until its last one."""
        self.pumps[request_id] = asyncio.create_task(self._pump(request_id, outputs))

    async def _pump(self, request_id: str, outputs) -> None:
        try:
            async for out in outputs:
                self.put(request_id, out)
        finally:
            self.pumps.pop(request_id, None)
            await outputs.aclose()  # now, not when collected: a request left unread is aborted at once

    def stalled(self, idle_s: float) -> bool:
        """Outputs are waiting and nobody has come for them for ``idle_s``."""
        return bool(self.items) and not self._taking and time.monotonic() - self._taken_at > idle_s

    def close(self) -> None:
        """The reader is gone: stop every pump (each aborts its request: its outputs stop being read)."""
        for task in list(self.pumps.values()):
            task.cancel()


class Demux:
    """(Reader side.) One decode worker's batch stream fanned out to a queue per request.

    ``open_batches(reader)``: the worker's batch stream for this reader (an async iterator of
    [(request id, RequestOutput)], raising WorkerLostError when the worker dies);
    ``claim(wid, reader, wait_s)``: route the request's outputs to this reader (raises what the worker
    raises: KeyError for a request it does not hold); ``abort(wid)``: fire and forget.
    ``on_end()`` is called once the batch stream has ended (its error is ``self.error``)."""

    def __init__(self, name: str, open_batches: Callable[[str], AsyncIterator[list]],
                 claim: Callable[[str, str, float], Awaitable[None]], abort: Callable[[str], None],
                 on_end: Callable[[], None] = lambda: None):
        self.name, self.reader = name, uuid.uuid4().hex
        self._open, self._claim, self._abort, self._on_end = open_batches, claim, abort, on_end
        self._queues: dict[str, asyncio.Queue] = {}  # request (work id) -> its outputs not yet read
        self._read_at: dict[str, float] = {}  # request -> when its consumer last took an output
        self._task: asyncio.Task | None = None
        self.error: BaseException | None = None  # set once the batch stream ended: this demux is done
        self.num_outputs = 0  # outputs received (all requests)

    async def stream(self, wid: str, wait_s: float = 0.0) -> AsyncIterator:
        """The request's outputs until its last one (``wait_s``: it may still be committing here)."""
        if self.error is not None:
            raise self.error
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[wid] = queue
        if self._task is None:
            self._task = asyncio.create_task(self._read())
        claimed = finished = False
        held = None  # an output taken from the queue that could not join the one before it
        try:
            await self._claim(wid, self.reader, wait_s)
            claimed = True
            while not finished:
                self._read_at[wid] = time.monotonic()
                item, held = (held, None) if held is not None else (await queue.get(), None)
                # outputs that piled up while the consumer was busy go out as one delta (one chunk for the
                # front door and the proxy to send, not one per token)
                while not isinstance(item, BaseException) and not queue.empty():
                    nxt = queue.get_nowait()
                    merged = None if isinstance(nxt, BaseException) else merge_outputs(item, nxt)
                    if merged is None:
                        held = nxt
                        break
                    item = merged
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            self._queues.pop(wid, None)
            self._read_at.pop(wid, None)
            if claimed and not finished:  # the consumer left (or the worker failed it): stop it there
                self._abort(wid)

    async def _read(self) -> None:
        try:
            async for batch in self._open(self.reader):
                self.num_outputs += len(batch)
                for wid, out in batch:
                    queue = self._queues.get(wid)
                    if queue is not None:
                        queue.put_nowait(out)
                        self._check_stalled(wid, queue)
            error: BaseException = WorkerLostError(self.name, "its output stream ended")
        except asyncio.CancelledError:
            error = WorkerLostError(self.name, "its output stream was closed")
        except Exception as e:  # noqa: BLE001 - handed to every reader
            error = e
        self.error = error
        for queue in self._queues.values():
            queue.put_nowait(error)
        self._on_end()

    def _check_stalled(self, wid: str, queue: asyncio.Queue) -> None:
        if queue.qsize() > STALLED_BACKLOG and time.monotonic() - self._read_at.get(wid, 0) > STALLED_READER_S:
            del self._queues[wid]
            self._abort(wid)
            queue.put_nowait(RequestFailedError(f"request {wid!r}: its reader took no output for "
                                                f"{STALLED_READER_S:.0f}s; aborted"))

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def leaks(self) -> dict:
        return {"demux_streams": len(self._queues), "demux_reads": len(self._read_at)}
