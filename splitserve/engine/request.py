"""A request as the engine tracks it.

States (``RequestStatus``)::

    WAITING --admitted--> RUNNING --finished--> FINISHED_{STOPPED,LENGTH,ABORTED,ERROR}
       ^                     |   \
       +----preempted--------+    +--first token, hold_kv--> FINISHED_PREFILLED (blocks held
                                       for a KV transfer until released)
    (preempted: blocks freed, KV recomputed on readmission)

The engine has no separate prefill and decode phase: a request's
``num_computed_tokens`` catches up with ``num_tokens`` (prompt + output) a
chunk at a time. When it has caught up, the step samples one more token.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from splitserve.engine.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"
    FINISHED_PREFILLED = "prefilled"  # prefill role: done here, KV handed to a decode worker

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
    hold_kv: bool = False  # prefill role: stop after the first token and keep the blocks
    draft_token_ids: list[int] = field(default_factory=list)  # speculative drafts for the next step only
    draft_probs: object = None  # their proposal distributions [k, V], or None (point masses)

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
