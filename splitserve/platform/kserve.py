"""KServe v2 / Open Inference Protocol <-> splitserve requests (pure translation, no I/O).

Conventions of Triton's vLLM backend, which LLM clients of this protocol expect:

    inputs:  text_input (BYTES, one element)          the prompt
             stream (BOOL, optional)                  stream deltas (ModelStreamInfer only)
             sampling_parameters (BYTES JSON, opt.)   {"max_tokens", "temperature", "top_p", ...}
             exclude_input_in_output (BOOL, opt.)     non-streaming: leave the prompt out of text_output
    outputs: text_output (BYTES), finish_reason (BYTES), in raw_output_contents
    streamed deltas carry the parameters output_index / num_output_tokens (int64): the output
    index of the delta's first token and how many it holds (no gap, no repeat, even when the
    request moved between workers)
    request parameter triton_enable_empty_final_response -> the last streamed response carries
    the parameter triton_final_response = true; any other request parameter (sequence_*, priority,
    timeout, ...) is refused, as are sampling_parameters keys outside SAMPLING_KEYS
    request id: the client's label, echoed on every response (requests may share one: the front
    door gives each its own internal id)

A BYTES tensor element on the wire: 4-byte little-endian length, then the bytes.
Bad input raises ``InvalidRequestError`` naming the input, an unknown model
``UnknownModelError`` (``splitserve.errors`` maps them to gRPC statuses).

Our generated messages (``grpc_service_pb2``, package ``inference``) are imported
lazily through :func:`pb`: tritonclient registers the same protobuf names in
the same default pool, so a process that runs the client (a test, a benchmark)
must never import ours. Parsing only reads fields, so it accepts either's messages.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

from splitserve.errors import InvalidRequestError, UnknownModelError
from splitserve.engine.sampling_params import SamplingParams


def pb():
    from splitserve.platform import grpc_service_pb2
    return grpc_service_pb2

SAMPLING_KEYS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "ignore_eos", "speculative",
                 "presence_penalty", "frequency_penalty")
KNOWN_INPUTS = ("text_input", "stream", "sampling_parameters", "exclude_input_in_output")
KNOWN_OUTPUTS = ("text_output", "finish_reason")
KNOWN_PARAMETERS = ("triton_enable_empty_final_response",)


@dataclass(frozen=True)
class ParsedRequest:
    client_id: str  # the request's id as the client sent it ("" when none): a label, never a key
    prompt: str
    params: SamplingParams
    stream: bool
    exclude_input: bool
    want_final_flag: bool


def _invalid(message: str, field: str = "inputs") -> InvalidRequestError:
    return InvalidRequestError(field, message)


def _decode_bytes_tensor(raw: bytes) -> list[bytes]:
    out, i = [], 0
    while i < len(raw):
        if i + 4 > len(raw):
            raise _invalid("malformed BYTES tensor: truncated length prefix")
        (n,) = struct.unpack_from("<I", raw, i)
        i += 4
        if i + n > len(raw):
            raise _invalid("malformed BYTES tensor: element longer than the tensor")
        out.append(raw[i:i + n])
        i += n
    return out


def encode_bytes_tensor(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def _tensor_values(req, index: int, tensor) -> list:
    if req.raw_input_contents:
        if index >= len(req.raw_input_contents):
            raise _invalid(f"input '{tensor.name}' has no raw contents")
        raw = req.raw_input_contents[index]
        if tensor.datatype == "BYTES":
            return _decode_bytes_tensor(raw)
        if tensor.datatype == "BOOL":
            return [b != 0 for b in raw]
        raise _invalid(f"input '{tensor.name}' has datatype {tensor.datatype}; allowed: BYTES or BOOL")
    if tensor.datatype == "BYTES":
        return list(tensor.contents.bytes_contents)
    if tensor.datatype == "BOOL":
        return list(tensor.contents.bool_contents)
    raise _invalid(f"input '{tensor.name}' has datatype {tensor.datatype}; allowed: BYTES or BOOL")


def _single(req, index, tensor, datatype: str):
    if tensor.datatype != datatype:
        raise _invalid(f"input '{tensor.name}' must be {datatype}, got {tensor.datatype}")
    shape = list(tensor.shape)
    if any(d != 1 for d in shape):
        raise _invalid(f"input '{tensor.name}' must hold exactly one element (shape [1] or [1, 1]), "
                       f"got shape {shape}")
    values = _tensor_values(req, index, tensor)
    if len(values) != 1:
        raise _invalid(f"input '{tensor.name}' must hold exactly one element, got {len(values)}")
    return values[0]


def parse_infer_request(req, model_name: str) -> ParsedRequest:
    if req.model_name != model_name:
        raise UnknownModelError(f"unknown model '{req.model_name}'; this server serves '{model_name}'")
    if req.model_version not in ("", "1"):
        raise _invalid(f"model '{model_name}' has only version 1, got version '{req.model_version}'",
                       "model_version")
    unknown = sorted(set(req.parameters) - set(KNOWN_PARAMETERS))
    if unknown:
        raise _invalid(f"request parameters {unknown} are not supported (no sequence batching, priorities or "
                       f"server-side timeouts: use the client's deadline); allowed: {list(KNOWN_PARAMETERS)}",
                       "parameters")
    for out in req.outputs:
        if out.name not in KNOWN_OUTPUTS:
            raise _invalid(f"unknown output '{out.name}'; outputs: {', '.join(KNOWN_OUTPUTS)}", "outputs")
        if len(out.parameters):
            raise _invalid(f"output '{out.name}' has parameters {sorted(out.parameters)}; none are supported "
                           f"(no classification, no shared memory)", "outputs")
    found = {}
    for i, t in enumerate(req.inputs):
        if t.name not in KNOWN_INPUTS:
            raise _invalid(f"unknown input '{t.name}'; allowed: {', '.join(KNOWN_INPUTS)}")
        found[t.name] = (i, t)
    if "text_input" not in found:
        raise _invalid("missing input 'text_input' (BYTES, one element: the prompt)")
    prompt_raw = _single(req, *found["text_input"], "BYTES")
    try:
        prompt = prompt_raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _invalid("input 'text_input' is not valid UTF-8") from None
    stream = bool(_single(req, *found["stream"], "BOOL")) if "stream" in found else False
    exclude = bool(_single(req, *found["exclude_input_in_output"], "BOOL")) \
        if "exclude_input_in_output" in found else False
    sp = {}
    if "sampling_parameters" in found:
        raw = _single(req, *found["sampling_parameters"], "BYTES")
        try:
            sp = json.loads(raw or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise _invalid(f"input 'sampling_parameters' is not valid JSON: {e}") from None
        if not isinstance(sp, dict):
            raise _invalid("input 'sampling_parameters' must be a JSON object")
        unknown = sorted(set(sp) - set(SAMPLING_KEYS))
        if unknown:
            raise _invalid(f"sampling_parameters has unknown keys {unknown}; allowed: {list(SAMPLING_KEYS)}")
    try:
        params = SamplingParams(**{"temperature": 0.0, **sp})
    except InvalidRequestError as e:
        raise _invalid(str(e), f"sampling_parameters.{e.field}") from None
    want_final = req.parameters["triton_enable_empty_final_response"].bool_param \
        if "triton_enable_empty_final_response" in req.parameters else False
    return ParsedRequest(req.id, prompt, params, stream, exclude, want_final)


def infer_response(model_name: str, request_id: str, text: str, finish_reason: str | None,
                   final: bool | None = None, output_index: int | None = None, num_tokens: int | None = None):
    """One response: text_output and finish_reason as BYTES in raw_output_contents. A streamed delta
    also carries the parameters output_index (of its first token) and num_output_tokens (its tokens)."""
    resp = pb().ModelInferResponse(model_name=model_name, model_version="1", id=request_id)
    for name in ("text_output", "finish_reason"):
        resp.outputs.add(name=name, datatype="BYTES", shape=[1])
    resp.raw_output_contents.append(encode_bytes_tensor([text.encode("utf-8")]))
    resp.raw_output_contents.append(encode_bytes_tensor([(finish_reason or "").encode()]))
    if final is not None:
        resp.parameters["triton_final_response"].bool_param = final
    if output_index is not None:
        resp.parameters["output_index"].int64_param = output_index
        resp.parameters["num_output_tokens"].int64_param = num_tokens
    return resp


def model_metadata(model_name: str):
    t = pb().ModelMetadataResponse.TensorMetadata
    return pb().ModelMetadataResponse(
        name=model_name, versions=["1"], platform="splitserve",
        inputs=[t(name="text_input", datatype="BYTES", shape=[1]), t(name="stream", datatype="BOOL", shape=[1]),
                t(name="sampling_parameters", datatype="BYTES", shape=[1]),
                t(name="exclude_input_in_output", datatype="BOOL", shape=[1])],
        outputs=[t(name="text_output", datatype="BYTES", shape=[-1]),
                 t(name="finish_reason", datatype="BYTES", shape=[-1])])
