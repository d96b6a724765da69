"""Exceptions raised by the engine.

Every message says what was wrong and what is allowed, so that a front door
can hand it to the client unchanged.
"""

from __future__ import annotations


class SplitserveError(Exception):
    """Base class of every error splitserve raises on purpose."""


class InvalidRequestError(SplitserveError, ValueError):
    """A request was rejected before it touched the batch.

    ``field`` names the offending parameter (``"prompt"``, ``"max_tokens"``, ...)
    so that the gRPC / HTTP layers can point at it.
    """

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class PromptTooLongError(InvalidRequestError):
    """The prompt does not fit the model's context (or the KV pool)."""

    def __init__(self, num_tokens: int, max_tokens: int, limit: str = "the model's context"):
        super().__init__(
            "prompt",
            f"prompt has {num_tokens} tokens but {limit} allows at most {max_tokens} "
            f"prompt tokens (one position is kept free for the first generated token)",
        )
        self.num_tokens = num_tokens
        self.max_tokens = max_tokens


class UnknownRequestError(SplitserveError, KeyError):
    """An operation named a request id the engine does not hold."""


class ModelLoadError(SplitserveError):
    """The model could not be loaded."""


class ModelNotFoundError(ModelLoadError, FileNotFoundError):
    """The model path does not exist or holds no model."""


class CorruptModelError(ModelLoadError):
    """The model file exists but cannot be parsed, or is inconsistent."""


class UnsupportedModelError(ModelLoadError):
    """The model uses an architecture, tensor type or feature we do not support."""
