"""A discrete-event simulator of a splitserve cluster, for the scale we cannot run here.

Pure Python. It runs the real policy (``policy.decide``) on snapshots built by
the real aggregation (``signals.aggregate``) from simulated workers that record
the same series as real ones, so what it tests is the autoscaler itself; the
router's choices are the real router policy's (``platform/routing.py``). A
request's life::

    arrival -> the prefill instance that would be done first (``pick_prefill``: queued tokens
               over the speed ``PrefillSpeeds`` measured from the arrivals it was given and
               their prefills' ends, as the router measures it) (FCFS; each step takes
               up to the type's ``step_tokens`` of queued prompts, chunked, and lasts
               correction x prefill(tokens, sum of chunk x context))
            -> first token -> a decode instance (``rank_decodes``: the most free KV, then the
               fewest running; none with room: it waits, the waiting placed in arrival order)
               -> KV transfer (transfer(prompt tokens) seconds): the client has its first token (TTFT,
                  plus ``ttft_overhead_s``: the serving path's latency that occupies no engine)
            -> joins the decode batch at the next step; every step lasts
               correction x decode(batch, KV tokens) and gives each request a token
            -> done after its output length (TPOT = (last - first token) / (n - 1))
    not started prefill, or not taken by a decode instance, within ``max_wait_s`` of its arrival (the
    router's deadline) -> refused: the client sees the error, the prefill instance counts it (``refused``,
    ``refused_decode``: signals the policy reads), and it holds nothing

Instances are added ``startup_s`` (the catalog's node start + load) before they
take work; a drained decode instance's requests migrate (``migration_pause_s``
without tokens) to the others, then it goes; a drained prefill instance
finishes its queue. Cost accrues from the add to the removal, within the
measured window (``Simulation.run``: after a warm-up, to the last arrival). The
traces it runs come from ``traces.py``.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from dataclasses import dataclass, field

from splitserve.autoscaler.catalog import Catalog, LinearModel
from splitserve.autoscaler.decision import Objectives, PolicyState
from splitserve.autoscaler.policy import decide
from splitserve.autoscaler.signals import Recorder, aggregate, percentile, record_step
from splitserve.platform.routing import DecodeLoad, PrefillLoad, PrefillSpeeds, pick_prefill, rank_decodes


# -- the simulated system -------------------------------------------------------------------------

@dataclass(eq=False)
class SimRequest:
    rid: int
    arrival: float
    prompt: int
    output: int
    done_prompt: int = 0  # prompt tokens prefilled
    prefill_start: float | None = None
    first_token: float | None = None  # at the client (after the transfer)
    tokens: int = 0  # output tokens the client has
    done: float | None = None
    refused: str | None = None  # "refused" (no prefill room in time) / "refused_decode" (no decode room)
    decode: "Instance | None" = None

    @property
    def tpot(self) -> float | None:
        return (self.done - self.first_token) / (self.output - 1) if self.done and self.output > 1 else None


@dataclass(eq=False)
class Instance:
    name: str
    pool: str
    kind: str
    state: str  # starting / up / draining
    added: float
    recorder: Recorder
    queue: deque = field(default_factory=deque)  # prefill: waiting prompts
    queued: int = 0  # prefill: their prompt tokens not yet computed
    running: list = field(default_factory=list)  # decode: the batch
    joining: list = field(default_factory=list)  # decode: committed, join at the next step
    busy: bool = False
    kv_used: int = 0  # decode: tokens reserved (prompt + output of each request here)

    def gauges(self, block: int, kv_tokens: int) -> dict:
        if self.pool == "prefill":
            return {"waiting": len(self.queue), "running": 0, "queued_prompt_tokens": self.queued}
        # the room taken as admission counts it: each request here reserves its whole output (a real worker
        # grows a request's blocks as it decodes, and its gauges count the blocks allocated: admission's view)
        return {"waiting": len(self.joining), "running": len(self.running), "kv_blocks_used": -(-self.kv_used // block),
                "kv_blocks_total": kv_tokens // block, "kv_tokens_used": self.kv_used}


@dataclass
class SimResult:
    requests: list
    cost: float  # dollars over the run
    duration_s: float
    timeline: list  # (t, {pool: {type: instances}}, arrivals/s over the last tick)
    decisions: list
    ttft_overhead_s: float = 0.0  # every output reaches the client this much later (TPOT unchanged)

    def summary(self, slo_ttft: float, slo_tpot: float) -> dict:
        done = [r for r in self.requests if r.done is not None]
        ttfts = {id(r): r.first_token - r.arrival + self.ttft_overhead_s for r in done}
        ttft = sorted(ttfts.values())
        tpot = sorted(r.tpot for r in done if r.tpot is not None)
        ok = [r for r in done if ttfts[id(r)] <= slo_ttft and (r.tpot is None or r.tpot <= slo_tpot)]
        tokens = sum(r.output for r in done)
        return {"requests": len(self.requests), "completed": len(done), "failed": len(self.requests) - len(done),
                "refused": sum(1 for r in self.requests if r.refused),
                "ttft_p50": percentile(ttft, 50), "ttft_p90": percentile(ttft, 90),
                "tpot_p50": percentile(tpot, 50), "tpot_p90": percentile(tpot, 90),
                "attainment": len(ok) / max(1, len(self.requests)), "goodput": len(ok) / self.duration_s,
                "cost": self.cost, "cost_per_m_tokens": self.cost / max(tokens, 1) * 1e6}


class Simulation:
    def __init__(self, catalog: Catalog, initial: dict, objectives: Objectives | None = None,
                 period_s: float = 5.0, window_s: float = 30.0, transfer: LinearModel = LinearModel(0.005, 5e-5),
                 correction: dict | None = None, block_size: int = 16,
                 migration_pause_s: float = 0.05, shared_host: float | dict = 0.0, ttft_overhead_s: float = 0.0,
                 max_wait_s: float | None = 30.0, seed: int = 0):
        """``initial``: {"prefill": {type: n}, "decode": {type: n}}; ``objectives`` None: static (no
        autoscaler); ``correction``: {"prefill": x, "decode": y} on the catalog's models (calibration);
        ``shared_host``: every instance shares one machine's cores (a test box): a step of pool P runs
        (1 + shared_host[P]) x slower while the other pool is busy (a number: the same for both);
        ``ttft_overhead_s``: what the serving path (router, proxies, RPCs) adds to every request's
        first token without occupying an engine (the calibration measures it); ``max_wait_s``: the router's
        deadline (its default): a request whose prefill has not started, or that no decode instance took,
        this long after its arrival is refused (None: requests wait as long as it takes)."""
        self.catalog, self.objectives, self.period_s, self.window_s = catalog, objectives, period_s, window_s
        self.transfer, self.block = transfer, block_size
        self.correction = {"prefill": 1.0, "decode": 1.0, **(correction or {})}
        self.migration_pause_s, self.ttft_overhead_s, self.max_wait_s = migration_pause_s, ttft_overhead_s, max_wait_s
        self.shared_host = shared_host if isinstance(shared_host, dict) else \
            {"prefill": shared_host, "decode": shared_host}
        self.now, self._seq = 0.0, itertools.count()
        self._events: list = []
        self.instances: dict[str, Instance] = {}
        self._names = itertools.count()
        self.waiting_for_decode: deque = deque()
        self.speeds = PrefillSpeeds()
        self.cost, self.measure_from, self.measure_to = 0.0, 0.0, math.inf
        self.state = PolicyState()
        self.decisions, self.timeline = [], []
        for pool, mix in initial.items():
            for kind, n in mix.items():
                for _ in range(n):
                    self._add(pool, kind, ready_in=0.0)

    # -- plumbing ---------------------------------------------------------------------------------

    def _at(self, t: float, fn, *args) -> None:
        heapq.heappush(self._events, (t, next(self._seq), fn, args))

    def _add(self, pool: str, kind: str, ready_in: float) -> Instance:
        inst = Instance(f"{pool}-{kind}-{next(self._names)}", pool, kind, "starting", self.now,
                        Recorder(window_s=60.0, clock=lambda: self.now))
        self.instances[inst.name] = inst
        self._at(self.now + ready_in, self._ready, inst)
        return inst

    def _ready(self, inst: Instance) -> None:
        if inst.state == "starting":
            inst.state = "up"
            self._place_waiting()

    def _remove(self, inst: Instance) -> None:
        if self.instances.pop(inst.name, None) is not None:  # cost accrues within the measured window
            held = min(self.now, self.measure_to) - max(inst.added, self.measure_from)
            self.cost += self.catalog.get(inst.kind).cost_per_hour * max(0.0, held) / 3600

    def _remove_if_drained(self, inst: Instance) -> None:
        """A draining instance goes once nothing is queued, running or on its way to it."""
        if inst.state == "draining" and not inst.busy and not inst.queue and not inst.running \
                and not inst.joining and inst.kv_used == 0:
            self._remove(inst)

    def _up(self, pool: str) -> list[Instance]:
        return [i for i in self.instances.values() if i.pool == pool and i.state == "up"]

    # -- prefill ------------------------------------------------------------------------------------

    def _arrive(self, req: SimRequest) -> None:
        pool = self._up("prefill")
        if not pool:  # nothing up yet: try again shortly, until the deadline
            if self._expired(req):
                self._refuse(req, None, "refused")
            else:
                self._at(self.now + 0.05, self._arrive, req)
            return
        loads = [PrefillLoad(i.name, i.queued, 0, self.speeds.speed(i.name)) for i in pool]
        inst = self.instances[pick_prefill(loads, req.prompt)]
        self.speeds.sent(inst.name, self.now)
        inst.recorder.record("arrival", req.prompt)
        inst.queue.append(req)
        inst.queued += req.prompt
        if not inst.busy:
            self._prefill_step(inst)

    def _expired(self, req: SimRequest) -> bool:
        return self.max_wait_s is not None and self.now - req.arrival > self.max_wait_s

    def _refuse(self, req: SimRequest, prefill: Instance | None, why: str) -> None:
        req.refused = why
        self._open -= 1
        if prefill is not None:
            prefill.recorder.count(why, 1)

    def _refuse_expired(self, inst: Instance) -> None:
        """Prompts not started by the deadline leave the queue (FCFS: the started ones come first, then the
        rest in arrival order, so the expired are the first of the rest)."""
        while True:
            head = next((r for r in inst.queue if r.prefill_start is None), None)
            if head is None or not self._expired(head):
                return
            inst.queue.remove(head)
            inst.queued -= head.prompt
            self.speeds.dropped(inst.name, self.now)  # as the router does: no prefill to measure
            self._refuse(head, inst, "refused")

    def _prefill_step(self, inst: Instance) -> None:
        self._refuse_expired(inst)
        budget, tokens, sq, chunks = self.catalog.get(inst.kind).step_tokens, 0, 0.0, []
        for req in inst.queue:
            if budget <= 0:
                break
            n = min(req.prompt - req.done_prompt, budget)
            chunks.append((req, n))
            tokens, sq, budget = tokens + n, sq + n * (req.done_prompt + n), budget - n
            if req.prefill_start is None:
                req.prefill_start = self.now
                inst.recorder.record("queue_s", self.now - req.arrival)
        if not chunks:
            inst.busy = False
            self._remove_if_drained(inst)
            return
        inst.busy = True
        seconds = self.correction["prefill"] * self.catalog.get(inst.kind).prefill(tokens, sq) \
            * self._contention("prefill")
        record_step(inst.recorder, seconds, tokens, sq)
        self._at(self.now + seconds, self._prefill_done, inst, chunks)

    def _prefill_done(self, inst: Instance, chunks: list) -> None:
        for req, n in chunks:
            req.done_prompt += n
            inst.queued -= n
            if req.done_prompt == req.prompt:
                inst.queue.remove(req)
                self.speeds.done(inst.name, req.prompt, self.now)
                inst.recorder.record("prefill_s", self.now - req.prefill_start)
                req.tokens = 1  # the first token, sampled here
                self._to_decode(req, inst)
        self._prefill_step(inst)

    # -- handoff and decode -------------------------------------------------------------------------

    def _to_decode(self, req: SimRequest, prefill: Instance | None) -> None:
        target = self._decode_for(req.prompt + req.output, self._up("decode"))
        if target is None:
            self.waiting_for_decode.append((req, prefill))
        else:
            self._send(req, prefill, target)

    def _send(self, req: SimRequest, prefill: Instance | None, target: Instance) -> None:
        """Reserve the request's KV on ``target`` and start its transfer."""
        target.kv_used += req.prompt + req.output
        req.decode = target
        seconds = self.transfer(req.prompt)
        self._at(self.now + seconds, self._committed, req, target, prefill, seconds)

    def _decode_for(self, need: int, candidates: list[Instance]) -> Instance | None:
        """The router's first choice (``rank_decodes``) among ``candidates`` for ``need`` KV tokens."""
        loads = [DecodeLoad(i.name, (self.catalog.get(i.kind).kv_tokens - i.kv_used) // self.block,
                            len(i.running) + len(i.joining), self.block) for i in candidates]
        ranked = rank_decodes(loads, need)
        return self.instances[ranked[0]] if ranked else None

    def _place_waiting(self) -> None:
        """Requests waiting for decode room are placed in arrival order, while the first fits somewhere
        (the cost is what is placed, not what waits: a backlog of thousands stays cheap)."""
        while self.waiting_for_decode:
            req, prefill = self.waiting_for_decode[0]
            if self._expired(req):
                self.waiting_for_decode.popleft()
                self._refuse(req, prefill, "refused_decode")
                continue
            target = self._decode_for(req.prompt + req.output, self._up("decode"))
            if target is None:
                return
            self.waiting_for_decode.popleft()
            self._send(req, prefill, target)

    def _committed(self, req: SimRequest, target: Instance, prefill: Instance | None, transfer_s: float) -> None:
        if req.first_token is None:
            req.first_token = self.now
            if prefill is not None:
                prefill.recorder.record("transfer_s", transfer_s)
                prefill.recorder.record("ttft_s", self.now - req.arrival)
            if req.output <= 1:
                self._finish(req, target)
                return
        target.joining.append(req)
        if target.state == "draining":  # it was on its way here when the drain began: move it on
            self._move(req, target, [i for i in self._up("decode") if i is not target])
        if not target.busy:
            self._decode_step(target)

    def _decode_step(self, inst: Instance) -> None:
        inst.running += inst.joining
        inst.joining = []
        if not inst.running:
            inst.busy = False
            self._remove_if_drained(inst)
            return
        inst.busy = True
        kv = sum(r.prompt + r.tokens for r in inst.running)
        seconds = self.correction["decode"] * self.catalog.get(inst.kind).decode(len(inst.running), kv) \
            * self._contention("decode")
        record_step(inst.recorder, seconds, len(inst.running), kv)
        self._at(self.now + seconds, self._decode_done, inst, list(inst.running))

    def _decode_done(self, inst: Instance, batch: list) -> None:
        inst.recorder.count("tokens", len([r for r in batch if r.decode is inst]))
        for req in batch:
            if req.decode is not inst:  # moved away during the step
                continue
            req.tokens += 1
            if req.tokens >= req.output:
                inst.running.remove(req)
                self._finish(req, inst)
        self._place_waiting()
        self._decode_step(inst)

    def _finish(self, req: SimRequest, inst: Instance) -> None:
        req.done = self.now
        self._open -= 1
        inst.kv_used -= req.prompt + req.output
        if req.tpot is not None:
            inst.recorder.record("tpot_s", req.tpot)
        inst.recorder.record("output_tokens", req.output)

    def _contention(self, pool: str) -> float:
        """How much slower a step of ``pool`` runs now (``shared_host``: while the other pool works)."""
        slowdown = self.shared_host.get(pool, 0.0)
        if not slowdown:
            return 1.0
        other = "decode" if pool == "prefill" else "prefill"
        return 1.0 + slowdown if any(i.busy for i in self.instances.values() if i.pool == other) else 1.0

    def _move(self, req: SimRequest, source: Instance, targets: list[Instance]) -> bool:
        need = req.prompt + req.output
        target = self._decode_for(need, targets)
        if target is None:
            return False
        for queue in (source.running, source.joining):
            if req in queue:
                queue.remove(req)
        source.kv_used -= need
        target.kv_used += need
        req.decode = target
        self._at(self.now + self.migration_pause_s, self._committed, req, target, None, 0.0)
        return True

    # -- the autoscaler ------------------------------------------------------------------------------

    def _tick(self) -> None:
        members = [{"name": i.name, "pool": i.pool, "state": i.state, "node_type": i.kind}
                   for i in self.instances.values()]
        exports = {i.name: {"gauges": i.gauges(self.block, self.catalog.get(i.kind).kv_tokens), **i.recorder.export()}
                   for i in self.instances.values() if i.state in ("up", "draining")}
        snapshot = aggregate(members, exports, self.window_s, now=self.now)
        decision = decide(snapshot, self.catalog, self.objectives, self.state, now=self.now)
        self.decisions.append(decision)
        for a in decision.actions:
            if a.kind == "add":
                for _ in range(a.count):
                    self._add(a.pool, a.instance_type, self.catalog.get(a.instance_type).startup_s)
            elif a.kind == "drain" and a.worker in self.instances:
                self._drain(self.instances[a.worker])
            elif a.kind == "migrate" and a.worker in self.instances and a.target in self.instances:
                src = self.instances[a.worker]
                for req in list(src.running)[: a.count]:
                    self._move(req, src, [self.instances[a.target]])
        self._record_timeline(snapshot.pool("prefill").arrival_rate)
        self._at(self.now + self.period_s, self._tick)

    def _drain(self, inst: Instance) -> None:
        inst.state = "draining"
        if inst.pool == "decode":
            others = [i for i in self._up("decode") if i is not inst]
            for req in list(inst.running) + list(inst.joining):
                self._move(req, inst, others)  # one that fits nowhere finishes here
        self._remove_if_drained(inst)

    def _record_timeline(self, rate: float) -> None:
        counts: dict = {"prefill": {}, "decode": {}}
        for i in self.instances.values():
            counts[i.pool][i.kind] = counts[i.pool].get(i.kind, 0) + 1
        self.timeline.append((self.now, counts, rate))

    # -- running ---------------------------------------------------------------------------------------

    def run(self, trace: list[tuple], drain_s: float = 600.0, measure_from: float = 0.0) -> SimResult:
        """Serve ``trace``; stop ``drain_s`` after the last arrival (what is not done by then failed).
        The measured window runs from ``measure_from`` to the last arrival: the result holds the requests
        that arrive in it (however late they finish), its length and the cost of the instances held in it.
        ``measure_from`` > 0: a warm-up before it is served but not counted, so a system is measured as it
        runs in service, not from its first minute."""
        self.measure_from, self.measure_to = measure_from, (trace[-1][0] if trace else 0.0)
        requests = [SimRequest(i, t, max(1, p), max(1, o)) for i, (t, p, o) in enumerate(trace)]
        for req in requests:
            self._at(req.arrival, self._arrive, req)
        end = (trace[-1][0] if trace else 0.0) + drain_s
        if self.objectives is not None:
            self._at(self.period_s, self._tick)
        else:
            for t in range(0, int(end), max(1, int(self.period_s))):
                self._at(float(t), self._record_timeline, 0.0)
        self._open = len(requests)
        while self._events and self._open:
            t, _, fn, args = heapq.heappop(self._events)
            if t > end:
                break
            self.now = t
            fn(*args)
        for inst in list(self.instances.values()):
            self._remove(inst)
        duration = self.measure_to - measure_from
        return SimResult([r for r in requests if r.arrival >= measure_from], self.cost, duration,
                         [x for x in self.timeline if x[0] >= measure_from], self.decisions, self.ttft_overhead_s)
