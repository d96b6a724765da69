"""Streaming generation on top of :class:`LLMEngine`.

The engine loop runs in one background thread; callers use asyncio::

    async for out in engine.generate("Hello", SamplingParams(max_tokens=32)):
        print(out.new_text, end="")         # out.finished / out.finish_reason on the last one

Lifecycle of one call: ``generate`` validates and adds the request (bad input
raises before anything is queued) -> the loop thread steps the engine and
pushes each delta to the caller's queue (a step's deltas for one event loop in
one callback) -> the final delta ends the iterator.
If the caller stops early (break, cancel, disconnect), the request is aborted
and its blocks are freed.

The engine lock belongs here: the loop thread and callers take it around every
engine call. The KV plane borrows it only through :meth:`kv_port`. It is a
:class:`FairLock`: the loop thread re-takes it after every step, and a plain
lock would let it do so ahead of a caller that has been waiting (a stream of
steps starved an abort for minutes); handed over first come, first served, a
caller waits at most one step. Calls that need no answer (a consumer's abort)
do not wait at all: they are queued as control commands, which the loop thread
applies before its next step. New requests are added from a helper thread, so
the caller's event loop never blocks on the lock (nor on tokenizing a long
prompt).
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from typing import AsyncIterator

from splitserve.engine.engine import LLMEngine
from splitserve.engine.output import RequestOutput
from splitserve.engine.sampling_params import SamplingParams


class FairLock:
    """A lock handed to its waiters in arrival order: a thread that releases it and asks again
    queues behind those already waiting. Usable as a context manager; not reentrant."""

    def __init__(self):
        self._mutex = threading.Lock()  # guards the two fields below; held only for a few lines
        self._held = False
        self._waiters: collections.deque[threading.Lock] = collections.deque()  # each locked until its turn

    def acquire(self) -> None:
        with self._mutex:
            if not self._held and not self._waiters:
                self._held = True
                return
            turn = threading.Lock()
            turn.acquire()
            self._waiters.append(turn)
        turn.acquire()  # released by the holder's release(): the lock is now ours (still marked held)

    def release(self) -> None:
        with self._mutex:
            if self._waiters:
                self._waiters.popleft().release()  # hand over: it stays held, by the next in line
            else:
                self._held = False

    def locked(self) -> bool:
        return self._held

    __enter__ = acquire

    def __exit__(self, *exc) -> None:
        self.release()


def _deliver(items: list) -> None:
    """(In the caller's event loop.) One step's outputs into their queues, in one callback: their
    readers all wake in the same loop iteration (a batched reader sees the whole step at once)."""
    for queue, out in items:
        queue.put_nowait(out)


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.lock = FairLock()  # guards the engine between the loop thread and callers (and the KV port)
        # aborts to apply before the next step: (request id, whether its consumer still reads the stream)
        self._control: collections.deque[tuple[str, bool]] = collections.deque()
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._last_read: dict[str, float] = {}  # request id -> when its consumer last took an output
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="splitserve-engine", daemon=True)
        self._thread.start()

    async def generate(self, prompt=None, params: SamplingParams | None = None, *,
                       messages: list[dict] | None = None, request_id: str | None = None,
                       hold_kv: bool = False, snapshot=None, kv_stream=None) -> AsyncIterator[RequestOutput]:
        """Outputs of a new request; or, given a ``snapshot`` (``RequestSnapshot``), of a request that
        continues here by recompute (its outputs so far are not repeated). ``kv_stream``
        (``engine/kv_stream.py``, with ``hold_kv``): its KV is handed out layer by layer as it is computed."""
        if self._stopped:
            raise RuntimeError("the engine is shut down")
        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def add() -> str:  # in a helper thread: waits for the lock (one step at most) and tokenizes
            with self.lock:
                if snapshot is not None:
                    rid = self.engine.resume(snapshot, hold_kv=hold_kv, kv_stream=kv_stream)
                else:
                    rid = self.engine.add_request(prompt, params, messages=messages, request_id=request_id,
                                                  hold_kv=hold_kv, kv_stream=kv_stream)
                self._streams[rid] = (loop, queue)
            return rid

        adding = loop.run_in_executor(None, add)
        try:
            rid = await asyncio.shield(adding)
        except asyncio.CancelledError:  # the caller left while it was being added: abort it once it is in
            adding.add_done_callback(lambda f: f.cancelled() or f.exception() or self.abort(f.result()))
            raise
        self._wake.set()
        async for out in self._drain(rid, queue):
            yield out

    def adopt(self, snapshot, loop: asyncio.AbstractEventLoop) -> asyncio.Queue:
        """Receiving a move: commit a request whose KV arrived and open its output queue atomically,
        so the loop thread cannot produce an output nobody is listening for."""
        queue: asyncio.Queue = asyncio.Queue()
        with self.lock:
            self.engine.commit(snapshot)
            self._streams[snapshot.request_id] = (loop, queue)
        self._wake.set()
        return queue

    def kv_port(self, commit=None):
        """The KV plane's view of this engine (``kv_port.EngineKVPort``); ``commit(snapshot)`` replaces
        the default join (e.g. to open the request's output stream with it)."""
        from splitserve.engine.kv_port import EngineKVPort
        return EngineKVPort(self.engine, self.lock, self.wake, commit, settle=self._settle)

    def notify(self, request_id: str, out: RequestOutput) -> None:
        """Put an output on a request's stream from outside the loop (e.g. a migration's notice)."""
        target = self._streams.get(request_id)  # a dict read: atomic, no need to wait out a step
        if target is not None:
            target[0].call_soon_threadsafe(target[1].put_nowait, out)

    def wake(self) -> None:
        """Outputs were queued outside a step (a move finished): let the loop deliver them."""
        self._wake.set()

    async def stream(self, request_id: str, queue: asyncio.Queue) -> AsyncIterator[RequestOutput]:
        """Outputs of an adopted request; stopping early aborts it."""
        async for out in self._drain(request_id, queue):
            yield out

    async def _drain(self, rid: str, queue: asyncio.Queue) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while not finished:
                self._last_read[rid] = time.monotonic()
                out: RequestOutput = await queue.get()
                finished = out.finished
                yield out
        finally:
            self._last_read.pop(rid, None)
            if not finished:
                self.abort(rid)

    def stalled(self, idle_s: float) -> list[str]:
        """Requests with outputs waiting that their consumer has not read for ``idle_s``: a consumer
        that went away without closing its stream (their producers' backpressure stops the reads)."""
        now = time.monotonic()
        streams = list(self._streams.items())  # copied in one step under the GIL: no lock, no step to wait out
        return [rid for rid, (_, queue) in streams
                if queue.qsize() > 0 and now - self._last_read.get(rid, now) > idle_s]

    def abort(self, request_id: str) -> None:
        """The consumer is gone: stop the request and forget its stream. Returns at once; the loop
        thread applies it before its next step."""
        self._control.append((request_id, False))
        self._wake.set()

    def _settle(self) -> None:
        """(A KV port, lock held.) Apply the queued aborts now, not at the next step: a move must not
        stop a request whose abort came first."""
        if self._control:
            self._apply_aborts()
            self._wake.set()  # the loop delivers their final outputs

    def _apply_aborts(self) -> None:
        """(Lock held.) The aborts queued since the last step."""
        while self._control:
            request_id, still_read = self._control.popleft()
            if not still_read:
                self._streams.pop(request_id, None)
            if request_id in self.engine.requests:
                self.engine.abort(request_id)
            elif not still_read and request_id in self.engine.held and self.engine.held[request_id].hold_kv:
                # prefill role: it suspended itself for the handoff, but its reader left before taking
                # the "prefilled" output, so nobody will send its KV (a move's suspension is not this)
                self.engine.release(request_id)

    def abort_request(self, request_id: str) -> bool:
        """Stop a request on someone else's behalf (a router); a consumer still reading its stream
        gets the final "abort" output. Returns whether the request was here; does not wait for the
        lock (the abort is applied before the next step)."""
        if request_id not in self.engine.requests:  # a dict lookup: safe while the loop thread steps
            return False
        self._control.append((request_id, True))
        self._wake.set()
        return True

    def leaks(self) -> dict:
        """Per-request structures of this shell, by size (the engine's are ``engine.leaks()``)."""
        return {"streams": len(self._streams), "stream_reads": len(self._last_read),
                "pending_aborts": len(self._control)}

    def _loop(self) -> None:
        while not self._stopped:
            with self.lock:
                self._apply_aborts()
                busy = self.engine.has_unfinished()
                outputs = self.engine.step() if busy else []
                targets = [(self._streams.get(o.request_id), o) for o in outputs]
                for o in outputs:
                    if o.finished:
                        self._streams.pop(o.request_id, None)
            by_loop: dict[asyncio.AbstractEventLoop, list] = {}  # a step's outputs reach each loop at once
            for target, out in targets:
                if target is not None:
                    by_loop.setdefault(target[0], []).append((target[1], out))
            for loop, items in by_loop.items():
                try:
                    loop.call_soon_threadsafe(_deliver, items)
                except RuntimeError:  # the caller's event loop is closed: drop its requests
                    for _, out in items:
                        if not out.finished:
                            self.abort(out.request_id)
            if not busy:
                self._wake.wait(timeout=0.5)
                self._wake.clear()

    def shutdown(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=10)
