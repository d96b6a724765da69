"""Weight-only int4 (group-wise, asymmetric) matmul with the dequantization fused into the GEMM.

    w[n, k] = (q[n, k] - 8) * scale[n, k // G] + zero[n, k // G]     y = x @ w^T (+ bias)

Two values per byte along K (k even: low nibble). Inside the K loop each tile
of bytes is unpacked, scaled with its group's scale and zero, and fed to the
dot in the activation dtype. Shapes: x [M, K], q [N, K/2] uint8, scale and zero
[N, K/G] fp32, bias [N] -> y [M, N] x.dtype. G in {32, 64, 128}.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from splitserve.kernels.quant import Int4Weight
from splitserve.kernels.triton.common import check_int4_linear, configs

_CONFIGS = configs(
    gpu=[triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
         for bm, bn, bk, w, s in [(16, 64, 128, 4, 4), (16, 128, 64, 4, 4), (32, 64, 64, 4, 3),
                                  (64, 128, 64, 4, 3), (128, 128, 64, 8, 3)]],
    interpreter=triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}),
)


@triton.autotune(configs=_CONFIGS, key=["M", "N", "K", "GROUP"])
@triton.jit
def _w4_matmul_kernel(x_ptr, q_ptr, scale_ptr, zero_ptr, bias_ptr, out_ptr, M, N, K,
                      stride_xm, stride_qn, stride_sn, stride_om,
                      GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    rk = tl.arange(0, BLOCK_K)  # [BK]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :],
                    mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)  # [BM, BK]
        wmask = (rn[None, :] < N) & (kk[:, None] < K)
        packed = tl.load(q_ptr + rn[None, :] * stride_qn + kk[:, None] // 2, mask=wmask, other=0)  # [BK, BN]
        q = (packed >> ((kk[:, None] % 2) * 4).to(tl.uint8)) & 0xF
        group = kk[:, None] // GROUP
        scale = tl.load(scale_ptr + rn[None, :] * stride_sn + group, mask=wmask, other=0.0)
        zero = tl.load(zero_ptr + rn[None, :] * stride_sn + group, mask=wmask, other=0.0)
        w = (q.to(tl.float32) - 8.0) * scale + zero  # [BK, BN]
        acc += tl.dot(x, w.to(x.dtype))
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def launch(x: torch.Tensor, w: Int4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    check_int4_linear(x, w, bias)
    (m, k), n = x.shape, w.qweight.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
    _w4_matmul_kernel[grid](x, w.qweight, w.scale, w.zero, bias if bias is not None else w.scale, out, m, n, k,
                            x.stride(0), w.qweight.stride(0), w.scale.stride(0), out.stride(0),
                            GROUP=w.group_size, HAS_BIAS=bias is not None)
    return out


def reference(x: torch.Tensor, w: Int4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    out = x.float() @ w.dequantize().T  # [M, N]
    return (out if bias is None else out + bias.float()).to(x.dtype)
