"""Rotary position embeddings, with the scaling variants configs declare.

``inv_freq`` has ``head_dim / 2`` entries; position ``p`` rotates the pair
``(x[i], x[i + head_dim/2])`` by angle ``p * inv_freq[i]`` (the "rotate half"
convention of Hugging Face checkpoints; GGUF q/k weights are un-permuted to it
at load).

Supported ``rope_type``: ``default``, ``linear`` (positions divided by
``factor``), ``dynamic`` (NTK; identical to default for sequences within
``max_position_embeddings``, which is the longest context we admit),
``llama3`` (Llama 3.1 band-wise scaling) and ``yarn`` (with its attention factor).
"""

from __future__ import annotations

import math

import torch

from splitserve.engine.config import ModelConfig
from splitserve.errors import UnsupportedModelError

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "factors")


def rope_parameters(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Returns (inv_freq [head_dim/2] fp32, attention_factor applied to cos/sin)."""
    dim, base = cfg.head_dim, cfg.rope_theta
    rs = cfg.rope_scaling
    rope_type = rs.get("rope_type", "default")
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if rope_type in ("default", "dynamic"):
        return inv_freq, 1.0
    if rope_type == "linear":
        return inv_freq / rs["factor"], 1.0
    if rope_type == "llama3":
        return _llama3(inv_freq, rs), 1.0
    if rope_type == "factors":  # per-frequency divisors (GGUF's rope_freqs tensor, e.g. Llama 3.1)
        return inv_freq / torch.tensor(rs["factors"], dtype=torch.float32), 1.0
    if rope_type == "yarn":
        return _yarn(dim, base, rs, cfg.max_position_embeddings)
    raise UnsupportedModelError(f"rope_type {rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}")


def _llama3(inv_freq: torch.Tensor, rs: dict) -> torch.Tensor:
    factor, low, high = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old_len = rs["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn(dim: int, base: float, rs: dict, max_pos: int) -> tuple[torch.Tensor, float]:
    original = rs.get("original_max_position_embeddings") or max_pos
    factor = rs.get("factor") or max_pos / original

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = rs.get("attention_factor")
    if attention_factor is None:
        if rs.get("mscale") and rs.get("mscale_all_dim"):
            attention_factor = mscale(factor, rs["mscale"]) / mscale(factor, rs["mscale_all_dim"])
        else:
            attention_factor = mscale(factor)
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        return dim * math.log(original / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp  # share of each frequency kept un-interpolated
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


class RotaryEmbedding:
    """Precomputed cos/sin tables for every position up to ``max_positions``.

    rotate_half(x) * sin is computed as flip(x) * signed_sin: viewing the head
    dim as [2, D/2] and flipping the halves gives [x2, x1]; the table holds
    [-sin, +sin], so one flip and two fused multiplies do the whole rotation
    (``kernels.ops.rotary``).
    """

    def __init__(self, cfg: ModelConfig, max_positions: int, dtype: torch.dtype, device: torch.device | None = None):
        inv_freq, attention_factor = rope_parameters(cfg)  # computed on the host, the tables then moved
        pos = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(pos, inv_freq)  # [P, D/2]
        cos, sin = freqs.cos() * attention_factor, freqs.sin() * attention_factor
        self.cos = torch.cat([cos, cos], dim=-1).to(device, dtype)  # [P, D]
        self.signed_sin = torch.cat([-sin, sin], dim=-1).to(device, dtype)  # [P, D]

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin for a step's positions: [N, 1, D] each (shared by every layer)."""
        return self.cos[positions].unsqueeze(1), self.signed_sin[positions].unsqueeze(1)

