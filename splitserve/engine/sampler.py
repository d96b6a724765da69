"""Batched sampling with per-request parameters.

logits [S, vocab] fp32 -> one token id per row. Greedy rows take the argmax.
Sampled rows apply temperature, then top-k, then top-p (nucleus), then draw
with the request's own ``torch.Generator`` (seeded from ``SamplingParams.seed``
when given), so a seeded request samples the same tokens whatever else shares
its batch.
"""

from __future__ import annotations

import torch

from splitserve.engine.sampling_params import SamplingParams


def make_generator(params: SamplingParams, fallback: torch.Generator) -> torch.Generator | None:
    """A request's private generator (seeded), or None to use the engine's shared one."""
    if params.greedy or params.seed is None:
        return None
    g = torch.Generator()
    g.manual_seed(params.seed)
    return g


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
           shared: torch.Generator) -> list[int]:
    # logits: [S, V] fp32
    out = logits.argmax(dim=-1).tolist()
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return out
    probs = target_probs(logits[rows], [params[i] for i in rows])  # [R, V]
    for j, i in enumerate(rows):
        g = generators[i] or shared
        out[i] = int(torch.multinomial(probs[j], 1, generator=g))
    return out


def target_probs(x: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """The distribution each sampled row draws from: temperature, then top-k, then top-p.
    x: [R, V] logits of non-greedy rows -> [R, V] probabilities (also what speculative
    verification accepts against)."""
    temps = torch.tensor([p.temperature for p in params], dtype=x.dtype)
    x = x / temps[:, None]
    top_ks = [p.top_k for p in params]
    top_ps = torch.tensor([p.top_p for p in params], dtype=x.dtype)
    if any(k > 0 for k in top_ks) or bool((top_ps < 1).any()):
        x = _top_k_top_p(x, top_ks, top_ps)
    return torch.softmax(x, dim=-1)


def _top_k_top_p(x: torch.Tensor, top_ks: list[int], top_ps: torch.Tensor) -> torch.Tensor:
    # x: [R, V] scaled logits; masks everything outside each row's top-k and nucleus with -inf
    sorted_x, idx = x.sort(dim=-1, descending=True)  # [R, V]
    vocab = x.shape[-1]
    ks = torch.tensor([k if 0 < k < vocab else vocab for k in top_ks])
    ranks = torch.arange(vocab)[None, :]
    remove = ranks >= ks[:, None]  # outside top-k
    sorted_x = sorted_x.masked_fill(remove, float("-inf"))
    probs = torch.softmax(sorted_x, dim=-1)
    # keep the smallest prefix whose mass reaches top_p: drop a token if the mass before it already does
    mass_before = probs.cumsum(dim=-1) - probs
    remove = mass_before >= top_ps[:, None]
    remove[:, 0] = False  # always keep the most likely token
    sorted_x = sorted_x.masked_fill(remove, float("-inf"))
    return torch.full_like(x, float("-inf")).scatter(-1, idx, sorted_x)
