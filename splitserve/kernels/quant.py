"""Weight-only quantized formats, their plain-torch quantizers and references.

Two formats, both per output row (so fusing q/k/v or gate/up is a row concat
and llama's q/k un-permutation a row reindex):

    Int8Weight   qweight [N, K] int8, scale [N] fp32            w[n, k] = q[n, k] * scale[n]
    Int4Weight   qweight [N, K/2] uint8, scale/zero [N, K/g] fp32
                 w[n, k] = (q[n, k] - 8) * scale[n, k // g] + zero[n, k // g]
                 nibbles: byte i of a row holds k = 2i (low) and k = 2i + 1 (high)

The int4 formula is torch's CPU ``_weight_int4pack_mm_for_cpu`` convention, so
GGUF blocks map onto it exactly: Q4_0 (x = d (q - 8)) is scale d, zero 0; Q4_1
(x = d q + m) is scale d, zero m + 8 d. This is the canonical layout the Triton
kernels read; the CPU path repacks it once into torch's own tile layout
(``linear.py``).

``dequantize`` here is the plain-torch reference every kernel is tested
against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

INT4_GROUP_SIZES = (32, 64, 128)


@dataclass
class Int8Weight:
    qweight: torch.Tensor  # [N, K] int8
    scale: torch.Tensor  # [N] fp32

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.qweight.shape)

    def dequantize(self) -> torch.Tensor:  # [N, K] fp32
        return self.qweight.float() * self.scale[:, None]

    def index_rows(self, rows: torch.Tensor) -> "Int8Weight":
        return Int8Weight(self.qweight[rows], self.scale[rows])

    def to(self, device: torch.device) -> "Int8Weight":
        return Int8Weight(self.qweight.to(device), self.scale.to(device))


@dataclass
class Int4Weight:
    qweight: torch.Tensor  # [N, K/2] uint8, two values per byte (k even: low nibble)
    scale: torch.Tensor  # [N, K/g] fp32
    zero: torch.Tensor  # [N, K/g] fp32
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.qweight.shape[0], 2 * self.qweight.shape[1]

    def values(self) -> torch.Tensor:  # [N, K] uint8 in 0..15
        return unpack_int4(self.qweight)

    def dequantize(self) -> torch.Tensor:  # [N, K] fp32
        n, k = self.shape
        q = self.values().float().view(n, k // self.group_size, self.group_size)
        return ((q - 8) * self.scale[..., None] + self.zero[..., None]).view(n, k)

    def index_rows(self, rows: torch.Tensor) -> "Int4Weight":
        return Int4Weight(self.qweight[rows], self.scale[rows], self.zero[rows], self.group_size)

    def to(self, device: torch.device) -> "Int4Weight":
        return Int4Weight(self.qweight.to(device), self.scale.to(device), self.zero.to(device), self.group_size)


QuantizedWeight = Int8Weight | Int4Weight


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    # q: [N, K] integer values 0..15 -> [N, K/2] uint8
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    # packed: [N, K/2] uint8 -> [N, K] uint8
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).view(packed.shape[0], -1)


def quantize_int8(w: torch.Tensor) -> Int8Weight:
    """Symmetric per-output-row int8: scale ~ max|row| / 127.

    The scale is rounded up to a bf16 value *before* the weights are rounded: torch's CPU
    kernel takes bf16 scales, and a scale rounded afterwards would scale a whole output
    channel by up to 0.4% (a coherent gain error, worse than the rounding noise)."""
    w = w.float()  # [N, K]
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    scale_bf16 = scale.to(torch.bfloat16).float()
    up = torch.nextafter(scale.to(torch.bfloat16), torch.tensor(float("inf"), dtype=torch.bfloat16,
                                                                   device=w.device)).float()
    scale = torch.where(scale_bf16 >= scale, scale_bf16, up)  # the next bf16 at or above: no clipping
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return Int8Weight(q, scale)


def quantize_int4(w: torch.Tensor, group_size: int = 32) -> Int4Weight:
    """Asymmetric group-wise int4 (min/max per group of ``group_size`` inputs)."""
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"int4 group size must be one of {INT4_GROUP_SIZES}; got {group_size}")
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"int4 needs the input dim ({k}) to be a multiple of the group size ({group_size})")
    g = w.float().view(n, k // group_size, group_size)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)  # [N, K/g]
    scale = ((hi - lo) / 15.0).clamp(min=1e-12)
    q = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15).view(n, k)
    return Int4Weight(pack_int4(q), scale, lo + 8 * scale, group_size)


def int4_from_gguf_blocks(blocks: torch.Tensor, q4_1: bool, shape: tuple[int, int]) -> Int4Weight:
    """GGUF Q4_0 / Q4_1 blocks (``[nb, 18 | 20]`` uint8, see ``weights/dequant.py``) -> Int4Weight, no float detour."""
    n, k = shape
    d = blocks[:, 0:2].contiguous().view(torch.float16).float().view(n, k // 32)
    qs = blocks[:, 4:] if q4_1 else blocks[:, 2:]  # [nb, 16]: value j low nibble, value j + 16 high nibble
    values = torch.cat([qs & 0x0F, qs >> 4], dim=1).view(n, k)  # [N, K] uint8, GGUF value order
    if q4_1:
        zero = blocks[:, 2:4].contiguous().view(torch.float16).float().view(n, k // 32) + 8 * d
    else:
        zero = torch.zeros_like(d)
    return Int4Weight(pack_int4(values), d, zero, 32)


def cat_rows(weights: list) -> object:
    """Concatenate along output rows: float tensors, Int8Weights or Int4Weights (all the same kind)."""
    first = weights[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(weights)
    if not all(type(w) is type(first) for w in weights):
        raise ValueError("cannot fuse weights of different quantization formats")
    if isinstance(first, Int8Weight):
        return Int8Weight(torch.cat([w.qweight for w in weights]), torch.cat([w.scale for w in weights]))
    if any(w.group_size != first.group_size for w in weights):
        raise ValueError("cannot fuse int4 weights of different group sizes")
    return Int4Weight(torch.cat([w.qweight for w in weights]), torch.cat([w.scale for w in weights]),
                      torch.cat([w.zero for w in weights]), first.group_size)


def reference_linear(x: torch.Tensor, w: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    # x: [M, K] -> [M, N] fp32: the dequantized weight in a plain fp32 matmul
    out = x.float() @ w.dequantize().T
    return out if bias is None else out + bias.float()
