"""The instance catalog: the node types a cluster can add, what each costs and how fast it is.

Pure Python (the YAML reader aside), no Ray, no torch. An instance is one
worker on one node of a type; its speed is two fitted step-time models::

    prefill  seconds(tokens, sq) = a + b*tokens + c*sq      one prefill pass over prompts of
                                                            ``tokens`` tokens in all, ``sq`` = sum
                                                            of the squared prompt lengths (attention)
    decode   seconds(batch, kv)  = a + b*batch + c*kv       one decode step of ``batch`` requests
                                                            holding ``kv`` KV tokens in all

``splitserve profile`` measures one entry on the machine it runs on
(``profile.py``) and writes it as YAML; other types (GPU nodes measured
elsewhere, bigger CPU nodes) are declared in the same YAML::

    instance_types:
      - name: cpu-2
        cost_per_hour: 0.10
        pools: [prefill, decode]        # which pools it may serve
        threads: 1                      # torch threads (= Ray CPUs) per worker
        worker_resources: {cpu-2: 1}    # what one worker asks Ray for: puts it on a node of this type
        node_resources: {CPU: 2, cpu-2: 1}   # what one node of this type offers (request_resources)
        labels: {}
        memory_gb: 24
        startup_s: 60                   # node start + model load
        kv_tokens: 65536                # KV cache capacity of one worker, in tokens
        max_batch: 64
        step_tokens: 512                # the engine's per-step token budget (max_num_batched_tokens)
        prefill: {a: 0.01, b: 0.0008, c: 0.0}
        decode: {a: 0.015, b: 0.0004, c: 0.000001}
        measured: {machine: ..., command: ...}   # provenance, free form
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

POOL_NAMES = ("prefill", "decode")


@dataclass(frozen=True)
class LinearModel:
    """seconds = a + b*x + c*y, the coefficients non-negative."""
    a: float
    b: float
    c: float = 0.0

    def __post_init__(self):
        for name in ("a", "b", "c"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or v < 0 or v != v:
                raise ValueError(f"step-time coefficient {name} must be a number >= 0, got {v!r}")

    def __call__(self, x: float, y: float = 0.0) -> float:
        return self.a + self.b * x + self.c * y


class PrefillModel(LinearModel):
    """seconds(tokens, sum of squared prompt lengths) for one prefill pass."""

    def seconds(self, prompt_len: float) -> float:
        """One prompt alone."""
        return self(prompt_len, prompt_len * prompt_len)


class StepModel(LinearModel):
    """seconds(batch, KV tokens) for one decode step."""


@dataclass(frozen=True)
class InstanceType:
    name: str
    cost_per_hour: float
    prefill: PrefillModel
    decode: StepModel
    pools: tuple[str, ...] = POOL_NAMES
    threads: int = 1
    worker_resources: dict = field(default_factory=dict)
    node_resources: dict = field(default_factory=dict)
    labels: dict = field(default_factory=dict)
    memory_gb: float = 0.0
    startup_s: float = 60.0
    kv_tokens: int = 65536
    max_batch: int = 64
    step_tokens: int = 512  # per-step token budget of its engine: under load, prompts share a step's fixed cost
    measured: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.name or not isinstance(self.name, str):
            raise ValueError(f"an instance type needs a name, got {self.name!r}")
        if not isinstance(self.cost_per_hour, (int, float)) or self.cost_per_hour < 0:
            raise ValueError(f"{self.name}: cost_per_hour must be >= 0, got {self.cost_per_hour!r}")
        bad = set(self.pools) - set(POOL_NAMES)
        if bad or not self.pools:
            raise ValueError(f"{self.name}: pools must be a non-empty subset of {POOL_NAMES}, got {self.pools!r}")
        for name in ("kv_tokens", "max_batch", "threads", "step_tokens"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{self.name}: {name} must be an integer >= 1, got {getattr(self, name)!r}")

    @classmethod
    def from_dict(cls, d: dict) -> "InstanceType":
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"instance type {d.get('name')!r}: unknown keys {sorted(unknown)}; "
                             f"allowed: {sorted(known)}")
        missing = {"name", "cost_per_hour", "prefill", "decode"} - set(d)
        if missing:
            raise ValueError(f"instance type {d.get('name')!r}: missing {sorted(missing)}")
        d = dict(d)
        d["prefill"] = PrefillModel(**d["prefill"])
        d["decode"] = StepModel(**d["decode"])
        d["pools"] = tuple(d.get("pools", POOL_NAMES))
        return cls(**d)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["pools"] = list(self.pools)
        return d


class Catalog:
    def __init__(self, types: list[InstanceType]):
        if not types:
            raise ValueError("the catalog needs at least one instance type")
        self.types: dict[str, InstanceType] = {}
        for t in types:
            if t.name in self.types:
                raise ValueError(f"instance type {t.name!r} is declared twice")
            self.types[t.name] = t

    def get(self, name: str) -> InstanceType:
        if name not in self.types:
            raise KeyError(f"no instance type {name!r} in the catalog; known: {sorted(self.types)}")
        return self.types[name]

    def for_pool(self, pool: str) -> list[InstanceType]:
        return [t for t in self.types.values() if pool in t.pools]

    @classmethod
    def from_dict(cls, d: dict) -> "Catalog":
        if not isinstance(d, dict) or "instance_types" not in d:
            raise ValueError("a catalog is a mapping with a list under 'instance_types'")
        return cls([InstanceType.from_dict(t) for t in d["instance_types"]])

    def to_dict(self) -> dict:
        return {"instance_types": [t.to_dict() for t in self.types.values()]}

    @classmethod
    def from_yaml(cls, path: str) -> "Catalog":
        import yaml
        with open(path) as f:
            return cls.from_dict(yaml.safe_load(f) or {})

    def to_yaml(self, path: str) -> None:
        import yaml
        with open(path, "w") as f:
            yaml.safe_dump(self.to_dict(), f, sort_keys=False)


def fit_linear(rows: list[tuple[float, float]], seconds: list[float],
               relative: bool = False) -> tuple[float, float, float]:
    """Least-squares a, b, c >= 0 for seconds = a + b*x + c*y over ``rows`` of (x, y); ``relative``:
    minimise relative errors (a 30 ms point counts as much as a 3 s one).

    A coefficient the unconstrained fit makes negative is dropped (held at 0) and the rest refit:
    an active set over three unknowns."""
    if len(rows) != len(seconds) or len(rows) < 2:
        raise ValueError(f"need at least 2 measurements with one time each, got {len(rows)} rows, "
                         f"{len(seconds)} times")
    if relative and min(seconds) <= 0:
        raise ValueError("a relative fit needs times > 0")
    w = [1.0 / s for s in seconds] if relative else [1.0] * len(rows)
    seconds = [s * wi for s, wi in zip(seconds, w)]
    columns = [list(w), [float(r[0]) * wi for r, wi in zip(rows, w)], [float(r[1]) * wi for r, wi in zip(rows, w)]]
    scale = [max(abs(v) for v in col) or 1.0 for col in columns]  # columns of ~1: a well-conditioned system
    columns = [[v / s for v in col] for col, s in zip(columns, scale)]
    active = [i for i in range(3) if any(columns[i])]
    while True:
        coef = _least_squares([columns[i] for i in active], seconds)
        negative = [i for i, c in zip(active, coef) if c < 0]
        if not negative:
            out = [0.0, 0.0, 0.0]
            for i, c in zip(active, coef):
                out[i] = c / scale[i]
            return tuple(out)
        active.remove(min(negative, key=lambda i: coef[active.index(i)]))
        if not active:
            return (0.0, 0.0, 0.0)


def _least_squares(columns: list[list[float]], y: list[float]) -> list[float]:
    """Solve the normal equations (k <= 3 unknowns) by Gaussian elimination; a singular system
    (a column that is a multiple of another) drops the later column."""
    k = len(columns)
    gram = [[sum(a * b for a, b in zip(columns[i], columns[j])) for j in range(k)] for i in range(k)]
    rhs = [sum(a * b for a, b in zip(columns[i], y)) for i in range(k)]
    m = [row[:] + [r] for row, r in zip(gram, rhs)]
    for col in range(k):
        pivot = max(range(col, k), key=lambda r: abs(m[r][col]))
        if abs(m[pivot][col]) < 1e-18 * max(1.0, abs(gram[col][col])):
            sub = _least_squares(columns[:col] + columns[col + 1:], y)
            return sub[:col] + [0.0] + sub[col:]
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(k):
            if r != col:
                f = m[r][col] / m[col][col]
                m[r] = [a - f * b for a, b in zip(m[r], m[col])]
    return [m[i][k] / m[i][i] for i in range(k)]
