"""The ``splitserve`` command.

    splitserve generate --prompt TEXT [--chat] [--model PATH] [--max-tokens N]
                        [--temperature T] [--top-p P] [--top-k K] [--seed S] [--stop STR]
                        [--dtype auto|float32|bfloat16] [--threads N]

``generate`` loads the model (progress on stderr), streams the completion to
stdout as it is produced, and reports the finish reason on stderr. Bad input
exits with status 2 and a message naming what was wrong.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from splitserve.engine.errors import SplitserveError


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
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
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
    engine = LLMEngine(EngineConfig(model=args.model, dtype=args.dtype, num_threads=args.threads,
                                    kv_cache_memory=256 << 20))
    print(f"loaded {engine.model_config.name} ({engine.dtype}) in {time.perf_counter() - t:.1f}s",
          file=sys.stderr)
    reason = asyncio.run(_stream(engine, args))
    return 0 if reason in ("stop", "length") else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="splitserve", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _generate_args(sub)
    args = parser.parse_args(argv)
    try:
        if args.command == "generate":
            return cmd_generate(args)
    except SplitserveError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
