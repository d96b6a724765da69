"""Whole models through the kernel dispatch layer: Triton backend (interpreted on CPU) and quantized weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import hf_logits, make_tiny_model, our_logits_chunked
from splitserve.engine.model import LlamaForCausalLM
from splitserve.engine.weights import load_model
from splitserve.kernels.dispatch import force_backend
from splitserve.kernels.linear import QuantLinear, quantize_model
from splitserve.kernels.quant import quantize_int4, quantize_int8


def _ours(path, dtype=torch.float32):
    loaded = load_model(str(path))
    return LlamaForCausalLM.from_state_dict(loaded.config, loaded.state, dtype)


def _ids(n, seed=1):
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _dequantized_twin(path, mode: str) -> LlamaForCausalLM:
    """The float model whose weights are the quantize->dequantize round trip of each linear (the reference)."""
    ref = _ours(path)
    quantize = (lambda w: quantize_int8(w)) if mode == "int8" else (lambda w: quantize_int4(w, 32))
    new = {name: (quantize_int8 if name == "lm_head" else quantize)(m.weight.detach()).dequantize()
           for name, m in ref.named_modules() if isinstance(m, nn.Linear)}  # the head is int8 in every mode
    new["embed_tokens"] = quantize_int8(ref.embed_tokens.weight.detach()).dequantize()
    for name, w in new.items():  # assigned after computing all: the tied head shares the embedding tensor
        ref.get_submodule(name).weight = nn.Parameter(w)
    return ref


INTERPRETER = pytest.mark.skipif(torch.cuda.is_available(), reason="Triton's interpreter on CPU tensors: no GPU")


@INTERPRETER
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_model_on_triton_kernels_matches_transformers(tmp_path, arch):
    hf = make_tiny_model(str(tmp_path), arch)
    ids = _ids(29)
    with force_backend("triton"):  # norms, rotary, SiLU-mul and decode attention through Triton (interpreted)
        got = our_logits_chunked(_ours(tmp_path), ids, [20, 1, 1, 7], block_size=4)
    torch.testing.assert_close(got, hf_logits(hf, ids), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=INTERPRETER)])
def test_quantized_tiny_model_matches_its_dequantized_float_twin(tmp_path, mode, backend):
    make_tiny_model(str(tmp_path), "qwen2", tie_word_embeddings=True)  # biases + a tied head
    with force_backend(backend):
        model = _ours(tmp_path)
        assert quantize_model(model, mode, group_size=32) == 2 * 4 + 2  # 2 layers x (qkv, o, gate_up, down), head, embedding
        assert all(m.backend == backend for m in model.modules() if isinstance(m, QuantLinear))
        ids = _ids(23, seed=4)
        got = our_logits_chunked(model, ids, [15, 1, 7], block_size=4)
    ref = our_logits_chunked(_dequantized_twin(tmp_path, mode), ids, [23], block_size=4)
    # torch's CPU kernels take bf16 activations and bf16 scales: ~1% of the logit scale
    tol = 1e-4 if backend == "triton" else 3e-2 * ref.abs().max().item()
    torch.testing.assert_close(got, ref, rtol=0, atol=tol)
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9
