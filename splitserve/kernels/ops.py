"""The kernel operations the model calls; each picks Triton or the torch CPU path.

    add_rms_norm(residual, delta, weight, eps) -> (residual', y)    residual' = residual + delta
    silu_and_mul(gate_up [M, 2I]) -> [M, I]
    rotary(qk [N, H, D], cos, signed_sin [N, 1, D]) -> qk rotated   (Triton: in place)
    paged_decode_attention(q [B, Hq, D], kv_layer, block_tables [B, W], context_lens [B], mask) -> [B, Hq, D]
    kv_quantize(x [R, D]) -> (q int8 [R, D], scale fp32 [R]);  kv_dequantize(q, scale, dtype) -> [R, D]

The choice is ``dispatch.backend_for`` on the first tensor argument and the
shape: on a GPU the implementation measured fastest there (``choice.py``),
Triton when forced, torch's CPU paths otherwise. The torch paths are written for
CPU speed: few ops, fused torch kernels where they exist (``F.rms_norm``,
the flash SDPA kernel), no copies of the cache beyond a sequence's own blocks.
Quantized matmuls are modules (``linear.py``), since their weights need a
per-backend layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from splitserve.kernels.dispatch import backend_for, triton_module


def add_rms_norm(residual: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    # residual: [N, H] fp32 stream; delta: [N, H] or None -> (residual + delta, normalised in weight's dtype)
    if backend_for(residual, "add_rms_norm", residual.shape[0]) == "triton":
        return triton_module("rmsnorm").launch(residual, delta, weight, eps)
    if delta is not None:
        residual = residual + delta
    return residual, weight * F.rms_norm(residual, (residual.shape[-1],), eps=eps).to(weight.dtype)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    if backend_for(gate_up, "silu_and_mul", gate_up.shape[0]) == "triton":
        return triton_module("silu_mul").launch(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def rotary(qk: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    # qk: [N, H, D]; cos, signed_sin: [N, 1, D] (engine/rope.py tables)
    if backend_for(qk, "rotary", qk.shape[0]) == "triton":
        return triton_module("rotary").launch(qk, cos[:, 0], signed_sin[:, 0])
    n, h, d = qk.shape
    swapped = qk.reshape(n, h, 2, d // 2).flip(2).reshape(n, h, d)  # [x2, x1]
    return torch.addcmul(qk * cos, swapped, signed_sin)


def paged_decode_attention(q: torch.Tensor, kv_layer: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """One query per sequence over its cached K/V. ``mask`` ([B, 1, 1, W * bs], True or 0.0 = attend,
    False or -inf = not) may be passed precomputed from ``context_lens`` (the runner builds it once a step)."""
    if backend_for(q, "paged_decode_attention", q.shape[0], block_tables.shape[1] * kv_layer.shape[2],
                   (*q.shape[1:], kv_layer.shape[3])) == "triton":  # dims: heads, head_dim, KV heads
        return triton_module("paged_attention").launch(q, kv_layer, block_tables, context_lens)
    b, num_heads, head_dim = q.shape
    num_kv_heads = kv_layer.shape[3]
    if mask is None:
        width = block_tables.shape[1] * kv_layer.shape[2]
        mask = (torch.arange(width, device=q.device)[None, :] < context_lens[:, None])[:, None, None, :]
    # One gather of these sequences' blocks (never the pool), K/V-major so the reshape is a view:
    kv = kv_layer.transpose(0, 1)[:, block_tables]  # [2, B, W, bs, Hkv, D]
    kv = kv.view(2, b, -1, num_kv_heads, head_dim)  # [2, B, T, Hkv, D]
    keys, values = kv[0].transpose(1, 2), kv[1].transpose(1, 2)  # [B, Hkv, T, D] (strided views)
    qd = q.view(b, num_kv_heads, num_heads // num_kv_heads, head_dim)  # [B, Hkv, G, D]: GQA without a K/V copy
    out = F.scaled_dot_product_attention(qd, keys, values, attn_mask=mask)
    return out.reshape(b, num_heads, head_dim)


def kv_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # x: [R, D] -> (int8 [R, D], fp32 scale [R]); round half to even here, half away from zero in Triton
    if backend_for(x) == "triton":
        return triton_module("kv_quant").quantize(x)
    xf = x.float()
    scale = xf.abs().amax(dim=1).clamp_(min=1e-12).div_(127.0)
    return (xf / scale[:, None]).round_().to(torch.int8), scale


def kv_dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if backend_for(q) == "triton":
        return triton_module("kv_quant").dequantize(q, scale, dtype)
    return (q.float() * scale[:, None]).to(dtype)
