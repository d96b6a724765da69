"""The layer-overlapped transfer's engine side (engine/kv_stream.py): which blocks are final after a
step, and a bounded hand-over in which the forward never waits for the sender."""

import asyncio

import torch

from splitserve.engine.kv_stream import KVStream, final_blocks


def test_final_blocks_counts_full_blocks_and_the_last_partial_one_only_when_sampling():
    assert [final_blocks(end, False, 4) for end in (0, 3, 4, 11, 12)] == [0, 0, 1, 2, 3]
    assert [final_blocks(end, True, 4) for end in (1, 4, 11, 12)] == [1, 1, 3, 3]


def test_stream_hands_over_copies_in_order_and_skips_when_full_without_waiting():
    kv_layer = torch.arange(6 * 2 * 4, dtype=torch.float32).view(6, 2, 4, 1, 1)  # [blocks, 2, bs, Hkv, D]
    table = [5, 3, 1, 0]

    async def run():
        stream = KVStream(num_layers=2, loop=asyncio.get_running_loop(), max_pending=1)
        stream.offer(0, table, 2, kv_layer)  # blocks 0..2 of layer 0
        stream.offer(0, table, 2, kv_layer)  # nothing new: no piece
        kv_layer[5] = -1  # a copy was queued: later writes do not change it
        stream.offer(1, table, 3, kv_layer)  # no room (max_pending 1): skipped at once, not waited for
        assert stream.sent == [2, 0] and stream.num_skipped == 1
        pieces = []
        async for piece in stream.pieces():
            pieces.append(piece)
            if len(pieces) == 1:  # room again: the skipped blocks go with the next offer of that layer
                stream.offer(1, table, 4, kv_layer)
            else:
                stream.end()
        stream.close()
        stream.offer(0, table, 4, kv_layer)  # closed: dropped
        return pieces, stream.sent

    pieces, sent = asyncio.run(run())
    assert [(layer, first, data.shape[0]) for layer, first, data in pieces] == [(0, 0, 2), (1, 0, 4)]
    assert pieces[0][2][0].min() >= 0 and torch.equal(pieces[0][2][1], torch.arange(24, 32.).view(2, 4, 1, 1))
    assert pieces[1][2][0].max() == -1  # copied at its offer, after the write
    assert sent == [2, 4]
