"""Where one stream's time goes: TTFT, the first inter-token gap, the steady gap, per system.

    python benchmarks/stream_timeline.py [--systems disaggregated+int4,llama] [--requests 16] [--max-tokens 64]

One request at a time (compare.py's short-chat prompts, outputs capped at ``--max-tokens``, after 2
untimed requests), OpenAI SSE from this process, for each system in turn (compare.py's ``SYSTEMS``;
``llama`` is llama.cpp's ``llama-server`` when built). Printed per system, medians over the requests:
output tok/s over the run, TTFT, the gap from the first token to the second (the KV handoff to the
decode worker), the median gap after it (the decode step, served), the last token to the end of the
stream, and the end of one request to the send of the next. The figures of one run compare with each
other only (this machine's speed moves by tens of percent from hour to hour). Prints; writes nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
from dataclasses import replace

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_served_ramp import LLAMA, served  # noqa: E402
from compare import SYSTEMS, log  # noqa: E402


def summary(name: str, recs) -> str:
    recs = [r for r in recs if r.ok]
    if not recs:
        return f"{name}: no request succeeded"
    ms = lambda xs: f"{np.median(xs) * 1e3:.1f} ms" if xs else "-"  # noqa: E731
    toks = sum(r.output_tokens for r in recs)
    return (f"{name}: {toks / (recs[-1].end - recs[0].send):.1f} tok/s, {toks / len(recs):.1f} tokens a request; "
            f"TTFT {ms([r.ttft for r in recs])}, first gap {ms([r.gaps[0] for r in recs if r.gaps])}, "
            f"steady gap {ms([statistics.median(r.gaps[1:]) for r in recs if len(r.gaps) > 2])}, "
            f"last token to end {ms([r.end - r.token_times[-1] for r in recs])}, "
            f"end to next send {ms([b.send - a.end for a, b in zip(recs, recs[1:])])}")


async def one_stream(client, args, tokenizer, ids):
    from splitserve.bench.runner import run_concurrency
    from splitserve.bench.workload import WORKLOADS
    workload = WORKLOADS["short_chat"]
    await run_concurrency(client, workload.specs(2, np.random.default_rng(0), tokenizer, ids), 1,
                          request_timeout_s=180, progress=False)
    specs = [replace(s, max_tokens=min(s.max_tokens, args.max_tokens))
             for s in workload.specs(args.requests, np.random.default_rng(1), tokenizer, ids)]
    recs = await run_concurrency(client, specs, 1, request_timeout_s=180, progress=False)
    await client.close()
    return recs


def run(name: str, args, tokenizer, ids):
    from splitserve.bench.clients import OpenAIClient
    with served(LLAMA if name == "llama" else name, args) as url:
        return asyncio.run(one_stream(OpenAIClient(url, "smollm2"), args, tokenizer, ids))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--systems", default="disaggregated+int4,llama",
                    help=f"comma-separated, of llama, {', '.join(SYSTEMS)}")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--llama-server", default=None, help="path of llama-server (default: .llamacpp/build/bin/)")
    args = ap.parse_args()
    systems = args.systems.split(",")
    unknown = [n for n in systems if n != "llama" and n not in SYSTEMS]
    if unknown:
        ap.error(f"--systems: unknown {unknown}; allowed: llama, {', '.join(SYSTEMS)}")
    from splitserve.bench.workload import corpus_text
    from splitserve.engine.tokenizer import load_tokenizer
    tokenizer = load_tokenizer(None)
    ids = tokenizer.encode(corpus_text())
    for i, name in enumerate(systems):
        log(f"[{i + 1}/{len(systems)}] {name} ...")
        print(summary(name, run(name, args, tokenizer, ids)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
