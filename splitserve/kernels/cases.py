"""The cases ``choice.measure`` times for one model on its device, and ``prepare``, which installs the table.

Each kernel op at the model's own shapes, once per row bucket (and, for decode
attention, per batch and context bucket), with random inputs on the device:

    add_rms_norm, silu_and_mul, rotary     torch | triton
    paged_decode_attention                 torch (gather + SDPA) | triton (split context)
    linear_int8 / linear_int4 (per N x K)  torch (dequantize + cuBLAS) | triton (GEMM) | triton-gemv (rows <= 16)

each with the dimensions the op passes to ``choice.choose`` (the keys the
forward asks for are the keys measured: ``test_kernel_choice.py`` runs a
forward and compares). ``prepare(model, device)`` reads the table for this GPU
type, versions and model shape if one was saved, else measures (about a minute
on a GPU, with progress) and saves it, then installs it for the process
(``merge=True``: adds it to the installed one: a draft model's).
"""

from __future__ import annotations

import datetime
import logging

import torch
import torch.nn.functional as F

from splitserve.kernels import choice
from splitserve.kernels.choice import CONTEXT_BUCKETS, ROW_BUCKETS, Case
from splitserve.kernels.dispatch import force_backend, triton_module

log = logging.getLogger(__name__)
MAX_ROWS = 4096  # the last row bucket is timed at this many rows
MAX_KV_TOKENS = 1 << 20  # decode attention cases hold at most this many cached tokens
KEY_FORMAT = 2  # in the table's file name: tables saved with keys of another form are measured again


def _with(backend: str, fn):
    def run():
        with force_backend(backend):
            return fn()
    return run


def _elementwise(cfg, dtype, device, rows: tuple[int, ...]) -> list[Case]:
    from splitserve.kernels import ops
    h, inter, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    heads = cfg.num_heads + cfg.num_kv_heads
    cases = []
    for n in rows:
        g = torch.Generator(device=device).manual_seed(n)
        res = torch.randn(n, h, device=device, generator=g)
        delta = torch.randn(n, h, device=device, generator=g).to(dtype)
        weight = torch.rand(h, device=device, generator=g).to(dtype)
        gate_up = torch.randn(n, 2 * inter, device=device, generator=g).to(dtype)
        qk = torch.randn(n, heads, d, device=device, generator=g).to(dtype)
        angle = torch.rand(n, 1, d // 2, device=device, generator=g) * 6.28
        cos, sin = torch.cat([angle.cos()] * 2, -1).to(dtype), torch.cat([-angle.sin(), angle.sin()], -1).to(dtype)
        norm = lambda: ops.add_rms_norm(res.clone(), delta, weight, cfg.rms_norm_eps)  # noqa: E731
        silu = lambda: ops.silu_and_mul(gate_up)  # noqa: E731
        rot = lambda: ops.rotary(qk.clone(), cos, sin)  # noqa: E731
        for op, fn, dims in (("add_rms_norm", norm, (h,)), ("silu_and_mul", silu, (2 * inter,)),
                             ("rotary", rot, (heads, d))):
            cases.append(Case(op, n, 0, {b: _with(b, fn) for b in ("torch", "triton")}, str(dtype).split(".")[-1],
                              dims))
    return cases


def _attention(cfg, dtype, device, batches: tuple[int, ...], contexts: tuple[int, ...], block_size: int) -> list[Case]:
    from splitserve.kernels import ops
    cases = []
    for b in batches:
        for ctx in contexts:
            if b * ctx > MAX_KV_TOKENS:
                continue
            width = -(-ctx // block_size)
            g = torch.Generator(device=device).manual_seed(b * 7919 + ctx)
            kv = torch.randn(b * width + 1, 2, block_size, cfg.num_kv_heads, cfg.head_dim, device=device,
                             generator=g).to(dtype)
            tables = torch.randperm(b * width, device=device, generator=g).view(b, width)
            lens = torch.randint(max(1, ctx // 2), ctx + 1, (b,), device=device, generator=g)
            q = torch.randn(b, cfg.num_heads, cfg.head_dim, device=device, generator=g).to(dtype)
            fn = lambda q=q, kv=kv, t=tables, n=lens: ops.paged_decode_attention(q, kv, t, n)  # noqa: E731
            cases.append(Case("paged_decode_attention", b, ctx, {x: _with(x, fn) for x in ("torch", "triton")},
                              str(dtype).split(".")[-1], (cfg.num_heads, cfg.head_dim, cfg.num_kv_heads)))
    return cases


def linear_impl(name: str, layer, x: torch.Tensor) -> torch.Tensor:
    """One implementation of a quantized linear (canonical weights on the GPU): x [M, K] -> [M, N]."""
    w = layer.weight
    if name == "torch":
        return F.linear(x, w.dequantize().to(x.dtype), layer.bias)
    if name == "triton-gemv":
        gemv = triton_module("gemv")
        return (gemv.launch_w8 if layer.bits == 8 else gemv.launch_w4)(x, w, layer.bias)
    return triton_module("w8_matmul" if layer.bits == 8 else "w4_matmul").launch(x, w, layer.bias).to(x.dtype)


def _linears(model, dtype, device, rows: tuple[int, ...]) -> list[Case]:
    from splitserve.kernels.choice import GEMV_MAX_ROWS
    from splitserve.kernels.linear import QuantLinear
    seen, cases = set(), []
    for layer in model.modules():
        if not isinstance(layer, QuantLinear) or layer.backend != "triton":
            continue
        if (layer.op, layer.dims) in seen:
            continue
        seen.add((layer.op, layer.dims))
        for n in rows:
            x = torch.randn(n, layer.in_features, device=device).to(dtype)
            names = ("torch", "triton") + (("triton-gemv",) if n <= GEMV_MAX_ROWS else ())
            cands = {name: (lambda name=name, x=x, layer=layer: linear_impl(name, layer, x)) for name in names}
            cases.append(Case(layer.op, n, 0, cands, str(dtype).split(".")[-1], layer.dims))
    return cases


def model_cases(model, device: torch.device, block_size: int, max_batch: int,
                rows: tuple[int, ...] | None = None, contexts: tuple[int, ...] | None = None,
                max_context: int = 0) -> list[Case]:
    """Every case for ``model`` (built on ``device``); ``rows`` / ``contexts``: the buckets to time (default:
    all up to ``MAX_ROWS`` rows, and the decode attention's up to the buckets that hold ``max_batch`` rows and
    ``max_context`` tokens: the shapes CUDA graphs replay). Cases over ``MAX_KV_TOKENS`` are left out (the
    op's default then serves them: ``choice.default``)."""
    cfg, dtype = model.cfg, model.dtype
    rows = rows or tuple(min(r, MAX_ROWS) for r in ROW_BUCKETS)
    top = next((c for c in CONTEXT_BUCKETS if c >= max_context), CONTEXT_BUCKETS[-1])  # the bucket covering it
    contexts = contexts or tuple(c for c in CONTEXT_BUCKETS[1:] if c <= max(top, 512))
    batch_top = next((r for r in ROW_BUCKETS if r >= max_batch), ROW_BUCKETS[-1])
    batches = tuple(r for r in rows if r <= batch_top)  # up to the bucket holding max_batch
    return (_elementwise(cfg, dtype, device, rows) + _attention(cfg, dtype, device, batches, contexts, block_size)
            + _linears(model, dtype, device, rows))


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("splitserve")
    except PackageNotFoundError:
        return "source"


def prepare(model, device: torch.device, block_size: int, max_batch: int, quantization: str, progress=None,
            rows: tuple[int, ...] | None = None, contexts: tuple[int, ...] | None = None, max_context: int = 0,
            merge: bool = False):
    """Read this GPU's table for this model shape, or measure and save it; install it (``merge``: added to
    the installed one). Returns the table read or measured. ``rows`` / ``contexts``: as in ``model_cases``
    (tests time a few small buckets)."""
    import triton
    cfg = model.cfg
    meta = {"gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
            "torch": torch.__version__, "triton": triton.__version__, "dtype": str(model.dtype).split(".")[-1],
            "model": f"{cfg.hidden_size}x{cfg.intermediate_size}x{cfg.num_heads}x{cfg.num_kv_heads}x{cfg.head_dim}",
            "quantization": quantization, "block_size": block_size, "max_batch": max_batch,
            "max_context": max_context, "splitserve": _version(), "keys": KEY_FORMAT}
    path = choice.table_path(meta)
    try:
        table = choice.KernelTable.load(path)
        log.info("kernel choices from %s", path)
    except (OSError, ValueError, KeyError):
        table = choice.measure(model_cases(model, device, block_size, max_batch, rows, contexts, max_context),
                               progress=progress)
        table.meta = {**meta, "date": datetime.date.today().isoformat()}
        try:
            table.save(path)
        except OSError as e:
            log.warning("kernel choices not saved (%s): measured again at the next start", e)
    choice.install(choice.current().merged(table) if merge else table)
    return table
