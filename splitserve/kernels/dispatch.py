"""Which kernel implementation runs: on CUDA tensors the one measured fastest at that shape, torch on CPU.

``backend_for(tensor, op, rows, context, dims)`` is the one decision point: a forced
backend if any; torch for CPU tensors; for CUDA tensors ``choice.choose`` (the
GPU's measured table, ``choice.py``: "torch", "triton" or, for quantized
linears, "triton-gemv"); with no op named, "triton" (where a module fixes its
weights' layout: the canonical one, which every GPU implementation reads).
``SPLITSERVE_KERNELS=triton``
(or ``force_backend("triton")`` in tests) sends CPU tensors to the Triton
kernels too; without a GPU that needs ``TRITON_INTERPRET=1`` set before Triton
is imported, which ``triton_module`` does when it imports a kernel file with no
CUDA device present. That is how the test suite runs every Triton kernel, and
a whole model through them, on CPU.
"""

from __future__ import annotations

import contextlib
import importlib
import os

import torch

from splitserve.kernels.choice import choose

BACKENDS = ("torch", "triton")


def _env_backend() -> str | None:
    value = os.environ.get("SPLITSERVE_KERNELS") or None
    if value is not None and value not in BACKENDS:
        raise ValueError(f"SPLITSERVE_KERNELS must be one of {BACKENDS}; got {value!r}")
    return value


# Read once: backend_for runs for every op of every layer (an environ lookup each time cost ~0.2 ms a step).
_forced: str | None = _env_backend()


def backend_for(t: torch.Tensor, op: str | None = None, rows: int = 0, context: int = 0,
                dims: tuple[int, ...] | None = None) -> str:
    if _forced:
        return _forced
    if not t.is_cuda:
        return "torch"
    return "triton" if op is None else choose(op, rows, context, key_dims(t, dims))


def key_dims(t: torch.Tensor, dims: tuple[int, ...] | None) -> tuple[int, ...]:
    """The op's fixed dimensions in its table key: ``dims``, or (None) ``t``'s after the rows."""
    return tuple(t.shape[1:]) if dims is None else dims


@contextlib.contextmanager
def force_backend(name: str | None):
    """Run the block with every kernel op on ``name`` (``None``: by device again)."""
    global _forced
    if name is not None and name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {name!r}")
    saved, _forced = _forced, name
    try:
        yield
    finally:
        _forced = saved


def prepare_interpreter() -> None:
    """With no CUDA device, ask for Triton's interpreter. Must run before ``triton`` is first
    imported: Triton decides interpreted-or-compiled per function when it is decorated."""
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


def triton_module(name: str):
    """Import ``splitserve.kernels.triton.<name>``; with no CUDA, under Triton's interpreter."""
    prepare_interpreter()
    module = importlib.import_module(f"splitserve.kernels.triton.{name}")
    if not torch.cuda.is_available():
        import triton.language as tl
        from triton.runtime.interpreter import InterpretedFunction
        if not isinstance(tl.sum, InterpretedFunction):
            raise RuntimeError("Triton kernels on CPU need TRITON_INTERPRET=1 set before triton is first "
                               "imported (something imported triton earlier); set it in the environment")
    return module
