"""Weight-only int8 matmul with the dequantization fused into the GEMM.

    y[m, n] = scale[n] * sum_k x[m, k] * q[n, k]  (+ bias[n])

The int8 tile is widened to the activation dtype inside the K loop; the
per-channel scale is applied once to the fp32 accumulator at the end.
Shapes: x [M, K] float, q [N, K] int8, scale [N] fp32, bias [N] -> y [M, N] x.dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from splitserve.kernels.quant import Int8Weight
from splitserve.kernels.triton.common import check_int8_linear, configs

_CONFIGS = configs(
    gpu=[triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
         for bm, bn, bk, w, s in [(16, 64, 128, 4, 4), (16, 128, 64, 4, 4), (32, 64, 64, 4, 3),
                                  (64, 128, 64, 4, 3), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3)]],
    interpreter=triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}),
)


@triton.autotune(configs=_CONFIGS, key=["M", "N", "K"])
@triton.jit
def _w8_matmul_kernel(x_ptr, q_ptr, scale_ptr, bias_ptr, out_ptr, M, N, K,
                      stride_xm, stride_qn, stride_om,
                      HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    rk = tl.arange(0, BLOCK_K)  # [BK]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :],
                    mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)  # [BM, BK]
        q = tl.load(q_ptr + rn[None, :] * stride_qn + kk[:, None],
                    mask=(rn[None, :] < N) & (kk[:, None] < K), other=0)  # [BK, BN] int8
        acc += tl.dot(x, q.to(x.dtype))
    scale = tl.load(scale_ptr + rn, mask=rn < N, other=0.0)  # [BN]
    acc = acc * scale[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def launch(x: torch.Tensor, w: Int8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    check_int8_linear(x, w, bias)
    (m, k), n = x.shape, w.qweight.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
    _w8_matmul_kernel[grid](x, w.qweight, w.scale, bias if bias is not None else w.scale, out, m, n, k,
                            x.stride(0), w.qweight.stride(0), out.stride(0), HAS_BIAS=bias is not None)
    return out


def reference(x: torch.Tensor, w: Int8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    out = x.float() @ (w.qweight.float() * w.scale[:, None]).T  # [M, N]
    return (out if bias is None else out + bias.float()).to(x.dtype)
