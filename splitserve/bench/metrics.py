"""Per-request timings and what they add up to (pure Python + numpy).

A request's record: send time, the arrival time of every streamed token, end
time, tokens in/out, error. From it: TTFT (first token - send), the
inter-token gaps, TPOT (mean gap after the first token), end-to-end latency.

SLO attainment = share of requests meeting both TTFT <= slo_ttft and
TPOT <= slo_tpot (a failed request meets neither). Goodput (DistServe): the
highest request rate at which attainment >= 90%, found by a rate sweep.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass
class RequestRecord:
    index: int
    kind: str
    send: float  # seconds, on the runner's monotonic clock
    prompt_tokens: int
    token_times: list[float] = field(default_factory=list)  # arrival of each streamed token
    end: float | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.token_times)

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.send if self.token_times else None

    @property
    def gaps(self) -> list[float]:
        t = self.token_times
        return [b - a for a, b in zip(t, t[1:])]

    @property
    def tpot(self) -> float | None:
        g = self.gaps
        return sum(g) / len(g) if g else None

    @property
    def e2e(self) -> float | None:
        return self.end - self.send if self.end is not None else None

    @property
    def output_tokens(self) -> int:
        return len(self.token_times)

    def meets(self, slo_ttft: float, slo_tpot: float) -> bool:
        if not self.ok:
            return False
        return self.ttft <= slo_ttft and (self.tpot is None or self.tpot <= slo_tpot)

    def to_json(self) -> dict:
        d = asdict(self)
        d.update(ttft=self.ttft, tpot=self.tpot, e2e=self.e2e, output_tokens=self.output_tokens)
        return d


def percentiles(values, ps=(50, 90, 99)) -> dict:
    v = np.asarray([x for x in values if x is not None], dtype=float)
    if v.size == 0:
        return {f"p{p}": None for p in ps}
    return {f"p{p}": float(np.percentile(v, p)) for p in ps}


def summarize(records: list[RequestRecord], slo_ttft: float, slo_tpot: float, window_s: float | None = None) -> dict:
    ok = [r for r in records if r.ok]
    if window_s is None:
        starts = [r.send for r in records]
        ends = [r.end for r in records if r.end is not None]
        window_s = (max(ends) - min(starts)) if starts and ends else 0.0
    out_tokens = sum(r.output_tokens for r in ok)
    return {
        "num_requests": len(records),
        "num_errors": len(records) - len(ok),
        "window_s": window_s,
        "request_throughput": len(ok) / window_s if window_s else 0.0,
        "output_token_throughput": out_tokens / window_s if window_s else 0.0,
        "ttft_s": percentiles(r.ttft for r in ok),
        "tpot_s": percentiles(r.tpot for r in ok),
        "itl_s": percentiles([g for r in ok for g in r.gaps]),
        "e2e_s": percentiles(r.e2e for r in ok),
        "slo": {"ttft_s": slo_ttft, "tpot_s": slo_tpot},
        "slo_attainment": (sum(r.meets(slo_ttft, slo_tpot) for r in records) / len(records)) if records else 0.0,
    }


def goodput(attainment_by_rate: dict[float, float], target: float = 0.9) -> float:
    """Highest swept rate such that it and every lower swept rate reach ``target`` (0 if the lowest
    misses): a noisy pass above a failing rate does not count."""
    best = 0.0
    for rate in sorted(attainment_by_rate):
        if attainment_by_rate[rate] < target:
            break
        best = rate
    return best


async def search_goodput(measure, rates: list[float], target: float = 0.9, refine: int = 2) -> tuple[float, dict]:
    """Sweep ``rates`` (ascending; stop at the first failure), then bisect between the last
    passing and first failing rate ``refine`` times. ``measure(rate)`` is an async function
    returning the SLO attainment at that rate."""
    seen: dict[float, float] = {}
    lo = hi = None
    for rate in sorted(rates):
        seen[rate] = await measure(rate)
        if seen[rate] >= target:
            lo = rate
        else:
            hi = rate
            break
    for _ in range(refine if lo is not None and hi is not None else 0):
        mid = round((lo + hi) / 2, 3)
        seen[mid] = await measure(mid)
        lo, hi = (mid, hi) if seen[mid] >= target else (lo, mid)
    return goodput(seen, target), dict(sorted(seen.items()))
