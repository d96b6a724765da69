"""OpenAI-compatible request parsing and response shapes (pure; the routes live in frontdoor.py)."""

from __future__ import annotations

import time
import uuid

from splitserve.errors import InvalidRequestError, SplitserveError, UnknownModelError, describe, status_of
from splitserve.engine.sampling_params import MAX_LOGPROBS, SamplingParams


def error_body(exc: BaseException) -> tuple[int, dict]:
    """(HTTP status, OpenAI error body) for any exception, through the one status table."""
    _, status, kind = status_of(exc)
    return status, {"error": {"message": str(exc) if isinstance(exc, SplitserveError) else describe(exc),
                              "type": kind, "param": getattr(exc, "field", None), "code": None}}


# Every field of the two OpenAI request bodies, and what happens to it. A field outside these tables is
# refused (400 listing the allowed ones): the openai client sends only the fields its caller set.
HONOURED = ("model", "max_tokens", "temperature", "top_p", "seed", "stop", "stream", "stream_options",
            "presence_penalty", "frequency_penalty",
            "top_k", "ignore_eos", "speculative")  # the last three: extensions (top_k, ignore_eos as vLLM's)
HONOURED_COMPLETIONS = ("prompt", "echo", "logprobs")
HONOURED_CHAT = ("messages", "max_completion_tokens", "response_format", "logprobs", "top_logprobs")
IGNORED = ("user",)  # metadata that changes nothing we generate
IGNORED_CHAT = ("metadata", "safety_identifier", "prompt_cache_key", "prompt_cache_retention", "prompt_cache_options",
                "prediction", "parallel_tool_calls")  # caching / latency hints; tool calls are never made


def _is(*values):
    """The values a not-supported field may take (its 'off' values); bools never pass for numbers."""
    return lambda v: v is None or any(v == x and type(v) is type(x) for x in values)


# field -> (accepted values, what the 400 says): not supported (yet), accepted only when it asks for nothing
NOT_SUPPORTED = {
    "n": (_is(1), "n must be 1 (one choice per request) or left out"),
    "logit_bias": (_is({}), "logit_bias is not supported yet; send {} or leave it out"),
}
NOT_SUPPORTED_COMPLETIONS = {
    "best_of": (_is(1), "best_of must be 1 or left out"),
    "suffix": (_is(""), "suffix (text after the insertion point) is not supported; send \"\" or leave it out"),
}
NOT_SUPPORTED_CHAT = {
    "tools": (_is([]), "tools (function calling) are not supported yet; leave tools out or send []"),
    "tool_choice": (_is("none"), "tool_choice: tools are not supported yet; only \"none\" is allowed"),
    "functions": (_is([]), "functions (function calling) are not supported yet; leave functions out"),
    "function_call": (_is("none"), "function_call: function calling is not supported yet; only \"none\" is allowed"),
    "audio": (_is(), "audio output is not supported; leave audio out"),
    "modalities": (_is(["text"]), "modalities: only [\"text\"] is supported"),
    "reasoning_effort": (_is(), "reasoning_effort is not supported (the model does not reason); leave it out"),
    "verbosity": (_is(), "verbosity is not supported; leave it out"),
    "web_search_options": (_is(), "web_search_options: web search is not supported; leave it out"),
    "moderation": (_is(), "moderation is not supported; leave it out"),
    "service_tier": (_is("auto", "default"), "service_tier: only \"auto\" or \"default\" is supported"),
    "store": (_is(False), "store: completions are not stored here; send false or leave it out"),
}


def allowed_fields(chat: bool) -> list[str]:
    extra = (HONOURED_CHAT + IGNORED_CHAT + tuple(NOT_SUPPORTED_CHAT)) if chat \
        else (HONOURED_COMPLETIONS + tuple(NOT_SUPPORTED_COMPLETIONS))
    return sorted(set(HONOURED + IGNORED + tuple(NOT_SUPPORTED) + extra))


def check_fields(body: dict, chat: bool) -> None:
    """InvalidRequestError naming the first field that is unknown, or asks for what is not supported."""
    allowed = allowed_fields(chat)
    unknown = sorted(k for k in body if k not in allowed)
    if unknown:
        raise InvalidRequestError(unknown[0], f"unknown field{'s' if len(unknown) > 1 else ''} {unknown}; "
                                              f"allowed: {allowed}")
    table = {**NOT_SUPPORTED, **(NOT_SUPPORTED_CHAT if chat else NOT_SUPPORTED_COMPLETIONS)}
    for name, (accepted, message) in table.items():
        if name in body and not accepted(body[name]):
            raise InvalidRequestError(name, f"{message}, got {body[name]!r}")
    for name in ("stream", "echo", "ignore_eos"):
        if body.get(name) is not None and not isinstance(body[name], bool):
            raise InvalidRequestError(name, f"{name} must be true or false, got {body[name]!r}")
    options = body.get("stream_options")
    if options is not None:
        if not body.get("stream"):
            raise InvalidRequestError("stream_options", "stream_options is only allowed when stream is true")
        # include_obfuscation: accepted, ignored (we add no obfuscation padding to chunks)
        if not isinstance(options, dict) or not set(options) <= {"include_usage", "include_obfuscation"} \
                or not all(isinstance(v, bool) for v in options.values()):
            raise InvalidRequestError("stream_options", f"stream_options must be {{\"include_usage\": true|false}}, "
                                                        f"got {options!r}")
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise InvalidRequestError("response_format", f"response_format: only {{\"type\": \"text\"}} is supported; "
                                                     f"JSON modes (json_object, json_schema) are not supported yet, "
                                                     f"got {fmt!r}")


def max_tokens(body: dict) -> int:
    """max_completion_tokens (chat), else max_tokens, else 16. 0 is refused, as OpenAI refuses it."""
    chosen = None
    for name in ("max_completion_tokens", "max_tokens"):
        v = body.get(name)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise InvalidRequestError(name, f"{name} must be an integer >= 1 (a request for no tokens is "
                                            f"refused), got {v!r}")
        chosen = v if chosen is None else chosen
    return 16 if chosen is None else chosen


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise InvalidRequestError("stop", f"stop must be a string or a list of strings, got {stop!r}")
    return tuple(stop)


def sampling_params(body: dict, chat: bool = False) -> SamplingParams:
    """The request's SamplingParams; every field of the body checked first (``check_fields``)."""
    check_fields(body, chat)
    return SamplingParams(
        max_tokens=max_tokens(body),
        temperature=body["temperature"] if body.get("temperature") is not None else 1.0,
        top_p=body["top_p"] if body.get("top_p") is not None else 1.0,
        top_k=body["top_k"] if body.get("top_k") is not None else 0,
        seed=body.get("seed"),
        stop=_stop(body),
        ignore_eos=bool(body.get("ignore_eos", False)),  # extension, as vLLM's server has it
        speculative=body["speculative"] if body.get("speculative") is not None else True,  # extension: opt out
        presence_penalty=body["presence_penalty"] if body.get("presence_penalty") is not None else 0.0,
        frequency_penalty=body["frequency_penalty"] if body.get("frequency_penalty") is not None else 0.0,
        logprobs=logprobs_asked(body, chat),
    )


def logprobs_asked(body: dict, chat: bool) -> int | None:
    """How many alternatives per token the request wants with its log-probabilities (None: none).
    Chat: ``logprobs: true`` and ``top_logprobs`` (0 to 20); completions: ``logprobs`` (0 to 20)."""
    def count(name: str) -> int | None:  # the alternatives per token a field asks for
        k = body.get(name)
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= MAX_LOGPROBS):
            raise InvalidRequestError(name, f"{name} must be an integer in [0, {MAX_LOGPROBS}] (the alternatives "
                                            f"returned per token) or null, got {k!r}")
        return k

    if not chat:
        if body.get("logprobs") is not None and body.get("echo"):
            raise InvalidRequestError("logprobs", "logprobs with echo is not supported (the prompt's "
                                                  "log-probabilities are not computed); send one of the two")
        return count("logprobs")
    wanted, k = body.get("logprobs"), count("top_logprobs")
    if wanted is not None and not isinstance(wanted, bool):
        raise InvalidRequestError("logprobs", f"logprobs must be true or false, got {wanted!r}")
    if not wanted:
        if k:
            raise InvalidRequestError("top_logprobs", "top_logprobs needs logprobs: true")
        return None
    return k or 0


class LogprobsShape:
    """An output's log-probabilities in the response's shape, from its token ids and the engine's
    entries (``RequestOutput.logprobs``); ``token_bytes(id)``: the tokenizer's. Completions number
    each token's text_offset on from the previous call's (the stream's chunks)."""

    def __init__(self, chat: bool, token_bytes):
        self.chat, self.token_bytes, self.offset = chat, token_bytes, 0

    def __call__(self, ids: list[int], entries: list | None) -> dict | None:
        if not ids or not entries:
            return None
        if self.chat:
            return {"content": [{**self._one(t, lp), "top_logprobs": [self._one(a, v) for a, v in top]}
                                for t, (lp, top) in zip(ids, entries)], "refusal": None}
        tokens = [self._text(t) for t in ids]
        offsets = []
        for text in tokens:
            offsets.append(self.offset)
            self.offset += len(text)
        return {"tokens": tokens, "token_logprobs": [lp for lp, _ in entries],
                "top_logprobs": [{self._text(a): v for a, v in top} for _, top in entries], "text_offset": offsets}

    def _text(self, token_id: int) -> str:
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    def _one(self, token_id: int, logprob: float) -> dict:
        b = self.token_bytes(token_id)
        return {"token": b.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(b)}


def include_usage(body: dict) -> bool:
    """stream_options.include_usage: a last streamed chunk carries the usage (no choices)."""
    return bool((body.get("stream_options") or {}).get("include_usage"))


def check_model(body: dict, model_name: str) -> None:
    if body.get("model") not in (model_name, None, ""):
        raise UnknownModelError(f"the model '{body.get('model')}' does not exist; this server serves "
                                f"'{model_name}'")


def completion_prompt(body: dict) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise InvalidRequestError("prompt", "prompt must be a string (one prompt per request)")
    return prompt


def chat_messages(body: dict) -> list[dict]:
    """[{role, content}] with text content. A message's ``name`` is ignored; its other fields (tool_calls,
    audio, ...) are refused unless empty; content parts must be text."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("messages", "messages must be a non-empty list of {role, content}")
    out = []
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise InvalidRequestError("messages", f"messages[{i}].content[{j}] is of type {kind!r}; only "
                                                          f"text parts ({{\"type\": \"text\", \"text\": ...}}) "
                                                          f"are supported")
            content = "".join(part["text"] for part in content)
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(content, str):
            raise InvalidRequestError("messages", f"messages[{i}] must have a string role and text content")
        extra = sorted(k for k, v in m.items() if k not in ("role", "content", "name") and v not in (None, []))
        if extra:
            raise InvalidRequestError("messages", f"messages[{i}] has {extra}: not supported (tools and audio are "
                                                  f"not); a message has role, content and an optional name")
        out.append({"role": m["role"], "content": content})
    return out


def parse_request(body, chat: bool, model_name: str) -> tuple[SamplingParams, str | None, list[dict] | None]:
    """A decoded request body, checked in full: (params, prompt, messages), exactly one of the last two
    set. Anything wrong raises InvalidRequestError (400, naming the field) or UnknownModelError (404)."""
    if not isinstance(body, dict):
        raise InvalidRequestError("body", f"the request body must be a JSON object, got {type(body).__name__}")
    check_model(body, model_name)
    params = sampling_params(body, chat)
    if chat:
        return params, None, chat_messages(body)
    return params, completion_prompt(body), None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def completion_body(rid, model, text, finish_reason, n_prompt, n_out, logprobs=None) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": logprobs}],
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}}


def chat_body(rid, model, text, finish_reason, n_prompt, n_out, logprobs=None) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": finish_reason, "logprobs": logprobs}],
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}}


def completion_chunk(rid, model, text, finish_reason, logprobs=None) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": logprobs}]}


def chat_chunk(rid, model, text, finish_reason, first: bool, logprobs=None) -> dict:
    delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": logprobs}]}


def usage_chunk(rid, model, chat: bool, n_prompt, n_out) -> dict:
    """The last streamed chunk when stream_options.include_usage is true: no choices, the usage."""
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [],
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}}


def openai_finish_reason(reason: str | None) -> str | None:
    """Only normal endings reach here: a failed or aborted request is an error (``error_body``)."""
    return {"stop": "stop", "length": "length"}.get(reason, reason)
