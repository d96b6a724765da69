"""`splitserve serve` as a user runs it: a subprocess that prints its endpoints, answers
both protocols, and stops cleanly on Ctrl-C, leaving no Ray process behind."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

from helpers import free_port, make_tiny_model


def _ray_processes() -> int:
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return sum(1 for line in out.splitlines() if "raylet" in line or "gcs_server" in line)


class Serve:
    """``splitserve serve ARGS`` as a subprocess: waits for its banner; ``stop()`` is Ctrl-C."""

    def __init__(self, tmp_path, *args):
        self.http, self.grpc_port = free_port(), free_port()
        exe = os.path.join(os.path.dirname(sys.executable), "splitserve")
        self.stderr_path = tmp_path / "serve.stderr"
        self.stderr = open(self.stderr_path, "w")
        self.proc = subprocess.Popen([exe, "serve", *args, "--http-port", str(self.http),
                                      "--grpc-port", str(self.grpc_port)],
                                     stdout=subprocess.PIPE, stderr=self.stderr, text=True,
                                     env={**os.environ, "SPLITSERVE_CLUSTER_TOKEN": "cli-test-token"})
        lines, deadline = [], time.monotonic() + 180
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            assert line, f"serve exited early: {lines} {self.stderr_path.read_text()[-2000:]}"
            lines.append(line)
            if "Ctrl-C" in line:
                break
        self.banner = "".join(lines)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        finally:
            self.stderr.close()


def _no_ray_left(before: int) -> None:
    deadline = time.monotonic() + 30
    while _ray_processes() > before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _ray_processes() <= before, "the Ray that serve started is still running"


def test_serve_command_answers_autoscales_and_stops(tmp_path):
    """``serve --autoscale`` as a user starts it: the banner names its endpoints and the admin token's
    place; it is live and ready over KServe and lists its model over OpenAI. With a catalog whose decode
    model is slow on purpose (25 tokens/s an instance), loaded by ``splitserve bench`` with bursty
    arrivals, the scale-out decision shows on the console as it happens and in the admin API, with its
    id and reasons. Ctrl-C stops it with status 0 and no Ray process left."""
    import tritonclient.grpc as tg
    import yaml
    make_tiny_model(str(tmp_path), "llama", max_position_embeddings=512)
    (tmp_path / "catalog.yaml").write_text(yaml.safe_dump({"instance_types": [
        {"name": "local", "cost_per_hour": 0.1, "prefill": {"a": 0.01, "b": 0.0001},
         "decode": {"a": 0.04, "b": 0.02}}]}))
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump({"autoscale": {
        "catalog": str(tmp_path / "catalog.yaml"), "period_s": 1, "window_s": 5,
        "objectives": {"tpot_s": 0.1, "min_samples": 10**6, "up_cooldown_s": 0}}}))
    before = _ray_processes()
    serve = Serve(tmp_path, "--config", str(tmp_path / "serve.yaml"), "--autoscale", "--max-decode", "2",
                  "--model", str(tmp_path), "--model-name", "tiny", "--dtype", "float32")
    try:
        http, grpc_port = serve.http, serve.grpc_port
        assert f"127.0.0.1:{grpc_port}" in serve.banner and f"http://127.0.0.1:{http}/v1" in serve.banner
        assert f"http://127.0.0.1:{http}/admin/workers" in serve.banner and "$SPLITSERVE_CLUSTER_TOKEN" in serve.banner
        client = tg.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        assert client.is_server_live() and client.is_server_ready()
        client.close()
        with urllib.request.urlopen(f"http://127.0.0.1:{http}/v1/models", timeout=30) as r:
            assert json.load(r)["data"][0]["id"] == "tiny"
        exe = os.path.join(os.path.dirname(sys.executable), "splitserve")
        bench = subprocess.run([exe, "bench", "--url", f"127.0.0.1:{serve.grpc_port}", "--model", "tiny",
                                "--rate", "8", "--burstiness", "3", "--duration", "8", "--warmup", "0",
                                "--max-tokens", "16", "--out", str(tmp_path / "bench"), "--no-progress"],
                               capture_output=True, text=True, timeout=300)
        assert bench.returncode == 0, bench.stderr[-2000:]
        deadline = time.monotonic() + 30
        while "add decode local x1" not in serve.stderr_path.read_text() and time.monotonic() < deadline:
            time.sleep(0.5)
        log = serve.stderr_path.read_text()
        line = next(x for x in log.splitlines() if "add decode local x1" in x)
        assert line.startswith("autoscaler decision-") and "decode: demand" in line and "tokens/s wants" in line
        req = urllib.request.Request(f"http://127.0.0.1:{serve.http}/admin/autoscaler?acted=1",
                                     headers={"x-splitserve-token": "cli-test-token"})
        with urllib.request.urlopen(req, timeout=30) as r:
            body = json.load(r)
        assert body["enabled"] and body["snapshot"]["pools"]["decode"]["token_rate"] >= 0
        acted = [d for d in body["decisions"] if d["actions"]]
        assert acted and acted[0]["id"] == line.split()[1].rstrip(":")
        assert acted[0]["actions"][0] == {"kind": "add", "pool": "decode", "instance_type": "local", "count": 1,
                                          "worker": None, "target": None}
    finally:
        code = serve.stop()
    assert code == 0
    _no_ray_left(before)
