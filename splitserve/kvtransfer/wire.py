"""The KV wire format: layout fingerprints, chunking and checksums.

A transfer stream::

    Header | Chunk(layer 0, blocks 0..k) | Chunk(layer 0, blocks k..n) | Chunk(layer 1, ...) | ... | Commit
    (a live migration: Header | stage 1 chunks | Grow | stage 2 chunks | ... | Grow | last chunks | Commit)
    (a layer-overlapped prefill: Header | step 1 layer 0 | step 1 layer 1 | ... | step 2 layer 0 | ... | Commit)

The Commit carries the request's snapshot (``snapshot_to_pb``): what the
receiver continues, with the number of tokens whose KV the chunks carried.

Each chunk's payload is ``kv_cache[layer, block_table[a:b]]``
(``[b - a, 2, block_size, Hkv, D]``, C order) with its CRC32C, in one of two
codecs named in the header: ``raw`` (the layout's dtype) or ``int8`` (int8
values, then one fp32 scale per token and head: about half the bytes of bf16,
a quarter of fp32; ``kernels.ops.kv_quantize``). A chunk holds whole blocks of one layer and at most ``max_chunk_bytes``
(a few MiB), so the sender can ship each layer as soon as it has it. Chunks
may come in any order; the receiver places each by its layer and position.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import google_crc32c
import torch

from splitserve.kernels import ops
from splitserve.kvtransfer import kvtransfer_pb2 as pb

DEFAULT_MAX_CHUNK_BYTES = 4 << 20
KV_CODECS = ("raw", "int8")
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


def check_codec(codec: str) -> str:
    codec = codec or "raw"
    if codec not in KV_CODECS:
        raise ValueError(f"kv_codec must be one of {list(KV_CODECS)}; got {codec!r}")
    return codec


def encode_chunk(plan: ChunkPlan, data: torch.Tensor, codec: str = "raw") -> pb.TensorChunk:
    # data: [num_blocks, 2, bs, Hkv, D] in the cache dtype
    if check_codec(codec) == "int8":
        q, scale = ops.kv_quantize(data.reshape(-1, data.shape[-1]))  # [R, D] int8, [R] fp32
        raw = q.numpy().tobytes() + scale.numpy().tobytes()
    else:
        raw = data.contiguous().view(torch.uint8).numpy().tobytes()
    return pb.TensorChunk(layer=plan.layer, first_block=plan.first_block, num_blocks=plan.num_blocks,
                          data=raw, crc32c=crc32c(raw))


def decode_chunk(chunk: pb.TensorChunk, layout: pb.LayoutFingerprint, codec: str = "raw") -> torch.Tensor:
    """Checked payload -> [num_blocks, 2, bs, Hkv, D] in the layout's dtype. ValueError on a bad checksum or size."""
    if crc32c(chunk.data) != chunk.crc32c:
        raise ValueError(f"chunk (layer {chunk.layer}, block {chunk.first_block}) failed its CRC32C check")
    dtype = _DTYPES[layout.dtype]
    shape = (chunk.num_blocks, 2, layout.block_size, layout.num_kv_heads, layout.head_dim)
    numel = torch.Size(shape).numel()
    int8 = check_codec(codec) == "int8"
    expected = numel + 4 * (numel // layout.head_dim) if int8 else numel * torch.tensor([], dtype=dtype).element_size()
    if len(chunk.data) != expected:
        raise ValueError(f"chunk (layer {chunk.layer}) holds {len(chunk.data)} bytes, expected {expected}")
    payload = bytearray(chunk.data)
    if not int8:
        return torch.frombuffer(payload, dtype=dtype).view(shape)
    q = torch.frombuffer(payload, dtype=torch.int8, count=numel).view(-1, layout.head_dim)  # [R, D]
    scale = torch.frombuffer(payload, dtype=torch.float32, offset=numel)  # [R]
    return ops.kv_dequantize(q, scale, dtype).view(shape)


def snapshot_to_pb(snap) -> pb.RequestSnapshot:
    """engine.request.RequestSnapshot -> its wire message."""
    return pb.RequestSnapshot(
        request_id=snap.request_id, prompt_token_ids=snap.prompt_token_ids, output_token_ids=snap.output_token_ids,
        num_computed_tokens=snap.num_computed_tokens, sampling_params_json=json.dumps(snap.params),
        text_state_json=json.dumps(snap.text) if snap.text is not None else "", text_emitted=snap.text_emitted,
        spec_acceptance=snap.spec_acceptance)


def snapshot_from_pb(msg: pb.RequestSnapshot):
    """The wire message -> a checked RequestSnapshot (ValueError / InvalidRequestError when malformed)."""
    from splitserve.engine.request import RequestSnapshot
    return RequestSnapshot.from_dict(dict(
        request_id=msg.request_id, prompt_token_ids=list(msg.prompt_token_ids),
        output_token_ids=list(msg.output_token_ids), num_computed_tokens=msg.num_computed_tokens,
        params=json.loads(msg.sampling_params_json or "{}"),
        text=json.loads(msg.text_state_json) if msg.text_state_json else None, text_emitted=msg.text_emitted,
        spec_acceptance=msg.spec_acceptance))
