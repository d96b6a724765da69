"""The load generator: open loop (requests sent at their scheduled times, whatever
the server is doing) or closed loop (a fixed number of requests in flight).

Every request is bounded by ``request_timeout_s``; the run by its schedule, so
a benchmark can never hang. Requests sent during the warm-up are run but not
counted.
"""

from __future__ import annotations

import asyncio
import sys
import time

from splitserve.bench.metrics import RequestRecord
from splitserve.bench.workload import RequestSpec


class Progress:
    def __init__(self, total: int, desc: str, stream=sys.stderr, enabled: bool = True):
        self.total, self.desc, self.stream, self.enabled, self.done = total, desc, stream, enabled, 0
        self.start = time.monotonic()

    def tick(self) -> None:
        self.done += 1
        if self.enabled and (self.done == self.total or self.done % max(1, self.total // 20) == 0):
            bar = int(30 * self.done / max(1, self.total))
            self.stream.write(f"\r{self.desc} [{'#' * bar}{' ' * (30 - bar)}] {self.done}/{self.total} "
                              f"{time.monotonic() - self.start:.0f}s")
            if self.done == self.total:
                self.stream.write("\n")
            self.stream.flush()


async def _one(client, spec: RequestSpec, record: RequestRecord, timeout_s: float) -> RequestRecord:
    async def consume():
        async for n in client.stream(f"bench-{spec.index}", spec.prompt, spec.max_tokens):
            record.token_times.extend([time.monotonic()] * n)  # a chunk of n tokens: n arrivals at once

    try:
        await asyncio.wait_for(consume(), timeout_s)
    except asyncio.TimeoutError:
        record.error = f"timed out after {timeout_s:.0f}s"
    except Exception as e:  # noqa: BLE001 - the record keeps the reason
        record.error = f"{type(e).__name__}: {e}"
    record.end = time.monotonic()
    return record


async def run_open_loop(client, specs: list[RequestSpec], warmup_s: float = 0.0, request_timeout_s: float = 300.0,
                        progress: bool = True) -> list[RequestRecord]:
    bar = Progress(len(specs), "bench", enabled=progress)
    t0 = time.monotonic() + 0.05

    async def send(spec: RequestSpec) -> RequestRecord:
        await asyncio.sleep(max(0.0, t0 + spec.send_at - time.monotonic()))
        rec = await _one(client, spec, RequestRecord(spec.index, spec.kind, time.monotonic(), spec.prompt_tokens),
                         request_timeout_s)
        bar.tick()
        return rec

    records = await asyncio.gather(*(send(s) for s in specs))
    return [r for r in records if r.send >= t0 + warmup_s]


async def run_concurrency(client, specs: list[RequestSpec], concurrency: int, request_timeout_s: float = 300.0,
                          progress: bool = True) -> list[RequestRecord]:
    """Closed loop: ``concurrency`` requests in flight until ``specs`` are used up."""
    bar = Progress(len(specs), f"bench @{concurrency}", enabled=progress)
    pending = list(reversed(specs))
    records: list[RequestRecord] = []

    async def worker():
        while pending:
            spec = pending.pop()
            rec = RequestRecord(spec.index, spec.kind, time.monotonic(), spec.prompt_tokens)
            records.append(await _one(client, spec, rec, request_timeout_s))
            bar.tick()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return records
