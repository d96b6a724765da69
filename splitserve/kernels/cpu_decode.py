"""The CPU decode step in C++ (``csrc/cpu_decode.cpp``): its build, and the transform that hands it a model.

Lifecycle:

    build_extension()          compiles the C++ once per machine (``scripts/install.sh`` runs it; ~40 s),
                               into ``<venv>/share/splitserve/ext`` (``SPLITSERVE_EXT_DIR`` overrides)
    FusedDecoder.wrap(model)   after the model is built and quantized: hands its weights to a C++
                               ``DecodeModel`` (the same tensors, plus the VNNI tiles of each quantized
                               weight); None when the model is not on the CPU torch path, a module has no
                               C++ counterpart, or the extension is absent
    decoder(step, kv_cache)    the runner calls it for steps that are all single-token decodes; any
                               other step (prefill chunks, speculative verification) runs the Python model

Why: a batch-1 decode step is ~1,300 small torch ops, whose dispatch from
Python cost more than reading the weights (benchmarks/results/kernels.md).
The C++ loop runs the same layers with no Python in it and fuses the small
ops (norm + residual, rotary + KV store, paged attention read in place,
SiLU-and-mul). Quantized linears run our ``vnni_gemv`` where the CPU has
AVX512-VNNI: activations quantized to int8 per 32 (as llama.cpp does), u8 x s8
dot products, weights in 16-row tiles (each ``QuantLinear`` packs its own
when built, ``linear.py``, and prompts run through them too). It reads the
weights 2.5-5x faster than torch's int4 / int8 kernels at 1-64 rows; the
tiles are a second copy of the quantized weights beside torch's packs (the
fallback where the CPU has no VNNI). Dense linears stay torch's (bf16/fp32 GEMM, fp16
GEMV). Results: the dense path matches the Python model to bf16 rounding;
the quantized one within the activation rounding, and keeps the accuracy
gate (``tests/test_cpu_decode.py``, ``tests/test_quantization_accuracy.py``).

The build uses ``-march=native``, into a folder named by the CPU's feature
flags: a machine with another CPU (an image built elsewhere) builds its own
at first use; ``SPLITSERVE_EXT_ARCH`` sets another ``-march``. A machine with
no compiler runs the Python path, with a warning.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

from splitserve.kernels.dispatch import backend_for

log = logging.getLogger(__name__)

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "cpu_decode.cpp")

_extension = None
_failed: str | None = None


def build_dir() -> str:
    base = os.environ.get("SPLITSERVE_EXT_DIR") or os.path.join(sys.prefix, "share", "splitserve", "ext")
    return os.path.join(base, _cpu_tag())


def _cpu_tag() -> str:
    """The -march and the CPU's feature flags, hashed: a library built for one CPU never loads on another."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    arch = os.environ.get("SPLITSERVE_EXT_ARCH", "native")
    return f"{arch}-{hashlib.sha256(flags.encode()).hexdigest()[:12]}"


def build_extension(verbose: bool = False):
    """Compile (or, when up to date, just load) the extension; raises if it cannot be built."""
    from torch.utils.cpp_extension import load

    arch = os.environ.get("SPLITSERVE_EXT_ARCH", "native")
    os.makedirs(build_dir(), exist_ok=True)
    with exclusive_build(build_dir()), pinned_ninja():
        return load(name="splitserve_cpu_decode", sources=[SOURCE], build_directory=build_dir(), verbose=verbose,
                    extra_cflags=["-O3", f"-march={arch}", "-fopenmp"], extra_ldflags=["-fopenmp"])


@contextlib.contextmanager
def pinned_ninja():
    """The pinned ``ninja`` package's binary first on PATH while torch builds (torch runs whichever
    ``ninja`` PATH finds). Ray's workers have the venv's bin on PATH, a plain ``.venv/bin/python`` does
    not, and a machine may have its own older ninja: two ninja versions do not accept each other's build
    log, so each process rebuilt the extension after the other had (30 s on this machine, minutes under
    load, with every other engine start waiting on the build lock), over and over in one test run."""
    try:
        import ninja
        bin_dir = ninja.BIN_DIR
    except (ImportError, AttributeError):
        yield
        return
    path = os.environ.get("PATH", "")
    os.environ["PATH"] = bin_dir + os.pathsep + path
    try:
        yield
    finally:
        os.environ["PATH"] = path


@contextlib.contextmanager
def exclusive_build(directory: str):
    """One process at a time in torch's build of ``directory``, by an flock (the OS releases it when its
    holder dies). Torch's own lock is a file it never removes when the process holding it is killed (even
    a start that only checks the build is up to date takes it), and it waits on that file forever; under
    the flock, such a file can only be stale, and is removed."""
    with open(os.path.join(directory, "build.flock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            stale = os.path.join(directory, "lock")
            if os.path.exists(stale):
                log.warning("removing the build lock %s left by a process that did not finish", stale)
                with contextlib.suppress(FileNotFoundError):
                    os.remove(stale)
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def extension():
    """The loaded extension, or None (with one warning) when it cannot be built here."""
    global _extension, _failed
    if _extension is None and _failed is None:
        if not os.path.exists(os.path.join(build_dir(), "splitserve_cpu_decode.so")):
            log.warning("compiling the C++ decode step for this CPU into %s (once, ~40 s)", build_dir())
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
        except Unsupported as e:
            log.info("decoding runs the Python model: %s", e)
            return None
        return cls(native, model)

    def __call__(self, step, kv_cache: torch.Tensor) -> torch.Tensor:
        """``step``: a runner ``PreparedStep`` of decodes only -> logits [B, vocab] fp32, in input order."""
        meta = step.meta
        return self.native.forward(step.input_ids, meta.positions, meta.slot_blocks, meta.slot_offsets,
                                   meta.decode_block_tables, meta.decode_context_lens, kv_cache,
                                   self.rope.cos, self.rope.signed_sin)


class Unsupported(Exception):
    """This model (or this torch's weight layout) has no C++ counterpart: the Python path serves it."""


def _build_native(ext, model: nn.Module):
    from splitserve.kernels.cpu_linear import GemvDispatchLinear
    from splitserve.kernels.linear import QuantEmbedding, QuantLinear

    cfg = model.cfg
    native = ext.DecodeModel(cfg.num_heads, cfg.num_kv_heads, cfg.rms_norm_eps, model.dtype == torch.bfloat16)
    if model.dtype not in (torch.float32, torch.bfloat16):
        raise Unsupported(f"model dtype {model.dtype}")

    def linear(m: nn.Module):
        make = ext.DecodeModel.make_linear
        if isinstance(m, QuantLinear):
            if m.backend != "torch":
                raise Unsupported(f"a {m.backend} quantized linear")
            tiles = m.vnni or (None, None, None)  # the layer's own VNNI tiles (linear.py), when it has them
            if m.bits == 8:
                return make(1, m.qweight, m.scale, m.bias, None, m.out_features, 32, 0.0, *tiles)
            return make(2, m.qweight, m.scales_zeros, m.bias, None, m.out_features, m.group_size, 0.0, *tiles)
        if isinstance(m, GemvDispatchLinear):
            limit = (32768.0 - m.max_bias) / max(m.max_row_l1, 1e-30)  # cpu_linear.fp16_safe, solved for max|x|
            return make(0, m.weight.detach(), None, _detached(m.bias), m.weight_f16, m.out_features, 0, limit,
                        None, None, None)
        if type(m) is nn.Linear:
            return make(0, m.weight.detach(), None, _detached(m.bias), None, m.out_features, 0, 0.0,
                        None, None, None)
        raise Unsupported(f"no C++ counterpart for {type(m).__name__}")

    embed = model.embed_tokens
    if isinstance(embed, QuantEmbedding):
        native.set_embedding(embed.qweight, embed.scale)
    elif type(embed) is nn.Embedding:
        native.set_embedding(embed.weight.detach(), None)
    else:
        raise Unsupported(f"no C++ counterpart for {type(embed).__name__}")
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        native.add_layer(layer.input_layernorm.weight.detach(), layer.post_attention_layernorm.weight.detach(),
                         linear(attn.qkv_proj), linear(attn.o_proj), linear(mlp.gate_up_proj), linear(mlp.down_proj))
    native.set_head(model.norm.weight.detach(), linear(model.lm_head))
    return native


# -- the VNNI GEMV's weight tiles (layouts: csrc/cpu_decode.cpp, "VNNI GEMV") ---------------------

def vnni_int8(qweight: torch.Tensor, scale: torch.Tensor) -> tuple:
    """int8 [N, K], row scale [N] -> (tiles [N'/16, K/4, 16, 4] u8 = q + 128, scale [N'] fp32, None)."""
    pad = -qweight.shape[0] % 16
    q = F.pad(qweight.to(torch.int16) + 128, (0, 0, 0, pad), value=128).to(torch.uint8)  # [N', K]
    n, k = q.shape
    tiles = q.view(n // 16, 16, k // 4, 4).permute(0, 2, 1, 3).contiguous()
    return tiles, F.pad(scale.float(), (0, pad)), None


def torch_int4_values(qweight: torch.Tensor, k: int) -> torch.Tensor:
    """Undo ``torch._convert_weight_to_int4pack_for_cpu``: packed [N', K/2] -> values [N', K] u8 in 0..15.

    Its layout (torch 2.13): rows in blocks of 64, each [K, 32] bytes whose byte j holds rows j (low
    nibble) and j + 32 (high); the last N' % 64 rows one block [K, (N' % 64) / 2] whose byte j holds rows
    2j and 2j + 1. The caller checks the round trip."""
    n = qweight.shape[0]
    full = n // 64 * 64
    flat = qweight.reshape(-1)
    blocks = flat[:full * k // 2].view(full // 64, k, 32)
    head = torch.cat([blocks & 15, blocks >> 4], dim=2).permute(0, 2, 1).reshape(full, k)  # [full, K]
    tail = flat[full * k // 2:].view(k, (n - full) // 2)
    rest = torch.stack([tail & 15, tail >> 4], dim=2).reshape(k, n - full).T  # [N' - full, K]
    return torch.cat([head, rest])


def vnni_int4(qweight: torch.Tensor, scales_zeros: torch.Tensor) -> tuple:
    """torch's int4 pack and its [K/32, N', 2] (scale, zero) -> (tiles [N'/16, K/8, 16, 4] u8,
    scale [N'/16, K/32, 16] bf16, zero [N'/16, K/32, 16] bf16)."""
    groups, n, _ = scales_zeros.shape
    k = groups * 32
    values = torch_int4_values(qweight, k)  # [N', K]
    if not torch.equal(torch._convert_weight_to_int4pack_for_cpu(values.to(torch.int32), 1), qweight):
        raise Unsupported("torch's int4 packing is not the layout torch_int4_values knows")
    v = values.view(n // 16, 16, k // 8, 8)
    tiles = (v[..., :4] | (v[..., 4:] << 4)).permute(0, 2, 1, 3).contiguous()  # [N'/16, K/8, 16, 4]
    per_tile = scales_zeros.view(groups, n // 16, 16, 2).permute(1, 0, 2, 3)  # [N'/16, K/32, 16, 2]
    return tiles, per_tile[..., 0].contiguous(), per_tile[..., 1].contiguous()


def _detached(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()


if __name__ == "__main__":  # scripts/install.sh: build once at install time, with the compiler's output shown
    print(f"building the C++ decode step into {build_dir()} ...", file=sys.stderr)
    build_extension(verbose="-v" in sys.argv)
    print("built", file=sys.stderr)
