"""The router's view of the cluster, over Ray: membership from the controller, workers as clients.

The router (``router.py``) is written against two small interfaces, so that
its logic runs the same against fakes in unit tests:

    cluster.view() -> MembershipView      members whose ``handle`` is a client (below); fresh on every call
                                          (one cheap version check with the controller)
    cluster.cached(name) -> Member | None the member as of the last view, without a call
    cluster.report_lost(member)           the router saw this worker fail: not picked again until the
                                          controller says it is back (a new generation, or it answered)

    prefill client: prefill(wid, prompt, params, decode addresses, resume, wait_s) -> "reserved" event, result;
    decode client:  stream(wid, wait_s) -> async iterator of RequestOutput, stats() (None: too slow to answer),
                    migrate(wid, name, address), abort(wid), cancel_wait(wid)

A decode worker's outputs reach this process through one batched stream per
worker (``decode/outbox.py``: a :class:`Demux` per worker actor, made on first
use), one message per engine step for all the requests this process follows
there, not one Ray object per token per request.

Every Ray failure of a worker (its process died, it is restarting) surfaces as
``WorkerLostError``; an error the worker raised on purpose surfaces as itself.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

import ray

from splitserve.decode.outbox import Demux
from splitserve.errors import WorkerLostError
from splitserve.platform.membership import MembershipView

STATS_TIMEOUT_S = 2.0


def _unwrap(name: str, e: BaseException) -> BaseException:
    if isinstance(e, ray.exceptions.RayTaskError):  # raised by the worker's code: the original error
        cause = e.cause
        return cause if isinstance(cause, Exception) else e
    if isinstance(e, (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError)):
        return WorkerLostError(name, str(e).splitlines()[0][:200])
    return e


class RayWorker:
    """A worker actor seen through the router's client interface."""

    def __init__(self, name: str, handle, batched_outputs: bool = True):
        self.name, self.handle, self.batched_outputs = name, handle, batched_outputs

    async def _call(self, method: str, *args, timeout: float | None = None):
        try:
            ref = getattr(self.handle, method).remote(*args)
            return await (asyncio.wait_for(ref, timeout) if timeout else ref)
        except asyncio.TimeoutError:
            raise WorkerLostError(self.name, f"{method} did not answer within {timeout}s", timed_out=True) from None
        except Exception as e:
            raise _unwrap(self.name, e) from None

    async def prefill(self, wid, prompt_token_ids, params, decodes, resume=None, wait_s=30.0):
        """The prefill worker's ``prefill_stream``: a "reserved" event (the first token may go out), then
        the result."""
        try:
            async for ref in self.handle.prefill_stream.remote(wid, prompt_token_ids, params, decodes, resume,
                                                               wait_s):
                yield await ref
        except Exception as e:
            raise _unwrap(self.name, e) from None

    async def stats(self) -> dict | None:
        """None when it does not answer in time: busy, not lost (a lost actor raises WorkerLostError)."""
        try:
            return await self._call("stats", timeout=STATS_TIMEOUT_S)
        except WorkerLostError as e:
            if e.timed_out:
                return None
            raise

    async def migrate(self, wid: str, target_name: str, target_address: str) -> dict:
        return await self._call("migrate", wid, target_name, target_address)

    def abort(self, wid: str) -> None:
        try:
            self.handle.abort.remote(wid)  # fire and forget: a dead worker holds nothing
        except Exception:
            pass

    def cancel_wait(self, wid: str) -> None:
        try:
            self.handle.cancel_wait.remote(wid)
        except Exception:
            pass

    def stream(self, wid: str, wait_s: float = 0.0):
        if self.batched_outputs:
            return _demux(self.name, self.handle).stream(wid, wait_s)
        return self._stream_alone(wid, wait_s)

    async def _stream_alone(self, wid: str, wait_s: float):
        """One Ray streaming call per request, one object per output (``batched_outputs: false``, the
        baseline of ``benchmarks/bench_output_path.py``)."""
        try:
            async for ref in self.handle.stream.remote(wid, wait_s):  # streaming, backpressured
                yield await ref
        except Exception as e:
            raise _unwrap(self.name, e) from None

    async def generate(self, wid: str, prompt_token_ids, params):  # colocated workers
        try:
            async for ref in self.handle.generate.remote(wid, prompt_token_ids, params):
                yield await ref
        except Exception as e:
            raise _unwrap(self.name, e) from None


_DEMUXES: dict[str, Demux] = {}  # decode worker actor @ event loop -> this process's reader of its outputs


def _demux(name: str, handle) -> Demux:
    key = f"{handle._actor_id.hex()}@{id(asyncio.get_running_loop())}"
    demux = _DEMUXES.get(key)
    if demux is None or demux.error is not None:  # first use, or the worker died (Ray may restart it)
        async def batches(reader: str):
            try:
                async for ref in handle.outputs.remote(reader):  # streaming, backpressured
                    yield await ref
            except Exception as e:
                raise _unwrap(name, e) from None

        async def claim(wid: str, reader: str, wait_s: float) -> None:
            try:
                await handle.claim.remote(wid, reader, wait_s)
            except Exception as e:
                raise _unwrap(name, e) from None

        def abort(wid: str) -> None:
            RayWorker(name, handle).abort(wid)

        demux = _DEMUXES[key] = Demux(name, batches, claim, abort,
                                      on_end=lambda: _DEMUXES.pop(key, None) if _DEMUXES.get(key) is demux else None)
    return demux


class RayCluster:
    def __init__(self, controller, batched_outputs: bool = True):
        self.controller, self.batched_outputs = controller, batched_outputs
        self._view = MembershipView(-1)
        self._lost: dict[str, tuple[int, float]] = {}  # name -> (generation, membership version saying so)

    async def view(self) -> MembershipView:
        new = await self.controller.view.remote(self._view.version)
        if new is not None:
            self._view = MembershipView(new.version, tuple(replace(m, handle=RayWorker(m.name, m.handle,
                                                                                             self.batched_outputs))
                                                           for m in new.members))
        # a worker reported lost stays out until the controller's view accounts for the report
        self._lost = {n: (g, v) for n, (g, v) in self._lost.items() if self._view.version < v}
        if not self._lost:
            return self._view
        return MembershipView(self._view.version, tuple(
            m for m in self._view.members if not (m.name in self._lost and self._lost[m.name][0] == m.generation)))

    @staticmethod
    def open_streams() -> int:
        """Requests whose decode outputs this process is reading (a leak check: 0 when idle)."""
        return sum(d.leaks()["demux_streams"] for d in list(_DEMUXES.values()))

    def cached(self, name: str):
        """A member as of the last view, without asking the controller (None: unknown)."""
        return self._view.get(name)

    async def report_lost(self, member) -> None:
        self._lost[member.name] = (member.generation, float("inf"))
        try:
            version = await self.controller.report_lost.remote(member.name, member.generation)
            self._lost[member.name] = (member.generation, version)
        except ray.exceptions.RayError:
            pass
