"""Fuzzed request bodies through the front door's own parsing (OpenAI JSON, KServe protobuf) and the
real tokenizer: every input is either accepted, giving a well-formed request, or refused with a
client error (400 naming a field, or 404 for a model); never another exception (a 500).

The part of the fault campaign (issue 14) that needs no server: a few thousand cases, bounded in time.
"""

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from splitserve.engine.sampling_params import SamplingParams
from splitserve.errors import InvalidRequestError, SplitserveError, UnknownModelError, status_of
from splitserve.platform import kserve, openai_api

MODEL = "smollm2"
FUZZ = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_scalar = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=20)
json_value = st.recursive(json_scalar, lambda inner: st.lists(inner, max_size=4)
                          | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
# mostly the fields the server knows (to get past the first check), sometimes anything
field = st.sampled_from(sorted(set(openai_api.allowed_fields(True)) | set(openai_api.allowed_fields(False)))) \
    | st.text(max_size=12)
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]),
                                           "content": st.text(max_size=100)}), min_size=1, max_size=3)
valid_values = {  # values the server takes (the fuzz mixes them with anything at all)
    "model": st.sampled_from([MODEL, ""]), "max_tokens": st.integers(1, 64), "temperature": st.floats(0, 2),
    "top_p": st.floats(0.01, 1), "top_k": st.integers(0, 50), "seed": st.integers(0, 2**32), "stream": st.booleans(),
    "stop": st.text(min_size=1, max_size=5) | st.lists(st.text(min_size=1, max_size=5), max_size=3),
}


def openai_bodies(chat: bool):
    """A valid body, then a few fields set to valid values or to anything, or a stray JSON value."""
    @st.composite
    def build(draw):
        body = {"model": MODEL, **({"messages": draw(messages)} if chat else {"prompt": draw(st.text(max_size=200))})}
        for name in draw(st.lists(field, max_size=4)):
            valid = name in valid_values and draw(st.integers(0, 3)) > 0
            body[name] = draw(valid_values[name] if valid else json_value)
        return body
    return build() | json_value


@pytest.fixture(scope="module")
def tokenizer(real_model_path):
    from splitserve.engine.tokenizer import load_tokenizer
    return load_tokenizer(real_model_path)


def _client_error(e: Exception) -> bool:
    _, http, _ = status_of(e)
    return isinstance(e, SplitserveError) and 400 <= http < 500 and str(e) != ""


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_fuzzed_openai_bodies_are_accepted_or_refused_with_a_client_error(chat, tokenizer):
    seen = {"accepted": 0, "refused": 0}

    @FUZZ
    @given(body=openai_bodies(chat))
    def check(body):
        try:
            params, prompt, messages = openai_api.parse_request(body, chat, MODEL)
            ids = tokenizer.apply_chat_template(messages) if chat else tokenizer.encode(prompt)
        except Exception as e:
            assert _client_error(e), f"{type(e).__name__}: {e} for {body!r}"
            if isinstance(e, InvalidRequestError):
                assert isinstance(e.field, str), f"the 400 names no field: {e}"
            else:
                assert isinstance(e, UnknownModelError)
            json.dumps(openai_api.error_body(e)[1])  # the error object itself always serializes
            seen["refused"] += 1
            return
        assert isinstance(params, SamplingParams) and params.max_tokens >= 1
        assert math.isfinite(params.temperature) and 0 < params.top_p <= 1
        assert (prompt is None) == chat and (messages is not None) == chat
        assert all(isinstance(t, int) for t in ids)
        seen["accepted"] += 1

    check()
    assert seen["accepted"] > 20 and seen["refused"] > 200, seen  # both paths were really exercised


tensor_names = st.sampled_from(kserve.KNOWN_INPUTS) | st.text(max_size=10)
datatypes = st.sampled_from(["BYTES", "BOOL", "INT32", "FP32", "UINT8", ""]) | st.text(max_size=6)


def _bytes_input(req, name, value: bytes):
    t = req.inputs.add()
    t.name, t.datatype = name, "BYTES"
    t.shape.append(1)
    t.contents.bytes_contents.append(value)
    return t


@st.composite
def infer_requests(draw):
    """A valid request (prompt, maybe sampling parameters), then a few of its parts made anything."""
    # tritonclient's messages: the same wire format as ours (kserve.pb()), and one process must not
    # register both (the suite has imported tritonclient's by the time this runs)
    from tritonclient.grpc import service_pb2 as pb
    req = pb.ModelInferRequest(model_name=MODEL, id=draw(st.text(max_size=8)))
    _bytes_input(req, "text_input", draw(st.text(min_size=1, max_size=60)).encode())
    if draw(st.booleans()):
        sp = draw(st.fixed_dictionaries({}, optional={k: v for k, v in valid_values.items()
                                                      if k in kserve.SAMPLING_KEYS}))
        _bytes_input(req, "sampling_parameters", json.dumps(sp).encode())
    for _ in range(draw(st.integers(0, 3))):  # mutations
        what = draw(st.sampled_from(["model", "version", "datatype", "shape", "content", "input", "output", "param"]))
        t = req.inputs[draw(st.integers(0, len(req.inputs) - 1))]
        if what == "model":
            req.model_name = draw(st.sampled_from(["other", ""]))
        elif what == "version":
            req.model_version = draw(st.sampled_from(["1", "2", "x"]))
        elif what == "datatype":
            t.datatype = draw(datatypes)
        elif what == "shape":
            del t.shape[:]
            t.shape.extend(draw(st.lists(st.integers(-1, 3), max_size=3)))
        elif what == "content":
            del t.contents.bytes_contents[:]
            t.contents.bytes_contents.extend(draw(st.lists(
                st.binary(max_size=40) | st.builds(lambda v: json.dumps(v).encode(), json_value), max_size=2)))
            if draw(st.booleans()):
                t.contents.bool_contents.append(draw(st.booleans()))
        elif what == "input":
            extra = req.inputs.add()
            extra.name, extra.datatype = draw(tensor_names), draw(datatypes)
            extra.shape.extend(draw(st.lists(st.integers(-1, 3), max_size=2)))
            extra.contents.bool_contents.extend(draw(st.lists(st.booleans(), max_size=2)))
            if draw(st.booleans()):
                req.raw_input_contents.append(draw(st.binary(max_size=24)))
        elif what == "output":
            req.outputs.add().name = draw(st.sampled_from(kserve.KNOWN_OUTPUTS) | st.text(max_size=6))
        else:
            key = draw(st.sampled_from(list(kserve.KNOWN_PARAMETERS)) | st.text(max_size=8))
            req.parameters[key].bool_param = True
    return req


def test_fuzzed_kserve_requests_are_accepted_or_refused_with_a_client_error(tokenizer):
    seen = {"accepted": 0, "refused": 0}

    @FUZZ
    @given(req=infer_requests())
    def check(req):
        try:
            parsed = kserve.parse_infer_request(req, MODEL)
            tokenizer.encode(parsed.prompt) if parsed.prompt else None
        except Exception as e:
            assert _client_error(e), f"{type(e).__name__}: {e} for {req}"
            seen["refused"] += 1
            return
        assert isinstance(parsed.params, SamplingParams) and isinstance(parsed.prompt, str)
        seen["accepted"] += 1

    check()
    assert seen["accepted"] > 5 and seen["refused"] > 200, seen
