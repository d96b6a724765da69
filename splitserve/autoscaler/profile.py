"""``splitserve profile``: measure this machine as one instance type and write it as a catalog YAML.

    splitserve profile --name cpu-2 --cost-per-hour 0.10 --out catalog.yaml [--threads N]
                       [--dtype auto] [--quantization none] [--max-seconds 120] [--append]

One engine (the serving engine, the same settings a worker would use) is timed
over a grid, cheapest points first, with a progress line per point on stderr,
until the grid is done or ``--max-seconds`` is spent (at least three points of
each kind are always measured):

    prefill   a batch of ``b`` prompts of ``L`` random tokens, one engine step
              (the whole prompts, then one sampled token): seconds(b*L, b*L^2)
    decode    ``b`` requests of context ``C`` decoding: the mean of ``steps`` engine
              steps once every request is past its prompt: seconds(b, b*C)

Both are fitted (non-negative least squares, ``catalog.fit_linear``) and
written with the engine's KV capacity, its batch limit and where the numbers
came from. ``--append`` adds the entry to an existing catalog (replacing one of
the same name).
"""

from __future__ import annotations

import os
import platform
import random
import sys
import time

PREFILL_GRID = [(1, 32), (1, 128), (2, 128), (1, 512), (4, 128), (2, 512), (1, 1024), (1, 2048)]
DECODE_GRID = [(1, 128), (2, 128), (4, 128), (8, 128), (1, 1024), (16, 128), (4, 1024), (32, 128),
               (8, 1024), (16, 512), (32, 512)]


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure(engine, max_seconds: float = 120.0, decode_steps: int = 8, log=None, seed: int = 0) -> dict:
    """Time the grids on ``engine``; {"prefill": [(tokens, sq, s)], "decode": [(batch, kv, s)]}."""
    from splitserve.engine.sampling_params import SamplingParams

    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    rng = random.Random(seed)
    vocab = engine.model_config.vocab_size
    limit = engine.max_model_len
    prefill_points = [(b, n) for b, n in PREFILL_GRID if n + 1 <= limit and b * n <= engine.kv.capacity_tokens]
    decode_points = [(b, c) for b, c in DECODE_GRID
                     if c + decode_steps + 2 <= limit and b * (c + decode_steps + 2) <= engine.kv.capacity_tokens
                     and b <= engine.scheduler.max_num_seqs]
    total = len(prefill_points) + len(decode_points)
    start, out = time.perf_counter(), {"prefill": [], "decode": []}

    def prompt(n):
        return [rng.randrange(3, vocab) for _ in range(n)]

    done = 0
    for kind, points in (("prefill", prefill_points), ("decode", decode_points)):
        for i, (b, n) in enumerate(points):
            if i >= 3 and time.perf_counter() - start > max_seconds:
                log(f"profile: time is up ({max_seconds:.0f}s): {len(points) - i} {kind} points left out")
                break
            if kind == "prefill":
                for _ in range(b):
                    engine.add_request(prompt(n), SamplingParams(max_tokens=1, ignore_eos=True))
                t = time.perf_counter()
                while engine.has_unfinished():
                    engine.step()
                seconds = time.perf_counter() - t
                out["prefill"].append((b * n, b * n * n, seconds))
            else:
                ids = [engine.add_request(prompt(n), SamplingParams(max_tokens=decode_steps + 2, ignore_eos=True))
                       for _ in range(b)]
                while any(engine.requests[r].num_computed_tokens < n for r in ids if r in engine.requests):
                    engine.step()  # prefill (and maybe a first decode) out of the way
                steps, t = 0, time.perf_counter()
                while engine.has_unfinished() and steps < decode_steps:
                    engine.step()
                    steps += 1
                seconds = (time.perf_counter() - t) / max(steps, 1)
                while engine.has_unfinished():
                    engine.step()
                out["decode"].append((b, b * (n + decode_steps // 2), seconds))
            done += 1
            log(f"profile [{done}/{total}] {kind:7s} batch {b:2d} x {n:4d} tokens: {seconds * 1000:8.1f} ms "
                f"({time.perf_counter() - start:.0f}s)")
    return out


def profile_entry(engine, name: str, cost_per_hour: float, threads: int, samples: dict, command: str) -> dict:
    """One catalog entry (a dict for ``InstanceType.from_dict``) from measured samples."""
    from splitserve.autoscaler.catalog import fit_linear

    def fit(rows):
        coef = fit_linear([(x, y) for x, y, _ in rows], [s for _, _, s in rows], relative=True)
        fitted = [coef[0] + coef[1] * x + coef[2] * y for x, y, _ in rows]
        worst = max(abs(f - s) / s for f, (_, _, s) in zip(fitted, rows))
        return {"a": coef[0], "b": coef[1], "c": coef[2]}, worst

    prefill, prefill_err = fit(samples["prefill"])
    decode, decode_err = fit(samples["decode"])
    import torch
    return {"name": name, "cost_per_hour": cost_per_hour, "pools": ["prefill", "decode"], "threads": threads,
            "worker_resources": {}, "node_resources": {}, "labels": {},
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "startup_s": 60.0, "kv_tokens": engine.kv.capacity_tokens, "max_batch": engine.scheduler.max_num_seqs,
            "step_tokens": engine.scheduler.max_num_batched_tokens,
            "prefill": prefill, "decode": decode,
            "measured": {"machine": f"{_cpu_name()}, {os.cpu_count()} cores", "torch": str(torch.__version__),
                         "model": engine.model_config.name, "dtype": str(engine.dtype).replace("torch.", ""),
                         "date": time.strftime("%Y-%m-%d"), "command": command,
                         "worst_fit_error": {"prefill": round(prefill_err, 3), "decode": round(decode_err, 3)},
                         "prefill_samples": [list(r) for r in samples["prefill"]],
                         "decode_samples": [list(r) for r in samples["decode"]]}}


def add_args(sub) -> None:
    p = sub.add_parser("profile", help="measure this machine as an autoscaler instance type (catalog YAML)")
    p.add_argument("--name", default="local", help="the instance type's name")
    p.add_argument("--cost-per-hour", type=float, required=True, help="what one instance of this type costs")
    p.add_argument("--out", required=True, help="catalog YAML to write")
    p.add_argument("--append", action="store_true", help="add to the catalog in --out (same name: replaced)")
    p.add_argument("--model", default=None)
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker (= its Ray CPUs)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--quantization", default="none", choices=["none", "int8", "int4"])
    p.add_argument("--kv-cache-memory-mb", type=int, default=512)
    p.add_argument("--max-seconds", type=float, default=120.0, help="time budget for the measurements")


def run(args) -> int:
    from splitserve.autoscaler.catalog import Catalog, InstanceType
    from splitserve.engine.engine import LLMEngine

    if args.cost_per_hour < 0 or args.max_seconds <= 0 or args.threads < 1:
        raise ValueError("--cost-per-hour must be >= 0, --max-seconds > 0 and --threads >= 1")
    existing = []
    if args.append and os.path.exists(args.out):
        existing = [t for t in Catalog.from_yaml(args.out).types.values() if t.name != args.name]
    print("profile: loading the model ...", file=sys.stderr, flush=True)
    engine = LLMEngine(model=args.model, dtype=args.dtype, num_threads=args.threads, quantization=args.quantization,
                       kv_cache_memory=args.kv_cache_memory_mb << 20, max_num_batched_tokens=1 << 20,
                       show_progress=False)
    samples = measure(engine, args.max_seconds)
    entry = InstanceType.from_dict(profile_entry(engine, args.name, args.cost_per_hour, args.threads, samples,
                                                 "splitserve " + " ".join(sys.argv[1:])))
    Catalog(existing + [entry]).to_yaml(args.out)
    err = entry.measured["worst_fit_error"]
    print(f"profile: wrote {args.name} to {args.out}: prefill {entry.prefill}, decode {entry.decode} "
          f"(worst fit error: prefill {err['prefill']:.0%}, decode {err['decode']:.0%})", file=sys.stderr)
    return 0
