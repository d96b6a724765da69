"""The controller: one Ray actor that owns the worker pools and their membership.

It is the only writer of :class:`~splitserve.platform.membership.Membership`;
routers read views of it (``view(since_version)``) and report workers they
saw fail (``report_lost``). Its loops and operations:

    start()               spawn the configured workers, wait until each answers ``start()`` (registers it)
    supervise (every probe_period_s)
                          probe every worker with ``start()`` (idempotent: it returns the worker's identity):
                            answers          -> UP (a new incarnation: Ray restarted it -> new generation)
                            no answer        -> DEAD (Ray may be restarting it: probed again)
                            dead for good    -> replaced by a new worker of the same pool
    add_worker(pool, instance_type, wait)
                          spawn one more (placed by its catalog type); return its name once it takes
                          traffic, or at once (wait=False: the autoscaler; it is STARTING until loaded)
    drain(name)           stop routing to it, refuse reservations, migrate its running requests to the
                          other decode workers (live, ``DecodeWorker.migrate``) until it holds none;
                          ``undrain(name)`` takes it back
    remove_worker(name)   drain, then stop and forget it
    rebalance(src, dst, n) move up to n running requests between decode workers (live)
    signals()             membership rows + every worker's signals export (the autoscaler's input)
    report_lost(name, generation) -> version
                          a router saw it fail: DEAD at once; returns the membership version that says so

Worker placement (threads as Ray CPUs, the pool's resources) is ``pools.spawn``.
"""

from __future__ import annotations

import asyncio
import time

import ray

from splitserve.platform.config import ServeConfig
from splitserve.platform.membership import Membership, MembershipView, WorkerState
from splitserve.stats import WorkerStats

PROBE_PERIOD_S = 0.5
PROBE_TIMEOUT_S = 5.0
START_TIMEOUT_S = 600.0  # a worker added at run time must be up within this (node start + model load)


class ControllerImpl:
    def __init__(self, cfg: ServeConfig, prefix: str = "splitserve", probe_period_s: float = PROBE_PERIOD_S,
                 catalog: dict | None = None):
        from splitserve.autoscaler.catalog import Catalog
        self.cfg, self.prefix, self.probe_period_s = cfg, prefix, probe_period_s
        self.catalog = Catalog.from_dict(catalog) if catalog else None
        self.membership = Membership()
        self._next_index: dict[str, int] = {}
        self._supervisor = None
        self._busy: set[str] = set()  # workers starting, draining or being removed: supervision leaves them alone
        self._starting: dict[str, asyncio.Task] = {}  # added without waiting: bringing them up
        self._node_of: dict[str, str | None] = {}  # worker -> the Ray node it runs on (the actuator frees it)
        self.num_replaced = 0

    # -- pools ---------------------------------------------------------------------------

    def _spawn(self, pool: str, instance_type: str | None = None) -> str:
        """Start a worker of ``pool``; ``instance_type`` (a catalog entry) places it on a node of that
        type. Default: the pool's configured type."""
        from splitserve.platform.pools import spawn
        if instance_type is None:
            instance_type = getattr(self.cfg, "decode" if pool == "colocated" else pool).instance_type
        itype = None
        if instance_type is not None and self.catalog is not None:
            itype = self.catalog.get(instance_type)
        elif instance_type is not None:
            raise ValueError(f"instance type {instance_type!r} needs a catalog (autoscale.catalog)")
        i = self._next_index.get(pool, 0)
        self._next_index[pool] = i + 1
        name = f"{self.prefix}-{pool}-{i}"
        self.membership.add(name, pool, spawn(self.cfg, pool, name, itype), node_type=instance_type or "default")
        return name

    async def start(self) -> int:
        pools = ["colocated"] if self.cfg.mode == "colocated" else ["prefill", "decode"]
        names = [self._spawn(pool) for pool in pools
                 for _ in range(getattr(self.cfg, "decode" if pool == "colocated" else pool).replicas)]
        await asyncio.gather(*(self._wait_up(n) for n in names))
        self._supervisor = asyncio.create_task(self._supervise())
        return self.membership.version

    async def _wait_up(self, name: str, timeout_s: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            m = self.membership.get(name)
            if m is None:
                raise RuntimeError(f"worker {name} was removed while starting")
            try:
                ident = await m.handle.start.remote()  # blocks until the model is loaded
                self.membership.came_up(name, ident["incarnation"], ident["address"])
                self._node_of[name] = ident.get("node_id")
                return
            except ray.exceptions.ActorDiedError as e:
                raise RuntimeError(f"worker {name} died while starting: {e}") from None
            except ray.exceptions.RayActorError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(self.probe_period_s)

    async def add_worker(self, pool: str, instance_type: str | None = None, wait: bool = True) -> str:
        """Start one more worker; ``wait``: return once it takes traffic, else at once (it stays
        STARTING until its model is loaded; one that never starts is forgotten after ``START_TIMEOUT_S``)."""
        if pool not in ("prefill", "decode") or self.cfg.mode == "colocated":
            raise ValueError(f"workers can be added to the prefill or decode pool of a disaggregated server; "
                             f"got pool {pool!r} in {self.cfg.mode} mode")
        name = self._spawn(pool, instance_type)
        if wait:
            await self._wait_up(name)
        else:
            self._busy.add(name)  # supervision leaves it alone while its model loads
            self._starting[name] = asyncio.create_task(self._bring_up(name))
        return name

    async def _bring_up(self, name: str) -> None:
        try:
            await self._wait_up(name, START_TIMEOUT_S)
        except Exception:  # never came up (no node of its type, crashed while loading): forget it
            m = self.membership.get(name)
            if m is not None:
                self.membership.remove(name)
                ray.kill(m.handle)
        finally:
            self._busy.discard(name)
            self._starting.pop(name, None)

    async def drain(self, name: str, timeout_s: float = 120.0) -> dict:
        """Move everything off a worker; it stays registered (DRAINING) and takes nothing new."""
        m = self._member(name)
        self._busy.add(name)
        try:
            self.membership.drain(name)
            if m.pool != "decode":  # a prefill worker only has to finish what it holds
                return await self._wait_empty(m, timeout_s)
            await m.handle.set_draining.remote(True)
            moved = failed = 0
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                ids = await m.handle.request_ids.remote()
                if not ids:
                    leaks = await m.handle.leaks.remote()
                    if not any(leaks.values()):
                        return {"worker": name, "migrated": moved, "failed_attempts": failed, "remaining": 0}
                for rid in ids:
                    target = await self._migration_target(name)
                    if target is None:
                        break
                    try:
                        result = await m.handle.migrate.remote(rid, target.name, target.kv_address)
                    except ray.exceptions.RayTaskError:  # it finished meanwhile
                        continue
                    moved, failed = (moved + 1, failed) if result["status"] == "migrated" else (moved, failed + 1)
                await asyncio.sleep(0.05)
            remaining = len(await m.handle.request_ids.remote())
            return {"worker": name, "migrated": moved, "failed_attempts": failed, "remaining": remaining}
        finally:
            self._busy.discard(name)

    async def undrain(self, name: str) -> dict:
        """Take traffic again (a drain that is no longer wanted)."""
        m = self._member(name)
        if m.pool == "decode":
            await m.handle.set_draining.remote(False)
        self.membership.undrain(name)
        return {"worker": name, "state": self.membership.get(name).state.value}

    async def _wait_empty(self, m, timeout_s: float) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not any((await m.handle.leaks.remote()).values()):
                return {"worker": m.name, "migrated": 0, "failed_attempts": 0, "remaining": 0}
            await asyncio.sleep(0.05)
        return {"worker": m.name, "migrated": 0, "failed_attempts": 0, "remaining": -1}

    async def _migration_target(self, source: str):
        """The live decode worker with the most free KV blocks, other than ``source``."""
        others = [m for m in self.membership.view().live("decode") if m.name != source]
        stats = await asyncio.gather(*(m.handle.stats.remote() for m in others), return_exceptions=True)
        ok = [(s.engine.num_free_kv_blocks, m.name, m) for m, s in zip(others, stats) if isinstance(s, WorkerStats)]
        return max(ok, key=lambda t: t[:2])[2] if ok else None

    async def remove_worker(self, name: str, timeout_s: float = 120.0) -> dict:
        m = self._member(name)
        live = [w for w in self.membership.view().live(m.pool) if w.name != name]
        if not live:
            raise ValueError(f"{name} is the last live {m.pool} worker; add another before removing it")
        result = await self.drain(name, timeout_s)
        self._busy.add(name)
        try:
            self.membership.remove(name)
            await _stop(m.handle)
        finally:
            self._busy.discard(name)
        return {**result, "node_id": self._node_of.pop(name, None)}

    def _member(self, name: str):
        m = self.membership.get(name)
        if m is None:
            raise KeyError(f"no worker named {name!r}; workers: {[w.name for w in self.membership.view().members]}")
        return m

    async def rebalance(self, source: str, target: str, count: int) -> dict:
        """Move up to ``count`` running requests from one decode worker to another (live)."""
        src, dst = self._member(source), self._member(target)
        if src.pool != "decode" or dst.pool != "decode" or dst.state is not WorkerState.UP:
            raise ValueError(f"rebalancing moves requests between decode workers to one that is up; "
                             f"got {source} ({src.pool}) -> {target} ({dst.pool}, {dst.state.value})")
        moved = 0
        for rid in (await src.handle.request_ids.remote())[:count]:
            try:
                result = await src.handle.migrate.remote(rid, dst.name, dst.kv_address)
            except ray.exceptions.RayTaskError:  # finished meanwhile, or already moving
                continue
            moved += result["status"] == "migrated"
        return {"source": source, "target": target, "migrated": moved}

    # -- health ------------------------------------------------------------------------------

    async def report_lost(self, name: str, generation: int) -> int:
        self.membership.lost(name, generation)
        return self.membership.version

    async def _supervise(self) -> None:
        while True:
            await asyncio.sleep(self.probe_period_s)
            members = [m for m in self.membership.view().members if m.name not in self._busy]
            await asyncio.gather(*(self._probe(m) for m in members))

    async def _probe(self, m) -> None:
        try:
            ident = await asyncio.wait_for(m.handle.start.remote(), PROBE_TIMEOUT_S)
        except ray.exceptions.ActorDiedError:  # gone for good (killed, or out of restarts): replace it
            if self.membership.get(m.name) is not None and m.name not in self._busy:
                self.membership.remove(m.name)
                self._node_of.pop(m.name, None)
                self.num_replaced += 1
                self._spawn(m.pool, None if m.node_type == "default" else m.node_type)  # the next probes bring it up
            return
        except (ray.exceptions.RayActorError, asyncio.TimeoutError):  # crashed, restarting, or hung
            self.membership.lost(m.name, m.generation)
            return
        if self.membership.get(m.name) is not None:
            self.membership.came_up(m.name, ident["incarnation"], ident["address"])
            self._node_of[m.name] = ident.get("node_id")

    # -- reads ----------------------------------------------------------------------------------

    def view(self, since_version: int = -1) -> MembershipView | None:
        """The membership, or None when the caller's version is current."""
        return None if since_version == self.membership.version else self.membership.view()

    def members(self) -> list[dict]:
        return [m.as_dict() for m in self.membership.view().members]

    async def signals(self, timeout_s: float = 2.0) -> dict:
        """Membership rows and every answering worker's signals export (autoscaler/signals.py)."""
        members = self.membership.view().members
        asked = [m for m in members if m.state in (WorkerState.UP, WorkerState.DRAINING)]
        exports = await asyncio.gather(*(asyncio.wait_for(m.handle.signals.remote(), timeout_s) for m in asked),
                                       return_exceptions=True)
        return {"members": [m.as_dict() for m in members],
                "exports": {m.name: e for m, e in zip(asked, exports) if isinstance(e, dict)}}

    async def stats(self) -> dict:
        return await self._gather("stats")

    async def leaks(self) -> dict:
        return await self._gather("leaks")

    async def _gather(self, method: str) -> dict:
        members = [m for m in self.membership.view().members if m.state is not WorkerState.DEAD]
        results = await asyncio.gather(*(getattr(m.handle, method).remote() for m in members),
                                       return_exceptions=True)
        return {m.name: r for m, r in zip(members, results) if not isinstance(r, BaseException)}

    async def shutdown(self) -> None:
        if self._supervisor is not None:
            self._supervisor.cancel()
        for task in list(self._starting.values()):
            task.cancel()
        members = self.membership.view().members
        await asyncio.gather(*(_stop(m.handle) for m in members))


async def _stop(handle) -> None:
    try:
        await asyncio.wait_for(handle.stop.remote(), 10)
    except Exception:
        pass
    ray.kill(handle)


Controller = ray.remote(ControllerImpl)
