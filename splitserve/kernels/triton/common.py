"""Shared launcher checks and the autotune set-up of the Triton kernels."""

from __future__ import annotations

import os

import torch
import triton

from splitserve.kernels.quant import INT4_GROUP_SIZES

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




def check_int8_linear(x: torch.Tensor, w, bias: torch.Tensor | None) -> None:
    """x [M, K] float, an ``Int8Weight`` [N, K] with scale [N], bias [N] or None, one device."""
    check_tensor(x, "x", ndim=2, dtypes=FLOATS)
    check_tensor(w.qweight, "qweight", ndim=2, dtypes=(torch.int8,))
    check_tensor(w.scale, "scale", ndim=1, dtypes=(torch.float32,))
    (_, k), (n, kw) = x.shape, w.qweight.shape
    check(k == kw, f"x has {k} input features but the weight has {kw}")
    check(w.scale.shape[0] == n, f"scale must have {n} entries (one per output row); got {w.scale.shape[0]}")
    check_bias(bias, n)
    same_device(x=x, qweight=w.qweight, scale=w.scale, bias=bias)


def check_int4_linear(x: torch.Tensor, w, bias: torch.Tensor | None) -> None:
    """x [M, K] float, an ``Int4Weight`` [N, K/2] packed with scale and zero [N, K/G], bias [N] or None."""
    check_tensor(x, "x", ndim=2, dtypes=FLOATS)
    check_tensor(w.qweight, "qweight", ndim=2, dtypes=(torch.uint8,))
    check(w.group_size in INT4_GROUP_SIZES, f"group size must be one of {INT4_GROUP_SIZES}; got {w.group_size}")
    (_, k), (n, half_k) = x.shape, w.qweight.shape
    check(k == 2 * half_k, f"x has {k} input features but the packed weight holds {2 * half_k}")
    check(k % w.group_size == 0, f"input features ({k}) must be a multiple of the group size ({w.group_size})")
    for name, t in (("scale", w.scale), ("zero", w.zero)):
        check_tensor(t, name, ndim=2, dtypes=(torch.float32,))
        check(tuple(t.shape) == (n, k // w.group_size), f"{name} must be [{n}, {k // w.group_size}]; "
                                                         f"got {tuple(t.shape)}")
    check(w.scale.stride() == w.zero.stride(), "scale and zero must share strides")
    check_bias(bias, n)
    same_device(x=x, qweight=w.qweight, scale=w.scale, zero=w.zero, bias=bias)
