"""Prefix caching on a shared-system-prompt workload: goodput with the cache, without, and llama-server's.

    python benchmarks/bench_prefix_cache.py [--rates 0.05,0.1,...] [--duration 40] [--slo-ttft 3] [--slo-tpot 0.25]

Servers one after the other on the same 2 cores (splitserve: real Ray, 1 prefill and 1 decode actor of 1
thread each, the real SmolLM2 in the machine's default dtype), the same requests sent to each:

  cache       ``prefix_caching: true`` (the default): the prefill worker keeps computed prompt blocks,
              a prompt that starts with them computes only the rest
  no cache    ``prefix_caching: false``: every prompt computed whole (the baseline)
  cache+int4  the cache, and the decode pool's weights in int4
  llama.cpp   llama.cpp's C++ ``llama-server`` (compare.py's command, 2 threads), on the same GGUF with its
              prompt cache (on by default), when ``scripts/build_llamacpp.sh`` has built it

Before its sweep each server answers ``PRIME`` (4) concurrent requests of the workload, untimed, so the system
prompt is cached as in a server that has been running: in splitserve's prefill worker, and in each of
llama-server's 4 slots (its cache serves a request only from an idle slot that holds the prefix).

Workload ``shared_prefix`` (``splitserve/bench/workload.py``): every prompt is the same 768-token
system prompt followed by its own question (log-normal, ~64 tokens), outputs ~48 tokens; Poisson
arrivals, open loop, over the OpenAI SSE API. Each rate runs ``--duration`` s after a warm-up; a
system's sweep stops after its attainment falls below 50%. Reported per rate: SLO attainment (both
objectives, and TTFT alone), P50/P99 TTFT, P99 TPOT, and the prefill worker's prefix-cache hit rate
(hit tokens / looked-up tokens, from its stats); per system its goodput (the highest rate at which it
and every lower rate reach 90%), and the ratio. Writes benchmarks/results/prefix_cache.md and .json.

The TPOT objective defaults to 250 ms, not compare.py's 150: on these 2 cores a decode step of 3
sequences with 850-token contexts takes ~120 ms in the engine alone (1 decode thread, bf16: GEMMs of 3
rows, and the attention's KV gather over long contexts), so a Poisson burst of 3 would miss 150 ms
with or without the cache; this benchmark is about the prompt.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_engine import machine  # noqa: E402
from bench_migration import free_port  # noqa: E402

SYSTEMS = {"cache": dict(prefix_caching=True), "no cache": dict(prefix_caching=False),
           "cache+int4": dict(prefix_caching=True, quantization="int4")}  # + "llama.cpp", when built


PRIME = 4  # untimed concurrent requests before the sweep: the system prompt cached as in a running server


def _fmt(v, scale: float = 1.0, digits: int = 2) -> str:
    return "-" if v is None else f"{v * scale:.{digits}f}"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def prefill_hits(server) -> tuple[int, int]:
    """(hit, looked-up) prompt tokens, summed over the prefill workers."""
    stats = [s for n, s in server.pools.all_stats().items() if "prefill" in n]
    return sum(s.engine.prefix_hit_tokens for s in stats), sum(s.engine.prefix_queried_tokens for s in stats)


async def sweep(name: str, client, args, tokenizer, ids, hits) -> dict:
    """Each rate of ``args.rates`` in turn, open loop; ``hits()`` gives (hit, looked-up) prompt tokens so far."""
    from splitserve.bench import metrics
    from splitserve.bench.runner import run_concurrency, run_open_loop
    from splitserve.bench.workload import WORKLOADS
    prime = WORKLOADS["shared_prefix"].specs(PRIME, np.random.default_rng(args.seed + 1), tokenizer, ids)
    await run_concurrency(client, prime, PRIME, request_timeout_s=180, progress=False)
    rows = {}
    for rate in args.rates:
        specs = WORKLOADS["shared_prefix"].schedule(rate, args.duration + args.warmup, args.seed, tokenizer, ids)
        hit0, asked0 = hits()
        started = time.monotonic()
        recs = await run_open_loop(client, specs, args.warmup, request_timeout_s=180, progress=False)
        hit, asked = hits()
        both = metrics.summarize(recs, args.slo_ttft, args.slo_tpot)
        ttft_only = metrics.summarize(recs, args.slo_ttft, float("inf"))
        rows[rate] = {"requests": both["num_requests"], "errors": both["num_errors"],
                      "attainment": both["slo_attainment"], "attainment_ttft": ttft_only["slo_attainment"],
                      "ttft_p50_s": both["ttft_s"]["p50"], "ttft_p99_s": both["ttft_s"]["p99"],
                      "tpot_p99_s": both["tpot_s"]["p99"],
                      "hit_rate": (hit - hit0) / (asked - asked0) if asked > asked0 else 0.0,
                      "seconds": time.monotonic() - started}
        r = rows[rate]
        log(f"[{name}] {rate} req/s: attainment {r['attainment']:.0%} (TTFT alone "
            f"{r['attainment_ttft']:.0%}), TTFT P50 {_fmt(r['ttft_p50_s'])} s P99 {_fmt(r['ttft_p99_s'])} s, "
            f"TPOT P99 {_fmt(r['tpot_p99_s'], 1e3, 0)} ms, hit rate {r['hit_rate']:.0%}, errors {r['errors']}")
        if r["attainment"] < 0.5 and r["attainment_ttft"] < 0.5:
            break  # far past the knee: higher rates only queue up
    await client.close()
    return rows


def run_system(name: str, args, tokenizer, ids) -> dict:
    import ray
    from splitserve.bench.clients import OpenAIClient
    from splitserve.platform.config import PoolConfig, ServeConfig
    from splitserve.platform.server import start_server

    cfg = ServeConfig(model_name="smollm2", http_port=free_port(), grpc_port=free_port(), max_queue_wait_s=60,
                      prefix_caching=SYSTEMS[name]["prefix_caching"],
                      prefill=PoolConfig(threads=1, max_num_batched_tokens=512),
                      decode=PoolConfig(threads=1, quantization=SYSTEMS[name].get("quantization")))
    log(f"[{name}] starting the server (1 prefill, 1 decode actor) ...")
    server = start_server(cfg, num_cpus=2, log=lambda m: None)
    try:
        client = OpenAIClient(server.endpoints["openai"], "smollm2")
        return asyncio.run(sweep(name, client, args, tokenizer, ids, lambda: prefill_hits(server)))
    finally:
        server.shutdown()
        if ray.is_initialized():
            ray.shutdown()


def llama_hits(port: int) -> tuple[int, int]:
    """(cached, cached + computed) prompt tokens from llama-server's Prometheus counters."""
    import urllib.request
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    counters = {}
    for line in text.splitlines():
        if line.startswith("llamacpp:prompt_tokens"):
            key, value = line.split()
            counters[key] = float(value)
    cached = int(counters.get("llamacpp:prompt_tokens_cached_total", 0))
    return cached, cached + int(counters.get("llamacpp:prompt_tokens_total", 0))


def run_llama(args, tokenizer, ids) -> dict | None:
    """llama.cpp's C++ llama-server on the same GGUF, its prompt cache on (its default)."""
    import subprocess
    from compare import llama_server_command, wait_for_llama
    from splitserve.bench.clients import OpenAIClient
    port = free_port()
    command = llama_server_command(args, port, slots=args.llama_slots)
    if command is None or "llama_cpp.server" in command:
        log("[llama.cpp] C++ llama-server not built (scripts/build_llamacpp.sh): skipped")
        return None
    command.append("--metrics")
    args.llama_command = " ".join(c for c in command if c != str(port))
    log(f"[llama.cpp] starting {command[0]} ...")
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_llama(port)
        client = OpenAIClient(f"http://127.0.0.1:{port}/v1", "smollm2")
        return asyncio.run(sweep("llama.cpp", client, args, tokenizer, ids, lambda: llama_hits(port)))
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rates", default="0.05,0.1,0.2,0.3,0.4,0.5,0.6,0.8,1,1.25,1.5,2,2.5")
    ap.add_argument("--duration", type=float, default=40.0)
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--slo-ttft", type=float, default=3.0)
    ap.add_argument("--slo-tpot", type=float, default=0.25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--systems", default=",".join([*SYSTEMS, "llama.cpp"]), help="comma-separated, of "
                    + ", ".join([*SYSTEMS, "llama.cpp"]))
    ap.add_argument("--llama-server", default=None, help="path of llama.cpp's llama-server "
                                                         "(default: .llamacpp/build/bin/llama-server)")
    ap.add_argument("--llama-slots", type=int, default=4,
                    help="llama-server --parallel: its prompt cache serves a request only from an idle slot that "
                         "holds the prefix, so a few slots that each keep the system prompt suit this workload "
                         "(with compare.py's 32, each arrival in a burst takes a fresh slot and computes it all)")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args()
    systems = args.systems.split(",")
    unknown = [n for n in systems if n not in SYSTEMS and n != "llama.cpp"]
    if unknown:
        ap.error(f"--systems: unknown {unknown}; allowed: {', '.join([*SYSTEMS, 'llama.cpp'])}")
    args.rates = [float(x) for x in args.rates.split(",")]
    from splitserve.bench import metrics
    from splitserve.bench.workload import corpus_text
    from splitserve.engine.tokenizer import load_tokenizer
    tokenizer = load_tokenizer(None)
    ids = tokenizer.encode(corpus_text())
    runs = {}
    for name in systems:
        rows = run_llama(args, tokenizer, ids) if name == "llama.cpp" else run_system(name, args, tokenizer, ids)
        if rows is not None:
            runs[name] = rows
    goodput = {n: metrics.goodput({r: v["attainment"] for r, v in rows.items()}) for n, rows in runs.items()}
    goodput_ttft = {n: metrics.goodput({r: v["attainment_ttft"] for r, v in rows.items()}) for n, rows in runs.items()}
    command = " ".join(["python benchmarks/bench_prefix_cache.py", *sys.argv[1:]])
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "prefix_cache.json"), "w") as f:
        json.dump({"command": command, "machine": machine(), "slo": {"ttft_s": args.slo_ttft, "tpot_s": args.slo_tpot},
                   "goodput": goodput, "goodput_ttft_only": goodput_ttft, "runs": runs}, f, indent=1)

    def ratio(g: dict, a: str, b: str) -> str:
        if a not in g or b not in g:
            return "-"
        return f"{g[a] / g[b]:.2f}x" if g[b] else (f"{b}: 0 (misses at the lowest rate)" if g[a] else "-")

    lines = ["# Prefix caching on a shared system prompt", "", f"Command: `{command}`", "", f"Machine: {machine()}", "",
             "Each prompt: the same 768-token system prompt, then its own ~64-token question; ~48 output tokens; "
             f"Poisson arrivals, {args.duration:.0f} s per rate after {args.warmup:.0f} s of warm-up; splitserve: 1 "
             "prefill and 1 decode actor of 1 thread each (int4: the decode pool's weights in int4); llama.cpp: "
             f"`{getattr(args, 'llama_command', 'llama-server')}`, its prompt cache on (the default; hit rate from "
             f"its `prompt_tokens_cached_total`). SLOs: TTFT <= {args.slo_ttft} s, TPOT <= {args.slo_tpot} s. Goodput: "
             "the highest swept rate at which it and every lower rate have >= 90% of requests within the SLOs.", "",
             "| | goodput (both SLOs) | goodput (TTFT alone) |", "|---|---|---|"]
    for n in runs:
        lines.append(f"| {n} | {goodput[n]:.2f} req/s | {goodput_ttft[n]:.2f} req/s |")
    for a, b in [("cache", "no cache"), ("cache", "llama.cpp"), ("cache+int4", "llama.cpp")]:
        if a in runs and b in runs:
            lines.append(f"| {a} / {b} | {ratio(goodput, a, b)} | {ratio(goodput_ttft, a, b)} |")
    lines += ["",
              "| system | rate req/s | requests | attainment | attainment (TTFT alone) | TTFT P50 s | TTFT P99 s | "
              "TPOT P99 ms | prefix hit rate |", "|---|---|---|---|---|---|---|---|---|"]
    for n, rows in runs.items():
        for rate, r in rows.items():
            lines.append(f"| {n} | {rate} | {r['requests']} | {r['attainment']:.0%} | {r['attainment_ttft']:.0%} | "
                         f"{_fmt(r['ttft_p50_s'])} | {_fmt(r['ttft_p99_s'])} | {_fmt(r['tpot_p99_s'], 1e3, 0)} | "
                         f"{r['hit_rate']:.0%} |")
    with open(os.path.join(args.out, "prefix_cache.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    log("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
