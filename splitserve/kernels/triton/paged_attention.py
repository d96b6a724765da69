"""Paged-attention decode: one query token per sequence, K/V read through its block table.

Grid (sequence b, KV head h): the G = Hq / Hkv query heads sharing KV head h
are processed together, so each K/V block is loaded once for all of them.
The loop walks the sequence's blocks with an online softmax (running max m,
running sum l, accumulator acc), never materialising the [T] scores.

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

from splitserve.kernels.triton.common import FLOATS, check, check_tensor, same_device


@triton.jit
def _paged_decode_kernel(q_ptr, kv_ptr, bt_ptr, lens_ptr, out_ptr, sm_scale,
                         stride_qb, stride_qh, stride_blk, stride_kv, stride_t, stride_h,
                         stride_btb, stride_ob, stride_oh, D,
                         GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                         D_PAD: tl.constexpr):
    b, kvh = tl.program_id(0), tl.program_id(1)
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
    for j in range(0, tl.cdiv(ctx, BLOCK_SIZE)):
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
    out = acc / l_i[:, None]
    tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=gmask[:, None] & dmask[None, :])


def launch(q: torch.Tensor, kv_layer: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
           scale: float | None = None) -> torch.Tensor:
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
    if b:
        check(int(context_lens.min()) >= 1, "every context length must be >= 1")
        check(int(context_lens.max()) <= block_tables.shape[1] * bs,
              f"a context of {int(context_lens.max())} tokens needs more than the block table's "
              f"{block_tables.shape[1]} blocks of {bs}")
    same_device(q=q, kv_layer=kv_layer, block_tables=block_tables, context_lens=context_lens)
    out = torch.empty_like(q)
    group = hq // hkv
    if b:
        _paged_decode_kernel[(b, hkv)](
            q, kv_layer, block_tables, context_lens, out, scale if scale is not None else 1 / math.sqrt(d),
            q.stride(0), q.stride(1), kv_layer.stride(0), kv_layer.stride(1), kv_layer.stride(2), kv_layer.stride(3),
            block_tables.stride(0), out.stride(0), out.stride(1), d,
            GROUP=group, GROUP_PAD=max(2, triton.next_power_of_2(group)), BLOCK_SIZE=bs,
            D_PAD=triton.next_power_of_2(d))
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
