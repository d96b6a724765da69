"""Shared launcher checks and the autotune set-up of the Triton kernels."""

from __future__ import annotations

import os

import torch
import triton

FLOATS = (torch.float32, torch.float16, torch.bfloat16)


# Checks that read tensor values on the host (e.g. every context length within its block table) wait for
# the GPU and cannot run while a CUDA graph is captured: on only with SPLITSERVE_KERNEL_CHECKS=1 (or
# value_checks(True), as the tests do). Checks of shapes, dtypes and devices always run.
_value_checks = os.environ.get("SPLITSERVE_KERNEL_CHECKS", "0") == "1"


def value_checks(on: bool | None = None) -> bool:
    """Whether launchers check tensor values (set it with ``on``); returns the setting before."""
    global _value_checks
    before = _value_checks
    if on is not None:
        _value_checks = bool(on)
    return before


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def configs(gpu: list[triton.Config], interpreter: triton.Config) -> list[triton.Config]:
    """Autotune candidates: the GPU list (Ampere/Hopper tile shapes) on a device; one small
    config under the interpreter, where every launch is slow and timing means nothing."""
    return [interpreter] if interpreting() else gpu


def check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def check_tensor(t: torch.Tensor, name: str, *, ndim: int, dtypes: tuple[torch.dtype, ...],
                 unit_last_stride: bool = True) -> None:
    check(isinstance(t, torch.Tensor), f"{name} must be a tensor; got {type(t).__name__}")
    check(t.dim() == ndim, f"{name} must have {ndim} dims; got shape {tuple(t.shape)}")
    check(t.dtype in dtypes, f"{name} must be one of {[str(d) for d in dtypes]}; got {t.dtype}")
    if unit_last_stride:
        check(t.stride(-1) == 1, f"{name} must be contiguous in its last dim; got strides {t.stride()}")


def check_bias(bias: torch.Tensor | None, n: int) -> None:
    if bias is not None:
        check_tensor(bias, "bias", ndim=1, dtypes=FLOATS)
        check(bias.shape[0] == n, f"bias must have {n} entries; got {bias.shape[0]}")


def same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    check(len(set(devices.values())) <= 1, f"tensors must share one device; got {devices}")


