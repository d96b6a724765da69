"""Steps 4 and 5 of the policy (``policy.py``): from the targets to actions.

Pure Python, like the policy; ``policy.decide`` calls ``scale_pool`` for each pool, then ``rebalance``.

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

A drain is only asked for here; the actuator (``actuators.py``, ``kuberay.py``) stops the worker
taking requests, migrates its running ones away and removes it once it is empty.
"""

from __future__ import annotations

from splitserve.autoscaler.catalog import Catalog
from splitserve.autoscaler.decision import Action, Objectives, PolicyState
from splitserve.autoscaler.signals import Snapshot


def value(kind: str, model: dict, catalog: Catalog) -> float:
    """Capacity per unit of cost of an instance type (-1 for one the catalog no longer has): the
    type that gives the least for its price is drained first."""
    if kind not in catalog.types:
        return -1.0
    return model["capacity"].get(kind, 0.0) / max(catalog.get(kind).cost_per_hour, 1e-9)


def carries(model: dict, mix: dict) -> float:
    """What a mix of instance types carries of the pool's demand (its unit), by the model's capacities."""
    return sum(model["capacity"].get(k, 0.0) * n for k, n in mix.items())


def _pick_drains(pool: str, instance_type: str, snapshot: Snapshot) -> list[str]:
    """The workers of ``instance_type`` that are up in ``pool``, the one with the least work first."""
    candidates = [w for w in snapshot.workers if w.pool == pool and w.state == "up" and w.instance_type == instance_type]
    return [w.name for w in sorted(candidates, key=lambda w: (w.running + w.waiting, w.queued_prompt_tokens,
                                                              w.kv_blocks_used, w.name))]


def rebalance(snapshot: Snapshot, obj: Objectives) -> Action | None:
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


def scale_pool(pool: str, snapshot: Snapshot, target: dict, model: dict, catalog: Catalog, obj: Objectives,
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
    kind = min(over, key=lambda k: (value(k, model, catalog), k))
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
        left = carries(model, current)
        # prefill: half of the kind's instances over target (at least one; all of them at zero traffic),
        # each only if the rest carries the demand without it: capacity falls by halves, one cooldown
        # apart, so a surge that comes back soon after the hold still finds some (draining a whole
        # pool's spare at once left one instance for an 8x surge, simulated); decode: one (its requests
        # migrate)
        n = (over[kind] if snapshot.idle else -(-over[kind] // 2)) if pool == "prefill" else 1
        workers = _pick_drains(pool, kind, snapshot)[:n]
        for i, worker in enumerate(workers):
            rest = left - cap.get(kind, 0.0)
            if rest < model["demand"] and not snapshot.idle:  # capacities already hold the headroom
                if i == 0:
                    reasons.append(f"{pool}: draining a {kind} would leave {rest:.2f} {model['unit']} for a "
                                   f"demand of {model['demand']:.2f}: the new instances first")
                break
            left = rest
            reasons.append(f"{want}: drain {worker}")
            actions.append(Action("drain", pool, kind, 1, worker=worker))
            state.last_change[pool] = now  # below_since stays: the next drain waits the cooldown only
    return spend
