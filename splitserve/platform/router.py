"""The router: picks a prefill and a decode worker per request and drives it through them.

Policy (pure, no Ray): ``pick_prefill`` takes the prefill worker with the
fewest queued prompt tokens; ``pick_decode`` the decode worker with the most
free KV blocks among those that can hold the prompt (ties: the smaller
running batch), skipping workers that just refused.

Path of one request through :meth:`Router.generate`::

    pick P, D -> P.prefill(reserve on D, prefill, stream KV to D)
        "no_capacity" -> try another D; none left -> wait (bounded) and retry, then RESOURCE_EXHAUSTED
        "finished"    -> the first token ended it: one final output
        "transferred" -> first token out at once (TTFT), then D.stream(...) until finished
    client gone at any point -> abort on whichever worker holds the request
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, replace
from typing import AsyncIterator

from splitserve.engine.output import RequestOutput


class NoCapacityError(Exception):
    """No worker could take the request within the wait limit (RESOURCE_EXHAUSTED / HTTP 503)."""


@dataclass(frozen=True)
class PrefillLoad:
    name: str
    queued_prompt_tokens: int


@dataclass(frozen=True)
class DecodeLoad:
    name: str
    free_blocks: int
    running: int
    block_size: int


def pick_prefill(loads: list[PrefillLoad]) -> str | None:
    return min(loads, key=lambda w: (w.queued_prompt_tokens, w.name)).name if loads else None


def pick_decode(loads: list[DecodeLoad], num_tokens: int, exclude: set[str] = frozenset()) -> str | None:
    fits = [w for w in loads if w.name not in exclude and w.free_blocks * w.block_size >= num_tokens]
    return max(fits, key=lambda w: (w.free_blocks, -w.running, w.name)).name if fits else None


class Router:
    """Shell over the policy: holds Ray actor handles, keeps load estimates, drives requests."""

    def __init__(self, prefill: dict, decode: dict, decode_addresses: dict[str, str], block_size: int,
                 max_wait_s: float = 30.0, max_inflight: int = 256):
        self.prefill, self.decode, self.addresses = prefill, decode, decode_addresses
        self.block_size = block_size
        self.max_wait_s = max_wait_s
        self._inflight = asyncio.Semaphore(max_inflight)  # the bounded queue in front of the pools
        self._prefill_tokens = {n: 0 for n in prefill}  # prompt tokens this router has in flight per P
        self._decode_free = {n: 1 << 30 for n in decode}
        self._decode_running = {n: 0 for n in decode}
        self.last_transfer: dict = {}

    async def refresh(self) -> None:
        stats = await asyncio.gather(*(h.stats.remote() for h in self.decode.values()), return_exceptions=True)
        for name, s in zip(self.decode, stats):
            if isinstance(s, dict):
                self._decode_free[name], self._decode_running[name] = s["num_free_kv_blocks"], s["num_running"]

    def _decode_loads(self) -> list[DecodeLoad]:
        return [DecodeLoad(n, self._decode_free[n], self._decode_running[n], self.block_size) for n in self.decode]

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: dict) -> AsyncIterator[RequestOutput]:
        async with self._inflight:
            async for out in self._generate(request_id, prompt_token_ids, params):
                yield out

    async def _generate(self, request_id, prompt_token_ids, params):
        n = len(prompt_token_ids)
        deadline = time.monotonic() + self.max_wait_s
        refused: set[str] = set()
        await self.refresh()
        while True:
            d = pick_decode(self._decode_loads(), n, refused)
            if d is None:
                if time.monotonic() > deadline:
                    raise NoCapacityError(f"no decode worker had room for {n} prompt tokens within "
                                          f"{self.max_wait_s:.0f}s")
                await asyncio.sleep(0.05)
                refused.clear()
                await self.refresh()
                continue
            p = pick_prefill([PrefillLoad(k, v) for k, v in self._prefill_tokens.items()])
            self._prefill_tokens[p] += n
            ref = self.prefill[p].prefill.remote(request_id, prompt_token_ids, params, self.addresses[d])
            try:
                result = await ref
            except asyncio.CancelledError:  # client gone during prefill or transfer: stop it on both sides
                self.prefill[p].abort.remote(request_id)
                self.decode[d].abort.remote(request_id)
                raise
            finally:
                self._prefill_tokens[p] -= n
            if result["status"] == "no_capacity":
                refused.add(d)
                self._decode_free[d] = 0
                continue
            break
        if result["status"] == "error":
            yield RequestOutput(request_id, [], "", True, "error", n, 0, result["error"])
            return
        first: RequestOutput = result["first"]
        if result["status"] == "finished":
            yield first
            return
        self.last_transfer = {"prefill_pid": result["pid"], "kv_bytes": result["kv_bytes"], "decode": d}
        yield replace(first, finished=False, finish_reason=None)
        finished = False
        try:
            async for ref in self.decode[d].stream.remote(request_id):  # streaming, backpressured
                out = await ref
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.decode[d].abort.remote(request_id)


class ColocatedRouter:
    """The baseline: one engine does prefill and decode; requests go to the least-loaded worker."""

    def __init__(self, workers: dict, max_inflight: int = 256):
        self.workers = workers
        self._load = {n: 0 for n in workers}
        self._inflight = asyncio.Semaphore(max_inflight)

    async def refresh(self) -> None:
        return None

    async def generate(self, request_id, prompt_token_ids, params):
        async with self._inflight:
            w = min(self._load, key=lambda k: (self._load[k], k))
            self._load[w] += 1
            finished = False
            try:
                async for ref in self.workers[w].generate.remote(request_id, prompt_token_ids, params):
                    out = await ref
                    finished = out.finished
                    yield out
            finally:
                self._load[w] -= 1
                if not finished:
                    self.workers[w].abort.remote(request_id)
