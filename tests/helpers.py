"""Test helpers: tiny random Hugging Face models on disk, and driving our model directly."""

from __future__ import annotations

import json
import os
import socket

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from splitserve.engine.kv_cache import KVCacheSpec, allocate_kv_cache
from splitserve.engine.runner import StepSequence, prepare_step

SPECIALS = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TINY_VOCAB = 256 + len(SPECIALS)


_GIVEN: set[int] = set()


def free_port() -> int:
    """A loopback port nobody listens on now (never assume 8000 / 9000), and none this process was given
    before: the kernel may hand the same free port to two binds in a row (a server's HTTP and gRPC ports
    once came out equal)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _GIVEN:
            _GIVEN.add(port)
            return port


def kserve_inputs(prompt: str, params: dict | None = None, stream: bool | None = None,
                  exclude: bool | None = None) -> list:
    """tritonclient inputs of one request: the text, its sampling parameters (JSON) and the optional BOOL
    flags ``stream`` and ``exclude_input_in_output`` (left out when None)."""
    import numpy as np
    import tritonclient.grpc as tg
    t = tg.InferInput("text_input", [1], "BYTES")
    t.set_data_from_numpy(np.array([prompt.encode()], dtype=object))
    inputs = [t]
    if params is not None:
        s = tg.InferInput("sampling_parameters", [1], "BYTES")
        s.set_data_from_numpy(np.array([json.dumps(params).encode()], dtype=object))
        inputs.append(s)
    for name, value in (("stream", stream), ("exclude_input_in_output", exclude)):
        if value is not None:
            b = tg.InferInput(name, [1], "BOOL")
            b.set_data_from_numpy(np.array([value], dtype=bool))
            inputs.append(b)
    return inputs


def admin(server, method: str, path: str, body=None) -> tuple[int, dict]:
    """Call a running server's admin API (with its cluster token); (HTTP status, JSON body)."""
    import urllib.error
    import urllib.request
    req = urllib.request.Request(server.endpoints["http"] + path, method=method,
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"x-splitserve-token": server.cfg.cluster_token,
                                          "content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def byte_level_tokenizer() -> Tokenizer:
    """A byte-level BPE with no merges: one token per byte, plus the special tokens."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    return tok


def tiny_config(arch: str = "llama", **overrides):
    from transformers import LlamaConfig, Qwen2Config

    kw = dict(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
              tie_word_embeddings=False, bos_token_id=256, eos_token_id=257)
    kw.update(overrides)
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": LlamaConfig}[arch]
    return cls(**kw)


def make_tiny_model(path: str, arch: str = "llama", seed: int = 0, **overrides):
    """Save a randomly initialised tiny model + tokenizer to ``path``; returns the HF model (fp32, eval)."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(arch, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32).eval()
    with torch.no_grad():  # random init leaves norms at 1 and biases at 0: make them matter
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    byte_level_tokenizer().save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"chat_template": CHAT_TEMPLATE, "eos_token": "</s>", "bos_token": "<s>"}, f)
    return model


def hf_logits(model, token_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([token_ids])).logits[0].float()  # [T, V]


def our_logits_chunked(model, token_ids: list[int], chunks: list[int], block_size: int = 4,
                       num_blocks: int = 64) -> torch.Tensor:
    """Run ``token_ids`` through our model in chunks of the given sizes; logits at every position."""
    cfg = model.cfg
    kv = allocate_kv_cache(KVCacheSpec(cfg.num_layers, num_blocks, block_size, cfg.num_kv_heads,
                                       cfg.head_dim, model.dtype))
    table = tuple(reversed(range(num_blocks)))  # deliberately non-contiguous, descending block ids
    outs, start = [], 0
    for n in chunks:
        step = prepare_step([StepSequence(token_ids[start:start + n], start, table, True)], block_size, kv.dtype)
        outs.append(model(step.input_ids, kv, step.meta, torch.arange(n)))
        start += n
    assert start == len(token_ids)
    return torch.cat(outs)


class FakeMultinodeCluster:
    """Ray's own autoscaler with its ``fake_multinode`` provider, on this machine: ``ray start --head``
    with an autoscaling config whose node types start real raylets (typed by their resources) when
    work asks for them, and stop them when idle. The Ray 2.60 wheel lacks the provider's example
    YAML, so the whole config is written here. Everything listens on loopback, on a free port.
    Like Ray's own ``AutoscalingCluster``, it ends with ``ray stop --force``, which stops every Ray
    on the machine: tests run one at a time. Its tests must come before any test module that starts a
    Ray of its own in the pytest process (after one, the controller actor of the next cluster was seen
    cancelled before it ran), hence the names of the later modules (test_serving_*)."""

    def __init__(self, head_resources: dict, node_types: dict, idle_timeout_minutes: float = 0.05):
        self.port = free_port()
        self.head_resources, self.node_types, self.idle = dict(head_resources), node_types, idle_timeout_minutes
        self.address = f"127.0.0.1:{self.port}"

    def _env(self) -> dict:
        import sys
        bindir = os.path.dirname(sys.executable)
        return {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
                "RAY_AUTH_MODE": "disabled", "PATH": bindir + os.pathsep + os.environ.get("PATH", "")}

    def start(self, config_dir: str) -> "FakeMultinodeCluster":
        import subprocess
        config = {
            "cluster_name": "splitserve-test", "max_workers": sum(t.get("max_workers", 1) for t in self.node_types.values()),
            "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                         "disable_launch_config_check": True, "gcs_address": self.address},
            "available_node_types": {"ray.head.default": {"resources": self.head_resources, "node_config": {},
                                                          "max_workers": 0},
                                     **{name: {"node_config": {}, "min_workers": 0, **t}
                                        for name, t in self.node_types.items()}},
            "head_node_type": "ray.head.default", "auth": {}, "upscaling_speed": 1.0,
            "idle_timeout_minutes": self.idle, "docker": {}, "initialization_commands": [], "setup_commands": [],
            "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
            "worker_start_ray_commands": [], "file_mounts": {}, "cluster_synced_files": [],
            "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": []}
        path = os.path.join(config_dir, "fake_multinode.json")
        with open(path, "w") as f:
            json.dump(config, f)
        head = dict(self.head_resources)
        cmd = ["ray", "start", "--head", f"--port={self.port}", f"--autoscaling-config={path}",
               "--node-ip-address=127.0.0.1", "--include-dashboard=false", "--disable-usage-stats",
               f"--num-cpus={head.pop('CPU', 1)}"]
        if head:
            cmd.append(f"--resources={json.dumps(head)}")
        subprocess.run(["ray", "stop", "--force"], env=self._env(), capture_output=True)
        subprocess.run(cmd, env=self._env(), check=True, capture_output=True)
        os.environ["RAY_AUTH_MODE"] = "disabled"  # this process joins it as a driver
        return self

    def shutdown(self) -> None:
        import subprocess
        subprocess.run(["ray", "stop", "--force"], env=self._env(), capture_output=True)
        os.environ.pop("RAY_AUTH_MODE", None)
