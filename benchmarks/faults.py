"""The fault campaign (issue 14): a real server driven through faults, on both protocols, counted.

    python benchmarks/faults.py [--soak-s 1800] [--cases kill_decode,overload_4x,...] [--fuzz 400] [--merge]

One server (real Ray, 1 prefill and 2 decode actors of 1 thread each, the real SmolLM2 in fp32 so
that greedy text compares exactly with the single-process engine), the real clients: ``openai``
(SSE) and ``tritonclient`` (a KServe bidi stream), half the requests each. Cases:

  kill_decode      SIGKILL a decode worker while 6 streams decode (Ray restarts it)
  kill_prefill     SIGKILL the prefill worker while 4 long prompts are prefilled
  kill_mig_target  SIGKILL the target of a live migration while it runs
  transfer_faults  the prefill worker's next transfers fail (a cut stream, then a corrupt chunk and a
                   cut: one retried there, one placed again by the router), and a live migration whose
                   stream is cut (the request stays where it was); KVSender.inject is the hook
  cancel_storm     12 streams, every client leaves after its second token
  overload_2x/4x   2x / 4x as many long requests at once as the decode pool's KV holds
  kv_exhaustion    requests that each need most of one decode worker's KV, 6 at once
  fuzz             hypothesis-generated OpenAI bodies over HTTP (every answer: 2xx, or a JSON 4xx)
  soak             a steady 2 streams at a time for --soak-s seconds: RSS of every worker, start vs end

Per case: requests sent, completed, refused (429 / RESOURCE_EXHAUSTED, with the reason), failed (any
other error the client saw, with the reason), hung (no end within the time limit), wrong (a completed
greedy output that differs from the undisturbed engine's), leaked (per-request structures left on any
worker, and KV blocks not back), and the time to recover (from the fault until a new request
completes). Writes benchmarks/results/faults.md and faults.json; ``--merge`` keeps the cases of an
earlier run that this one does not run (each row keeps the command that measured it).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, HERE)
from helpers import admin, free_port  # noqa: E402  (the tests' own client helpers)
from fault_clients import (HANG_S, LONG, MODEL, PROMPTS, KServeStream, Outcome, Recovery, log,  # noqa: E402
                           openai_stream)


# -- the campaign -----------------------------------------------------------------------------------


class Campaign:
    def __init__(self, server, reference):
        self.server, self.reference = server, reference
        self.base = server.endpoints["openai"]
        self.results: dict[str, dict] = {}

    # requests of a case: (protocol, prompt, max_tokens); half over each protocol
    def run(self, name: str, requests: list[tuple[str, int]], fault=None, leave_after: int | None = None) -> dict:
        log(f"[faults] {name}: {len(requests)} requests ...")
        outcomes: list[tuple[str, str, int, Outcome]] = []
        streams: list[KServeStream] = []
        pool = ThreadPoolExecutor(max_workers=max(1, len(requests)))
        start = time.monotonic()
        for i, (prompt, max_tokens) in enumerate(requests):
            if i % 2 == 0:
                o = Outcome()
                pool.submit(openai_stream, self.base, prompt, max_tokens, o, leave_after)
            else:
                streams.append(KServeStream(self.server.endpoints["grpc"], f"{name}-{i}", prompt, max_tokens))
                o = streams[-1].out
            outcomes.append(("openai" if i % 2 == 0 else "kserve", prompt, max_tokens, o))
        fault_at = fault(outcomes) if fault is not None else None
        recovery = Recovery(self.base, fault_at) if fault_at is not None else None
        deadline = time.monotonic() + HANG_S
        for ks in streams:
            while not ks.done.wait(0.02) and time.monotonic() < deadline:
                if leave_after is not None and ks.out.tokens >= leave_after:  # this client leaves
                    ks.out.status, ks.out.reason = "cancelled", "the client left"
                    break
            ks.close(cancel=leave_after is not None or not ks.done.is_set())
        pool.shutdown(wait=True)
        elapsed = time.monotonic() - start
        recover_s = recovery.result() if recovery is not None else None
        leaked = self._leaks()
        row = {"sent": len(outcomes), "elapsed_s": round(elapsed, 1), "recover_s": recover_s, "leaked": leaked}
        for status in ("completed", "refused", "failed", "hung", "cancelled"):
            row[status] = sum(o.status == status for *_, o in outcomes)
        row["wrong"] = sum(o.status == "completed" and o.text != self.reference(prompt, max_tokens)
                           for _, prompt, max_tokens, o in outcomes)
        row["silent"] = sum(o.status in ("refused", "failed") and not o.reason for *_, o in outcomes)
        row["reasons"] = sorted({f"{p}: {o.status}: {o.reason[:160]}" for p, _, _, o in outcomes
                                 if o.status in ("refused", "failed")})[:6]
        self.results[name] = row
        log(f"[faults] {name}: " + ", ".join(f"{k} {row[k]}" for k in ("completed", "refused", "failed", "hung",
                                                                         "wrong", "leaked")))
        return row

    def _leaks(self, timeout: float = 60.0) -> int:
        """Per-request structures left on every worker once it should be idle (0: none), KV blocks included."""
        deadline = time.monotonic() + timeout
        while True:
            leaks = self.server.pools.leaks()
            stats = self.server.pools.all_stats()
            held = sum(s.engine.num_kv_blocks - s.engine.num_free_kv_blocks for s in stats.values())
            left = sum(v for w in leaks.values() for v in w.values()) + held
            if left == 0 or time.monotonic() > deadline:
                if left:
                    log(f"[faults] leaked: {leaks}")
                return left
            time.sleep(0.5)

    def worker_pids(self, pool: str | None = None) -> dict[str, int]:
        view = self.server.pools.view()
        stats = self.server.pools.all_stats()
        return {m.name: stats[m.name].pid for m in view.members
                if (pool is None or m.pool == pool) and m.state.value == "up" and m.name in stats}


def _wait_tokens(outcomes, tokens: int) -> None:
    """Until every request still running has streamed ``tokens`` tokens (or HANG_S passed)."""
    deadline = time.monotonic() + HANG_S
    while time.monotonic() < deadline and not all(o.tokens >= tokens or o.status != "hung" for *_, o in outcomes):
        time.sleep(0.02)


def _kill(name: str, pid: int, when: str = "") -> float:
    """SIGKILL one worker (a crash, not a clean stop); the time of the fault."""
    log(f"[faults]   SIGKILL {name} (pid {pid}){when}")
    os.kill(pid, signal.SIGKILL)
    return time.monotonic()


def kill_when_decoding(campaign: Campaign, pool: str, tokens: int = 3):
    def fault(outcomes):
        _wait_tokens(outcomes, tokens)
        return _kill(*sorted(campaign.worker_pids(pool).items())[0])
    return fault


def kill_prefill_while_prefilling(campaign: Campaign):
    def fault(outcomes):
        time.sleep(0.5)  # the long prompts are being prefilled
        return _kill(*sorted(campaign.worker_pids("prefill").items())[0], " mid-prefill")
    return fault


def kill_migration_target(campaign: Campaign):
    def fault(outcomes):
        _wait_tokens(outcomes, 4)
        requests = admin(campaign.server, "GET", "/admin/requests")[1]["requests"]
        pids = campaign.worker_pids("decode")
        source = next((r["worker"] for r in requests.values() if r["worker"] in pids), None)
        if source is None or len(pids) < 2:
            log("[faults]   nothing is decoding on two workers: no migration to break")
            return time.monotonic()
        target = next(n for n in pids if n != source)
        moves = [threading.Thread(target=admin, args=(campaign.server, "POST", f"/admin/requests/{rid}/migrate",
                                                      {"target": target}))
                 for rid, r in requests.items() if r["worker"] == source][:2]
        for t in moves:
            t.start()
        time.sleep(0.05)  # the migrations are under way
        at = _kill(target, pids[target], " (the migration target)")
        for t in moves:
            t.join(120)
        return at
    return fault


def _worker(campaign: Campaign, name: str):
    return next(m for m in campaign.server.pools.view().members if m.name == name)


def _transfers_failed(campaign: Campaign) -> int:
    return sum(getattr(s, "transfers_failed", 0) for s in campaign.server.pools.all_stats().values())


def transfer_faults(campaign: Campaign) -> dict:
    """Transfers that fail on the wire, injected on the senders (``KVSender.inject``): the requests must
    complete with the undisturbed text, their failed reservations dropped, nothing leaked."""
    import ray
    failed_before = _transfers_failed(campaign)
    prefill = sorted(campaign.worker_pids("prefill"))[0]
    ray.get(_worker(campaign, prefill).handle.inject_transfer_faults.remote(["cut", "corrupt", "cut"]))
    log(f"[faults]   {prefill}: its next 3 transfers fail (cut; corrupt, cut)")
    moved = {}

    def fault(outcomes):  # a live migration whose stream is cut
        _wait_tokens(outcomes, 4)
        requests = admin(campaign.server, "GET", "/admin/requests")[1]["requests"]
        pids = campaign.worker_pids("decode")
        rid, source = next(((r, v["worker"]) for r, v in requests.items() if v["worker"] in pids), (None, None))
        if rid is None or len(pids) < 2:
            log("[faults]   nothing is decoding on two workers: no migration to cut")
            return time.monotonic()
        ray.get(_worker(campaign, source).handle.inject_transfer_faults.remote(["cut"]))
        at = time.monotonic()
        moved.update(admin(campaign.server, "POST", f"/admin/requests/{rid}/migrate",
                           {"target": next(n for n in pids if n != source)})[1])
        log(f"[faults]   migration of {rid} from {source} with its stream cut: {moved}")
        return at

    row = campaign.run("transfer_faults", [(p, 48) for p in PROMPTS], fault=fault)
    row["transfers_failed"] = _transfers_failed(campaign) - failed_before  # what the receivers dropped
    row["migration"] = moved
    return row


def fuzz(campaign: Campaign, examples: int) -> dict:
    """Hypothesis-generated bodies (the strategies of tests/test_fuzz_inputs.py) posted over HTTP."""
    from hypothesis import HealthCheck, given, settings
    from test_fuzz_inputs import openai_bodies
    counts = {"2xx": 0, "4xx_json": 0, "5xx": 0, "not_json": 0}
    bad: list[str] = []
    url = campaign.server.endpoints["http"]

    def post(chat: bool, body) -> None:
        if isinstance(body, dict) and body.get("stream") is not True:
            body = {**body, "max_tokens": 2} if "max_tokens" not in body else body
        req = urllib.request.Request(url + ("/v1/chat/completions" if chat else "/v1/completions"), method="POST",
                                     data=json.dumps(body).encode(), headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=HANG_S) as resp:
                resp.read()
                counts["2xx"] += 1
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                ok = "error" in json.loads(raw)
            except ValueError:
                ok = False
            key = "5xx" if e.code >= 500 else ("4xx_json" if ok else "not_json")
            counts[key] += 1
            if key != "4xx_json":
                bad.append(f"{e.code} {raw[:120]!r} for {json.dumps(body)[:120]}")

    for chat in (False, True):
        given(body=openai_bodies(chat))(settings(max_examples=examples // 2, deadline=None, database=None,
                                                 suppress_health_check=list(HealthCheck))(
            lambda body: post(chat, body)))()
    leaked = campaign._leaks()
    row = {"sent": sum(counts.values()), **counts, "leaked": leaked, "examples_of_bad": bad[:5]}
    campaign.results["fuzz"] = row
    log(f"[faults] fuzz: {row}")
    return row


def rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def soak(campaign: Campaign, seconds: float) -> dict:
    """Two streams at a time (alternating protocols) for ``seconds``; RSS per worker at the start and end."""
    log(f"[faults] soak: {seconds:.0f}s at 2 streams ...")
    pids = campaign.worker_pids()
    warm = Outcome()
    openai_stream(campaign.base, PROMPTS[1], 32, warm)
    before = {n: rss_mb(p) for n, p in pids.items()}
    counts = {"sent": 0, "completed": 0, "refused": 0, "failed": 0, "hung": 0, "wrong": 0}
    end = time.monotonic() + seconds
    lock = threading.Lock()
    next_log = [time.monotonic() + 60]

    def client(k: int) -> None:
        i = 0
        while time.monotonic() < end:
            prompt, n = PROMPTS[(k + i) % len(PROMPTS)], 24 + 8 * ((k + i) % 4)
            o = Outcome()
            if (k + i) % 2 == 0:
                openai_stream(campaign.base, prompt, n, o)
            else:
                ks = KServeStream(campaign.server.endpoints["grpc"], f"soak-{k}-{i}", prompt, n)
                ks.done.wait(HANG_S)
                ks.close(cancel=not ks.done.is_set())
                o = ks.out
            with lock:
                counts["sent"] += 1
                counts[o.status if o.status in counts else "failed"] += 1
                counts["wrong"] += o.status == "completed" and o.text != campaign.reference(prompt, n)
                if time.monotonic() > next_log[0]:
                    next_log[0] += 60
                    log(f"[faults]   soak: {counts['sent']} requests, {end - time.monotonic():.0f}s left")
            i += 1

    threads = [threading.Thread(target=client, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = {n: rss_mb(p) for n, p in pids.items()}
    row = {**counts, "seconds": seconds, "leaked": campaign._leaks(),
           "rss_mb": {n: [round(before[n] or 0, 1), round(after[n] or 0, 1)] for n in pids}}
    campaign.results["soak"] = row
    log(f"[faults] soak: {row}")
    return row


def earlier_results(out_dir: str) -> dict:
    """The rows of the last run written to ``out_dir`` (for --merge), each with the command that made it."""
    try:
        with open(os.path.join(out_dir, "faults.json")) as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    return {name: {"command": data.get("command"), **row} for name, row in data["results"].items()}


def write(results: dict, out_dir: str) -> None:
    """results: case -> row (with its "command"), written in the order of CASES."""
    os.makedirs(out_dir, exist_ok=True)
    results = {name: results[name] for name in CASES if name in results}
    commands = {}
    for name, r in results.items():
        commands.setdefault(r["command"], []).append(name)
    with open(os.path.join(out_dir, "faults.json"), "w") as f:
        json.dump({"results": results}, f, indent=1)
    lines = ["# Fault campaign", ""]
    lines += [f"Command: `{c}`" + (f" (cases: {', '.join(names)})" if len(commands) > 1 else "")
              for c, names in commands.items()]
    lines += ["",
             "One server: 1 prefill and 2 decode workers (1 thread each), real SmolLM2 fp32, 2 CPU cores; half "
             "the requests over OpenAI SSE, half over a KServe stream. Target in every case: 0 hung, 0 wrong, "
             "0 leaked, 0 silent (every refusal and failure reached the client with its reason).", "",
             "| case | sent | completed | refused | failed | cancelled | hung | wrong | silent | leaked | "
             "recover s | s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        if name in ("fuzz", "soak"):
            continue
        lines.append(f"| {name} | {r['sent']} | {r['completed']} | {r['refused']} | {r['failed']} | "
                     f"{r['cancelled']} | {r['hung']} | {r['wrong']} | {r['silent']} | {r['leaked']} | "
                     f"{r['recover_s'] if r['recover_s'] is not None else '-'} | {r['elapsed_s']} |")
    lines.append("")
    if "transfer_faults" in results:
        r = results["transfer_faults"]
        lines += [f"transfer_faults: the receivers dropped {r['transfers_failed']} failed transfers; the migration "
                  f"with its stream cut answered {r['migration']}.", ""]
    for name, r in results.items():
        if r.get("reasons"):
            lines.append(f"Reasons the clients saw in {name}:")
            lines += [f"- {x}" for x in r["reasons"]]
            lines.append("")
    if "fuzz" in results:
        r = results["fuzz"]
        lines += [f"Fuzz: {r['sent']} hypothesis-generated OpenAI bodies over HTTP: {r['2xx']} answered, "
                  f"{r['4xx_json']} refused with a JSON 4xx, {r['5xx']} 5xx, {r['not_json']} non-JSON errors; "
                  f"leaked {r['leaked']}.", ""]
        lines += [f"- {x}" for x in r["examples_of_bad"]]
    if "soak" in results:
        r = results["soak"]
        lines += ["", f"Soak: {r['seconds']:.0f}s, {r['sent']} requests: {r['completed']} completed, {r['refused']} "
                      f"refused, {r['failed']} failed, {r['hung']} hung, {r['wrong']} wrong; leaked {r['leaked']}.",
                  "", "| process | RSS MB start | RSS MB end |", "|---|---|---|"]
        lines += [f"| {n} | {a} | {b} |" for n, (a, b) in r["rss_mb"].items()]
    with open(os.path.join(out_dir, "faults.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


CASES = ("kill_decode", "kill_prefill", "kill_mig_target", "transfer_faults", "cancel_storm", "overload_2x",
         "overload_4x", "kv_exhaustion", "fuzz", "soak")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--soak-s", type=float, default=1800.0)
    ap.add_argument("--fuzz", type=int, default=400, help="fuzzed bodies over HTTP")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--merge", action="store_true", help="keep the other cases of the results already in --out")
    args = ap.parse_args()
    cases = args.cases.split(",")
    unknown = set(cases) - set(CASES)
    if unknown:
        ap.error(f"unknown cases {sorted(unknown)}; choose from {CASES}")
    command = "python benchmarks/faults.py " + " ".join(sys.argv[1:])

    import ray
    from splitserve.engine.default_model import default_model_path
    from splitserve.engine.engine import LLMEngine
    from splitserve.engine.sampling_params import SamplingParams
    from splitserve.platform.config import PoolConfig, ServeConfig
    from splitserve.platform.server import start_server

    model = default_model_path()
    log("[faults] loading the reference engine ...")
    engine = LLMEngine(model=model, dtype="float32", show_progress=False, kv_cache_memory=256 << 20,
                       prefix_caching=False)  # the reference: every request computed cold
    cache: dict = {}

    def reference(prompt: str, max_tokens: int) -> str:
        if (prompt, max_tokens) not in cache:
            cache[(prompt, max_tokens)] = engine.generate([prompt], SamplingParams(
                max_tokens=max_tokens, temperature=0, ignore_eos=True))[0].text
        return cache[(prompt, max_tokens)]

    cfg = ServeConfig(model=model, model_name=MODEL, dtype="float32", http_port=free_port(), grpc_port=free_port(),
                      max_queue_wait_s=5.0, prefill_queue_limit=8,
                      prefill=PoolConfig(threads=1, kv_cache_memory_mb=128, max_num_batched_tokens=256),
                      decode=PoolConfig(replicas=2, threads=1, kv_cache_memory_mb=96))
    log("[faults] starting the server ...")
    server = start_server(cfg, num_cpus=8, log=lambda m: log(f"[faults] {m}"))
    campaign = Campaign(server, reference)
    try:
        decode_tokens = min(s.engine.num_kv_blocks * cfg.block_size for n, s in server.pools.all_stats().items()
                            if n in campaign.worker_pids("decode"))
        long_prompt = LONG * 40  # ~700 tokens
        per_request = len(engine.tokenizer.encode(long_prompt)) + 48
        capacity = max(1, 2 * (decode_tokens // per_request))  # long requests the decode pool holds at once
        log(f"[faults] the decode pool holds {capacity} long requests at once")
        runs = {
            "kill_decode": lambda: campaign.run("kill_decode", [(p, 48) for p in PROMPTS],
                                                fault=kill_when_decoding(campaign, "decode")),
            "kill_prefill": lambda: campaign.run("kill_prefill", [(LONG * (10 + 4 * i), 16) for i in range(4)],
                                                 fault=kill_prefill_while_prefilling(campaign)),
            "kill_mig_target": lambda: campaign.run("kill_mig_target", [(p, 64) for p in PROMPTS[:4]],
                                                    fault=kill_migration_target(campaign)),
            "transfer_faults": lambda: transfer_faults(campaign),
            "cancel_storm": lambda: campaign.run("cancel_storm", [(PROMPTS[i % 6], 200) for i in range(12)],
                                                 leave_after=2),
            "overload_2x": lambda: campaign.run("overload_2x", [(long_prompt, 48)] * (2 * capacity)),
            "overload_4x": lambda: campaign.run("overload_4x", [(long_prompt, 48)] * (4 * capacity)),
            "kv_exhaustion": lambda: campaign.run("kv_exhaustion", [(LONG * int(40 * decode_tokens * 0.75 / per_request
                                                                                ), 32)] * 6),
            "fuzz": lambda: fuzz(campaign, args.fuzz),
            "soak": lambda: soak(campaign, args.soak_s),
        }
        earlier = earlier_results(args.out) if args.merge else {}
        for name in cases:
            runs[name]()
            campaign.results[name]["command"] = command
            write({**earlier, **campaign.results}, args.out)
    finally:
        server.shutdown()
        if ray.is_initialized():
            ray.shutdown()
    log(f"[faults] wrote {os.path.join(args.out, 'faults.md')}")


if __name__ == "__main__":
    main()
