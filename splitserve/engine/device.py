"""Where an engine runs: ``device`` and what ``dtype: auto`` means there.

    resolve_device("cpu" | "cuda" | "cuda:N" | "auto") -> torch.device   (auto: the first GPU if there is one)
    auto_dtype(device) -> "bfloat16" | "float32"

One engine, one device: the model (built and quantized there), the KV cache,
each step's tensors and the rope tables live on it. What stays on the host
(``HOST``): the prepared step's Python lists before they travel, the sampling
draws (per-request CPU generators: a seeded request draws the same tokens on
any engine, GPU or CPU), and the KV a transfer sends or receives (a device
block is staged through host memory: ``to_host`` / ``moves.write_kv``).
CPU-only transforms (the fp16 GEMV dispatch, torch's CPU int4 packing, the C++
decode step) apply only on CPU.
"""

from __future__ import annotations

import torch

from splitserve.errors import InvalidRequestError

HOST = torch.device("cpu")
DEVICES = ("auto", "cpu", "cuda", "cuda:N")


def resolve_device(name: str | torch.device) -> torch.device:
    """The torch device ``name`` means here; a clear error for a name that is not one of ``DEVICES`` or
    a GPU this machine does not have."""
    if isinstance(name, torch.device):
        name = str(name)
    if not isinstance(name, str):
        raise InvalidRequestError("device", f"device must be one of {', '.join(DEVICES)}; got {name!r}")
    if name == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else HOST
    if name == "cpu":
        return HOST
    kind, _, index = name.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise InvalidRequestError("device", f"device must be one of {', '.join(DEVICES)}; got {name!r}")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    i = int(index or 0)
    if i >= count:
        have = f"{count} CUDA device(s)" if count else "no CUDA device (allowed here: cpu, auto)"
        raise InvalidRequestError("device", f"device {name!r} is not on this machine: it has {have}")
    return torch.device("cuda", i)


def auto_dtype(device: torch.device, cpu_has_fast_bf16: bool, gpu_has_bf16: bool = True) -> str:
    """``dtype: auto`` on ``device``: bfloat16 on a GPU that has it (Ampere and later; float32 on older
    ones); on CPU bfloat16 only where its GEMMs beat float32 (``cpu_has_fast_bf16``: AMX tiles)."""
    if device.type == "cuda":
        return "bfloat16" if gpu_has_bf16 else "float32"
    return "bfloat16" if cpu_has_fast_bf16 else "float32"


def to_host(t: torch.Tensor) -> torch.Tensor:
    """``t`` in host memory (itself when it is there): what a KV transfer serializes. From a GPU into
    pinned memory (torch's caching host allocator reuses it), which the copy engine writes directly."""
    if t.device.type == "cpu":
        return t
    out = torch.empty(t.shape, dtype=t.dtype, device=HOST, pin_memory=True)
    out.copy_(t)  # device -> pinned host; waits for it
    return out
