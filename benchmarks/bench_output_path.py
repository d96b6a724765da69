"""Served output tokens/s with a decode worker's outputs batched per engine step, against one Ray
object per token per request, in one run.

    python benchmarks/bench_output_path.py [--streams 1,4,16] [--rounds 2] [--requests-per-stream 3]

Two servers, started in turn on the same 2 cores, A B A B (``--rounds``), each the same
disaggregated setup as ``compare.py`` (1 prefill and 1 decode actor of 1 thread each, the real
SmolLM2 in the machine's default dtype):

  batched     ``batched_outputs: true`` (the default): one message per engine step carries the new
              tokens of all the requests the front door follows on that worker (decode/outbox.py)
  per-token   ``batched_outputs: false``: one Ray streaming call per request, one object per token

At each concurrency, a closed loop of short-chat requests (64 output tokens, ignore_eos) over the
OpenAI SSE API; served output tokens/s = tokens received / wall time. Reported: the median over
rounds of each, and the ratio batched / per-token. Writes benchmarks/results/output_path.md and .json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_engine import machine  # noqa: E402
from bench_migration import free_port  # noqa: E402

MODES = {"batched": True, "per-token": False}
MAX_TOKENS = 64


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_mode(mode: str, streams: list[int], per_stream: int, tokenizer, ids, seed: int) -> dict:
    import numpy as np
    import ray
    from dataclasses import replace
    from splitserve.bench.clients import OpenAIClient
    from splitserve.bench.runner import run_concurrency
    from splitserve.bench.workload import WORKLOADS
    from splitserve.platform.config import PoolConfig, ServeConfig
    from splitserve.platform.server import start_server

    cfg = ServeConfig(model_name="smollm2", http_port=free_port(), grpc_port=free_port(), max_queue_wait_s=120,
                      batched_outputs=MODES[mode], prefill=PoolConfig(threads=1, max_num_batched_tokens=512),
                      decode=PoolConfig(threads=1))
    log(f"[{mode}] starting the server ...")
    server = start_server(cfg, num_cpus=2, log=lambda m: None)
    out = {}
    try:
        client = OpenAIClient(server.endpoints["openai"], "smollm2")

        async def main():
            rng = np.random.default_rng(seed)
            warm = [replace(s, max_tokens=8) for s in WORKLOADS["short_chat"].specs(2, rng, tokenizer, ids)]
            await run_concurrency(client, warm, 2, request_timeout_s=120, progress=False)
            for c in streams:
                specs = [replace(s, max_tokens=MAX_TOKENS)
                         for s in WORKLOADS["short_chat"].specs(c * per_stream, rng, tokenizer, ids)]
                start = time.monotonic()
                recs = await run_concurrency(client, specs, c, request_timeout_s=300, progress=False)
                errors = [r.error for r in recs if not r.ok]
                if errors:
                    raise RuntimeError(f"{len(errors)} requests failed: {errors[:2]}")
                out[c] = sum(r.output_tokens for r in recs) / (time.monotonic() - start)
                log(f"[{mode}] {c} streams: {out[c]:.1f} output tok/s")
            await client.close()

        asyncio.run(main())
    finally:
        server.shutdown()
        if ray.is_initialized():
            ray.shutdown()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--streams", default="1,4,16")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--requests-per-stream", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args()
    streams = [int(x) for x in args.streams.split(",")]
    from splitserve.bench.workload import corpus_text
    from splitserve.engine.tokenizer import load_tokenizer
    tokenizer = load_tokenizer(None)
    ids = tokenizer.encode(corpus_text())
    runs = {m: [] for m in MODES}
    for r in range(args.rounds):
        for mode in MODES:  # A B A B: drift on the machine hits both alike
            log(f"round {r + 1}/{args.rounds}")
            runs[mode].append(run_mode(mode, streams, args.requests_per_stream, tokenizer, ids, args.seed + r))
    med = {m: {c: statistics.median(run[c] for run in runs[m]) for c in streams} for m in MODES}
    command = " ".join(["python benchmarks/bench_output_path.py", *sys.argv[1:]])
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "output_path.json"), "w") as f:
        json.dump({"command": command, "machine": machine(), "median_tok_s": med, "runs": runs}, f, indent=1)
    lines = ["# The per-token path: batched per engine step vs one object per token", "", f"Command: `{command}`", "",
             f"Machine: {machine()}", "",
             f"Closed loop of short-chat requests ({MAX_TOKENS} output tokens each) over OpenAI SSE, "
             f"{args.requests_per_stream} requests per stream; the two servers ran in turn, {args.rounds} rounds "
             "(A B A B); medians over rounds. Higher ratio is better.", "",
             "| concurrent streams | batched tok/s | per-token tok/s | batched / per-token |", "|---|---|---|---|"]
    for c in streams:
        b, p = med["batched"][c], med["per-token"][c]
        lines.append(f"| {c} | {b:.1f} | {p:.1f} | {b / p:.2f} |")
    with open(os.path.join(args.out, "output_path.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    log("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
