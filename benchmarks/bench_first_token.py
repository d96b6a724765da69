"""Time to first token: the first token sent while the KV moves, and the KV sent layer by layer during
the prefill, each against the baseline, in one run.

    python benchmarks/bench_first_token.py [--lengths 128,512,1024,2048] [--repeats 5] [--rounds 1]

Four servers, one after the other on the same cores (real Ray, 1 prefill and 1 decode actor of 1
thread each, the real SmolLM2 in the machine's default dtype):

  after     the baseline: the KV goes once the prefill is done, and the first token once it has moved
            and the decode worker committed (``early_first_token: false, kv_layer_overlap: false``)
  early     the first token goes out once a decode worker holds room (``early_first_token: true``)
  overlap   each layer's KV goes while the next layers compute (``kv_layer_overlap: true``); the first
            token still waits for the commit, so TTFT shows what the overlap saves
  default   both (the defaults)

A server's start moves this machine's speed by as much as the effects, so ``--rounds R`` runs every
mode R times, the order reversed each round (A B C D, D C B A, ...), and pools the repeats.
One streamed OpenAI request at a time (4 output tokens), the lengths interleaved; TTFT is from the
request leaving the client to its first streamed token. Reported per prompt length and mode: the
median TTFT, its ratio to the baseline's, the prefill worker's median transfer time left after the
prefill (all of it without overlap; the tail and the commit with it), and the median gap from the first
streamed token to the second (with the early first token, that gap holds what is left of the transfer). Writes
benchmarks/results/first_token.md and first_token.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_engine import corpus_tokens, machine  # noqa: E402
from bench_migration import free_port  # noqa: E402

MODES = {"after": (False, False), "early": (True, False), "overlap": (False, True), "default": (True, True)}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def ttft(client, model: str, prompt: str) -> tuple[float, float | None]:
    """(seconds to the first streamed token, seconds from it to the second; None when both came in one
    chunk)."""
    start = time.perf_counter()
    stream = client.completions.create(model=model, prompt=prompt, max_tokens=4, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    times = []
    with stream:
        for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                times.append(time.perf_counter() - start)
    if not times:
        raise RuntimeError("the stream gave no text")
    return times[0], (times[1] - times[0] if len(times) > 1 else None)


def transfer_seconds(server) -> list[float]:
    """The prefill workers' KV transfer times in their signal window (seconds, one per request)."""
    import ray
    out = []
    for m in server.pools.view().members:
        if m.pool == "prefill":
            series = ray.get(m.handle.signals.remote()).get("series", {})
            out += [v for _, v in series.get("transfer_s", ())]
    return out


def run_mode(mode: str, prompts: dict, repeats: int) -> dict:
    import openai
    from splitserve.platform.config import PoolConfig, ServeConfig
    from splitserve.platform.server import start_server

    cfg = ServeConfig(model_name="smollm2", http_port=free_port(), grpc_port=free_port(), max_queue_wait_s=120,
                      early_first_token=MODES[mode][0], kv_layer_overlap=MODES[mode][1],
                      prefix_caching=False,  # repeats: each prompt computed
                      prefill=PoolConfig(threads=1, kv_cache_memory_mb=256),
                      decode=PoolConfig(threads=1, kv_cache_memory_mb=256))
    log(f"[{mode}] starting the server (1 prefill, 1 decode actor) ...")
    server = start_server(cfg, num_cpus=4, log=lambda m: log(f"[{mode}] {m}"))
    client = openai.OpenAI(base_url=server.endpoints["openai"], api_key="unused", max_retries=0, timeout=600)
    rows = {n: {"ttft_s": [], "gap_s": [], "transfer_s": []} for n in prompts}
    try:
        ttft(client, "smollm2", prompts[min(prompts)])  # warm-up
        for rep in range(repeats):
            for n, prompt in prompts.items():
                before = len(transfer_seconds(server))
                first, gap = ttft(client, "smollm2", prompt)
                rows[n]["ttft_s"].append(first)
                rows[n]["gap_s"] += [gap] if gap is not None else []
                rows[n]["transfer_s"] += transfer_seconds(server)[before:]
                log(f"[{mode}] {rep + 1}/{repeats} {n} tokens: TTFT {rows[n]['ttft_s'][-1] * 1e3:.0f} ms")
    finally:
        server.shutdown()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default="128,512,1024,2048")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=1, help="each mode's server this many times, the order "
                                                          "reversed each round")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args()
    from splitserve.engine.tokenizer import load_tokenizer
    tok = load_tokenizer(None)
    prompts = {int(n): tok.decode(corpus_tokens(tok.encode, int(n))) for n in args.lengths.split(",")}
    runs = {mode: {n: {"ttft_s": [], "gap_s": [], "transfer_s": []} for n in prompts} for mode in MODES}
    for r in range(args.rounds):
        for mode in (list(MODES) if r % 2 == 0 else list(MODES)[::-1]):
            log(f"round {r + 1}/{args.rounds}")
            for n, got in run_mode(mode, prompts, args.repeats).items():
                for key in got:
                    runs[mode][n][key] += got[key]
    command = " ".join(["python benchmarks/bench_first_token.py", *sys.argv[1:]])
    med = statistics.median
    table = []
    for n in prompts:
        row = {"prompt_tokens": len(tok.encode(prompts[n]))}
        for m in MODES:
            row[f"ttft_{m}_s"] = round(med(runs[m][n]["ttft_s"]), 4)
            row[f"ratio_{m}"] = round(row[f"ttft_{m}_s"] / row["ttft_after_s"], 3)
            row[f"transfer_{m}_s"] = round(med(runs[m][n]["transfer_s"]), 4) if runs[m][n]["transfer_s"] else None
            row[f"gap_{m}_s"] = round(med(runs[m][n]["gap_s"]), 4) if runs[m][n]["gap_s"] else None
        table.append(row)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "first_token.json"), "w") as f:
        json.dump({"command": command, "machine": machine(), "modes": MODES, "rows": table, "runs": runs}, f,
                  indent=1)
    ms = lambda v: f"{v * 1e3:.0f}" if v is not None else "-"  # noqa: E731
    lines = ["# First token while the KV moves", "", f"Command: `{command}`", "", f"Machine: {machine()}", "",
             f"One streamed request at a time, 4 output tokens; medians over {args.rounds} round(s) of "
             f"{args.repeats} repeats (each round a server per mode, the order reversed each round). *after*: "
             "the KV goes once the prefill is done, the first token once it has moved (the baseline); *early*: "
             "the first token goes out once a decode worker holds room; *overlap*: each layer's KV goes while the next "
             "layers compute, the first token after the commit; *default*: both. Ratios are TTFT over the "
             "baseline's (lower is better); *exposed transfer*: the prefill worker's transfer time left after "
             "the prefill.", "",
             "| prompt tokens | " + " | ".join(f"TTFT {m} ms" for m in MODES) + " | "
             + " | ".join(f"{m} / after" for m in list(MODES)[1:]) + " | "
             + " | ".join(f"exposed transfer {m} ms" for m in ("after", "overlap")) + " |",
             "|---" * (1 + len(MODES) + len(MODES) - 1 + 2) + "|"]
    for r in table:
        lines.append(f"| {r['prompt_tokens']} | " + " | ".join(ms(r[f"ttft_{m}_s"]) for m in MODES) + " | "
                     + " | ".join(f"{r[f'ratio_{m}']:.2f}" for m in list(MODES)[1:]) + " | "
                     + " | ".join(ms(r[f"transfer_{m}_s"]) for m in ("after", "overlap")) + " |")
    lines += ["", "From the first streamed token to the second (ms, medians): the decode worker's first step, "
                  "after the KV it needs has arrived.", "",
              "| prompt tokens | " + " | ".join(f"gap {m}" for m in MODES) + " |", "|---" * (1 + len(MODES)) + "|"]
    for r in table:
        lines.append(f"| {r['prompt_tokens']} | " + " | ".join(ms(r[f"gap_{m}_s"]) for m in MODES) + " |")
    with open(os.path.join(args.out, "first_token.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    log("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
