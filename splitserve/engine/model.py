"""The Llama-family decoder (Llama 2/3, SmolLM2, Mistral, Qwen2) over a paged KV cache.

    x = embed(input_ids)
    for each layer:
        h = x + o_proj(attention(rope(q), rope(k), v))      q,k,v = qkv_proj(rmsnorm(x))
        x = h + down_proj(silu(gate) * up)                  gate,up = gate_up_proj(rmsnorm(h))
    logits = lm_head(rmsnorm(x)[logits_indices])

Each residual add is fused into the norm that follows it, and every op goes
through ``splitserve.kernels.ops`` (Triton on GPU, torch CPU paths otherwise).

The residual stream ``x`` stays fp32 whatever the weights' dtype: SmolLM2's
carries outliers near 25k, where bf16 resolves only steps of 128. Norms
hand the matmuls their inputs in the weights' dtype (bf16 or fp32).

Weights use Hugging Face names and layout; q/k/v and gate/up are fused into one
linear each at load (``_fuse``). Quantization (``kernels/linear.py``) swaps
modules of a built model; this file stays the plain definition.
"""

from __future__ import annotations

import torch
from torch import nn

from splitserve.engine.attention import AttentionMetadata, paged_attention
from splitserve.engine.config import ModelConfig
from splitserve.engine.device import HOST
from splitserve.errors import CorruptModelError
from splitserve.engine.rope import RotaryEmbedding
from splitserve.kernels import ops
from splitserve.kernels.quant import cat_rows


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, delta: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        # x: [N, hidden] fp32 residual stream; delta (added first) -> (x + delta, normalised in the weights' dtype)
        return ops.add_rms_norm(x, delta, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.qk_size = q_size + kv_size
        self.qkv_proj = nn.Linear(cfg.hidden_size, q_size + 2 * kv_size, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(q_size, cfg.hidden_size, bias=False)

    def forward(self, x, kv_layer, meta: AttentionMetadata, rope_tables):
        n = x.shape[0]  # x: [N, hidden]
        qkv = self.qkv_proj(x)  # [N, (Hq + 2 Hkv) * D]
        qk = qkv[:, :self.qk_size].view(n, self.num_heads + self.num_kv_heads, self.head_dim)
        qk = ops.rotary(qk, *rope_tables)  # q and k rotated together: [N, Hq + Hkv, D]
        q, k = qk[:, :self.num_heads], qk[:, self.num_heads:]  # [N, Hq, D], [N, Hkv, D]
        v = qkv[:, self.qk_size:].view(n, self.num_kv_heads, self.head_dim)
        out = paged_attention(q, k, v, kv_layer, meta)  # [N, Hq, D]
        return self.o_proj(out.reshape(n, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(ops.silu_and_mul(self.gate_up_proj(x)))  # [N, 2 I] -> [N, I] -> [N, hidden]


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, delta, kv_layer, meta, rope_tables):
        # x: residual stream [N, hidden] fp32; delta: the previous layer's MLP output, not yet added
        x, h = self.input_layernorm(x, delta)
        x, h = self.post_attention_layernorm(x, self.self_attn(h, kv_layer, meta, rope_tables))
        return x, self.mlp(h)  # the residual add of this MLP output is fused into the next norm


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype = torch.float32, max_positions: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.dtype = dtype
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rope = RotaryEmbedding(cfg, max_positions or cfg.max_position_embeddings, dtype)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,  # [N]
        kv_cache: torch.Tensor,  # [L, num_blocks, 2, bs, Hkv, D]
        meta: AttentionMetadata,
        logits_indices: torch.Tensor,  # [S]: rows of the batch whose next token is wanted
        on_layer=None,  # called with i once layer i's KV is written (engine/kv_stream.py)
    ) -> torch.Tensor:  # [S, vocab] fp32
        x, delta = self.embed_tokens(input_ids).float(), None  # [N, hidden] fp32 residual stream
        rope_tables = self.rope.tables(meta.positions)
        for i, layer in enumerate(self.layers):
            x, delta = layer(x, delta, kv_cache[i], meta, rope_tables)
            if on_layer is not None:
                on_layer(i)
        _, x = self.norm(x[logits_indices], delta[logits_indices])  # [S, hidden]
        return self.lm_head(x).float()

    @classmethod
    def from_state_dict(cls, cfg: ModelConfig, state: dict[str, torch.Tensor], dtype: torch.dtype,
                        max_positions: int | None = None, device: torch.device = HOST) -> "LlamaForCausalLM":
        """Build the model on ``device`` from Hugging Face-named tensors (``model.layers.0.self_attn.q_proj.weight``
        ...) that the loader read into host memory."""
        fused = _fuse(cfg, state, dtype)
        quantized = {k: fused.pop(k) for k in list(fused) if not isinstance(fused[k], torch.Tensor)}
        with torch.device("meta"):
            model = cls(cfg, dtype, max_positions)
        if quantized:  # int8/int4 weights straight from the file: swap in quantized modules
            from splitserve.kernels.linear import install_quantized
            install_quantized(model, quantized, fused, dtype, device)
        if device.type != "cpu":  # tied weights (the LM head and the embedding) stay one tensor
            moved: dict[int, torch.Tensor] = {}
            for k, t in fused.items():
                if id(t) not in moved:
                    moved[id(t)] = t.to(device)
                fused[k] = moved[id(t)]
        model.load_state_dict(fused, strict=True, assign=True)
        model.rope = RotaryEmbedding(cfg, max_positions or cfg.max_position_embeddings, dtype, device)
        return model.eval()


def _fuse(cfg: ModelConfig, state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """HF tensor names -> our module names, with q/k/v and gate/up concatenated.

    Values are float tensors or quantized weights (``kernels/quant.py``), which pass through.
    """
    def take(name: str):
        try:
            w = state.pop(name)
        except KeyError:
            raise CorruptModelError(f"weights lack tensor {name!r}") from None
        return w.to(dtype) if isinstance(w, torch.Tensor) else w

    out = {"embed_tokens.weight": take("model.embed_tokens.weight"), "norm.weight": take("model.norm.weight")}
    if "lm_head.weight" in state:
        out["lm_head.weight"] = take("lm_head.weight")
    else:  # no separate head in the file: it is tied to the embedding (the same tensor)
        out["lm_head.weight"] = out["embed_tokens.weight"]
    for i in range(cfg.num_layers):
        p, o = f"model.layers.{i}.", f"layers.{i}."
        attn, mlp = p + "self_attn.", p + "mlp."
        out[o + "self_attn.qkv_proj.weight"] = cat_rows(
            [take(attn + "q_proj.weight"), take(attn + "k_proj.weight"), take(attn + "v_proj.weight")])
        if cfg.attention_bias:
            out[o + "self_attn.qkv_proj.bias"] = torch.cat(
                [take(attn + "q_proj.bias"), take(attn + "k_proj.bias"), take(attn + "v_proj.bias")])
        out[o + "self_attn.o_proj.weight"] = take(attn + "o_proj.weight")
        out[o + "mlp.gate_up_proj.weight"] = cat_rows([take(mlp + "gate_proj.weight"), take(mlp + "up_proj.weight")])
        out[o + "mlp.down_proj.weight"] = take(mlp + "down_proj.weight")
        out[o + "input_layernorm.weight"] = take(p + "input_layernorm.weight")
        out[o + "post_attention_layernorm.weight"] = take(p + "post_attention_layernorm.weight")
    if state:
        unused = sorted(k for k in state if "rotary_emb" not in k)
        if unused:
            raise CorruptModelError(f"weights hold unexpected tensors, e.g. {unused[:3]}")
    return out
