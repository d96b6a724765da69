"""A request as the engine tracks it: one record holding all of its state, and its snapshot.

States (``RequestStatus``)::

    WAITING --admitted--> RUNNING --finished--> FINISHED_{STOPPED,LENGTH,ABORTED,ERROR}
       ^                     |   \
       +----preempted--------+    +--suspend--> HELD (out of the batch, blocks kept: its KV is being
                                                sent to another engine)
                                       HELD --release--> FINISHED_PREFILLED (prefill role: the first token
                                                          was sampled here, decode goes on elsewhere)
                                                      or FINISHED_MIGRATED (moved to another decode engine)
                                       HELD --unsuspend--> RUNNING (the move failed: it goes on here)
    (preempted: blocks freed, KV recomputed on readmission)

The engine has no separate prefill and decode phase: a request's
``num_computed_tokens`` catches up with ``num_tokens`` (prompt + output) a
chunk at a time. When it has caught up, the step samples one more token.

Everything that belongs to one request lives on its :class:`Request`: tokens,
progress, parameters, its text state (detokenizer, stop strings, held-back
text), its speculative state, and the index of its next output token
(``num_output_tokens``). Sampling randomness is keyed by (seed, output index)
(``sampler.position_generator``), so there is no RNG state to carry. A
:class:`RequestSnapshot` is the same record as plain data: what ``suspend``
produces and ``resume`` / ``commit`` continue from on another engine.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field

from splitserve.engine.sampling_params import SamplingParams
from splitserve.errors import InvalidRequestError


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    HELD = "held"  # suspended: out of the batch, blocks kept while its KV travels
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"
    FINISHED_PREFILLED = "prefilled"  # prefill role: done here, KV handed to a decode worker
    FINISHED_MIGRATED = "migrated"  # moved to another decode worker, which continues it

    @property
    def finished(self) -> bool:
        return self.name.startswith("FINISHED")

    @property
    def finish_reason(self) -> str | None:
        return self.value if self.finished else None


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival: int  # monotonically increasing admission order (FCFS key)
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    num_preemptions: int = 0
    error: str | None = None
    hold_kv: bool = False  # prefill role: suspend after the first token, keeping the blocks
    draft_token_ids: list[int] = field(default_factory=list)  # speculative drafts for the next step only
    draft_probs: object = None  # their proposal distributions [k, V], or None (point masses)
    text: object = None  # output.TextState: detokenizer, stop strings, held-back text
    spec_acceptance: float = 0.6  # moving average of accepted drafts (adaptive k; optimistic start)
    scheduled_at: float | None = None  # time.monotonic() when it first got a step (queueing time ends)
    block_hashes: list = field(default_factory=list, repr=False)  # chain hashes of its full blocks (prefix cache)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output."""
        p = self.num_prompt_tokens
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:
            return self.output_token_ids[start - p:end - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - p]

    def snapshot(self) -> "RequestSnapshot":
        return RequestSnapshot(self.request_id, list(self.prompt_token_ids), list(self.output_token_ids),
                               self.num_computed_tokens, serialize_params(self.params),
                               self.text.state() if self.text is not None else None,
                               self.text.emitted if self.text is not None else 0, self.spec_acceptance)


@dataclass(frozen=True)
class RequestSnapshot:
    """A request as plain data (JSON-able): enough for another engine to continue it exactly.

    ``num_computed_tokens`` is how many tokens' KV travels with it (0: the
    receiver recomputes). ``text`` is the detokenizer state (None: rebuilt from
    the output tokens); ``text_emitted`` is how many characters of output text
    the client already has. The next output token's index is
    ``len(output_token_ids)``.
    """

    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    num_computed_tokens: int
    params: dict  # SamplingParams fields (serialize_params)
    text: dict | None = None
    text_emitted: int = 0
    spec_acceptance: float = 0.6

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def next_output_index(self) -> int:
        return len(self.output_token_ids)

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(**self.params)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RequestSnapshot":
        """Validated: a malformed snapshot raises InvalidRequestError naming what is wrong."""
        if not isinstance(d, dict):
            raise InvalidRequestError("snapshot", f"a snapshot must be a dict, got {type(d).__name__}")
        try:
            snap = cls(**d)
        except TypeError as e:
            raise InvalidRequestError("snapshot", f"malformed snapshot: {e}") from None
        snap.check()
        return snap

    def check(self) -> None:
        if not self.prompt_token_ids:
            raise InvalidRequestError("snapshot", "a snapshot needs at least one prompt token")
        if not 0 <= self.num_computed_tokens < self.num_tokens:
            raise InvalidRequestError("snapshot", f"num_computed_tokens must be in [0, {self.num_tokens}), "
                                                  f"got {self.num_computed_tokens}")
        self.sampling_params()  # raises InvalidRequestError on a bad field


def serialize_params(params: SamplingParams) -> dict:
    return {"max_tokens": params.max_tokens, "temperature": params.temperature, "top_k": params.top_k,
            "top_p": params.top_p, "seed": params.seed, "stop": list(params.stop), "ignore_eos": params.ignore_eos,
            "speculative": params.speculative, "presence_penalty": params.presence_penalty,
            "frequency_penalty": params.frequency_penalty, "logprobs": params.logprobs}
