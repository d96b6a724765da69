"""The sending side of KV transfers: one sender for the prefill->decode handoff and decode->decode migration.

    reserve(address, rid, num_tokens, layout)  -> ReserveResponse, or NoCapacityError (pick another worker)
    send(address, port, rid)                   a suspended (held) request: its blocks and snapshot, then
                                               the commit -> TransferAck (the caller releases its blocks)
    stream(address, port, rid, kv_stream)      a request still prefilling (reserved first): its KV layer by
                                               layer as computed (engine/kv_stream.py), the rest and the
                                               commit once it is held -> TransferAck
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
        async def parts(last: list):
            snapshot, table = port.held_snapshot(request_id), port.held_table(request_id)
            for job in self._block_jobs(port, table[:self._needed(port, snapshot)], 0, live=False):
                yield job
            last.append(snapshot)

        return await self._transfer(address, port, request_id, parts, corrupt_chunk)

    async def stream(self, address: str, port, request_id: str, kv_stream) -> pb.TransferAck:
        """A request still prefilling (already reserved at ``address``): each piece of its KV as its
        prefill hands it out (``engine/kv_stream.py``), layer by layer while the next layers compute;
        once the stream ends (the request is held), whatever it did not carry, then the commit. The
        call has no deadline of its own: it lasts as long as the prefill (the caller bounds the rest)."""
        spec = port.kv_spec
        per_chunk = max(1, self.max_chunk_bytes // (spec.bytes_per_block // spec.num_layers))

        async def parts(last: list):
            async for layer, first, data in kv_stream.pieces():  # data: [n, 2, bs, Hkv, D]
                for at in range(0, data.shape[0], per_chunk):
                    yield ChunkPlan(layer, first + at, min(per_chunk, data.shape[0] - at)), data[at:at + per_chunk], \
                        False
            snapshot, table = port.held_snapshot(request_id), port.held_table(request_id)  # not held: no commit
            needed = self._needed(port, snapshot)
            for job in self._block_jobs(port, table[:needed], [min(s, needed) for s in kv_stream.sent], live=False):
                yield job
            last.append(snapshot)

        return await self._transfer(address, port, request_id, parts, None, deadline=False)

    async def migrate(self, address: str, port, request_id: str, moved_to: str | None = None,
                      on_stage=None, on_suspend=None, corrupt_chunk: int | None = None) -> MoveResult:
        """Move a running request to ``address`` while it keeps decoding (module docstring).
        ``on_stage(stage)`` is awaited after each live stage (tests use it to interleave events);
        ``on_suspend(snapshot)`` is called when the request stops here for the last stage."""
        num_tokens = port.begin_live(request_id)  # UnknownRequestError / RequestStateError: nothing moves
        result = MoveResult()
        stopped_at = None
        block_size = port.kv_spec.block_size
        try:
            await self.reserve(address, request_id, num_tokens, fingerprint(port.model_config, port.kv_spec))

            async def parts(last: list):
                nonlocal stopped_at
                sent, reserved = 0, num_tokens  # blocks sent; tokens the receiver holds room for
                for stage in range(self.max_stages):
                    pinned = port.pin(request_id)  # the full blocks: their KV never changes
                    if stage and len(pinned) - sent <= self.last_stage_blocks:
                        break  # few enough to stop the request for
                    if len(pinned) > sent:
                        reserved = max(reserved, len(pinned) * block_size)
                        yield pb.TransferMessage(grow=pb.Grow(num_tokens=reserved))
                        for job in self._block_jobs(port, pinned, sent, live=True):
                            yield job
                        sent = len(pinned)
                    result.num_stages += 1
                    if on_stage is not None:
                        await on_stage(stage)
                snapshot, table = port.suspend(request_id)
                stopped_at, result.resume_index = time.perf_counter(), len(snapshot.output_token_ids)
                if on_suspend is not None:
                    on_suspend(snapshot)
                needed = self._needed(port, snapshot)
                result.last_stage_blocks = needed - sent
                if snapshot.num_tokens > reserved:  # it grew since the room was reserved (even with no live
                    # stage sent: a request that filled its first block meanwhile needs a second)
                    yield pb.TransferMessage(grow=pb.Grow(num_tokens=snapshot.num_tokens))
                for job in self._block_jobs(port, table[:needed], sent, live=False):
                    yield job
                last.append(snapshot)

            ack = await self._transfer(address, port, request_id, parts, corrupt_chunk)
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

    @staticmethod
    def _needed(port, snapshot) -> int:
        """Blocks holding the snapshot's computed KV."""
        return -(-snapshot.num_computed_tokens // port.kv_spec.block_size)

    def _block_jobs(self, port, block_ids: list[int], first, live: bool):
        """Chunk jobs for blocks ``block_ids[first:]`` of every layer (``first``: one index, or one per
        layer), layer by layer; chunk positions are in the request's block table. ``live``: the request
        is still decoding here, so the chunk is read and encoded off the event loop."""
        spec = port.kv_spec
        firsts = first if isinstance(first, list) else [first] * spec.num_layers
        per_block_layer = spec.bytes_per_block // spec.num_layers
        for layer, start in enumerate(firsts):
            for plan in plan_chunks(1, len(block_ids) - start, per_block_layer, self.max_chunk_bytes):
                at = start + plan.first_block
                ids = block_ids[at:at + plan.num_blocks]
                yield ChunkPlan(layer, at, plan.num_blocks), (lambda ids=ids, layer=layer: port.read(ids, layer)), live

    async def _transfer(self, address: str, port, request_id: str, parts, corrupt_chunk: int | None,
                        deadline: bool = True) -> pb.TransferAck:
        """One Transfer stream: the header, what ``parts(last)`` yields, the commit. ``parts`` yields
        Grow messages and chunk jobs (plan, payload [n, 2, bs, Hkv, D] or a reader giving it, whether to
        encode it off the event loop), then appends the snapshot to commit to ``last``. ``deadline``:
        whether the call has the sender's ``timeout_s``."""
        failure: list[BaseException] = []
        count = {"chunks": 0, "bytes": 0}
        fault = self.faults.popleft() if self.faults else None
        if fault == "corrupt":
            corrupt_chunk = 0

        def encode(plan: ChunkPlan, data) -> pb.TensorChunk:
            return encode_chunk(plan, data() if callable(data) else data, self.kv_codec)

        async def messages():
            try:
                yield pb.TransferMessage(header=pb.TransferHeader(
                    request_id=request_id, layout=fingerprint(port.model_config, port.kv_spec),
                    kv_codec=self.kv_codec))
                last = []
                async for part in parts(last):
                    if isinstance(part, pb.TransferMessage):
                        yield part
                        continue
                    plan, data, off_loop = part
                    chunk = await asyncio.to_thread(encode, plan, data) if off_loop else encode(plan, data)
                    if corrupt_chunk == count["chunks"]:
                        chunk.data = bytes([chunk.data[0] ^ 0xFF]) + chunk.data[1:]
                    count["chunks"] += 1
                    count["bytes"] += len(chunk.data)
                    yield pb.TransferMessage(chunk=chunk)
                    if fault == "cut":
                        raise TransferFailedError("CANCELLED", "the transfer stream was cut after its first chunk "
                                                               "(an injected fault)")
                yield pb.TransferMessage(commit=pb.Commit(num_chunks=count["chunks"], num_bytes=count["bytes"],
                                                          snapshot=snapshot_to_pb(last[0])))
            except Exception as e:  # end the stream without a commit: the receiver drops the reservation
                failure.append(e)

        try:
            ack = await self._stub(address).Transfer(messages(), metadata=self.metadata,
                                                     timeout=self.timeout_s if deadline else None)
        except grpc.aio.AioRpcError as e:
            if failure:
                raise failure[0] from None
            raise self._failed(e) from None
        self.num_bytes_sent += ack.num_bytes
        return ack

    async def close(self) -> None:
        for ch in self._channels:
            await ch.close()
        self._channels.clear()
        self._stubs.clear()

