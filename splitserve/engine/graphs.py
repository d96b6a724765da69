"""Decode steps replayed from CUDA graphs captured per batch-size bucket.

A batch-1 decode step of a small model launches hundreds of kernels whose
launch cost is many times the model's own GPU time; a CUDA graph replays
them all from one launch. A graph replays fixed addresses and shapes, so:

    buffers    one set of static input tensors at the largest bucket, on the
               device: ids, positions, slot blocks and offsets [Bmax], block
               tables [Bmax, W] (W: blocks of the longest sequence the engine
               admits), context lengths [Bmax]. Each bucket's graph reads the
               first n rows.
    capture    at start-up, for each bucket n of the ladder (largest first, so
               the smaller ones reuse its memory pool): fill the buffers with
               padding, run the forward once eagerly (Triton compiles and
               autotunes outside the capture), capture it.
    replay     a decode-only step of B sequences takes the smallest bucket
               n >= B: its inputs are copied into rows 0..B-1, rows B..n-1 are
               padding (token 0 at position 0 writing its K/V into the pad
               block, a block of the cache the block pool never hands out, with
               a context of 1), the graph replays, and rows 0..B-1 of its
               logits are the step's. Larger batches, prefill chunks and
               speculative verification run the eager model.

``mode``: "capture" (CUDA), or "eager": the same buffers, padding and buckets,
each replay an eager forward over them (how the CPU tests check this logic,
and a way to tell a graph bug from a buffer bug).
"""

from __future__ import annotations

import torch

from splitserve.engine.attention import AttentionMetadata

DEFAULT_LADDER = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


def ladder_for(max_batch: int, ladder: tuple[int, ...] = DEFAULT_LADDER) -> tuple[int, ...]:
    """The buckets up to ``max_batch`` (the engine's max_num_seqs), with ``max_batch`` itself as the last."""
    sizes = sorted({n for n in ladder if n < max_batch} | {max_batch})
    return tuple(sizes)


class GraphRunner:
    """``decoder(step, kv_cache) -> logits`` for the runner (as the C++ CPU decoder is): see the module
    docstring. ``kv_cache`` must hold one more block than the block pool: ``pad_block``."""

    def __init__(self, model, kv_cache: torch.Tensor, block_size: int, max_model_len: int,
                 buckets: tuple[int, ...], mode: str = "capture"):
        if mode not in ("capture", "eager"):
            raise ValueError(f"mode must be 'capture' or 'eager'; got {mode!r}")
        self.model, self.kv_cache, self.block_size, self.mode = model, kv_cache, block_size, mode
        self.buckets = tuple(sorted(buckets))
        self.pad_block = kv_cache.shape[1] - 1
        device, bmax = kv_cache.device, self.buckets[-1]
        width = -(-max_model_len // block_size)
        self.ids = torch.zeros(bmax, dtype=torch.long, device=device)  # [Bmax]
        self.positions = torch.zeros(bmax, dtype=torch.long, device=device)  # [Bmax]
        self.slot_blocks = torch.full((bmax,), self.pad_block, dtype=torch.long, device=device)  # [Bmax]
        self.slot_offsets = torch.zeros(bmax, dtype=torch.long, device=device)  # [Bmax]
        self.block_tables = torch.full((bmax, width), self.pad_block, dtype=torch.long, device=device)  # [Bmax, W]
        self.context_lens = torch.ones(bmax, dtype=torch.long, device=device)  # [Bmax]
        self.indices = torch.arange(bmax, dtype=torch.long, device=device)  # [Bmax]: every row's logits
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}  # bucket -> [n, V] static output of its graph
        self.replays = {n: 0 for n in self.buckets}  # steps served per bucket (stats, tests)
        self.eager_steps = 0  # decode-only steps too big for any bucket

    def bucket(self, batch: int) -> int | None:
        """The smallest bucket holding ``batch`` rows, None when it is bigger than all."""
        return next((n for n in self.buckets if n >= batch), None)

    def _forward(self, n: int) -> torch.Tensor:
        meta = AttentionMetadata(positions=self.positions[:n], slot_blocks=self.slot_blocks[:n],
                                 slot_offsets=self.slot_offsets[:n], num_decodes=n,
                                 decode_block_tables=self.block_tables[:n], decode_mask=None,
                                 decode_context_lens=self.context_lens[:n], prefills=())
        return self.model(self.ids[:n], self.kv_cache, meta, self.indices[:n])  # [n, V] fp32

    def _pad(self, first: int = 0) -> None:
        """Rows ``first``.. of every buffer: padding (token 0 at position 0, K/V into the pad block)."""
        self.ids[first:].zero_()
        self.positions[first:].zero_()
        self.slot_blocks[first:].fill_(self.pad_block)
        self.slot_offsets[first:].zero_()
        self.block_tables[first:].fill_(self.pad_block)
        self.context_lens[first:].fill_(1)

    def capture(self, progress=None) -> None:
        """Capture one graph per bucket, largest first (``mode`` "capture"; "eager" has nothing to do).
        ``progress(items, desc)``: the engine's progress bar."""
        if self.mode != "capture":
            return
        pool = None
        buckets = sorted(self.buckets, reverse=True)
        for n in (progress(buckets, "capturing decode graphs") if progress else buckets):
            self._pad()
            stream = torch.cuda.Stream(self.kv_cache.device)
            stream.wait_stream(torch.cuda.current_stream(self.kv_cache.device))
            with torch.cuda.stream(stream):
                self._forward(n)  # compiles / autotunes the kernels outside the capture
            torch.cuda.current_stream(self.kv_cache.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[n] = self._forward(n)
            pool = graph.pool()
            self.graphs[n] = graph
        torch.cuda.synchronize(self.kv_cache.device)

    def __call__(self, step, kv_cache: torch.Tensor) -> torch.Tensor:
        """``step``: a runner ``PreparedStep`` of decodes only -> logits [B, vocab] fp32, in input order (a
        view of the bucket's static output: valid until the next step). Eager when no graph holds it (too
        many rows, or not captured yet)."""
        meta, b = step.meta, step.meta.num_decodes
        n = self.bucket(b)
        if n is None or kv_cache is not self.kv_cache or (self.mode == "capture" and n not in self.graphs):
            self.eager_steps += 1
            return self.model(step.input_ids, kv_cache, meta, step.logits_indices)
        width = meta.decode_block_tables.shape[1]
        self.ids[:b].copy_(step.input_ids)
        self.positions[:b].copy_(meta.positions)
        self.slot_blocks[:b].copy_(meta.slot_blocks)
        self.slot_offsets[:b].copy_(meta.slot_offsets)
        self.block_tables[:b, :width].copy_(meta.decode_block_tables)  # columns past a row's context: not read
        self.context_lens[:b].copy_(meta.decode_context_lens)
        self._pad(b)
        self.replays[n] += 1
        if self.mode == "eager":
            return self._forward(n)[:b]
        self.graphs[n].replay()
        return self.logits[n][:b]
