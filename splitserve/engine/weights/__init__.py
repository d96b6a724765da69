"""Weight loading: GGUF files and Hugging Face directories, into HF-named tensors.

``load_model(path)`` returns a :class:`LoadedModel` (config, state dict,
tokenizer source). Both loaders hand back the same HF tensor names, so the
model has one loading path (``LlamaForCausalLM.from_state_dict``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from splitserve.engine.config import ModelConfig
from splitserve.errors import ModelNotFoundError


@dataclass
class LoadedModel:
    config: ModelConfig
    state: dict[str, torch.Tensor]
    tokenizer_source: object  # GGUF reader or HF directory path
    metadata: dict = field(default_factory=dict)


def load_model(path: str, progress=None, quantization: str = "none", group_size: int = 32) -> LoadedModel:
    """Config, tensors and tokenizer source. GGUF files honour ``quantization`` while
    loading (see ``gguf_loader``); HF directories load float and are quantized after build."""
    if not os.path.exists(path):
        raise ModelNotFoundError(f"model path {path!r} does not exist; pass a .gguf file or a Hugging Face "
                                 f"directory (config.json + *.safetensors)")
    if os.path.isdir(path):
        from splitserve.engine.weights.hf_loader import load_hf_dir
        return load_hf_dir(path, progress)
    from splitserve.engine.weights.gguf_loader import load_gguf
    return load_gguf(path, progress, quantization, group_size)
