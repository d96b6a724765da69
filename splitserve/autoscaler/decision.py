"""What the autoscaling policy reads and writes, besides the snapshot: the objectives and limits an
operator sets, the state the policy carries between ticks, and the decision it returns.

Lifecycle: ``Objectives`` is built once from the ``autoscale`` section of the YAML (or the CLI) and
validated there; one ``PolicyState`` lives as long as the autoscaler loop (or a simulation) and is
only written by ``policy.decide`` and ``scaling.scale_pool``; each tick returns a ``Decision`` (an id,
its ``Action``s, the targets and the reasons), which the loop logs and hands to an actuator.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class PoolLimits:
    min: int = 1
    max: int = 4

    def __post_init__(self):
        if not (isinstance(self.min, int) and isinstance(self.max, int) and 1 <= self.min <= self.max):
            raise ValueError(f"pool limits need integers 1 <= min <= max, got min={self.min!r} max={self.max!r}")


@dataclass(frozen=True)
class Objectives:
    ttft_s: float = 2.0
    tpot_s: float = 0.1
    percentile: int = 90  # the objectives hold at this percentile: 50, 90 or 99
    headroom: float = 0.8  # plan for this fraction of each objective
    prefill: PoolLimits = field(default_factory=PoolLimits)
    decode: PoolLimits = field(default_factory=PoolLimits)
    budget_per_hour: float | None = None  # cost of all instances together; None: no budget
    kv_high: float = 0.85  # decode KV use above this asks for one more decode instance
    up_cooldown_s: float = 20.0
    down_cooldown_s: float = 60.0
    down_stable_s: float = 300.0  # the demand planned for is at least its measured peak over this long, so
    #                               capacity is drained this long after the demand fell (300 s: Kubernetes'
    #                               default scale-down stabilization window); the target must then stay below
    #                               the count for the start-up time of the type that would be drained
    min_samples: int = 20  # fewer measurements than this: the model alone decides
    stale_s: float = 30.0  # an older snapshot is no data
    trend_s: float = 300.0  # demand growth is measured over this long and planned for a start-up ahead
    switch_saving: float = 0.2  # a different mix of types replaces what is there only if it costs this much less
    switch_headroom: float = 0.5  # ... and it is chosen for this much more demand than now
    add_headroom: float = 0.1  # an addition carries this much more of the demand than the shortfall: a pool
    #                            that grows gets a step of its best-value type, not a string of the type that
    #                            is cheapest for the last few tokens (five slow instances for a 140 tokens/s
    #                            shortfall of a 10,000 tokens/s pool, simulated, each drained again later)
    rebalance_gap: float = 0.3
    max_migrations: int = 4  # per rebalancing proposal
    default_prompt_tokens: int = 256  # the demand's shape before anything was measured (then: the last
    default_output_tokens: int = 128  # measured, when a window has no prompt or no finished output)

    def __post_init__(self):
        for name in ("prefill", "decode"):
            if isinstance(getattr(self, name), dict):
                object.__setattr__(self, name, PoolLimits(**getattr(self, name)))
        if self.percentile not in (50, 90, 99):
            raise ValueError(f"percentile must be 50, 90 or 99, got {self.percentile!r}")
        for name in ("ttft_s", "tpot_s"):
            if not isinstance(getattr(self, name), (int, float)) or getattr(self, name) <= 0:
                raise ValueError(f"objective {name} must be a number of seconds > 0, got {getattr(self, name)!r}")
        if not 0 < self.headroom <= 1:
            raise ValueError(f"headroom must be in (0, 1], got {self.headroom!r}")
        if self.budget_per_hour is not None and self.budget_per_hour < 0:
            raise ValueError(f"budget_per_hour must be >= 0 or null, got {self.budget_per_hour!r}")

    def limits(self, pool: str) -> PoolLimits:
        return getattr(self, pool)


@dataclass
class PolicyState:
    seq: int = 0
    last_change: dict = field(default_factory=dict)  # pool -> when it last scaled
    below_since: dict = field(default_factory=dict)  # pool -> since when the target is below the count
    history: dict = field(default_factory=dict)  # pool -> [(time, measured demand)] over trend_s
    peaks: dict = field(default_factory=dict)  # pool -> [(time, measured demand)] over down_stable_s
    settled_at: dict = field(default_factory=dict)  # pool -> when its last starting instance came up or its
    #                                                 last drain ended (None: some are starting or draining);
    #                                                 misses measured before are stale
    shape: dict = field(default_factory=dict)  # "prompt_mean", "prompt_high", "output_mean": the last measured


@dataclass(frozen=True)
class Action:
    kind: str  # "add" | "drain" | "migrate"
    pool: str
    instance_type: str | None = None
    count: int = 1
    worker: str | None = None  # drain: which; migrate: from
    target: str | None = None  # migrate: to


@dataclass(frozen=True)
class Decision:
    id: str
    time: float
    actions: tuple[Action, ...] = ()
    targets: dict = field(default_factory=dict)  # pool -> {instance type: count}
    reasons: tuple[str, ...] = ()
    model: dict = field(default_factory=dict)  # pool -> demand, capacities, corrections (what it reasoned from)

    def to_dict(self) -> dict:
        return asdict(self)
