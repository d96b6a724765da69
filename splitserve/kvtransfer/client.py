"""The sending side of KV transfers (a prefill worker, or a decode worker migrating a request).

    reserve(address, rid, num_tokens)  -> ReserveResponse, or NoCapacityError (pick another worker)
    send(address, engine, rid)         -> TransferAck once the receiver has committed
    release(address, rid)              -> give a reservation back unused

The sender frees its own blocks only after ``send`` returns (the receiver has
committed); on any error the receiver has already dropped the reservation.
"""

from __future__ import annotations

import json

import grpc

from splitserve.engine.handoff import serialize_params
from splitserve.kvtransfer import kvtransfer_pb2 as pb
from splitserve.kvtransfer import kvtransfer_pb2_grpc as pb_grpc
from splitserve.kvtransfer.wire import (DEFAULT_MAX_CHUNK_BYTES, TOKEN_METADATA_KEY, check_codec, encode_chunk,
                                        fingerprint, plan_chunks)


class NoCapacityError(Exception):
    """The receiver refused the reservation (RESOURCE_EXHAUSTED)."""


class TransferError(Exception):
    """A transfer failed; ``code`` is the gRPC status the receiver gave."""

    def __init__(self, code, message: str):
        super().__init__(f"{code.name if code else 'ERROR'}: {message}")
        self.code = code


class KVSender:
    def __init__(self, cluster_token: str, timeout_s: float = 30.0, max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
                 kv_codec: str = "raw"):
        self.kv_codec = check_codec(kv_codec)  # "raw" or "int8" (about half the bytes; see wire.py)
        self.metadata = ((TOKEN_METADATA_KEY, cluster_token),)
        self.timeout_s = timeout_s
        self.max_chunk_bytes = max_chunk_bytes
        self._stubs: dict[str, pb_grpc.KVTransferStub] = {}
        self._channels: list = []
        self.num_bytes_sent = 0

    def _stub(self, address: str) -> pb_grpc.KVTransferStub:
        if address not in self._stubs:
            channel = grpc.aio.insecure_channel(address, options=[("grpc.max_send_message_length", 64 << 20)])
            self._channels.append(channel)
            self._stubs[address] = pb_grpc.KVTransferStub(channel)
        return self._stubs[address]

    async def reserve(self, address: str, request_id: str, num_tokens: int, layout) -> pb.ReserveResponse:
        try:
            return await self._stub(address).Reserve(
                pb.ReserveRequest(request_id=request_id, num_tokens=num_tokens, layout=layout),
                metadata=self.metadata, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise NoCapacityError(e.details()) from None
            raise TransferError(e.code(), e.details()) from None

    async def release(self, address: str, request_id: str) -> bool:
        resp = await self._stub(address).Release(pb.ReleaseRequest(request_id=request_id),
                                                  metadata=self.metadata, timeout=self.timeout_s)
        return resp.released

    async def send(self, address: str, engine, lock, request_id: str, corrupt_chunk: int | None = None):
        """Stream a held request's KV from ``engine`` (under ``lock``) and wait for the commit.

        ``corrupt_chunk`` flips a byte of that chunk after its checksum is taken (fault-injection tests).
        """
        with lock:
            state = engine.handoff_state(request_id)
            layout = fingerprint(engine.model_config, engine.kv_spec)
            num_blocks = len(engine.kv.block_table(request_id))
        spec = engine.kv_spec
        per_block_layer = spec.bytes_per_block // spec.num_layers
        plans = plan_chunks(spec.num_layers, num_blocks, per_block_layer, self.max_chunk_bytes)

        async def messages():
            yield pb.TransferMessage(header=pb.TransferHeader(
                request_id=request_id, layout=layout, prompt_token_ids=state.prompt_token_ids,
                output_token_ids=state.output_token_ids, sampling_params_json=json.dumps(serialize_params(state.params)),
                generator_state=state.generator_state or b"", num_blocks=num_blocks, kv_codec=self.kv_codec))
            total = 0
            for i, plan in enumerate(plans):  # layer by layer
                # No engine lock: a held request's blocks are out of the running batch, so the
                # engine's step never touches them (with the lock, each chunk would wait out a step).
                data = engine.export_kv(request_id, plan.layer)[plan.first_block:plan.first_block + plan.num_blocks]
                chunk = encode_chunk(plan, data, self.kv_codec)
                if corrupt_chunk == i:
                    chunk.data = bytes([chunk.data[0] ^ 0xFF]) + chunk.data[1:]
                total += len(chunk.data)
                yield pb.TransferMessage(chunk=chunk)
            yield pb.TransferMessage(commit=pb.Commit(num_chunks=len(plans), num_bytes=total))

        try:
            ack = await self._stub(address).Transfer(messages(), metadata=self.metadata, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as e:
            raise TransferError(e.code(), e.details()) from None
        self.num_bytes_sent += ack.num_bytes
        return ack

    async def close(self) -> None:
        for ch in self._channels:
            await ch.close()
        self._channels.clear()
        self._stubs.clear()
