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
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    error: str | None = None


@dataclass
class CompletionResult:
    """A whole request's result, accumulated from its deltas."""

    request_id: str
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    error: str | None = None

    def add(self, out: RequestOutput) -> None:
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
