"""Server configuration: from flags or one YAML file (``splitserve serve --config FILE``).

    model: null                # .gguf / HF dir; null = the default SmolLM2
    dtype: auto                # auto (bfloat16 if a pool is on cuda or the CPU has AMX, else float32) | float32 | bfloat16
    mode: disaggregated        # or colocated (prefill and decode in one engine: the baseline)
    prefill: {replicas: 1, threads: 1, resources: {}, kv_cache_memory_mb: 256}
    decode:  {replicas: 1, threads: 1, resources: {}, kv_cache_memory_mb: 512}
                               # device: cpu | cuda (each worker asks Ray for one GPU and runs there)
                               # instance_type: a catalog entry (with autoscale: where the workers go)
    http_port: 8000            # Ray Serve's own defaults
    grpc_port: 9000
    model_name: smollm2        # the name clients address (KServe model_name, OpenAI model)
    quantization: none         # none | int8 | int4 weights; a pool may override it (prefill: {quantization: none})
    kv_wire_codec: raw         # raw | int8: how prefill sends KV to decode (int8: about half the bytes)
    kv_host: 127.0.0.1         # where decode workers listen for KV; 0.0.0.0: each advertises its node's IP
    kv_port: 0                 # 0: any free port; fixed (one decode worker per node): $SPLITSERVE_KV_PORT too
    kv_tls: null               # mutual TLS on the KV plane: {cert, key, ca: PEM files on every node,
                               # server_name: a DNS name every worker certificate carries (else IP SANs)};
                               # or $SPLITSERVE_KV_TLS_CERT/_KEY/_CA/_SERVER_NAME (a mounted Secret)
    speculative: off           # off | ngram | draft: speculative decoding where decode runs (draft: int4 self-draft)
    cuda_graphs: auto          # auto: workers on cuda replay decode steps from CUDA graphs | off
    autoscale:                 # optional: size the pools to latency objectives (splitserve/autoscaler)
      catalog: catalog.yaml    # instance types: cost, Ray resources, step-time models
      objectives: {ttft_s: 2.0, tpot_s: 0.1, percentile: 90, budget_per_hour: null,
                   prefill: {min: 1, max: 4}, decode: {min: 1, max: 4}}
      period_s: 5
      nodes: none              # none | ray (Ray's autoscaler: request_resources) | kuberay (worker group
                               # replicas; kuberay: {namespace, rayservice, groups: {type: group}})
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field, fields, replace

from splitserve.kvtransfer.endpoint import checked_port, port_from_env  # pure, no grpc
from splitserve.kvtransfer.tls import KVTLS, checked_tls  # grpc only when credentials are built

from splitserve.platform.auth import check_keys, keys_from_env  # pure, no torch

QUANTIZATION_MODES = ("none", "int8", "int4")  # = splitserve.kernels.linear.QUANTIZATION_MODES (not imported: no torch here)
KV_CODECS = ("raw", "int8")  # = splitserve.kvtransfer.wire.KV_CODECS
POOL_DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class PoolConfig:
    replicas: int = 1
    threads: int = 1  # torch threads per actor (and the CPUs it reserves from Ray)
    resources: dict = field(default_factory=dict)  # extra Ray resources / placement, e.g. {"accelerator_type:L4": 1}
    device: str = "cpu"  # "cpu" | "cuda": each worker asks Ray for one GPU (num_gpus=1) and its engine runs there
    kv_cache_memory_mb: int = 256
    max_num_batched_tokens: int = 512
    max_num_seqs: int = 64
    chunked_prefill: bool = True  # colocated mode: False = whole prompts per step (no chunking)
    quantization: str | None = None  # None: the server-wide setting
    instance_type: str | None = None  # an autoscaler catalog entry: where its workers go (None: anywhere)


@dataclass(frozen=True)
class AutoscaleConfig:
    """``autoscale:`` in the YAML (or ``serve --autoscale --catalog FILE``)."""
    catalog: str  # a YAML instance catalog (``splitserve profile`` writes one)
    objectives: dict = field(default_factory=dict)  # autoscaler.policy.Objectives fields (ttft_s, tpot_s,
    #                                                 percentile, budget_per_hour, prefill/decode: {min, max}, ...)
    period_s: float = 5.0  # one decision every period (0: only on demand)
    nodes: str = "none"  # who provides the instances' nodes: none (they are there) | ray (Ray's autoscaler,
    #                      request_resources) | kuberay (worker group replicas of the RayCluster)
    kuberay: dict = field(default_factory=dict)  # nodes: kuberay: {namespace, rayservice | raycluster, groups}
    window_s: float = 30.0  # the signals' sliding window (workers keep 60 s)

    def load(self):
        """(Catalog, Objectives), checked: a clear error for a missing file or a bad field."""
        from splitserve.autoscaler.catalog import Catalog
        from splitserve.autoscaler.decision import Objectives
        if not os.path.isfile(self.catalog):
            raise ValueError(f"autoscale.catalog: no file {self.catalog!r} (write one with `splitserve profile "
                             f"--out FILE`, or declare instance_types in YAML)")
        known = set(Objectives.__dataclass_fields__)
        unknown = set(self.objectives) - known
        if unknown:
            raise ValueError(f"autoscale.objectives: unknown keys {sorted(unknown)}; allowed: {sorted(known)}")
        if self.nodes not in ("none", "ray", "kuberay"):
            raise ValueError(f"autoscale.nodes must be 'none', 'ray' or 'kuberay'; got {self.nodes!r}")
        if self.period_s < 0:
            raise ValueError(f"autoscale.period_s must be >= 0, got {self.period_s}")
        if not 0 < self.window_s <= 60:
            raise ValueError(f"autoscale.window_s must be in (0, 60] seconds, got {self.window_s}")
        return Catalog.from_yaml(self.catalog), Objectives(**self.objectives)


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
    kv_host: str = "127.0.0.1"  # where decode workers listen for KV: 127.0.0.1 (one machine), 0.0.0.0 (a cluster:
    #                             each then advertises its own node's IP; kvtransfer/endpoint.py)
    kv_port: int = field(default_factory=port_from_env)  # 0: any free port; default $SPLITSERVE_KV_PORT
    kv_tls: KVTLS | None = field(default_factory=KVTLS.from_env)  # mutual TLS (kvtransfer/tls.py); None: off
    cluster_token: str = field(default_factory=lambda: os.environ.get("SPLITSERVE_CLUSTER_TOKEN")
                               or secrets.token_hex(16))
    max_queue_wait_s: float = 30.0  # a request waits this long for capacity, then RESOURCE_EXHAUSTED
    max_queued_requests: int = 256  # requests the front door holds at once (waiting, prefilling or decoding)
    prefill_queue_limit: int = 32  # requests one prefill worker holds at once; more: it says busy
    retry_after_s: int = 2  # the Retry-After a refused (429) request is given
    recovery_wait_s: float = 60.0  # a request whose worker died waits this long to be placed again (a restart)
    # the first token goes to the client once a decode worker holds room for the request, while its KV moves;
    # False: once the KV has moved (the baseline of benchmarks/bench_first_token.py)
    early_first_token: bool = True
    # a prefill worker sends each layer's KV while the next layers compute (it reserves decode room before the
    # prefill); False: the KV goes once the prefill is done (the baseline of benchmarks/bench_first_token.py)
    kv_layer_overlap: bool = True
    # share the KV of equal prompt prefixes between requests on each worker, and route a prompt to the prefill
    # worker holding its longest prefix (unless its queue outweighs the saving); False: neither
    prefix_caching: bool = True
    # a decode worker's outputs reach the front door as one message per engine step for all its requests
    # (decode/outbox.py); False: one Ray object per token per request (the baseline of bench_output_path.py)
    batched_outputs: bool = True
    quantization: str = "none"  # weights of every pool unless the pool says otherwise
    kv_wire_codec: str = "raw"
    speculative: str = "off"  # decode pool (or colocated engine): "off" | "ngram" | "draft" (int4 self-draft)
    cuda_graphs: str = "auto"  # workers on cuda replay decode steps from CUDA graphs; "off": eager launches
    autoscale: AutoscaleConfig | None = None  # None: fixed pools (the replicas above)
    # front-door API keys (platform/auth.py); () = open. Default: $SPLITSERVE_API_KEYS (comma-separated)
    api_keys: tuple = field(default_factory=keys_from_env, repr=False)

    def __post_init__(self):
        if self.mode not in ("disaggregated", "colocated"):
            raise ValueError(f"mode must be 'disaggregated' or 'colocated', got {self.mode!r}")
        if self.http_port == self.grpc_port and self.http_port:
            raise ValueError(f"http_port and grpc_port must differ (the HTTP and gRPC front doors each need "
                             f"their own port), both are {self.http_port}")
        for name in ("prefill", "decode"):
            pool = getattr(self, name)
            if isinstance(pool, dict):
                object.__setattr__(self, name, PoolConfig(**pool))
            if getattr(self, name).replicas < 1:
                raise ValueError(f"{name}.replicas must be >= 1")
            if getattr(self, name).device not in POOL_DEVICES:
                raise ValueError(f"{name}.device must be one of {POOL_DEVICES} (Ray assigns a cuda worker its GPU); "
                                 f"got {getattr(self, name).device!r}")
            if {"GPU", "CPU"} & set(getattr(self, name).resources):
                raise ValueError(f"{name}.resources cannot name CPU or GPU (Ray takes them as num_cpus / num_gpus): "
                                 f"use {name}.threads and {name}.device: cuda")
            if getattr(self, name).quantization not in (None, *QUANTIZATION_MODES):
                raise ValueError(f"{name}.quantization must be one of {QUANTIZATION_MODES}; "
                                 f"got {getattr(self, name).quantization!r}")
        if self.quantization not in QUANTIZATION_MODES:
            raise ValueError(f"quantization must be one of {QUANTIZATION_MODES}; got {self.quantization!r}")
        if self.speculative is False:  # YAML reads a bare `off` as false
            object.__setattr__(self, "speculative", "off")
        if self.speculative not in ("off", "ngram", "draft"):
            raise ValueError(f"speculative must be 'off', 'ngram' or 'draft'; got {self.speculative!r}")
        if isinstance(self.autoscale, dict):
            object.__setattr__(self, "autoscale", AutoscaleConfig(**self.autoscale))
        if self.autoscale is not None and self.mode != "disaggregated":
            raise ValueError("autoscale sizes the prefill and decode pools: it needs mode 'disaggregated'")
        if self.cuda_graphs is False:  # YAML reads a bare `off` as false
            object.__setattr__(self, "cuda_graphs", "off")
        if self.cuda_graphs not in ("auto", "off"):
            raise ValueError(f"cuda_graphs must be 'auto' or 'off'; got {self.cuda_graphs!r}")
        if self.kv_wire_codec not in KV_CODECS:
            raise ValueError(f"kv_wire_codec must be one of {KV_CODECS}; got {self.kv_wire_codec!r}")
        for name in ("max_queued_requests", "prefill_queue_limit", "retry_after_s"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_queue_wait_s", "recovery_wait_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {getattr(self, name)}")
        object.__setattr__(self, "kv_port", checked_port(self.kv_port))
        object.__setattr__(self, "kv_tls", checked_tls(self.kv_tls))
        object.__setattr__(self, "api_keys", check_keys(self.api_keys))

    @classmethod
    def from_yaml(cls, path: str, **overrides) -> "ServeConfig":
        import yaml
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
        return cls.from_dict(raw, **overrides)

    @classmethod
    def from_dict(cls, raw: dict, where: str = "config", **overrides) -> "ServeConfig":
        """The YAML file's fields as a dict (e.g. a RayService's application ``args``), checked: an
        unknown key or a value of the wrong type is a ValueError naming it and what is allowed."""
        _check_keys(cls, raw, where)
        for name, kind in (("prefill", PoolConfig), ("decode", PoolConfig), ("autoscale", AutoscaleConfig)):
            if raw.get(name) is not None:
                _check_keys(kind, raw[name], f"{where}.{name}")
        return replace(cls(**raw), **{k: v for k, v in overrides.items() if v is not None})


def _check_keys(cls, raw, where: str) -> None:
    """Every key of ``raw`` a field of ``cls``, and a field with a number, string or bool default given
    a value of that type."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where} must be a mapping of {cls.__name__} fields, got {type(raw).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = set(raw) - set(known)
    if unknown:
        raise ValueError(f"unknown {where} keys {sorted(unknown)}; allowed: {sorted(known)}")
    for key, value in raw.items():
        default = known[key].default
        kinds = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}.get(type(default))
        if kinds and not (isinstance(value, kinds) and (bool in kinds or not isinstance(value, bool))):
            if not (key in ("speculative", "cuda_graphs") and value is False):  # YAML reads a bare `off` as false
                raise ValueError(f"{where}.{key} must be {type(default).__name__}, got {value!r}")


def engine_kwargs(cfg: ServeConfig, pool: PoolConfig, decodes: bool = True) -> dict:
    """LLMEngine keyword arguments for one worker of ``pool`` (``decodes``: it runs decode steps). ``dtype:
    auto`` is resolved here, on the machine that starts the workers, not on each worker's node: KV moves
    between workers only in one dtype, and nodes of different CPUs would resolve it differently (with a
    pool on GPUs: bfloat16 everywhere)."""
    import torch

    from splitserve.engine.engine import dtype_name
    on_gpu = any(p.device == "cuda" for p in (cfg.prefill, cfg.decode))
    dtype = dtype_name(cfg.dtype, torch.device("cuda") if on_gpu else torch.device("cpu"))
    return dict(speculative=cfg.speculative if decodes else "off", model=cfg.model, dtype=dtype, device=pool.device,
                block_size=cfg.block_size, num_threads=pool.threads,
                kv_cache_memory=pool.kv_cache_memory_mb << 20,
                max_num_batched_tokens=pool.max_num_batched_tokens if pool.chunked_prefill else 1 << 20,
                max_num_seqs=pool.max_num_seqs, quantization=pool.quantization or cfg.quantization,
                prefix_caching=cfg.prefix_caching, cuda_graphs=cfg.cuda_graphs, show_progress=False)
