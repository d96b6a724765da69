"""The GPU path beside torch's own in one run on one GPU: kernels, decode steps, tokens/s.

    python benchmarks/bench_gpu.py [--model FILE.gguf] [--repeats 20] [--no-hf] [--smoke]

Needs CUDA (exits with status 2 without it, unless ``--smoke``). Writes
``benchmarks/results/gpu.md`` and ``gpu.json`` naming the GPU:

* kernels: each of ours beside its baseline at the same shape, GB/s (bytes the
  op must move / median time) and time ratio (baseline / ours: > 1 = ours faster):
  int8 / int4 GEMV at 1 row vs cuBLAS bf16 on the dense weight; the GEMMs at
  128 rows; split-context paged decode attention vs SDPA over contiguous K/V
  (batch 1 and 32, contexts 512 and 4,096); add+RMSNorm, SiLU-and-mul vs torch.
* decode: our engine's step (SmolLM2, bf16) eager vs CUDA-graph replay at batch
  1 / 8 / 32 / 128, and the kernel choices its table made;
* tokens/s: our batch-1 and batch-32 decode beside transformers' static-cache
  ``generate`` compiled with ``torch.compile`` (``--no-hf`` skips it).

``--smoke`` runs every section at tiny shapes on CPU (Triton under its
interpreter, a tiny random model): it checks the script, its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def timed(fn, repeats: int) -> float:
    """Median seconds of ``fn()``: on a GPU its device time (the kernel table's timer)."""
    from splitserve.kernels.choice import wall_timer
    return wall_timer(fn, repeats)


def kernel_rows(device, repeats: int, smoke: bool) -> list[dict]:
    import torch
    import torch.nn.functional as F
    from splitserve.kernels.dispatch import triton_module
    from splitserve.kernels.quant import quantize_int4, quantize_int8
    gemv, w8, w4 = triton_module("gemv"), triton_module("w8_matmul"), triton_module("w4_matmul")
    paged, norm, silu = triton_module("paged_attention"), triton_module("rmsnorm"), triton_module("silu_mul")
    bf16 = torch.float16 if smoke else torch.bfloat16  # (the interpreter's bf16 dots are wrong)
    rows = []

    def row(kernel, shape, ours, base, nbytes, baseline):
        t_ours, t_base = timed(ours, repeats), timed(base, repeats)
        rows.append({"kernel": kernel, "shape": shape, "baseline": baseline, "ours_us": t_ours * 1e6,
                     "baseline_us": t_base * 1e6, "ours_GBps": nbytes / t_ours / 1e9,
                     "baseline_GBps": nbytes / t_base / 1e9, "ratio": t_base / t_ours})
        log(f"  {kernel} {shape}: {t_base / t_ours:.2f}x {baseline}")

    shapes = [(64, 128)] if smoke else [(4096, 14336), (14336, 4096), (1536, 576), (576, 1536)]
    for n, k in shapes:
        dense = torch.randn(n, k, device=device)
        q8, q4 = quantize_int8(dense), quantize_int4(dense, 32)
        wb = dense.to(bf16)
        for m in (1, 128) if not smoke else (1, 16):
            x = torch.randn(m, k, device=device).to(bf16)
            cublas = lambda x=x: F.linear(x, wb)  # noqa: E731
            if m <= 16:
                row("int8 GEMV", f"{m}x{n}x{k}", lambda x=x: gemv.launch_w8(x, q8), cublas, n * k + 4 * n,
                    "cuBLAS bf16")
                row("int4 GEMV", f"{m}x{n}x{k}", lambda x=x: gemv.launch_w4(x, q4), cublas, n * k // 2 + n * k // 4,
                    "cuBLAS bf16")
            row("int8 GEMM", f"{m}x{n}x{k}", lambda x=x: w8.launch(x, q8), cublas, n * k + 2 * m * (k + n),
                "cuBLAS bf16")
            row("int4 GEMM", f"{m}x{n}x{k}", lambda x=x: w4.launch(x, q4), cublas, n * k // 2 + 2 * m * (k + n),
                "cuBLAS bf16")
    hq, hkv, d, bs = (4, 2, 16, 16) if smoke else (32, 8, 128, 16)
    for b, ctx in ([(1, 64)] if smoke else [(1, 512), (1, 4096), (32, 512), (32, 4096)]):
        width = ctx // bs
        kv = torch.randn(b * width, 2, bs, hkv, d, device=device).to(bf16)
        tables = torch.randperm(b * width, device=device).view(b, width)
        lens = torch.full((b,), ctx, device=device)
        q = torch.randn(b, hq, d, device=device).to(bf16)
        keys = kv[tables, 0].reshape(b, ctx, hkv, d).transpose(1, 2).contiguous()  # [B, Hkv, T, D] contiguous
        vals = kv[tables, 1].reshape(b, ctx, hkv, d).transpose(1, 2).contiguous()
        qs = q.view(b, hkv, hq // hkv, d)
        sdpa = lambda: F.scaled_dot_product_attention(qs, keys, vals, enable_gqa=False)  # noqa: E731
        row("paged decode attention", f"B={b} ctx={ctx}", lambda: paged.launch(q, kv, tables, lens), sdpa,
            2 * b * ctx * hkv * d * 2, "SDPA, contiguous K/V")
    for m, h in ([(4, 64)] if smoke else [(1, 4096), (4096, 4096), (4096, 576)]):
        res, delta, w = torch.randn(m, h, device=device), torch.randn(m, h, device=device).to(bf16), \
            torch.rand(h, device=device).to(bf16)
        torch_norm = lambda: (w * F.rms_norm(res + delta, (h,), eps=1e-5).to(bf16))  # noqa: E731
        # ours adds into res in place (as the model does); a clone per call would time a copy as well
        row("add+RMSNorm", f"{m}x{h}", lambda: norm.launch(res, delta, w, 1e-5), torch_norm,
            m * h * (4 + 2 + 4 + 2), "torch (add, F.rms_norm)")
        gu = torch.randn(m, 2 * h, device=device).to(bf16)
        row("SiLU-and-mul", f"{m}x{h}", lambda: silu.launch(gu), lambda: F.silu(gu[:, :h]) * gu[:, h:],
            m * h * 6, "torch")
    return rows


def engine_for(model, device: str, graphs: str, smoke: bool):
    from splitserve.engine.engine import LLMEngine
    return LLMEngine(model=model, device=device, cuda_graphs=graphs, dtype="float32" if smoke else "bfloat16",
                     max_num_seqs=128, kv_cache_memory=(64 if smoke else 4096) << 20, show_progress=not smoke,
                     spec_calibrate=False)


def decode_tokens_per_s(engine, batch: int, tokens: int) -> float:
    """Tokens/s of ``batch`` greedy requests decoding ``tokens`` each after a short prompt (prefill excluded)."""
    from splitserve.engine.sampling_params import SamplingParams
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"request {i}: tell me a story", params)
    while any(r.num_output_tokens == 0 for r in engine.requests.values()):  # the prefills
        engine.step()
    start, produced = time.perf_counter(), 0
    while engine.has_unfinished():
        produced += sum(len(o.new_token_ids) for o in engine.step())
    return produced / (time.perf_counter() - start)


def decode_rows(model, device: str, smoke: bool) -> tuple[list[dict], dict]:
    eager, graphs = engine_for(model, device, "off", smoke), engine_for(model, device, "auto" if not smoke else
                                                                        "eager", smoke)
    rows = []
    for batch in (1, 8) if smoke else (1, 8, 32, 128):
        tokens = 8 if smoke else 64
        e, g = decode_tokens_per_s(eager, batch, tokens), decode_tokens_per_s(graphs, batch, tokens)
        rows.append({"batch": batch, "eager_tok_s": e, "graph_tok_s": g, "ratio": g / e})
        log(f"  decode batch {batch}: eager {e:.0f} tok/s, graphs {g:.0f} tok/s ({g / e:.2f}x)")
    from splitserve.kernels import choice
    return rows, dict(choice.current().choices)


def hf_rows(model_path: str, device: str, ours: dict, smoke: bool) -> list[dict]:
    """transformers' static-cache generate, compiled, at batch 1 and 32, beside our graph-replayed decode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if smoke:
        tok = AutoTokenizer.from_pretrained(model_path)
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(device)
    else:
        folder, name = os.path.split(model_path)
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.bfloat16).to(device)
        model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
    tok.pad_token = tok.pad_token or tok.eos_token
    rows = []
    for batch in (1, 8) if smoke else (1, 32):  # (batches our decode rows have)
        tokens = 8 if smoke else 64
        ids = tok([f"request {i}: tell me a story" for i in range(batch)], return_tensors="pt", padding=True)
        ids = {k: v.to(device) for k, v in ids.items()}
        gen = lambda: model.generate(**ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,  # noqa: E731
                                     cache_implementation="static")
        gen()  # compile
        start = time.perf_counter()
        for _ in range(2):
            gen()  # (.generate returns host token ids: each call has finished)
        seconds = (time.perf_counter() - start) / 2
        hf = batch * tokens / seconds  # (includes its prefill: a small share at 64 tokens)
        mine = {r["batch"]: r["graph_tok_s"] for r in ours}.get(batch, float("nan"))
        rows.append({"batch": batch, "transformers_tok_s": hf, "ours_tok_s": mine, "ratio": mine / hf})
        log(f"  batch {batch}: transformers {hf:.0f} tok/s, ours {mine:.0f} tok/s")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="a .gguf file or HF directory (default: SmolLM2-135M)")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--no-hf", action="store_true", help="skip transformers' compiled generate")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU: checks the script only")
    ap.add_argument("--out", default=None, help="--smoke: the folder for gpu_smoke.md/json (default /tmp)")
    args = ap.parse_args()
    import torch
    if not torch.cuda.is_available() and not args.smoke:
        log("bench_gpu.py needs a CUDA GPU (--smoke runs its code at tiny shapes on CPU)")
        return 2
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
        from helpers import make_tiny_model
        model = os.path.join(args.out or "/tmp", "splitserve_bench_gpu_tiny")
        make_tiny_model(model, "llama", max_position_embeddings=512)
        device = "cpu"
    else:
        from splitserve.engine.default_model import default_model_path
        model, device = args.model or default_model_path(), "cuda"
    name = torch.cuda.get_device_name(0) if device == "cuda" else "CPU (smoke run: numbers mean nothing)"
    log(f"[1/3] kernels on {name} ...")
    kernels = kernel_rows(torch.device(device), 2 if args.smoke else args.repeats, args.smoke)
    log("[2/3] decode steps, eager vs graphs ...")
    decode, choices = decode_rows(model, device, args.smoke)
    log("[3/3] tokens/s beside transformers ...")
    hf = [] if args.no_hf else hf_rows(model, device, decode, args.smoke)
    out = {"gpu": name, "torch": torch.__version__, "kernels": kernels, "decode": decode, "choices": choices, "hf": hf}
    stem = "gpu_smoke" if args.smoke else "gpu"
    command = "python benchmarks/bench_gpu.py " + " ".join(sys.argv[1:])
    where = RESULTS if not args.smoke else (args.out or "/tmp")
    with open(os.path.join(where, stem + ".json"), "w") as f:
        json.dump(out, f, indent=1)
    md = [f"# The GPU path on {name}", "", f"`{command}` (torch {torch.__version__}). Ratios are baseline time / "
          "ours (> 1: ours faster), each pair timed in this run on this GPU.", "",
          "| kernel | shape | ours GB/s | baseline | baseline GB/s | ratio |", "|---|---|---|---|---|---|"]
    md += [f"| {r['kernel']} | {r['shape']} | {r['ours_GBps']:.0f} | {r['baseline']} | {r['baseline_GBps']:.0f} | "
           f"{r['ratio']:.2f}x |" for r in kernels]
    md += ["", "| decode batch | eager tok/s | CUDA graphs tok/s | graphs / eager |", "|---|---|---|---|"]
    md += [f"| {r['batch']} | {r['eager_tok_s']:.0f} | {r['graph_tok_s']:.0f} | {r['ratio']:.2f}x |" for r in decode]
    if hf:
        md += ["", "| batch | transformers static cache, compiled (tok/s) | ours (tok/s) | ours / transformers |",
               "|---|---|---|---|"]
        md += [f"| {r['batch']} | {r['transformers_tok_s']:.0f} | {r['ours_tok_s']:.0f} | {r['ratio']:.2f}x |"
               for r in hf]
    md += ["", "Kernel choices of the engine's table (op | dims | rows bucket | context bucket -> implementation):",
           ""]
    md += [f"- `{k}`: {v}" for k, v in sorted(choices.items())]
    with open(os.path.join(where, stem + ".md"), "w") as f:
        f.write("\n".join(md) + "\n")
    log(f"wrote {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
