"""One workload set against every system we compare with, on the same 2 cores, in one run.

    python benchmarks/compare.py [--duration 20] [--rates 0.5,1,2,3] [--quick]

Systems: splitserve disaggregated (prefill + decode actors, 1 thread each);
splitserve colocated with chunked prefill and without (one engine, 2 threads);
llama.cpp's C++ ``llama-server`` on the same GGUF with parallel slots and
continuous batching, when built (``scripts/build_llamacpp.sh`` builds it from the
llama.cpp sources in the ``llama-cpp-python`` sdist; or pass ``--llama-server
PATH``; ``pip install 'llama-cpp-python[server]'``'s Python server is used
as a fallback, though it has no parallel slots; skipped with a message when
neither is there); transformers generate as an offline batch (the floor:
throughput only). ``disaggregated+int4`` is the disaggregated system with an
int4 decode pool (``--quantization`` per pool; prefill stays unquantized); ``colocated+int4`` is
one engine of 2 threads with int4 weights for both phases (chunked prefill), the
shape of llama-server's process.

Workloads: (a) short chat, (b) mixed (short chats with 1-2k-token prompts among
them), at a rate sweep each (goodput under the SLOs, P99 TPOT); (c) a
concurrency ramp 1 -> 32 (served output tokens/s). Writes
``benchmarks/results/compare.md``, ``compare.json`` and PNG plots.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import socket
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SYSTEMS = {
    "disaggregated": dict(mode="disaggregated", prefill=dict(threads=1, max_num_batched_tokens=512),
                          decode=dict(threads=1)),
    "colocated+chunked": dict(mode="colocated", decode=dict(threads=2, max_num_batched_tokens=512)),
    "colocated": dict(mode="colocated", decode=dict(threads=2, chunked_prefill=False)),
    "disaggregated+int4": dict(mode="disaggregated", prefill=dict(threads=1, max_num_batched_tokens=512),
                               decode=dict(threads=1, quantization="int4")),
    # the prompt pass on int8 weights too: its linears run the VNNI kernel (int8 activations), ~1.6x fp32's prefill
    "disaggregated+int4+int8prefill": dict(mode="disaggregated",
                                           prefill=dict(threads=1, max_num_batched_tokens=512, quantization="int8"),
                                           decode=dict(threads=1, quantization="int4")),
    "colocated+int4": dict(mode="colocated", decode=dict(threads=2, max_num_batched_tokens=512, quantization="int4")),
    # the prefill worker on both cores (Ray told of 3 CPUs): it computes while the decode worker waits for it
    "disaggregated+int4+prefill2t": dict(mode="disaggregated", num_cpus=3,
                                         prefill=dict(threads=2, max_num_batched_tokens=512),
                                         decode=dict(threads=1, quantization="int4")),
    # the decode worker on both cores (Ray told of 3 CPUs): at one stream it shares them with the front door
    "disaggregated+int4+decode2t": dict(mode="disaggregated", num_cpus=3,
                                        prefill=dict(threads=1, max_num_batched_tokens=512),
                                        decode=dict(threads=2, quantization="int4")),
    # the int4 system with bf16 activations and KV, the default before float32 became it on CPUs without AMX
    "disaggregated+int4+bf16": dict(mode="disaggregated", dtype="bfloat16",
                                    prefill=dict(threads=1, max_num_batched_tokens=512),
                                    decode=dict(threads=1, quantization="int4")),
}
NAMES = {"short_chat": "(a) short chat", "mixed": "(b) mixed"}
LLAMA_SLOTS = 32  # llama-server --parallel: one slot per stream up to the ramp's top concurrency


def server_config(spec: dict):
    """The ServeConfig of one entry of ``SYSTEMS``, on free ports."""
    from splitserve.platform.config import PoolConfig, ServeConfig
    return ServeConfig(mode=spec["mode"], dtype=spec.get("dtype", "auto"), http_port=_free_port(),
                       grpc_port=_free_port(), max_queue_wait_s=60,
                       prefill=PoolConfig(**spec.get("prefill", {})), decode=PoolConfig(**spec.get("decode", {})))


def run_splitserve(name: str, spec: dict, workloads, args, tokenizer, ids) -> dict:
    import ray
    from splitserve.bench import metrics
    from splitserve.bench.clients import OpenAIClient
    from splitserve.bench.runner import run_concurrency, run_open_loop
    from splitserve.platform.server import start_server

    log(f"[{name}] starting ...")
    srv = start_server(server_config(spec), num_cpus=2, log=lambda m: None)
    try:
        return drive(name, OpenAIClient(srv.endpoints["openai"], "smollm2"), workloads, args, tokenizer, ids,
                     metrics, run_open_loop, run_concurrency)
    finally:
        srv.shutdown()
        if ray.is_initialized():
            ray.shutdown()


def drive(name, client, workloads, args, tokenizer, ids, metrics, run_open_loop, run_concurrency) -> dict:
    from dataclasses import replace
    from splitserve.bench.workload import WORKLOADS

    out = {}

    async def main():
        for wl in workloads:
            attain, summaries, records = {}, {}, {}
            for rate in args.rates:
                specs = WORKLOADS[wl].schedule(rate, args.duration + args.warmup, args.seed, tokenizer, ids)
                specs = [replace(s, max_tokens=min(s.max_tokens, args.max_tokens)) for s in specs]
                recs = await run_open_loop(client, specs, args.warmup, request_timeout_s=180, progress=False)
                summaries[rate] = metrics.summarize(recs, args.slo_ttft, args.slo_tpot)
                summaries[rate]["num_long_prompts"] = sum(r.kind == "long_prompt" for r in recs)
                attain[rate], records[rate] = summaries[rate]["slo_attainment"], recs
                s = summaries[rate]
                log(f"[{name}] {wl} @ {rate} req/s: attainment {s['slo_attainment']:.0%}, P99 TTFT "
                    f"{_ms(s['ttft_s']['p99'])}, P99 TPOT {_ms(s['tpot_s']['p99'])}, errors {s['num_errors']}")
                if s["slo_attainment"] < 0.5:
                    break  # far past the knee: higher rates only queue up
            out[wl] = {"attainment": attain, "goodput": metrics.goodput(attain), "summaries": summaries,
                       "records": records}
        ramp = {}
        rng = np.random.default_rng(args.seed)
        for c in args.concurrency:
            specs = WORKLOADS["short_chat"].specs(max(c * 2, 8), rng, tokenizer, ids)
            specs = [replace(s, max_tokens=min(s.max_tokens, args.max_tokens)) for s in specs]
            t = time.monotonic()
            recs = await run_concurrency(client, specs, c, request_timeout_s=180, progress=False)
            ramp[c] = sum(r.output_tokens for r in recs if r.ok) / (time.monotonic() - t)
            log(f"[{name}] ramp @{c}: {ramp[c]:.1f} output tok/s")
        out["ramp"] = ramp
        await client.close()

    asyncio.run(main())
    return out


def _ms(v) -> str:
    return "-" if v is None else f"{v * 1000:.0f} ms"


def llama_server_command(args, port: int, slots: int = LLAMA_SLOTS) -> list[str] | None:
    from splitserve.engine.default_model import default_model_path
    binary = args.llama_server or os.path.join(os.path.dirname(HERE), ".llamacpp", "build", "bin", "llama-server")
    if os.path.exists(binary):  # the C++ server: parallel slots, continuous batching
        return [binary, "-m", default_model_path(), "-t", "2", "--parallel", str(slots), "-cb",
                "-c", str(slots * 2304), "--host", "127.0.0.1", "--port", str(port), "--alias", "smollm2",
                "--no-webui"]
    if importlib.util.find_spec("llama_cpp") is not None:  # llama-cpp-python's server: one sequence at a time
        log("[llama.cpp] C++ llama-server not built; using llama-cpp-python's server (no parallel slots)")
        return [sys.executable, "-m", "llama_cpp.server", "--model", default_model_path(), "--n_threads", "2",
                "--host", "127.0.0.1", "--port", str(port), "--model_alias", "smollm2", "--n_ctx", "4096"]
    return None


def wait_for_llama(port: int, timeout_s: float = 60.0) -> None:
    """Until llama-server on ``port`` answers /v1/models (it loads the model first)."""
    import urllib.request
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=1)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"llama-server on port {port} did not answer within {timeout_s:.0f} s")
            time.sleep(0.5)


def run_llama_cpp(workloads, args, tokenizer, ids) -> dict | None:
    import subprocess
    from splitserve.bench import metrics
    from splitserve.bench.clients import OpenAIClient
    from splitserve.bench.runner import run_concurrency, run_open_loop
    port = _free_port()
    command = llama_server_command(args, port)
    if command is None:
        log("[llama.cpp] not built: skipped (scripts/build_llamacpp.sh builds llama-server from the "
            "llama-cpp-python sdist, or pip install 'llama-cpp-python[server]')")
        return None
    args.llama_command = " ".join(command[:1] + [c for c in command[1:] if c != str(port)])
    log(f"[llama.cpp] starting {command[0]} ...")
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_llama(port)
        return drive("llama.cpp", OpenAIClient(f"http://127.0.0.1:{port}/v1", "smollm2"), workloads, args,
                     tokenizer, ids, metrics, run_open_loop, run_concurrency)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def run_transformers_floor(args, tokenizer, ids) -> dict:
    """Offline batch generate of the short-chat prompts: output tokens/s (no latency figures)."""
    import torch
    from transformers import AutoModelForCausalLM
    from splitserve.bench.workload import WORKLOADS
    from splitserve.engine.default_model import default_model_path
    torch.set_num_threads(2)
    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                 dtype=torch.float32).eval()
    specs = WORKLOADS["short_chat"].specs(32, np.random.default_rng(args.seed), tokenizer, ids)
    n = min(s.prompt_tokens for s in specs)
    batch = torch.tensor([tokenizer.encode(s.prompt)[:n] for s in specs])  # equal lengths: no padding
    new = args.max_tokens
    t = time.monotonic()
    with torch.no_grad():
        model.generate(batch, attention_mask=torch.ones_like(batch), max_new_tokens=new, min_new_tokens=new,
                       do_sample=False)
    tps = batch.shape[0] * new / (time.monotonic() - t)
    log(f"[transformers] offline batch of {batch.shape[0]}: {tps:.1f} output tok/s")
    return {"offline_batch32_tok_s": tps}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rates", default="0.5,1,2,3")
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--concurrency", default="1,4,16,32")
    ap.add_argument("--max-tokens", type=int, default=64, help="cap on output tokens per request")
    ap.add_argument("--slo-ttft", type=float, default=2.0)
    ap.add_argument("--slo-tpot", type=float, default=0.15)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--render-from", default=None, help="re-render compare.md from an earlier compare.json")
    ap.add_argument("--llama-server", default=None, help="path of llama.cpp's llama-server "
                                                         "(default: .llamacpp/build/bin/llama-server)")
    ap.add_argument("--no-llama", action="store_true", help="skip llama.cpp")
    ap.add_argument("--workloads", default="short_chat,mixed")
    ap.add_argument("--no-floor", action="store_true", help="skip transformers' offline batch (the floor)")
    args = ap.parse_args()
    if args.render_from:
        with open(args.render_from) as f:
            render(json.load(f), args.out)
        return 0
    args.rates = [float(x) for x in args.rates.split(",")]
    args.concurrency = [int(x) for x in args.concurrency.split(",") if x.strip() and x != "none"]
    from splitserve.bench import report
    from splitserve.bench.workload import corpus_text
    from splitserve.engine.tokenizer import load_tokenizer
    tokenizer = load_tokenizer(None)
    ids = tokenizer.encode(corpus_text())
    workloads = args.workloads.split(",")
    results = {}
    for name in args.systems.split(","):
        results[name] = run_splitserve(name, SYSTEMS[name], workloads, args, tokenizer, ids)
    llama = None if args.no_llama else run_llama_cpp(workloads, args, tokenizer, ids)
    if llama:
        results["llama.cpp"] = llama
    floor = None if args.no_floor else run_transformers_floor(args, tokenizer, ids)
    write(args, results, floor, report)
    return 0


def write(args, results, floor, report) -> None:
    os.makedirs(args.out, exist_ok=True)
    for wl in args.workloads.split(","):
        report.plot_sweep(os.path.join(args.out, f"compare_{wl}_attainment.png"),
                          {n: r[wl]["attainment"] for n, r in results.items()},
                          {n: r[wl]["goodput"] for n, r in results.items()})
        common = max(min(r[wl]["records"]) for r in results.values())
        report.plot_cdfs(os.path.join(args.out, f"compare_{wl}_cdf.png"),
                         {n: r[wl]["records"].get(common, []) for n, r in results.items()})
    command = "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])
    slim = {n: {wl: {k: v for k, v in r[wl].items() if k != "records"} if wl != "ramp" else r[wl]
                for wl in r} for n, r in results.items()}
    doc = {"command": command, "args": {k: v for k, v in vars(args).items() if k != "render_from"},
           "results": slim, "transformers": floor}
    with open(os.path.join(args.out, "compare.json"), "w") as f:
        json.dump(doc, f, indent=1, default=str)
    render(doc, args.out)


def render(doc: dict, out: str) -> None:
    """compare.md from compare.json (so the table can be re-rendered without re-running)."""
    from bench_engine import machine
    a, results = doc["args"], doc["results"]
    workloads = [w for w in ("short_chat", "mixed") if all(w in r for r in results.values())]
    has_ramp = all(r.get("ramp") for r in results.values())
    ramps = {n: {int(c): v for c, v in r.get("ramp", {}).items()} for n, r in results.items()}  # JSON keys: strings
    levels = sorted({c for ramp in ramps.values() for c in ramp})  # the concurrencies that ran
    rates = sorted({float(k) for r in results.values() for k in r.get("mixed", {}).get("summaries", {})})
    common = [x for x in rates if all(x in {float(k) for k in r["mixed"]["summaries"]} for r in results.values())]

    def at(r, rate, metric):
        s = {float(k): v for k, v in r["mixed"]["summaries"].items()}[rate]
        return s[metric]["p99"]

    base = results.get("colocated")
    lines = ["# splitserve vs the alternatives, same 2 cores, one run", "",
             f"- command: `{doc['command']}`", f"- machine: {machine()}",
             f"- SLOs: TTFT <= {a['slo_ttft']} s and TPOT <= {a['slo_tpot']} s; goodput = highest swept rate at "
             f"which it and every lower rate have >= 90% of requests meeting both; rates swept: {a['rates']} "
             f"req/s, {a['duration']:.0f} s each after {a['warmup']:.0f} s warm-up; outputs capped at "
             f"{a['max_tokens']} tokens; OpenAI SSE client running on the same 2 cores as the server",
             "- llama.cpp: " + (f"`{a.get('llama_command', 'llama-server')}` (prompt text sent as-is, OpenAI "
                                f"completions with SSE)" if "llama.cpp" in results else
                                "not installed here, skipped (see README for the optional install)"), "",
             "## Goodput and served throughput", "",
             "| system | " + " | ".join(f"goodput {NAMES[w]}" for w in workloads) +
             (f" | served output tok/s, ramp {' / '.join(f'@{c}' for c in levels)} |" if has_ramp else " |"),
             "|---|" + "---|" * (len(workloads) + has_ramp)]
    for n, r in results.items():
        cells = [f"{r[w]['goodput']:.2f} req/s" for w in workloads]
        if has_ramp:
            cells.append(" / ".join(f"{ramps[n][c]:.0f}" if c in ramps[n] else "-" for c in levels))
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    llama = results.get("llama.cpp")
    if llama and has_ramp:
        at16 = lambda r: r["ramp"].get(16, r["ramp"].get("16"))  # noqa: E731 (JSON keys are strings)
        lines += ["", "Served output tokens/s at 16 concurrent streams, against llama.cpp's server (issue 15's aim: "
                      ">= 1.5x): " +
                  ", ".join(f"{n} **{at16(r) / at16(llama):.2f}x**" for n, r in results.items() if n != "llama.cpp")]
    if doc.get("transformers"):
        lines += ["", f"transformers offline batch generate, 32 prompts x {a['max_tokens']} tokens (the floor, no "
                      f"latency figures): {doc['transformers']['offline_batch32_tok_s']:.1f} output tok/s"]
    if not common:
        lines += ["", "(workload (b) not run)"]
    lines += _mixed_table(results, common, at, base) if common else []
    lines += ["", "Plots: " + ", ".join(f"`compare_{w}_attainment.png`" for w in workloads) + " (SLO attainment "
                  "vs rate), " + ", ".join(f"`compare_{w}_cdf.png`" for w in workloads) + " (latency CDFs at a "
                  "common rate). Raw figures: `compare.json`.", ""]
    text = "\n".join(lines)
    with open(os.path.join(out, "compare.md"), "w") as f:
        f.write(text)
    print(text)


def _mixed_table(results: dict, common: list, at, base) -> list[str]:
    """Workload (b)'s P99 TPOT and TTFT at every rate all systems ran."""
    first = {float(k): v for k, v in next(iter(results.values()))["mixed"]["summaries"].items()}
    longs = {x: first[x].get("num_long_prompts") for x in common}
    counts = {x: first[x]["num_requests"] for x in common}
    lines = ["", "## Workload (b), mixed: P99 latencies at each rate every system ran", "",
              "Requests counted at each rate (after warm-up), and how many of them had a 1-2k-token prompt: " +
              ", ".join(f"{x} req/s: {counts[x]} ({longs[x] if longs[x] is not None else '?'} long)"
                        for x in common), "",
              "| system | " + " | ".join(f"P99 TPOT @ {x} req/s" for x in common) + " | " +
              " | ".join(f"P99 TTFT @ {x} req/s" for x in common) + " |",
              "|---|" + "---|" * (2 * len(common))]
    for n, r in results.items():
        tpot = []
        for x in common:
            v = at(r, x, "tpot_s")
            ratio = f" ({v / at(base, x, 'tpot_s'):.2f}x colocated)" if base and n != "colocated" else ""
            tpot.append(f"{_ms(v)}{ratio}")
        lines.append(f"| {n} | " + " | ".join(tpot) + " | " + " | ".join(_ms(at(r, x, "ttft_s")) for x in common)
                     + " |")
    return lines


if __name__ == "__main__":
    sys.exit(main())
