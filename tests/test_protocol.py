"""Wire compatibility of our KServe v2 .proto with the protocol tritonclient speaks, and the
KServe request parsing (with tritonclient's own message classes: parsing only reads fields).

Our generated module and tritonclient's register the same names in protobuf's default pool,
so each side's descriptors are dumped from its own subprocess."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest

DUMP = r"""
import importlib, json, sys
mod = importlib.import_module(sys.argv[1])
def walk(d, prefix=""):
    yield prefix + d.name, d
    for n in d.nested_types:
        yield from walk(n, prefix + d.name + ".")
out = {}
for msg in mod.DESCRIPTOR.message_types_by_name.values():
    for qn, d in walk(msg):
        out[qn] = {f.name: [f.number, f.type, f.label, f.message_type.full_name if f.message_type else None]
                   for f in d.fields}
svc = mod.DESCRIPTOR.services_by_name["GRPCInferenceService"]
out["__service__"] = {m.name: [m.input_type.full_name, m.output_type.full_name, m.client_streaming,
                               m.server_streaming] for m in svc.methods}
print(json.dumps(out))
"""


def _descriptors(module: str) -> dict:
    out = subprocess.run([sys.executable, "-c", DUMP, module], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_our_proto_matches_tritonclients_on_the_wire():
    ours = _descriptors("splitserve.platform.grpc_service_pb2")
    theirs = _descriptors("tritonclient.grpc.service_pb2")
    assert len(ours) >= 20
    for message, fields in ours.items():
        assert message in theirs, message
        for name, desc in fields.items():
            assert theirs[message].get(name) == desc, (message, name)


def _request(inputs, model="m", **params):
    import tritonclient.grpc as tg
    from tritonclient.grpc import service_pb2
    req = service_pb2.ModelInferRequest(model_name=model, id="r")
    for name, datatype, value in inputs:
        t = tg.InferInput(name, [1], datatype)
        t.set_data_from_numpy(np.array([value], dtype=object if datatype == "BYTES" else bool))
        req.inputs.extend([t._get_tensor()])
        req.raw_input_contents.extend([t._get_content()])
    for k, v in params.items():
        req.parameters[k].bool_param = v
    return req


def test_parse_conventions_of_the_vllm_backend():
    from splitserve.errors import SplitserveError, describe, status_of
    from splitserve.platform.kserve import parse_infer_request

    req = _request([("text_input", "BYTES", "héllo".encode()), ("stream", "BOOL", True),
                    ("sampling_parameters", "BYTES", b'{"max_tokens": 7, "temperature": 0.5, "stop": ["x"]}'),
                    ("exclude_input_in_output", "BOOL", True)], triton_enable_empty_final_response=True)
    p = parse_infer_request(req, "m")
    assert (p.prompt, p.stream, p.exclude_input, p.want_final_flag, p.client_id) == ("héllo", True, True, True, "r")
    assert (p.params.max_tokens, p.params.temperature, p.params.stop) == (7, 0.5, ("x",))
    assert parse_infer_request(_request([("text_input", "BYTES", b"hi")]), "m").params.greedy
    opt_out = _request([("text_input", "BYTES", b"hi"), ("sampling_parameters", "BYTES", b'{"speculative": false}')])
    assert parse_infer_request(opt_out, "m").params.speculative is False  # per-request opt-out
    cases = [
        (_request([("text_input", "BYTES", b"hi")], model="other"), "NOT_FOUND", "unknown model"),
        (_request([("stream", "BOOL", True)]), "INVALID_ARGUMENT", "missing input 'text_input'"),
        (_request([("text_input", "BYTES", b"hi"), ("sampling_parameters", "BYTES", b"[1")]),
         "INVALID_ARGUMENT", "not valid JSON"),
        (_request([("text_input", "BYTES", b"hi"), ("sampling_parameters", "BYTES", b'{"top_q": 1}')]),
         "INVALID_ARGUMENT", r"unknown keys \['top_q'\]"),
        (_request([("text_input", "BYTES", b"hi"), ("sampling_parameters", "BYTES", b'{"top_p": 0}')]),
         "INVALID_ARGUMENT", r"sampling_parameters.top_p: top_p must be in \(0, 1\]"),
        (_request([("text_input", "BYTES", b"\xff\xfe")]), "INVALID_ARGUMENT", "not valid UTF-8"),
        (_request([("text_input", "BYTES", b"hi"), ("sampling_parameters", "BYTES", b'{"speculative": "no"}')]),
         "INVALID_ARGUMENT", "sampling_parameters.speculative: speculative must be true or false"),
    ]
    for req, code, message in cases:
        with pytest.raises(SplitserveError) as info:
            parse_infer_request(req, "m")
        assert status_of(info.value)[0] == code and re.search(message, describe(info.value))


def test_kserve_client_id_is_a_label_and_unsupported_parameters_are_refused():
    from splitserve.errors import InvalidRequestError, describe, status_of
    from splitserve.platform.kserve import parse_infer_request

    assert parse_infer_request(_request([("text_input", "BYTES", b"hi")]), "m").client_id == "r"  # echoed as sent
    anonymous = _request([("text_input", "BYTES", b"hi")])
    anonymous.ClearField("id")
    assert parse_infer_request(anonymous, "m").client_id == ""  # none sent: none made up
    params = _request([("text_input", "BYTES", b"hi"), ("sampling_parameters", "BYTES",
                       b'{"max_tokens": 3, "seed": 7, "stop": "x", "top_k": 5, "ignore_eos": true}')])
    p = parse_infer_request(params, "m").params
    assert (p.max_tokens, p.seed, p.stop, p.top_k, p.ignore_eos) == (3, 7, ("x",), 5, True)
    cases = []
    for key, value in (("sequence_id", 5), ("priority", 2), ("timeout", 1000)):
        req = _request([("text_input", "BYTES", b"hi")])
        req.parameters[key].int64_param = value
        cases.append((req, "parameters", key))
    versioned = _request([("text_input", "BYTES", b"hi")])
    versioned.model_version = "2"
    cases.append((versioned, "model_version", "only version 1"))
    wrong_output = _request([("text_input", "BYTES", b"hi")])
    wrong_output.outputs.add(name="logits")
    cases.append((wrong_output, "outputs", "unknown output 'logits'"))
    for body, field, message in ((b'{"max_tokens": 0}', "sampling_parameters.max_tokens", "max_tokens must be"),
                                 (b'{"stop": 5}', "sampling_parameters.stop", "stop must be a string or a list"),
                                 (b'{"ignore_eos": "yes"}', "sampling_parameters.ignore_eos", "true or false"),
                                 (b'{"min_p": 0.1}', "inputs", "unknown keys \\['min_p'\\]"),
                                 (b'{"presence_penalty": 3}', "sampling_parameters.presence_penalty", "in \\[-2"),
                                 (b'{"logprobs": 1}', "inputs", "unknown keys \\['logprobs'\\]")):
        cases.append((_request([("text_input", "BYTES", b"hi"), ("sampling_parameters", "BYTES", body)]), field,
                      message))
    for req, field, message in cases:
        with pytest.raises(InvalidRequestError) as info:
            parse_infer_request(req, "m")
        assert info.value.field == field and status_of(info.value)[0] == "INVALID_ARGUMENT"
        assert re.search(message, describe(info.value)), describe(info.value)
    ok = _request([("text_input", "BYTES", b"hi")], triton_enable_empty_final_response=True)
    ok.outputs.add(name="text_output")
    assert parse_infer_request(ok, "m").want_final_flag


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
COMPLETION = {"model": "m", "prompt": "hi"}


@pytest.mark.parametrize("chat,extra,field,message", [
    (False, {"max_tokens": 0}, "max_tokens", r"max_tokens must be an integer >= 1 .*got 0"),
    (True, {"max_tokens": 0}, "max_tokens", r"max_tokens must be an integer >= 1"),
    (True, {"max_completion_tokens": 0}, "max_completion_tokens", r"max_completion_tokens must be an integer >= 1"),
    (False, {"max_tokens": "8"}, "max_tokens", r"got '8'"),
    (False, {"n": 2}, "n", r"n must be 1"),
    (True, {"n": 3}, "n", r"n must be 1"),
    (False, {"best_of": 2}, "best_of", r"best_of must be 1"),
    (False, {"logprobs": 21}, "logprobs", r"logprobs must be an integer in \[0, 20\]"),
    (False, {"logprobs": True}, "logprobs", r"logprobs must be an integer"),
    (False, {"logprobs": 1, "echo": True}, "logprobs", r"logprobs with echo is not supported"),
    (True, {"logprobs": 1}, "logprobs", r"logprobs must be true or false"),
    (True, {"top_logprobs": 2}, "top_logprobs", r"top_logprobs needs logprobs: true"),
    (True, {"logprobs": True, "top_logprobs": 21}, "top_logprobs", r"top_logprobs must be an integer in \[0, 20\]"),
    (False, {"top_logprobs": 2}, "top_logprobs", r"unknown field"),  # chat only
    (True, {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", r"tools .*not supported yet"),
    (True, {"tool_choice": "auto"}, "tool_choice", r"only \"none\""),
    (True, {"functions": [{"name": "f"}]}, "functions", r"not supported yet"),
    (True, {"response_format": {"type": "json_object"}}, "response_format", r"only \{\"type\": \"text\"\}"),
    (True, {"response_format": {"type": "json_schema", "json_schema": {}}}, "response_format", r"JSON modes"),
    (False, {"presence_penalty": 2.5}, "presence_penalty", r"presence_penalty must be in \[-2.0, 2.0\], got 2.5"),
    (True, {"frequency_penalty": "1"}, "frequency_penalty", r"frequency_penalty must be a finite number"),
    (False, {"logit_bias": {"50256": -100}}, "logit_bias", r"logit_bias is not supported yet"),
    (False, {"suffix": "end"}, "suffix", r"suffix .*not supported"),
    (True, {"audio": {"voice": "alloy"}}, "audio", r"audio output is not supported"),
    (True, {"modalities": ["text", "audio"]}, "modalities", r"only \[\"text\"\]"),
    (True, {"reasoning_effort": "high"}, "reasoning_effort", r"not supported"),
    (True, {"service_tier": "priority"}, "service_tier", r"only \"auto\" or \"default\""),
    (True, {"store": True}, "store", r"not stored here"),
    (False, {"stop": 5}, "stop", r"stop must be a string or a list of strings"),
    (False, {"stop": ["ok", ""]}, "stop", r"stop strings must be non-empty"),
    (False, {"seed": -1}, "seed", r"seed must be an integer in \[0, "),
    (False, {"stream": "yes"}, "stream", r"stream must be true or false"),
    (False, {"ignore_eos": "false"}, "ignore_eos", r"ignore_eos must be true or false"),
    (False, {"stream_options": {"include_usage": True}}, "stream_options", r"only allowed when stream is true"),
    (True, {"stream": True, "stream_options": {"usage": 1}}, "stream_options", r"include_usage"),
    (False, {"max_completion_tokens": 5}, "max_completion_tokens", r"unknown field .*allowed: \["),  # chat only
    (True, {"echo": True}, "echo", r"unknown field"),  # completions only
    (True, {"frobnicate": 1, "zzz": 2}, "frobnicate", r"unknown fields \['frobnicate', 'zzz'\]; allowed: .*'top_p'"),
    (False, {"repetition_penalty": 1.1}, "repetition_penalty", r"unknown field"),
])
def test_openai_fields_not_honoured_are_refused_naming_them(chat, extra, field, message):
    from splitserve.errors import InvalidRequestError, status_of
    from splitserve.platform import openai_api
    with pytest.raises(InvalidRequestError) as info:
        openai_api.sampling_params({**(CHAT if chat else COMPLETION), **extra}, chat)
    assert info.value.field == field and status_of(info.value)[:2] == ("INVALID_ARGUMENT", 400)
    assert re.search(message, str(info.value)), str(info.value)
    status, body = openai_api.error_body(info.value)
    assert status == 400 and body["error"]["param"] == field and field in body["error"]["message"]


def test_openai_fields_honoured_reach_sampling_params():
    from splitserve.platform import openai_api
    p = openai_api.sampling_params({**COMPLETION, "max_tokens": 9, "temperature": 0.3, "top_p": 0.8, "top_k": 4,
                                    "seed": 11, "stop": ["\n", "END"], "ignore_eos": True, "speculative": False,
                                    "stream": True, "stream_options": {"include_usage": True}, "echo": False,
                                    "user": "u1"})
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.seed, p.stop, p.ignore_eos, p.speculative) == \
        (9, 0.3, 0.8, 4, 11, ("\n", "END"), True, False)
    assert openai_api.sampling_params({**COMPLETION, "stop": "x"}).stop == ("x",)
    p = openai_api.sampling_params({**COMPLETION, "presence_penalty": 0.5, "frequency_penalty": -1, "logprobs": 0})
    assert (p.presence_penalty, p.frequency_penalty, p.logprobs) == (0.5, -1, 0)
    p = openai_api.sampling_params({**CHAT, "logprobs": True, "top_logprobs": 3}, chat=True)
    assert p.logprobs == 3
    assert openai_api.sampling_params({**CHAT, "logprobs": True}, chat=True).logprobs == 0
    assert openai_api.sampling_params({**CHAT, "logprobs": False}, chat=True).logprobs is None
    assert openai_api.sampling_params(COMPLETION).max_tokens == 16  # the default when none is given
    # max_completion_tokens wins over the deprecated max_tokens; off values of unsupported fields pass
    p = openai_api.sampling_params({**CHAT, "max_tokens": 50, "max_completion_tokens": 7, "n": 1, "logprobs": False,
                                    "top_logprobs": 0, "presence_penalty": 0, "frequency_penalty": 0.0,
                                    "logit_bias": {}, "tools": [], "tool_choice": "none",
                                    "response_format": {"type": "text"}, "modalities": ["text"],
                                    "service_tier": "auto", "store": False, "metadata": {"k": "v"},
                                    "parallel_tool_calls": False, "seed": None, "temperature": None,
                                    "stream": False, "user": "u"}, chat=True)
    assert (p.max_tokens, p.temperature, p.seed) == (7, 1.0, None)
    assert openai_api.include_usage({"stream": True, "stream_options": {"include_usage": True}})
    assert not openai_api.include_usage({"stream": True})


def test_openai_chat_messages_refuse_what_they_cannot_carry():
    from splitserve.errors import InvalidRequestError
    from splitserve.platform import openai_api
    parts = {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
    # a message echoed back from a response carries empty tool fields: accepted; name is ignored
    echoed = {"role": "assistant", "content": "c", "tool_calls": None, "refusal": None, "name": "bot"}
    assert openai_api.chat_messages({"messages": [parts, echoed]}) == [{"role": "user", "content": "ab"},
                                                                       {"role": "assistant", "content": "c"}]
    image = {"role": "user", "content": [{"type": "text", "text": "a"},
                                         {"type": "image_url", "image_url": {"url": "x"}}]}
    with pytest.raises(InvalidRequestError, match=r"messages\[0\].content\[1\] is of type 'image_url'"):
        openai_api.chat_messages({"messages": [image]})
    call = {"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function"}]}
    with pytest.raises(InvalidRequestError, match=r"messages\[1\]"):
        openai_api.chat_messages({"messages": [parts, call]})
    call["content"] = "x"
    with pytest.raises(InvalidRequestError, match=r"messages\[1\] has \['tool_calls'\]: not supported"):
        openai_api.chat_messages({"messages": [parts, call]})


def test_openai_client_sends_only_fields_we_decide_on():
    """Every argument of the openai client's create() is a field we honour, ignore or refuse by name (a new
    one fails here until it is decided), and the client sends nothing its caller did not set."""
    import inspect
    import json as json_
    import httpx2
    import openai
    from splitserve.platform import openai_api
    sent = []

    def handler(request):
        sent.append(json_.loads(request.content))
        return httpx2.Response(400, json={"error": {"message": "x", "type": "invalid_request_error"}})

    client = openai.OpenAI(base_url="http://test/v1", api_key="k", max_retries=0,
                           http_client=httpx2.Client(transport=httpx2.MockTransport(handler)))
    client_only = {"self", "extra_headers", "extra_query", "extra_body", "timeout"}
    for create, chat in ((client.completions.create, False), (client.chat.completions.create, True)):
        fields = set(inspect.signature(create).parameters) - client_only
        assert fields <= set(openai_api.allowed_fields(chat)), sorted(fields - set(openai_api.allowed_fields(chat)))
    for call in (lambda: client.completions.create(model="m", prompt="hi"),
                 lambda: client.completions.create(model="m", prompt="hi", max_tokens=4, stream=True),
                 lambda: client.chat.completions.create(model="m", messages=CHAT["messages"]),
                 lambda: client.chat.completions.create(model="m", messages=CHAT["messages"], stream=True)):
        with pytest.raises(openai.BadRequestError):
            call()
    assert [sorted(b) for b in sent] == [["model", "prompt"], ["max_tokens", "model", "prompt", "stream"],
                                         ["messages", "model"], ["messages", "model", "stream"]]


# -- the front door's request handling with a stand-in router (no Ray) --------------------------------


class _Router:
    """Keys requests by the id the front door gives, as the workers do: a second request under an id
    in flight, or under one seen before (a cancelled one's tombstone), fails."""

    def __init__(self):
        self.inflight, self.seen = set(), []  # ids; (id, label) of every request

    async def generate(self, rid, ids, params, label=None):
        import asyncio
        from splitserve.engine.output import RequestOutput
        if rid in self.inflight or rid in {r for r, _ in self.seen}:
            raise KeyError(f"request id {rid!r} is already in use")
        self.inflight.add(rid)
        self.seen.append((rid, label))
        try:
            for i in range(2):
                await asyncio.sleep(0.01)  # the requests overlap
                yield RequestOutput(rid, [i], f"t{i}", finished=i == 1, finish_reason="length" if i else None,
                                    num_output_tokens=i + 1)
        finally:
            self.inflight.discard(rid)


class _Context:
    """What Serve hands a unary method as ``grpc_context``: the status goes out through it."""

    code = details = None

    def invocation_metadata(self):
        return ()

    def set_code(self, code):
        self.code = code

    def set_details(self, details):
        self.details = details


def _door(monkeypatch):
    """The FrontDoor's own methods bound to a stand-in with a fake router and tokenizer; tritonclient's
    messages stand in for ours (the same wire format; one process must not register both)."""
    import types
    from tritonclient.grpc import service_pb2
    from splitserve.platform import frontdoor, kserve
    from splitserve.platform.auth import ApiKeys
    cls = frontdoor.FrontDoor.func_or_class
    monkeypatch.setattr(kserve, "pb", lambda: service_pb2)
    monkeypatch.setitem(cls.ModelStreamInfer.__globals__, "pb", lambda: service_pb2)  # Serve's copy of the module
    tokenizer = types.SimpleNamespace(encode=lambda text: list(text.encode()),
                                      apply_chat_template=lambda messages: [1, 2, 3])
    door = types.SimpleNamespace(router=_Router(), api_keys=ApiKeys(()), model_name="m", tokenizer=tokenizer,
                                 max_model_len=100, retry_after_s=2)
    for name in ("_tokens", "_tokenize", "_run", "_refusal", "_authenticate", "_authenticate_http", "ModelInfer",
                 "ModelStreamInfer", "_openai", "_sse"):
        setattr(door, name, types.MethodType(getattr(cls, name), door))
    return door


def _text(response) -> str:
    from splitserve.platform.kserve import _decode_bytes_tensor
    return _decode_bytes_tensor(response.raw_output_contents[0])[0].decode()


def test_kserve_client_ids_are_labels_the_server_keys_requests_by_its_own(monkeypatch):
    import asyncio
    door = _door(monkeypatch)

    async def run():
        same = [_request([("text_input", "BYTES", b"hi")]) for _ in range(2)]  # both id "r", at once
        unary = await asyncio.gather(*(door.ModelInfer(r) for r in same))
        again = await door.ModelInfer(_request([("text_input", "BYTES", b"hi")]))  # "r" once more

        async def requests():
            for _ in range(2):
                yield _request([("text_input", "BYTES", b"yo")])
            bad = _request([("text_input", "BYTES", b"yo"), ("sampling_parameters", "BYTES", b'{"top_p": 7}')])
            bad.id = "mine-7"
            yield bad
        streamed = [r async for r in door.ModelStreamInfer(requests())]
        anonymous = _request([("text_input", "BYTES", b"hi")])
        anonymous.ClearField("id")
        ctx = _Context()
        await door.ModelInfer(_request([("text_input", "BYTES", b"hi"), ("stream", "BOOL", True)]), ctx)
        return unary + [again], streamed, await door.ModelInfer(anonymous), ctx

    unary, streamed, anonymous, ctx = asyncio.run(run())
    assert ctx.code.name == "INVALID_ARGUMENT" and "ModelStreamInfer" in ctx.details  # a unary call cannot stream
    assert [(r.id, _text(r)) for r in unary] == [("r", "hit0t1")] * 3
    failed = [r for r in streamed if r.error_message]
    assert [(r.error_message, r.infer_response.id, _text(r.infer_response)) for r in streamed if r not in failed] \
        == [("", "r", "yot0t1")] * 2
    # tritonclient gives a stream's error to its callback without the response: the message names the
    # request and the status
    assert len(failed) == 1 and failed[0].error_message.startswith("[INVALID_ARGUMENT] request 'mine-7': ")
    assert "top_p must be in (0, 1]" in failed[0].error_message
    assert anonymous.id == "" and _text(anonymous) == "hit0t1"
    ids, labels = zip(*door.router.seen)
    assert len(set(ids)) == 6 and all(len(i) == 32 for i in ids)  # our own: uuid4 hex, never the client's
    assert labels == ("r",) * 5 + (None,)


def test_openai_echo_and_usage_are_honoured_and_bad_fields_refused(monkeypatch):
    import asyncio
    import json as json_
    door = _door(monkeypatch)

    class Request:
        headers = {}

        def __init__(self, body):
            self.body = body

        async def json(self):
            return self.body

    async def sse(response):
        return [json_.loads(c[len("data: "):]) for c in [x async for x in response.body_iterator]
                if c != "data: [DONE]\n\n"]

    async def run():
        echoed = await door._openai(Request({**COMPLETION, "echo": True}), chat=False)
        chunks = await sse(await door._openai(Request({**COMPLETION, "echo": True, "stream": True,
                                                       "stream_options": {"include_usage": True}}), chat=False))
        refused = await door._openai(Request({**CHAT, "tools": [{"type": "function"}]}), chat=True)
        return echoed, chunks, refused

    echoed, chunks, refused = asyncio.run(run())
    assert echoed["choices"][0]["text"] == "hit0t1" and echoed["usage"]["completion_tokens"] == 2
    assert [c["choices"][0]["text"] for c in chunks[:-1]] == ["hi", "t0", "t1"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {"prompt_tokens": 2, "completion_tokens": 2,
                                                                   "total_tokens": 4}
    assert refused.status_code == 400 and json_.loads(refused.body)["error"]["param"] == "tools"
    assert door.router.seen[0][0].startswith("cmpl-")
