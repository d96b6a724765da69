"""The engine's side of speculative decoding (mixed into ``LLMEngine``).

    _init_speculation(cfg)     proposer (n-gram / draft model), metrics, step costs measured at start-up
    _propose()                 before scheduling: drafts for decoding requests, k adaptive per request,
                               nothing while the batch is larger than ``spec_max_batch``
    _verify(request, logits)   after the forward: accepted drafts + one token, KV rolled back

The policy and the verification maths are in ``speculative.py``; the draft
model in ``draft.py``.
"""

from __future__ import annotations

import torch

from splitserve.errors import InvalidRequestError
from splitserve.engine.request import Request
from splitserve.engine.runner import StepSequence
from splitserve.engine.device import to_host
from splitserve.engine.sampler import position_generator, target_probs
from splitserve.engine.speculative import NGramProposer, SpecConfig, choose_k, verify_greedy, verify_sampled
from splitserve.stats import SpecStats


class SpeculativeMixin:
    def _init_speculation(self, cfg) -> None:
        self.spec_config = SpecConfig(cfg.speculative, cfg.spec_max_draft_tokens, cfg.spec_max_batch,
                                      cfg.spec_draft_cost)
        self.proposer = self._make_proposer(loaded_path=self.model_path)
        self.spec_stats = SpecStats()
        if self.proposer is not None and cfg.spec_calibrate:
            self.spec_config.step_costs = self._calibrate_speculation()

    def _propose(self) -> None:
        """Draft tokens for the decoding requests of the next step (adaptive k; off for big batches)."""
        running = self.scheduler.running
        if len(running) > self.spec_config.max_batch:
            self.spec_stats.skipped_batch += 1
            return
        for req in running:
            if req.num_computed_tokens != req.num_tokens - 1 or req.hold_kv or not req.params.speculative \
                    or req.params.penalized:
                continue  # prefilling, prefill role, opted out, or penalized (its logits change per token)
            k = choose_k(req.spec_acceptance, self.spec_config.max_draft_tokens, self.spec_config.draft_cost,
                         self.spec_config.step_costs)
            k = min(k, req.params.max_tokens - req.num_output_tokens - 1, self.max_model_len - req.num_tokens - 1)
            if k < 1:
                req.spec_acceptance += 0.05 * (0.5 - req.spec_acceptance)  # drift back so it gets probed again
                continue
            drafts, q = self.proposer.propose(req.prompt_token_ids + req.output_token_ids, k, req.request_id,
                                              req.params)
            req.draft_token_ids, req.draft_probs = drafts, q

    def _make_proposer(self, loaded_path: str):
        cfg = self.config
        if cfg.speculative == "ngram":
            return NGramProposer(self.spec_config.ngram_max, self.spec_config.ngram_min)
        if cfg.speculative != "draft":
            return None
        from splitserve.engine.draft import DraftModelProposer
        from splitserve.engine.weights import load_model
        from splitserve.kernels.linear import quantize_model
        path = cfg.spec_draft_model or loaded_path
        quant = "int4" if cfg.spec_draft_model is None else "none"  # self-draft: the target as int4
        loaded = load_model(path, None, quant)
        if loaded.config.vocab_size != self.model_config.vocab_size:
            raise InvalidRequestError("spec_draft_model", f"the draft model's vocabulary ({loaded.config.vocab_size}) "
                                                          f"differs from the target's ({self.model_config.vocab_size}); "
                                                          f"a draft must share the target's tokenizer")
        from splitserve.engine.model import LlamaForCausalLM
        draft = LlamaForCausalLM.from_state_dict(loaded.config, loaded.state, self.dtype, self.max_model_len,
                                                 self.device)
        quantize_model(draft, quant, cfg.int4_group_size)
        if self.device.type != "cpu":  # the draft's own shapes measured too, next to the target's choices
            from splitserve.engine.progress import progress
            from splitserve.kernels.cases import prepare
            prepare(draft, self.device, self.kv_spec.block_size, cfg.max_num_seqs, quant,
                    progress if cfg.show_progress else None, max_context=self.max_model_len, merge=True)
        blocks = cfg.spec_draft_kv_blocks or max(16, self.kv_spec.num_blocks // 4)
        return DraftModelProposer(draft, blocks, self.kv_spec.block_size, cfg.seed)

    def _calibrate_speculation(self, context: int = 64, repeats: int = 5) -> list[float]:
        """Cost of a step verifying k drafts relative to a plain decode step, k = 0..max (measured).

        Runs scratch forwards over free blocks (nothing is allocated; what they write is never read)."""
        import time
        max_k = self.spec_config.max_draft_tokens
        bs = self.kv_spec.block_size
        blocks = tuple(range(-(-(context + max_k + 1) // bs)))
        if len(blocks) > self.kv.num_free_blocks:
            return [1 + self.spec_config.draft_cost * k for k in range(max_k + 1)]
        self.runner.execute([StepSequence([0] * context, 0, blocks, True)])

        def timed(k: int) -> float:  # the fastest of a few runs: the least disturbed by other processes
            seq = StepSequence([0] * (k + 1), context, blocks, True, k + 1)
            self.runner.execute([seq])
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                self.runner.execute([seq])[0].max().item()  # (.item(): waits for a GPU's step to finish)
                times.append(time.perf_counter() - start)
            return min(times)

        base = timed(0)
        per_draft = self.proposer.cost_per_token(base) if hasattr(self.proposer, "cost_per_token") else 0.0
        return [1.0] + [max(1.0, timed(k) / base) + k * per_draft for k in range(1, max_k + 1)]

    def _verify(self, req: Request, logits: torch.Tensor) -> list[int]:
        """Accepted drafts + one target token; rolls the request's KV back to what was accepted."""
        drafts = list(req.draft_token_ids)
        q = None if req.draft_probs is None else req.draft_probs[:len(drafts)]
        req.draft_token_ids, req.draft_probs = [], None
        if req.params.greedy:
            out = verify_greedy(logits, drafts)
        else:
            probs = target_probs(to_host(logits), [req.params] * logits.shape[0])  # host: CPU draws
            out = verify_sampled(probs, drafts, q, position_generator(req.params, req.num_output_tokens)
                                 or self.generator)
        accepted = len(out) - 1
        req.num_computed_tokens += accepted  # their KV was written by this step
        self.kv.trim(req.request_id, req.num_computed_tokens + 1)  # blocks of rejected drafts only
        if hasattr(self.proposer, "rollback"):
            self.proposer.rollback(req.request_id, req.num_computed_tokens)
        st = self.spec_stats
        st.steps, st.proposed, st.accepted, st.emitted = (st.steps + 1, st.proposed + len(drafts),
                                                         st.accepted + accepted, st.emitted + len(out))
        req.spec_acceptance = 0.7 * req.spec_acceptance + 0.3 * accepted / len(drafts)
        return out

    def _end_speculation(self, request_id: str) -> None:
        if hasattr(self.proposer, "release"):
            self.proposer.release(request_id)
