"""A CPU linear layer that picks torch's fastest kernel for the batch at hand.

Measured on our 2-vCPU Zen 4 machines (torch 2.13, 2 threads, the 120 linears
of SmolLM2's 30 layers, weights too big for cache):

    rows M   bf16 F.linear   fp16 F.linear
    1         12.5 ms          6.3 ms        <- fp16 has a dedicated GEMV kernel
    8         11.1 ms         42.3 ms
    32        18.9 ms        164.4 ms        <- bf16 GEMM (oneDNN) wins from M > 1

So :class:`GemvDispatchLinear` keeps the weight twice: bf16 for GEMMs and fp16
for single-row matrix-vector products (batch-1 decode, the LM head of one
sequence). fp16 carries more mantissa than bf16, so the GEMV path is no less
accurate; its smaller range is guarded: a row whose fp16 result is not finite is
recomputed in bf16. The price is memory: one extra 2-byte copy of every linear
weight. ``use_gemv_dispatch(model)`` swaps it in after the model is built (the
model definition does not change).

Shapes: x [M, in] (any float dtype) -> [M, out] in the bf16 weight's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GemvDispatchLinear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight  # [out, in] bf16 (shared, e.g. with a tied embedding)
        self.bias = linear.bias
        self.register_buffer("weight_f16", linear.weight.detach().to(torch.float16), persistent=False)
        self.register_buffer("bias_f16", None if linear.bias is None else linear.bias.detach().to(torch.float16),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1:
            out = F.linear(x.to(torch.float16), self.weight_f16, self.bias_f16)  # [1, out] fp16 GEMV
            if torch.isfinite(out).all():
                return out.to(self.weight.dtype)
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias)  # [M, out] bf16 GEMM


def use_gemv_dispatch(model: nn.Module) -> int:
    """Replace every bf16 ``nn.Linear`` in ``model`` with :class:`GemvDispatchLinear`; returns how many."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and child.weight.dtype == torch.bfloat16:
                setattr(parent, name, GemvDispatchLinear(child))
                swapped += 1
    return swapped
