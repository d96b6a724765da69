"""Where one streamed request's time goes, process by process (sampling profiler on the live server).

    python benchmarks/profile_request_path.py [--seconds 15] [--streams 1] [--system disaggregated+int4]

Starts splitserve as ``--system`` of compare.py's SYSTEMS (there: prefill and decode actors of 1 thread each),
streams requests over OpenAI SSE from this process (``--streams`` at a time,
64 output tokens each), and meanwhile samples every process on the path with
py-spy (100 Hz, CPU time only): the decode and prefill actors, the Serve
replica of the front door, Serve's HTTP proxy, and this client. For each it
reports the share of one core it kept busy and the functions that took it.
Beside it, the engine's own step time (decode actor stats) and the client's
inter-token gap say how much of a token's latency is the model and how much
the path. Writes ``benchmarks/results/request_path.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
ROLES = {"ray::DecodeWorkerImpl": "decode actor", "ray::PrefillWorkerImpl": "prefill actor",
         "FrontDoor": "Serve replica (front door)", "ray::ProxyActor": "Serve HTTP proxy",
         "ray::ColocatedWorkerImpl": "colocated worker"}


def find_processes() -> dict[str, int]:
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    found = {}
    for line in out.splitlines():
        pid, _, args = line.strip().partition(" ")
        for marker, role in ROLES.items():
            if marker in args and role not in found:
                found[role] = int(pid)
    found["client (this process)"] = os.getpid()
    return found


def summarize(raw_file: str, seconds: float, rate: int, top: int = 6) -> tuple[float, list[tuple[str, float]]]:
    """py-spy raw (collapsed stacks) -> (share of a core busy, [(function, share of a core)])."""
    per_func: collections.Counter = collections.Counter()
    total = 0
    with open(raw_file) as f:
        for line in f:
            stack, _, count = line.rstrip().rpartition(" ")
            if not count.isdigit():
                continue
            n = int(count)
            total += n
            frames = stack.split(";")
            # the innermost frame in our code or Ray's Python (not asyncio/threading internals) names the work
            ours = [fr for fr in frames if "splitserve/" in fr or "ray/serve" in fr or "ray/_private" in fr
                    or "openai" in fr or "httpx" in fr or "torch" in fr]
            per_func[(ours or frames)[-1].split(" (")[0] + " (" + (ours or frames)[-1].split("(")[-1]] += n
    scale = 1.0 / (rate * seconds)
    return total * scale, [(k, v * scale) for k, v in per_func.most_common(top)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--streams", type=int, default=1)
    from compare import SYSTEMS, server_config
    ap.add_argument("--system", default="disaggregated+int4", choices=sorted(SYSTEMS))
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args()
    import ray

    from bench_engine import machine
    from splitserve.bench.clients import OpenAIClient
    from splitserve.bench.metrics import summarize as summarize_records
    from splitserve.bench.runner import run_concurrency
    from splitserve.bench.workload import WORKLOADS, corpus_text
    from splitserve.engine.tokenizer import load_tokenizer
    from splitserve.engine.engine import dtype_name
    from splitserve.platform.server import start_server
    import numpy as np

    cfg = server_config(SYSTEMS[args.system])
    print("starting splitserve ...", file=sys.stderr)
    srv = start_server(cfg, num_cpus=2, log=lambda m: None)
    rate = 100
    try:
        tok = load_tokenizer(None)
        ids = tok.encode(corpus_text())
        specs = WORKLOADS["short_chat"].specs(400, np.random.default_rng(0), tok, ids)
        specs = [dataclasses.replace(s, max_tokens=64) for s in specs]
        client = OpenAIClient(srv.endpoints["openai"], "smollm2")

        async def drive(deadline: float):
            records = []
            while time.monotonic() < deadline:
                batch = [specs.pop() for _ in range(args.streams)]
                records += await run_concurrency(client, batch, args.streams, progress=False)
            await client.close()
            return records

        asyncio.run(drive(time.monotonic() + 3))  # warm-up
        client = OpenAIClient(srv.endpoints["openai"], "smollm2")
        procs = find_processes()
        tmp = tempfile.mkdtemp()
        py_spy = os.path.join(os.path.dirname(sys.executable), "py-spy")
        spies = {role: subprocess.Popen([py_spy, "record", "-p", str(pid), "-d", str(int(args.seconds)), "-r",
                                         str(rate), "-f", "raw", "-o", os.path.join(tmp, f"{pid}.txt"),
                                         "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for role, pid in procs.items()}
        records = asyncio.run(drive(time.monotonic() + args.seconds))
        for p in spies.values():
            p.wait(timeout=args.seconds + 30)
    finally:
        srv.shutdown()
        if ray.is_initialized():
            ray.shutdown()
    ok = [r for r in records if r.ok]
    summary = summarize_records(records, 1e9, 1e9)
    tokens = sum(len(r.token_times) for r in ok)
    span = max(r.end for r in ok) - min(r.send for r in ok)
    lines = ["# The request path, process by process", "",
             f"- command: `python {' '.join([os.path.relpath(sys.argv[0])] + sys.argv[1:])}`",
             f"- machine: {machine()}", f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
             f"- splitserve {args.system} ({dtype_name(cfg.dtype)}), {args.streams} concurrent OpenAI SSE stream(s) of 64 tokens from "
             f"this process, {args.seconds:.0f} s sampled with py-spy at {rate} Hz (CPU time only)",
             f"- client saw {tokens / span:.1f} output tok/s, inter-token gap P50 "
             f"{summary['itl_s']['p50'] * 1000:.1f} ms, P99 {summary['itl_s']['p99'] * 1000:.1f} ms "
             f"({len(ok)} requests)", "",
             "| process | share of one core busy | where (innermost frame in splitserve / Ray / client code) |",
             "|---|---|---|"]
    for role, pid in procs.items():
        path = os.path.join(tmp, f"{pid}.txt")
        if not os.path.exists(path):
            lines.append(f"| {role} | (py-spy could not sample pid {pid}) | |")
            continue
        busy, funcs = summarize(path, args.seconds, rate)
        where = "<br>".join(f"{share:.0%} {name}" for name, share in funcs)
        lines.append(f"| {role} | {busy:.0%} | {where} |")
    lines += ["", "2 cores in all: the sum of the busy shares above, past 200%, is time spent waiting for a core.", ""]
    text = "\n".join(lines)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "request_path.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
