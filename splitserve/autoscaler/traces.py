"""Arrival traces for the simulator (``sim.py``): lists of (arrival s, prompt tokens, output tokens),
sorted by arrival. Pure Python and seeded, so every system in a comparison sees the same requests.

    poisson    a constant rate
    gamma      bursty at the scale of seconds: gamma-distributed gaps with a coefficient of variation
    mmpp       bursts that last minutes: the rate switches between two levels (a two-state MMPP)
    diurnal    a rate that swings between a low and a high over a period (thinned Poisson)
    replay     the requests of a ``splitserve bench`` JSON, at their send times

Lengths are an int or ("lognormal", median, sigma, lo, hi).
"""

from __future__ import annotations

import json
import math
import random


def _lengths(spec, rng: random.Random) -> int:
    """An int, or ("lognormal", median, sigma, lo, hi)."""
    if isinstance(spec, int):
        return spec
    _, median, sigma, lo, hi = spec
    return int(min(hi, max(lo, round(rng.lognormvariate(math.log(median), sigma)))))


def _trace(gaps, duration_s: float, prompt, output, rng: random.Random) -> list[tuple]:
    out, t = [], 0.0
    while True:
        t += gaps(t)
        if t >= duration_s:
            return out
        out.append((t, _lengths(prompt, rng), _lengths(output, rng)))


def poisson(rate: float, duration_s: float, prompt=256, output=128, seed: int = 0) -> list[tuple]:
    rng = random.Random(seed)
    return _trace(lambda t: rng.expovariate(rate), duration_s, prompt, output, rng)


def gamma(rate: float, duration_s: float, cv: float = 3.0, prompt=256, output=128, seed: int = 0) -> list[tuple]:
    """Bursty arrivals: gamma-distributed gaps with mean 1/rate and coefficient of variation ``cv``."""
    rng = random.Random(seed)
    shape = 1.0 / (cv * cv)
    return _trace(lambda t: rng.gammavariate(shape, 1.0 / (rate * shape)), duration_s, prompt, output, rng)


def mmpp(low: float, high: float, mean_low_s: float, mean_high_s: float, duration_s: float, prompt=256,
         output=128, seed: int = 0) -> list[tuple]:
    """Bursts that last minutes: Poisson arrivals whose rate switches between ``low`` and ``high``,
    each period exponentially long (means ``mean_low_s`` / ``mean_high_s``): a two-state MMPP."""
    rng = random.Random(seed)
    out, t, high_now = [], 0.0, False
    while t < duration_s:
        end = min(duration_s, t + rng.expovariate(1.0 / (mean_high_s if high_now else mean_low_s)))
        rate = high if high_now else low
        while True:
            t += rng.expovariate(rate)
            if t >= end:
                break
            out.append((t, _lengths(prompt, rng), _lengths(output, rng)))
        t, high_now = end, not high_now
    return out


def diurnal(low: float, high: float, period_s: float, duration_s: float, prompt=256, output=128,
            seed: int = 0, low_at_s: float = 0.0) -> list[tuple]:
    """A rate that swings between ``low`` (at ``low_at_s``, and a period apart) and ``high`` over
    ``period_s`` (thinned Poisson)."""
    rng = random.Random(seed)
    out, t = [], 0.0
    while t < duration_s:
        t += rng.expovariate(high)
        rate = low + (high - low) * (1 - math.cos(2 * math.pi * (t - low_at_s) / period_s)) / 2
        if t < duration_s and rng.random() < rate / high:
            out.append((t, _lengths(prompt, rng), _lengths(output, rng)))
    return out


def replay(bench_json: str) -> list[tuple]:
    """The requests of a ``splitserve bench`` result, at their send times (from the first)."""
    with open(bench_json) as f:
        records = json.load(f)["records"]
    t0 = min(r["send"] for r in records)
    return sorted((r["send"] - t0, r["prompt_tokens"], max(1, r["output_tokens"])) for r in records)
