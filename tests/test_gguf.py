"""GGUF loading: dequantization of every supported tensor type, the llama q/k
un-permutation, tokenizer metadata, and clear errors for bad files."""

import struct

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf import quants

from helpers import SPECIALS, hf_logits, make_tiny_model, our_logits_chunked
from splitserve.errors import CorruptModelError, ModelNotFoundError, UnsupportedModelError
from splitserve.engine.model import LlamaForCausalLM
from splitserve.engine.tokenizer import TextTokenizer
from splitserve.engine.weights import load_model
from splitserve.engine.weights.dequant import dequantize


@pytest.mark.parametrize("qtype", [QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0])
def test_dequantize_matches_gguf_reference(qtype):
    x = np.random.default_rng(0).standard_normal((6, 128)).astype(np.float32)
    data = x if qtype == QT.F32 else quants.quantize(x, qtype)
    ours = dequantize(data, qtype, (6, 128))
    ref = torch.from_numpy(quants.dequantize(data, qtype).astype(np.float32)).reshape(6, 128)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    # and the round trip is as close as the format allows
    tol = {QT.F32: 0, QT.F16: 2e-3, QT.BF16: 2e-2, QT.Q8_0: 3e-2}.get(qtype, 0.5)
    assert (ours - torch.from_numpy(x)).abs().max() <= tol


def _scalar_q4_k(block: bytes) -> list[float]:
    """Q4_K decoded value by value from its spec (llama.cpp's dequantize_row_q4_K)."""
    d, dmin = struct.unpack("<ee", block[:4])
    sc, qs = block[4:16], block[16:144]

    def scale_min(j):
        if j < 4:
            return sc[j] & 63, sc[j + 4] & 63
        return (sc[j + 4] & 0xF) | ((sc[j - 4] >> 6) << 4), (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4)

    out = []
    for j in range(4):  # 4 groups of 64 values, 32 bytes each
        (s1, m1), (s2, m2) = scale_min(2 * j), scale_min(2 * j + 1)
        q = qs[32 * j:32 * j + 32]
        out += [d * s1 * (b & 0xF) - dmin * m1 for b in q]
        out += [d * s2 * (b >> 4) - dmin * m2 for b in q]
    return out


def _scalar_q6_k(block: bytes) -> list[float]:
    """Q6_K decoded value by value from its spec (llama.cpp's dequantize_row_q6_K)."""
    ql, qh = block[:128], block[128:192]
    sc = struct.unpack("<16b", block[192:208])
    (d,) = struct.unpack("<e", block[208:210])
    y = [0.0] * 256
    for half in range(2):
        l_, h_, s_, y0 = ql[64 * half:], qh[32 * half:], sc[8 * half:], 128 * half
        for i in range(32):
            q1 = ((l_[i] & 0xF) | (((h_[i] >> 0) & 3) << 4)) - 32
            q2 = ((l_[i + 32] & 0xF) | (((h_[i] >> 2) & 3) << 4)) - 32
            q3 = ((l_[i] >> 4) | (((h_[i] >> 4) & 3) << 4)) - 32
            q4 = ((l_[i + 32] >> 4) | (((h_[i] >> 6) & 3) << 4)) - 32
            k = i // 16
            y[y0 + i], y[y0 + i + 32] = d * s_[k] * q1, d * s_[k + 2] * q2
            y[y0 + i + 64], y[y0 + i + 96] = d * s_[k + 4] * q3, d * s_[k + 6] * q4
    return y


@pytest.mark.parametrize("qtype,scalar", [(QT.Q4_K, _scalar_q4_k), (QT.Q6_K, _scalar_q6_k)])
def test_k_quants_match_their_spec(qtype, scalar):
    rng = np.random.default_rng(1)
    block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
    blocks = rng.integers(0, 256, (2, block_bytes), dtype=np.uint8)
    # put sane f16 scales in (random bytes could be inf/nan)
    scale_at = [0, 2] if qtype == QT.Q4_K else [208]
    for at in scale_at:
        blocks[:, at:at + 2] = np.frombuffer(np.float16([0.01, 0.02]).tobytes(), np.uint8).reshape(2, 2)
    ours = dequantize(blocks, qtype, (2, 256))
    ref = torch.tensor([scalar(bytes(b)) for b in blocks], dtype=torch.float32)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's conversion permutation of q/k rows (what our loader must undo)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path, hf_model, types: dict[str, QT] | None = None, arch: str = "llama"):
    """Write a HF tiny model as a llama GGUF (as llama.cpp's converter would)."""
    cfg = hf_model.config
    types = types or {}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    alphabet = sorted(__import__("tokenizers").pre_tokenizers.ByteLevel.alphabet())
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(alphabet + SPECIALS)
    w.add_token_types([1] * len(alphabet) + [3] * len(SPECIALS))
    w.add_token_merges([])
    w.add_bos_token_id(256)
    w.add_eos_token_id(257)
    names = {"embed_tokens": "token_embd", "norm": "output_norm", "lm_head": "output",
             "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for hf_name, t in hf_model.state_dict().items():
        stem = hf_name.removesuffix(".weight").removeprefix("model.")
        if stem.startswith("layers."):
            _, i, rest = stem.split(".", 2)
            name = f"blk.{i}.{names[rest]}.weight"
        else:
            name = f"{names[stem]}.weight"
        arr = t.float().numpy()
        if "attn_q" in name:
            arr = _permute(arr, cfg.num_attention_heads)
        if "attn_k" in name:
            arr = _permute(arr, cfg.num_key_value_heads)
        qtype = types.get(name.split(".")[-2], QT.F32)
        if qtype == QT.F32 or arr.ndim == 1:
            w.add_tensor(name, np.ascontiguousarray(arr))
        else:
            w.add_tensor(name, quants.quantize(np.ascontiguousarray(arr), qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _ours(path):
    loaded = load_model(str(path))
    return LlamaForCausalLM.from_state_dict(loaded.config, loaded.state, torch.float32), loaded


def test_gguf_f32_model_equals_hf_model(tmp_path):
    """Name mapping and the q/k un-permutation: a lossless GGUF gives the HF model's logits."""
    hf = make_tiny_model(str(tmp_path / "hf"), "llama")
    write_tiny_gguf(tmp_path / "m.gguf", hf)
    ours, loaded = _ours(tmp_path / "m.gguf")
    ids = list(range(5, 45))
    torch.testing.assert_close(our_logits_chunked(ours, ids, [30, 1, 9]), hf_logits(hf, ids), rtol=1e-4, atol=1e-4)
    tok = TextTokenizer.from_gguf(loaded.tokenizer_source)
    assert tok.decode(tok.encode("héllo <|im_end|>"), skip_special_tokens=False) == "héllo <|im_end|>"
    assert tok.encode("<|im_end|>") == [259] and tok.eos_token_ids == {257}


def test_quantized_gguf_matches_transformers_gguf_loader(tmp_path):
    """Mixed Q8_0/Q4_0/Q4_1/F16/BF16 tensors: same logits as transformers' own GGUF loader."""
    from transformers import AutoModelForCausalLM
    hf = make_tiny_model(str(tmp_path / "hf"), "llama")
    types = {"token_embd": QT.Q8_0, "attn_q": QT.Q4_0, "attn_k": QT.Q4_1, "attn_v": QT.Q8_0,
             "attn_output": QT.F16, "ffn_gate": QT.Q4_1, "ffn_up": QT.Q4_0, "ffn_down": QT.BF16, "output": QT.Q8_0}
    write_tiny_gguf(tmp_path / "q.gguf", hf, types)
    ref_model = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="q.gguf", dtype=torch.float32).eval()
    ours, _ = _ours(tmp_path / "q.gguf")
    ids = list(range(40, 80))
    ref = hf_logits(ref_model, ids)
    torch.testing.assert_close(our_logits_chunked(ours, ids, [40]), ref, rtol=1e-4, atol=1e-4)
    assert (ref - hf_logits(hf, ids)).abs().max() > 1e-3  # the quantization really changed the model


def test_missing_model_path_is_reported(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load_model(str(tmp_path / "nope.gguf"))
    with pytest.raises(ModelNotFoundError, match="config.json"):
        load_model(str(tmp_path))


def test_corrupt_gguf_is_reported(tmp_path, real_model_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"definitely not a gguf file" * 100)
    with pytest.raises(CorruptModelError, match="not a readable GGUF"):
        load_model(str(junk))
    cut = tmp_path / "cut.gguf"
    with open(real_model_path, "rb") as f:
        cut.write_bytes(f.read(3_000_000))  # header intact, tensor data truncated
    with pytest.raises(CorruptModelError):
        load_model(str(cut))


def test_unsupported_architecture_is_reported(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "g.gguf"), "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(UnsupportedModelError, match=r"architecture 'gpt2' is not supported; supported: \['llama'"):
        load_model(str(tmp_path / "g.gguf"))
    hf_dir = tmp_path / "hf"
    make_tiny_model(str(hf_dir), "llama")
    cfg = (hf_dir / "config.json").read_text().replace('"model_type": "llama"', '"model_type": "gpt_neox"')
    (hf_dir / "config.json").write_text(cfg)
    with pytest.raises(UnsupportedModelError, match="gpt_neox"):
        load_model(str(hf_dir))


def test_unsupported_tensor_type_is_reported(tmp_path):
    hf = make_tiny_model(str(tmp_path / "hf"), "llama", hidden_size=256, intermediate_size=256,
                         num_attention_heads=4, num_key_value_heads=2)
    write_tiny_gguf(tmp_path / "t.gguf", hf, {"ffn_up": QT.TQ1_0})
    with pytest.raises(UnsupportedModelError, match="tensor type TQ1_0 is not supported; supported: F32"):
        load_model(str(tmp_path / "t.gguf"))
