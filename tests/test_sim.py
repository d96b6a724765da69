"""The cluster simulator: exact on cases worked by hand, conserving, and driving the real policy."""

import json
import statistics

import pytest

from splitserve.autoscaler.catalog import Catalog, InstanceType, LinearModel, PrefillModel, StepModel
from splitserve.autoscaler.decision import Objectives
from splitserve.autoscaler.sim import Simulation
from splitserve.autoscaler.traces import diurnal, gamma, mmpp, poisson, replay

CPU = InstanceType("cpu", 0.10, PrefillModel(0.02, 0.001), StepModel(0.02, 0.002, 1e-6), kv_tokens=20000,
                   max_batch=64, startup_s=30)
CATALOG = Catalog([CPU])
TRANSFER = LinearModel(0.005, 1e-5)
ONE = {"prefill": {"cpu": 1}, "decode": {"cpu": 1}}


def test_one_request_follows_the_models_exactly():
    r = Simulation(CATALOG, ONE, transfer=TRANSFER).run([(1.0, 200, 5)])
    (req,) = r.requests
    prefill = 0.02 + 0.001 * 200  # one step: the whole prompt
    assert req.first_token - req.arrival == pytest.approx(prefill + 0.005 + 1e-5 * 200)
    steps = [0.02 + 0.002 + 1e-6 * (200 + k) for k in range(1, 5)]  # 4 decode steps, context grows
    assert req.done - req.first_token == pytest.approx(sum(steps))
    assert req.tpot == pytest.approx(sum(steps) / 4)
    assert r.cost == pytest.approx(2 * 0.10 * r.duration_s / 3600)


def test_prompts_queue_and_share_steps_by_the_token_budget_of_their_type():
    # A starts alone; B and C queue behind it and share the next steps (the type's step_tokens: 512):
    # 400 + 112, then C's last 288
    trace = [(0.0, 400, 2), (0.1, 400, 2), (0.1, 400, 2)]
    r = Simulation(CATALOG, ONE, transfer=LinearModel(0.0, 0.0)).run(trace)
    a, b, c = r.requests
    step = [0.02 + 0.001 * 400, 0.02 + 0.001 * 512, 0.02 + 0.001 * 288]
    assert a.first_token == pytest.approx(step[0])
    assert b.first_token == pytest.approx(step[0] + step[1])
    assert c.first_token == pytest.approx(step[0] + step[1] + step[2])
    assert c.prefill_start == pytest.approx(step[0])  # queued from 0.1 until the first step ended
    assert r.summary(10, 10)["failed"] == 0


def test_a_warm_up_is_served_but_neither_counted_nor_paid_for():
    trace = [(float(t), 100, 3) for t in range(0, 200, 2)]
    full = Simulation(CATALOG, ONE, transfer=TRANSFER).run(trace)
    warmed = Simulation(CATALOG, ONE, transfer=TRANSFER).run(trace, measure_from=100.0)
    assert [r.arrival for r in warmed.requests] == [t for t, *_ in trace if t >= 100]
    assert warmed.duration_s == pytest.approx(full.duration_s - 100)
    assert warmed.cost == pytest.approx(2 * 0.10 * warmed.duration_s / 3600)  # both instances, from t=100 only
    assert all(t >= 100 for t, *_ in warmed.timeline)


def test_prompts_go_where_they_are_done_first_in_a_pool_of_mixed_speeds():
    # a 10x faster prefill type beside the slow one: the router's measured speeds send it nearly every prompt,
    # though its queue is often longer; a prompt on the slow one (0.22 s of prefill) misses a TTFT of 0.2 s
    fast = InstanceType("fast", 1.0, PrefillModel(0.002, 0.0001), StepModel(0.02, 0.002, 1e-6), kv_tokens=20000,
                        max_batch=64, startup_s=30)
    mixed = {"prefill": {"cpu": 1, "fast": 1}, "decode": {"cpu": 2}}
    trace = poisson(8.0, 120, prompt=200, output=2, seed=5)  # 8/s x 0.22 s = 1.8x what the slow one takes
    r = Simulation(Catalog([CPU, fast]), mixed, transfer=TRANSFER).run(trace)
    s = r.summary(0.2, 10)
    assert s["failed"] == 0 and s["attainment"] > 0.9
    by_fast = sum(1 for q in r.requests if q.first_token - q.prefill_start < 0.1)  # computed on the fast one
    assert by_fast > 0.9 * len(trace)


def test_traces_have_the_rates_and_burstiness_asked_for(tmp_path):
    p = poisson(2.0, 2000, seed=3)
    assert len(p) == pytest.approx(4000, rel=0.05)
    g = gamma(2.0, 4000, cv=3.0, seed=3)
    gaps = [b[0] - a[0] for a, b in zip(g, g[1:])]
    assert statistics.mean(gaps) == pytest.approx(0.5, rel=0.1)
    assert statistics.stdev(gaps) / statistics.mean(gaps) == pytest.approx(3.0, rel=0.15)
    d = diurnal(0.5, 4.5, 1000, 1000, seed=3)
    first, middle = [t for t, *_ in d if t < 100], [t for t, *_ in d if 450 <= t < 550]
    assert len(middle) > 4 * len(first)  # the peak is in the middle of the period
    m = mmpp(1.0, 10.0, 100, 100, 4000, seed=3)  # minutes-long states: 10-s counts near 10 or near 100
    counts = [sum(1 for t, *_ in m if k * 10 <= t < k * 10 + 10) for k in range(400)]
    assert sum(c <= 25 for c in counts) > 100 and sum(c >= 70 for c in counts) > 100
    assert len(m) == pytest.approx(4000 * 5.5, rel=0.25)
    bench = {"records": [{"send": 10.0 + i, "prompt_tokens": 100 + i, "output_tokens": 8} for i in range(3)]}
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(bench))
    assert replay(str(path)) == [(0.0, 100, 8), (1.0, 101, 8), (2.0, 102, 8)]


def test_the_autoscaler_follows_a_load_step_and_drains_back():
    obj = Objectives(ttft_s=2.0, tpot_s=0.08, prefill={"min": 1, "max": 8}, decode={"min": 1, "max": 8},
                     up_cooldown_s=10, down_cooldown_s=20, down_stable_s=30)
    # 200 s at 0.5 req/s, 200 s at 6 req/s, 300 s at 0.5 req/s
    trace = poisson(0.5, 200, prompt=300, output=100, seed=1)
    trace += [(t + 200, p, o) for t, p, o in poisson(6.0, 200, prompt=300, output=100, seed=2)]
    trace += [(t + 400, p, o) for t, p, o in poisson(0.5, 300, prompt=300, output=100, seed=3)]
    sim = Simulation(CATALOG, ONE, objectives=obj, transfer=TRANSFER, period_s=5)
    result = sim.run(trace)
    assert result.summary(2.0, 0.08)["failed"] == 0
    peak = max(sum(c["decode"].values()) for t, c, _ in result.timeline if 200 <= t < 400)
    assert peak >= 3 and max(sum(c["prefill"].values()) for t, c, _ in result.timeline) >= 2
    end = [c for t, c, _ in result.timeline if t > 650]
    assert end and sum(end[-1]["decode"].values()) < peak  # drained back as the load fell
    kinds = {a.kind for d in result.decisions for a in d.actions}
    assert {"add", "drain"} <= kinds
    # the static single pair is worse under the step
    static = Simulation(CATALOG, ONE, transfer=TRANSFER).run(trace).summary(2.0, 0.08)
    assert result.summary(2.0, 0.08)["attainment"] > static["attainment"] + 0.2


def test_a_shared_host_slows_each_pool_while_the_other_works():
    # A decodes 40 tokens; B's 2000-token prompt arrives meanwhile and keeps the prefill instance busy
    trace = [(0.0, 100, 40), (0.5, 2000, 2)]
    alone = Simulation(CATALOG, ONE, transfer=TRANSFER).run(trace).requests
    shared = Simulation(CATALOG, ONE, transfer=TRANSFER, shared_host=1.0).run(trace).requests
    assert shared[0].tpot > alone[0].tpot * 1.2  # A's steps during B's prefill took twice as long
    assert shared[1].first_token - shared[1].arrival > alone[1].first_token - alone[1].arrival  # and B's prefill
    quiet = [(0.0, 100, 40)]  # nothing overlaps: no difference
    assert Simulation(CATALOG, ONE, transfer=TRANSFER, shared_host=1.0).run(quiet).requests[0].tpot == \
        pytest.approx(Simulation(CATALOG, ONE, transfer=TRANSFER).run(quiet).requests[0].tpot)
    # per pool: only decode slows down; B's prefill takes what it takes alone
    decode_only = Simulation(CATALOG, ONE, transfer=TRANSFER, shared_host={"decode": 1.0}).run(trace).requests
    assert decode_only[0].tpot == pytest.approx(shared[0].tpot)
    assert decode_only[1].first_token - decode_only[1].arrival == \
        pytest.approx(alone[1].first_token - alone[1].arrival)


def test_the_serving_paths_latency_adds_to_every_ttft_and_counts_against_its_objective():
    trace = [(float(t), 100, 5) for t in range(10)]
    plain = Simulation(CATALOG, ONE, transfer=TRANSFER).run(trace).summary(0.2, 1.0)
    late = Simulation(CATALOG, ONE, transfer=TRANSFER, ttft_overhead_s=0.1).run(trace).summary(0.2, 1.0)
    assert late["ttft_p50"] == pytest.approx(plain["ttft_p50"] + 0.1)
    assert late["tpot_p90"] == pytest.approx(plain["tpot_p90"])
    assert plain["ttft_p90"] < 0.2 < plain["ttft_p90"] + 0.1  # every request meets 0.2 s without it, none with it
    assert (plain["attainment"], late["attainment"]) == (1.0, 0.0)


def test_decode_room_reads_as_taken_when_reserved_so_kv_pressure_adds_an_instance_before_requests_wait():
    # Each request reserves its whole output (112 + 400 tokens): 4 fill a 2,048-token decode instance while
    # they hold ~1,100 tokens between them; the 5th waits for room. The policy must read the instance as
    # full (what admission sees), not as half empty (what the requests hold so far).
    small = InstanceType("small", 0.10, PrefillModel(0.02, 0.001), StepModel(0.02, 0.002, 1e-6), kv_tokens=2048,
                         max_batch=64, startup_s=30)
    obj = Objectives(ttft_s=2.0, tpot_s=0.08, prefill={"min": 1, "max": 1}, decode={"min": 1, "max": 2})
    trace = [(0.1 * i, 112, 400) for i in range(5)]
    sim = Simulation(Catalog([small]), {"prefill": {"small": 1}, "decode": {"small": 1}}, objectives=obj,
                     transfer=TRANSFER, period_s=5)
    result = sim.run(trace)
    first = result.decisions[0]  # at 5 s: ~170 of 400 tokens decoded (28 ms steps), the 5th still waiting
    assert any("KV use 100%" in r for r in first.reasons), first.reasons
    assert [(a.kind, a.pool) for a in first.actions] == [("add", "decode")]
    assert result.summary(100.0, 1.0)["failed"] == 0


def test_requests_not_started_or_placed_by_the_routers_deadline_are_refused_and_hold_nothing():
    # 40 prompts of 2,000 tokens at once: FCFS steps of 512 tokens start one every ~2.1 s, so 5 start within
    # a 10 s deadline; the rest are refused (the router's NoCapacityError), not served minutes late
    burst = [(0.001 * i, 2000, 2) for i in range(40)]
    sim = Simulation(CATALOG, ONE, transfer=TRANSFER, max_wait_s=10.0)
    late = sim.run(burst)
    assert [r.refused for r in late.requests] == [None] * 5 + ["refused"] * 35
    # the router's speed figures hold no request: one left counted would add the idle time after it to
    # the worker's busy time, and the router would take it for slow and starve it
    assert not any(sim.speeds._out.values())
    s = late.summary(100.0, 1.0)
    assert (s["completed"], s["refused"], s["failed"]) == (5, 35, 35)
    patient = Simulation(CATALOG, ONE, transfer=TRANSFER, max_wait_s=None).run(burst).summary(100.0, 1.0)
    assert (patient["completed"], patient["refused"]) == (40, 0)
    # decode room: one request at a time fits (each reserves 500 of 600 tokens for ~9 s); the others wait
    # for room past the deadline and are refused
    tight = InstanceType("tight", 0.10, PrefillModel(0.02, 0.001), StepModel(0.02, 0.002, 1e-6), kv_tokens=600,
                         max_batch=64)
    r = Simulation(Catalog([tight]), {"prefill": {"tight": 1}, "decode": {"tight": 1}}, transfer=TRANSFER,
                   max_wait_s=5.0).run([(0.001 * i, 100, 400) for i in range(3)])
    assert [q.refused for q in r.requests] == [None, "refused_decode", "refused_decode"]
    assert r.requests[0].done is not None and r.summary(100.0, 1.0)["failed"] == 2
    # no prefill instance up at all: the router's wait ends the same way
    none = Simulation(CATALOG, {"prefill": {}, "decode": {"cpu": 1}}, transfer=TRANSFER, max_wait_s=5.0)
    assert [q.refused for q in none.run([(0.0, 100, 5), (1.0, 100, 5)]).requests] == ["refused"] * 2
