"""int8 KV rows with one scale per (token, head): the codec that compresses KV on the wire.

    scale[r] = max_d |x[r, d]| / 127        q[r, d] = round(x[r, d] / scale[r])        x' = q * scale

A row is one token's one head (D values). Shapes: quantize x [R, D] float ->
(q [R, D] int8, scale [R] fp32); dequantize (q, scale) -> [R, D] in the dtype asked.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from splitserve.kernels.triton.common import FLOATS, check, check_tensor, same_device


@triton.jit
def _quantize_kernel(x_ptr, q_ptr, s_ptr, R, D, stride_x, stride_q, ROWS: tl.constexpr, D_PAD: tl.constexpr):
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    d = tl.arange(0, D_PAD)
    mask = (r[:, None] < R) & (d[None, :] < D)
    x = tl.load(x_ptr + r[:, None] * stride_x + d[None, :], mask=mask, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-12) / 127.0  # [ROWS]
    y = x / scale[:, None]
    q = tl.where(y >= 0, tl.floor(y + 0.5), tl.ceil(y - 0.5))  # round half away from zero
    tl.store(q_ptr + r[:, None] * stride_q + d[None, :], q.to(tl.int8), mask=mask)
    tl.store(s_ptr + r, scale, mask=r < R)


@triton.jit
def _dequantize_kernel(q_ptr, s_ptr, out_ptr, R, D, stride_q, stride_o, ROWS: tl.constexpr, D_PAD: tl.constexpr):
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    d = tl.arange(0, D_PAD)
    mask = (r[:, None] < R) & (d[None, :] < D)
    q = tl.load(q_ptr + r[:, None] * stride_q + d[None, :], mask=mask, other=0).to(tl.float32)
    scale = tl.load(s_ptr + r, mask=r < R, other=0.0)
    tl.store(out_ptr + r[:, None] * stride_o + d[None, :], (q * scale[:, None]).to(out_ptr.dtype.element_ty),
             mask=mask)


_ROWS = 16


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    check_tensor(x, "x", ndim=2, dtypes=FLOATS)
    r, d = x.shape
    q = torch.empty((r, d), dtype=torch.int8, device=x.device)
    scale = torch.empty(r, dtype=torch.float32, device=x.device)
    if r:
        _quantize_kernel[(triton.cdiv(r, _ROWS),)](x, q, scale, r, d, x.stride(0), q.stride(0),
                                                   ROWS=_ROWS, D_PAD=triton.next_power_of_2(d))
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    check_tensor(q, "q", ndim=2, dtypes=(torch.int8,))
    check_tensor(scale, "scale", ndim=1, dtypes=(torch.float32,))
    r, d = q.shape
    check(scale.shape[0] == r, f"scale must have {r} entries (one per row); got {scale.shape[0]}")
    check(dtype in FLOATS, f"dtype must be one of {[str(t) for t in FLOATS]}; got {dtype}")
    same_device(q=q, scale=scale)
    out = torch.empty((r, d), dtype=dtype, device=q.device)
    if r:
        _dequantize_kernel[(triton.cdiv(r, _ROWS),)](q, scale, out, r, d, q.stride(0), out.stride(0),
                                                     ROWS=_ROWS, D_PAD=triton.next_power_of_2(d))
    return out


def reference_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.float()
    scale = x.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    y = x / scale[:, None]
    q = torch.where(y >= 0, torch.floor(y + 0.5), torch.ceil(y - 0.5))  # half away from zero, like the kernel
    return q.to(torch.int8), scale


def reference_dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * scale[:, None]).to(dtype)
