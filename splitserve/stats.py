"""Typed statistics of an engine and of each kind of worker (no torch, no Ray).

Lifecycle of one reading::

    LLMEngine.stats()                 -> EngineStats          counters read between steps, lock-free
    PrefillWorkerImpl.stats()         -> PrefillStats         its own counters + its engine's
    DecodeWorkerImpl.stats()          -> DecodeStats          its own counters + its engine's
    ColocatedWorkerImpl.stats()       -> WorkerStats
    Ray carries it (a pickled frozen dataclass), and its readers take attributes:
        the router and the controller    free KV blocks and running requests, to rank decode workers
        WorkerMetrics.update             gauges, and counter increments from the cumulative fields
        the front door                   max_model_len; GET /admin/workers shows ``as_dict()``

``as_dict()`` is the flat JSON the admin API shows (one level: engine and
speculation fields beside the worker's own). Cumulative fields (``num_*``
counts since start, bytes, tokens) only grow; the others are gauges.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class SpecStats:
    """Speculative decoding's counters (the engine owns one and increments it; readings carry a copy)."""
    steps: int = 0  # verified (request, step) pairs
    proposed: int = 0
    accepted: int = 0
    emitted: int = 0  # tokens produced by verified steps (accepted + the corrected/bonus one)
    skipped_batch: int = 0  # steps where the batch was too large to speculate

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_step(self) -> float:
        return self.emitted / self.steps if self.steps else 0.0

    def as_dict(self) -> dict:
        return {"spec_steps": self.steps, "spec_proposed": self.proposed, "spec_accepted": self.accepted,
                "spec_acceptance_rate": self.acceptance_rate,
                "spec_mean_accepted_per_step": self.accepted / self.steps if self.steps else 0.0,
                "spec_tokens_per_step": self.tokens_per_step, "spec_skipped_batch_steps": self.skipped_batch}


@dataclass(frozen=True)
class EngineStats:
    num_waiting: int
    num_running: int
    num_kv_blocks: int
    num_free_kv_blocks: int  # evictable cached blocks count as free
    num_cached_kv_blocks: int
    num_held: int  # suspended, their KV travelling
    num_reserved: int  # receiving KV
    num_pinned: int  # live migration: blocks pinned while read
    max_model_len: int
    num_held_blocks: int = 0  # the KV blocks of the held requests
    num_reserved_blocks: int = 0  # the KV blocks reserved for KV arriving
    num_preemptions: int = 0  # cumulative from here on
    prefix_queried_tokens: int = 0
    prefix_hit_tokens: int = 0
    speculative: str = "off"  # the proposer: ngram, draft or off
    spec_step_costs: tuple[float, ...] | None = None  # measured cost of verifying k drafts, in decode steps
    spec: SpecStats = field(default_factory=SpecStats)  # a copy

    def as_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "spec"}
        return {**d, **self.spec.as_dict()}


@dataclass(frozen=True)
class WorkerStats:
    """Any worker: its name and process, and its engine's reading."""
    name: str
    pid: int
    engine: EngineStats

    def as_dict(self) -> dict:
        own = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "engine"}
        return {**self.engine.as_dict(), **own}


@dataclass(frozen=True)
class PrefillStats(WorkerStats):
    queued_prompt_tokens: int  # of the requests admitted and not yet computed
    num_inflight: int  # admitted, not yet handed off or ended
    queue_limit: int
    num_prefills: int  # cumulative: requests handed off
    num_refused: dict[str, int]  # cumulative, by reason: busy, queue_timeout, no_capacity
    num_transfer_retries: int
    num_overlapped: int  # transfers that ran layer by layer during the prefill
    num_overlap_fallbacks: int  # of those, sent again from the held blocks


@dataclass(frozen=True)
class DecodeStats(WorkerStats):
    address: str | None  # its KV plane
    draining: bool
    kv_bytes_received: int  # cumulative from here on
    transfers_committed: int
    transfers_failed: int
    kv_bytes_sent: int
    migrated_out: int
    migrations_failed: int
    dropped_after_abort: int
    unclaimed_aborted: int
