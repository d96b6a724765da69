"""Load a Hugging Face model directory: config.json + *.safetensors (one file or sharded)."""

from __future__ import annotations

import glob
import json
import os

import torch

from splitserve.engine.config import ModelConfig
from splitserve.errors import CorruptModelError, ModelNotFoundError
from splitserve.engine.weights import LoadedModel


def load_hf_dir(path: str, progress=None) -> LoadedModel:
    from safetensors.torch import load_file

    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise ModelNotFoundError(f"{path!r} is a directory without config.json; a Hugging Face model "
                                 f"directory needs config.json and *.safetensors")
    try:
        with open(cfg_path) as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise CorruptModelError(f"{cfg_path!r} is not valid JSON: {e}") from None
    cfg = ModelConfig.from_hf(raw, name=os.path.basename(os.path.normpath(path)))
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ModelNotFoundError(f"{path!r} holds no *.safetensors weights (only safetensors are loaded)")
    state: dict[str, torch.Tensor] = {}
    for f in progress(files, "loading safetensors") if progress else files:
        try:
            state.update(load_file(f))
        except Exception as e:
            raise CorruptModelError(f"{f!r} is not a readable safetensors file: {e}") from None
    state = {k: v.float() for k, v in state.items()}
    return LoadedModel(cfg, state, path, {"format": "hf", "path": path, "raw_config": raw})
