"""The interface a KV transport implements. ``client.KVSender`` (gRPC) is the one we have;
shared memory on one node or RDMA would implement the same calls, against the same engine
port (``splitserve/engine/kv_port.py``)."""

from __future__ import annotations

from typing import Protocol


class KVTransport(Protocol):
    async def reserve(self, address: str, request_id: str, num_tokens: int, layout): ...

    async def send(self, address: str, port, request_id: str): ...

    async def migrate(self, address: str, port, request_id: str, moved_to: str | None = None): ...

    async def release(self, address: str, request_id: str) -> bool: ...
