"""Speculative decoding on and off, in the same run on the same threads.

    python benchmarks/bench_speculative.py [--threads 2] [--repeats 3] [--quantization int4] [--max-tokens 128]
                                           [--proposers off,ngram,draft]

Workloads (chat template, greedy):
  (a) input-grounded: a passage of the offline corpus (standard-library docstrings) with an
      instruction to repeat / rewrite / extract from it, where n-gram lookup has text to copy;
  (b) open chat: questions with no passage.
For each: decode tokens/s of one request at a time (batch 1), and aggregate tokens/s of 8 and
32 requests at once, with ``speculative="off"``, ``"ngram"`` and ``"draft"`` (the target
itself quantized to int4 as the draft model); engines interleaved, medians of the repeats. Acceptance figures come from the engine's own metrics. Writes
``benchmarks/results/speculative.md`` and ``speculative.json``.
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

INSTRUCTIONS = ["Repeat the following text exactly as it is written:",
                "Rewrite the following text, keeping its sentences:",
                "Quote the first three sentences of the following text:",
                "Extract the key sentences of the following text, word for word:"]
OPEN = ["Tell me about your favourite season and why.", "What makes a good friend?",
        "Give me three ideas for a weekend trip.", "How do plants grow?", "Why do people enjoy music?",
        "Describe a busy city street in the morning.", "What should I cook for dinner tonight?",
        "Explain why exercise is good for health."]


def grounded_prompts(n: int) -> list[list[dict]]:
    from splitserve.bench.workload import corpus_text
    paragraphs = list(dict.fromkeys(p.strip() for p in corpus_text(0).split("\n\n") if 300 <= len(p.strip()) <= 700))
    return [[{"role": "user", "content": f"{INSTRUCTIONS[i % len(INSTRUCTIONS)]}\n\n{paragraphs[i * 5 % len(paragraphs)]}"}]
            for i in range(n)]


def open_prompts(n: int) -> list[list[dict]]:
    return [[{"role": "user", "content": OPEN[i % len(OPEN)]}] for i in range(n)]


def run(engine, prompts, concurrency: int, max_tokens: int) -> float:
    """Output tokens/s for ``prompts`` served ``concurrency`` at a time (a closed loop), prefill included."""
    from splitserve.engine.sampling_params import SamplingParams
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    pending, active, produced = list(prompts), set(), 0
    start = time.perf_counter()
    while pending or active:
        while pending and len(active) < concurrency:
            active.add(engine.add_request(messages=pending.pop(0), params=params))
        for out in engine.step():
            produced += len(out.new_token_ids)
            if out.finished:
                active.discard(out.request_id)
    return produced / (time.perf_counter() - start)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quantization", default="int4")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--proposers", default="off,ngram,draft")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args()
    import torch

    from bench_engine import machine
    from splitserve.engine.engine import LLMEngine
    torch.set_num_threads(args.threads)
    engines = {}
    proposers = args.proposers.split(",")
    if proposers[0] != "off":
        proposers.insert(0, "off")
    for spec in proposers:
        print(f"loading ({spec}) ...", file=sys.stderr)
        engines[spec] = LLMEngine(quantization=args.quantization, speculative=spec, num_threads=args.threads,
                                  kv_cache_memory=512 << 20, show_progress=False)
    cases = {("grounded", 1): grounded_prompts(4), ("open", 1): open_prompts(4),
             ("grounded", 8): grounded_prompts(8), ("open", 8): open_prompts(8),
             ("grounded", 32): grounded_prompts(32), ("open", 32): open_prompts(32)}
    for spec, e in engines.items():  # warm-up
        run(e, grounded_prompts(1), 1, 16)
    samples = {f"{w} @{c}": {p: [] for p in proposers} for w, c in cases}
    accept = {f"{w} @{c}": {p: [] for p in proposers[1:]} for w, c in cases}
    total, done = args.repeats * len(cases), 0
    for r in range(args.repeats):
        for (w, c), prompts in cases.items():
            key = f"{w} @{c}"
            for spec, e in engines.items():  # interleaved: off, on, off, on ...
                before = dict(e.spec_stats.as_dict())
                samples[key][spec].append(run(e, prompts, c, args.max_tokens))
                if spec != "off":
                    after = e.spec_stats.as_dict()
                    steps = after["spec_steps"] - before["spec_steps"]
                    prop = after["spec_proposed"] - before["spec_proposed"]
                    acc = after["spec_accepted"] - before["spec_accepted"]
                    accept[key][spec].append({"acceptance": acc / prop if prop else 0.0,
                                              "accepted_per_step": acc / steps if steps else 0.0,
                                              "verified_steps": steps})
            done += 1
            line = ", ".join(f"{p} {samples[key][p][-1]:.1f}" for p in proposers)
            print(f"[{done}/{total}] round {r + 1} {key}: {line} tok/s", file=sys.stderr)
    med = {k: {s: statistics.median(v) for s, v in d.items()} for k, d in samples.items()}
    command = "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])
    rows = ["| workload | concurrency | off tok/s | proposer | tok/s | ratio to off | acceptance | "
            "accepted drafts per verified step |", "|---|---|---|---|---|---|---|---|"]
    for key, m in med.items():
        w, c = key.split(" @")
        for p in proposers[1:]:
            a = accept[key][p][-1]
            rows.append(f"| {w} | {c} | {m['off']:.1f} | {p} | {m[p]:.1f} | **{m[p] / m['off']:.2f}x** | "
                        f"{a['acceptance']:.0%} | {a['accepted_per_step']:.2f} ({a['verified_steps']} steps) |")
    text = "\n".join([
        "# Speculative decoding: each proposer vs none (same run, same threads)", "",
        f"- command: `{command}`", f"- machine: {machine()}",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- model: SmolLM2-135M-Instruct, `--quantization {args.quantization}`, greedy, up to {args.max_tokens} "
        f"output tokens (EOS ends a request), chat template; prefill time included in tok/s",
        "- grounded: an instruction (repeat / rewrite / quote / extract) over a 300-700 character passage of the "
        "offline corpus; open: questions with no passage",
        f"- engine defaults: at most {engines[proposers[1]].spec_config.max_draft_tokens} drafts, speculation off "
        f"while more than {engines[proposers[1]].spec_config.max_batch} requests run; measured step costs (drafting "
        f"and verifying k drafts / one decode step, k = 0..): " +
        "; ".join(f"{p} {[round(x, 2) for x in engines[p].spec_config.step_costs]}" for p in proposers[1:]),
        "- draft = the target model itself quantized to int4 (self-draft): with an int4 target it is the same "
        "weights, so each draft token costs about a whole decode step and the adaptive policy mostly declines "
        "to draft",
        f"- medians of {args.repeats} interleaved repeats; acceptance from the engine's metrics (last repeat)", "",
        *rows, "", "Raw samples are in `speculative.json`.", ""])
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "speculative.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, "speculative.json"), "w") as f:
        json.dump({"command": command, "machine": machine(), "medians": med, "samples": samples,
                   "acceptance": accept}, f, indent=1)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
