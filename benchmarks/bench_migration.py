"""The pause a client sees when its request moves, against sequence length, in one run.

    python benchmarks/bench_migration.py [--lengths 256,1024,4096] [--repeats 3] [--tokens 64]

One server (real Ray, 1 prefill and 2 decode actors of 1 thread each, the real SmolLM2 in the
machine's default dtype), one streamed KServe request at a time through tritonclient. For each
prompt length, interleaved:

  migration  after 16 tokens, live-migrate the request to the other decode worker (admin API)
  recovery   after 16 tokens, SIGKILL the decode worker holding it: the router recomputes the
             prompt and the tokens sent through the prefill worker and resumes on the survivor

The pause is the gap between two tokens arriving at the client across the switch (and the largest
around it); the baseline is the mean inter-token gap of the same stream before the event. The aim (issue 10): the
migration pause does not grow with the sequence (the last stage is a few blocks) and stays within
3 ordinary gaps. Writes benchmarks/results/migration.md and migration.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import sys
import threading
import time
import urllib.request

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_engine import corpus_tokens, machine  # noqa: E402

TRIGGER = 16  # tokens before the event


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def admin(server, method: str, path: str, body=None) -> dict:
    req = urllib.request.Request(server.endpoints["http"] + path, method=method,
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"x-splitserve-token": server.cfg.cluster_token,
                                          "content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as resp:
        return json.loads(resp.read())


def stream_once(server, prompt: str, tokens: int, event) -> dict:
    """One streamed request; ``event(server)`` runs once TRIGGER tokens have arrived."""
    import tritonclient.grpc as tg
    client = tg.InferenceServerClient(server.endpoints["grpc"])
    times, done, errors = [], threading.Event(), []

    def on(result, error):
        if error is not None:
            errors.append(str(error))
            done.set()
            return
        r = result.get_response()
        for _ in range(r.parameters["num_output_tokens"].int64_param):
            times.append(time.monotonic())
        if r.parameters["triton_final_response"].bool_param:
            done.set()

    inputs = []
    for name, dtype, value in (("text_input", "BYTES", prompt.encode()), ("stream", "BOOL", True),
                               ("sampling_parameters", "BYTES",
                                json.dumps({"max_tokens": tokens, "temperature": 0, "ignore_eos": True}).encode())):
        t = tg.InferInput(name, [1], dtype)
        t.set_data_from_numpy(np.array([value], dtype=bool if dtype == "BOOL" else object))
        inputs.append(t)
    client.start_stream(callback=on)
    client.async_stream_infer("smollm2", inputs, request_id="b", enable_empty_final_response=True)
    while len(times) < TRIGGER and not done.is_set():
        time.sleep(0.002)
    t_event = time.monotonic()
    info = event(server)
    done.wait(900)
    client.stop_stream()
    client.close()
    if errors or len(times) != tokens:
        raise RuntimeError(f"stream failed: {errors or len(times)}")
    gaps = np.diff(times)  # gaps[i]: from token i to token i + 1
    before = gaps[1:TRIGGER - 1]  # steady decoding, before the event
    after = [g for t, g in zip(times[1:], gaps) if t >= t_event]
    # the baseline gap: the mean over the tokens before the event (a median would be fooled by bursts,
    # when a hiccup upstream delivers several tokens at once)
    row = {"itl_s": float(before.mean()), "itl_max_before_s": float(before.max()),
           "largest_after_s": float(max(after)), **info}
    if "resume_index" in info:  # the gap into the first token the new worker produced, and around it
        k = info["resume_index"]
        row["switch_gap_s"] = float(gaps[k - 1])
        row["around_switch_s"] = float(gaps[max(0, k - 4):k + 3].max())
    return row


def migrate(server) -> dict:
    (rid, info), = admin(server, "GET", "/admin/requests")["requests"].items()
    decodes = [w["name"] for w in admin(server, "GET", "/admin/workers")["workers"]
               if w["pool"] == "decode" and w["state"] == "up"]
    target = next(n for n in decodes if n != info["worker"])
    r = admin(server, "POST", f"/admin/requests/{rid}/migrate", {"target": target})
    if r["status"] != "migrated":
        raise RuntimeError(f"migration failed: {r}")
    return {"stages": r["num_stages"], "last_stage_blocks": r["last_stage_blocks"], "stopped_s": r["stopped_s"],
            "kv_mb": r["num_bytes"] / 1e6, "resume_index": r["resume_index"]}


def kill(server) -> dict:
    (rid, info), = admin(server, "GET", "/admin/requests")["requests"].items()
    victim = info["worker"]
    os.kill(server.pools.all_stats()[victim].pid, signal.SIGKILL)
    return {"killed": victim}


def wait_all_up(server, timeout=300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        workers = admin(server, "GET", "/admin/workers")["workers"]
        if sum(w["pool"] == "decode" and w["state"] == "up" for w in workers) == 2:
            return
        time.sleep(0.5)
    raise RuntimeError("the killed decode worker did not come back")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default="256,1024,4096")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]

    from splitserve.engine.tokenizer import load_tokenizer
    from splitserve.platform.config import PoolConfig, ServeConfig
    from splitserve.platform.server import start_server

    tok = load_tokenizer(None)
    prompts = {n: tok.decode(corpus_tokens(tok.encode, n)) for n in lengths}
    actual = {n: len(tok.encode(p)) for n, p in prompts.items()}
    cfg = ServeConfig(http_port=free_port(), grpc_port=free_port(), max_queue_wait_s=120,
                      prefill=PoolConfig(threads=1, kv_cache_memory_mb=256),
                      decode=PoolConfig(replicas=2, threads=1, kv_cache_memory_mb=256))
    log("starting the server (1 prefill, 2 decode actors) ...")
    server = start_server(cfg, num_cpus=4, log=log)
    rows = {n: {"migration": [], "recovery": []} for n in lengths}
    try:
        stream_once(server, prompts[lengths[0]], 24, lambda s: {})  # warm-up
        for rep in range(args.repeats):
            for n in lengths:
                log(f"[{rep + 1}/{args.repeats}] {actual[n]} tokens: migration ...")
                rows[n]["migration"].append(stream_once(server, prompts[n], args.tokens, migrate))
                m = rows[n]["migration"][-1]
                log(f"    switch gap {m['switch_gap_s'] * 1e3:.0f} ms (mean gap before {m['itl_s'] * 1e3:.0f} ms); "
                    f"recovery ...")
                rows[n]["recovery"].append(stream_once(server, prompts[n], args.tokens, kill))
                log(f"    pause {rows[n]['recovery'][-1]['largest_after_s'] * 1e3:.0f} ms; waiting for the restart ...")
                wait_all_up(server)
    finally:
        server.shutdown()

    def med(items, key):
        return statistics.median(r[key] for r in items)

    command = "python benchmarks/bench_migration.py " + " ".join(sys.argv[1:])
    lines = ["# Migration pause vs sequence length", "",
             f"`{command}` on {machine()}; SmolLM2-135M-Instruct ({cfg.dtype} dtype), 1 prefill + 2 decode "
             f"actors of 1 thread, one streamed KServe request at a time (tritonclient), {args.tokens} "
             f"generated tokens, the event after {TRIGGER}. Medians of {args.repeats} interleaved repeats.",
             "",
             "| prompt tokens | mean gap | largest gap before | switch gap | switch / mean gap | largest gap "
             "around the switch | largest gap during the migration | live stages | last-stage blocks | request "
             "stopped (server) | KV moved | recovery pause | recovery / mean gap |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for n in lengths:
        m, r = rows[n]["migration"], rows[n]["recovery"]
        gap = med(m, "itl_s")
        lines.append(
            f"| {actual[n]} | {gap * 1e3:.0f} ms | {med(m, 'itl_max_before_s') * 1e3:.0f} ms | "
            f"{med(m, 'switch_gap_s') * 1e3:.0f} ms | {med(m, 'switch_gap_s') / gap:.1f}x | "
            f"{med(m, 'around_switch_s') * 1e3:.0f} ms | {med(m, 'largest_after_s') * 1e3:.0f} ms | "
            f"{med(m, 'stages'):.0f} | {med(m, 'last_stage_blocks'):.0f} | {med(m, 'stopped_s') * 1e3:.0f} ms | "
            f"{med(m, 'kv_mb'):.1f} MB | {med(r, 'largest_after_s') * 1e3:.0f} ms | "
            f"{med(r, 'largest_after_s') / med(r, 'itl_s'):.0f}x |")
    lines += ["", "Columns: the mean inter-token gap of the stream before the event (the baseline) and its "
              "largest gap (the machine's noise); the switch gap, from the last token of the old worker to the "
              "first of the new one (the output index comes back from the migration); the largest gap within "
              "three tokens of the switch; the largest gap anywhere from the migration call to the end of the "
              "stream (this includes the live stages, when the KV is copied while the request decodes); the "
              "request's stop on the server (suspend to the receiver's ack). Recovery: the largest gap after the "
              "kill (the dead worker is noticed, then the prompt and the tokens sent are recomputed by the "
              "prefill worker).",
              "", "Migration copies the full blocks while the request keeps decoding, then stops it for the "
              "last blocks and its snapshot: the stop, and so the switch, stays the same size however long the "
              "sequence. Recovery recomputes the whole sequence on the prefill worker, so its pause grows "
              "with the length (it is the price of a crash, not of a planned move)."]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "migration.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(args.out, "migration.json"), "w") as f:
        json.dump({"command": command, "machine": machine(), "prompt_tokens": actual, "rows": rows}, f, indent=1)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
