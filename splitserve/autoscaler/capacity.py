"""How much load one instance of a type carries within the objectives, and the cheapest mix for a demand.

Pure Python. The policy (``policy.py``) turns a snapshot into a demand per
pool, then asks this module how many instances of which types meet it:

    prefill   demand = arrivals/s. One instance is a queue with service time
              s(L) = the type's prefill model at the mean prompt length L
              under load: its engine fills each step with up to step_tokens
              prompt tokens, so a prompt pays a share L / step_tokens of a
              step's fixed cost a (times a correction measured on the
              server). Its TTFT at percentile p is a p-th percentile prompt
              alone plus the M/M/1 waiting-time quantile
              w_p = ln(rho / (1 - p)) / (mu - lam) (0 when rho <= 1 - p).
              Capacity = the largest lam with TTFT_p <= objective.
    decode    demand = output tokens/s. One instance runs a batch of b
              requests of mean context C; each step takes step(b, b*C) and
              gives every request one token. B = the largest b with step <=
              TPOT objective, b <= max_batch and b*C <= its KV capacity; the
              batch varies (about Poisson), so capacity = m / step(m, m*C) at
              the mean m whose percentile (m + z*sqrt(m)) is B.

Summing per-instance capacities is conservative (a pooled queue does better
than separate ones); the headroom in the objectives covers the rest.
"""

from __future__ import annotations

import math

from splitserve.autoscaler.catalog import InstanceType


def prefill_capacity(t: InstanceType, prompt_mean: float, prompt_p: float, ttft_s: float, p: float,
                     correction: float = 1.0) -> float:
    """Arrivals/s one instance of ``t`` takes with TTFT at percentile ``p`` (0..1) within ``ttft_s``."""
    m = t.prefill
    mean = max(prompt_mean, 1.0)
    service = correction * (m.a * mean / t.step_tokens + m.b * mean + m.c * mean * mean)  # a share of each step
    budget = ttft_s - correction * t.prefill.seconds(max(prompt_p, 1.0))
    if service <= 0 or budget <= 0:
        return 0.0
    mu = 1.0 / service

    def wait_quantile(lam: float) -> float:
        rho = lam / mu
        if rho <= 1.0 - p:
            return 0.0
        return math.log(rho / (1.0 - p)) / (mu - lam)

    lo, hi = 0.0, mu * (1.0 - 1e-9)
    if wait_quantile(hi) <= budget:
        return hi
    for _ in range(60):  # bisection: the waiting quantile grows with lam
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if wait_quantile(mid) <= budget else (lo, mid)
    return lo


Z = {0.5: 0.0, 0.9: 1.2816, 0.99: 2.3263}  # standard normal quantiles


def decode_capacity(t: InstanceType, context: float, tpot_s: float, correction: float = 1.0,
                    kv_headroom: float = 0.9, p: float = 0.5) -> tuple[int, float]:
    """(batch, output tokens/s) of one instance of ``t`` at the largest batch meeting ``tpot_s``;
    (0, 0.0) when not even one request does. The batch of a loaded instance varies (about Poisson):
    with ``p`` > 0.5 the capacity is taken at the mean batch whose ``p``-th percentile
    (mean + z*sqrt(mean)) is the largest batch meeting the objective."""
    context = max(context, 1.0)
    best = (0, 0.0)
    for b in range(1, t.max_batch + 1):
        step = correction * t.decode(b, b * context)
        if step > tpot_s or b * context > t.kv_tokens * kv_headroom:
            break
        best = (b, b / step if step > 0 else float("inf"))
    z = Z.get(p, 0.0)
    if best[0] and z:
        b_high = best[0]
        mean = (math.sqrt(z * z + 4 * b_high) - z) ** 2 / 4  # mean + z*sqrt(mean) = b_high
        step = correction * t.decode(mean, mean * context)
        best = (b_high, mean / step if step > 0 else float("inf"))
    return best


def cheapest_mix(capacity: dict[str, float], cost: dict[str, float], demand: float, min_n: int, max_n: int,
                 current: dict[str, int] | None = None, upper: dict[str, int] | None = None) -> dict[str, int] | None:
    """The counts per type (at most ``max_n`` in all, at least ``min_n``; at most ``upper[type]`` of a
    type when ``upper`` is given) whose capacities sum to at least ``demand`` at the lowest cost per
    hour; ties go to the mix closest to ``current``, then to fewer instances. None when no such mix
    carries the demand."""
    current = current or {}
    names = sorted(n for n in capacity if (capacity[n] > 0 or demand <= 0) and (upper is None or upper.get(n, 0) > 0))
    if not names:
        return None
    best, best_key = None, None

    def visit(i: int, counts: dict[str, int], left: int, carried: float):
        nonlocal best, best_key
        if i == len(names) - 1:
            name = names[i]
            need = 0 if carried >= demand else math.ceil((demand - carried) / capacity[name] - 1e-9)
            total = sum(counts.values())
            n = max(need, min_n - total, 0)
            if n > left or (upper is not None and n > upper[name]):
                return
            mix = {**counts, name: n}
            mix = {k: v for k, v in mix.items() if v}
            changes = sum(abs(mix.get(k, 0) - current.get(k, 0)) for k in set(mix) | set(current))
            key = (round(sum(cost[k] * v for k, v in mix.items()), 9), changes, sum(mix.values()))
            if best_key is None or key < best_key:
                best, best_key = mix, key
            return
        for n in range(min(left, upper[names[i]]) + 1 if upper is not None else left + 1):
            visit(i + 1, {**counts, names[i]: n}, left - n, carried + n * capacity[names[i]])
            if carried + n * capacity[names[i]] >= demand and sum(counts.values()) + n >= min_n:
                break  # more of this type only costs more

    visit(0, {}, max_n, 0.0)
    return best
