"""Quantized linear and embedding modules, and the transform that installs them.

Lifecycle: a loader hands quantized weights (``quant.py`` formats) for some
module names -> ``install_quantized`` swaps those ``nn.Linear`` /
``nn.Embedding`` modules of a built model for :class:`QuantLinear` /
:class:`QuantEmbedding`; or ``quantize_model`` quantizes a float model's
linears in place of loading. Each module fixes its backend when built
(``dispatch.backend_for`` on its weights):

    torch (CPU)   with AVX512-VNNI and the C++ extension (kernels/cpu_decode.py): its vnni_gemv,
                  activations quantized to int8 per group of 32 (any number of rows: decode steps
                  and prompts; 2.2-2.6x torch's fp32 GEMM at a 110-token prompt, 5-12x at one row)
                  otherwise int8: torch._weight_int8pack_mm        (bf16 activations)
                            int4: torch._weight_int4pack_mm_for_cpu (bf16 activations, torch's tile layout)
    triton        the canonical layout; per number of rows the GPU's measured choice (kernels/choice.py):
                  the int8 / int4 GEMMs (triton/w8_matmul.py, w4_matmul.py), the split-K GEMV
                  (triton/gemv.py, <= 16 rows), or torch (dequantized weight through cuBLAS)

torch's int8 kernel is fast only with bf16 activations (15-45x slower with
fp32, ``../shared/ANCHORS.md``), so on CPU activations enter it as bf16 and
leave in the model's dtype. The VNNI tiles are kept beside torch's packs (the
C++ decode step reads both: the tiles, and torch's packs where it falls back).

Shapes: x [M, in] -> [M, out].
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from splitserve.kernels.cases import linear_impl
from splitserve.kernels.choice import GEMV_MAX_ROWS
from splitserve.kernels.dispatch import backend_for
from splitserve.kernels.quant import Int8Weight, QuantizedWeight, quantize_int4, quantize_int8

QUANTIZATION_MODES = ("none", "int8", "int4")
log = logging.getLogger(__name__)


class QuantLinear(nn.Module):
    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None, out_dtype: torch.dtype):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.out_dtype = out_dtype
        self.bits = 8 if isinstance(weight, Int8Weight) else 4
        self.backend = backend_for(weight.qweight)
        # Plain tensor attributes, not buffers: a buffer is looked up through nn.Module.__getattr__
        # on every access (measured ~0.6 ms of a 11 ms decode step over the model's 121 linears).
        self.bias = None if bias is None else bias.detach().to(out_dtype)
        self.op = f"linear_int{self.bits}"  # its kernel-choice key, with its weight's shape:
        self.dims = (self.out_features, self.in_features, getattr(weight, "group_size", 0))
        if self.backend == "triton":
            self.weight = weight  # canonical layout, read by every GPU implementation
        elif self.bits == 8:
            self.qweight = weight.qweight  # [N, K] int8
            self.scale = weight.scale.to(torch.bfloat16)  # [N]
        else:
            self.group_size = weight.group_size
            pad = -self.out_features % 16  # torch's int4 packing wants N % 16 == 0: zero rows, sliced off
            values = F.pad(weight.values().to(torch.int32), (0, 0, 0, pad), value=8)  # [N + pad, K]
            self.qweight = torch._convert_weight_to_int4pack_for_cpu(values, 1)
            # torch's layout of the group parameters: [K/g, N + pad, 2] = (scale, zero)
            scales_zeros = F.pad(torch.stack([weight.scale, weight.zero], dim=-1), (0, 0, 0, 0, 0, pad))
            scales_zeros = scales_zeros.transpose(0, 1)
            self.scales_zeros = scales_zeros.contiguous().to(torch.bfloat16)
        self.vnni = _vnni_tiles(self) if self.backend == "torch" else None  # (tiles, scale, zero) or None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "triton":  # canonical weights: per rows, the GPU's measured choice (choice.py)
            impl = backend_for(x, self.op, x.shape[0], dims=self.dims)
            if impl == "triton-gemv" and x.shape[0] > GEMV_MAX_ROWS:
                impl = "triton"
            return linear_impl(impl, self, x).to(self.out_dtype)
        if self.vnni is not None and x.dtype in (torch.float32, torch.bfloat16):
            out = _vnni_gemv(x.contiguous(), *self.vnni, 32)  # [M, N'] in x's dtype (N' = N padded to 16)
            if out.shape[1] != self.out_features:
                out = out[:, :self.out_features]
            if out.dtype != self.out_dtype:
                out = out.to(self.out_dtype)
            return out if self.bias is None else out + self.bias
        xb = x if x.dtype == torch.bfloat16 else x.to(torch.bfloat16)  # [M, K]
        if self.bits == 8:
            out = torch._weight_int8pack_mm(xb, self.qweight, self.scale)
        else:
            out = torch._weight_int4pack_mm_for_cpu(xb, self.qweight, self.group_size, self.scales_zeros)
            if out.shape[1] != self.out_features:
                out = out[:, :self.out_features]  # drop the padding rows
        if out.dtype != self.out_dtype:  # (each skipped no-op call saves ~1 us, x 121 linears a step)
            out = out.to(self.out_dtype)  # [M, N]
        return out if self.bias is None else out + self.bias

    def tensors(self) -> list[torch.Tensor]:
        if self.backend == "triton":
            held = [self.weight.qweight, self.weight.scale] + ([self.weight.zero] if self.bits == 4 else [])
        else:
            held = [self.qweight, self.scale if self.bits == 8 else self.scales_zeros]
            held += [t for t in (self.vnni or ()) if t is not None]
        return held + ([self.bias] if self.bias is not None else [])

    def extra_repr(self) -> str:
        kernel = "+vnni" if self.vnni is not None else ""
        return f"in={self.in_features}, out={self.out_features}, int{self.bits}, backend={self.backend}{kernel}"


_vnni_gemv = None  # the extension's vnni_gemv, once a layer found it usable


def _vnni_tiles(layer: QuantLinear) -> tuple | None:
    """The layer's weights as cpu_decode's VNNI tiles; None where that kernel cannot run (no C++
    extension, no AVX512-VNNI, K not a multiple of 32, int4 groups other than 32, a torch whose int4
    packing cpu_decode cannot read): torch's kernels then serve the layer."""
    global _vnni_gemv
    if layer.in_features % 32 or (layer.bits == 4 and layer.group_size != 32):
        return None
    from splitserve.kernels import cpu_decode
    ext = cpu_decode.extension()
    if ext is None or not ext.has_vnni:
        return None
    try:
        tiles = (cpu_decode.vnni_int8(layer.qweight, layer.scale) if layer.bits == 8
                 else cpu_decode.vnni_int4(layer.qweight, layer.scales_zeros))
    except cpu_decode.Unsupported as e:
        log.info("quantized linears run torch's kernels: %s", e)
        return None
    _vnni_gemv = ext.vnni_gemv
    return tiles


class QuantEmbedding(nn.Module):
    """Token embedding rows kept as int8 (one scale per row): lookup = q[ids] * scale[ids]."""

    def __init__(self, weight: Int8Weight):
        super().__init__()
        self.qweight = weight.qweight  # [V, H] int8 (plain attributes: see QuantLinear)
        self.scale = weight.scale.float()  # [V]

    def tensors(self) -> list[torch.Tensor]:
        return [self.qweight, self.scale]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [N] -> [N, H] fp32
        return self.qweight[ids].float() * self.scale[ids, None]


def quantize_weight(w: torch.Tensor, mode: str, group_size: int = 32) -> QuantizedWeight:
    """A float weight [N, K] in the format of ``mode`` ("int8" or "int4")."""
    if mode == "int8":
        return quantize_int8(w)
    if mode == "int4":
        return quantize_int4(w, group_size)
    raise ValueError(f"quantization must be one of {QUANTIZATION_MODES}; got {mode!r}")


def _set_module(model: nn.Module, dotted: str, module: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def install_quantized(model: nn.Module, quantized: dict[str, object], state: dict[str, torch.Tensor],
                      dtype: torch.dtype, device: torch.device | None = None) -> None:
    """Swap the modules owning ``quantized`` weights (``"<module>.weight"`` names) for quantized ones,
    built on ``device`` (default: where the weights are), which fixes their kernels' layout.

    Biases of swapped linears are taken out of ``state`` (they live in the new module).
    """
    for name, w in quantized.items():
        if device is not None:
            w = w.to(device)
        module_name = name.removesuffix(".weight")
        module = model.get_submodule(module_name)
        if isinstance(module, nn.Embedding):
            if not isinstance(w, Int8Weight):
                raise ValueError(f"{name}: quantized embeddings are int8 only; got {type(w).__name__}")
            _set_module(model, module_name, QuantEmbedding(w))
        else:
            bias = state.pop(module_name + ".bias", None)
            bias = bias if bias is None or device is None else bias.to(device)
            _set_module(model, module_name, QuantLinear(w, bias, dtype))


HEAD_MODULES = ("lm_head",)  # int8 in every mode: an int4 LM head costs too much accuracy (see gguf_loader)


def quantize_model(model: nn.Module, mode: str, group_size: int = 32) -> int:
    """Quantize every float ``nn.Linear`` (the LM head and the embedding as int8) of a built model;
    returns how many modules were swapped."""
    if mode not in QUANTIZATION_MODES:
        raise ValueError(f"quantization must be one of {QUANTIZATION_MODES}; got {mode!r}")
    if mode == "none":
        return 0
    count = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear):
            bias = None if module.bias is None else module.bias.detach()
            layer_mode = "int8" if name in HEAD_MODULES else mode
            _set_module(model, name, QuantLinear(quantize_weight(module.weight.detach(), layer_mode, group_size),
                                                 bias, module.weight.dtype))
            count += 1
        elif isinstance(module, nn.Embedding):
            _set_module(model, name, QuantEmbedding(quantize_int8(module.weight.detach())))
            count += 1
    return count


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by parameters and buffers, counting shared tensors once."""
    held = list(model.parameters()) + list(model.buffers())
    for m in model.modules():
        if isinstance(m, (QuantLinear, QuantEmbedding)):
            held += m.tensors()
    seen, total = set(), 0
    for t in held:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total
