"""Our forward pass against transformers' implementation (the independent reference)."""

import pytest
import torch

from helpers import hf_logits, make_tiny_model, our_logits_chunked
from splitserve.engine.model import LlamaForCausalLM
from splitserve.engine.weights import load_model

ROPES = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
}


def _load_ours(path, dtype=torch.float32):
    loaded = load_model(str(path))
    return LlamaForCausalLM.from_state_dict(loaded.config, loaded.state, dtype)


def _tokens(n, seed=1, vocab=256):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g).tolist()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("tied", [False, True])
def test_tiny_logits_match_transformers(tmp_path, arch, tied):
    hf = make_tiny_model(str(tmp_path), arch, tie_word_embeddings=tied)
    ours = _load_ours(tmp_path)
    if arch == "qwen2":
        assert ours.cfg.attention_bias
    ids = _tokens(37)
    ref = hf_logits(hf, ids)
    # one prefill, then a chunked prefill over cached context, then single-token decodes
    torch.testing.assert_close(our_logits_chunked(ours, ids, [37]), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(our_logits_chunked(ours, ids, [13, 9, 1, 1, 13]), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rope", list(ROPES))
def test_rope_scaling_variants_match_transformers(tmp_path, rope):
    params = {"rope_theta": 10000.0, **({"rope_type": "default"} if ROPES[rope] is None else ROPES[rope])}
    hf = make_tiny_model(str(tmp_path), "llama", rope_parameters=params)
    ours = _load_ours(tmp_path)
    assert ours.cfg.rope_scaling.get("rope_type", "default") == ("default" if rope == "default" else rope)
    ids = _tokens(150, seed=2)  # long enough that scaled low frequencies matter
    torch.testing.assert_close(our_logits_chunked(ours, ids, [100, 1, 49]), hf_logits(hf, ids),
                               rtol=1e-4, atol=1e-4)


def test_legacy_rope_scaling_key_is_read(tmp_path):
    """Older config.json files spell it rope_scaling/type; both spellings give the same model."""
    import json
    hf = make_tiny_model(str(tmp_path), "llama", rope_parameters={"rope_theta": 10000.0, **ROPES["linear"]})
    cfg_file = tmp_path / "config.json"
    raw = json.loads(cfg_file.read_text())
    raw.pop("rope_parameters")
    raw["rope_theta"], raw["rope_scaling"] = 10000.0, {"type": "linear", "factor": 2.0}
    cfg_file.write_text(json.dumps(raw))
    ids = _tokens(40, seed=3)
    torch.testing.assert_close(our_logits_chunked(_load_ours(tmp_path), ids, [40]), hf_logits(hf, ids),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.real_model
def test_real_smollm2_logits_match_transformers(real_engine, hf_real):
    hf, tok = hf_real
    text = "The quick brown fox jumps over the lazy dog. In 1969, Apollo 11 landed on the Moon, and"
    ids = real_engine.tokenizer.encode(text)
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
    ref = hf_logits(hf, ids)
    ours = our_logits_chunked(real_engine.model, ids, [len(ids) - 5, 2, 1, 1, 1], block_size=16)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
