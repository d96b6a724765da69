"""Serving metrics through ``ray.util.metrics``: Ray's Prometheus endpoint and the dashboard show them.

Ray exports each metric with a ``ray_`` prefix (``splitserve_requests_total``
is scraped as ``ray_splitserve_requests_total``). Two recorders, one per kind
of process, each made once per process (:func:`request_metrics`,
:class:`WorkerMetrics`):

    front door (the router's process), labels model [, outcome, code]
        requests_total{outcome=ok|error|cancelled, code}   when a request ends; code = the gRPC
                                                           status name of its error ("" when ok)
        prompt_tokens_total, output_tokens_total
        time_to_first_token_seconds, time_per_output_token_seconds,
        inter_token_latency_seconds (per token: a delta of k tokens after g seconds is k gaps of
        g/k), request_latency_seconds (end to end), requests_in_flight
    each worker, labels pool, worker
        queue_time_seconds (prefill: in to first scheduled)
        kv_transfer_seconds, kv_transfer_bytes_total, kv_transfer_failures_total{reason}
        migration_pause_seconds                              (the stop-and-copy of a live move)
        from its cumulative stats, every ``EXPORT_PERIOD_S`` (:meth:`WorkerMetrics.update`):
        running/waiting requests, kv_blocks{state=total|used|reserved|held|cached}, preemptions_total,
        migrations_total{outcome}, spec_proposed_tokens_total, spec_accepted_tokens_total,
        prefix_cache_queried_tokens_total, prefix_cache_hit_tokens_total (hit rate: hit / queried;
        saved prefill: the hit tokens)

Histogram buckets span CPU and GPU speeds (a millisecond to a minute). Where
Ray is not initialised (unit tests, a plain engine) every call is a no-op.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import AsyncIterator

from splitserve.errors import status_of
from splitserve.stats import DecodeStats, WorkerStats

logger = logging.getLogger("splitserve.metrics")

EXPORT_PERIOD_S = 2.0
LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0]
TOKEN_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.0]


def _make(kind: str, name: str, description: str, tags: tuple[str, ...], boundaries=None):
    """A ray.util.metrics object, or None where Ray is not up."""
    try:
        import ray
        if not ray.is_initialized():
            return None
        from ray.util import metrics
        cls = {"counter": metrics.Counter, "gauge": metrics.Gauge, "histogram": metrics.Histogram}[kind]
        kw = {"boundaries": boundaries} if boundaries else {}
        return cls(name, description, tag_keys=tags, **kw)
    except Exception as e:  # noqa: BLE001 - metrics are an extra: never fail serving for them
        logger.warning("metric %s unavailable: %s", name, e)
        return None


class RequestMetrics:
    """What the front door sees of each request (see the module docstring)."""

    def __init__(self):
        t = ("model",)
        self.requests = _make("counter", "splitserve_requests_total", "requests by how they ended", (*t, "outcome", "code"))
        self.prompt_tokens = _make("counter", "splitserve_prompt_tokens_total", "prompt tokens of ended requests", t)
        self.output_tokens = _make("counter", "splitserve_output_tokens_total", "output tokens sent to clients", t)
        self.ttft = _make("histogram", "splitserve_time_to_first_token_seconds", "arrival to first token", t,
                          LATENCY_BUCKETS)
        self.tpot = _make("histogram", "splitserve_time_per_output_token_seconds",
                          "a request's (last token - first token) / (output tokens - 1)", t, TOKEN_BUCKETS)
        self.itl = _make("histogram", "splitserve_inter_token_latency_seconds", "gap between output tokens", t,
                         TOKEN_BUCKETS)
        self.latency = _make("histogram", "splitserve_request_latency_seconds", "arrival to the end", t,
                             LATENCY_BUCKETS)
        self.in_flight = _make("gauge", "splitserve_requests_in_flight", "requests the front door is serving", t)
        self._in_flight: dict[str, int] = {}

    async def observe(self, model: str, prompt_tokens: int, stream: AsyncIterator) -> AsyncIterator:
        """Pass ``stream`` (RequestOutput deltas) through, measuring it; the outcome is recorded when it
        ends: ok (a normal finish), error (an exception or an output that carries an error: labelled
        with its gRPC status name) or cancelled (the consumer stopped early)."""
        tags = {"model": model}
        start = last = time.perf_counter()
        first = None
        tokens = 0
        outcome, code = "cancelled", ""
        self._gauge(model, +1)
        try:
            async for out in stream:
                now = time.perf_counter()
                n = len(out.new_token_ids)
                if n:
                    if first is None:
                        first = now
                        _observe(self.ttft, now - start, tags)
                    else:
                        for _ in range(n):
                            _observe(self.itl, (now - last) / n, tags)
                    last, tokens = now, tokens + n
                if out.finished:
                    outcome, code = ("error", "INTERNAL") if out.error or out.finish_reason == "error" else ("ok", "")
                yield out
            if outcome == "cancelled":  # the stream ended without a final output
                outcome, code = "error", "INTERNAL"
        except Exception as e:  # (a client that left raises GeneratorExit or CancelledError: cancelled)
            outcome, code = "error", status_of(e)[0]
            raise
        finally:
            self._gauge(model, -1)
            _inc(self.requests, 1, {**tags, "outcome": outcome, "code": code})
            _inc(self.prompt_tokens, prompt_tokens, tags)
            _inc(self.output_tokens, tokens, tags)
            _observe(self.latency, time.perf_counter() - start, tags)
            if first is not None and tokens > 1:
                _observe(self.tpot, (last - first) / (tokens - 1), tags)

    def _gauge(self, model: str, delta: int) -> None:
        self._in_flight[model] = self._in_flight.get(model, 0) + delta
        if self.in_flight is not None:
            self.in_flight.set(self._in_flight[model], tags={"model": model})


_request_metrics: RequestMetrics | None = None


def request_metrics() -> RequestMetrics:
    """This process's front-door recorder (made on first use: Ray must be up by then)."""
    global _request_metrics
    if _request_metrics is None:
        _request_metrics = RequestMetrics()
    return _request_metrics


class WorkerMetrics:
    """One worker's metrics: events as they happen, and its cumulative stats turned into gauges and
    counter increments (:meth:`update`, called every ``EXPORT_PERIOD_S``)."""

    # key: (metric name, help, its reading in a WorkerStats)
    _GAUGES = {"running": ("splitserve_running_requests", "requests in the running batch",
                           lambda s: s.engine.num_running),
               "waiting": ("splitserve_waiting_requests", "requests waiting to be scheduled",
                           lambda s: s.engine.num_waiting)}
    _COUNTERS = {"preemptions": ("splitserve_preemptions_total", "requests preempted for KV room",
                                 lambda s: s.engine.num_preemptions),
                 "spec_proposed": ("splitserve_spec_proposed_tokens_total", "draft tokens proposed",
                                   lambda s: s.engine.spec.proposed),
                 "spec_accepted": ("splitserve_spec_accepted_tokens_total", "draft tokens accepted",
                                   lambda s: s.engine.spec.accepted),
                 "prefix_queried": ("splitserve_prefix_cache_queried_tokens_total",
                                    "prompt tokens looked up in the prefix cache",
                                    lambda s: s.engine.prefix_queried_tokens),
                 "prefix_hit": ("splitserve_prefix_cache_hit_tokens_total",
                                "prompt tokens found cached (their prefill skipped)",
                                lambda s: s.engine.prefix_hit_tokens)}

    def __init__(self, pool: str, worker: str):
        self.tags = {"pool": pool, "worker": worker}
        t = ("pool", "worker")
        self.queue = _make("histogram", "splitserve_queue_time_seconds", "in to first scheduled", t, LATENCY_BUCKETS)
        self.transfer = _make("histogram", "splitserve_kv_transfer_seconds",
                              "one request's KV handoff left after its prefill (with the layer overlap: the rest "
                              "and the commit)", t, LATENCY_BUCKETS)
        self.transfer_bytes = _make("counter", "splitserve_kv_transfer_bytes_total", "KV bytes sent", t)
        self.transfer_failures = _make("counter", "splitserve_kv_transfer_failures_total", "KV transfers that failed",
                                       (*t, "reason"))
        self.pause = _make("histogram", "splitserve_migration_pause_seconds", "a live move's stop-and-copy", t,
                           TOKEN_BUCKETS)
        self.migrations = _make("counter", "splitserve_migrations_total", "live moves out of this worker",
                                (*t, "outcome"))
        self.blocks = _make("gauge", "splitserve_kv_blocks", "KV cache blocks by state", (*t, "state"))
        self.gauges = {k: _make("gauge", name, doc, t) for k, (name, doc, _) in self._GAUGES.items()}
        self.counters = {k: _make("counter", name, doc, t) for k, (name, doc, _) in self._COUNTERS.items()}
        self._last: dict[str, float] = {}
        self._export = None

    def start_export(self, stats) -> None:
        """Call ``update(stats())`` every ``EXPORT_PERIOD_S`` in the running event loop (once; idempotent)."""
        if self._export is None and self.blocks is not None:
            self._export = asyncio.get_running_loop().create_task(self._export_forever(stats))

    def stop_export(self) -> None:
        if self._export is not None:
            self._export.cancel()
            self._export = None

    async def _export_forever(self, stats) -> None:
        while True:
            try:
                self.update(stats())
            except Exception as e:  # noqa: BLE001 - a bad reading must not end the export
                logger.warning("worker metrics: %s", e)
            await asyncio.sleep(EXPORT_PERIOD_S)

    def queued(self, seconds: float) -> None:
        _observe(self.queue, seconds, self.tags)

    def transferred(self, seconds: float, num_bytes: int) -> None:
        _observe(self.transfer, seconds, self.tags)
        _inc(self.transfer_bytes, num_bytes, self.tags)

    def transfer_failed(self, reason: str) -> None:
        _inc(self.transfer_failures, 1, {**self.tags, "reason": reason})

    def migrated(self, pause_s: float | None) -> None:
        if pause_s is not None:
            _observe(self.pause, pause_s, self.tags)

    def update(self, stats: WorkerStats) -> None:
        """Gauges from ``stats`` (a worker's ``stats()``) and the growth of its cumulative counters."""
        for key, (_, _, read) in self._GAUGES.items():
            if self.gauges[key] is not None:
                self.gauges[key].set(read(stats), tags=self.tags)
        e = stats.engine
        if self.blocks is not None:
            for state, v in (("total", e.num_kv_blocks), ("used", e.num_kv_blocks - e.num_free_kv_blocks),
                             ("held", e.num_held_blocks), ("reserved", e.num_reserved_blocks),
                             ("cached", e.num_cached_kv_blocks)):
                self.blocks.set(v, tags={**self.tags, "state": state})
        cumulative = {key: read(stats) for key, (_, _, read) in self._COUNTERS.items()}
        if isinstance(stats, DecodeStats):
            cumulative["migrated"], cumulative["migrations_failed"] = stats.migrated_out, stats.migrations_failed
        for key, value in cumulative.items():
            grew, self._last[key] = value - self._last.get(key, 0), value
            if grew <= 0:
                continue
            if key in self.counters:
                _inc(self.counters[key], grew, self.tags)
            else:
                _inc(self.migrations, grew, {**self.tags, "outcome": "ok" if key == "migrated" else "failed"})


def _inc(metric, value: float, tags: dict) -> None:
    if metric is not None and value > 0:
        metric.inc(value, tags=tags)


def _observe(metric, value: float, tags: dict) -> None:
    if metric is not None:
        metric.observe(value, tags=tags)
