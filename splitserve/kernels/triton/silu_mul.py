"""Fused SiLU-and-multiply of the MLP: y = silu(gate) * up, gate and up halves of one tensor.

Shapes: gate_up [M, 2I] -> y [M, I] (same dtype); math in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from splitserve.kernels.triton.common import FLOATS, check, check_tensor


@triton.jit
def _silu_mul_kernel(gu_ptr, out_ptr, inter, stride_g, stride_o, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(gu_ptr + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gu_ptr + row * stride_g + inter + cols, mask=mask, other=0.0).to(tl.float32)
    y = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def launch(gate_up: torch.Tensor, block: int = 1024) -> torch.Tensor:
    check_tensor(gate_up, "gate_up", ndim=2, dtypes=FLOATS)
    m, two_i = gate_up.shape
    check(two_i % 2 == 0, f"gate_up's last dim must be even (gate and up halves); got {two_i}")
    inter = two_i // 2
    out = torch.empty((m, inter), dtype=gate_up.dtype, device=gate_up.device)
    if m:
        _silu_mul_kernel[(m, triton.cdiv(inter, block))](gate_up, out, inter, gate_up.stride(0), out.stride(0),
                                                         BLOCK=block)
    return out


def reference(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.float().chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up).to(gate_up.dtype)
