"""The engine's side of a KV handoff between a prefill and a decode engine.

Prefill role::

    add_request(..., hold_kv=True) -> step() ... -> output(finish_reason="prefilled")
        export_kv(rid, layer) -> [n_blocks, 2, bs, H, D] per layer   (the wire payload)
        handoff_state(rid) -> HandoffState                           (the wire header)
        release(rid)                                                  (after the decode side commits)

Decode role::

    reserve(rid, num_tokens) -> block ids | None   (None: no room; the sender tries elsewhere)
    write_kv(rid, layer, first_block, data)        (chunks, in any order)
    commit(rid, state)                             (joins the running batch; nothing is decoded before)
    cancel_reservation(rid)                        (failed / timed-out transfer: blocks freed)

A request arriving by ``commit`` is an ordinary running request from then on:
if it is preempted later, the decode engine recomputes its KV itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from splitserve.engine.errors import InvalidRequestError, UnknownRequestError
from splitserve.engine.output import TextState
from splitserve.engine.request import Request
from splitserve.engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class HandoffState:
    """Everything a decode engine needs to continue a request (besides its KV)."""

    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # the first token (sampled by prefill)
    params: SamplingParams
    generator_state: bytes | None  # the seeded sampler's RNG state, so sampling continues exactly


class KVHandoffMixin:
    """Mixed into LLMEngine; uses its kv (KVCacheManager), kv_cache, scheduler and request maps."""

    # -- prefill role -----------------------------------------------------------

    def export_kv(self, request_id: str, layer: int) -> torch.Tensor:
        """A held request's KV for one layer: [n_blocks, 2, bs, Hkv, D], its own blocks only."""
        table = self._held_table(request_id)
        return self.kv_cache[layer, torch.tensor(table, dtype=torch.long)]

    def handoff_state(self, request_id: str) -> HandoffState:
        req = self._held_request(request_id)
        gen = self._held_generators.get(request_id)
        return HandoffState(request_id, list(req.prompt_token_ids), list(req.output_token_ids), req.params,
                            bytes(gen.get_state().numpy().tobytes()) if gen is not None else None)

    def release(self, request_id: str) -> int:
        """Free a held request's blocks (its KV was delivered, or the handoff was abandoned)."""
        self._held_request(request_id)
        self.held.pop(request_id)
        self._held_generators.pop(request_id, None)
        return self.kv.free(request_id)

    def _held_request(self, request_id: str) -> Request:
        req = self.held.get(request_id)
        if req is None:
            raise UnknownRequestError(f"no prefilled request {request_id!r} is held by this engine")
        return req

    def _held_table(self, request_id: str) -> list[int]:
        self._held_request(request_id)
        return self.kv.block_table(request_id)

    # -- decode role --------------------------------------------------------------

    def can_reserve(self, num_tokens: int) -> bool:
        return num_tokens < self.max_model_len and self.kv.pool.can_allocate(self.kv.blocks_needed(num_tokens))

    def reserve(self, request_id: str, num_tokens: int) -> list[int] | None:
        if request_id in self.requests or request_id in self.reserved:
            raise InvalidRequestError("request_id", f"request id {request_id!r} is already in use")
        if num_tokens >= self.max_model_len:
            raise InvalidRequestError("prompt", f"{num_tokens} tokens do not fit this engine's max_model_len "
                                                f"({self.max_model_len})")
        blocks = self.kv.allocate(request_id, num_tokens)
        if blocks is not None:
            self.reserved[request_id] = num_tokens
        return blocks

    def write_kv(self, request_id: str, layer: int, first_block: int, data: torch.Tensor) -> None:
        """Place [n, 2, bs, Hkv, D] of received KV into the reservation's blocks first_block.. first_block+n."""
        if request_id not in self.reserved:
            raise UnknownRequestError(f"no reservation {request_id!r}")
        table = self.kv.block_table(request_id)
        n = data.shape[0]
        if not (0 <= layer < self.kv_cache.shape[0]) or first_block < 0 or first_block + n > len(table):
            raise InvalidRequestError("kv", f"chunk (layer {layer}, blocks {first_block}..{first_block + n}) is "
                                            f"outside the reservation ({len(table)} blocks)")
        ids = torch.tensor(table[first_block:first_block + n], dtype=torch.long)
        self.kv_cache[layer, ids] = data.to(self.kv_cache.dtype)

    def commit(self, state: HandoffState) -> None:
        """Join a fully received request into the running batch."""
        rid = state.request_id
        if self.reserved.get(rid) is None:
            raise UnknownRequestError(f"no reservation {rid!r}")
        if len(state.prompt_token_ids) > self.reserved[rid]:
            raise InvalidRequestError("kv", "the reservation is smaller than the transferred prompt")
        del self.reserved[rid]
        req = Request(rid, list(state.prompt_token_ids), state.params, next(self._arrivals),
                      output_token_ids=list(state.output_token_ids),
                      num_computed_tokens=len(state.prompt_token_ids))
        self.requests[rid] = req
        text = TextState(self.tokenizer, state.params.stop)
        for t in state.output_token_ids:  # the prefill side already emitted these tokens' text
            text.add(t)
            text.take(final=False)
        self._texts[rid] = text
        gen = None
        if state.generator_state is not None:
            gen = torch.Generator()
            gen.set_state(torch.frombuffer(bytearray(state.generator_state), dtype=torch.uint8))
        self._generators[rid] = gen
        self.scheduler.add_running(req)

    def cancel_reservation(self, request_id: str) -> None:
        if self.reserved.pop(request_id, None) is not None:
            self.kv.free(request_id)


def serialize_params(params: SamplingParams) -> dict:
    return {"max_tokens": params.max_tokens, "temperature": params.temperature, "top_k": params.top_k,
            "top_p": params.top_p, "seed": params.seed, "stop": list(params.stop), "ignore_eos": params.ignore_eos,
            "speculative": params.speculative}

