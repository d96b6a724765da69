"""The model runner: turns one scheduled step into tensors and runs the model.

Input: a list of :class:`StepSequence` (new token ids of one sequence, where
they start, its block table, whether its next token is wanted). Output: logits
``[S, vocab]`` for the sequences that sample, in input order: one row each, or
``1 + k`` adjacent rows for a sequence verifying k speculative drafts.

Decode sequences (one new token) are laid out first in the flattened batch so
attention can treat them as one group (see ``attention.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from splitserve.engine.attention import AttentionMetadata, PrefillChunk


@dataclass(frozen=True)
class StepSequence:
    token_ids: list[int]  # the new tokens this step computes
    start: int  # position of token_ids[0] (= tokens already in the cache)
    block_table: tuple[int, ...]  # covers at least start + len(token_ids) tokens
    samples: bool  # is the next token after these wanted?
    num_logits: int = 1  # when sampling: logits of this many trailing positions (1 + speculative drafts)


@dataclass(frozen=True)
class PreparedStep:
    input_ids: torch.Tensor  # [N]
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # [S]
    sample_order: tuple[int, ...]  # for each logits row, index into the input sequence list (a sequence's
                                   # rows are adjacent, in position order)


def prepare_step(seqs: list[StepSequence], block_size: int, dtype: torch.dtype = torch.float32,
                 device: torch.device = torch.device("cpu")) -> PreparedStep:
    """``dtype``: the KV cache's, which the decode attention mask is built in; ``device``: the KV cache's,
    where every tensor of the step is made (from Python lists on the host)."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i].token_ids) != 1)  # decodes first, stable
    ids: list[int] = []
    positions: list[int] = []
    slot_blocks: list[int] = []
    slot_offsets: list[int] = []
    logits_rows: list[tuple[int, int]] = []  # (input index, row in N)
    prefills: list[PrefillChunk] = []
    decode_tables: list[tuple[int, ...]] = []
    decode_lens: list[int] = []
    for i in order:
        s = seqs[i]
        n, row0 = len(s.token_ids), len(ids)
        ids.extend(s.token_ids)
        for p in range(s.start, s.start + n):
            positions.append(p)
            slot_blocks.append(s.block_table[p // block_size])
            slot_offsets.append(p % block_size)
        if s.samples:
            logits_rows.extend((i, row0 + n - j) for j in range(s.num_logits, 0, -1))
        if n == 1:
            num_blocks = -(-(s.start + 1) // block_size)
            decode_tables.append(s.block_table[:num_blocks])
            decode_lens.append(s.start + 1)
        else:
            num_blocks = -(-(s.start + n) // block_size)
            prefills.append(PrefillChunk(row0, row0 + n, s.start,
                                         torch.tensor(s.block_table[:num_blocks], dtype=torch.long, device=device)))

    decode_block_tables = decode_mask = decode_context_lens = None
    if decode_tables:
        width = max(len(t) for t in decode_tables)
        decode_block_tables = torch.tensor([list(t) + [0] * (width - len(t)) for t in decode_tables],
                                           dtype=torch.long, device=device)  # [B, width]
        decode_context_lens = torch.tensor(decode_lens, dtype=torch.long, device=device)
        # additive float mask (0 = attend, -inf = padding): SDPA would convert a bool mask in every layer
        visible = torch.arange(width * block_size, device=device)[None, :] < decode_context_lens[:, None]
        decode_mask = torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill_(
            ~visible, float("-inf"))[:, None, None, :]

    logits_rows.sort(key=lambda r: r[1])
    meta = AttentionMetadata(
        positions=torch.tensor(positions, dtype=torch.long, device=device),
        slot_blocks=torch.tensor(slot_blocks, dtype=torch.long, device=device),
        slot_offsets=torch.tensor(slot_offsets, dtype=torch.long, device=device),
        num_decodes=len(decode_tables),
        decode_block_tables=decode_block_tables,
        decode_mask=decode_mask,
        decode_context_lens=decode_context_lens,
        prefills=tuple(prefills),
    )
    return PreparedStep(
        input_ids=torch.tensor(ids, dtype=torch.long, device=device),
        meta=meta,
        logits_indices=torch.tensor([r for _, r in logits_rows], dtype=torch.long, device=device),
        sample_order=tuple(i for i, _ in logits_rows),
    )


class ModelRunner:
    """``decoder``: a whole-model decode step for steps that are all single-token decodes
    (``kernels/cpu_decode.py``), or None; every other step runs ``model``."""

    def __init__(self, model, kv_cache: torch.Tensor, block_size: int, decoder=None):
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.decoder = decoder

    def execute(self, seqs: list[StepSequence], on_layer=None) -> tuple[torch.Tensor, tuple[int, ...]]:
        """Run one step. Returns (logits [S, vocab] fp32, index into ``seqs`` of each row).
        ``on_layer(i)``: called once layer i's KV is written (the Python model runs the step)."""
        step = prepare_step(seqs, self.block_size, self.kv_cache.dtype, self.kv_cache.device)
        if self.decoder is not None and on_layer is None and \
                step.meta.num_decodes == len(seqs) == len(step.sample_order):
            return self.decoder(step, self.kv_cache), step.sample_order
        logits = self.model(step.input_ids, self.kv_cache, step.meta, step.logits_indices, on_layer)
        return logits, step.sample_order
