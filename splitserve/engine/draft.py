"""A draft-model proposer: a smaller (or quantized) model with the target's tokenizer drafts k tokens.

It keeps its own paged KV cache and block table per request, and how many of
a request's tokens its cache holds (``computed``). One proposal:

    catch up     feed the tokens it has not seen yet (one chunk) -> distribution q_1, draft d_1
    draft        feed d_i, one token at a time -> q_{i+1}, d_{i+1}       (k forward passes in all)
    return       drafts d_1..d_k and q = [q_1..q_k] (the target verifies against q)

After verification the engine calls ``rollback(request_id, n)`` with the
target's verified length: the draft's KV past it (rejected drafts) no longer
counts and is recomputed or overwritten next time. ``release`` frees the
request's blocks when it finishes. The default draft is the target itself
quantized to int4 ("self-draft"); any model directory or GGUF sharing the
tokenizer can be passed instead.
"""

from __future__ import annotations

import time

import torch

from splitserve.engine.block_pool import KVCacheManager
from splitserve.engine.device import to_host
from splitserve.engine.kv_cache import KVCacheSpec, allocate_kv_cache
from splitserve.engine.runner import StepSequence, prepare_step
from splitserve.engine.sampler import target_probs
from splitserve.engine.sampling_params import SamplingParams


class DraftModelProposer:
    name = "draft"

    def __init__(self, model, num_blocks: int, block_size: int, seed: int = 0):
        cfg = model.cfg
        self.model = model
        self.block_size = block_size
        self.kv_cache = allocate_kv_cache(KVCacheSpec(cfg.num_layers, num_blocks, block_size, cfg.num_kv_heads,
                                                      cfg.head_dim, model.dtype), model.rope.cos.device)
        self.kv = KVCacheManager(num_blocks, block_size)
        self.computed: dict[str, int] = {}
        self.generator = torch.Generator().manual_seed(seed)

    def _forward(self, request_id: str, token_ids: list[int], start: int) -> torch.Tensor:
        # token_ids: the chunk at positions [start, start + n) -> logits of its last position [V] fp32
        seq = StepSequence(token_ids, start, tuple(self.kv.block_table(request_id)), True)
        step = prepare_step([seq], self.block_size, self.kv_cache.dtype, self.kv_cache.device)
        return self.model(step.input_ids, self.kv_cache, step.meta, step.logits_indices)[0]

    def propose(self, token_ids: list[int], k: int, request_id: str = "", params: SamplingParams | None = None):
        n = len(token_ids)
        if self.kv.allocate(request_id, n + k - 1) is None:
            return [], None  # the draft's pool is full: no drafts this step (never an error)
        done = min(self.computed.get(request_id, 0), n - 1)  # feed at least the newest token
        logits = self._forward(request_id, token_ids[done:], done)
        greedy = params is None or params.greedy
        drafts, qs = [], []
        for i in range(k):
            if greedy:
                drafts.append(int(logits.argmax()))
            else:
                q = target_probs(to_host(logits)[None], [params])[0]  # the target's transforms (host: CPU draws)
                qs.append(q)
                drafts.append(int(torch.multinomial(q, 1, generator=self.generator)))
            if i + 1 < k:
                logits = self._forward(request_id, [drafts[-1]], n + i)
        self.computed[request_id] = n + k - 1  # d_k itself was never fed
        return drafts, (torch.stack(qs) if qs else None)

    def rollback(self, request_id: str, num_valid_tokens: int) -> None:
        if request_id in self.computed:
            self.computed[request_id] = min(self.computed[request_id], num_valid_tokens)
            self.kv.trim(request_id, self.computed[request_id] + 1)

    def release(self, request_id: str) -> None:
        self.computed.pop(request_id, None)
        self.kv.free(request_id)

    def cost_per_token(self, base_step_s: float, context: int = 64) -> float:
        """Seconds of one draft forward (one token) relative to the target's decode step."""
        rid = "__calibration__"
        self.kv.allocate(rid, context + 1)
        try:
            self._forward(rid, [0] * context, 0)
            times = []
            for _ in range(5):
                start = time.perf_counter()
                self._forward(rid, [0], context)
                times.append(time.perf_counter() - start)
        finally:
            self.release(rid)
        return min(times) / base_step_s
