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
    p = parse_infer_request(req, "m", "default")
    assert (p.prompt, p.stream, p.exclude_input, p.want_final_flag, p.request_id) == ("héllo", True, True, True, "r")
    assert (p.params.max_tokens, p.params.temperature, p.params.stop) == (7, 0.5, ("x",))
    assert parse_infer_request(_request([("text_input", "BYTES", b"hi")]), "m", "d").params.greedy
    opt_out = _request([("text_input", "BYTES", b"hi"), ("sampling_parameters", "BYTES", b'{"speculative": false}')])
    assert parse_infer_request(opt_out, "m", "d").params.speculative is False  # per-request opt-out
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
            parse_infer_request(req, "m", "d")
        assert status_of(info.value)[0] == code and re.search(message, describe(info.value))
