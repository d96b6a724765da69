"""The metric recorders' logic (outcomes, per-token gaps, counters from cumulative stats) with
stand-in metric objects, and the Grafana dashboard against the metrics the code defines. The
export through Ray's Prometheus endpoint is checked end to end in test_serving_e2e.py."""

import asyncio
import json
import os
import re
from dataclasses import replace

import pytest

from splitserve.engine.output import RequestOutput
from splitserve.errors import NoCapacityError
from splitserve.platform.metrics import RequestMetrics, WorkerMetrics
from splitserve.stats import DecodeStats, EngineStats, SpecStats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Recorded:
    """Stands in for a ray.util.metrics object: remembers every call."""

    def __init__(self):
        self.calls = []

    def inc(self, value, tags):
        self.calls.append(("inc", value, tags))

    def observe(self, value, tags):
        self.calls.append(("observe", value, tags))

    def set(self, value, tags):
        self.calls.append(("set", value, tags))

    def values(self, kind="observe"):
        return [v for k, v, _ in self.calls if k == kind]


def recorder(cls, *args):
    m = cls(*args)  # Ray is not up: every metric is None ...
    for name, v in vars(m).items():  # ... and is replaced by a stand-in
        if v is None:
            setattr(m, name, Recorded())
    return m


async def deltas(items, fail=None):
    for i, (n_tokens, finished, reason, pause) in enumerate(items):
        await asyncio.sleep(pause)
        yield RequestOutput("r", [7] * n_tokens, "", finished, reason, 5, 0)
    if fail is not None:
        raise fail


def consume(m, stream, stop_after=None):
    async def run():
        gen = m.observe("smol", 5, stream)
        got = 0
        async for _ in gen:
            got += 1
            if stop_after is not None and got == stop_after:
                await gen.aclose()
                break
    asyncio.run(run())


def test_request_outcomes_tokens_and_per_token_gaps():
    m = recorder(RequestMetrics)
    # one token, then a delta of 3 tokens 0.06 s later (three gaps of ~0.02 s), then the last token
    consume(m, deltas([(1, False, None, 0.0), (3, False, None, 0.06), (1, True, "length", 0.01)]))
    assert m.requests.calls == [("inc", 1, {"model": "smol", "outcome": "ok", "code": ""})]
    assert m.output_tokens.values("inc") == [5] and m.prompt_tokens.values("inc") == [5]
    itl = m.itl.values()
    assert len(itl) == 4 and all(0.015 < g < 0.05 for g in itl[:3])
    assert len(m.ttft.values()) == len(m.latency.values()) == len(m.tpot.values()) == 1
    assert m.tpot.values()[0] == pytest.approx(sum(itl) / 4, rel=0.01)
    assert [v for k, v, _ in m.in_flight.calls] == [1, 0]
    # an error raised mid-stream: labelled with its gRPC status; an output that carries an error too
    with pytest.raises(NoCapacityError):
        consume(m, deltas([(1, False, None, 0.0)], fail=NoCapacityError("no room")))
    consume(m, deltas([(0, True, "error", 0.0)]))
    # the consumer leaves early: cancelled
    consume(m, deltas([(1, False, None, 0.0), (1, False, None, 0.0), (1, True, "stop", 0.0)]), stop_after=1)
    outcomes = [(t["outcome"], t["code"]) for _, _, t in m.requests.calls]
    assert outcomes == [("ok", ""), ("error", "RESOURCE_EXHAUSTED"), ("error", "INTERNAL"), ("cancelled", "")]


def test_worker_counters_grow_by_what_the_cumulative_stats_grew():
    w = recorder(WorkerMetrics, "decode", "decode-0")
    for k in w.gauges:
        w.gauges[k] = Recorded()
    for k in w.counters:
        w.counters[k] = Recorded()
    engine = EngineStats(num_waiting=1, num_running=3, num_kv_blocks=100, num_free_kv_blocks=60, num_cached_kv_blocks=7,
                         num_held=2, num_reserved=5, num_pinned=0, max_model_len=2048, num_held_blocks=3,
                         num_reserved_blocks=9, num_preemptions=4,
                         prefix_queried_tokens=90, prefix_hit_tokens=64, spec=SpecStats(proposed=10, accepted=6))
    stats = DecodeStats("decode-0", 1, engine, address="127.0.0.1:1", draining=False, kv_bytes_received=0,
                        transfers_committed=0, transfers_failed=0, kv_bytes_sent=0, migrated_out=1, migrations_failed=0,
                        dropped_after_abort=0, unclaimed_aborted=0)
    w.update(stats)
    w.update(replace(stats, engine=replace(engine, num_preemptions=6), migrated_out=3, migrations_failed=1))
    assert w.counters["preemptions"].values("inc") == [4, 2]
    assert w.counters["spec_proposed"].values("inc") == [10]  # no growth: no increment
    assert [(v, t["outcome"]) for _, v, t in w.migrations.calls] == [(1, "ok"), (2, "ok"), (1, "failed")]
    assert w.counters["prefix_hit"].values("inc") == [64]
    blocks = {t["state"]: v for _, v, t in w.blocks.calls[-5:]}
    assert blocks == {"total": 100, "used": 40, "held": 3, "reserved": 9, "cached": 7}  # blocks, not requests
    assert w.gauges["running"].calls[-1] == ("set", 3, {"pool": "decode", "worker": "decode-0"})
    flat = stats.as_dict()  # what GET /admin/workers shows: one level, engine and speculation beside the worker's
    assert flat["num_free_kv_blocks"] == 60 and flat["spec_acceptance_rate"] == 0.6 and flat["migrated_out"] == 1
    assert flat["name"] == "decode-0" and "engine" not in flat and "spec" not in flat


def test_the_grafana_dashboard_shows_every_metric_and_only_those_the_code_defines():
    defined = set()
    for path in ("splitserve/platform/metrics.py", "splitserve/autoscaler/loop.py"):
        with open(os.path.join(ROOT, path)) as f:
            defined |= set(re.findall(r'"(splitserve_[a-z_]+)"', f.read()))
    with open(os.path.join(ROOT, "helm", "splitserve", "dashboards", "splitserve.json")) as f:
        dash = json.load(f)
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    used = {re.sub(r"_(bucket|count|sum)$", "", m) for e in exprs for m in re.findall(r"ray_(splitserve_[a-z_]+)", e)}
    assert used - defined == set(), "panels query metrics nobody exports"
    assert defined - used == set(), "metrics no panel shows"
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
