"""Per-request sampling parameters, validated at construction.

A bad value raises :class:`InvalidRequestError` naming the field, so it is
rejected before the request joins a batch and disturbs nobody else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from splitserve.errors import InvalidRequestError

# Largest value accepted for a seed: it must fit torch.Generator.manual_seed.
_MAX_SEED = 2**63 - 1
MAX_PENALTY = 2.0  # presence / frequency penalties, as OpenAI bounds them
MAX_LOGPROBS = 20  # alternatives per token, as OpenAI's top_logprobs


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request.

    temperature == 0 means greedy (argmax); top_k == 0 disables top-k; top_p == 1
    disables nucleus sampling. ``seed`` makes sampling reproducible regardless of
    what else is in the batch. ``presence_penalty`` / ``frequency_penalty`` (OpenAI's, in
    [-2, 2]) lower the logit of every token already in the output, by the penalty once / by the
    penalty per occurrence, before any other step (greedy included). ``logprobs`` (None: off; k in
    [0, 20]): each output token comes with its log-probability under the model (the raw
    distribution, before penalties and temperature) and the k most likely tokens with theirs.
    """

    max_tokens: int = 128
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    speculative: bool = True  # False: this request never gets draft tokens (when the engine speculates)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None

    def __post_init__(self):
        if self.stop is None:
            object.__setattr__(self, "stop", ())
        elif isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif isinstance(self.stop, (list, tuple)):
            object.__setattr__(self, "stop", tuple(self.stop))
        else:
            raise InvalidRequestError("stop", f"stop must be a string or a list of strings, got {self.stop!r}")
        _check_int("max_tokens", self.max_tokens, minimum=1, allowed="an integer >= 1")
        _check_number("temperature", self.temperature)
        if self.temperature < 0:
            raise InvalidRequestError(
                "temperature", f"temperature must be >= 0 (0 means greedy), got {self.temperature}"
            )
        _check_int("top_k", self.top_k, minimum=0, allowed="an integer >= 0 (0 disables top-k)")
        _check_number("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise InvalidRequestError("top_p", f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None:
            _check_int("seed", self.seed, minimum=0, allowed=f"an integer in [0, {_MAX_SEED}]")
            if self.seed > _MAX_SEED:
                raise InvalidRequestError("seed", f"seed must be in [0, {_MAX_SEED}], got {self.seed}")
        if not isinstance(self.ignore_eos, bool):
            raise InvalidRequestError("ignore_eos", f"ignore_eos must be true or false, got {self.ignore_eos!r}")
        if not isinstance(self.speculative, bool):
            raise InvalidRequestError("speculative", f"speculative must be true or false, got {self.speculative!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check_number(name, value)
            if not -MAX_PENALTY <= value <= MAX_PENALTY:
                raise InvalidRequestError(name, f"{name} must be in [-{MAX_PENALTY}, {MAX_PENALTY}], got {value}")
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, minimum=0,
                       allowed=f"an integer in [0, {MAX_LOGPROBS}] (the alternatives returned per token) or null")
            if self.logprobs > MAX_LOGPROBS:
                raise InvalidRequestError("logprobs", f"logprobs must be in [0, {MAX_LOGPROBS}] (the alternatives "
                                                      f"returned per token), got {self.logprobs}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise InvalidRequestError("stop", f"stop strings must be non-empty strings, got {s!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0


def _check_int(name: str, value, minimum: int, allowed: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequestError(name, f"{name} must be {allowed}, got {value!r}")
    if value < minimum:
        raise InvalidRequestError(name, f"{name} must be {allowed}, got {value}")


def _check_number(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidRequestError(name, f"{name} must be a finite number, got {value!r}")
