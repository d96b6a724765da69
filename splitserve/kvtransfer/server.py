"""The receiving side of KV transfers: a grpc.aio service every decode worker runs.

Lifecycle of one transfer on this side::

    Reserve      -> blocks allocated (RESERVED), or RESOURCE_EXHAUSTED
    Transfer     -> header checked (token, reservation, fingerprint) -> chunks checked (CRC32C,
                    bounds) and written into the reserved blocks (a Grow first extends the
                    reservation: a migrating request grew) -> Commit(snapshot) -> joined to the batch
    any failure  -> the reservation is cancelled (blocks freed); nothing half-written is ever decoded
    no Transfer within ``reservation_ttl_s`` -> the reservation expires (the sender is gone)
    Release      -> a reservation given back; for a request already committed, ``on_release``
                    (the worker aborts it: its client left while it moved)

The servicer talks to the engine only through a KV port (``engine/kv_port.py``).
``start_server`` serves it plaintext, or mutual TLS only (``tls.py``): then a
peer without a certificate from the cluster's CA never reaches a call.
"""

from __future__ import annotations

import asyncio
import time

import grpc

from splitserve.errors import InvalidRequestError
from splitserve.kvtransfer import kvtransfer_pb2 as pb
from splitserve.kvtransfer import kvtransfer_pb2_grpc as pb_grpc
from splitserve.kvtransfer.endpoint import join_host_port
from splitserve.kvtransfer.tls import KVTLS
from splitserve.kvtransfer.wire import (TOKEN_METADATA_KEY, check_codec, decode_chunk, describe_mismatch,
                                        fingerprint, snapshot_from_pb)


class KVTransferServicer(pb_grpc.KVTransferServicer):
    def __init__(self, port, cluster_token: str, reservation_ttl_s: float = 30.0, on_release=None,
                 accepting=lambda: True):
        self.port = port
        self.layout = fingerprint(port.model_config, port.kv_spec)
        self.token = cluster_token
        self.ttl = reservation_ttl_s
        self.on_release = on_release  # (request id) -> bool: a Release for a request no longer reserved
        self.accepting = accepting  # () -> bool: False while the worker drains (reservations refused)
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
        mismatch = describe_mismatch(request.layout, self.layout)
        if mismatch:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"KV layout mismatch: {mismatch}")
        if not self.accepting():
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "this worker is draining: it takes no new "
                                                                    "requests")
        try:
            blocks, free = self.port.reserve(request.request_id, request.num_tokens)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if blocks is None:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"no room for {request.num_tokens} tokens ({free} free blocks)")
        self._reservations[request.request_id] = time.monotonic()
        return pb.ReserveResponse(num_blocks=self.port.reserved_blocks(request.request_id),
                                  num_free_blocks=free)

    async def Release(self, request: pb.ReleaseRequest, context):
        await self._check_token(context)
        rid = request.request_id
        if rid in self._in_transfer:  # its transfer is running: it fails at its next message, freeing the blocks
            self._in_transfer.discard(rid)
            released = True
        elif self._reservations.pop(rid, None) is not None:
            released = self.port.cancel(rid)
        else:
            released = bool(self.on_release and self.on_release(rid))
        return pb.ReleaseResponse(released=released)

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
            mismatch = describe_mismatch(header.layout, self.layout)
            if mismatch:
                await fail(grpc.StatusCode.FAILED_PRECONDITION, f"KV layout mismatch: {mismatch}")
            try:
                codec = check_codec(header.kv_codec)
            except ValueError as e:
                await fail(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            num_chunks = num_bytes = 0
            async for msg in request_iterator:
                if rid not in self._in_transfer:  # released meanwhile
                    await fail(grpc.StatusCode.CANCELLED, f"request {rid!r} was released during its transfer")
                kind = msg.WhichOneof("kind")
                if kind == "chunk":
                    try:
                        data = decode_chunk(msg.chunk, header.layout, codec)
                        self.port.write(rid, msg.chunk.layer, msg.chunk.first_block, data)
                    except ValueError as e:
                        await fail(grpc.StatusCode.DATA_LOSS, str(e))
                    num_chunks += 1
                    num_bytes += len(msg.chunk.data)
                elif kind == "grow":
                    try:
                        grown = self.port.extend(rid, msg.grow.num_tokens)
                    except InvalidRequestError as e:
                        await fail(grpc.StatusCode.INVALID_ARGUMENT, str(e))
                    if not grown:
                        await fail(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                   f"no room to grow the reservation to {msg.grow.num_tokens} tokens")
                elif kind == "commit":
                    if (msg.commit.num_chunks, msg.commit.num_bytes) != (num_chunks, num_bytes):
                        await fail(grpc.StatusCode.DATA_LOSS,
                                   f"commit announces {msg.commit.num_chunks} chunks / {msg.commit.num_bytes} "
                                   f"bytes, received {num_chunks} / {num_bytes}")
                    try:
                        snapshot = snapshot_from_pb(msg.commit.snapshot)
                        if snapshot.request_id != rid:
                            raise InvalidRequestError("snapshot", f"the snapshot is for {snapshot.request_id!r}, "
                                                                  f"the transfer for {rid!r}")
                        self.port.commit(snapshot)
                    except ValueError as e:  # InvalidRequestError included: a malformed snapshot
                        await fail(grpc.StatusCode.INVALID_ARGUMENT, f"commit refused: {e}")
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
        self.port.cancel(rid)

    def expire_reservations(self) -> int:
        now = time.monotonic()
        stale = [r for r, t in self._reservations.items() if now - t > self.ttl and r not in self._in_transfer]
        for rid in stale:
            del self._reservations[rid]
            self.port.cancel(rid)
        return len(stale)

    async def reap_forever(self, period_s: float = 1.0) -> None:
        while True:
            await asyncio.sleep(period_s)
            self.expire_reservations()


async def start_server(servicer: KVTransferServicer, host: str = "127.0.0.1", port: int = 0,
                       tls: KVTLS | None = None):
    """Serve on host:port (0 = any free port). Returns (server, bound port). With ``tls`` (``tls.py``) the
    port speaks only mutual TLS: a peer without a certificate signed by ``tls.ca`` fails its handshake."""
    # no SO_REUSEPORT: a second worker on a fixed port must fail, not share the port's connections
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20), ("grpc.so_reuseport", 0)])
    pb_grpc.add_KVTransferServicer_to_server(servicer, server)
    address = join_host_port(host, port)
    try:
        bound = server.add_secure_port(address, tls.server_credentials()) if tls is not None else \
            server.add_insecure_port(address)
    except RuntimeError as e:  # grpc: "Failed to bind to address ..."
        raise OSError(f"the KV server cannot listen on {address} ({e}); is the port taken? With a fixed kv_port "
                      f"only one decode worker fits on a node (kv_port 0 takes any free port)") from None
    await server.start()
    return server, bound
