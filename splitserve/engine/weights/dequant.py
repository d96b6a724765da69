"""Dequantization of GGUF tensor blocks to float32.

Q8_0, Q4_0 and Q4_1 (the formats our default model and most CPU GGUFs use)
are dequantized here with vectorised torch; every other type goes through the
``gguf`` package's numpy implementation. Block layouts (bytes, little endian)::

    Q8_0 (34 B / 32 values):  | d: f16 | q[32]: int8 |                 x = d * q
    Q4_0 (18 B / 32 values):  | d: f16 | nibbles[16] |                 x = d * (q - 8)
    Q4_1 (20 B / 32 values):  | d: f16 | m: f16 | nibbles[16] |        x = d * q + m

where value ``j < 16`` of a block is the low nibble of byte ``j`` and value
``j + 16`` its high nibble.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT
from gguf import quants

from splitserve.errors import UnsupportedModelError

SUPPORTED_TYPES = (QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1,
                   QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.Q8_K)


def dequantize(data: np.ndarray, qtype: QT, shape: tuple[int, ...]) -> torch.Tensor:
    """Raw GGUF tensor data -> float32 tensor of ``shape`` (rows, cols) in torch order."""
    with warnings.catch_warnings():
        # The file is memory-mapped read-only; every branch below returns a new tensor.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return _dequantize(data, qtype, shape)


def _dequantize(data: np.ndarray, qtype: QT, shape: tuple[int, ...]) -> torch.Tensor:
    if qtype == QT.F32:
        return torch.from_numpy(np.ascontiguousarray(data).view(np.float32)).reshape(shape)
    if qtype == QT.F16:
        return torch.from_numpy(np.ascontiguousarray(data).view(np.float16)).reshape(shape).float()
    if qtype == QT.BF16:
        raw = torch.from_numpy(np.ascontiguousarray(data).view(np.int16))
        return raw.view(torch.bfloat16).reshape(shape).float()
    if qtype in _TORCH_BLOCKS:
        block_bytes = _TORCH_BLOCKS[qtype][0]
        blocks = torch.from_numpy(np.ascontiguousarray(data).view(np.uint8).reshape(-1, block_bytes))
        return _TORCH_BLOCKS[qtype][1](blocks).reshape(shape)
    if qtype in SUPPORTED_TYPES:
        return torch.from_numpy(quants.dequantize(data, qtype)).reshape(shape).float()
    raise UnsupportedModelError(
        f"tensor type {qtype.name} is not supported; supported: {', '.join(t.name for t in SUPPORTED_TYPES)}")


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    # blocks: [nb, bytes] uint8 -> [nb, 1] float32 from the f16 at byte ``start``
    return blocks[:, start:start + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    # qs: [nb, 16] uint8 -> [nb, 32] float32 (low nibbles then high nibbles)
    return torch.cat([qs & 0x0F, qs >> 4], dim=1).float()


def _q8_0(blocks: torch.Tensor) -> torch.Tensor:
    return _f16(blocks, 0) * blocks[:, 2:].contiguous().view(torch.int8).float()


def _q4_0(blocks: torch.Tensor) -> torch.Tensor:
    return _f16(blocks, 0) * (_nibbles(blocks[:, 2:]) - 8)


def _q4_1(blocks: torch.Tensor) -> torch.Tensor:
    return _f16(blocks, 0) * _nibbles(blocks[:, 4:]) + _f16(blocks, 2)


_TORCH_BLOCKS = {QT.Q8_0: (34, _q8_0), QT.Q4_0: (18, _q4_0), QT.Q4_1: (20, _q4_1)}
