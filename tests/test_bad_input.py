"""Each bad input is rejected with a message naming what was wrong and what is
allowed, and never disturbs requests already in the batch."""

import pytest

from conftest import assert_no_leaks
from helpers import make_tiny_model
from splitserve.engine.engine import LLMEngine
from splitserve.errors import InvalidRequestError, ModelNotFoundError, PromptTooLongError
from splitserve.engine.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def eng(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_bad")
    make_tiny_model(str(path), "llama", max_position_embeddings=128)
    return LLMEngine(model=str(path), dtype="float32", show_progress=False, num_kv_blocks=128)


@pytest.mark.parametrize("kwargs,field,message", [
    ({"max_tokens": 0}, "max_tokens", r"max_tokens must be an integer >= 1, got 0"),
    ({"max_tokens": 2.5}, "max_tokens", r"max_tokens must be an integer >= 1, got 2.5"),
    ({"temperature": -0.5}, "temperature", r"temperature must be >= 0 \(0 means greedy\), got -0.5"),
    ({"temperature": float("nan")}, "temperature", r"temperature must be a finite number"),
    ({"top_p": 0.0}, "top_p", r"top_p must be in \(0, 1\], got 0.0"),
    ({"top_p": 1.5}, "top_p", r"top_p must be in \(0, 1\], got 1.5"),
    ({"top_k": -1}, "top_k", r"top_k must be an integer >= 0 \(0 disables top-k\), got -1"),
    ({"seed": -3}, "seed", r"seed must be an integer in \[0, "),
    ({"stop": ["ok", ""]}, "stop", r"stop strings must be non-empty strings"),
    ({"stop": 5}, "stop", r"stop must be a string or a list of strings, got 5"),
    ({"stop": {"a": 1}}, "stop", r"stop must be a string or a list of strings"),
    ({"ignore_eos": "no"}, "ignore_eos", r"ignore_eos must be true or false, got 'no'"),
    ({"speculative": 1}, "speculative", r"speculative must be true or false, got 1"),
])
def test_bad_sampling_params(kwargs, field, message):
    with pytest.raises(InvalidRequestError, match=message) as info:
        SamplingParams(**kwargs)
    assert info.value.field == field


def test_stop_forms():
    assert SamplingParams(stop=None).stop == () and SamplingParams(stop="x").stop == ("x",)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")


@pytest.mark.parametrize("call,field,message", [
    (lambda e: e.add_request(""), "prompt", "prompt is empty"),
    (lambda e: e.add_request([]), "prompt", "prompt token list is empty"),
    (lambda e: e.add_request([1, -2, 3]), "prompt", r"token ids must be integers in \[0, 260\)"),
    (lambda e: e.add_request([1, 9999]), "prompt", r"token ids must be integers in \[0, 260\)"),
    (lambda e: e.add_request(3.14), "prompt", "must be a string or a list of token ids"),
    (lambda e: e.add_request(), "prompt", "exactly one of prompt"),
    (lambda e: e.add_request("hi", {"max_tokens": 3}), "params", "must be a SamplingParams"),
    (lambda e: e.add_request(messages=[]), "messages", "non-empty list"),
    (lambda e: e.add_request(messages=[{"role": "user"}]), "messages", "string 'role' and 'content'"),
])
def test_bad_requests(eng, call, field, message):
    with pytest.raises(InvalidRequestError, match=message) as info:
        call(eng)
    assert info.value.field == field
    assert_no_leaks(eng)


def test_prompt_longer_than_context(eng):
    with pytest.raises(PromptTooLongError, match="prompt has 200 tokens but the model's context allows at most 127"):
        eng.add_request([5] * 200)
    eng.add_request([5] * 127, SamplingParams(max_tokens=5, temperature=0))  # the longest allowed
    outs = []
    while eng.has_unfinished():
        outs += eng.step()
    assert outs[-1].finish_reason == "length" and outs[-1].num_output_tokens == 1
    assert_no_leaks(eng)


def test_bad_requests_do_not_disturb_the_batch(eng):
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    alone = eng.generate(["steady request"], params)[0].token_ids
    rid = eng.add_request("steady request", params)
    tokens = [t for _ in range(2) for o in eng.step() if o.request_id == rid for t in o.new_token_ids]
    for bad in ("", [10**6], None):
        with pytest.raises(InvalidRequestError):
            eng.add_request(bad)
    with pytest.raises(InvalidRequestError, match="already in use"):
        eng.add_request("dup", params, request_id=rid)
    while eng.has_unfinished():
        tokens += [t for o in eng.step() if o.request_id == rid for t in o.new_token_ids]
    assert tokens == alone
    assert_no_leaks(eng)


def test_unknown_model_file():
    with pytest.raises(ModelNotFoundError, match="does not exist; pass a .gguf file or a Hugging Face directory"):
        LLMEngine(model="/no/such/model.gguf", show_progress=False)


def test_bad_dtype(eng):
    with pytest.raises(InvalidRequestError, match="dtype must be one of auto, float32, bfloat16"):
        LLMEngine(model="/no/such/model.gguf", dtype="float8", show_progress=False)
