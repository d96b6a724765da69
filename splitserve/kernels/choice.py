"""Which implementation runs each kernel operation on a GPU, per shape bucket: measured, not assumed.

A Triton kernel is used where it was measured faster than torch's (cuBLAS,
SDPA, torch's fused ops) at that shape on this GPU, and correct; nowhere else.

    key(op, rows, context, dims) -> (op, its operands' fixed dimensions, rows bucket, context bucket): the
                              dimensions (hidden width, heads, a weight's N x K) keep a draft model's ops
                              apart from the target's, whose shapes they do not share
    measure(cases, timer)     for each case (an op at one bucket's representative shape): run every
                              candidate, drop the ones that fail or differ from the torch candidate
                              beyond the op's tolerance, keep the fastest -> KernelTable
    KernelTable               {key: implementation}; JSON on disk, one file per GPU type, torch and
                              Triton version and model shape (``table_path``): measured once at the
                              first start-up (``prepare``), then read; it can be checked in. A process
                              with a draft model installs the target's table, then merges the draft's
    choose(op, rows, context, dims)
                              the table's implementation; without an entry, the op's default: torch's,
                              except decode attention and the quantized linears, whose Triton
                              kernels read the cache and the weights in place (torch's paths would
                              gather every row's whole block table, or dequantize the whole weight,
                              at every call)

Implementations: "torch" | "triton" for every op; the quantized linears also
"triton-gemv" (rows <= 16, ``triton/gemv.py``). ``dispatch.backend_for`` asks
``choose`` for CUDA tensors; CPU tensors always take torch's paths (unless a
backend is forced, as the interpreter tests do).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from dataclasses import dataclass, field

ROW_BUCKETS = (1, 4, 16, 64, 256, 1024, 8192)  # a bucket is the smallest bound >= rows
CONTEXT_BUCKETS = (0, 512, 2048, 8192, 32768)  # decode attention: by its block table's token width
GEMV_MAX_ROWS = 16  # the split-K GEMV (triton/gemv.py) takes at most this many rows
TOLERANCE = {"float32": 1e-3, "bfloat16": 3e-2, "float16": 1e-2}


def _bucket(value: int, bounds: tuple[int, ...]) -> int:
    return next((b for b in bounds if value <= b), bounds[-1])


def key(op: str, rows: int, context: int = 0, dims: tuple[int, ...] = ()) -> str:
    return f"{op}|{'x'.join(map(str, dims))}|{_bucket(rows, ROW_BUCKETS)}|{_bucket(context, CONTEXT_BUCKETS)}"


def default(op: str, rows: int) -> str:
    """The implementation of an op at a shape the table has no entry for (see the module docstring)."""
    if op == "paged_decode_attention":
        return "triton"
    if op.startswith("linear_int"):
        return "triton-gemv" if rows <= GEMV_MAX_ROWS else "triton"
    return "torch"


@dataclass
class KernelTable:
    choices: dict = field(default_factory=dict)  # key -> implementation
    timings: dict = field(default_factory=dict)  # key -> {implementation: seconds, or the reason it was dropped}
    meta: dict = field(default_factory=dict)  # GPU, versions, model shape, date

    def choose(self, op: str, rows: int, context: int = 0, dims: tuple[int, ...] = ()) -> str:
        return self.choices.get(key(op, rows, context, dims)) or default(op, rows)

    def merged(self, other: "KernelTable") -> "KernelTable":
        """This table with ``other``'s entries added (a draft model's next to its target's; a key both hold
        is the same op at the same shapes, so either measurement serves)."""
        return KernelTable({**self.choices, **other.choices}, {**self.timings, **other.timings},
                           {**self.meta, "merged": [*self.meta.get("merged", []), other.meta]})

    def save(self, path: str) -> None:
        """Written whole or not at all (workers starting together may write the same file)."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump({"meta": self.meta, "choices": self.choices, "timings": self.timings}, f, indent=1, sort_keys=True)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> "KernelTable":
        with open(path) as f:
            raw = json.load(f)
        return cls(dict(raw["choices"]), dict(raw.get("timings", {})), dict(raw.get("meta", {})))


@dataclass(frozen=True)
class Case:
    """One op at one bucket: ``candidates`` {implementation: zero-argument callable returning a tensor (or a
    tuple, whose last item is compared)}; "torch" among them is the reference the others must match;
    ``dims``: the operands' fixed dimensions, as the op passes them to ``choose``."""
    op: str
    rows: int
    context: int
    candidates: dict
    dtype: str = "float32"
    dims: tuple = ()


def _output(result):
    return result[-1] if isinstance(result, tuple) else result


def _differs(out, ref, tol: float) -> str | None:
    out, ref = _output(out).float(), _output(ref).float()
    if out.shape != ref.shape:
        return f"shape {tuple(out.shape)} != {tuple(ref.shape)}"
    scale = max(ref.abs().max().item(), 1e-6)
    err = (out - ref).abs().max().item() / scale
    return None if math.isfinite(err) and err <= tol else f"error {err:.2e} of the output's range > {tol:g}"


def wall_timer(fn, repeats: int = 5) -> float:
    """Median seconds of ``fn()`` (a warm-up call first). On a GPU: its device time (CUDA events, Triton's
    ``do_bench``), not the host's launch time, which CUDA graphs take away."""
    import torch
    if torch.cuda.is_available():
        from triton.testing import do_bench
        return do_bench(fn, warmup=5, rep=max(10, 2 * repeats), return_mode="median") / 1e3
    sync = lambda: None  # noqa: E731
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(cases: list[Case], timer=wall_timer, progress=None) -> KernelTable:
    """The fastest correct implementation per case's key (see the module docstring)."""
    table = KernelTable()
    for case in (progress(cases, "choosing kernels") if progress else cases):
        k = key(case.op, case.rows, case.context, case.dims)
        try:
            ref = case.candidates["torch"]()
        except Exception as e:  # noqa: BLE001 - no reference at this shape (e.g. out of memory): no entry
            table.timings[k] = {"torch": f"failed: {type(e).__name__}: {e}"}
            continue
        timings, best = {}, None
        for name, fn in case.candidates.items():
            try:
                wrong = None if name == "torch" else _differs(fn(), ref, TOLERANCE.get(case.dtype, 1e-3))
            except Exception as e:  # noqa: BLE001 - a candidate that cannot run this shape is not chosen
                wrong = f"failed: {type(e).__name__}: {e}"
            if wrong:
                timings[name] = wrong
                continue
            timings[name] = timer(fn)
            if best is None or timings[name] < timings[best]:
                best = name
        table.choices[k], table.timings[k] = best, timings
    return table


def table_path(meta: dict) -> str:
    """Where the table of this GPU type, these versions and this model shape lives
    (``SPLITSERVE_KERNEL_TABLE`` overrides)."""
    if os.environ.get("SPLITSERVE_KERNEL_TABLE"):
        return os.environ["SPLITSERVE_KERNEL_TABLE"]
    name = "-".join(str(meta[k]) for k in sorted(meta) if k != "date")
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in name)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "splitserve", "kernels", safe + ".json")


_table = KernelTable()  # the process's table (one GPU type per worker process)


def current() -> KernelTable:
    return _table


def install(table: KernelTable) -> None:
    global _table
    _table = table


def choose(op: str, rows: int, context: int = 0, dims: tuple[int, ...] = ()) -> str:
    return _table.choose(op, rows, context, dims)
