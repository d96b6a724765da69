"""Batched sampling with per-request parameters.

logits [S, vocab] fp32 -> one token id per row. Greedy rows take the argmax.
Sampled rows apply temperature, then top-k, then top-p (nucleus), then draw
with a generator keyed by the request's seed and the output index being
sampled (``position_generator``), so a seeded request samples the same tokens
whatever else shares its batch, and on whichever engine it continues (a
migrated or recovered request needs no RNG state, only its output index).

Before all of it, ``apply_penalties`` lowers the logits of tokens already in a
request's output (presence / frequency penalties); ``token_logprobs`` reads the
log-probabilities a request asked for off the raw logits.
"""

from __future__ import annotations

import torch

from splitserve.engine.device import to_host
from splitserve.engine.sampling_params import SamplingParams


_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """splitmix64's finaliser: a well-spread 64-bit hash of x."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def position_generator(params: SamplingParams, output_index: int) -> torch.Generator | None:
    """The generator for a seeded request's draws at ``output_index`` (None: greedy, or unseeded,
    which use the engine's shared generator)."""
    if params.greedy or params.seed is None:
        return None
    return torch.Generator().manual_seed(_mix64(_mix64(params.seed) ^ output_index) >> 1)


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
           shared: torch.Generator) -> list[int]:
    # logits: [S, V] fp32 on the engine's device; greedy rows are decided there, sampled rows drawn on
    # the host (the generators are CPU ones: the same draws on any device)
    out = logits.argmax(dim=-1).tolist()
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return out
    probs = target_probs(to_host(logits[rows]), [params[i] for i in rows])  # [R, V]
    for j, i in enumerate(rows):
        g = generators[i] or shared
        out[i] = int(torch.multinomial(probs[j], 1, generator=g))
    return out


def target_probs(x: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """The distribution each sampled row draws from: temperature, then top-k, then top-p.
    x: [R, V] logits of non-greedy rows -> [R, V] probabilities (also what speculative
    verification accepts against)."""
    temps = torch.tensor([p.temperature for p in params], dtype=x.dtype, device=x.device)
    x = x / temps[:, None]
    top_ks = [p.top_k for p in params]
    top_ps = torch.tensor([p.top_p for p in params], dtype=x.dtype, device=x.device)
    if any(k > 0 for k in top_ks) or bool((top_ps < 1).any()):
        x = _top_k_top_p(x, top_ks, top_ps)
    return torch.softmax(x, dim=-1)


def _top_k_top_p(x: torch.Tensor, top_ks: list[int], top_ps: torch.Tensor) -> torch.Tensor:
    # x: [R, V] scaled logits; masks everything outside each row's top-k and nucleus with -inf
    sorted_x, idx = x.sort(dim=-1, descending=True)  # [R, V]
    vocab = x.shape[-1]
    ks = torch.tensor([k if 0 < k < vocab else vocab for k in top_ks], device=x.device)
    ranks = torch.arange(vocab, device=x.device)[None, :]
    remove = ranks >= ks[:, None]  # outside top-k
    sorted_x = sorted_x.masked_fill(remove, float("-inf"))
    probs = torch.softmax(sorted_x, dim=-1)
    # keep the smallest prefix whose mass reaches top_p: drop a token if the mass before it already does
    mass_before = probs.cumsum(dim=-1) - probs
    remove = mass_before >= top_ps[:, None]
    remove[:, 0] = False  # always keep the most likely token
    sorted_x = sorted_x.masked_fill(remove, float("-inf"))
    return torch.full_like(x, float("-inf")).scatter(-1, idx, sorted_x)


# One token's log-probability, and the most likely tokens at its position (id, log-probability), best first.
TokenLogprob = tuple[float, list[tuple[int, float]]]


def apply_penalties(logits: torch.Tensor, params: list[SamplingParams], outputs: list[list[int]]) -> torch.Tensor:
    """logits [S, V] fp32 -> a copy where each penalized row r has, for every token t of its output so
    far, logits[r, t] - presence_penalty - frequency_penalty * (times t occurs)."""
    logits = logits.clone()
    vocab = logits.shape[-1]
    for r, (p, ids) in enumerate(zip(params, outputs)):
        if not p.penalized or not ids:
            continue
        counts = torch.bincount(torch.tensor(ids, device=logits.device), minlength=vocab)[:vocab].to(logits.dtype)
        logits[r] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def token_logprobs(logits: torch.Tensor, tokens: list[int], top: list[int]) -> list[TokenLogprob]:
    """logits [R, V] (raw) and the token chosen from each row -> per row, the chosen token's
    log-probability and the ``top[r]`` most likely tokens' (best first)."""
    lp = torch.log_softmax(logits.float(), dim=-1)  # [R, V]
    chosen = lp.gather(1, torch.tensor(tokens, device=lp.device)[:, None])[:, 0].tolist()  # [R]
    k = max(top, default=0)
    best_lp, best_ids = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())  # [R, k]
    best_lp, best_ids = best_lp.tolist(), best_ids.tolist()
    return [(chosen[r], list(zip(best_ids[r][:top[r]], best_lp[r][:top[r]]))) for r in range(len(tokens))]
