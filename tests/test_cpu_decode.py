"""The C++ decode step (splitserve/kernels/cpu_decode.py): each fused kernel against the torch op it
replaces, the whole decode forward against the Python model (fp32 and bf16, dense / int8 / int4 weights,
with and without linear biases), and the engine's use of it (same greedy tokens as the Python path,
only decode-only steps go to it, a missing extension falls back to the Python model)."""

import os

import pytest
import torch

from helpers import make_tiny_model
from splitserve.engine.engine import LLMEngine
from splitserve.engine.runner import StepSequence, prepare_step
from splitserve.engine.sampling_params import SamplingParams
from splitserve.kernels import cpu_decode, ops

ext = cpu_decode.extension()
pytestmark = pytest.mark.skipif(ext is None, reason="the C++ decode step did not build on this machine")
DTYPES = (torch.float32, torch.bfloat16)


def _ulps(dtype):  # tolerance of one or two roundings in dtype
    return dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_small_fused_ops_match_the_torch_ops(dtype):
    torch.manual_seed(0)
    x = torch.randn(3, 96) * 4
    delta, w = torch.randn(3, 96).to(dtype), torch.randn(96).to(dtype)
    for d in (delta, None):
        x_cpp = x.clone()
        ref_x, ref_y = ops.add_rms_norm(x, d, w, 1e-5)
        y = ext.add_rms_norm(x_cpp, d, w, 1e-5)
        torch.testing.assert_close(x_cpp, ref_x)  # the residual stream updated in place
        torch.testing.assert_close(y.float(), ref_y.float(), **_ulps(dtype))
    gate_up = (torch.randn(3, 2 * 80) * 3).to(dtype)
    torch.testing.assert_close(ext.silu_mul(gate_up).float(), ops.silu_and_mul(gate_up).float(), **_ulps(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_and_kv_store_and_paged_attention_match_the_torch_ops(dtype):
    torch.manual_seed(1)
    hq, hkv, d, bs, nb = 6, 2, 16, 4, 12
    kv = torch.randn(nb, 2, bs, hkv, d).to(dtype)
    cos, ssin = torch.randn(64, d).to(dtype), torch.randn(64, d).to(dtype)
    positions, blocks, offsets = torch.tensor([9, 2]), torch.tensor([5, 7]), torch.tensor([1, 2])
    qkv = torch.randn(2, (hq + 2 * hkv) * d).to(dtype)
    qk = qkv[:, :(hq + hkv) * d].reshape(2, hq + hkv, d)
    ref_qk = ops.rotary(qk.clone(), cos[positions][:, None], ssin[positions][:, None])
    got, kv_cpp = qkv.clone(), kv.clone()
    ext.rope_store(got, positions, cos, ssin, kv_cpp, blocks, offsets, hq, hkv)
    torch.testing.assert_close(got[:, :(hq + hkv) * d].view_as(ref_qk).float(), ref_qk.float(), **_ulps(dtype))
    torch.testing.assert_close(kv_cpp[blocks, 0, offsets], ref_qk[:, hq:].to(dtype), **_ulps(dtype))  # K slots
    assert torch.equal(kv_cpp[blocks, 1, offsets], qkv[:, (hq + hkv) * d:].view(2, hkv, d))  # V slots, as they came
    untouched = torch.ones(nb, bs, dtype=torch.bool)
    untouched[blocks, offsets] = False
    assert torch.equal(kv_cpp.transpose(1, 2)[untouched], kv.transpose(1, 2)[untouched])  # no other slot written

    tables = torch.tensor([[3, 8, 1, 0], [10, 4, 0, 0]])  # non-contiguous blocks; lengths not a multiple of bs
    lens = torch.tensor([14, 5])
    q = torch.randn(2, hq, d).to(dtype)
    ref = ops.paged_decode_attention(q, kv, tables, lens)
    got = ext.paged_attention(q.view(2, -1), kv, tables, lens, hq)
    torch.testing.assert_close(got.float(), ref.float(), **_ulps(dtype))


@pytest.mark.skipif(ext is None or not ext.has_vnni, reason="no AVX512-VNNI on this machine")
@pytest.mark.parametrize("n,k", [(80, 64), (192, 96)])  # a 16-row tail block of torch's int4 layout; a full one
def test_vnni_gemv_matches_torchs_quantized_kernels(n, k):
    """int8 activations (one scale per 32) against torch's bf16-activation kernels on the same weights:
    within the activation rounding (~0.4% of a row's range), for 1-6 rows (the kernel takes 4 at a time)."""
    torch.manual_seed(2)
    values = torch.randint(0, 16, (n, k), dtype=torch.int32)
    packed4 = torch._convert_weight_to_int4pack_for_cpu(values, 1)
    assert torch.equal(cpu_decode.torch_int4_values(packed4, k).int(), values)
    scales_zeros = (torch.rand(k // 32, n, 2) * 0.02).to(torch.bfloat16)
    tiles4 = cpu_decode.vnni_int4(packed4, scales_zeros)
    q8 = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    scale8 = (torch.rand(n) * 0.01).to(torch.bfloat16)
    tiles8 = cpu_decode.vnni_int8(q8, scale8)
    for rows in (1, 2, 5, 6):
        x = torch.randn(rows, k).to(torch.bfloat16)
        for got, ref in ((ext.vnni_gemv(x, *tiles4, 32), torch._weight_int4pack_mm_for_cpu(x, packed4, 32, scales_zeros)),
                         (ext.vnni_gemv(x, *tiles8, 32), torch._weight_int8pack_mm(x, q8, scale8))):
            assert got.shape == (rows, n) and got.dtype == x.dtype
            torch.testing.assert_close(got.float(), ref.float(), rtol=0, atol=0.02 * ref.abs().max().item())
    with pytest.raises(RuntimeError, match="multiple of 32"):
        ext.vnni_gemv(torch.randn(1, 48), *cpu_decode.vnni_int8(q8[:, :48], scale8), 32)


def _int8_activations(x: torch.Tensor) -> torch.Tensor:
    """x [M, K] as vnni_gemv sees it: per group of 32, rounded to int8 steps of max|x| / 127 (plain torch)."""
    g = x.float().view(x.shape[0], -1, 32)
    amax = g.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    return (torch.round(g * inv) * (amax / 127.0)).view(x.shape)


@pytest.mark.skipif(ext is None or not ext.has_vnni, reason="no AVX512-VNNI on this machine")
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rows", [1, 5, 110])  # a decode step, a few rows, a prompt
def test_quantized_linears_run_the_vnni_kernel_with_int8_activations_per_32(bits, rows):
    """QuantLinear on a VNNI CPU computes any number of rows through vnni_gemv: equal to the float matmul of
    the activations rounded per 32 (plain torch) and the layer's weights (bf16 scales), to fp32 sums."""
    from splitserve.kernels.linear import QuantLinear
    from splitserve.kernels.quant import quantize_int4, quantize_int8
    torch.manual_seed(bits + rows)
    n, k = 200, 96  # n: a padded last tile of 16 rows
    w = torch.randn(n, k) * 0.05
    qw = quantize_int8(w) if bits == 8 else quantize_int4(w, 32)
    bias = torch.randn(n) * 0.1
    layer = QuantLinear(qw, bias, torch.float32)
    assert layer.vnni is not None
    x = torch.randn(rows, k) * 3
    x[:, 7] = 40.0  # an outlier channel: its group gets coarser steps, the other groups keep theirs
    bf = lambda t: t.bfloat16().float()  # noqa: E731  (the layer keeps its scales in bf16)
    if bits == 8:
        ref = _int8_activations(x) @ (qw.qweight.float() * bf(qw.scale)[:, None]).T
    else:  # sum (q - 8) s xq + zero sum x: the zero term takes the unrounded activations
        groups = lambda t: t.repeat_interleave(32, dim=1)  # noqa: E731  [N, K/32] -> [N, K]
        ref = _int8_activations(x) @ ((qw.values().float() - 8) * groups(bf(qw.scale))).T + x @ groups(bf(qw.zero)).T
    got = layer(x)
    assert got.shape == (rows, n) and got.dtype == torch.float32
    torch.testing.assert_close(got, ref + bias, rtol=0, atol=1e-4 * ref.abs().max().item())


def _decode_logits(engine, prompts):
    """Prefill ``prompts`` with the Python model, then one decode step of all of them two ways:
    (Python model logits, C++ decoder logits), each from the same cache."""
    bs = engine.runner.block_size
    seqs, table = [], iter(range(engine.kv.num_blocks))
    for ids in prompts:
        blocks = tuple(next(table) for _ in range(-(-(len(ids) + 1) // bs)))
        step = prepare_step([StepSequence(ids[:-1], 0, blocks, True)], bs, engine.kv_cache.dtype)
        engine.model(step.input_ids, engine.kv_cache, step.meta, step.logits_indices)
        seqs.append(StepSequence(ids[-1:], len(ids) - 1, blocks, True))
    step = prepare_step(seqs, bs, engine.kv_cache.dtype)
    before = engine.kv_cache.clone()
    ref = engine.model(step.input_ids, engine.kv_cache, step.meta, step.logits_indices)
    after_python = engine.kv_cache.clone()
    engine.kv_cache.copy_(before)
    got = engine.runner.decoder(step, engine.kv_cache)
    return ref, got, after_python


@pytest.mark.parametrize("arch,dtype,quant", [("llama", "float32", "none"), ("qwen2", "float32", "none"),
                                              ("llama", "bfloat16", "none"), ("qwen2", "bfloat16", "int8"),
                                              ("llama", "bfloat16", "int4")])
def test_the_decode_forward_matches_the_python_model(tmp_path, arch, dtype, quant):
    """qwen2 has biases on q/k/v; bf16 dense takes the fp16 GEMV at one row; int8 / int4 the quantized packs."""
    make_tiny_model(str(tmp_path), arch)
    engine = LLMEngine(model=str(tmp_path), dtype=dtype, quantization=quant, show_progress=False, num_kv_blocks=64)
    assert engine.runner.decoder is not None
    prompts = [[5, 9, 33, 120, 7, 7, 64, 3, 18, 200, 41], [77, 2, 19]]
    for batch in (prompts[:1], prompts):
        ref, got, kv_python = _decode_logits(engine, batch)
        assert got.dtype == torch.float32 and got.shape == ref.shape
        tol = dict(rtol=1e-4, atol=1e-4) if dtype == "float32" else dict(rtol=0, atol=0.05 * ref.abs().max().item())
        torch.testing.assert_close(got, ref, **tol)
        assert torch.equal(got.argmax(-1), ref.argmax(-1))
        torch.testing.assert_close(engine.kv_cache.float(), kv_python.float(), **_ulps(engine.kv_cache.dtype))


def test_the_engine_decodes_the_same_tokens_and_only_decode_steps_take_the_cpp_path(tmp_path, monkeypatch):
    make_tiny_model(str(tmp_path), "llama")
    prompts = ["hello there", "a longer prompt about nothing in particular", "x"]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    python = LLMEngine(model=str(tmp_path), dtype="float32", show_progress=False, num_kv_blocks=64,
                       fused_decode=False)
    assert python.runner.decoder is None
    fused = LLMEngine(model=str(tmp_path), dtype="float32", show_progress=False, num_kv_blocks=64)
    calls = []
    real_call = type(fused.runner.decoder).__call__
    monkeypatch.setattr(type(fused.runner.decoder), "__call__",
                        lambda self, step, kv: calls.append(step.meta.num_decodes) or real_call(self, step, kv))
    want = [o.token_ids for o in python.generate(prompts, params)]
    got = [o.token_ids for o in fused.generate(prompts, params)]
    assert got == want
    assert calls and all(n > 0 for n in calls)  # decode-only steps ran in C++ ...
    assert len(calls) < params.max_tokens  # ... and the prefill steps did not (the first token is a prefill's)
    assert fused.kv.num_free_blocks == fused.kv.num_blocks and fused.requests == {}


def test_no_extension_means_the_python_model(tmp_path, monkeypatch):
    make_tiny_model(str(tmp_path), "llama")
    monkeypatch.setattr(cpu_decode, "extension", lambda: None)
    engine = LLMEngine(model=str(tmp_path), dtype="float32", show_progress=False, num_kv_blocks=64)
    assert engine.runner.decoder is None
    out = engine.generate(["hi"], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    assert len(out[0].token_ids) == 4


def test_a_build_lock_left_by_a_killed_process_is_removed_and_a_live_build_waited_for(tmp_path):
    import threading
    (tmp_path / "lock").touch()  # torch's lock file, left by a process killed while it held it
    with cpu_decode.exclusive_build(str(tmp_path)):
        assert not (tmp_path / "lock").exists()
        order = []

        def second():
            with cpu_decode.exclusive_build(str(tmp_path)):
                order.append("second")
        other = threading.Thread(target=second)
        other.start()
        other.join(0.3)
        assert other.is_alive()  # waits while this build runs
        order.append("first")
    other.join(5)
    assert order == ["first", "second"]


def test_every_process_builds_with_the_pinned_ninja_whatever_its_path(tmp_path, monkeypatch):
    # a plain .venv/bin/python has the system's ninja (if any) first on PATH, Ray's workers the venv's: with
    # two versions each rebuilt the extension after the other; torch runs the `ninja` PATH finds
    import shutil

    import ninja
    import torch.utils.cpp_extension as cpp
    seen = []
    monkeypatch.setenv("SPLITSERVE_EXT_DIR", str(tmp_path))
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.setattr(cpp, "load", lambda **kw: seen.append(shutil.which("ninja")))
    cpu_decode.build_extension()
    assert seen == [os.path.join(ninja.BIN_DIR, "ninja")]
    assert os.environ["PATH"] == "/usr/bin:/bin"  # restored


def test_a_torch_int4_layout_the_vnni_packer_cannot_read_leaves_the_layer_on_torchs_kernel(monkeypatch):
    from splitserve.kernels.linear import QuantLinear
    from splitserve.kernels.quant import quantize_int4

    def unreadable(*_):
        raise cpu_decode.Unsupported("torch's int4 packing is not the layout torch_int4_values knows")
    monkeypatch.setattr(cpu_decode, "vnni_int4", unreadable)
    layer = QuantLinear(quantize_int4(torch.randn(32, 64) * 0.05, 32), None, torch.float32)
    assert layer.vnni is None
    x = torch.randn(3, 64)
    assert layer(x).shape == (3, 32)
