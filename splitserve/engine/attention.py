"""Grouped-query attention over the paged KV cache (the CPU torch path).

A step's tokens are flattened into one batch of ``N`` tokens, decodes first:

    tokens: | d0 | d1 | ... | d(B-1) | prefill chunk of seq a | chunk of seq b |
             <--- B decode tokens ---><------------- prefill tokens ----------->

Per layer, :func:`paged_attention` first writes the new K/V into their slots,
then

* all decode tokens (one query each) attend together
  (``kernels.ops.paged_decode_attention``: on CPU their blocks are gathered
  into ``[B, T, H, D]``, ``T`` = longest context, padded and masked, with the
  query heads sharing a KV head folded into one axis so GQA needs no copy of
  K/V; on GPU a Triton kernel reads the blocks in place);
* each prefill chunk attends on its own: a chunk with no earlier context uses
  its fresh K/V with a causal mask; a later chunk reads its earlier context
  from its blocks.

Everything the kernel needs comes in :class:`AttentionMetadata`; nothing is
global.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from splitserve.kernels import ops


@dataclass(frozen=True)
class PrefillChunk:
    token_start: int  # slice of the flattened batch holding this chunk
    token_end: int
    context_start: int  # tokens of this sequence already in the cache before the chunk
    block_table: torch.Tensor  # [num_blocks_of_seq] long


@dataclass(frozen=True)
class AttentionMetadata:
    positions: torch.Tensor  # [N] long
    slot_blocks: torch.Tensor  # [N] long: block id each new token's K/V goes to
    slot_offsets: torch.Tensor  # [N] long: offset inside that block
    num_decodes: int  # tokens [0, num_decodes) are single-token decodes
    decode_block_tables: torch.Tensor | None  # [B, max_blocks] long (padded with block 0)
    decode_mask: torch.Tensor | None  # [B, 1, 1, max_blocks * bs] float: 0 = attend, -inf = padding
    decode_context_lens: torch.Tensor | None  # [B] long: cached tokens per decode, this step's included
    prefills: tuple[PrefillChunk, ...]


def paged_attention(
    q: torch.Tensor,  # [N, Hq, D]
    k: torch.Tensor,  # [N, Hkv, D]
    v: torch.Tensor,  # [N, Hkv, D]
    kv_layer: torch.Tensor,  # [num_blocks, 2, bs, Hkv, D]
    meta: AttentionMetadata,
) -> torch.Tensor:  # [N, Hq, D]
    kv_layer[meta.slot_blocks, 0, meta.slot_offsets] = k
    kv_layer[meta.slot_blocks, 1, meta.slot_offsets] = v
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    outs = []

    if meta.num_decodes:
        b = meta.num_decodes
        outs.append(ops.paged_decode_attention(q[:b], kv_layer, meta.decode_block_tables, meta.decode_context_lens,
                                               meta.decode_mask))

    # Prefill attention gets a leading batch dim: with 3-D inputs torch's CPU SDPA takes its
    # unfused math path (measured 6x slower at 2048 tokens than the flash kernel 4-D inputs get).
    for c in meta.prefills:
        qc = q[c.token_start:c.token_end].transpose(0, 1)[None]  # [1, Hq, L, D]
        if c.context_start == 0:
            kc = k[c.token_start:c.token_end].transpose(0, 1)[None]  # [1, Hkv, L, D]
            vc = v[c.token_start:c.token_end].transpose(0, 1)[None]
            oc = F.scaled_dot_product_attention(qc, kc, vc, is_causal=True, enable_gqa=True)
        else:
            length = c.token_end - c.token_start
            total = c.context_start + length
            kv = kv_layer[c.block_table]  # [nblk, 2, bs, Hkv, D]
            kv = kv.transpose(0, 1).reshape(2, -1, num_kv_heads, head_dim)[:, :total]  # [2, T, Hkv, D]
            kc, vc = kv[0].transpose(0, 1)[None], kv[1].transpose(0, 1)[None]  # [1, Hkv, T, D]
            # query i (absolute position context_start + i) sees keys 0..context_start + i
            mask = torch.ones(length, total, dtype=torch.bool, device=q.device).tril(diagonal=c.context_start)
            oc = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=mask, enable_gqa=True)
        outs.append(oc[0].transpose(0, 1))  # [L, Hq, D]

    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)
