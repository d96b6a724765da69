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


def test_serve_command_starts_answers_and_stops(tmp_path):
    import tritonclient.grpc as tg

    make_tiny_model(str(tmp_path), "llama", max_position_embeddings=512)
    http, grpc_port = free_port(), free_port()
    exe = os.path.join(os.path.dirname(sys.executable), "splitserve")
    before = _ray_processes()
    proc = subprocess.Popen([exe, "serve", "--model", str(tmp_path), "--model-name", "tiny", "--dtype", "float32",
                             "--http-port", str(http), "--grpc-port", str(grpc_port)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "SPLITSERVE_CLUSTER_TOKEN": "cli-test-token"})
    try:
        lines, deadline = [], time.monotonic() + 180
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, f"serve exited early: {lines}"
            lines.append(line)
            if "Ctrl-C" in line:
                break
        banner = "".join(lines)
        assert f"127.0.0.1:{grpc_port}" in banner and f"http://127.0.0.1:{http}/v1" in banner
        assert f"http://127.0.0.1:{http}/admin/workers" in banner and "$SPLITSERVE_CLUSTER_TOKEN" in banner
        client = tg.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        assert client.is_server_live() and client.is_server_ready()
        client.close()
        with urllib.request.urlopen(f"http://127.0.0.1:{http}/v1/models", timeout=30) as r:
            assert json.load(r)["data"][0]["id"] == "tiny"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert code == 0
    deadline = time.monotonic() + 30
    while _ray_processes() > before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _ray_processes() <= before, "the Ray that serve started is still running"
