"""Time to first token with the first token sent while the KV moves, against sending it after, in one run.

    python benchmarks/bench_first_token.py [--lengths 128,512,1024,2048] [--repeats 5]

Two servers, one after the other on the same cores (real Ray, 1 prefill and 1 decode actor of 1
thread each, the real SmolLM2 in the machine's default dtype):

  early     the first token goes to the client once a decode worker holds room for the request
            (``early_first_token: true``, the default): the KV transfer overlaps the client's wait
  after     the baseline: the first token goes out once the KV has moved and the decode worker
            committed (``early_first_token: false``, how it worked before)

One streamed OpenAI request at a time (4 output tokens), the lengths interleaved; TTFT is from the
request leaving the client to its first streamed token. Reported per prompt length: the median
TTFT of each, their ratio (early / after), and the prefill worker's median KV transfer time over
the same requests. Writes benchmarks/results/first_token.md and first_token.json.
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

MODES = {"early": True, "after": False}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def ttft(client, model: str, prompt: str) -> float:
    start = time.perf_counter()
    stream = client.completions.create(model=model, prompt=prompt, max_tokens=4, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    first = None
    with stream:
        for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].text:
                first = time.perf_counter() - start
    if first is None:
        raise RuntimeError("the stream gave no text")
    return first


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
                      early_first_token=MODES[mode], prefix_caching=False,  # repeats: each prompt computed
                      prefill=PoolConfig(threads=1, kv_cache_memory_mb=256),
                      decode=PoolConfig(threads=1, kv_cache_memory_mb=256))
    log(f"[{mode}] starting the server (1 prefill, 1 decode actor) ...")
    server = start_server(cfg, num_cpus=4, log=lambda m: log(f"[{mode}] {m}"))
    client = openai.OpenAI(base_url=server.endpoints["openai"], api_key="unused", max_retries=0, timeout=600)
    rows = {n: {"ttft_s": [], "transfer_s": []} for n in prompts}
    try:
        ttft(client, "smollm2", prompts[min(prompts)])  # warm-up
        for rep in range(repeats):
            for n, prompt in prompts.items():
                before = len(transfer_seconds(server))
                rows[n]["ttft_s"].append(ttft(client, "smollm2", prompt))
                rows[n]["transfer_s"] += transfer_seconds(server)[before:]
                log(f"[{mode}] {rep + 1}/{repeats} {n} tokens: TTFT {rows[n]['ttft_s'][-1] * 1e3:.0f} ms")
    finally:
        server.shutdown()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default="128,512,1024,2048")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args()
    from splitserve.engine.tokenizer import load_tokenizer
    tok = load_tokenizer(None)
    prompts = {int(n): tok.decode(corpus_tokens(tok.encode, int(n))) for n in args.lengths.split(",")}
    runs = {mode: run_mode(mode, prompts, args.repeats) for mode in MODES}
    command = " ".join(["python benchmarks/bench_first_token.py", *sys.argv[1:]])
    med = statistics.median
    table = []
    for n in prompts:
        early, after = (med(runs[m][n]["ttft_s"]) for m in MODES)
        transfers = runs["early"][n]["transfer_s"] + runs["after"][n]["transfer_s"]
        table.append({"prompt_tokens": len(tok.encode(prompts[n])), "ttft_early_s": round(early, 4),
                      "ttft_after_s": round(after, 4), "ratio": round(early / after, 3),
                      "transfer_s": round(med(transfers), 4) if transfers else None})
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "first_token.json"), "w") as f:
        json.dump({"command": command, "machine": machine(), "rows": table, "runs": runs}, f, indent=1)
    lines = ["# First token while the KV moves", "", f"Command: `{command}`", "", f"Machine: {machine()}", "",
             "One streamed request at a time, 4 output tokens; medians over the repeats. *early*: the first "
             "token goes out once a decode worker holds room (the default); *after*: once the KV has moved "
             "(the baseline, `early_first_token: false`). Lower ratio is better.", "",
             "| prompt tokens | TTFT early ms | TTFT after ms | early / after | KV transfer ms |",
             "|---|---|---|---|---|"]
    for r in table:
        transfer = f"{r['transfer_s'] * 1e3:.0f}" if r["transfer_s"] is not None else "-"
        lines.append(f"| {r['prompt_tokens']} | {r['ttft_early_s'] * 1e3:.0f} | {r['ttft_after_s'] * 1e3:.0f} | "
                     f"{r['ratio']:.2f} | {transfer} |")
    with open(os.path.join(args.out, "first_token.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    log("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
