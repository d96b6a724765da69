"""The ``splitserve`` command.

    splitserve generate --prompt TEXT [--chat] [--model PATH] [--max-tokens N]
                        [--temperature T] [--top-p P] [--top-k K] [--seed S] [--stop STR]
                        [--device auto|cpu|cuda|cuda:N] [--cuda-graphs auto|off] [--dtype auto|float32|bfloat16]
                        [--quantization none|int8|int4] [--speculative off|ngram|draft] [--threads N]

    splitserve serve [--config FILE] [--model PATH] [--mode disaggregated|colocated]
                     [--quantization none|int8|int4] [--kv-wire-codec raw|int8] [--speculative off|ngram|draft]
                     [--prefill-device cpu|cuda] [--decode-device cpu|cuda]
                     [--http-port 8000] [--grpc-port 9000] [--address RAY_ADDRESS] [--api-key-file FILE]
                     [--autoscale --catalog FILE [--ttft-objective S] [--tpot-objective S]
                      [--budget-per-hour X] [--max-prefill N] [--max-decode N]] ...

    splitserve profile --cost-per-hour X --out catalog.yaml [--name NAME] [--threads N] [--max-seconds S]

``generate`` loads the model (progress on stderr), streams the completion to
stdout as it is produced, and reports the finish reason on stderr. ``serve``
starts a local Ray (or joins ``--address``), the prefill and decode pools and
the front door (KServe v2 gRPC + OpenAI HTTP on Ray Serve), prints the
endpoints, and shuts everything down on Ctrl-C. Bad input exits with status 2
and a message naming what was wrong.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

from splitserve.errors import SplitserveError


def _generate_args(sub) -> None:
    p = sub.add_parser("generate", help="generate text from one prompt with the local engine")
    p.add_argument("--prompt", required=True, help="prompt text (the user message with --chat)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--model", default=None, help="a .gguf file or Hugging Face directory (default: SmolLM2-135M)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--device", default="auto", help="auto (a GPU if there is one) | cpu | cuda | cuda:N")
    p.add_argument("--cuda-graphs", default="auto", choices=["auto", "off"],
                   help="on a GPU, replay decode steps from CUDA graphs captured per batch size (off: eager)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="auto: bfloat16 on a GPU (and on CPUs with AMX), else float32")
    p.add_argument("--quantization", default="none", choices=["none", "int8", "int4"],
                   help="weight-only quantization of the linears (GGUF Q4 tensors load straight into int4)")
    p.add_argument("--speculative", default="off", choices=["off", "ngram", "draft"],
                   help="speculative decoding: n-gram prompt lookup, or the model itself in int4 as a draft "
                        "(exact: same greedy output)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")


async def _stream(engine, args) -> str | None:
    from splitserve.engine.async_engine import AsyncEngine
    from splitserve.engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, stop=tuple(args.stop))
    aengine = AsyncEngine(engine)
    reason = None
    try:
        kwargs = {"messages": [{"role": "user", "content": args.prompt}]} if args.chat else {"prompt": args.prompt}
        start, count = time.perf_counter(), 0
        async for out in aengine.generate(params=params, **kwargs):
            sys.stdout.write(out.new_text)
            sys.stdout.flush()
            count += len(out.new_token_ids)
            if out.finished:
                reason = out.finish_reason if not out.error else f"{out.finish_reason}: {out.error}"
        elapsed = time.perf_counter() - start
        sys.stdout.write("\n")
        print(f"[{count} tokens in {elapsed:.2f}s, finish_reason={reason}]", file=sys.stderr)
    finally:
        aengine.shutdown()
    return reason


def cmd_generate(args) -> int:
    from splitserve.engine.engine import EngineConfig, LLMEngine
    from splitserve.engine.sampling_params import SamplingParams

    # Validate the request before paying for the model load.
    SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                   top_k=args.top_k, seed=args.seed, stop=tuple(args.stop))
    print("loading model ...", file=sys.stderr)
    t = time.perf_counter()
    engine = LLMEngine(EngineConfig(model=args.model, device=args.device, cuda_graphs=args.cuda_graphs,
                                    dtype=args.dtype, num_threads=args.threads,
                                    quantization=args.quantization, speculative=args.speculative,
                                    kv_cache_memory=256 << 20))
    print(f"loaded {engine.model_config.name} ({engine.dtype} on {engine.device}) in {time.perf_counter() - t:.1f}s",
          file=sys.stderr)
    reason = asyncio.run(_stream(engine, args))
    return 0 if reason in ("stop", "length") else 1


def _serve_args(sub) -> None:
    p = sub.add_parser("serve", help="serve the model: prefill and decode pools behind gRPC and HTTP")
    p.add_argument("--config", default=None, help="a YAML file of ServeConfig fields (flags override it)")
    p.add_argument("--model", default=None)
    p.add_argument("--model-name", default=None, help="the name clients use (default: smollm2)")
    p.add_argument("--mode", default=None, choices=["disaggregated", "colocated"])
    p.add_argument("--no-chunked-prefill", action="store_true", help="colocated: whole prompts per step")
    p.add_argument("--dtype", default=None, choices=["auto", "float32", "bfloat16"])
    p.add_argument("--quantization", default=None, choices=["none", "int8", "int4"],
                   help="weights of both pools (a YAML config can set each pool)")
    p.add_argument("--kv-wire-codec", default=None, choices=["raw", "int8"],
                   help="KV from prefill to decode: raw, or int8 (about half the bytes)")
    p.add_argument("--speculative", default=None, choices=["off", "ngram", "draft"],
                   help="speculative decoding in the decode pool (n-gram prompt lookup)")
    p.add_argument("--prefill-replicas", type=int, default=None)
    p.add_argument("--decode-replicas", type=int, default=None)
    p.add_argument("--prefill-threads", type=int, default=None)
    p.add_argument("--decode-threads", type=int, default=None)
    p.add_argument("--prefill-device", default=None, choices=["cpu", "cuda"],
                   help="cuda: each prefill worker asks Ray for one GPU and runs there")
    p.add_argument("--decode-device", default=None, choices=["cpu", "cuda"],
                   help="cuda: each decode worker asks Ray for one GPU and runs there")
    p.add_argument("--host", default=None, help="HTTP/gRPC bind host (default 127.0.0.1)")
    p.add_argument("--http-port", type=int, default=None)
    p.add_argument("--grpc-port", type=int, default=None)
    p.add_argument("--address", default=None, help="join this Ray cluster instead of starting one")
    p.add_argument("--api-key-file", default=None,
                   help="require an API key on KServe and OpenAI calls: a file of keys, one per line (overrides "
                        "$SPLITSERVE_API_KEYS and the config's api_keys)")
    p.add_argument("--autoscale", action="store_true",
                   help="size the pools to latency objectives (needs --catalog or autoscale.catalog in --config)")
    p.add_argument("--catalog", default=None, help="autoscaler instance catalog YAML (splitserve profile writes one)")
    p.add_argument("--ttft-objective", type=float, default=None, help="seconds, at P90 (autoscale)")
    p.add_argument("--tpot-objective", type=float, default=None, help="seconds per output token, at P90 (autoscale)")
    p.add_argument("--budget-per-hour", type=float, default=None, help="cost cap of all instances (autoscale)")
    p.add_argument("--max-prefill", type=int, default=None, help="autoscale: most prefill instances")
    p.add_argument("--max-decode", type=int, default=None, help="autoscale: most decode instances")
    p.add_argument("--autoscale-period", type=float, default=None, help="seconds between decisions (default 5)")


def cmd_serve(args) -> int:
    import dataclasses
    import signal
    import threading

    from splitserve.platform.config import PoolConfig, ServeConfig
    from splitserve.platform.server import start_server

    cfg = ServeConfig.from_yaml(args.config) if args.config else ServeConfig()
    top = {"model": args.model, "model_name": args.model_name, "mode": args.mode, "dtype": args.dtype,
           "http_host": args.host, "http_port": args.http_port, "grpc_port": args.grpc_port,
           "quantization": args.quantization, "kv_wire_codec": args.kv_wire_codec, "speculative": args.speculative}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in top.items() if v is not None})

    def pool(p: PoolConfig, replicas, threads, device) -> PoolConfig:
        changes = {"replicas": replicas, "threads": threads, "device": device}
        if args.no_chunked_prefill:
            changes["chunked_prefill"] = False
        return dataclasses.replace(p, **{k: v for k, v in changes.items() if v is not None})

    cfg = dataclasses.replace(cfg, prefill=pool(cfg.prefill, args.prefill_replicas, args.prefill_threads,
                                                args.prefill_device),
                              decode=pool(cfg.decode, args.decode_replicas, args.decode_threads, args.decode_device))
    cfg = _autoscale(cfg, args)
    if args.api_key_file is not None:
        from splitserve.platform.auth import load_key_file
        cfg = dataclasses.replace(cfg, api_keys=load_key_file(args.api_key_file))
    server = start_server(cfg, address=args.address, log=lambda m: print(m, file=sys.stderr))
    ep = server.endpoints
    token_at = "$SPLITSERVE_CLUSTER_TOKEN" if os.environ.get("SPLITSERVE_CLUSTER_TOKEN") else _save_token(cfg)
    print(f"splitserve is serving '{ep['model']}' ({cfg.mode})\n"
          f"  KServe v2 gRPC : {ep['grpc']}\n  OpenAI HTTP    : {ep['openai']}\n"
          f"  Admin API      : {ep['http']}/admin/workers, /admin/requests (header x-splitserve-token: "
          f"the cluster token, in {token_at})\n"
          f"  API keys       : {f'required ({len(cfg.api_keys)} keys)' if cfg.api_keys else 'off'}\n"
          f"  Ray dashboard  : {ep['dashboard'] or 'not started here (joined an existing cluster)'}"
          f" (token: ~/.ray/auth_token)\nCtrl-C stops it.", flush=True)
    stop = threading.Event()
    # Ctrl-C (SIGINT) and SIGTERM both stop it, also when it was started with SIGINT ignored (a background
    # job of a non-interactive shell inherits that: a KeyboardInterrupt would then never come)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    shown = 0
    while not stop.wait(0.5):
        shown = _print_decisions(server, shown)
    print("shutting down ...", file=sys.stderr)
    server.shutdown()
    return 0


def _autoscale(cfg, args):
    """Fold the --autoscale flags into the config (flags override the YAML's autoscale section)."""
    import dataclasses

    from splitserve.platform.config import AutoscaleConfig
    flags = (args.catalog, args.ttft_objective, args.tpot_objective, args.budget_per_hour, args.max_prefill,
             args.max_decode, args.autoscale_period)
    if not args.autoscale:
        if any(v is not None for v in flags):
            raise ValueError("--catalog, --*-objective, --budget-per-hour, --max-* and --autoscale-period "
                             "go with --autoscale")
        if cfg.autoscale is not None:  # from the YAML: checked before anything starts
            cfg.autoscale.load()
        return cfg
    a = cfg.autoscale
    if a is None:
        if args.catalog is None:
            raise ValueError("--autoscale needs an instance catalog: --catalog FILE (write one with "
                             "`splitserve profile --out FILE`) or autoscale.catalog in --config")
        a = AutoscaleConfig(catalog=args.catalog)
    objectives = dict(a.objectives)
    for key, value in (("ttft_s", args.ttft_objective), ("tpot_s", args.tpot_objective),
                       ("budget_per_hour", args.budget_per_hour)):
        if value is not None:
            objectives[key] = value
    for pool, value in (("prefill", args.max_prefill), ("decode", args.max_decode)):
        if value is not None:
            objectives[pool] = {**objectives.get(pool, {"min": 1}), "max": value}
    a = dataclasses.replace(a, catalog=args.catalog or a.catalog, objectives=objectives,
                            period_s=a.period_s if args.autoscale_period is None else args.autoscale_period)
    a.load()  # a bad catalog or objective fails here, before anything starts
    return dataclasses.replace(cfg, autoscale=a)


def _print_decisions(server, shown: int) -> int:
    """The autoscaler's decisions that acted, as they come (its own log lives with the Ray actor)."""
    if server.pools.autoscaler is None:
        return shown
    import ray
    try:
        rows = ray.get(server.pools.autoscaler.decisions.remote(50, True), timeout=5)
    except Exception:  # noqa: BLE001 - the console line is a convenience
        return shown
    for r in rows:
        seq = int(r["id"].rsplit("-", 1)[1])
        if seq > shown:
            acts = ", ".join(f"{a['kind']} {a['pool']} {a['instance_type'] or ''} x{a['count']} {a['worker'] or ''}"
                             .replace("  ", " ").strip() for a in r["actions"])
            print(f"autoscaler {r['id']}: {acts} ({'; '.join(r['reasons']) or 'targets ' + str(r['targets'])})",
                  file=sys.stderr, flush=True)
            shown = seq
    return shown


def _save_token(cfg) -> str:
    """Write a generated cluster token where only this user can read it; returns the path."""
    path = os.path.expanduser("~/.splitserve/cluster_token")
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(cfg.cluster_token + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="splitserve", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _generate_args(sub)
    _serve_args(sub)
    from splitserve.bench import command as bench_command
    bench_command.add_args(sub)
    from splitserve.autoscaler import profile as profile_command
    profile_command.add_args(sub)
    args = parser.parse_args(argv)
    try:
        if args.command == "generate":
            return cmd_generate(args)
        if args.command == "serve":
            return cmd_serve(args)
        if args.command == "bench":
            return bench_command.run(args)
        if args.command == "profile":
            return profile_command.run(args)
    except (SplitserveError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
