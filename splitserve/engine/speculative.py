"""Speculative decoding: proposers, the adaptive policy, and exact verification (pure Python + torch).

One engine step with speculation, for a decoding request whose last token is ``t``:

    propose      drafts d1..dk = proposer.propose(tokens so far, k)      k from the adaptive policy
    schedule     the chunk [t, d1, ..., dk] (k + 1 tokens; its KV slots are allocated like a prefill's)
    forward      one target pass over the chunk: logits at all k + 1 positions  -> p_1 .. p_{k+1}
    verify       greedy:  accept the longest prefix with d_i == argmax p_i, then emit argmax at the
                          first mismatch (or argmax p_{k+1} when all match: the bonus token)
                 sampled: accept d_i with probability min(1, p_i(d_i) / q_i(d_i)); at the first
                          rejection emit a token drawn from norm(max(p_i - q_i, 0)) and stop; when all
                          are accepted, draw the bonus token from p_{k+1}. The output distribution is
                          exactly the target's (Leviathan et al. 2023, Chen et al. 2023).
    roll back    the request keeps KV for t and the accepted drafts; slots of rejected drafts are
                 overwritten later; blocks that only held rejected drafts go back to the pool.

Proposers implement ``propose(token_ids, k, request_id, params) -> (drafts, q)``:
``q`` is the proposal distribution per draft ([len(drafts), vocab]) or None
for a deterministic proposer (a point mass on each draft, as n-gram lookup
is). Stateful proposers (``draft.py``: a draft model with its own KV cache)
also get ``rollback(request_id, num_valid_tokens)`` after each verification
and ``release(request_id)`` when the request ends.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


PROPOSERS = ("off", "ngram", "draft")


class Proposer(Protocol):
    name: str

    def propose(self, token_ids: list[int], k: int, request_id: str = "",
                params=None) -> tuple[list[int], torch.Tensor | None]: ...


class NGramProposer:
    """Prompt lookup: continue the most recent earlier occurrence of the longest matching suffix.

    For n from ``max_n`` down to ``min_n``: take the last n tokens; find their latest earlier
    occurrence in prompt + output; propose the (up to k) tokens that followed it.
    No model, no state: strong on input-grounded text (summaries, rewrites, code edits).
    """

    name = "ngram"

    def __init__(self, max_n: int = 4, min_n: int = 1, window: int = 4096):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"need 1 <= min_n <= max_n; got {min_n}, {max_n}")
        self.max_n, self.min_n, self.window = max_n, min_n, window

    def propose(self, token_ids: list[int], k: int, request_id: str = "", params=None) -> tuple[list[int], None]:
        tokens = token_ids[-self.window:]
        n_tokens = len(tokens)
        for n in range(min(self.max_n, n_tokens - 1), self.min_n - 1, -1):
            suffix = tokens[-n:]
            first = suffix[0]
            # latest start i < n_tokens - n with tokens[i:i + n] == suffix
            for i in range(n_tokens - n - 1, -1, -1):
                if tokens[i] == first and tokens[i:i + n] == suffix:
                    follow = tokens[i + n:i + n + k]
                    if follow:
                        return follow, None
        return [], None


@dataclass
class SpecConfig:
    proposer: str = "ngram"  # "ngram" (prompt lookup), "draft" (a draft model, draft.py) or "off"
    max_draft_tokens: int = 4  # k at most
    max_batch: int = 4  # speculate only while at most this many requests decode (beyond, it stops paying)
    draft_cost: float = 0.15  # cost of verifying one more token, relative to a one-token decode step
    # cost of a step verifying k drafts, relative to a plain decode step, for k = 0 .. max_draft_tokens;
    # None: 1 + draft_cost * k. The engine measures it at start-up (``LLMEngine._calibrate_speculation``):
    # on CPU a bf16 model's single-row GEMV is much cheaper than any multi-row GEMM, so the first draft
    # costs far more than the next ones.
    step_costs: list[float] | None = None
    ngram_max: int = 4
    ngram_min: int = 1

    def __post_init__(self):
        if self.proposer not in PROPOSERS:
            raise ValueError(f"speculative must be one of {PROPOSERS}; got {self.proposer!r}")
        if self.max_draft_tokens < 1:
            raise ValueError(f"max_draft_tokens must be >= 1; got {self.max_draft_tokens}")


def choose_k(acceptance: float, max_k: int, draft_cost: float, step_costs: list[float] | None = None) -> int:
    """The k that maximises expected tokens per unit of step cost.

    With per-draft acceptance a, a step emits E[k] = (1 - a^(k+1)) / (1 - a) tokens and costs
    step_costs[k] decode steps (default 1 + draft_cost * k); k = 0 (no speculation) is one token
    for cost 1.
    """
    best_k, best = 0, 1.0
    a = min(max(acceptance, 0.0), 0.999)
    for k in range(1, max_k + 1):
        cost = step_costs[k] if step_costs and k < len(step_costs) else 1 + draft_cost * k
        value = (1 - a ** (k + 1)) / (1 - a) / cost
        if value > best:
            best_k, best = k, value
    return best_k


def verify_greedy(logits: torch.Tensor, drafts: list[int]) -> list[int]:
    # logits: [k + 1, V] -> accepted drafts + one target token
    target = logits.argmax(dim=-1).tolist()
    out = []
    for d, t in zip(drafts, target):
        if d != t:
            break
        out.append(d)
    out.append(target[len(out)])
    return out


def verify_sampled(probs: torch.Tensor, drafts: list[int], q: torch.Tensor | None,
                   generator: torch.Generator | None) -> list[int]:
    """Rejection sampling. probs: [k + 1, V] target distributions (after temperature/top-k/top-p);
    q: [k, V] proposal distributions, or None for point masses on the drafts."""
    out = []
    for i, d in enumerate(drafts):
        p_d = probs[i, d].item()
        q_d = 1.0 if q is None else q[i, d].item()
        u = torch.rand((), generator=generator, device="cpu").item()
        if q_d > 0 and u < min(1.0, p_d / q_d):
            out.append(d)
            continue
        residual = probs[i].clone()
        if q is None:
            residual[d] = 0.0
        else:
            residual = (residual - q[i]).clamp_(min=0.0)
        total = residual.sum()
        if total <= 0:  # p equals q: any draw from p is exact
            residual = probs[i]
        out.append(int(torch.multinomial(residual, 1, generator=generator)))
        return out
    out.append(int(torch.multinomial(probs[len(drafts)], 1, generator=generator)))
    return out
