"""The receiving side of KV transfers: a grpc.aio service every decode worker runs.

Lifecycle of one transfer on this side::

    Reserve      -> blocks allocated (RESERVED), or RESOURCE_EXHAUSTED
    Transfer     -> header checked (token, reservation, fingerprint) -> chunks checked (CRC32C,
                    bounds) and written into the reserved blocks -> Commit -> joined to the batch
    any failure  -> the reservation is cancelled (blocks freed); nothing half-written is ever decoded
    no Transfer within ``reservation_ttl_s`` -> the reservation expires (the sender is gone)
"""

from __future__ import annotations

import asyncio
import json
import time

import grpc

from splitserve.engine.handoff import HandoffState
from splitserve.engine.sampling_params import SamplingParams
from splitserve.kvtransfer import kvtransfer_pb2 as pb
from splitserve.kvtransfer import kvtransfer_pb2_grpc as pb_grpc
from splitserve.kvtransfer.wire import TOKEN_METADATA_KEY, check_codec, decode_chunk, describe_mismatch


class EngineKVSink:
    """Adapter from the servicer to a decode engine, taking the engine lock for each call."""

    def __init__(self, engine, lock, commit=None):
        from splitserve.kvtransfer.wire import fingerprint
        self.engine, self.lock, self._commit = engine, lock, commit
        self.layout = fingerprint(engine.model_config, engine.kv_spec)

    def reserve(self, rid: str, num_tokens: int):
        with self.lock:
            return self.engine.reserve(rid, num_tokens), self.engine.kv.num_free_blocks

    def write(self, rid, layer, first_block, data):
        # No engine lock: a reservation's blocks belong to no running request, so the engine's
        # step never reads or writes them; taking the lock would make every chunk wait out a step.
        self.engine.write_kv(rid, layer, first_block, data)

    def num_reserved_blocks(self, rid) -> int:
        with self.lock:
            return len(self.engine.kv.block_table(rid))

    def commit(self, state: HandoffState):
        if self._commit is not None:  # e.g. AsyncEngine.adopt: commit and open the output stream atomically
            self._commit(state)
            return
        with self.lock:
            self.engine.commit(state)

    def cancel(self, rid: str):
        with self.lock:
            self.engine.cancel_reservation(rid)


class KVTransferServicer(pb_grpc.KVTransferServicer):
    def __init__(self, sink: EngineKVSink, cluster_token: str, reservation_ttl_s: float = 30.0):
        self.sink = sink
        self.token = cluster_token
        self.ttl = reservation_ttl_s
        self._reservations: dict[str, float] = {}  # rid -> reserved at (monotonic)
        self._in_transfer: set[str] = set()
        self.num_bytes_received = 0
        self.num_transfers_committed = 0
        self.num_transfers_failed = 0

    async def _check_token(self, context) -> None:
        if dict(context.invocation_metadata()).get(TOKEN_METADATA_KEY) != self.token:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                f"KV-plane calls need the cluster token in metadata {TOKEN_METADATA_KEY!r}")

    async def Reserve(self, request: pb.ReserveRequest, context):
        await self._check_token(context)
        self.expire_reservations()
        mismatch = describe_mismatch(request.layout, self.sink.layout)
        if mismatch:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"KV layout mismatch: {mismatch}")
        try:
            blocks, free = self.sink.reserve(request.request_id, request.num_tokens)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if blocks is None:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"no room for {request.num_tokens} tokens ({free} free blocks)")
        self._reservations[request.request_id] = time.monotonic()
        return pb.ReserveResponse(num_blocks=self.sink.num_reserved_blocks(request.request_id),
                                  num_free_blocks=free)

    async def Release(self, request: pb.ReleaseRequest, context):
        await self._check_token(context)
        known = self._reservations.pop(request.request_id, None) is not None
        if known:
            self.sink.cancel(request.request_id)
        return pb.ReleaseResponse(released=known)

    async def Transfer(self, request_iterator, context):
        await self._check_token(context)
        rid = None

        async def fail(code, message):
            # Free the reservation before the status can reach the sender: once it sees the error,
            # the blocks are already back in the pool.
            self._drop(rid)
            await context.abort(code, message)

        try:
            first = await anext(aiter(request_iterator), None)
            if first is None or first.WhichOneof("kind") != "header":
                await fail(grpc.StatusCode.INVALID_ARGUMENT, "a transfer must start with its header")
            header = first.header
            if header.request_id not in self._reservations or header.request_id in self._in_transfer:
                await fail(grpc.StatusCode.FAILED_PRECONDITION,
                           f"no open reservation for request {header.request_id!r}")
            rid = header.request_id
            self._in_transfer.add(rid)
            mismatch = describe_mismatch(header.layout, self.sink.layout)
            if mismatch:
                await fail(grpc.StatusCode.FAILED_PRECONDITION, f"KV layout mismatch: {mismatch}")
            try:
                codec = check_codec(header.kv_codec)
            except ValueError as e:
                await fail(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            num_chunks = num_bytes = 0
            async for msg in request_iterator:
                kind = msg.WhichOneof("kind")
                if kind == "chunk":
                    try:
                        data = decode_chunk(msg.chunk, header.layout, codec)
                        self.sink.write(rid, msg.chunk.layer, msg.chunk.first_block, data)
                    except ValueError as e:
                        await fail(grpc.StatusCode.DATA_LOSS, str(e))
                    num_chunks += 1
                    num_bytes += len(msg.chunk.data)
                elif kind == "commit":
                    if (msg.commit.num_chunks, msg.commit.num_bytes) != (num_chunks, num_bytes):
                        await fail(grpc.StatusCode.DATA_LOSS,
                                   f"commit announces {msg.commit.num_chunks} chunks / {msg.commit.num_bytes} "
                                   f"bytes, received {num_chunks} / {num_bytes}")
                    self.sink.commit(_state(header))
                    self._in_transfer.discard(rid)
                    self._reservations.pop(rid, None)
                    rid = None  # committed: the blocks now belong to a running request
                    self.num_bytes_received += num_bytes
                    self.num_transfers_committed += 1
                    return pb.TransferAck(num_bytes=num_bytes, num_chunks=num_chunks)
                else:
                    await fail(grpc.StatusCode.INVALID_ARGUMENT, "a second header in one transfer")
            await fail(grpc.StatusCode.ABORTED, "the transfer stream ended without a commit")
        finally:
            self._drop(rid)  # a broken stream or cancellation: no-op if already dropped or committed

    def _drop(self, rid: str | None) -> None:
        if rid is None or rid not in self._reservations:
            return
        self._in_transfer.discard(rid)
        self._reservations.pop(rid)
        self.num_transfers_failed += 1
        self.sink.cancel(rid)

    def expire_reservations(self) -> int:
        now = time.monotonic()
        stale = [r for r, t in self._reservations.items() if now - t > self.ttl and r not in self._in_transfer]
        for rid in stale:
            del self._reservations[rid]
            self.sink.cancel(rid)
        return len(stale)

    async def reap_forever(self, period_s: float = 1.0) -> None:
        while True:
            await asyncio.sleep(period_s)
            self.expire_reservations()


def _state(header: pb.TransferHeader) -> HandoffState:
    params = SamplingParams(**json.loads(header.sampling_params_json))
    return HandoffState(header.request_id, list(header.prompt_token_ids), list(header.output_token_ids), params,
                        bytes(header.generator_state) or None)


async def start_server(servicer: KVTransferServicer, host: str = "127.0.0.1", port: int = 0):
    """Serve on host:port (0 = any free port). Returns (server, bound port)."""
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20)])
    pb_grpc.add_KVTransferServicer_to_server(servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    return server, bound
