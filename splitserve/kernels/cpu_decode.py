"""The CPU decode step in C++ (``csrc/cpu_decode.cpp``): its build, and the transform that hands it a model.

Lifecycle:

    build_extension()          compiles the C++ once per machine (``scripts/install.sh`` runs it; ~40 s),
                               into ``<venv>/share/splitserve/ext`` (``SPLITSERVE_EXT_DIR`` overrides)
    FusedDecoder.wrap(model)   after the model is built and quantized: reads its weights into a C++
                               ``DecodeModel`` (no copy: the same tensors); None when the model is not on
                               the CPU torch path, a module has no C++ counterpart, or the extension is absent
    decoder(step, kv_cache)    the runner calls it for steps that are all single-token decodes; any
                               other step (prefill chunks, speculative verification) runs the Python model

Why: a batch-1 decode step is ~1,300 small torch ops, whose dispatch from
Python cost more than reading the weights (benchmarks/results/kernels.md).
The C++ loop runs the same layers with no Python in it and fuses the small
ops (norm + residual, rotary + KV store, paged attention read in place,
SiLU-and-mul); the matmuls stay torch's, except the int8 matrix-vector
product of the LM head (``w8_gemv``). Its results match the Python model's
to bf16 rounding (``tests/test_cpu_decode.py``).

The build uses ``-march=native``: the library is for the machine that builds
it (an image built elsewhere rebuilds it at first use when its CPU differs;
``SPLITSERVE_EXT_ARCH`` sets another ``-march``). A machine with no compiler
runs the Python path, with a warning.
"""

from __future__ import annotations

import logging
import os
import sys

import torch
from torch import nn

from splitserve.kernels.dispatch import backend_for

log = logging.getLogger(__name__)

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "cpu_decode.cpp")
W8_GEMV_ROWS = 4  # our int8 GEMV up to this many rows, torch's int8 kernel beyond (bench_kernels.py)

_extension = None
_failed: str | None = None


def build_dir() -> str:
    return os.environ.get("SPLITSERVE_EXT_DIR") or os.path.join(sys.prefix, "share", "splitserve", "ext")


def build_extension(verbose: bool = False):
    """Compile (or, when up to date, just load) the extension; raises if it cannot be built."""
    from torch.utils.cpp_extension import load

    arch = os.environ.get("SPLITSERVE_EXT_ARCH", "native")
    os.makedirs(build_dir(), exist_ok=True)
    return load(name="splitserve_cpu_decode", sources=[SOURCE], build_directory=build_dir(), verbose=verbose,
                extra_cflags=["-O3", f"-march={arch}", "-fopenmp"], extra_ldflags=["-fopenmp"])


def extension():
    """The loaded extension, or None (with one warning) when it cannot be built here."""
    global _extension, _failed
    if _extension is None and _failed is None:
        try:
            _extension = build_extension()
        except Exception as e:  # no compiler, no ninja, ...: the Python path still serves
            _failed = f"{type(e).__name__}: {e}"
            log.warning("the C++ decode step is unavailable (%s); decoding runs the Python model", _failed)
    return _extension


class FusedDecoder:
    """The whole decode forward of one built model, in C++; see the module docstring."""

    def __init__(self, native, model: nn.Module):
        self.native = native
        self.rope = model.rope

    @classmethod
    def wrap(cls, model: nn.Module) -> "FusedDecoder | None":
        if backend_for(model.norm.weight) != "torch":
            return None
        ext = extension()
        if ext is None:
            return None
        try:
            native = _build_native(ext, model)
        except _Unsupported as e:
            log.info("decoding runs the Python model: %s", e)
            return None
        return cls(native, model)

    def __call__(self, step, kv_cache: torch.Tensor) -> torch.Tensor:
        """``step``: a runner ``PreparedStep`` of decodes only -> logits [B, vocab] fp32, in input order."""
        meta = step.meta
        return self.native.forward(step.input_ids, meta.positions, meta.slot_blocks, meta.slot_offsets,
                                   meta.decode_block_tables, meta.decode_context_lens, kv_cache,
                                   self.rope.cos, self.rope.signed_sin)


class _Unsupported(Exception):
    pass


def _build_native(ext, model: nn.Module):
    from splitserve.kernels.cpu_linear import GemvDispatchLinear
    from splitserve.kernels.linear import QuantEmbedding, QuantLinear

    cfg = model.cfg
    native = ext.DecodeModel(cfg.num_heads, cfg.num_kv_heads, cfg.rms_norm_eps, model.dtype == torch.bfloat16)
    if model.dtype not in (torch.float32, torch.bfloat16):
        raise _Unsupported(f"model dtype {model.dtype}")

    def linear(m: nn.Module):
        make = ext.DecodeModel.make_linear
        if isinstance(m, QuantLinear):
            if m.backend != "torch":
                raise _Unsupported(f"a {m.backend} quantized linear")
            if m.bits == 8:
                return make(1, m.qweight, m.scale, m.bias, None, m.out_features, 0, 0.0, W8_GEMV_ROWS)
            return make(2, m.qweight, m.scales_zeros, m.bias, None, m.out_features, m.group_size, 0.0, 0)
        if isinstance(m, GemvDispatchLinear):
            limit = (32768.0 - m.max_bias) / max(m.max_row_l1, 1e-30)  # cpu_linear.fp16_safe, solved for max|x|
            return make(0, m.weight.detach(), None, _detached(m.bias), m.weight_f16, m.out_features, 0, limit, 0)
        if type(m) is nn.Linear:
            return make(0, m.weight.detach(), None, _detached(m.bias), None, m.out_features, 0, 0.0, 0)
        raise _Unsupported(f"no C++ counterpart for {type(m).__name__}")

    embed = model.embed_tokens
    if isinstance(embed, QuantEmbedding):
        native.set_embedding(embed.qweight, embed.scale)
    elif type(embed) is nn.Embedding:
        native.set_embedding(embed.weight.detach(), None)
    else:
        raise _Unsupported(f"no C++ counterpart for {type(embed).__name__}")
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        native.add_layer(layer.input_layernorm.weight.detach(), layer.post_attention_layernorm.weight.detach(),
                         linear(attn.qkv_proj), linear(attn.o_proj), linear(mlp.gate_up_proj), linear(mlp.down_proj))
    native.set_head(model.norm.weight.detach(), linear(model.lm_head))
    return native


def _detached(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()


if __name__ == "__main__":  # scripts/install.sh: build once at install time, with the compiler's output shown
    print(f"building the C++ decode step into {build_dir()} ...", file=sys.stderr)
    build_extension(verbose="-v" in sys.argv)
    print("built", file=sys.stderr)
