"""The CPU GEMV/GEMM dispatch linear against a plain float64 reference."""

import torch
from torch import nn

from splitserve.kernels.cpu_linear import GemvDispatchLinear, use_gemv_dispatch


def _linear(out_f, in_f, bias, scale=0.05):
    torch.manual_seed(0)
    lin = nn.Linear(in_f, out_f, bias=bias).to(torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f) * scale)
    return lin


def test_single_row_and_batched_match_the_reference():
    lin = _linear(96, 64, bias=True)
    fast = GemvDispatchLinear(lin)
    for rows in (1, 5):
        x = torch.randn(rows, 64)
        ref = torch.nn.functional.linear(x.double(), lin.weight.double(), lin.bias.double())
        out = fast(x)
        assert out.dtype == torch.bfloat16 and out.shape == (rows, 96)
        torch.testing.assert_close(out.double(), ref, rtol=1e-2, atol=2e-2)


def test_fp16_overflow_falls_back_to_bf16():
    lin = _linear(8, 16, bias=False, scale=1.0)
    x = torch.full((1, 16), 6000.0)  # products ~ 1e4-1e5: beyond fp16's 65504
    out = GemvDispatchLinear(lin)(x)
    ref = torch.nn.functional.linear(x.double(), lin.weight.double())
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=ref.abs().max().item() * 1e-2)


def test_transform_swaps_only_bf16_linears_and_keeps_tied_weights():
    model = nn.Sequential(nn.Linear(4, 4).to(torch.bfloat16), nn.Linear(4, 4))
    emb = nn.Embedding(10, 4).to(torch.bfloat16)
    head = nn.Linear(4, 10, bias=False).to(torch.bfloat16)
    head.weight = emb.weight
    model.append(head)
    assert use_gemv_dispatch(model) == 2
    assert isinstance(model[0], GemvDispatchLinear) and isinstance(model[1], nn.Linear)
    assert model[2].weight is emb.weight
