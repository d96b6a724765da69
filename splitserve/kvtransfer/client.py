"""The sending side of KV transfers: one sender for the prefill->decode handoff and decode->decode migration.

    reserve(address, rid, num_tokens, layout)  -> ReserveResponse, or NoCapacityError (pick another worker)
    send(address, port, rid)                   a suspended (held) request: its blocks and snapshot, then
                                               the commit -> TransferAck (the caller releases its blocks)
    migrate(address, port, rid, moved_to)      a running request, live (below) -> MoveResult; on success the
                                               request is released here, on failure it goes on here
    release(address, rid)                      give a reservation back unused (or abort what was committed)

A live migration, Llumnix-style::

    stage 1     pin the blocks already full; send them while the request keeps decoding here
    stage 2..   Grow, then the blocks filled meanwhile, while there are more than ``last_stage_blocks``
    last stage  suspend the request (out of the batch), Grow, send the remaining blocks (the partial one
                too) and Commit(snapshot); the receiver joins it to its batch and acks
    then        release here: blocks freed, the request's stream ends with "migrated" (moved_to)

Anything that fails before the receiver commits (refused, cut, corrupted, the
request finished or was preempted meanwhile) leaves the request running here:
the receiver drops its reservation, and the sender un-suspends it.

Every error is a ``splitserve.errors`` type: ``NoCapacityError`` (no room
there), ``TransferFailedError`` (with the gRPC code, or None when the request
finished or was preempted meanwhile), or, before anything happens,
``UnknownRequestError`` / ``RequestStateError`` (nothing to move: unknown,
finished, or already moving).

Injected faults (the fault campaign, ``benchmarks/faults.py``): ``inject(["corrupt", "cut"])``
queues one fault per coming transfer, in order: "corrupt" flips a byte of the first chunk (the
receiver's checksum fails: DATA_LOSS), "cut" ends the stream after its first chunk without a
commit (as a sender that died mid-way). Both fail that transfer only, as a real fault would.

Channels are plaintext, or mutual TLS with ``tls`` (``tls.py``); a receiver
refusing the handshake only closes the socket, so the error then adds what
that means (``tls.explain_refusal``).
"""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass

import grpc

from splitserve.engine.request import RequestStatus
from splitserve.errors import (InvalidRequestError, NoCapacityError, RequestStateError, TransferFailedError,
                               UnknownRequestError)
from splitserve.kvtransfer import kvtransfer_pb2 as pb
from splitserve.kvtransfer import kvtransfer_pb2_grpc as pb_grpc
from splitserve.kvtransfer.tls import KVTLS, explain_refusal
from splitserve.kvtransfer.wire import (DEFAULT_MAX_CHUNK_BYTES, TOKEN_METADATA_KEY, check_codec, encode_chunk,
                                        fingerprint, plan_chunks, snapshot_to_pb, ChunkPlan)


@dataclass
class MoveResult:
    num_bytes: int = 0
    num_chunks: int = 0
    num_stages: int = 0  # live stages before the last (stop-and-copy) one
    last_stage_blocks: int = 0  # blocks sent while the request was stopped
    stopped_s: float = 0.0  # from suspend to the receiver's ack: how long the request did not decode
    resume_index: int = 0  # output index of the first token the receiver produces


FAULTS = ("corrupt", "cut")


class KVSender:
    def __init__(self, cluster_token: str, timeout_s: float = 30.0, max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
                 kv_codec: str = "raw", last_stage_blocks: int = 2, max_stages: int = 8, tls: KVTLS | None = None):
        self.kv_codec = check_codec(kv_codec)  # "raw" or "int8" (about half the bytes; see wire.py)
        self.tls = tls  # mutual TLS on every channel (tls.py); None: plaintext
        self.metadata = ((TOKEN_METADATA_KEY, cluster_token),)
        self.timeout_s = timeout_s
        self.max_chunk_bytes = max_chunk_bytes
        self.last_stage_blocks, self.max_stages = last_stage_blocks, max_stages
        self._stubs: dict[str, pb_grpc.KVTransferStub] = {}
        self._channels: list = []
        self.num_bytes_sent = 0
        self.faults: collections.deque[str] = collections.deque()  # injected, one per coming transfer

    def inject(self, faults: list[str]) -> int:
        """Queue faults for the coming transfers (module docstring); returns how many are queued."""
        bad = [f for f in faults if f not in FAULTS]
        if bad:
            raise InvalidRequestError("faults", f"unknown transfer faults {bad}; allowed: {list(FAULTS)}")
        self.faults.extend(faults)
        return len(self.faults)

    def _stub(self, address: str) -> pb_grpc.KVTransferStub:
        if address not in self._stubs:
            options = [("grpc.max_send_message_length", 64 << 20)]
            if self.tls is None:
                channel = grpc.aio.insecure_channel(address, options=options)
            else:
                channel = grpc.aio.secure_channel(address, self.tls.channel_credentials(),
                                                  options=options + self.tls.channel_options())
            self._channels.append(channel)
            self._stubs[address] = pb_grpc.KVTransferStub(channel)
        return self._stubs[address]

    def _failed(self, e: grpc.aio.AioRpcError) -> TransferFailedError:
        return TransferFailedError(e.code().name, explain_refusal(e.details(), self.tls is not None))

    async def reserve(self, address: str, request_id: str, num_tokens: int, layout) -> pb.ReserveResponse:
        try:
            return await self._stub(address).Reserve(
                pb.ReserveRequest(request_id=request_id, num_tokens=num_tokens, layout=layout),
                metadata=self.metadata, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise NoCapacityError(e.details()) from None
            raise self._failed(e) from None

    async def release(self, address: str, request_id: str) -> bool:
        try:
            resp = await self._stub(address).Release(pb.ReleaseRequest(request_id=request_id),
                                                      metadata=self.metadata, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as e:
            raise self._failed(e) from None
        return resp.released

    async def send(self, address: str, port, request_id: str, corrupt_chunk: int | None = None) -> pb.TransferAck:
        """A held request (suspended, e.g. prefilled): its blocks and snapshot, one stage."""
        async def no_live_stages(last: list):
            last.append((port.held_snapshot(request_id), port.held_table(request_id)))
            return
            yield

        ack, _ = await self._transfer(address, port, request_id, no_live_stages, corrupt_chunk)
        return ack

    async def migrate(self, address: str, port, request_id: str, moved_to: str | None = None,
                      on_stage=None, on_suspend=None, corrupt_chunk: int | None = None) -> MoveResult:
        """Move a running request to ``address`` while it keeps decoding (module docstring).
        ``on_stage(stage)`` is awaited after each live stage (tests use it to interleave events);
        ``on_suspend(snapshot)`` is called when the request stops here for the last stage."""
        num_tokens = port.begin_live(request_id)  # UnknownRequestError / RequestStateError: nothing moves
        result = MoveResult()
        stopped_at = None
        try:
            await self.reserve(address, request_id, num_tokens, fingerprint(port.model_config, port.kv_spec))

            async def live_stages(last: list):
                nonlocal stopped_at
                sent = 0
                for stage in range(self.max_stages):
                    pinned = port.pin(request_id)  # the full blocks: their KV never changes
                    if stage and len(pinned) - sent <= self.last_stage_blocks:
                        break  # few enough to stop the request for
                    if len(pinned) > sent:
                        yield pinned
                        sent = len(pinned)
                    result.num_stages += 1
                    if on_stage is not None:
                        await on_stage(stage)
                snapshot, table = port.suspend(request_id)
                stopped_at, result.resume_index = time.perf_counter(), len(snapshot.output_token_ids)
                if on_suspend is not None:
                    on_suspend(snapshot)
                last.append((snapshot, table))

            ack, result.last_stage_blocks = await self._transfer(address, port, request_id, live_stages,
                                                                 corrupt_chunk)
        except BaseException as e:
            if stopped_at is not None:
                port.unsuspend(request_id)  # not committed there: it goes on here
                # the receiver may have committed before the ack was lost: take it back there (best effort;
                # otherwise its unclaimed copy is aborted after a while)
                try:
                    await asyncio.wait_for(self.release(address, request_id), 2.0)
                except Exception:
                    pass
            if isinstance(e, (UnknownRequestError, RequestStateError)):  # it finished or was preempted meanwhile
                raise TransferFailedError(None, f"migration abandoned: {e}") from None
            raise
        finally:
            port.end_live(request_id)
        port.release(request_id, RequestStatus.FINISHED_MIGRATED, moved_to)
        result.stopped_s = time.perf_counter() - stopped_at
        result.num_bytes, result.num_chunks = ack.num_bytes, ack.num_chunks
        return result

    async def _transfer(self, address: str, port, request_id: str, live_stages, corrupt_chunk: int | None):
        """One Transfer stream: header, each live stage's chunks, the last chunks, the commit.
        ``live_stages(last)`` yields the pinned block ids of each live stage, then appends (snapshot,
        block table) to ``last``. Returns (ack, blocks sent in the last stage)."""
        spec = port.kv_spec
        per_block_layer = spec.bytes_per_block // spec.num_layers
        failure: list[BaseException] = []
        count = {"chunks": 0, "bytes": 0, "last_stage_blocks": 0}
        fault = self.faults.popleft() if self.faults else None
        if fault == "corrupt":
            corrupt_chunk = 0

        def encode(block_ids: list[int], at: int, plan) -> pb.TensorChunk:
            data = port.read(block_ids[at:at + plan.num_blocks], plan.layer)  # [n, 2, bs, Hkv, D]
            return encode_chunk(ChunkPlan(plan.layer, at, plan.num_blocks), data, self.kv_codec)

        async def chunks(block_ids: list[int], first: int, live: bool):
            """Blocks block_ids[first:], layer by layer; chunk positions are in the request's block table.
            ``live``: the request is still decoding here, so chunks are encoded off this event loop
            (which also carries the request's outputs) and the loop gets a turn between them."""
            for plan in plan_chunks(spec.num_layers, len(block_ids) - first, per_block_layer, self.max_chunk_bytes):
                at = first + plan.first_block
                chunk = await asyncio.to_thread(encode, block_ids, at, plan) if live else encode(block_ids, at, plan)
                if corrupt_chunk == count["chunks"]:
                    chunk.data = bytes([chunk.data[0] ^ 0xFF]) + chunk.data[1:]
                count["chunks"] += 1
                count["bytes"] += len(chunk.data)
                yield pb.TransferMessage(chunk=chunk)
                if fault == "cut":
                    raise TransferFailedError("CANCELLED", "the transfer stream was cut after its first chunk "
                                                           "(an injected fault)")

        async def messages():
            try:
                yield pb.TransferMessage(header=pb.TransferHeader(
                    request_id=request_id, layout=fingerprint(port.model_config, spec), kv_codec=self.kv_codec))
                sent, last = 0, []
                async for pinned in live_stages(last):
                    yield pb.TransferMessage(grow=pb.Grow(num_tokens=len(pinned) * spec.block_size))
                    async for msg in chunks(pinned, sent, live=True):
                        yield msg
                    sent = len(pinned)
                snapshot, table = last[0]
                needed = -(-snapshot.num_computed_tokens // spec.block_size)
                count["last_stage_blocks"] = needed - sent
                if sent:  # a live migration: the request grew since the reservation
                    yield pb.TransferMessage(grow=pb.Grow(num_tokens=snapshot.num_tokens))
                async for msg in chunks(table[:needed], sent, live=False):
                    yield msg
                yield pb.TransferMessage(commit=pb.Commit(num_chunks=count["chunks"], num_bytes=count["bytes"],
                                                          snapshot=snapshot_to_pb(snapshot)))
            except Exception as e:  # end the stream without a commit: the receiver drops the reservation
                failure.append(e)

        try:
            ack = await self._stub(address).Transfer(messages(), metadata=self.metadata, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as e:
            if failure:
                raise failure[0] from None
            raise self._failed(e) from None
        self.num_bytes_sent += ack.num_bytes
        return ack, count["last_stage_blocks"]

    async def close(self) -> None:
        for ch in self._channels:
            await ch.close()
        self._channels.clear()
        self._stubs.clear()

