"""Every Triton kernel against its plain-torch reference (under TRITON_INTERPRET=1 on CPU),
and the torch CPU paths of the same operations against the same references."""

from __future__ import annotations

import pytest
import torch

from splitserve.kernels import ops
from splitserve.kernels.dispatch import force_backend, triton_module
from splitserve.kernels.triton.common import value_checks
from splitserve.kernels.linear import QuantLinear
from splitserve.kernels.quant import (Int4Weight, int4_from_gguf_blocks, pack_int4, quantize_int4, quantize_int8,
                                      reference_linear, unpack_int4)

# Triton's interpreter runs these kernels on CPU tensors; on a machine with CUDA it is not chosen (the
# kernels compile for the GPU), and tests/test_cuda.py runs the same kernels on CUDA tensors instead
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter tests (a GPU: tests/test_cuda.py)")

w8 = triton_module("w8_matmul")
w4 = triton_module("w4_matmul")
rmsnorm = triton_module("rmsnorm")
silu_mul = triton_module("silu_mul")
rotary = triton_module("rotary")
paged = triton_module("paged_attention")
kvq = triton_module("kv_quant")


def close(a, b, tol):
    torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol)


# ---------------------------------------------------------------- quantized formats

def test_int8_and_int4_roundtrip_error_is_bounded():
    torch.manual_seed(0)
    w = torch.randn(48, 256)
    q8 = quantize_int8(w)
    assert (q8.dequantize() - w).abs().max() <= q8.scale.max() / 2 + 1e-6  # half a step per row
    for g in (32, 64, 128):
        q4 = quantize_int4(w, g)
        step = q4.scale.repeat_interleave(g, dim=1)
        assert ((q4.dequantize() - w).abs() <= step / 2 + 1e-5).all()
    assert torch.equal(unpack_int4(pack_int4(torch.arange(16).repeat(3, 2))), torch.arange(16).repeat(3, 2).byte())


@pytest.mark.parametrize("q4_1", [False, True])
def test_gguf_q4_blocks_load_exactly_into_int4(q4_1):
    from gguf import GGMLQuantizationType as QT
    from gguf import quants

    from splitserve.engine.weights.dequant import dequantize
    torch.manual_seed(1)
    w = torch.randn(8, 64).numpy()
    qtype = QT.Q4_1 if q4_1 else QT.Q4_0
    raw = quants.quantize(w, qtype)  # the gguf package's own quantizer: independent of ours
    expected = dequantize(raw, qtype, (8, 64))
    blocks = torch.from_numpy(raw.view("uint8").reshape(-1, 20 if q4_1 else 18).copy())
    got = int4_from_gguf_blocks(blocks, q4_1, (8, 64))
    assert isinstance(got, Int4Weight) and got.group_size == 32
    close(got.dequantize(), expected, 1e-6)


# ---------------------------------------------------------------- quantized matmuls

@pytest.mark.parametrize("m,n,k", [(1, 32, 64), (5, 70, 96), (17, 33, 160)])  # ragged: tile edges in M, N and K
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_w8_matmul_triton_matches_reference(m, n, k, dtype):
    torch.manual_seed(m * n)
    x, w = torch.randn(m, k).to(dtype), quantize_int8(torch.randn(n, k))
    bias = torch.randn(n).to(dtype)
    close(w8.launch(x, w, bias), w8.reference(x, w, bias), 2e-2 if dtype == torch.float16 else 1e-4)
    close(w8.launch(x, w), reference_linear(x, w), 2e-2 if dtype == torch.float16 else 1e-4)


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("m,n", [(1, 40), (9, 33)])
def test_w4_matmul_triton_matches_reference(group, m, n):
    torch.manual_seed(group + m)
    k = 256
    x, w = torch.randn(m, k), quantize_int4(torch.randn(n, k), group)
    close(w4.launch(x, w), w4.reference(x, w), 1e-4)
    bias = torch.randn(n)
    close(w4.launch(x, w, bias), reference_linear(x, w, bias), 1e-4)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("m", [1, 3, 32])
def test_cpu_quantized_linear_matches_reference(bits, m):
    torch.manual_seed(bits * m)
    w = torch.randn(96, 128) * 0.05
    qw = quantize_int8(w) if bits == 8 else quantize_int4(w, 32)
    x = torch.randn(m, 128)
    bias = torch.randn(96) * 0.1
    layer = QuantLinear(qw, bias, torch.float32)
    assert layer.backend == "torch"
    expected = reference_linear(x.bfloat16().float(), qw, bias)  # the CPU path feeds bf16 activations
    # bf16 output and bf16 scales: ~3 significant digits
    close(layer(x), expected, 2e-2)


def test_quantized_linear_on_the_triton_backend_matches_cpu():
    torch.manual_seed(3)
    w = torch.randn(64, 128) * 0.05
    x = torch.randn(4, 128)
    for qw in (quantize_int8(w), quantize_int4(w, 64)):
        cpu = QuantLinear(qw, None, torch.float32)
        with force_backend("triton"):
            tri = QuantLinear(qw, None, torch.float32)
            assert tri.backend == "triton"
            y = tri(x)
        close(y, reference_linear(x, qw), 1e-4)
        close(cpu(x), y, 2e-2)


def test_launchers_reject_bad_shapes_with_clear_errors():
    w = quantize_int8(torch.randn(8, 32))
    with pytest.raises(ValueError, match="x has 16 input features but the weight has 32"):
        w8.launch(torch.randn(2, 16), w)
    with pytest.raises(ValueError, match="int8"):
        w8.launch(torch.randn(2, 32), type(w)(w.qweight.float(), w.scale))
    with pytest.raises(ValueError, match="contiguous in its last dim"):
        w8.launch(torch.randn(32, 2).T, w)
    q4 = quantize_int4(torch.randn(8, 64), 32)
    with pytest.raises(ValueError, match="scale must be"):
        w4.launch(torch.randn(1, 64), Int4Weight(q4.qweight, q4.scale[:, :1].contiguous(), q4.zero, 32))
    with pytest.raises(ValueError, match="multiple of KV heads"):
        paged.launch(torch.randn(1, 5, 8), torch.randn(4, 2, 4, 2, 8), torch.zeros(1, 1, dtype=torch.long),
                     torch.ones(1, dtype=torch.long))
    before = value_checks(True)  # the checks that read values on the host: off by default (CUDA graphs)
    try:
        with pytest.raises(ValueError, match="needs more than the block table"):
            paged.launch(torch.randn(1, 4, 8), torch.randn(4, 2, 4, 2, 8), torch.zeros(1, 1, dtype=torch.long),
                         torch.tensor([5]))
    finally:
        value_checks(before)


# ---------------------------------------------------------------- element-wise kernels

@pytest.mark.parametrize("h", [64, 100])  # 100: masked tail of the row
@pytest.mark.parametrize("with_delta", [False, True])
@pytest.mark.parametrize("rows_per_program", [None, 4])  # 4: two programs, the second with a masked row
def test_add_rmsnorm_triton_and_cpu_match_reference(h, with_delta, rows_per_program):
    torch.manual_seed(h)
    res, weight = torch.randn(7, h) * 30, torch.randn(h)
    delta = torch.randn(7, h) if with_delta else None
    exp_res, exp_y = rmsnorm.reference(res, delta, weight, 1e-5)
    got_res, got_y = rmsnorm.launch(res.clone(), delta, weight, 1e-5, rows_per_program=rows_per_program)
    close(got_res, exp_res, 1e-5)
    close(got_y, exp_y, 1e-4)
    cpu_res, cpu_y = ops.add_rms_norm(res, delta, weight, 1e-5)
    close(cpu_res, exp_res, 1e-5)
    close(cpu_y, exp_y, 1e-4)


def test_add_rmsnorm_packs_rows_only_when_there_are_many_and_scales_its_warps():
    assert rmsnorm.config(1, 576) == (1, 1024, 2)  # decode: a row per program
    assert rmsnorm.config(4096, 576) == (4, 1024, 8)  # prefill: 4 rows of 1024 per program
    assert rmsnorm.config(4096, 4096) == (1, 4096, 8)
    assert rmsnorm.config(4096, 16384) == (1, 16384, 16)  # warps capped
    with pytest.raises(ValueError, match="power of two"):
        rmsnorm.launch(torch.zeros(2, 8), None, torch.ones(8), 1e-5, rows_per_program=3)


@pytest.mark.parametrize("inter", [48, 1536])
def test_silu_and_mul_triton_and_cpu_match_reference(inter):
    gu = torch.randn(3, 2 * inter)
    close(silu_mul.launch(gu, block=32), silu_mul.reference(gu), 1e-5)
    close(ops.silu_and_mul(gu), silu_mul.reference(gu), 1e-5)


def test_rotary_in_place_on_a_strided_slice_matches_reference():
    from splitserve.engine.config import ModelConfig
    from splitserve.engine.rope import RotaryEmbedding
    cfg = ModelConfig(architecture="llama", vocab_size=10, hidden_size=64, intermediate_size=8, num_layers=1,
                      num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0,
                      max_position_embeddings=64, tie_word_embeddings=True)
    cos, ssin = RotaryEmbedding(cfg, 64, torch.float32).tables(torch.tensor([0, 3, 9, 63, 17]))
    qkv = torch.randn(5, 8 * 16)  # q (4 heads), k (2), v (2) fused, like the model's qkv_proj output
    qk = qkv[:, :6 * 16].view(5, 6, 16)  # rows strided by 128
    expected = rotary.reference(qk.clone(), cos[:, 0], ssin[:, 0])
    v_before = qkv[:, 6 * 16:].clone()
    close(ops.rotary(qk, cos, ssin), expected, 1e-5)  # the torch path
    out = rotary.launch(qk, cos[:, 0].contiguous(), ssin[:, 0].contiguous())
    assert out.data_ptr() == qk.data_ptr()  # in place
    close(qkv[:, :6 * 16].view(5, 6, 16), expected, 1e-5)
    assert torch.equal(qkv[:, 6 * 16:], v_before)  # v untouched


# ---------------------------------------------------------------- paged attention

def _cache_and_tables(layout: str, lens: list[int], bs: int, hkv: int, d: int):
    """A KV pool and block tables: blocks in order, shuffled, or shared prefix blocks."""
    g = torch.Generator().manual_seed(len(lens) * 7 + bs)
    need = [-(-n // bs) for n in lens]
    num_blocks = sum(need) + 5
    kv = torch.randn(num_blocks, 2, bs, hkv, d, generator=g)
    width = max(need) + 1  # one padding column of garbage ids beyond every sequence's blocks
    tables = torch.full((len(lens), width), num_blocks - 1, dtype=torch.long)
    ids = torch.randperm(num_blocks, generator=g) if layout == "shuffled" else torch.arange(num_blocks)
    pos = 0
    for i, k in enumerate(need):
        if layout == "shared-prefix" and i > 0:
            tables[i, :1] = tables[0, :1]  # first block shared with sequence 0
            tables[i, 1:k] = ids[pos:pos + k - 1]
            pos += k - 1
        else:
            tables[i, :k] = ids[pos:pos + k]
            pos += k
    return kv, tables


@pytest.mark.parametrize("layout", ["contiguous", "shuffled", "shared-prefix"])
@pytest.mark.parametrize("hq,hkv,d,bs", [(4, 2, 16, 4), (9, 3, 64, 16), (6, 6, 32, 8)])
def test_paged_decode_attention_triton_and_cpu_match_reference(layout, hq, hkv, d, bs):
    lens = [1, bs, bs + 1, 3 * bs - 1]  # one token, exact block, one past, ragged last block
    kv, tables = _cache_and_tables(layout, lens, bs, hkv, d)
    q = torch.randn(len(lens), hq, d)
    context = torch.tensor(lens)
    expected = paged.reference(q, kv, tables, context)
    close(paged.launch(q, kv, tables, context), expected, 1e-4)
    close(ops.paged_decode_attention(q, kv, tables, context), expected, 1e-4)
    close(paged.launch(q, kv, tables.int(), context.int()), expected, 1e-4)


@pytest.mark.parametrize("per_part", [1, 2, 3])  # blocks per partition: 4, 2 or 2 (ragged) partitions of 4
def test_split_context_paged_attention_matches_reference(per_part):
    """Flash-decoding: the context cut into partitions, partials reduced. Sequences end in every partition,
    so some programs have no blocks at all (their partials must weigh nothing), one is a single token."""
    bs, hq, hkv, d = 4, 6, 2, 16
    lens = [1, 5, 8, 9, 14, 16]
    kv, tables = _cache_and_tables("shuffled", lens, bs, hkv, d)  # 5 columns: 4 blocks + a garbage one
    q = torch.randn(len(lens), hq, d)
    context = torch.tensor(lens)
    expected = paged.reference(q, kv, tables, context)
    close(paged.launch(q, kv, tables, context, partition_tokens=per_part * bs), expected, 1e-4)
    long = [700, 3]  # past the default partition (256 tokens): split without being asked
    kv, tables = _cache_and_tables("contiguous", long, 16, hkv, d)
    q = torch.randn(2, hq, d, dtype=torch.bfloat16)
    kv = kv.to(torch.bfloat16)
    close(paged.launch(q, kv, tables, torch.tensor(long)), paged.reference(q, kv, tables, torch.tensor(long)), 2e-2)


def test_the_paged_attention_launch_reads_no_tensor_value_on_the_host():
    """What CUDA-graph capture needs: no device-to-host read (``aten._local_scalar_dense``: ``int(t)``,
    ``t.item()``, ``bool(t)``) in the launcher, split or not; with value checks on, the same launch reads."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class HostReads(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += func is torch.ops.aten._local_scalar_dense.default
            return func(*args, **(kwargs or {}))

    lens = [3, 40]
    kv, tables = _cache_and_tables("shuffled", lens, 4, 2, 16)
    q, context = torch.randn(2, 4, 16), torch.tensor(lens)
    for partition in (None, 8):
        with HostReads() as reads:
            out = paged.launch(q, kv, tables, context, partition_tokens=partition)
        assert reads.count == 0
        close(out, paged.reference(q, kv, tables, context), 1e-4)
    before = value_checks(True)
    try:
        with HostReads() as reads:
            paged.launch(q, kv, tables, context)
        assert reads.count >= 2  # the mode sees host reads when there are some
    finally:
        value_checks(before)


# ---------------------------------------------------------------- KV int8 codec

@pytest.mark.parametrize("rows,d", [(1, 64), (37, 64), (16, 48)])
def test_kv_quantize_triton_and_cpu_match_reference(rows, d):
    torch.manual_seed(rows)
    x = torch.randn(rows, d) * torch.rand(rows, 1) * 10
    q_ref, s_ref = kvq.reference_quantize(x)
    q_tri, s_tri = kvq.quantize(x)
    close(s_tri, s_ref, 1e-6)
    assert (q_tri.int() - q_ref.int()).abs().max() <= 1  # float division may land either side of .5
    q_cpu, s_cpu = ops.kv_quantize(x)
    close(s_cpu, s_ref, 1e-6)
    assert (q_cpu.int() - q_ref.int()).abs().max() <= 1
    back = kvq.dequantize(q_tri, s_tri, torch.float32)
    close(back, kvq.reference_dequantize(q_tri, s_tri), 1e-6)
    close(ops.kv_dequantize(q_tri, s_tri, torch.float32), back, 1e-6)
    assert ((back - x).abs() <= s_ref[:, None] / 2 + 1e-6).all()  # error within half a step per row


# ---------------------------------------------------------------- split-K GEMV (decode rows)

gemv = triton_module("gemv")


@pytest.mark.parametrize("m", [1, 5, 16])
@pytest.mark.parametrize("split", [None, 1, 3])  # 3 slices of 2 K-steps over 5 steps: a ragged last one
def test_int8_gemv_matches_reference(m, split):
    torch.manual_seed(m)
    w = quantize_int8(torch.randn(72, 640))  # 72 rows: a ragged output block; 640 = 5 steps of 128
    x, bias = torch.randn(m, 640), torch.randn(72)
    close(gemv.launch_w8(x, w, bias, split=split), reference_linear(x, w, bias), 1e-4)
    xh = x.half()  # (Triton's interpreter computes bf16 dots wrongly, the GEMM's too: fp16 stands for 16-bit)
    close(gemv.launch_w8(xh, w, split=split), reference_linear(xh.float(), w), 3e-2)


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("m,split", [(1, None), (3, 2), (16, 5)])
def test_int4_gemv_matches_reference(group, m, split):
    torch.manual_seed(group + m)
    w = quantize_int4(torch.randn(40, 384), group)  # 40 rows: a ragged block; 384 / group groups
    x, bias = torch.randn(m, 384), torch.randn(40)
    close(gemv.launch_w4(x, w, bias, split=split), reference_linear(x, w, bias), 1e-4)
    close(gemv.launch_w4(x.half(), w, split=split), reference_linear(x.half().float(), w), 3e-2)


def test_gemv_refuses_more_rows_than_it_takes():
    with pytest.raises(ValueError, match="at most 16 rows; got 17"):
        gemv.launch_w8(torch.randn(17, 128), quantize_int8(torch.randn(8, 128)))
