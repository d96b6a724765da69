"""Served output tokens/s at fixed concurrency, splitserve vs llama-server: interleaved rounds, medians.

    python benchmarks/bench_served_ramp.py [--rounds 3] [--concurrency 1,16] [--systems disaggregated+int4,...]

compare.py runs each system once, one after the other; on these shared 2-core machines two runs of the
same server differ by more than the gaps we are after (llama-server at 1 stream: 63 tok/s in one run,
43 in the next). This runs ``--rounds`` rounds; in each, every system (compare.py's ``SYSTEMS``, and
llama.cpp's ``llama-server`` when built) starts, answers 2 untimed requests, then the short-chat
requests of compare.py's ramp at each concurrency (``max(2c, 16)`` requests, outputs capped at
``--max-tokens``), and stops. The order of the systems is reversed every other round. Reported: per
system and concurrency the median over rounds of output tokens/s (client side, OpenAI SSE, the client
on the same 2 cores), and the median of the per-round ratios to llama-server (issue 15's aims: >= 1.0x
at 1 stream, >= 1.5x at 16). Writes ``benchmarks/results/served_ramp.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_engine import machine  # noqa: E402
from compare import SYSTEMS, _free_port, llama_server_command, log, server_config, wait_for_llama  # noqa: E402

LLAMA = "llama.cpp"
AIMS = {1: 1.0, 16: 1.5}


async def ramp(client, args, tokenizer, ids) -> dict[int, float]:
    """{concurrency: output tok/s} for compare.py's short-chat ramp, after 2 untimed requests."""
    from dataclasses import replace
    from splitserve.bench.runner import run_concurrency
    from splitserve.bench.workload import WORKLOADS
    rng = np.random.default_rng(args.seed)
    warm = WORKLOADS["short_chat"].specs(2, rng, tokenizer, ids)
    await run_concurrency(client, warm, 2, request_timeout_s=180, progress=False)
    out = {}
    for c in args.concurrency:
        specs = WORKLOADS["short_chat"].specs(max(c * 2, 16), np.random.default_rng(args.seed + c), tokenizer, ids)
        specs = [replace(s, max_tokens=min(s.max_tokens, args.max_tokens)) for s in specs]
        started = time.monotonic()
        recs = await run_concurrency(client, specs, c, request_timeout_s=180, progress=False)
        out[c] = sum(r.output_tokens for r in recs if r.ok) / (time.monotonic() - started)
        failed = [r for r in recs if not r.ok]
        if failed:  # counted in its figure as no tokens; said here, and in the table
            log(f"{len(failed)} of {len(recs)} requests failed at concurrency {c}: {failed[0].error}")
            out[f"failed@{c}"] = len(failed)
    await client.close()
    return out


@contextlib.contextmanager
def served(name: str, args):
    """A server of ``name`` (a ``SYSTEMS`` entry, or llama-server for ``LLAMA``) for the time of the block:
    yields its OpenAI base URL; stops it after (and Ray with it)."""
    if name == LLAMA:
        port = _free_port()
        command = llama_server_command(args, port)
        args.llama_command = " ".join(c for c in command if c != str(port))
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for_llama(port)
            yield f"http://127.0.0.1:{port}/v1"
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        return
    import ray
    from splitserve.platform.server import start_server
    srv = start_server(server_config(SYSTEMS[name]), num_cpus=SYSTEMS[name].get("num_cpus", 2), log=lambda m: None)
    try:
        yield srv.endpoints["openai"]
    finally:
        srv.shutdown()
        if ray.is_initialized():
            ray.shutdown()


def run(name: str, args, tokenizer, ids) -> dict[int, float]:
    from splitserve.bench.clients import OpenAIClient
    with served(name, args) as url:
        return asyncio.run(ramp(OpenAIClient(url, "smollm2"), args, tokenizer, ids))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", default="1,16")
    ap.add_argument("--systems", default="disaggregated+int4,colocated+int4,disaggregated+int4+bf16",
                    help=f"comma-separated, of {', '.join(SYSTEMS)} (llama-server is added when built)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--llama-server", default=None, help="path of llama.cpp's llama-server "
                                                         "(default: .llamacpp/build/bin/llama-server)")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args()
    args.concurrency = [int(x) for x in args.concurrency.split(",")]
    systems = args.systems.split(",")
    unknown = [n for n in systems if n not in SYSTEMS]
    if unknown:
        ap.error(f"--systems: unknown {unknown}; allowed: {', '.join(SYSTEMS)}")
    probe = llama_server_command(args, 0)
    if probe is None or "llama_cpp.server" in probe:
        ap.error("llama.cpp's C++ llama-server is not built (scripts/build_llamacpp.sh), and it is the baseline")
    systems.append(LLAMA)
    from splitserve.engine.tokenizer import load_tokenizer
    from splitserve.bench.workload import corpus_text
    tokenizer = load_tokenizer(None)
    ids = tokenizer.encode(corpus_text())
    rounds: list[dict[str, dict[int, float]]] = []
    for k in range(args.rounds):
        order = systems if k % 2 == 0 else systems[::-1]
        rounds.append({})
        for name in order:
            log(f"[round {k + 1}/{args.rounds}] {name} ...")
            got = run(name, args, tokenizer, ids)
            rounds[-1][name] = got
            log(f"[round {k + 1}/{args.rounds}] {name}: "
                + ", ".join(f"@{c} {got[c]:.1f} tok/s" for c in args.concurrency))

    median = {n: {c: statistics.median(r[n][c] for r in rounds) for c in args.concurrency} for n in systems}
    ratio = {n: {c: statistics.median(r[n][c] / r[LLAMA][c] for r in rounds) for c in args.concurrency}
             for n in systems if n != LLAMA}
    command = " ".join(["python benchmarks/bench_served_ramp.py", *sys.argv[1:]])
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "served_ramp.json"), "w") as f:
        json.dump({"command": command, "machine": machine(), "llama_command": args.llama_command,
                   "rounds": rounds, "median_tok_s": median, "median_ratio_to_llama": ratio}, f, indent=1)
    cs = args.concurrency
    lines = ["# Served output tokens/s vs llama-server (interleaved rounds, medians)", "",
             f"- command: `{command}`", f"- machine: {machine()}",
             f"- llama.cpp: `{args.llama_command}`",
             f"- {args.rounds} rounds, the order of the systems reversed every other round; short-chat prompts "
             f"(~100 tokens), outputs capped at {args.max_tokens}; OpenAI SSE client on the same 2 cores", "",
             "| system | " + " | ".join(f"tok/s @{c} (median)" for c in cs) + " | "
             + " | ".join(f"vs llama-server @{c}" + (f" (aim >= {AIMS[c]}x)" if c in AIMS else "") for c in cs)
             + " |", "|---|" + "---|" * (2 * len(cs))]
    for n in systems:
        cells = [f"{median[n][c]:.1f}" for c in cs]
        cells += [f"**{ratio[n][c]:.2f}x**" if n != LLAMA else "-" for c in cs]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines += ["", "Each round (tok/s; a failed request, counted as no tokens, is named):", "",
              "| round | system | " + " | ".join(f"@{c}" for c in cs) + " |", "|---|---|" + "---|" * len(cs)]
    for k, r in enumerate(rounds):
        for n, got in r.items():
            lines.append(f"| {k + 1} | {n} | " + " | ".join(
                f"{got[c]:.1f}" + (f" ({got[f'failed@{c}']} failed)" if f"failed@{c}" in got else "") for c in cs)
                + " |")
    with open(os.path.join(args.out, "served_ramp.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    log("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
