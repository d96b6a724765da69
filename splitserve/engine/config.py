"""The model configuration our forward pass needs, read from a Hugging Face
``config.json`` dict or from GGUF metadata (see ``weights/gguf_loader.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from splitserve.errors import CorruptModelError, UnsupportedModelError

# model_type -> has q/k/v bias
SUPPORTED_ARCHITECTURES = {"llama": False, "mistral": False, "qwen2": True}


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False
    # rope_type ("default", "linear", "dynamic", "llama3", "yarn") plus its parameters
    rope_scaling: dict = field(default_factory=dict)
    name: str = ""

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise CorruptModelError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise CorruptModelError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")

    @property
    def num_queries_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf(cls, cfg: dict, name: str = "") -> "ModelConfig":
        model_type = cfg.get("model_type", "")
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"model_type {model_type!r} is not supported; supported: {sorted(SUPPORTED_ARCHITECTURES)}"
            )
        try:
            hidden = cfg["hidden_size"]
            heads = cfg["num_attention_heads"]
            rope = dict(cfg.get("rope_scaling") or cfg.get("rope_parameters") or {})
            theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
            rope.pop("rope_theta", None)
            if "type" in rope and "rope_type" not in rope:
                rope["rope_type"] = rope.pop("type")
            if cfg.get("partial_rotary_factor", rope.get("partial_rotary_factor", 1.0)) != 1.0:
                raise UnsupportedModelError("partial rotary embeddings are not supported (allowed: 1.0)")
            return cls(
                architecture=model_type,
                vocab_size=cfg["vocab_size"],
                hidden_size=hidden,
                intermediate_size=cfg["intermediate_size"],
                num_layers=cfg["num_hidden_layers"],
                num_heads=heads,
                num_kv_heads=cfg.get("num_key_value_heads") or heads,
                head_dim=cfg.get("head_dim") or hidden // heads,
                rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
                rope_theta=float(theta),
                max_position_embeddings=cfg.get("max_position_embeddings", 2048),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                attention_bias=SUPPORTED_ARCHITECTURES[model_type] or bool(cfg.get("attention_bias", False)),
                rope_scaling=rope if rope.get("rope_type", "default") != "default" else {},
                name=name,
            )
        except KeyError as e:
            raise CorruptModelError(f"config.json lacks required field {e.args[0]!r}") from None
