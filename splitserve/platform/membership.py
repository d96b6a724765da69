"""Membership: which workers exist, where their KV plane listens, and whether they can take work.

Pure Python, no Ray. One owner writes it (the controller, ``controller.py``:
pools starting workers, supervision, the autoscaler); routers read
:class:`MembershipView` copies on every pick. A worker's life::

    add() -> STARTING --came_up()--> UP --drain()--> DRAINING --remove()--> (gone)
                                      |  ^
                              lost()  v  | came_up() (Ray restarted it, or it answered again)
                                     DEAD

``generation`` grows each time a worker comes up as a new process (a new
``incarnation``), so a late report that generation g was lost cannot mark
its replacement (generation g + 1) dead. ``version`` grows on every change,
so readers can ask "anything newer than what I have?".
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from typing import Any

POOLS = ("prefill", "decode", "colocated")


class WorkerState(str, enum.Enum):
    STARTING = "starting"
    UP = "up"
    DRAINING = "draining"  # takes no new requests; its running ones are being moved away
    DEAD = "dead"  # not answering (crashed, restarting, or gone for good)


@dataclass(frozen=True)
class Member:
    name: str
    pool: str
    state: WorkerState
    node_type: str = "default"
    kv_address: str | None = None  # decode workers: where the KV plane listens
    generation: int = 0
    incarnation: str | None = None
    handle: Any = field(default=None, compare=False, repr=False)  # how to call it (a Ray actor handle)

    def as_dict(self) -> dict:
        return {"name": self.name, "pool": self.pool, "state": self.state.value, "node_type": self.node_type,
                "kv_address": self.kv_address, "generation": self.generation}


@dataclass(frozen=True)
class MembershipView:
    version: int
    members: tuple[Member, ...] = ()

    def live(self, pool: str) -> list[Member]:
        """Members of ``pool`` that can take new work."""
        return [m for m in self.members if m.pool == pool and m.state is WorkerState.UP]

    def get(self, name: str) -> Member | None:
        return next((m for m in self.members if m.name == name), None)

    def pool(self, pool: str) -> list[Member]:
        return [m for m in self.members if m.pool == pool]


class Membership:
    def __init__(self):
        self._members: dict[str, Member] = {}
        self.version = 0

    def _set(self, member: Member) -> Member:
        self._members[member.name] = member
        self.version += 1
        return member

    def _get(self, name: str) -> Member:
        if name not in self._members:
            raise KeyError(f"no worker named {name!r}; known: {sorted(self._members)}")
        return self._members[name]

    def add(self, name: str, pool: str, handle: Any = None, node_type: str = "default") -> Member:
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        if name in self._members:
            raise ValueError(f"a worker named {name!r} already exists")
        return self._set(Member(name, pool, WorkerState.STARTING, node_type, handle=handle))

    def came_up(self, name: str, incarnation: str, kv_address: str | None = None) -> Member:
        """The worker answered with this identity. A new incarnation is a new generation; a draining
        worker stays draining."""
        m = self._get(name)
        fresh = incarnation != m.incarnation
        state = WorkerState.DRAINING if m.state is WorkerState.DRAINING and not fresh else WorkerState.UP
        if not fresh and m.state is state and m.kv_address == kv_address:
            return m
        return self._set(replace(m, state=state, kv_address=kv_address, incarnation=incarnation,
                                 generation=m.generation + 1 if fresh else m.generation))

    def lost(self, name: str, generation: int | None = None) -> bool:
        """Mark a worker dead; ignored (False) for a stale report about an older generation."""
        m = self._members.get(name)
        if m is None or (generation is not None and generation != m.generation) or m.state is WorkerState.DEAD:
            return False
        self._set(replace(m, state=WorkerState.DEAD))
        return True

    def drain(self, name: str) -> Member:
        return self._set(replace(self._get(name), state=WorkerState.DRAINING))

    def undrain(self, name: str) -> Member:
        m = self._get(name)
        return self._set(replace(m, state=WorkerState.UP)) if m.state is WorkerState.DRAINING else m

    def remove(self, name: str) -> Member:
        m = self._get(name)
        del self._members[name]
        self.version += 1
        return m

    def get(self, name: str) -> Member | None:
        return self._members.get(name)

    def view(self) -> MembershipView:
        return MembershipView(self.version, tuple(self._members.values()))
