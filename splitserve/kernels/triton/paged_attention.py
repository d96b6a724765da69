"""Paged-attention decode: one query token per sequence, K/V read through its block table.

One program per (sequence b, KV head h, context partition p): the G = Hq / Hkv
query heads sharing KV head h are processed together, so each K/V block is
loaded once for all of them. A program walks its partition's blocks with an
online softmax (running max m, running sum l, accumulator acc), never
materialising the [T] scores.

    single pass   one partition covers the whole block table: the program
                  normalises and writes out[b, heads]
    split context (flash-decoding) a block table wider than PARTITION_TOKENS is
                  cut into partitions of that many tokens, so batch 1 with a long
                  context still fills the GPU: each program writes its partial
                  (m, l, acc) to scratch, then a reduce program per (b, query head)
                  rescales the partials to a common max and sums them

The number of partitions comes from the block table's width (a shape), never
from the context lengths' values: the launch reads nothing on the host and can
be captured in a CUDA graph. Value checks (context lengths within the table)
run only with ``common.value_checks``.

    kv_layer [num_blocks, 2, block_size, Hkv, D]   (0 = K, 1 = V; any strides, unit last)
    block_tables [B, max_blocks] int32/int64 (entries past a sequence's blocks are ignored)
    context_lens [B] int: tokens of each sequence in the cache, including this step's
    q [B, Hq, D] -> out [B, Hq, D] q.dtype
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from splitserve.kernels.triton.common import FLOATS, check, check_tensor, same_device, value_checks

PARTITION_TOKENS = 256  # context per program when the context is split (a multiple of every block size)


@triton.jit
def _paged_decode_kernel(q_ptr, kv_ptr, bt_ptr, lens_ptr, out_ptr, m_ptr, l_ptr, sm_scale,
                         stride_qb, stride_qh, stride_blk, stride_kv, stride_t, stride_h,
                         stride_btb, stride_ob, stride_oh, stride_op, stride_mb, stride_mh, D,
                         GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                         D_PAD: tl.constexpr, BLOCKS_PER_PART: tl.constexpr, SPLIT: tl.constexpr):
    # SPLIT: out is scratch acc [B, Hq, P, D] fp32 (unnormalised) and m, l [B, Hq, P] are written;
    # else out [B, Hq, D] gets the normalised result
    b, kvh, part = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, D_PAD)
    t = tl.arange(0, BLOCK_SIZE)
    gmask, dmask = g < GROUP, d < D
    heads = kvh * GROUP + g  # [GP] query heads of this KV head
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=gmask[:, None] & dmask[None, :], other=0.0).to(tl.float32) * sm_scale  # [GP, DP]
    ctx = tl.load(lens_ptr + b)
    m_i = tl.full((GROUP_PAD,), float("-inf"), tl.float32)
    l_i = tl.zeros((GROUP_PAD,), tl.float32)
    acc = tl.zeros((GROUP_PAD, D_PAD), tl.float32)
    first = part * BLOCKS_PER_PART
    last = tl.minimum(tl.cdiv(ctx, BLOCK_SIZE), first + BLOCKS_PER_PART)  # a partition past ctx: no blocks
    for j in range(first, last):
        blk = tl.load(bt_ptr + b * stride_btb + j)
        base = kv_ptr + blk * stride_blk + kvh * stride_h + t[:, None] * stride_t + d[None, :]
        tmask = j * BLOCK_SIZE + t < ctx  # [BS] valid tokens of this block
        kvmask = tmask[:, None] & dmask[None, :]
        k = tl.load(base, mask=kvmask, other=0.0).to(tl.float32)  # [BS, DP]
        v = tl.load(base + stride_kv, mask=kvmask, other=0.0).to(tl.float32)
        s = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # [GP, BS]
        s = tl.where(tmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m_i = m_new
    omask = gmask[:, None] & dmask[None, :]
    if SPLIT:  # a partition past the context stores nothing (the reduce reads only those with blocks)
        has = gmask & (g * 0 + first < last)  # [GP]
        tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + part * stride_op + d[None, :], acc,
                 mask=omask & has[:, None])
        tl.store(m_ptr + b * stride_mb + heads * stride_mh + part, m_i, mask=has)
        tl.store(l_ptr + b * stride_mb + heads * stride_mh + part, l_i, mask=has)
    else:
        out = acc / l_i[:, None]
        tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=omask)


@triton.jit
def _reduce_kernel(acc_ptr, m_ptr, l_ptr, out_ptr, lens_ptr, stride_ab, stride_ah, stride_ap, stride_mb, stride_mh,
                   stride_ob, stride_oh, NUM_PARTS, D, PART_TOKENS: tl.constexpr, PARTS_PAD: tl.constexpr,
                   D_PAD: tl.constexpr):
    # one program per (sequence b, query head h): out = sum_p acc_p * e^(m_p - M) / sum_p l_p * e^(m_p - M)
    # over the partitions that hold some of its context (the others were not written)
    b, h = tl.program_id(0), tl.program_id(1)
    p = tl.arange(0, PARTS_PAD)
    d = tl.arange(0, D_PAD)
    pmask = p < tl.minimum(NUM_PARTS, tl.cdiv(tl.load(lens_ptr + b), PART_TOKENS))
    m = tl.load(m_ptr + b * stride_mb + h * stride_mh + p, mask=pmask, other=float("-inf"))  # [PP]
    l = tl.load(l_ptr + b * stride_mb + h * stride_mh + p, mask=pmask, other=0.0)
    big = tl.max(m, axis=0)
    w = tl.where(m > float("-inf"), tl.exp(m - big), 0.0)  # partitions past the context weigh nothing
    acc = tl.load(acc_ptr + b * stride_ab + h * stride_ah + p[:, None] * stride_ap + d[None, :],
                  mask=pmask[:, None] & (d[None, :] < D), other=0.0)  # [PP, DP]
    out = tl.sum(acc * w[:, None], axis=0) / tl.sum(l * w, axis=0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d < D)


def launch(q: torch.Tensor, kv_layer: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
           scale: float | None = None, partition_tokens: int | None = None) -> torch.Tensor:
    """``partition_tokens``: context per program when split (default ``PARTITION_TOKENS``; rounded down to
    whole blocks)."""
    check_tensor(q, "q", ndim=3, dtypes=FLOATS)
    check_tensor(kv_layer, "kv_layer", ndim=5, dtypes=FLOATS)
    check_tensor(block_tables, "block_tables", ndim=2, dtypes=(torch.int32, torch.int64))
    check_tensor(context_lens, "context_lens", ndim=1, dtypes=(torch.int32, torch.int64))
    b, hq, d = q.shape
    _, two, bs, hkv, dk = kv_layer.shape
    check(two == 2, f"kv_layer's dim 1 must be 2 (K, V); got {two}")
    check(dk == d, f"q's head dim {d} differs from the cache's {dk}")
    check(hq % hkv == 0, f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    check(bs & (bs - 1) == 0, f"block size must be a power of two; got {bs}")
    check(block_tables.shape[0] == b and context_lens.shape[0] == b,
          f"block_tables and context_lens must have {b} rows; got {block_tables.shape[0]}, {context_lens.shape[0]}")
    capturing = q.is_cuda and torch.cuda.is_current_stream_capturing()
    if b and value_checks() and not capturing:  # reads the lengths on the host: never inside a CUDA graph
        check(int(context_lens.min()) >= 1, "every context length must be >= 1")
        check(int(context_lens.max()) <= block_tables.shape[1] * bs,
              f"a context of {int(context_lens.max())} tokens needs more than the block table's "
              f"{block_tables.shape[1]} blocks of {bs}")
    same_device(q=q, kv_layer=kv_layer, block_tables=block_tables, context_lens=context_lens)
    out = torch.empty_like(q)
    if not b:
        return out
    group, width = hq // hkv, block_tables.shape[1]
    per_part = max(1, (partition_tokens or PARTITION_TOKENS) // bs)
    parts = -(-width // per_part)  # from the table's width (a shape): the same for every replay of a graph
    sm_scale = scale if scale is not None else 1 / math.sqrt(d)
    shapes = dict(GROUP=group, GROUP_PAD=max(2, triton.next_power_of_2(group)), BLOCK_SIZE=bs,
                  D_PAD=triton.next_power_of_2(d), BLOCKS_PER_PART=per_part)
    strides = (q.stride(0), q.stride(1), kv_layer.stride(0), kv_layer.stride(1), kv_layer.stride(2),
               kv_layer.stride(3), block_tables.stride(0))
    if parts == 1:
        _paged_decode_kernel[(b, hkv, 1)](q, kv_layer, block_tables, context_lens, out, out, out, sm_scale, *strides,
                                          out.stride(0), out.stride(1), 0, 0, 0, d, SPLIT=False, **shapes)
        return out
    acc = torch.empty(b, hq, parts, d, dtype=torch.float32, device=q.device)  # [B, Hq, P, D] partials
    m = torch.empty(b, hq, parts, dtype=torch.float32, device=q.device)  # [B, Hq, P]
    l_sum = torch.empty_like(m)
    _paged_decode_kernel[(b, hkv, parts)](q, kv_layer, block_tables, context_lens, acc, m, l_sum, sm_scale, *strides,
                                          acc.stride(0), acc.stride(1), acc.stride(2), m.stride(0), m.stride(1), d,
                                          SPLIT=True, **shapes)
    _reduce_kernel[(b, hq)](acc, m, l_sum, out, context_lens, acc.stride(0), acc.stride(1), acc.stride(2), m.stride(0),
                            m.stride(1), out.stride(0), out.stride(1), parts, d, PART_TOKENS=per_part * bs,
                            PARTS_PAD=max(2, triton.next_power_of_2(parts)), D_PAD=triton.next_power_of_2(d))
    return out


def reference(q: torch.Tensor, kv_layer: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
              scale: float | None = None) -> torch.Tensor:
    b, hq, d = q.shape
    bs, hkv = kv_layer.shape[2], kv_layer.shape[3]
    out = torch.empty_like(q)
    for i in range(b):
        n = int(context_lens[i])
        blocks = block_tables[i, :-(-n // bs)].long()
        kv = kv_layer[blocks].float().transpose(0, 1).reshape(2, -1, hkv, d)[:, :n]  # [2, n, Hkv, D]
        k = kv[0].repeat_interleave(hq // hkv, dim=1)  # [n, Hq, D]
        v = kv[1].repeat_interleave(hq // hkv, dim=1)
        scores = torch.einsum("hd,nhd->hn", q[i].float(), k) * (scale if scale is not None else 1 / math.sqrt(d))
        out[i] = torch.einsum("hn,nhd->hd", scores.softmax(dim=-1), v).to(q.dtype)
    return out
