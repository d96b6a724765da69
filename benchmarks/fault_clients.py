"""The fault campaign's clients (``faults.py``): one request each, counted as its client saw it.

    openai_stream(base, prompt, max_tokens, out)   an OpenAI SSE completion, into ``out`` (an Outcome)
    KServeStream(url, rid, prompt, max_tokens)     one request on its own tritonclient bidi stream
    Recovery(base, fault_at)                       probes from a fault until a new request completes

An Outcome ends completed, refused (429 / RESOURCE_EXHAUSTED, with the reason), failed (any other
error the client saw, with the reason), cancelled (the client left), or stays hung.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
from helpers import kserve_inputs  # noqa: E402  (the tests' own client helpers)

MODEL = "smollm2"
PROMPTS = ["The three primary colors are", "Once upon a time, a small robot", "def add(a, b):",
           "The capital of France is", "Water boils at", "A haiku about the sea:"]
LONG = "The history of science is the study of how people came to understand the natural world. "
HANG_S = 180.0  # a request with no end by then is counted as hung
# what a NoCapacityError says (router.py, prefill/worker.py); a KServe stream error starts with its code
REFUSALS = ("RESOURCE_EXHAUSTED", "had room", "did not start", "max_queued_requests", "was full", "is up (waited")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class Outcome:
    status: str = "hung"  # completed | refused | failed | hung
    text: str = ""
    reason: str = ""
    tokens: int = 0
    first_token: threading.Event = field(default_factory=threading.Event, repr=False)


# -- clients -----------------------------------------------------------------------------------------


def openai_stream(base: str, prompt: str, max_tokens: int, out: Outcome, leave_after: int | None = None) -> None:
    import openai
    client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=HANG_S)
    try:
        stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                           stream=True, extra_body={"ignore_eos": True})
        with stream:
            for chunk in stream:
                out.text += chunk.choices[0].text
                out.tokens += 1
                out.first_token.set()
                if leave_after is not None and out.tokens >= leave_after:
                    out.status, out.reason = "cancelled", "the client left"
                    return
                if chunk.choices[0].finish_reason is not None:
                    out.status = "completed" if chunk.choices[0].finish_reason == "length" else "failed"
                    out.reason = chunk.choices[0].finish_reason
        if out.status == "hung":
            out.status, out.reason = "failed", "the stream ended without a finish reason"
    except openai.RateLimitError as e:
        out.status, out.reason = "refused", f"429 (Retry-After {e.response.headers.get('retry-after')}): {e.message}"
    except openai.APITimeoutError:
        out.status = "hung"
    except Exception as e:  # an SSE error event, or an HTTP error: the client saw a reason
        out.status, out.reason = "failed", f"{type(e).__name__}: {e}"[:300]
    finally:
        out.first_token.set()


class KServeStream:
    """One request on its own tritonclient bidi stream (a stream's error carries no request id, so one
    request per stream is what lets each error be counted against its request)."""

    def __init__(self, url: str, rid: str, prompt: str, max_tokens: int):
        import tritonclient.grpc as tg
        self.out, self.done, self.closed = Outcome(), threading.Event(), False
        self.client = tg.InferenceServerClient(url)
        self.client.start_stream(callback=self._on)
        self.client.async_stream_infer(MODEL, kserve_inputs(prompt, {"max_tokens": max_tokens, "temperature": 0,
                                                                     "ignore_eos": True}, stream=True),
                                       request_id=rid, enable_empty_final_response=True)

    def _on(self, result, error):
        o = self.out
        if self.closed:  # this client cancelled: what the stream says afterwards is not the server's
            return
        if error is not None:
            message = str(error)  # a stream's error carries the message only, not the status code
            o.status = "refused" if any(why in message for why in REFUSALS) else "failed"
            o.reason = message[:300]
        else:
            r = result.get_response()
            o.text += result.as_numpy("text_output")[0].decode()
            o.tokens += int(r.parameters["num_output_tokens"].int64_param)
            if not r.parameters["triton_final_response"].bool_param:
                o.first_token.set()
                return
            reason = result.as_numpy("finish_reason")[0].decode()
            o.status, o.reason = ("completed" if reason == "length" else "failed"), reason
        o.first_token.set()
        self.done.set()

    def close(self, cancel: bool = False) -> None:
        if not self.closed:
            self.closed = True
            self.client.stop_stream(cancel_requests=cancel)
            self.client.close()


class Recovery:
    """From the fault until a new request completes: probes (OpenAI, 4 tokens) one after another,
    started at the fault, alongside the requests the fault hit."""

    def __init__(self, base: str, fault_at: float):
        self.base, self.fault_at, self.seconds = base, fault_at, None
        self.thread = threading.Thread(target=self._probe, daemon=True)
        self.thread.start()

    def _probe(self) -> None:
        while time.monotonic() < self.fault_at + HANG_S:
            o = Outcome()
            openai_stream(self.base, PROMPTS[0], 4, o)
            if o.status == "completed":
                self.seconds = round(time.monotonic() - self.fault_at, 2)
                return
            time.sleep(0.2)

    def result(self) -> float | None:
        self.thread.join(HANG_S)
        return self.seconds
