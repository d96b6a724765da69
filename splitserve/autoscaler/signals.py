"""Load and latency signals, measured where requests are served, and the one typed snapshot of them.

Pure Python. Each worker keeps a :class:`Recorder` (a sliding window of timed
samples) and records as it serves::

    prefill worker   arrival (prompt tokens) when a prompt comes in; queue_s (in to first scheduled);
                     prefill_s (scheduled to first token); transfer_s (KV handoff); ttft_s (in to
                     handed off: the first token is on its way to the client); refused (per second:
                     requests it refused for lack of prefill room: its queue full, or not started within
                     the wait) and refused_decode (requests refused because no decode worker had room)
    decode worker    tokens (output tokens, per output); tpot_s (a request's mean time per output
                     token here, when it finishes or moves); output_tokens (when it finishes)
    both, per step   busy_s (seconds), steps, step_x and step_y (the step-time model's inputs:
                     prefill tokens and attention; decode batch and KV tokens), from the engine's
                     thread (:func:`step_recorder`): the autoscaler compares them with the catalog

``worker.signals()`` returns ``{"gauges": {...}, "series": recorder.export()}``:
the gauges are instant values (waiting, running, KV blocks used/total,
queued prompt tokens). The autoscaler collects every worker's export and
:func:`aggregate` turns them, with the membership rows, into a
:class:`Snapshot`: per worker and per pool percentiles over the window,
arrival and token rates, prompt/output length distributions, queue depth,
running batch and KV use. The router, the metrics and the autoscaler read
the same snapshot.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field

WINDOW_S = 60.0
RECENT_S = 15.0  # rates over the last seconds too: a burst shows before the window's mean moves
MAX_SAMPLES = 4096  # per series per worker: a bound on memory and on what one export carries


class Recorder:
    """Timed samples of named series over a sliding window (oldest dropped first)."""

    def __init__(self, window_s: float = WINDOW_S, max_samples: int = MAX_SAMPLES, clock=time.monotonic):
        self.window_s, self.max_samples, self.clock = window_s, max_samples, clock
        self.started = clock()
        self.series: dict[str, deque] = {}
        self._lock = threading.Lock()  # the engine's thread records steps while the actor's loop exports

    def record(self, name: str, value: float) -> None:
        with self._lock:
            self._append(name, self.clock(), float(value))

    def _append(self, name: str, when: float, value: float) -> None:
        q = self.series.get(name)
        if q is None:
            q = self.series[name] = deque(maxlen=self.max_samples)
        q.append((when, value))

    def count(self, name: str, n: float) -> None:
        """Add ``n`` to this second's bucket (for rates: one sample per second, not per event)."""
        with self._lock:
            q = self.series.get(name)
            now = self.clock()
            if q and int(q[-1][0]) == int(now):
                q[-1] = (q[-1][0], q[-1][1] + n)
            else:
                self._append(name, now, float(n))

    def export(self) -> dict:
        """{"span_s": how much of the window this recorder has seen, "series": {name: [(age_s, value)]}}"""
        with self._lock:
            now = self.clock()
            out = {}
            for name, q in self.series.items():
                while q and now - q[0][0] > self.window_s:
                    q.popleft()
                out[name] = [(now - t, v) for t, v in q]
        return {"span_s": min(self.window_s, now - self.started), "series": out}


def record_step(recorder: Recorder, seconds: float, x: float, y: float) -> None:
    """One engine step: how long it took and the step-time model's inputs (``catalog.py``)."""
    for name, v in (("busy_s", seconds), ("steps", 1), ("step_x", x), ("step_y", y)):
        recorder.count(name, v)


def step_recorder(recorder: Recorder, pool: str):
    """The engine's ``on_step`` hook for a worker of ``pool``: a ``StepLoad`` as that pool's model sees it
    (prefill: tokens and attention; decode: batch and KV tokens)."""
    if pool == "prefill":
        return lambda load: record_step(recorder, load.seconds, load.tokens, load.attention)
    return lambda load: record_step(recorder, load.seconds, load.sequences, load.context)


def engine_gauges(engine) -> dict:
    """The instant gauges of an engine (lock-free reads of counters: good enough between steps)."""
    used = engine.kv.num_blocks - engine.kv.num_free_blocks
    return {"waiting": len(engine.scheduler.waiting), "running": len(engine.scheduler.running),
            "kv_blocks_used": used, "kv_blocks_total": engine.kv.num_blocks,
            "kv_tokens_used": used * engine.kv.block_size}


@dataclass(frozen=True)
class Dist:
    """A distribution over the window: count, mean and percentiles (0 when there are no samples)."""
    n: int = 0
    mean: float = 0.0
    p50: float = 0.0
    p90: float = 0.0
    p99: float = 0.0

    @classmethod
    def of(cls, values: list[float]) -> "Dist":
        if not values:
            return cls()
        v = sorted(values)
        return cls(len(v), sum(v) / len(v), percentile(v, 50), percentile(v, 90), percentile(v, 99))

    def at(self, p: int) -> float:
        return {50: self.p50, 90: self.p90, 99: self.p99}[p]


def percentile(sorted_values: list[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not sorted_values:
        return 0.0
    k = (len(sorted_values) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


@dataclass(frozen=True, kw_only=True)
class Load:
    """What a worker, or a pool of them, carries: gauges now, rates and distributions over the window."""
    waiting: int = 0
    running: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    kv_tokens_used: int = 0
    queued_prompt_tokens: int = 0
    arrival_rate: float = 0.0  # prompts/s (prefill)
    token_rate: float = 0.0  # output tokens/s (decode)
    recent_arrival_rate: float = 0.0  # the same over the last RECENT_S only
    recent_token_rate: float = 0.0
    # requests/s refused over the last RECENT_S (prefill workers count both): for lack of prefill room,
    # for lack of decode room; demand the rates above do not show (a refused request never ran)
    refused_rate: float = 0.0
    decode_refused_rate: float = 0.0
    busy_s: float = 0.0  # engine steps over the window: seconds busy, how many, the models' inputs summed
    steps: int = 0
    step_x: float = 0.0
    step_y: float = 0.0
    ttft_s: Dist = field(default_factory=Dist)
    tpot_s: Dist = field(default_factory=Dist)
    queue_s: Dist = field(default_factory=Dist)
    prefill_s: Dist = field(default_factory=Dist)
    transfer_s: Dist = field(default_factory=Dist)
    prompt_tokens: Dist = field(default_factory=Dist)
    output_tokens: Dist = field(default_factory=Dist)

    @property
    def kv_used_fraction(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0


@dataclass(frozen=True, kw_only=True)
class WorkerSignals(Load):
    name: str
    pool: str
    instance_type: str
    state: str  # membership state: starting / up / draining / dead
    span_s: float = 0.0


@dataclass(frozen=True, kw_only=True)
class PoolSignals(Load):
    pool: str
    num_up: int = 0
    num_starting: int = 0
    num_draining: int = 0
    num_dead: int = 0
    instances: dict = field(default_factory=dict)  # instance type -> workers up or starting
    starting: dict = field(default_factory=dict)  # instance type -> workers starting


@dataclass(frozen=True)
class Snapshot:
    time: float  # wall clock when collected
    window_s: float
    workers: tuple[WorkerSignals, ...]
    pools: dict  # pool name -> PoolSignals

    def pool(self, name: str) -> PoolSignals:
        return self.pools.get(name) or PoolSignals(pool=name)

    @property
    def idle(self) -> bool:
        """No traffic: nothing arrived or was generated over the window, and nothing waits or runs."""
        pre, dec = self.pool("prefill"), self.pool("decode")
        return (pre.arrival_rate == 0 and dec.token_rate == 0 and pre.waiting == 0 and dec.running == 0
                and dec.waiting == 0 and pre.queued_prompt_tokens == 0)

    def to_dict(self) -> dict:
        return {"time": self.time, "window_s": self.window_s, "workers": [asdict(w) for w in self.workers],
                "pools": {k: asdict(v) for k, v in self.pools.items()}}


_DISTS = ("ttft_s", "tpot_s", "queue_s", "prefill_s", "transfer_s")
_RATES = ("arrival_rate", "token_rate", "recent_arrival_rate", "recent_token_rate", "refused_rate",
          "decode_refused_rate")
_STEPS = ("busy_s", "steps", "step_x", "step_y")
_GAUGES = ("waiting", "running", "kv_blocks_used", "kv_blocks_total", "kv_tokens_used", "queued_prompt_tokens")


def _values(series: dict, name: str) -> list[float]:
    return [v for _, v in series.get(name, ())]


def _within(export: dict | None, window_s: float) -> dict | None:
    """An export cut to the last ``window_s`` (the autoscaler may look at less than workers keep)."""
    if not export:
        return export
    series = {k: [(age, v) for age, v in samples if age <= window_s] for k, samples in export.get("series", {}).items()}
    return {**export, "span_s": min(float(export.get("span_s", 0.0)), window_s), "series": series}


def worker_signals(member: dict, export: dict | None) -> WorkerSignals:
    """One worker's signals from its membership row ({name, pool, state, node_type}) and its export
    (None: it did not answer, so only the row is known)."""
    base = dict(name=member["name"], pool=member["pool"], instance_type=member.get("node_type", "default"),
                state=member["state"])
    if not export:
        return WorkerSignals(**base)
    series, span = export.get("series", {}), max(float(export.get("span_s", 0.0)), 1e-9)
    gauges = {k: int(export.get("gauges", {}).get(k, 0) or 0) for k in _GAUGES}
    arrivals = _values(series, "arrival")
    recent = min(span, RECENT_S)
    steps = {k: sum(_values(series, k)) for k in _STEPS}
    steps["steps"] = int(steps["steps"])
    return WorkerSignals(**base, span_s=span, **gauges, **steps,
                         arrival_rate=len(arrivals) / span, token_rate=sum(_values(series, "tokens")) / span,
                         recent_arrival_rate=sum(age <= recent for age, _ in series.get("arrival", ())) / recent,
                         recent_token_rate=sum(v for age, v in series.get("tokens", ()) if age <= recent) / recent,
                         refused_rate=sum(v for age, v in series.get("refused", ()) if age <= recent) / recent,
                         decode_refused_rate=sum(v for age, v in series.get("refused_decode", ()) if age <= recent)
                         / recent,
                         prompt_tokens=Dist.of(arrivals), output_tokens=Dist.of(_values(series, "output_tokens")),
                         **{d: Dist.of(_values(series, d)) for d in _DISTS})


def aggregate(members: list[dict], exports: dict, window_s: float = WINDOW_S, now: float | None = None) -> Snapshot:
    """The snapshot of a cluster: ``members`` are membership rows, ``exports`` worker name -> export
    (missing or None for a worker that did not answer), looked at over the last ``window_s``. Pool
    percentiles are over the union of the pool's samples, not an average of per-worker percentiles."""
    exports = {name: _within(e, window_s) for name, e in exports.items()}
    workers = tuple(worker_signals(m, exports.get(m["name"])) for m in members)
    pools = {}
    for pool in sorted({w.pool for w in workers}):
        ws = [w for w in workers if w.pool == pool]
        counted = [w for w in ws if w.state in ("up", "draining")]
        instances, starting = {}, {}
        for w in ws:
            if w.state in ("up", "starting"):
                instances[w.instance_type] = instances.get(w.instance_type, 0) + 1
            if w.state == "starting":
                starting[w.instance_type] = starting.get(w.instance_type, 0) + 1
        union = {name: [v for w in counted for _, v in (exports.get(w.name) or {}).get("series", {}).get(name, ())]
                 for name in (*_DISTS, "arrival", "output_tokens")}
        pools[pool] = PoolSignals(
            pool=pool, num_up=sum(w.state == "up" for w in ws), num_starting=sum(w.state == "starting" for w in ws),
            num_draining=sum(w.state == "draining" for w in ws), num_dead=sum(w.state == "dead" for w in ws),
            instances=instances, starting=starting,
            **{g: sum(getattr(w, g) for w in counted) for g in (*_GAUGES, *_STEPS, *_RATES)},
            prompt_tokens=Dist.of(union["arrival"]), output_tokens=Dist.of(union["output_tokens"]),
            **{d: Dist.of(union[d]) for d in _DISTS})
    return Snapshot(time.time() if now is None else now, window_s, workers, pools)
