"""Rotary embedding applied in place to the q and k heads (rotate-half convention).

    out[d] = x[d] * cos[d] + x[(d + D/2) % D] * signed_sin[d]

with the tables of ``engine/rope.py`` (cos = [c, c], signed_sin = [-s, s]).
One program per (token, head) loads the whole head before writing it back, so
in place is safe. Shapes: qk [N, H, D] (rows may be strided, e.g. a slice of
the fused qkv output), cos and signed_sin [N, D] -> qk.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from splitserve.kernels.triton.common import FLOATS, check, check_tensor, same_device


@triton.jit
def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, stride_xn, stride_xh, stride_cn, D,
                   HALF: tl.constexpr, BLOCK: tl.constexpr):
    n, h = tl.program_id(0), tl.program_id(1)
    d = tl.arange(0, BLOCK)
    mask = d < D
    base = x_ptr + n * stride_xn + h * stride_xh
    x = tl.load(base + d, mask=mask, other=0.0).to(tl.float32)
    swapped = tl.load(base + (d + HALF) % D, mask=mask, other=0.0).to(tl.float32)
    cos = tl.load(cos_ptr + n * stride_cn + d, mask=mask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + n * stride_cn + d, mask=mask, other=0.0).to(tl.float32)
    tl.store(base + d, (x * cos + swapped * sin).to(x_ptr.dtype.element_ty), mask=mask)


def launch(qk: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    check_tensor(qk, "qk", ndim=3, dtypes=FLOATS)
    n, heads, d = qk.shape
    check(d % 2 == 0, f"head dim must be even; got {d}")
    for name, t in (("cos", cos), ("signed_sin", signed_sin)):
        check_tensor(t, name, ndim=2, dtypes=FLOATS)
        check(tuple(t.shape) == (n, d), f"{name} must be [{n}, {d}]; got {tuple(t.shape)}")
    check(cos.stride() == signed_sin.stride(), "cos and signed_sin must share strides")
    same_device(qk=qk, cos=cos, signed_sin=signed_sin)
    if n:
        _rotary_kernel[(n, heads)](qk, cos, signed_sin, qk.stride(0), qk.stride(1), cos.stride(0), d,
                                   HALF=d // 2, BLOCK=triton.next_power_of_2(d))
    return qk


def reference(qk: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    n, h, d = qk.shape
    swapped = qk.float().reshape(n, h, 2, d // 2).flip(2).reshape(n, h, d)
    return (qk.float() * cos.float()[:, None] + swapped * signed_sin.float()[:, None]).to(qk.dtype)
