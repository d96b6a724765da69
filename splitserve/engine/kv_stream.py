"""A request's KV handed out layer by layer while its prefill computes (the layer-overlapped transfer).

The prefill worker reserves room on a decode worker before the prompt is
computed and attaches a ``KVStream`` to the request. Then::

    engine thread, in each prefill step's forward, after layer l:
        blocks of layer l that became final      copied out of the cache and queued, if fewer than
                                                 ``max_pending`` pieces wait; else skipped (they go in
                                                 a later piece, or from the held blocks at the end)
    sender (the worker's event loop)             each queued piece -> one wire chunk (kvtransfer/client.py)
    the request's last prefill step              its partial last block is final too (the request is held)
    the worker sees "prefilled" -> end()         the sender sends what is missing, then the commit

The forward never waits for the sender: the sender's event loop also takes
the engine lock (to read a held request's snapshot and blocks), so a forward
waiting for it could wait forever. A slow sender costs overlap, not progress.

A block is final for layer l once every one of its slots up to the tokens the
step computed holds KV: ``final_blocks``. Pieces are copies, so a preemption
(blocks freed, recomputed later) cannot change what was sent; the recompute
only sends what lies past the pieces already sent. The engine owns the map
of streams (``LLMEngine.kv_streams``); a stream leaves it when its request
is held or finishes.
"""

from __future__ import annotations

import asyncio
import threading

import torch

from splitserve.engine.device import to_host


def final_blocks(end: int, samples: bool, block_size: int) -> int:
    """Blocks whose KV can no longer change once the tokens before ``end`` are computed: the full ones, and
    the partial last one when the step samples (a held request computes nothing more here)."""
    return -(-end // block_size) if samples else end // block_size


class KVStream:
    """One request's pieces from the engine thread to an asyncio consumer. ``max_pending`` bounds the
    pieces queued and not yet taken (memory: a piece is one layer's new blocks of one step)."""

    def __init__(self, num_layers: int, loop: asyncio.AbstractEventLoop, max_pending: int = 64):
        self.sent = [0] * num_layers  # blocks of each layer already queued (written by the engine thread)
        self.closed = False  # the consumer is gone: offers are dropped
        self.num_skipped = 0  # offers dropped for want of room (their blocks went later)
        self._loop = loop
        self._queue: asyncio.Queue = asyncio.Queue()  # (layer, first block, [n, 2, bs, Hkv, D]); None: the end
        self._room = threading.Semaphore(max_pending)

    def offer(self, layer: int, block_table, num_final: int, kv_layer: torch.Tensor) -> None:
        """(Engine thread; never waits.) Queue blocks ``sent[layer]..num_final`` of this layer, if any and
        if there is room."""
        first = self.sent[layer]
        if self.closed or num_final <= first:
            return
        if not self._room.acquire(blocking=False):
            self.num_skipped += 1
            return
        ids = torch.tensor(block_table[first:num_final], dtype=torch.long, device=kv_layer.device)
        data = to_host(kv_layer[ids])  # a copy in host memory: [n, 2, bs, Hkv, D]
        self.sent[layer] = num_final
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, (layer, first, data))
        except RuntimeError:  # the consumer's event loop is closed
            self.closed = True

    def end(self) -> None:
        """(The consumer's event loop.) No more pieces: the request was held, or will never be."""
        self._queue.put_nowait(None)

    def close(self) -> None:
        """(Any thread.) The consumer is gone: later offers are dropped."""
        self.closed = True

    async def pieces(self):
        """(The consumer's event loop.) The queued pieces in order, until ``end``."""
        while (piece := await self._queue.get()) is not None:
            self._room.release()
            yield piece


def layer_hook(chunks, streams: dict, kv_cache: torch.Tensor, block_size: int):
    """The forward's per-layer callback for one step (None when no request in it streams):
    ``hook(layer)`` offers each streaming request's newly final blocks of that layer."""
    offers = []
    for c in chunks:
        stream = streams.get(c.request.request_id)
        if stream is not None:
            offers.append((stream, c.block_table, final_blocks(c.end, c.samples, block_size)))
    if not offers:
        return None

    def hook(layer: int) -> None:
        for stream, table, num_final in offers:
            stream.offer(layer, table, num_final, kv_cache[layer])
    return hook
