"""OpenAI-compatible request parsing and response shapes (pure; the routes live in frontdoor.py)."""

from __future__ import annotations

import time
import uuid

from splitserve.errors import InvalidRequestError, SplitserveError, UnknownModelError, describe, status_of
from splitserve.engine.sampling_params import SamplingParams


def error_body(exc: BaseException) -> tuple[int, dict]:
    """(HTTP status, OpenAI error body) for any exception, through the one status table."""
    _, status, kind = status_of(exc)
    return status, {"error": {"message": str(exc) if isinstance(exc, SplitserveError) else describe(exc),
                              "type": kind, "param": getattr(exc, "field", None), "code": None}}


def sampling_params(body: dict) -> SamplingParams:
    if body.get("n", 1) != 1:
        raise InvalidRequestError("n", "only n=1 is supported")
    stop = body.get("stop") or ()
    return SamplingParams(
        max_tokens=body.get("max_completion_tokens") or body.get("max_tokens") or 16,
        temperature=body.get("temperature", 1.0) if body.get("temperature") is not None else 1.0,
        top_p=body.get("top_p", 1.0) if body.get("top_p") is not None else 1.0,
        top_k=body.get("top_k", 0) or 0,
        seed=body.get("seed"),
        stop=(stop,) if isinstance(stop, str) else tuple(stop),
        ignore_eos=bool(body.get("ignore_eos", False)),  # extension, as vLLM's server has it
        speculative=body.get("speculative", True),  # extension: false opts out of speculative decoding
    )


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
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("messages", "messages must be a non-empty list of {role, content}")
    out = []
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(content, str):
            raise InvalidRequestError("messages", f"messages[{i}] must have a string role and text content")
        out.append({"role": m["role"], "content": content})
    return out


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def completion_body(rid, model, text, finish_reason, n_prompt, n_out) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}],
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}}


def chat_body(rid, model, text, finish_reason, n_prompt, n_out) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": finish_reason, "logprobs": None}],
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}}


def completion_chunk(rid, model, text, finish_reason) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}]}


def chat_chunk(rid, model, text, finish_reason, first: bool) -> dict:
    delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}


def openai_finish_reason(reason: str | None) -> str | None:
    """Only normal endings reach here: a failed or aborted request is an error (``error_body``)."""
    return {"stop": "stop", "length": "length"}.get(reason, reason)
