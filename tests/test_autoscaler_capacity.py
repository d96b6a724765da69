"""The autoscaler's catalog (YAML, fitted step-time models) and capacity models (per instance type at the
objectives, the cheapest mix of types for a demand)."""

import itertools
import math
import random

import pytest

from autoscaler_types import BIG, CATALOG, SMALL
from splitserve.autoscaler.capacity import cheapest_mix, decode_capacity, prefill_capacity
from splitserve.autoscaler.catalog import Catalog, InstanceType, fit_linear

# -- catalog ---------------------------------------------------------------------------------------

def test_fit_recovers_a_step_model_and_keeps_coefficients_non_negative():
    rows = [(b, b * c) for b in (1, 2, 4, 8, 16, 32) for c in (128, 512, 2048)]
    secs = [0.015 + 0.0004 * b + 2e-6 * kv for b, kv in rows]
    a, b, c = fit_linear(rows, secs)
    assert (a, b, c) == pytest.approx((0.015, 0.0004, 2e-6), rel=1e-6)
    # noise that pulls c below zero: held at 0, the rest refit
    a, b, c = fit_linear([(1, 0), (2, 5), (4, 1), (8, 9)], [0.02, 0.03, 0.05, 0.09])
    assert min(a, b, c) >= 0
    with pytest.raises(ValueError, match="at least 2"):
        fit_linear([(1, 1)], [0.1])


def test_catalog_yaml_round_trip_and_bad_entries(tmp_path):
    path = tmp_path / "catalog.yaml"
    CATALOG.to_yaml(str(path))
    again = Catalog.from_yaml(str(path))
    assert again.get("big") == BIG and [t.name for t in again.for_pool("decode")] == ["small", "big"]
    good = SMALL.to_dict()
    with pytest.raises(ValueError, match="unknown keys.*'speed'"):
        InstanceType.from_dict({**good, "speed": 3})
    with pytest.raises(ValueError, match="coefficient b must be a number >= 0"):
        InstanceType.from_dict({**good, "decode": {"a": 0.01, "b": -1}})
    with pytest.raises(ValueError, match="pools must be a non-empty subset"):
        InstanceType.from_dict({**good, "pools": ["gpu"]})
    with pytest.raises(ValueError, match="declared twice"):
        Catalog([SMALL, SMALL])
    with pytest.raises(KeyError, match="known: \\['big', 'small'\\]"):
        CATALOG.get("huge")


# -- capacity --------------------------------------------------------------------------------------

def test_prefill_capacity_follows_the_queueing_model():
    # under load a 256-token prompt pays half of a 512-token step's fixed cost: service 0.005 + 0.256 =
    # 0.261 s, mu = 3.83/s. A generous objective admits nearly mu, a tight one less, one below the time of
    # the prompt alone (0.266 s) nothing.
    loose = prefill_capacity(SMALL, 256, 256, 30.0, 0.9)
    tight = prefill_capacity(SMALL, 256, 256, 0.6, 0.9)
    assert 3.7 < loose < 1 / 0.261 and 0 < tight < loose
    assert prefill_capacity(SMALL, 256, 256, 0.2, 0.9) == 0.0
    # at the capacity found, the prompt alone plus the M/M/1 waiting quantile is the objective
    mu, lam = 1 / 0.261, tight
    assert 0.266 + math.log((lam / mu) / 0.1) / (mu - lam) == pytest.approx(0.6, rel=1e-6)
    assert prefill_capacity(SMALL, 256, 256, 0.6, 0.9, correction=2.0) < tight
    # an engine whose steps take one such prompt pays the whole fixed cost per prompt: less capacity
    one = InstanceType.from_dict({**SMALL.to_dict(), "step_tokens": 256})
    assert 1 / 0.266 * 0.97 < prefill_capacity(one, 256, 256, 30.0, 0.9) < 1 / 0.266


def test_decode_capacity_is_the_largest_batch_within_the_objective():
    b, rate = decode_capacity(SMALL, 384, 0.05)
    step = SMALL.decode(b, b * 384)
    assert 1 < b < SMALL.max_batch and step <= 0.05 < SMALL.decode(b + 1, (b + 1) * 384)
    assert rate == pytest.approx(b / step)
    assert decode_capacity(SMALL, 384, 0.01) == (0, 0.0)
    assert decode_capacity(SMALL, 30000, 10.0)[0] == 0  # not one request fits 90% of its KV
    assert decode_capacity(SMALL, 384, 10.0)[0] == SMALL.max_batch


def test_cheapest_mix_matches_brute_force():
    rng = random.Random(0)
    for _ in range(300):
        names = ["a", "b", "c"][: rng.randint(1, 3)]
        cap = {n: rng.choice([0.0, rng.uniform(0.5, 5)]) for n in names}
        cost = {n: rng.uniform(0.1, 1) for n in names}
        demand, lo, hi = rng.uniform(0, 15), rng.randint(1, 2), rng.randint(2, 6)
        upper = rng.choice([None, {n: rng.randint(0, 3) for n in names}])  # at most this many of a type
        got = cheapest_mix(cap, cost, demand, lo, hi, upper=upper)
        feasible = [dict(zip(names, c)) for c in itertools.product(range(hi + 1), repeat=len(names))
                    if lo <= sum(c) <= hi and sum(cap[n] * k for n, k in zip(names, c)) >= demand
                    and (upper is None or all(k <= upper[n] for n, k in zip(names, c)))
                    and all(cap[n] > 0 for n, k in zip(names, c) if k)]  # a type that can't meet it: never used
        if not feasible:
            assert got is None
            continue
        best = min(sum(cost[n] * k for n, k in f.items()) for f in feasible)
        assert got is not None and lo <= sum(got.values()) <= hi
        assert sum(cap[n] * k for n, k in got.items()) >= demand - 1e-9
        assert sum(cost[n] * k for n, k in got.items()) == pytest.approx(best)



def test_decode_capacity_leaves_room_for_the_batch_to_vary():
    b, mean_rate = decode_capacity(SMALL, 320, 0.08, p=0.5)
    b90, rate90 = decode_capacity(SMALL, 320, 0.08, p=0.9)
    assert b == b90 and rate90 < mean_rate
    # the mean batch m behind rate90 has its P90 (m + 1.28 sqrt(m)) at the largest batch within the objective
    m = next(x / 1000 for x in range(1000, b * 1000) if abs(x / 1000 / SMALL.decode(x / 1000, x / 1000 * 320)
                                                          - rate90) < 0.05)
    assert m + 1.2816 * math.sqrt(m) == pytest.approx(b, abs=0.01)
