"""Fused residual-add + RMSNorm.

    residual += delta            (in place, fp32 residual stream; skipped when delta is None)
    y = weight * (residual / sqrt(mean(residual^2) + eps)).to(weight.dtype)

One program per row. Shapes: residual [M, H] fp32, delta [M, H] float or None,
weight [H] -> (residual, y [M, H] weight.dtype).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from splitserve.kernels.triton.common import FLOATS, check, check_tensor, same_device


@triton.jit
def _add_rmsnorm_kernel(res_ptr, delta_ptr, w_ptr, out_ptr, H, stride_r, stride_d, stride_o, eps,
                        HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    x = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)  # [BLOCK]
    if HAS_DELTA:
        x += tl.load(delta_ptr + row * stride_d + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(res_ptr + row * stride_r + cols, x, mask=mask)
    inv_rms = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / H + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    y = (x * inv_rms).to(w.dtype) * w
    tl.store(out_ptr + row * stride_o + cols, y, mask=mask)


def launch(residual: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float):
    check_tensor(residual, "residual", ndim=2, dtypes=(torch.float32,))
    check_tensor(weight, "weight", ndim=1, dtypes=FLOATS)
    m, h = residual.shape
    check(weight.shape[0] == h, f"weight must have {h} entries; got {weight.shape[0]}")
    if delta is not None:
        check_tensor(delta, "delta", ndim=2, dtypes=FLOATS)
        check(tuple(delta.shape) == (m, h), f"delta must be [{m}, {h}]; got {tuple(delta.shape)}")
    same_device(residual=residual, delta=delta, weight=weight)
    out = torch.empty((m, h), dtype=weight.dtype, device=residual.device)
    if m:
        _add_rmsnorm_kernel[(m,)](residual, delta if delta is not None else residual, weight, out, h,
                                  residual.stride(0), delta.stride(0) if delta is not None else 0, out.stride(0),
                                  eps, HAS_DELTA=delta is not None, BLOCK=triton.next_power_of_2(h))
    return residual, out


def reference(residual: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float):
    x = residual.float() if delta is None else residual.float() + delta.float()
    y = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)
    return x, weight * y.to(weight.dtype)
