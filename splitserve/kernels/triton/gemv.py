"""Weight-only int8 / int4 matmul for a few rows (decode: M <= 16), split over K.

At a handful of rows the matmul reads each weight byte once and does almost no
arithmetic per byte: its speed is the weights' bytes over the memory bandwidth,
and the GEMM tiling (``w8_matmul.py``, ``w4_matmul.py``) leaves most of the GPU
idle (few output tiles). Here:

    grid      (output blocks of BLOCK_N rows) x (SPLIT K-slices): enough programs
              to fill the GPU whatever N is; SPLIT comes from the shapes and the
              GPU's SM count, never from tensor values (capture-safe)
    int8      per K step: the x tile [16, BK] (rows past M are zeros) times the
              int8 tile [BN, BK] widened to x's dtype; the per-row scale once
              per partial
    int4      one group of G inputs per step: the packed bytes [BN, G/2] are
              loaded once and split into low nibbles (even k) and high nibbles
              (odd k), each against x's even / odd inputs; the group's scale
              and zero are loaded once per output row, not per element:
                  sum_k x_k ((q_k - 8) s + z) = s * sum_k x_k (q_k - 8) + z * sum_k x_k
    reduce    each slice writes its fp32 partial [M, N]; the launcher sums the
              SPLIT partials in a fixed order (deterministic), adds the bias and
              casts to x's dtype

Shapes: x [M, K] float (M <= 16), int8: q [N, K], scale [N]; int4: q [N, K/2]
uint8 (k even: low nibble), scale and zero [N, K/G] fp32; bias [N] -> y [M, N].
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from splitserve.kernels.choice import GEMV_MAX_ROWS as MAX_ROWS
from splitserve.kernels.quant import Int4Weight, Int8Weight
from splitserve.kernels.triton.common import (FLOATS, check, check_int4_linear, check_int8_linear, check_tensor,
                                              interpreting)

BLOCK_N = 64
BLOCK_K = 128  # int8: inputs per step (int4: one group per step)


@triton.jit
def _w8_gemv_kernel(x_ptr, q_ptr, scale_ptr, part_ptr, M, N, K, k_per_split,
                    stride_xm, stride_qn, stride_ps, stride_pm,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    split = tl.program_id(1)
    rm = tl.arange(0, BLOCK_M)  # [BM]
    rk = tl.arange(0, BLOCK_K)  # [BK]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = split * k_per_split
    k_end = tl.minimum(K, k_start + k_per_split)
    for k0 in range(k_start, k_end, BLOCK_K):
        kk = k0 + rk
        kmask = kk < k_end
        x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :], mask=(rm[:, None] < M) & kmask[None, :],
                    other=0.0)  # [BM, BK]
        q = tl.load(q_ptr + rn[None, :] * stride_qn + kk[:, None], mask=(rn[None, :] < N) & kmask[:, None],
                    other=0)  # [BK, BN] int8
        acc += tl.dot(x, q.to(x.dtype), input_precision=PRECISION)
    scale = tl.load(scale_ptr + rn, mask=rn < N, other=0.0)  # [BN]
    tl.store(part_ptr + split * stride_ps + rm[:, None] * stride_pm + rn[None, :], acc * scale[None, :],
             mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _w4_gemv_kernel(x_ptr, q_ptr, scale_ptr, zero_ptr, part_ptr, M, N, groups_per_split, num_groups,
                    stride_xm, stride_qn, stride_sn, stride_ps, stride_pm,
                    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    split = tl.program_id(1)
    rm = tl.arange(0, BLOCK_M)  # [BM]
    j = tl.arange(0, GROUP // 2)  # [G/2]: byte j of a group holds inputs 2j (low) and 2j + 1 (high)
    nmask = rn < N
    xmask = rm[:, None] < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    g_start = split * groups_per_split
    g_end = tl.minimum(num_groups, g_start + groups_per_split)
    for g in range(g_start, g_end):
        k0 = g * GROUP
        x_even = tl.load(x_ptr + rm[:, None] * stride_xm + k0 + 2 * j[None, :], mask=xmask, other=0.0)  # [BM, G/2]
        x_odd = tl.load(x_ptr + rm[:, None] * stride_xm + k0 + 2 * j[None, :] + 1, mask=xmask, other=0.0)
        packed = tl.load(q_ptr + rn[None, :] * stride_qn + k0 // 2 + j[:, None], mask=nmask[None, :],
                         other=0)  # [G/2, BN] uint8
        lo = ((packed & 0xF).to(tl.int32) - 8).to(x_even.dtype)  # [G/2, BN]: q - 8 of the even inputs
        hi = ((packed >> 4).to(tl.int32) - 8).to(x_even.dtype)
        dot = tl.dot(x_even, lo, input_precision=PRECISION) + tl.dot(x_odd, hi, input_precision=PRECISION)  # [BM, BN]
        xsum = tl.sum(x_even.to(tl.float32), axis=1) + tl.sum(x_odd.to(tl.float32), axis=1)  # [BM]
        scale = tl.load(scale_ptr + rn * stride_sn + g, mask=nmask, other=0.0)  # [BN]: once per row and group
        zero = tl.load(zero_ptr + rn * stride_sn + g, mask=nmask, other=0.0)
        acc += dot * scale[None, :] + xsum[:, None] * zero[None, :]
    tl.store(part_ptr + split * stride_ps + rm[:, None] * stride_pm + rn[None, :], acc,
             mask=xmask & nmask[None, :])


def _programs_wanted(device: torch.device) -> int:
    """About two programs per SM (a small number under the interpreter, where each program is slow)."""
    if interpreting() or device.type != "cuda":
        return 4
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


def splits_for(n: int, steps: int, device: torch.device, split: int | None = None) -> int:
    """How many K-slices: enough (output blocks x slices) programs to fill the GPU, at most one per K step."""
    if split is None:
        split = -(-_programs_wanted(device) // triton.cdiv(n, BLOCK_N))
    return max(1, min(split, steps))


def _precision(x: torch.Tensor) -> str | None:
    """float32 activations multiply in full precision (tf32 would round them to 10 bits); others: the default."""
    return "ieee" if x.dtype == torch.float32 else None


def _finish(part: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    out = part[0] if part.shape[0] == 1 else part.sum(0)  # [M, N] fp32: a fixed order, deterministic
    if bias is not None:
        out = out + bias.float()
    return out.to(dtype)


def _check_x(x: torch.Tensor) -> None:
    check_tensor(x, "x", ndim=2, dtypes=FLOATS)
    check(x.shape[0] <= MAX_ROWS, f"the GEMV takes at most {MAX_ROWS} rows; got {x.shape[0]} (use the GEMM)")


def launch_w8(x: torch.Tensor, w: Int8Weight, bias: torch.Tensor | None = None,
              split: int | None = None) -> torch.Tensor:
    """``split``: K-slices (default: from the GPU's size; tests force it)."""
    _check_x(x)
    check_int8_linear(x, w, bias)
    (m, k), n = x.shape, w.qweight.shape[0]
    steps = triton.cdiv(k, BLOCK_K)
    s = splits_for(n, steps, x.device, split)
    k_per_split = triton.cdiv(steps, s) * BLOCK_K
    s = triton.cdiv(k, k_per_split)  # slices that have work
    part = torch.empty((s, m, n), dtype=torch.float32, device=x.device)  # [S, M, N]
    _w8_gemv_kernel[(triton.cdiv(n, BLOCK_N), s)](x, w.qweight, w.scale, part, m, n, k, k_per_split,
                                                   x.stride(0), w.qweight.stride(0), part.stride(0), part.stride(1),
                                                   BLOCK_M=MAX_ROWS, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
                                                   PRECISION=_precision(x))
    return _finish(part, bias, x.dtype)


def launch_w4(x: torch.Tensor, w: Int4Weight, bias: torch.Tensor | None = None,
              split: int | None = None) -> torch.Tensor:
    _check_x(x)
    check_int4_linear(x, w, bias)
    (m, k), n = x.shape, w.qweight.shape[0]
    groups = k // w.group_size
    s = splits_for(n, groups, x.device, split)
    per_split = triton.cdiv(groups, s)
    s = triton.cdiv(groups, per_split)
    part = torch.empty((s, m, n), dtype=torch.float32, device=x.device)  # [S, M, N]
    _w4_gemv_kernel[(triton.cdiv(n, BLOCK_N), s)](x, w.qweight, w.scale, w.zero, part, m, n, per_split, groups,
                                                   x.stride(0), w.qweight.stride(0), w.scale.stride(0),
                                                   part.stride(0), part.stride(1),
                                                   GROUP=w.group_size, BLOCK_M=MAX_ROWS, BLOCK_N=BLOCK_N,
                                                   PRECISION=_precision(x))
    return _finish(part, bias, x.dtype)
