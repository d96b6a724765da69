"""What the engine hands back per request per step, and the text bookkeeping
behind it (detokenization, stop strings, holding back a possible stop prefix).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from splitserve.engine.tokenizer import IncrementalDetokenizer, TextTokenizer


@dataclass(frozen=True)
class RequestOutput:
    """A delta: the tokens and text produced for one request since its last output."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"; "prefilled" / "migrated": moved on
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0  # after this delta, so new_token_ids start at index num_output_tokens - len(...)
    error: str | None = None
    # where the request goes: on the final "migrated" output, the worker that continues it; on an output
    # without tokens that is not final, where it is about to go (a reader may open that stream early)
    moved_to: str | None = None
    # when the request asked (params.logprobs): per new token, its log-probability and the most likely
    # tokens at its position [(token id, log-probability)], best first (``sampler.TokenLogprob``)
    logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None

    @property
    def index(self) -> int:
        """Output index of new_token_ids[0] (where the next token would be, for a delta without tokens)."""
        return self.num_output_tokens - len(self.new_token_ids)


def merge_outputs(a: RequestOutput, b: RequestOutput) -> RequestOutput | None:
    """``a`` then ``b`` (the same request's next delta) as one delta; None when they must stay apart (``a``
    is final, or either is a notice that the request is about to move)."""
    if a.finished or (a.moved_to is not None) or (b.moved_to is not None and not b.finished):
        return None
    logprobs = None if a.logprobs is None and b.logprobs is None else (a.logprobs or []) + (b.logprobs or [])
    return RequestOutput(b.request_id, a.new_token_ids + b.new_token_ids, a.new_text + b.new_text, b.finished,
                         b.finish_reason, b.num_prompt_tokens, b.num_output_tokens, b.error, b.moved_to, logprobs)


@dataclass(frozen=True)
class StepLoad:
    """What one model step computed and how long it took: the inputs of the step-time models of
    ``autoscaler/catalog.py`` (prefill: tokens and attention; decode: sequences and context)."""

    seconds: float
    sequences: int  # chunks in the step (a decode step's batch)
    tokens: int  # new tokens computed
    attention: int  # sum over chunks of new tokens x context after the step (a prefill pass's sum of squares)
    context: int  # sum over chunks of the context after the step (a decode step's KV tokens)


@dataclass
class CompletionResult:
    """A whole request's result, accumulated from its deltas."""

    request_id: str
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    error: str | None = None
    logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None

    def add(self, out: RequestOutput) -> None:
        if out.logprobs is not None:
            self.logprobs = (self.logprobs or []) + out.logprobs
        self.token_ids.extend(out.new_token_ids)
        self.text += out.new_text
        self.num_prompt_tokens = out.num_prompt_tokens
        if out.finished:
            self.finish_reason, self.error = out.finish_reason, out.error


class TextState:
    """Output text of one request: decoded incrementally, cut at stop strings.

    Text that might be the start of a stop string is held back until it is
    clear either way, so a client never sees part of a stop string.
    """

    def __init__(self, tokenizer: TextTokenizer, stop: tuple[str, ...]):
        self.detok = IncrementalDetokenizer(tokenizer)
        self.stop = stop
        self.emitted = 0  # characters of detok.text already handed out
        self.stopped_at: int | None = None

    def state(self) -> dict:
        """Plain data for a snapshot (the token ids travel separately)."""
        d = self.detok
        return {"text": d.text, "prefix_offset": d.prefix_offset, "read_offset": d.read_offset}

    @classmethod
    def restore(cls, tokenizer: TextTokenizer, stop: tuple[str, ...], token_ids: list[int], state: dict | None,
                emitted: int) -> "TextState":
        """The text state of a request that already produced ``token_ids``, of whose text the client
        has ``emitted`` characters; without ``state``, the text is rebuilt by decoding the tokens again."""
        text = cls(tokenizer, stop)
        if state is None:
            for t in token_ids:
                text.detok.add(t)
        else:
            text.detok.ids = list(token_ids)
            text.detok.text = state["text"]
            text.detok.prefix_offset, text.detok.read_offset = state["prefix_offset"], state["read_offset"]
        text.emitted = min(emitted, len(text.detok.text))
        return text

    def add(self, token_id: int) -> bool:
        """Add one token; returns True if a stop string now appears."""
        before = len(self.detok.text)
        if not self.detok.add(token_id) or not self.stop:
            return False
        return self._find_stop(before)

    def finish(self) -> None:
        if self.stopped_at is None:
            before = len(self.detok.text)
            self.detok.flush()
            self._find_stop(before)

    def take(self, final: bool) -> str:
        """The text not yet handed out (all of it when ``final``)."""
        text = self.detok.text
        end = self.stopped_at if self.stopped_at is not None else len(text)
        if not final and self.stopped_at is None:
            end -= self._holdback(text)
        if end <= self.emitted:
            return ""
        delta, self.emitted = text[self.emitted:end], end
        return delta

    def _find_stop(self, before: int) -> bool:
        text = self.detok.text
        longest = max((len(s) for s in self.stop), default=0)
        window = max(0, before - longest + 1)
        hits = [i for i in (text.find(s, window) for s in self.stop) if i >= 0]
        if hits:
            self.stopped_at = max(min(hits), self.emitted)
            return True
        return False

    def _holdback(self, text: str) -> int:
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best
