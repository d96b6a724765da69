"""Fused residual-add + RMSNorm.

    residual += delta            (in place, fp32 residual stream; skipped when delta is None)
    y = weight * (residual / sqrt(mean(residual^2) + eps)).to(weight.dtype)

Each program normalises ROWS whole rows as one [ROWS, BLOCK] tile (BLOCK: the
row width rounded up to a power of two). One row per program with the default
four warps left a wide row's loads in flight on too few threads and a narrow
row's program with too little to do (measured at 284 GB/s against torch's
1,010 on an H100); ``config`` packs rows while there are many of them and
scales the warps with the tile.

Shapes: residual [M, H] fp32, delta [M, H] float or None, weight [H] -> (residual, y [M, H] weight.dtype).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from splitserve.kernels.triton.common import FLOATS, check, check_tensor, same_device

TILE = 4096  # elements per program when rows are packed
PACK_FROM_ROWS = 512  # fewer rows than this: one per program (parallelism over packing)


@triton.jit
def _add_rmsnorm_kernel(res_ptr, delta_ptr, w_ptr, out_ptr, M, H, stride_r, stride_d, stride_o, eps,
                        HAS_DELTA: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # [ROWS]
    cols = tl.arange(0, BLOCK)  # [BLOCK]
    mask = (rows[:, None] < M) & (cols[None, :] < H)  # [ROWS, BLOCK]
    rows64 = rows.to(tl.int64)[:, None]  # [ROWS, 1]: M x stride may pass 2^31
    res_at = res_ptr + rows64 * stride_r + cols[None, :]
    x = tl.load(res_at, mask=mask, other=0.0).to(tl.float32)  # [ROWS, BLOCK]
    if HAS_DELTA:
        x += tl.load(delta_ptr + rows64 * stride_d + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(res_at, x, mask=mask)
    inv_rms = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / H + eps)  # [ROWS]
    w = tl.load(w_ptr + cols, mask=cols < H, other=0.0)  # [BLOCK]
    y = (x * inv_rms[:, None]).to(w.dtype) * w[None, :]  # [ROWS, BLOCK]
    tl.store(out_ptr + rows64 * stride_o + cols[None, :], y, mask=mask)


def config(m: int, h: int) -> tuple[int, int, int]:
    """(rows per program, BLOCK, warps) for an [m, h] input: rows packed up to TILE elements once there
    are PACK_FROM_ROWS rows or more; a warp per 512 elements of the tile (16 fp32 per thread), 1 to 16."""
    block = triton.next_power_of_2(h)
    rows = max(1, min(16, TILE // block)) if m >= PACK_FROM_ROWS else 1
    return rows, block, max(1, min(16, rows * block // 512))


def launch(residual: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float,
           rows_per_program: int | None = None):
    """``rows_per_program`` (a power of two) overrides ``config``'s (the tests pack a few rows)."""
    check_tensor(residual, "residual", ndim=2, dtypes=(torch.float32,))
    check_tensor(weight, "weight", ndim=1, dtypes=FLOATS)
    m, h = residual.shape
    check(weight.shape[0] == h, f"weight must have {h} entries; got {weight.shape[0]}")
    if delta is not None:
        check_tensor(delta, "delta", ndim=2, dtypes=FLOATS)
        check(tuple(delta.shape) == (m, h), f"delta must be [{m}, {h}]; got {tuple(delta.shape)}")
    same_device(residual=residual, delta=delta, weight=weight)
    out = torch.empty((m, h), dtype=weight.dtype, device=residual.device)
    rows, block, warps = config(m, h)
    if rows_per_program is not None:
        check(rows_per_program >= 1 and rows_per_program & (rows_per_program - 1) == 0,
              f"rows_per_program must be a power of two; got {rows_per_program}")
        rows = rows_per_program
    if m:
        _add_rmsnorm_kernel[(triton.cdiv(m, rows),)](
            residual, delta if delta is not None else residual, weight, out, m, h, residual.stride(0),
            delta.stride(0) if delta is not None else 0, out.stride(0), eps, HAS_DELTA=delta is not None,
            ROWS=rows, BLOCK=block, num_warps=warps)
    return residual, out


def reference(residual: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float):
    x = residual.float() if delta is None else residual.float() + delta.float()
    y = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)
    return x, weight * y.to(weight.dtype)
