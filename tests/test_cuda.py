"""The GPU path on a real GPU (every test skipped without CUDA; ``scripts/gpu_checks.sh`` runs them).

* every Triton kernel compiled, on CUDA tensors, against its plain-torch reference at real shapes, in
  float32 and bfloat16 (the interpreter tests, ``test_kernels.py``, check the same kernels on CPU);
* the model on CUDA against transformers on CPU: float32 logits within 1e-4 of the output's range,
  bfloat16 top-1 agreement >= 98%;
* the real model's greedy output on CUDA (float32, CUDA graphs on) equal to the CPU engine's.

(``test_graphs.py`` holds graph replay against eager; ``test_device.py`` the GPU engine against the CPU one
on the tiny model; ``test_kernel_choice.py`` the table's dispatch of CUDA tensors.)
"""

import pytest
import torch

from conftest import assert_no_leaks
from helpers import make_tiny_model
from splitserve.kernels.dispatch import triton_module
from splitserve.kernels.quant import quantize_int4, quantize_int8, reference_linear

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DTYPES = [torch.float32, torch.bfloat16]
SHAPES = [(576, 1536), (1536, 576), (4096, 14336), (14336, 4096)]  # (N, K): SmolLM2's MLP, a 7B-class MLP


def close(out, ref, dtype):
    """Within 1% (bf16) / 0.5% (fp32: the GEMMs multiply in tf32) of the reference's largest magnitude."""
    out, ref = out.float(), ref.float()
    tol = (1e-2 if dtype == torch.bfloat16 else 5e-3) * ref.abs().max().item()
    assert torch.isfinite(out).all() and (out - ref).abs().max().item() <= tol


def cuda(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(*shape, device="cuda", generator=g).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", SHAPES)
def test_quantized_matmuls_and_gemvs_compiled(n, k, dtype):
    gemv, w8, w4 = triton_module("gemv"), triton_module("w8_matmul"), triton_module("w4_matmul")
    dense = cuda(n, k, seed=n + k)
    q8, q4 = quantize_int8(dense), quantize_int4(dense, 32)
    bias = cuda(n, dtype=dtype, seed=1)
    for m in (1, 7, 16, 128):
        x = cuda(m, k, dtype=dtype, seed=m)
        ref8, ref4 = reference_linear(x.float(), q8, bias), reference_linear(x.float(), q4, bias)
        close(w8.launch(x, q8, bias), ref8, dtype)
        close(w4.launch(x, q4, bias), ref4, dtype)
        if m <= 16:
            close(gemv.launch_w8(x, q8, bias), ref8, dtype)
            close(gemv.launch_w4(x, q4, bias), ref4, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,context", [(1, 4096), (1, 100), (32, 512), (8, 3000)])
def test_paged_decode_attention_compiled(batch, context, dtype):
    paged = triton_module("paged_attention")
    hq, hkv, d, bs = 32, 8, 128, 16
    width = -(-context // bs) + 1  # one column more than the longest needs
    kv = cuda(batch * width + 1, 2, bs, hkv, d, dtype=dtype, seed=context)
    tables = torch.randperm(batch * width, device="cuda").view(batch, width)
    lens = torch.randint(1, context + 1, (batch,), device="cuda")
    lens[0] = context
    q = cuda(batch, hq, d, dtype=dtype, seed=batch)
    ref = paged.reference(q, kv, tables, lens)
    close(paged.launch(q, kv, tables, lens), ref, dtype)  # split when the table is wider than 256 tokens
    close(paged.launch(q, kv, tables, lens, partition_tokens=1 << 20), ref, dtype)  # one pass


@pytest.mark.parametrize("dtype", DTYPES)
def test_elementwise_kernels_compiled(dtype):
    norm, silu, rotary, kvq = (triton_module(m) for m in ("rmsnorm", "silu_mul", "rotary", "kv_quant"))
    for rows, h in ((1, 576), (4096, 576), (4096, 4096)):  # (4096, 576): rows packed per program
        res, delta, w = cuda(rows, h), cuda(rows, h, dtype=dtype, seed=1), cuda(h, dtype=dtype, seed=2)
        r_out, y = norm.launch(res.clone(), delta, w, 1e-5)
        r_ref, y_ref = norm.reference(res, delta, w, 1e-5)
        close(r_out, r_ref, torch.float32)
        close(y, y_ref, dtype)
        gu = cuda(rows, 2 * h, dtype=dtype, seed=3)
        close(silu.launch(gu), silu.reference(gu), dtype)
    qk = cuda(64, 12, 64, dtype=dtype, seed=4)
    angle = torch.rand(64, 32, device="cuda") * 6.28
    cos = torch.cat([angle.cos()] * 2, -1).to(dtype)
    sin = torch.cat([-angle.sin(), angle.sin()], -1).to(dtype)
    expected = rotary.reference(qk.clone(), cos, sin)
    close(rotary.launch(qk, cos, sin), expected, dtype)
    x = cuda(300, 128, dtype=dtype, seed=5)
    q, scale = kvq.quantize(x)
    close(kvq.dequantize(q, scale, dtype), x, dtype)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_cuda")
    hf = make_tiny_model(str(path), "llama", max_position_embeddings=512)
    return str(path), hf


def _our_logits(path, dtype, device, token_ids):
    """Logits at every position of ``token_ids``, prefilled in two chunks by our model on ``device``."""
    from splitserve.engine.engine import LLMEngine
    from splitserve.engine.runner import StepSequence, prepare_step
    eng = LLMEngine(model=path, device=device, dtype=dtype, show_progress=False, block_size=4, num_kv_blocks=64,
                    cuda_graphs="off")
    table, half, outs = tuple(reversed(range(64))), len(token_ids) // 2, []
    for start, end in ((0, half), (half, len(token_ids))):
        step = prepare_step([StepSequence(token_ids[start:end], start, table, True, end - start)], 4,
                            eng.kv_cache.dtype, eng.kv_cache.device)
        outs.append(eng.model(step.input_ids, eng.kv_cache, step.meta, step.logits_indices))
    return torch.cat(outs).float().cpu()  # [T, V]


def test_the_model_on_cuda_matches_transformers(tiny):
    path, hf = tiny
    ids = list(range(3, 203))  # 200 positions
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float()  # [T, V] on CPU, float32
    fp32 = _our_logits(path, "float32", "cuda", ids)
    assert (fp32 - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()
    bf16 = _our_logits(path, "bfloat16", "cuda", ids)
    # top-1 agreement where the reference's top two differ by more than bf16 can resolve (a random tiny model
    # has near-ties: 2% of its positions within 1% of the logits' range)
    top2 = ref.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 0.01 * ref.abs().max()
    agree = (bf16.argmax(-1) == ref.argmax(-1))[clear].float().mean().item()
    assert clear.sum() >= 150 and agree >= 0.98, (int(clear.sum()), agree)


def _has_default_model() -> bool:
    from splitserve.engine.default_model import default_model_path
    try:
        return bool(default_model_path())
    except Exception:  # noqa: BLE001 - not installed (the GPU machine may lack it)
        return False


@pytest.mark.skipif(not _has_default_model(), reason="the default model is not installed")
def test_the_real_models_greedy_output_on_cuda_equals_cpu_float32(real_engine, real_model_path):
    from splitserve.engine.engine import LLMEngine
    from splitserve.engine.sampling_params import SamplingParams
    from test_real_model import PROMPTS
    params = SamplingParams(max_tokens=32, temperature=0)
    gpu = LLMEngine(model=real_model_path, device="cuda", dtype="float32", show_progress=False,
                    prefix_caching=False, kv_cache_memory=256 << 20, max_num_batched_tokens=256)
    assert gpu.runner.decoder is not None and gpu.runner.decoder.graphs  # the decode steps replay graphs
    ours = [r.token_ids for r in gpu.generate(PROMPTS, params)]
    assert ours == [r.token_ids for r in real_engine.generate(PROMPTS, params)]
    assert sum(gpu.runner.decoder.replays.values()) > 0
    assert_no_leaks(gpu)


def test_a_self_drafting_engine_on_cuda_measures_its_drafts_kernels_and_keeps_the_greedy_output(
        tiny, tmp_path, monkeypatch):
    """The draft (the target as int4, the target int8) gets its own kernel choices beside the target's, and
    speculation on CUDA leaves the greedy output as it was."""
    from splitserve.engine.engine import LLMEngine
    from splitserve.engine.sampling_params import SamplingParams
    from splitserve.kernels import choice
    path, _ = tiny
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # measured in this test, not read from an earlier run
    prompts = [list(range(40, 60)) * 3, list(range(100, 131))]
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    kw = dict(model=path, device="cuda", dtype="float32", show_progress=False, quantization="int8",
              num_kv_blocks=96)
    before = choice.current()
    try:
        ref = LLMEngine(**kw).generate(prompts, params)
        spec = LLMEngine(**kw, speculative="draft", spec_calibrate=False)
        keys = choice.current().choices
        assert {k.split("|")[0] for k in keys} >= {"linear_int8", "linear_int4", "add_rms_norm"}
        assert len(choice.current().meta["merged"]) == 1  # the draft's table, merged into the target's
        got = spec.generate(prompts, params)
        assert [g.token_ids for g in got] == [r.token_ids for r in ref]
        assert spec.stats().spec.accepted > 0
        assert_no_leaks(spec)
        assert spec.proposer.kv.num_free_blocks == spec.proposer.kv.num_blocks
    finally:
        choice.install(before)
