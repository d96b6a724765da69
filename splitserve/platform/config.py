"""Server configuration: from flags or one YAML file (``splitserve serve --config FILE``).

    model: null                # .gguf / HF dir; null = the default SmolLM2
    dtype: auto
    mode: disaggregated        # or colocated (prefill and decode in one engine: the baseline)
    prefill: {replicas: 1, threads: 1, resources: {}, kv_cache_memory_mb: 256}
    decode:  {replicas: 1, threads: 1, resources: {}, kv_cache_memory_mb: 512}
    http_port: 8000            # Ray Serve's own defaults
    grpc_port: 9000
    model_name: smollm2        # the name clients address (KServe model_name, OpenAI model)
    quantization: none         # none | int8 | int4 weights; a pool may override it (prefill: {quantization: none})
    kv_wire_codec: raw         # raw | int8: how prefill sends KV to decode (int8: about half the bytes)
    speculative: off           # off | ngram | draft: speculative decoding where decode runs (draft: int4 self-draft)
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field, fields, replace

QUANTIZATION_MODES = ("none", "int8", "int4")  # = splitserve.kernels.linear.QUANTIZATION_MODES (not imported: no torch here)
KV_CODECS = ("raw", "int8")  # = splitserve.kvtransfer.wire.KV_CODECS


@dataclass(frozen=True)
class PoolConfig:
    replicas: int = 1
    threads: int = 1  # torch threads per actor (and the CPUs it reserves from Ray)
    resources: dict = field(default_factory=dict)  # extra Ray resources / placement, e.g. {"GPU": 1}
    kv_cache_memory_mb: int = 256
    max_num_batched_tokens: int = 512
    max_num_seqs: int = 64
    chunked_prefill: bool = True  # colocated mode: False = whole prompts per step (no chunking)
    quantization: str | None = None  # None: the server-wide setting


@dataclass(frozen=True)
class ServeConfig:
    model: str | None = None
    model_name: str = "smollm2"
    dtype: str = "auto"
    mode: str = "disaggregated"
    block_size: int = 16
    prefill: PoolConfig = field(default_factory=PoolConfig)
    decode: PoolConfig = field(default_factory=lambda: PoolConfig(kv_cache_memory_mb=512))
    http_host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 9000
    kv_host: str = "127.0.0.1"  # the address decode workers serve KV on (a node IP on a real cluster)
    cluster_token: str = field(default_factory=lambda: os.environ.get("SPLITSERVE_CLUSTER_TOKEN")
                               or secrets.token_hex(16))
    max_queue_wait_s: float = 30.0  # a request waits this long for capacity, then RESOURCE_EXHAUSTED
    max_queued_requests: int = 256
    quantization: str = "none"  # weights of every pool unless the pool says otherwise
    kv_wire_codec: str = "raw"
    speculative: str = "off"  # decode pool (or colocated engine): "off" | "ngram" | "draft" (int4 self-draft)

    def __post_init__(self):
        if self.mode not in ("disaggregated", "colocated"):
            raise ValueError(f"mode must be 'disaggregated' or 'colocated', got {self.mode!r}")
        for name in ("prefill", "decode"):
            pool = getattr(self, name)
            if isinstance(pool, dict):
                object.__setattr__(self, name, PoolConfig(**pool))
            if getattr(self, name).replicas < 1:
                raise ValueError(f"{name}.replicas must be >= 1")
            if getattr(self, name).quantization not in (None, *QUANTIZATION_MODES):
                raise ValueError(f"{name}.quantization must be one of {QUANTIZATION_MODES}; "
                                 f"got {getattr(self, name).quantization!r}")
        if self.quantization not in QUANTIZATION_MODES:
            raise ValueError(f"quantization must be one of {QUANTIZATION_MODES}; got {self.quantization!r}")
        if self.speculative is False:  # YAML reads a bare `off` as false
            object.__setattr__(self, "speculative", "off")
        if self.speculative not in ("off", "ngram", "draft"):
            raise ValueError(f"speculative must be 'off', 'ngram' or 'draft'; got {self.speculative!r}")
        if self.kv_wire_codec not in KV_CODECS:
            raise ValueError(f"kv_wire_codec must be one of {KV_CODECS}; got {self.kv_wire_codec!r}")

    @classmethod
    def from_yaml(cls, path: str, **overrides) -> "ServeConfig":
        import yaml
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
        known = {f.name for f in fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}; allowed: {sorted(known)}")
        return replace(cls(**raw), **{k: v for k, v in overrides.items() if v is not None})


def engine_kwargs(cfg: ServeConfig, pool: PoolConfig, decodes: bool = True) -> dict:
    """LLMEngine keyword arguments for one worker of ``pool`` (``decodes``: it runs decode steps)."""
    return dict(speculative=cfg.speculative if decodes else "off",model=cfg.model, dtype=cfg.dtype, block_size=cfg.block_size, num_threads=pool.threads,
                kv_cache_memory=pool.kv_cache_memory_mb << 20,
                max_num_batched_tokens=pool.max_num_batched_tokens if pool.chunked_prefill else 1 << 20,
                max_num_seqs=pool.max_num_seqs, quantization=pool.quantization or cfg.quantization,
                show_progress=False)
