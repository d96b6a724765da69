"""The KV wire format: layout fingerprints, chunking and checksums.

A transfer stream::

    Header | Chunk(layer 0, blocks 0..k) | Chunk(layer 0, blocks k..n) | Chunk(layer 1, ...) | ... | Commit

Each chunk's payload is the raw bytes of ``kv_cache[layer, block_table[a:b]]``
(``[b - a, 2, block_size, Hkv, D]``, C order, the layout's dtype) with its
CRC32C. A chunk holds whole blocks of one layer and at most ``max_chunk_bytes``
(a few MiB), so the sender can ship each layer as soon as it has it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import google_crc32c
import torch

from splitserve.kvtransfer import kvtransfer_pb2 as pb

DEFAULT_MAX_CHUNK_BYTES = 4 << 20
TOKEN_METADATA_KEY = "x-splitserve-token"
_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def crc32c(data: bytes) -> int:
    return google_crc32c.value(data)


def fingerprint(model_config, kv_spec) -> pb.LayoutFingerprint:
    """What a receiver must match before accepting a byte: model, dtype and KV geometry."""
    digest = hashlib.sha256(json.dumps(model_config.__dict__, sort_keys=True, default=str).encode()).hexdigest()
    return pb.LayoutFingerprint(
        model=f"{model_config.name}:{digest[:16]}",
        dtype=str(kv_spec.dtype).removeprefix("torch."),
        block_size=kv_spec.block_size,
        num_layers=kv_spec.num_layers,
        num_kv_heads=kv_spec.num_kv_heads,
        head_dim=kv_spec.head_dim,
    )


def describe_mismatch(got: pb.LayoutFingerprint, want: pb.LayoutFingerprint) -> str | None:
    diffs = [f"{f.name}: sender {getattr(got, f.name)!r} != receiver {getattr(want, f.name)!r}"
             for f in pb.LayoutFingerprint.DESCRIPTOR.fields if getattr(got, f.name) != getattr(want, f.name)]
    return "; ".join(diffs) or None


@dataclass(frozen=True)
class ChunkPlan:
    layer: int
    first_block: int
    num_blocks: int


def plan_chunks(num_layers: int, num_blocks: int, bytes_per_block_layer: int,
                max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES) -> list[ChunkPlan]:
    per_chunk = max(1, max_chunk_bytes // bytes_per_block_layer)
    return [ChunkPlan(layer, start, min(per_chunk, num_blocks - start))
            for layer in range(num_layers) for start in range(0, num_blocks, per_chunk)]


def encode_chunk(plan: ChunkPlan, data: torch.Tensor) -> pb.TensorChunk:
    raw = data.contiguous().view(torch.uint8).numpy().tobytes()
    return pb.TensorChunk(layer=plan.layer, first_block=plan.first_block, num_blocks=plan.num_blocks,
                          data=raw, crc32c=crc32c(raw))


def decode_chunk(chunk: pb.TensorChunk, layout: pb.LayoutFingerprint) -> torch.Tensor:
    """Checked payload -> [num_blocks, 2, bs, Hkv, D]. Raises ValueError on a bad checksum or size."""
    if crc32c(chunk.data) != chunk.crc32c:
        raise ValueError(f"chunk (layer {chunk.layer}, block {chunk.first_block}) failed its CRC32C check")
    dtype = _DTYPES[layout.dtype]
    shape = (chunk.num_blocks, 2, layout.block_size, layout.num_kv_heads, layout.head_dim)
    expected = torch.Size(shape).numel() * torch.tensor([], dtype=dtype).element_size()
    if len(chunk.data) != expected:
        raise ValueError(f"chunk (layer {chunk.layer}) holds {len(chunk.data)} bytes, expected {expected}")
    return torch.frombuffer(bytearray(chunk.data), dtype=dtype).view(shape)
