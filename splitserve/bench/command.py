"""``splitserve bench``: drive a running server and report.

    splitserve bench --url 127.0.0.1:9000 --protocol kserve --workload short_chat --rate 2 --duration 60
    splitserve bench --url http://127.0.0.1:8000/v1 --protocol openai --workload mixed --rates 0.5,1,2,4
    splitserve bench --url ... --concurrency 1,2,4,8,16,32          (the ramp: closed loop)

One rate: a summary (throughput, P50/P90/P99 TTFT / TPOT / ITL / E2E, SLO
attainment). Several rates: a sweep, each rate a fresh schedule, and the
goodput (highest rate with >= 90% of requests meeting both SLOs), refined by
bisection. Writes ``bench.json`` and PNG plots (latency CDFs, attainment vs
rate) into ``--out``.
"""

from __future__ import annotations

import asyncio
import os
import sys

import numpy as np

from splitserve.bench import metrics, report
from splitserve.bench.runner import run_concurrency, run_open_loop
from splitserve.bench.workload import WORKLOADS, corpus_text


def add_args(sub) -> None:
    p = sub.add_parser("bench", help="load-test a running splitserve (or any KServe/OpenAI) server")
    p.add_argument("--url", required=True, help="host:port for kserve, http://host:port/v1 for openai")
    p.add_argument("--protocol", default="kserve", choices=["kserve", "openai"])
    p.add_argument("--model", default="smollm2", help="the model name the server serves")
    p.add_argument("--workload", default="short_chat", choices=sorted(WORKLOADS))
    g = p.add_mutually_exclusive_group()
    g.add_argument("--rate", type=float, default=None, help="requests/s (open loop)")
    g.add_argument("--rates", default=None, help="comma-separated rates: a sweep and the goodput")
    g.add_argument("--concurrency", default=None, help="comma-separated in-flight counts (closed loop)")
    p.add_argument("--burstiness", type=float, default=1.0, help="CV of inter-arrival gaps (1 = Poisson)")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of arrivals per rate")
    p.add_argument("--requests", type=int, default=32, help="requests per concurrency level (closed loop)")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of arrivals not counted")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slo-ttft", type=float, default=2.0, help="seconds")
    p.add_argument("--slo-tpot", type=float, default=0.1, help="seconds per output token")
    p.add_argument("--max-tokens", type=int, default=None, help="cap every request's output length")
    p.add_argument("--tokenizer-model", default=None, help="model whose tokenizer sizes the prompts")
    p.add_argument("--timeout", type=float, default=300.0, help="per-request limit, seconds")
    p.add_argument("--out", default="bench-results")
    p.add_argument("--no-progress", action="store_true")


def load_text_tokenizer(path: str | None):
    from splitserve.engine.tokenizer import load_tokenizer
    return load_tokenizer(path)


def corpus_ids(tokenizer) -> list[int]:
    return tokenizer.encode(corpus_text())


def _cap(args, specs):
    if not args.max_tokens:
        return specs
    from dataclasses import replace
    return [replace(s, max_tokens=min(s.max_tokens, args.max_tokens)) for s in specs]


async def _open_loop(args, client, tokenizer, ids, rate: float, seed: int):
    specs = _cap(args, WORKLOADS[args.workload].schedule(rate, args.duration + args.warmup, seed, tokenizer, ids,
                                                         cv=args.burstiness))
    return await run_open_loop(client, specs, args.warmup, args.timeout, progress=not args.no_progress)


def run(args) -> int:
    from splitserve.bench.clients import make_client

    tokenizer = load_text_tokenizer(args.tokenizer_model)
    ids = corpus_ids(tokenizer)
    os.makedirs(args.out, exist_ok=True)
    config = {k: v for k, v in vars(args).items() if k not in ("func",)}

    async def main():
        client = make_client(args.protocol, args.url, args.model)
        try:
            if args.concurrency:
                levels = [int(x) for x in args.concurrency.split(",")]
                results = {}
                for c in levels:
                    specs = _cap(args, WORKLOADS[args.workload].specs(
                        args.requests, np.random.default_rng(args.seed + c), tokenizer, ids))
                    recs = await run_concurrency(client, specs, c, args.timeout, progress=not args.no_progress)
                    results[c] = (metrics.summarize(recs, args.slo_ttft, args.slo_tpot), recs)
                return {"concurrency": results}
            if args.rates:
                sweep, records = {}, {}

                async def measure(rate):
                    recs = await _open_loop(args, client, tokenizer, ids, rate, args.seed)
                    records[rate] = recs
                    sweep[rate] = metrics.summarize(recs, args.slo_ttft, args.slo_tpot)
                    return sweep[rate]["slo_attainment"]

                rates = [float(x) for x in args.rates.split(",")]
                good, seen = await metrics.search_goodput(measure, rates)
                return {"sweep": sweep, "records": records, "attainment": seen, "goodput": good}
            recs = await _open_loop(args, client, tokenizer, ids, args.rate or 1.0, args.seed)
            return {"single": (metrics.summarize(recs, args.slo_ttft, args.slo_tpot), recs)}
        finally:
            await client.close()

    result = asyncio.run(main())
    return _report(args, config, result)


def _report(args, config, result) -> int:
    path = os.path.join(args.out, "bench.json")
    if "single" in result:
        summary, recs = result["single"]
        report.write_json(path, config, summary, recs)
        report.plot_cdfs(os.path.join(args.out, "latency_cdf.png"), {f"{args.rate or 1.0} req/s": recs})
        print(format_summary(summary))
    elif "sweep" in result:
        last = max(result["records"])
        report.write_json(path, config, result["sweep"][last], result["records"][last],
                          sweep={"attainment": result["attainment"], "goodput": result["goodput"],
                                 "summaries": result["sweep"]})
        report.plot_cdfs(os.path.join(args.out, "latency_cdf.png"),
                         {f"{r} req/s": recs for r, recs in sorted(result["records"].items())})
        report.plot_sweep(os.path.join(args.out, "slo_attainment.png"), {args.protocol: result["attainment"]},
                          {args.protocol: result["goodput"]})
        for rate, s in sorted(result["sweep"].items()):
            print(f"--- {rate} req/s ---\n{format_summary(s)}")
        print(f"goodput: {result['goodput']:.3f} req/s (>= 90% meet TTFT <= {args.slo_ttft}s and "
              f"TPOT <= {args.slo_tpot}s)")
    else:
        levels = result["concurrency"]
        all_recs = [r for _, recs in levels.values() for r in recs]
        report.write_json(path, config, {str(c): s for c, (s, _) in levels.items()}, all_recs)
        report.plot_cdfs(os.path.join(args.out, "latency_cdf.png"),
                         {f"{c} in flight": recs for c, (_, recs) in levels.items()})
        for c, (s, _) in levels.items():
            print(f"--- {c} in flight ---\n{format_summary(s)}")
    print(f"results: {path}", file=sys.stderr)
    return 0


def format_summary(s: dict) -> str:
    def ms(d):
        return " / ".join("-" if v is None else f"{v * 1000:.0f}" for v in d.values())
    return (f"requests {s['num_requests']} (errors {s['num_errors']}), {s['request_throughput']:.2f} req/s, "
            f"{s['output_token_throughput']:.1f} output tok/s\n"
            f"TTFT p50/p90/p99 ms: {ms(s['ttft_s'])}   TPOT: {ms(s['tpot_s'])}   ITL: {ms(s['itl_s'])}   "
            f"E2E: {ms(s['e2e_s'])}\nSLO attainment: {s['slo_attainment']:.1%}")

