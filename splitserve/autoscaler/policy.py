"""The autoscaling policy: ``decide(snapshot, catalog, objectives, state) -> Decision``.

Pure Python, no Ray, no torch; deterministic for its inputs. One call per
tick of the autoscaler loop (``loop.py``), for the prefill and decode pools:

    1. demand from the snapshot     prefill: arrivals/s (over the window or the last seconds,
                                    whichever is higher) and the prompt lengths; decode: output
                                    tokens/s (measured, or arrivals x mean output) and the mean
                                    context of a running request (lengths a window has no sample
                                    of: the last measured); plus
                                    its growth over ``trend_s`` (while it goes on: a levelled step
                                    is no trend) times
                                    the pool's longest start-up (a new instance meets the demand of
                                    when it is up); at least the peak measured demand of the
                                    last ``down_stable_s`` (bursts that recur sooner find their
                                    capacity still there; an extrapolation is not held)
    2. correction                   the seconds the pool's engines were busy / what the catalog
                                    predicts for the very steps they ran (tokens and attention,
                                    batch and KV), clamped; applied to the catalog's models
    3. target                       the cheapest mix of instance types whose capacity at
                                    objective x headroom carries the demand (``capacity.py``),
                                    within min/max: fewer of the instances there when they carry
                                    it, else those plus the cheapest addition (planned for
                                    ``add_headroom`` more demand); another mix of
                                    types only when, planned for ``switch_headroom`` more demand
                                    (a switch is slow to undo), it costs ``switch_saving`` less; an
                                    objective missed on the server,
                                    requests refused for lack of the pool's room (prefill: queue
                                    full or not started in time; decode: no room for the KV), or
                                    decode KV use above ``kv_high``, asks for more capacity than now
                                    (a miss measured partly during a drain, whose migrations pause
                                    requests, or before the pool's last instances came
                                    up is stale: the model alone decides);
                                    zero traffic asks for the minimum
    4. act                          up: add the missing instances, unless it scaled within
                                    ``up_cooldown_s``, within the budget; while some of this pool are
                                    still starting (they count in its capacity), only for demand
                                    the model says they do not carry, never for a pressure (a miss,
                                    refusals, KV) that they may relieve; down (or the old side of
                                    a change of types, once the new ones are up): drain the
                                    type over target with the least capacity per cost (the
                                    workers with least work): decode one instance at a time,
                                    prefill half of those over target per cooldown (a prefill
                                    drain moves nothing; at zero traffic all of them), only after
                                    the target (which holds the peak of ``down_stable_s``) stayed
                                    below for the type's start-up time
                                    (it may be wanted again), not within ``down_cooldown_s`` of the
                                    last change, never while an objective is missed or KV is
                                    high, never leaving less capacity than the demand
    5. rebalance (decode)           a hot worker (KV use >= ``rebalance_gap`` above the coldest of
                                    its instance type) gives that one some running requests by
                                    live migration

No data (no snapshot, a stale one, a pool with no workers answering) means
no action, never a guess. ``state`` (:class:`PolicyState`) carries the
cooldowns, the hysteresis clock and the decision counter between calls.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from splitserve.autoscaler.capacity import cheapest_mix, decode_capacity, prefill_capacity
from splitserve.autoscaler.catalog import Catalog
from splitserve.autoscaler.signals import RECENT_S, PoolSignals, Snapshot

POOLS = ("prefill", "decode")
CORRECTION_RANGE = (0.5, 4.0)


@dataclass(frozen=True)
class PoolLimits:
    min: int = 1
    max: int = 4

    def __post_init__(self):
        if not (isinstance(self.min, int) and isinstance(self.max, int) and 1 <= self.min <= self.max):
            raise ValueError(f"pool limits need integers 1 <= min <= max, got min={self.min!r} max={self.max!r}")


@dataclass(frozen=True)
class Objectives:
    ttft_s: float = 2.0
    tpot_s: float = 0.1
    percentile: int = 90  # the objectives hold at this percentile: 50, 90 or 99
    headroom: float = 0.8  # plan for this fraction of each objective
    prefill: PoolLimits = field(default_factory=PoolLimits)
    decode: PoolLimits = field(default_factory=PoolLimits)
    budget_per_hour: float | None = None  # cost of all instances together; None: no budget
    kv_high: float = 0.85  # decode KV use above this asks for one more decode instance
    up_cooldown_s: float = 20.0
    down_cooldown_s: float = 60.0
    down_stable_s: float = 300.0  # the demand planned for is at least its measured peak over this long, so
    #                               capacity is drained this long after the demand fell (300 s: Kubernetes'
    #                               default scale-down stabilization window); the target must then stay below
    #                               the count for the start-up time of the type that would be drained
    min_samples: int = 20  # fewer measurements than this: the model alone decides
    stale_s: float = 30.0  # an older snapshot is no data
    trend_s: float = 300.0  # demand growth is measured over this long and planned for a start-up ahead
    switch_saving: float = 0.2  # a different mix of types replaces what is there only if it costs this much less
    switch_headroom: float = 0.5  # ... and it is chosen for this much more demand than now
    add_headroom: float = 0.1  # an addition carries this much more of the demand than the shortfall: a pool
    #                            that grows gets a step of its best-value type, not a string of the type that
    #                            is cheapest for the last few tokens (five slow instances for a 140 tokens/s
    #                            shortfall of a 10,000 tokens/s pool, simulated, each drained again later)
    rebalance_gap: float = 0.3
    max_migrations: int = 4  # per rebalancing proposal
    default_prompt_tokens: int = 256  # the demand's shape before anything was measured (then: the last
    default_output_tokens: int = 128  # measured, when a window has no prompt or no finished output)

    def __post_init__(self):
        for name in ("prefill", "decode"):
            if isinstance(getattr(self, name), dict):
                object.__setattr__(self, name, PoolLimits(**getattr(self, name)))
        if self.percentile not in (50, 90, 99):
            raise ValueError(f"percentile must be 50, 90 or 99, got {self.percentile!r}")
        for name in ("ttft_s", "tpot_s"):
            if not isinstance(getattr(self, name), (int, float)) or getattr(self, name) <= 0:
                raise ValueError(f"objective {name} must be a number of seconds > 0, got {getattr(self, name)!r}")
        if not 0 < self.headroom <= 1:
            raise ValueError(f"headroom must be in (0, 1], got {self.headroom!r}")
        if self.budget_per_hour is not None and self.budget_per_hour < 0:
            raise ValueError(f"budget_per_hour must be >= 0 or null, got {self.budget_per_hour!r}")

    def limits(self, pool: str) -> PoolLimits:
        return getattr(self, pool)


@dataclass
class PolicyState:
    seq: int = 0
    last_change: dict = field(default_factory=dict)  # pool -> when it last scaled
    below_since: dict = field(default_factory=dict)  # pool -> since when the target is below the count
    history: dict = field(default_factory=dict)  # pool -> [(time, measured demand)] over trend_s
    peaks: dict = field(default_factory=dict)  # pool -> [(time, measured demand)] over down_stable_s
    settled_at: dict = field(default_factory=dict)  # pool -> when its last starting instance came up or its
    #                                                 last drain ended (None: some are starting or draining);
    #                                                 misses measured before are stale
    shape: dict = field(default_factory=dict)  # "prompt_mean", "prompt_high", "output_mean": the last measured


@dataclass(frozen=True)
class Action:
    kind: str  # "add" | "drain" | "migrate"
    pool: str
    instance_type: str | None = None
    count: int = 1
    worker: str | None = None  # drain: which; migrate: from
    target: str | None = None  # migrate: to


@dataclass(frozen=True)
class Decision:
    id: str
    time: float
    actions: tuple[Action, ...] = ()
    targets: dict = field(default_factory=dict)  # pool -> {instance type: count}
    reasons: tuple[str, ...] = ()
    model: dict = field(default_factory=dict)  # pool -> demand, capacities, corrections (what it reasoned from)

    def to_dict(self) -> dict:
        return asdict(self)


def _clamp(x: float, lo: float, hi: float) -> float:
    return max(lo, min(hi, x))


def _correction(pool: str, snapshot: Snapshot, catalog: Catalog, obj: Objectives) -> float:
    """Seconds the pool's engines were busy over the window / what the catalog predicts for the same
    steps (each worker's steps under its own type's model); 1 with fewer than ``min_samples`` steps."""
    busy = predicted = 0.0
    steps = 0
    for w in snapshot.workers:
        if w.pool == pool and w.steps and w.instance_type in catalog.types:
            m = getattr(catalog.get(w.instance_type), pool)
            busy += w.busy_s
            predicted += m.a * w.steps + m.b * w.step_x + m.c * w.step_y
            steps += w.steps
    if steps < obj.min_samples or predicted <= 0:
        return 1.0
    return _clamp(busy / predicted, *CORRECTION_RANGE)


def _shape(snapshot: Snapshot, obj: Objectives, state: PolicyState) -> dict:
    """The demand's shape: mean and percentile prompt, mean output, as measured over the window; what
    the window lacks (no prompt arrived, no request finished: a trickle with a short window, or the
    samples left with a drained worker) is the last measured, then the defaults. (Assuming the default
    128-token output for a trickle of 24-token requests once tripled its demand and undid a drain.)"""
    prompt, output = snapshot.pool("prefill").prompt_tokens, snapshot.pool("decode").output_tokens
    if prompt.n:
        state.shape.update(prompt_mean=prompt.mean, prompt_high=prompt.at(obj.percentile))
    if output.n:
        state.shape["output_mean"] = output.mean
    return {"prompt_mean": obj.default_prompt_tokens, "prompt_high": obj.default_prompt_tokens,
            "output_mean": obj.default_output_tokens, **state.shape}


def _prefill_model(snapshot: Snapshot, catalog: Catalog, obj: Objectives, shape: dict) -> dict:
    ps = snapshot.pool("prefill")
    mean, high = shape["prompt_mean"], shape["prompt_high"]
    corr = _correction("prefill", snapshot, catalog, obj)
    cap = {t.name: prefill_capacity(t, mean, high, obj.ttft_s * obj.headroom, obj.percentile / 100, corr)
           for t in catalog.for_pool("prefill")}
    return {"demand": max(ps.arrival_rate, ps.recent_arrival_rate), "unit": "requests/s", "correction": corr,
            "capacity": cap, "prompt_mean": mean}


def _decode_model(snapshot: Snapshot, catalog: Catalog, obj: Objectives, shape: dict) -> dict:
    ps, pre = snapshot.pool("decode"), snapshot.pool("prefill")
    out_mean, prompt_mean = shape["output_mean"], shape["prompt_mean"]
    demand = max(ps.token_rate, ps.recent_token_rate, max(pre.arrival_rate, pre.recent_arrival_rate) * out_mean)
    context = ps.kv_tokens_used / ps.running if ps.running else prompt_mean + out_mean / 2
    corr = _correction("decode", snapshot, catalog, obj)
    cap = {t.name: decode_capacity(t, context, obj.tpot_s * obj.headroom, corr, p=obj.percentile / 100)[1]
           for t in catalog.for_pool("decode")}
    return {"demand": demand, "unit": "tokens/s", "correction": corr, "capacity": cap, "context": context}


def _observed_miss(pool: str, ps: PoolSignals, obj: Objectives) -> str | None:
    dist, limit = (ps.ttft_s, obj.ttft_s) if pool == "prefill" else (ps.tpot_s, obj.tpot_s)
    if dist.n >= obj.min_samples and dist.at(obj.percentile) > limit:
        name = "TTFT" if pool == "prefill" else "TPOT"
        return f"{pool}: measured P{obj.percentile} {name} {dist.at(obj.percentile):.3f}s > objective {limit}s"
    return None


def _refusals(pool: str, snapshot: Snapshot) -> str | None:
    """Requests refused for lack of this pool's room lately (the prefill workers count both kinds)."""
    pre = snapshot.pool("prefill")
    rate = pre.refused_rate if pool == "prefill" else pre.decode_refused_rate
    if rate <= 0:
        return None
    why = "prefill queues full or not started in time" if pool == "prefill" else "no decode worker had room"
    return f"{rate:.2f} requests/s refused ({why})"


def _idle(snapshot: Snapshot) -> bool:
    pre, dec = snapshot.pool("prefill"), snapshot.pool("decode")
    return (pre.arrival_rate == 0 and dec.token_rate == 0 and pre.waiting == 0 and dec.running == 0
            and dec.waiting == 0 and pre.queued_prompt_tokens == 0)


def _one_more(model: dict, current: dict, catalog: Catalog) -> dict:
    """The current mix plus one instance of the type with the most capacity per unit of cost."""
    name = max(model["capacity"], key=lambda k: (_value(k, model, catalog), k))
    return {**current, name: current.get(name, 0) + 1}


def _target(pool: str, snapshot: Snapshot, model: dict, catalog: Catalog, obj: Objectives, state: PolicyState,
            now: float, reasons: list) -> dict:
    ps, limits = snapshot.pool(pool), obj.limits(pool)
    current = dict(ps.instances)
    cost = {k: catalog.get(k).cost_per_hour for k in model["capacity"]}
    if _idle(snapshot):
        keep = sorted(current, key=lambda k: (cost.get(k, float("inf")), k))
        target, left = {}, limits.min
        for k in keep:  # the cheapest instances already there stay
            take = min(current[k], left)
            if take and k in cost:
                target[k], left = take, left - take
        if left:
            cheapest = min(cost, key=lambda k: (cost[k], k))
            target[cheapest] = target.get(cheapest, 0) + left
        reasons.append(f"{pool}: no traffic: the minimum ({limits.min})")
        return target
    target = _plan(model, cost, current, limits, obj)
    if target is None:
        best = max(model["capacity"], key=lambda k: (model["capacity"][k], -cost[k]))
        target = {best: limits.max}
        reasons.append(f"{pool}: demand {model['demand']:.2f} {model['unit']} is beyond {limits.max} instances: "
                       f"the maximum")
    pressure = _observed_miss(pool, ps, obj)
    if pressure and now - (state.settled_at.get(pool, -1e18) or now) < snapshot.window_s:
        reasons.append(f"{pool}: {pressure.split(': ', 1)[1]}, but measured partly before the last instances "
                       f"came up or while a drain moved requests: the model decides")
        pressure = None
    refused = _refusals(pool, snapshot)
    if refused and not pressure:
        if now - (state.settled_at.get(pool, -1e18) or now) < RECENT_S:
            reasons.append(f"{pool}: {refused}, but partly before the last instances came up: the model decides")
        else:
            pressure = f"{pool}: {refused}"
    if pool == "decode" and ps.kv_blocks_total and ps.kv_used_fraction > obj.kv_high:
        pressure = f"decode: KV use {ps.kv_used_fraction:.0%} > {obj.kv_high:.0%}"
    if pressure:
        reasons.append(pressure)
        if _carries(model, target) <= _carries(model, current) and sum(current.values()) < limits.max:
            target = _one_more(model, current, catalog)
            model["pressure"] = pressure  # the target is more than the demand model asks for
    return target


def _plan(model: dict, cost: dict, current: dict, limits: PoolLimits, obj: Objectives) -> dict | None:
    """The mix to aim for: fewer of what is there when it carries the demand, else what is there plus
    the cheapest addition (for ``add_headroom`` more demand); a different mix altogether only when,
    planned for ``switch_headroom`` more demand, it costs ``switch_saving`` less."""
    cap, demand = model["capacity"], model["demand"]
    known = {k: n for k, n in current.items() if k in cap}
    if _carries(model, known) >= demand:
        keep = cheapest_mix(cap, cost, demand, limits.min, limits.max, known, upper=known)
    else:
        more = cheapest_mix(cap, cost, demand * (1 + obj.add_headroom) - _carries(model, known), 0,
                            limits.max - sum(known.values()))
        keep = None if more is None else {k: known.get(k, 0) + more.get(k, 0) for k in {*known, *more}}
        if keep is not None and sum(keep.values()) < limits.min:
            keep = None
    fresh = cheapest_mix(cap, cost, demand, limits.min, limits.max, current)
    if keep is None:
        return fresh
    # another mix of types is planned for switch_headroom more demand: a switch is slow to undo (the new
    # instances start, the old ones stay until they are up), so a mix that only just carries today's demand
    # is not worth switching to
    other = cheapest_mix(cap, cost, demand * (1 + obj.switch_headroom), limits.min, limits.max, current)
    if other is not None and _price(other, cost) < (1 - obj.switch_saving) * _price(keep, cost):
        return other
    return {k: n for k, n in keep.items() if n}


def _price(mix: dict, cost: dict) -> float:
    return sum(cost[k] * n for k, n in mix.items())


def _growth(pool: str, demand: float, state: PolicyState, now: float, obj: Objectives) -> float:
    """How fast the demand grows (per second, >= 0): the least-squares slope of this policy's own
    demand readings over the last ``trend_s``, but no more than the slope over its last quarter (a
    trend counts while it goes on: a step up that has levelled off is not a ramp, and planning a
    start-up ahead along it would overshoot); 0 before a quarter of ``trend_s`` is seen."""
    history = _recent(state.history.setdefault(pool, []), now, demand, obj.trend_s)
    if len(history) < 3 or now - history[0][0] < obj.trend_s / 4:
        return 0.0
    last = [(t, d) for t, d in history if now - t <= obj.trend_s / 4]
    return max(0.0, min(_slope(history), _slope(last) if len(last) >= 3 else 0.0))


def _slope(readings: list) -> float:
    """The least-squares slope of [(time, value)] (0 when they share one time)."""
    mt = sum(t for t, _ in readings) / len(readings)
    md = sum(d for _, d in readings) / len(readings)
    var = sum((t - mt) ** 2 for t, _ in readings)
    return sum((t - mt) * (d - md) for t, d in readings) / var if var else 0.0


def _peak(pool: str, demand: float, state: PolicyState, now: float, obj: Objectives) -> float:
    """The highest measured demand of the last ``down_stable_s`` (this one included): a pool is sized for
    the bursts it just saw, so capacity for a burst that comes back sooner than that stays, and its type
    is chosen for the burst, not for the lull between (Kubernetes' scale-down stabilization, applied to
    the demand)."""
    return max(d for _, d in _recent(state.peaks.setdefault(pool, []), now, demand, obj.down_stable_s))


def _recent(readings: list, now: float, value: float, span_s: float) -> list:
    """``readings`` ([(time, value)], kept in the policy state) with this one added and those older than
    ``span_s`` dropped."""
    readings.append((now, value))
    while now - readings[0][0] > span_s:
        readings.pop(0)
    return readings


def _value(kind: str, model: dict, catalog: Catalog) -> float:
    """Capacity per unit of cost of an instance type (-1 for one the catalog no longer has): the
    type that gives the least for its price is drained first."""
    if kind not in catalog.types:
        return -1.0
    return model["capacity"].get(kind, 0.0) / max(catalog.get(kind).cost_per_hour, 1e-9)


def _carries(model: dict, mix: dict) -> float:
    return sum(model["capacity"].get(k, 0.0) * n for k, n in mix.items())


def _pick_drains(pool: str, instance_type: str, snapshot: Snapshot) -> list[str]:
    """The workers of ``instance_type`` that are up in ``pool``, the one with the least work first."""
    candidates = [w for w in snapshot.workers if w.pool == pool and w.state == "up" and w.instance_type == instance_type]
    return [w.name for w in sorted(candidates, key=lambda w: (w.running + w.waiting, w.queued_prompt_tokens,
                                                              w.kv_blocks_used, w.name))]


def _rebalance(snapshot: Snapshot, obj: Objectives) -> Action | None:
    """The hottest and coldest decode workers of one instance type, when their KV use is ``rebalance_gap``
    apart (the type with the widest gap). Only within a type: KV use says nothing of speed, and a request
    moved to a slower type's worker could miss its TPOT there."""
    by_type: dict[str, list] = {}
    for w in snapshot.workers:
        if w.pool == "decode" and w.state == "up" and w.kv_blocks_total:
            by_type.setdefault(w.instance_type, []).append(w)
    best = None
    for kind in sorted(by_type):
        hot = max(by_type[kind], key=lambda w: (w.kv_used_fraction, w.name))
        cold = min(by_type[kind], key=lambda w: (w.kv_used_fraction, w.name))
        gap = hot.kv_used_fraction - cold.kv_used_fraction
        count = min(obj.max_migrations, (hot.running - cold.running) // 2)
        if gap >= obj.rebalance_gap and hot.kv_used_fraction >= 0.5 and count >= 1 and (best is None or gap > best[0]):
            best = (gap, Action("migrate", "decode", count=count, worker=hot.name, target=cold.name))
    return best[1] if best else None


def _scale_pool(pool: str, snapshot: Snapshot, target: dict, model: dict, catalog: Catalog, obj: Objectives,
                state: PolicyState, now: float, spend: float, actions: list, reasons: list) -> float:
    """Step 4 of the module docstring for one pool; returns the spend per hour after its adds."""
    ps = snapshot.pool(pool)
    current = ps.instances
    adds = {k: n - current.get(k, 0) for k, n in target.items() if n > current.get(k, 0)}
    over = {k: n - target.get(k, 0) for k, n in current.items() if n > target.get(k, 0)}
    want = f"{pool}: demand {model['demand']:.2f} {model['unit']} wants {target}, has {current}"
    if adds:
        if ps.num_starting and model.get("pressure"):
            reasons.append(f"{pool}: {ps.num_starting} still starting: no more for a pressure they may relieve")
        elif now - state.last_change.get(pool, -1e18) < obj.up_cooldown_s:
            reasons.append(f"{pool}: scaled {now - state.last_change[pool]:.0f}s ago: cooling down")
        else:
            if ps.num_starting:
                reasons.append(f"{pool}: {ps.num_starting} still starting, and the demand needs more than the "
                               f"instances up and starting carry")
            room = obj.limits(pool).max - sum(current.values())
            for k in sorted(adds, key=lambda k: catalog.get(k).cost_per_hour):
                price = catalog.get(k).cost_per_hour
                n = min(adds[k], room)
                if obj.budget_per_hour is not None:
                    n = min(n, int((obj.budget_per_hour - spend + 1e-9) // price) if price else n)
                if n < adds[k]:
                    reasons.append(f"{pool}: budget {obj.budget_per_hour}/h allows {max(n, 0)} of {adds[k]} more {k}")
                if n > 0:
                    reasons.append(want)
                    actions.append(Action("add", pool, k, n))
                    spend, room = spend + n * price, room - n
                    state.last_change[pool] = now
            if any(a.pool == pool for a in actions):
                return spend
    # Down (or the old side of a switch of types, once the new instances are up): after the target stayed
    # below for a start-up time, never leaving less capacity than the demand.
    if not over:
        state.below_since.pop(pool, None)
        return spend
    since = state.below_since.setdefault(pool, now)
    kind = min(over, key=lambda k: (_value(k, model, catalog), k))
    # the target already holds the peak demand of down_stable_s (a second window here would hold
    # capacity twice as long); an instance is kept at least as long as a new one takes to start
    hold = catalog.get(kind).startup_s if kind in catalog.types else 0.0
    if ps.num_starting or (ps.num_draining and pool == "decode"):  # a prefill drain moves nothing: several may run
        reasons.append(f"{pool}: {'instances starting' if ps.num_starting else 'a drain is under way'}: "
                       f"no drain now")
    elif now - since < hold:
        reasons.append(f"{pool}: below target for {now - since:.0f}s of {hold:.0f}s")
    elif now - state.last_change.get(pool, -1e18) < obj.down_cooldown_s:
        reasons.append(f"{pool}: scaled {now - state.last_change[pool]:.0f}s ago: cooling down")
    else:
        cap = model["capacity"]
        left = sum(cap.get(k, 0.0) * n for k, n in current.items())
        # prefill: half of the kind's instances over target (at least one; all of them at zero traffic),
        # each only if the rest carries the demand without it: capacity falls by halves, one cooldown
        # apart, so a surge that comes back soon after the hold still finds some (draining a whole
        # pool's spare at once left one instance for an 8x surge, simulated); decode: one (its requests
        # migrate)
        n = (over[kind] if _idle(snapshot) else -(-over[kind] // 2)) if pool == "prefill" else 1
        workers = _pick_drains(pool, kind, snapshot)[:n]
        for i, worker in enumerate(workers):
            rest = left - cap.get(kind, 0.0)
            if rest < model["demand"] and not _idle(snapshot):  # capacities already hold the headroom
                if i == 0:
                    reasons.append(f"{pool}: draining a {kind} would leave {rest:.2f} {model['unit']} for a "
                                   f"demand of {model['demand']:.2f}: the new instances first")
                break
            left = rest
            reasons.append(f"{want}: drain {worker}")
            actions.append(Action("drain", pool, kind, 1, worker=worker))
            state.last_change[pool] = now  # below_since stays: the next drain waits the cooldown only
    return spend


def decide(snapshot: Snapshot | None, catalog: Catalog, objectives: Objectives, state: PolicyState,
           now: float | None = None) -> Decision:
    """One tick: see the module docstring. ``now`` defaults to the snapshot's time."""
    state.seq += 1
    did = f"decision-{state.seq}"
    if snapshot is None:
        return Decision(did, now or 0.0, reasons=("no snapshot: no action",))
    now = snapshot.time if now is None else now
    if now - snapshot.time > objectives.stale_s:
        return Decision(did, now, reasons=(f"snapshot is {now - snapshot.time:.0f}s old: no action",))
    missing = [p for p in POOLS if snapshot.pool(p).num_up == 0]
    if missing:
        return Decision(did, now, reasons=(f"no worker up in {', '.join(missing)}: no action",))

    reasons: list[str] = []
    shape = _shape(snapshot, objectives, state)
    models = {"prefill": _prefill_model(snapshot, catalog, objectives, shape),
              "decode": _decode_model(snapshot, catalog, objectives, shape)}
    for p, model in models.items():  # plan for the demand when a new instance would be up
        growth = _growth(p, model["demand"], state, now, objectives)
        horizon = max((t.startup_s for t in catalog.for_pool(p)), default=0.0)
        model["measured"], model["demand"] = model["demand"], model["demand"] + growth * horizon
        if growth * horizon > 0.05 * model["measured"]:
            reasons.append(f"{p}: demand grows {growth:.3g} {model['unit']} per s: planned for "
                           f"{model['demand']:.2f} in {horizon:.0f}s")
        peak = max(model["demand"], _peak(p, model["measured"], state, now, objectives))
        if peak > 1.05 * model["demand"]:
            reasons.append(f"{p}: sized for the peak demand of the last {objectives.down_stable_s:.0f}s "
                           f"({peak:.2f} {model['unit']})")
        model["demand"] = peak
    # when each pool's starting instances came up, or a decode drain ended: misses measured before are stale
    # (a decode drain's migrations pause the requests they move: a TPOT spike, not too little capacity; a
    # prefill drain moves nothing)
    for p in POOLS:
        if snapshot.pool(p).num_starting or (p == "decode" and snapshot.pool(p).num_draining):
            state.settled_at[p] = None
        elif p in state.settled_at and state.settled_at[p] is None:
            state.settled_at[p] = now
    targets = {p: _target(p, snapshot, models[p], catalog, objectives, state, now, reasons) for p in POOLS}

    actions: list[Action] = []
    spend = sum(catalog.get(w.instance_type).cost_per_hour for w in snapshot.workers
                if w.state in ("up", "starting", "draining") and w.instance_type in catalog.types)
    for pool in POOLS:
        spend = _scale_pool(pool, snapshot, targets[pool], models[pool], catalog, objectives, state, now, spend,
                            actions, reasons)
    if not any(a.pool == "decode" for a in actions):
        move = _rebalance(snapshot, objectives)
        if move is not None:
            actions.append(move)
            reasons.append(f"decode: {move.worker} is hot: {move.count} requests to {move.target}")
    return Decision(did, now, tuple(actions), targets, tuple(reasons), models)
