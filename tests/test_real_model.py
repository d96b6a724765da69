"""The real SmolLM2-135M-Instruct GGUF against transformers' implementation of the same file."""

import os
import subprocess
import sys

import pytest
import torch

from conftest import assert_no_leaks
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.tokenizer import IncrementalDetokenizer

pytestmark = pytest.mark.real_model

PROMPTS = [
    "The history of the Roman Empire begins",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a small village by the sea, there lived",
]
CHATS = [
    [{"role": "user", "content": "Write a short poem about the ocean."}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Explain photosynthesis."}],
]
TEXTS = ["Hello world 12345 it's", "  spaces\n\nnew\tlines", "Ünïcödé ☃ 日本語 🎉", "x=1234.5678; y='don't'",
         "<|im_start|>user\nhi<|im_end|>"]


def _hf_greedy(hf, ids, n):
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          max_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


def test_greedy_equals_transformers_generate(real_engine, hf_real):
    hf, tok = hf_real
    prompts = [real_engine.tokenizer.encode(p) for p in PROMPTS]
    prompts += [real_engine.tokenizer.apply_chat_template(c) for c in CHATS]
    ours = real_engine.generate(prompts, SamplingParams(max_tokens=40, temperature=0))
    for ids, result in zip(prompts, ours):
        ref = _hf_greedy(hf, ids, 40)
        assert len(ref) >= 32, "pick prompts that run at least 32 tokens"
        assert result.token_ids == ref
        assert result.text == tok.decode(ref, skip_special_tokens=True)
    assert_no_leaks(real_engine)


def test_batched_equals_alone_on_the_real_model(real_engine):
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    alone = [real_engine.generate([p], params)[0].token_ids for p in PROMPTS]
    assert [r.token_ids for r in real_engine.generate(PROMPTS, params)] == alone
    assert_no_leaks(real_engine)


def test_stop_string_on_the_real_model(real_engine):
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    full = real_engine.generate([PROMPTS[2]], params)[0].text
    stop = full.split()[5]
    cut = real_engine.generate([PROMPTS[2]], SamplingParams(max_tokens=40, temperature=0, stop=(stop,)))[0]
    assert cut.finish_reason == "stop" and cut.text == full[:full.index(stop)]
    assert_no_leaks(real_engine)


def test_tokenizer_and_chat_template_match_transformers(real_engine, hf_real):
    _, tok = hf_real
    ours = real_engine.tokenizer
    for text in TEXTS:
        assert ours.encode(text) == tok(text, add_special_tokens=False)["input_ids"], text
    for chat in CHATS + [CHATS[0] + [{"role": "assistant", "content": "Waves."},
                                     {"role": "user", "content": "Another?"}]]:
        ref = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
        ref = ref["input_ids"] if hasattr(ref, "keys") else ref
        assert ours.apply_chat_template(chat) == list(ref)


def test_incremental_detokenization_never_splits_a_character(real_engine):
    tok = real_engine.tokenizer
    text = "naïve café — 日本語のテキスト, emoji 🎉🚀 and Ω≈ç√ done"
    ids = tok.encode(text)
    det = IncrementalDetokenizer(tok)
    deltas = [det.add(i) for i in ids] + [det.flush()]
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)
    assert deltas.count("") > 0  # some tokens were partial characters and had to wait


def test_cli_answers_paris():
    exe = os.path.join(os.path.dirname(sys.executable), "splitserve")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "splitserve.platform.cli"]
    proc = subprocess.run(cmd + ["generate", "--chat", "--prompt", "What is the capital of France?",
                                 "--max-tokens", "32", "--threads", "2"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout
    assert "finish_reason=stop" in proc.stderr


def test_cli_rejects_bad_input_with_its_reason():
    proc = subprocess.run([sys.executable, "-m", "splitserve.platform.cli", "generate", "--prompt", "hi",
                           "--temperature", "-1"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "temperature must be >= 0" in proc.stderr
