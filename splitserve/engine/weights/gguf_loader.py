"""Load a Llama-family GGUF file (read with the ``gguf`` package).

Steps: open (memory-mapped) -> config from ``{arch}.*`` metadata -> each tensor,
one at a time, under its Hugging Face name: dequantized to float32, or with
``quantization`` int8/int4 made into our quantized formats (Q4_0/Q4_1 blocks
go straight into int4 with no float detour; other types pass through float one
tensor at a time) -> llama q/k rows un-permuted. llama.cpp's converter permutes q/k rows of ``llama`` models so
that GGML's adjacent-pair rotary embedding equals HF's rotate-half one; we undo
it so there is one rotary convention (``rope.py``).
"""

from __future__ import annotations

import os
import re

import numpy as np
import torch

from splitserve.engine.config import ModelConfig
from splitserve.errors import CorruptModelError, UnsupportedModelError
from splitserve.engine.weights import LoadedModel
from splitserve.engine.weights.dequant import dequantize
from splitserve.kernels.linear import quantize_weight
from splitserve.kernels.quant import int4_from_gguf_blocks, quantize_int8

HEAD_NAMES = ("model.embed_tokens.weight", "lm_head.weight")  # int8 whatever the quantization mode

SUPPORTED_GGUF_ARCHITECTURES = ("llama", "qwen2")

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def open_gguf(path: str):
    from gguf import GGUFReader
    try:
        return GGUFReader(path)
    except Exception as e:  # the reader raises ValueError/struct errors/IndexError on bad files
        raise CorruptModelError(f"{path!r} is not a readable GGUF file (truncated or damaged? {type(e).__name__}: {e})") from None


def field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def gguf_config(reader, path: str) -> ModelConfig:
    arch = field(reader, "general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise UnsupportedModelError(
            f"GGUF architecture {arch!r} is not supported; supported: {list(SUPPORTED_GGUF_ARCHITECTURES)}")

    def need(key: str):
        v = field(reader, f"{arch}.{key}")
        if v is None:
            raise CorruptModelError(f"GGUF metadata lacks {arch}.{key}")
        return v

    hidden, heads = need("embedding_length"), need("attention.head_count")
    tensor_names = {t.name for t in reader.tensors}
    rope_scaling = {}
    scaling_type = field(reader, f"{arch}.rope.scaling.type")
    if scaling_type in ("linear", "yarn"):
        rope_scaling = {"rope_type": scaling_type, "factor": field(reader, f"{arch}.rope.scaling.factor"),
                        "original_max_position_embeddings":
                            field(reader, f"{arch}.rope.scaling.original_context_length")}
    elif scaling_type not in (None, "none"):
        raise UnsupportedModelError(f"GGUF rope scaling {scaling_type!r} is not supported; supported: linear, yarn")
    if "rope_freqs.weight" in tensor_names:
        factors = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
        rope_scaling = {"rope_type": "factors", "factors": np.array(factors.data, dtype=np.float32).tolist()}
    vocab = field(reader, f"{arch}.vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    return ModelConfig(
        architecture=arch,
        vocab_size=int(vocab),
        hidden_size=int(hidden),
        intermediate_size=int(need("feed_forward_length")),
        num_layers=int(need("block_count")),
        num_heads=int(heads),
        num_kv_heads=int(field(reader, f"{arch}.attention.head_count_kv", heads)),
        head_dim=int(field(reader, f"{arch}.attention.key_length", hidden // heads)),
        rms_norm_eps=float(need("attention.layer_norm_rms_epsilon")),
        rope_theta=float(field(reader, f"{arch}.rope.freq_base", 10000.0)),
        max_position_embeddings=int(need("context_length")),
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias=arch == "qwen2",
        rope_scaling=rope_scaling,
        name=str(field(reader, "general.name", os.path.basename(path))),
    )


def hf_name(gguf_name: str) -> str | None:
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    if m:
        part = _LAYER_NAMES.get(m.group(2))
        return f"model.layers.{m.group(1)}.{part}.{m.group(3)}" if part else None
    m = re.fullmatch(r"(\w+)\.(weight|bias)", gguf_name)
    if m and m.group(1) in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[m.group(1)]}.{m.group(2)}"
    return None


def unpermute_rows(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k permutation: per head, rows (pair j, half h) -> (half h, pair j)."""
    rows = w.shape[0]
    return w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def load_gguf(path: str, progress=None, quantization: str = "none", group_size: int = 32) -> LoadedModel:
    reader = open_gguf(path)
    cfg = gguf_config(reader, path)
    state: dict[str, object] = {}
    tensors = [t for t in reader.tensors if t.name != "rope_freqs.weight"]
    desc = "dequantizing" if quantization == "none" else f"loading as {quantization}"
    for t in progress(tensors, desc) if progress else tensors:
        name = hf_name(t.name)
        if name is None:
            raise UnsupportedModelError(f"GGUF tensor {t.name!r} has no place in a {cfg.architecture} model")
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims fastest-first
        try:
            if quantization == "none" or len(shape) != 2:
                w = dequantize(t.data, t.tensor_type, shape)
            elif name in HEAD_NAMES:
                # The LM head (often tied to the embedding) stays int8 in both modes, as llama.cpp's
                # 4-bit presets keep their output layer wider: an int4 head alone cost SmolLM2
                # +5.7% perplexity (tests/test_quantization_accuracy.py), int8 +0.04%.
                w = quantize_int8(dequantize(t.data, t.tensor_type, shape))
            else:
                w = _quantized_tensor(t, shape, quantization, group_size)
        except (ValueError, RuntimeError) as e:
            raise CorruptModelError(f"tensor {t.name!r} ({t.tensor_type.name}, shape {shape}) is malformed: {e}")
        if cfg.architecture == "llama" and (".q_proj." in name or ".k_proj." in name):
            heads = cfg.num_heads if ".q_proj." in name else cfg.num_kv_heads
            if isinstance(w, torch.Tensor):
                w = unpermute_rows(w, heads)
            else:
                w = w.index_rows(unpermute_rows(torch.arange(shape[0]), heads))
        state[name] = w
    return LoadedModel(cfg, state, reader, {"format": "gguf", "path": path, "quantization": quantization})


def _quantized_tensor(t, shape: tuple[int, int], mode: str, group_size: int):
    """One linear weight in our int8 / int4 format; only this tensor is ever float at once."""
    from gguf import GGMLQuantizationType as QT

    if mode == "int4" and t.tensor_type in (QT.Q4_0, QT.Q4_1):
        # exact: GGUF's 32-value blocks are int4 groups of 32 (whatever group_size asks for)
        block_bytes = 18 if t.tensor_type == QT.Q4_0 else 20
        blocks = torch.from_numpy(np.array(t.data, copy=True).view(np.uint8).reshape(-1, block_bytes))
        return int4_from_gguf_blocks(blocks, t.tensor_type == QT.Q4_1, shape)
    return quantize_weight(dequantize(t.data, t.tensor_type, shape), mode, group_size)
