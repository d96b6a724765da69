"""Perplexity of a model on the offline English corpus: the accuracy gate of quantization.

The corpus (``workload.corpus_text``: standard-library docstrings) is tokenized
and cut into windows of ``window + 1`` tokens; every window is scored on its
own (no context across windows), ``window`` targets each. A window runs as two
prefill chunks over the paged cache, like a disaggregated request:

    tokens [0, window/2)        prefill chunk 1 -> its logits score targets 1 .. window/2
    (kv_codec="int8": the chunk's KV is sent through the wire codec and back, as a
     decode worker would receive it)
    tokens [window/2, window)   chunk 2, attending over the cached chunk 1 -> targets window/2 + 1 .. window

    perplexity = exp(mean negative log-likelihood over all targets)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from splitserve.engine.kv_cache import KVCacheSpec, allocate_kv_cache
from splitserve.engine.runner import StepSequence, prepare_step


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    num_tokens: int  # targets scored
    num_windows: int
    predictions: torch.Tensor  # [num_tokens] the model's argmax at every scored position

    def top1_agreement(self, other: "PerplexityResult") -> float:
        """Share of positions where two models' most likely next token is the same (teacher-forced)."""
        return (self.predictions == other.predictions).float().mean().item()


def corpus_token_ids(tokenizer, num_tokens: int) -> list[int]:
    from splitserve.bench.workload import corpus_text
    ids = tokenizer.encode(corpus_text())
    if len(ids) < num_tokens:
        raise ValueError(f"the corpus has {len(ids)} tokens; {num_tokens} were asked for")
    return ids[:num_tokens]


def _roundtrip_int8(kv_cache: torch.Tensor, blocks: torch.Tensor) -> None:
    """What the int8 wire codec does to a sequence's KV, applied in place: [L, n, 2, bs, H, D]."""
    from splitserve.kernels import ops
    kv = kv_cache[:, blocks]
    q, scale = ops.kv_quantize(kv.reshape(-1, kv.shape[-1]))
    kv_cache[:, blocks] = ops.kv_dequantize(q, scale, kv_cache.dtype).view(kv.shape)


@torch.inference_mode()
def perplexity(model, token_ids: list[int], window: int = 512, block_size: int = 16,
               kv_codec: str = "raw", progress=None, decoder=None) -> PerplexityResult:
    """``decoder`` (a ``kernels.cpu_decode.FusedDecoder`` of ``model``): score every position as a
    decode step through it instead, one token per step, all windows in one batch."""
    if decoder is not None:
        return _decode_perplexity(model, decoder, token_ids, window, block_size, progress)
    if window < 2 or window % 2:
        raise ValueError(f"window must be an even number >= 2; got {window}")
    cfg = model.cfg
    num_blocks = -(-window // block_size)
    kv = allocate_kv_cache(KVCacheSpec(cfg.num_layers, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim,
                                       model.dtype))
    table = tuple(range(num_blocks))
    half = window // 2
    starts = list(range(0, len(token_ids) - window, window))
    if not starts:
        raise ValueError(f"need more than {window} tokens; got {len(token_ids)}")
    nll, count, predictions = 0.0, 0, []
    for start in progress(starts, "perplexity") if progress else starts:
        ids = token_ids[start:start + window + 1]
        for lo, hi in ((0, half), (half, window)):
            step = prepare_step([StepSequence(ids[lo:hi], lo, table, True)], block_size, kv.dtype)
            logits = model(step.input_ids, kv, step.meta, torch.arange(hi - lo))  # [hi - lo, V] fp32
            targets = torch.tensor(ids[lo + 1:hi + 1])
            nll += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
            count += hi - lo
            predictions.append(logits.argmax(dim=-1))
            if lo == 0 and kv_codec == "int8":
                _roundtrip_int8(kv, torch.tensor(table[:-(-half // block_size)]))
    return PerplexityResult(math.exp(nll / count), count, len(starts), torch.cat(predictions))


def _decode_perplexity(model, decoder, token_ids, window, block_size, progress) -> PerplexityResult:
    cfg = model.cfg
    starts = list(range(0, len(token_ids) - window, window))
    if not starts:
        raise ValueError(f"need more than {window} tokens; got {len(token_ids)}")
    per_window = -(-window // block_size)
    kv = allocate_kv_cache(KVCacheSpec(cfg.num_layers, per_window * len(starts), block_size, cfg.num_kv_heads,
                                       cfg.head_dim, model.dtype))
    tables = [tuple(range(i * per_window, (i + 1) * per_window)) for i in range(len(starts))]
    nll, rows = 0.0, []
    for p in progress(range(window), "decode perplexity") if progress else range(window):
        step = prepare_step([StepSequence([token_ids[s + p]], p, t, True) for s, t in zip(starts, tables)],
                            block_size, kv.dtype)
        logits = decoder(step, kv)  # [W, V] fp32, window order
        targets = torch.tensor([token_ids[s + p + 1] for s in starts])
        nll += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
        rows.append(logits.argmax(dim=-1))
    predictions = torch.stack(rows, dim=1).reshape(-1)  # window by window, as perplexity() orders them
    count = window * len(starts)
    return PerplexityResult(math.exp(nll / count), count, len(starts), predictions)
