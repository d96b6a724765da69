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
    4. act, 5. rebalance            ``scaling.py``: add what is missing within the cooldown and the
                                    budget; drain what is over target once the target stayed below;
                                    move requests from a hot decode worker to a cold one

No data (no snapshot, a stale one, a pool with no workers answering) means
no action, never a guess. ``state`` (:class:`PolicyState`) carries the
cooldowns, the hysteresis clock and the decision counter between calls.
"""

from __future__ import annotations

from splitserve.autoscaler.capacity import cheapest_mix, decode_capacity, prefill_capacity
from splitserve.autoscaler.catalog import Catalog
from splitserve.autoscaler.decision import Action, Decision, Objectives, PolicyState, PoolLimits
from splitserve.autoscaler.scaling import carries, rebalance, scale_pool, value
from splitserve.autoscaler.signals import RECENT_S, PoolSignals, Snapshot

POOLS = ("prefill", "decode")
CORRECTION_RANGE = (0.5, 4.0)


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


def _one_more(model: dict, current: dict, catalog: Catalog) -> dict:
    """The current mix plus one instance of the type with the most capacity per unit of cost."""
    name = max(model["capacity"], key=lambda k: (value(k, model, catalog), k))
    return {**current, name: current.get(name, 0) + 1}


def _target(pool: str, snapshot: Snapshot, model: dict, catalog: Catalog, obj: Objectives, state: PolicyState,
            now: float, reasons: list) -> dict:
    ps, limits = snapshot.pool(pool), obj.limits(pool)
    current = dict(ps.instances)
    cost = {k: catalog.get(k).cost_per_hour for k in model["capacity"]}
    if snapshot.idle:
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
        if carries(model, target) <= carries(model, current) and sum(current.values()) < limits.max:
            target = _one_more(model, current, catalog)
            model["pressure"] = pressure  # the target is more than the demand model asks for
    return target


def _plan(model: dict, cost: dict, current: dict, limits: PoolLimits, obj: Objectives) -> dict | None:
    """The mix to aim for: fewer of what is there when it carries the demand, else what is there plus
    the cheapest addition (for ``add_headroom`` more demand); a different mix altogether only when,
    planned for ``switch_headroom`` more demand, it costs ``switch_saving`` less."""
    cap, demand = model["capacity"], model["demand"]
    known = {k: n for k, n in current.items() if k in cap}
    if carries(model, known) >= demand:
        keep = cheapest_mix(cap, cost, demand, limits.min, limits.max, known, upper=known)
    else:
        more = cheapest_mix(cap, cost, demand * (1 + obj.add_headroom) - carries(model, known), 0,
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


def _recent(readings: list, now: float, reading: float, span_s: float) -> list:
    """``readings`` ([(time, value)], kept in the policy state) with this one added and those older than
    ``span_s`` dropped."""
    readings.append((now, reading))
    while now - readings[0][0] > span_s:
        readings.pop(0)
    return readings




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
        spend = scale_pool(pool, snapshot, targets[pool], models[pool], catalog, objectives, state, now, spend,
                            actions, reasons)
    if not any(a.pool == "decode" for a in actions):
        move = rebalance(snapshot, objectives)
        if move is not None:
            actions.append(move)
            reasons.append(f"decode: {move.worker} is hot: {move.count} requests to {move.target}")
    return Decision(did, now, tuple(actions), targets, tuple(reasons), models)
