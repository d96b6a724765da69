"""The interface a KV transport implements. ``client.KVSender`` (gRPC) is the one we have;
shared memory on one node or RDMA would implement the same three calls."""

from __future__ import annotations

from typing import Protocol


class KVTransport(Protocol):
    async def reserve(self, address: str, request_id: str, num_tokens: int, layout): ...

    async def send(self, address: str, engine, lock, request_id: str): ...

    async def release(self, address: str, request_id: str) -> bool: ...
