"""Accuracy gate of the quantized paths on the real model (SmolLM2-135M, bf16 activations).

Perplexity on >= 20k tokens of the offline corpus: int8 weights within 1% of
the float model, int4 within 5%, int8 KV on the wire within 1%; greedy
answers of int8 equal float's on most prompts of a fixed set.
"""

import pytest

from splitserve.bench.perplexity import corpus_token_ids, perplexity
from splitserve.engine.engine import LLMEngine
from splitserve.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.real_model

WINDOW, NUM_TOKENS = 512, 40 * 512 + 1  # 20,480 scored tokens
PROMPTS = ["The capital of France is", "Write a haiku about autumn.", "List three uses of a paperclip:",
           "Explain what a hash table is.", "def fibonacci(n):", "Translate 'good morning' to Spanish:",
           "The three primary colors are", "Why is the sky blue?", "Give me a tip for learning to code.",
           "Once upon a time, in a small village,", "What is 12 times 12?", "Name a planet in our solar system.",
           "Summarize: The cat sat on the mat all day.", "import numpy as np\n", "A good breakfast includes",
           "The opposite of hot is"]


def _engine(path, quantization):
    return LLMEngine(model=path, dtype="bfloat16", quantization=quantization, show_progress=False,
                     kv_cache_memory=64 << 20)


@pytest.fixture(scope="module")
def engines(real_model_path):
    return {q: _engine(real_model_path, q) for q in ("none", "int8", "int4")}


@pytest.fixture(scope="module")
def corpus(engines):
    return corpus_token_ids(engines["none"].tokenizer, NUM_TOKENS)


@pytest.fixture(scope="module")
def float_ppl(engines, corpus):
    return perplexity(engines["none"].model, corpus, WINDOW)


def test_perplexity_corpus_is_large_enough(float_ppl):
    assert float_ppl.num_tokens >= 20_000
    assert 2 < float_ppl.perplexity < 60  # a real language model on English text, not noise


@pytest.mark.parametrize("mode,limit", [("int8", 0.01), ("int4", 0.05)])
def test_quantized_perplexity_within_limit(engines, corpus, float_ppl, mode, limit):
    got = perplexity(engines[mode].model, corpus, WINDOW)
    rel = got.perplexity / float_ppl.perplexity - 1
    print(f"\n{mode}: perplexity {got.perplexity:.3f} vs float {float_ppl.perplexity:.3f} ({rel:+.2%})")
    assert abs(rel) <= limit


def test_int8_kv_on_the_wire_keeps_perplexity(engines, corpus, float_ppl):
    got = perplexity(engines["none"].model, corpus, WINDOW, kv_codec="int8")
    rel = got.perplexity / float_ppl.perplexity - 1
    print(f"\nint8 KV on the wire: perplexity {got.perplexity:.3f} ({rel:+.2%})")
    assert got.perplexity != float_ppl.perplexity  # the codec really ran
    assert abs(rel) <= 0.01


def test_int8_greedy_answers_match_float_on_most_prompts(engines):
    params = SamplingParams(max_tokens=32, temperature=0)
    ref = engines["none"].generate(PROMPTS, params)
    got = engines["int8"].generate(PROMPTS, params)
    same = sum(a.token_ids == b.token_ids for a, b in zip(ref, got))
    print(f"\nint8 greedy == float on {same}/{len(PROMPTS)} prompts")
    assert same / len(PROMPTS) > 0.5
    for e in engines.values():
        assert e.kv.num_free_blocks == e.kv.num_blocks
