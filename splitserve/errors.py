"""Every error splitserve raises on purpose, and the one table that maps each to a wire status.

Every message says what was wrong and what is allowed, so that a front door
can hand it to the client unchanged. The hierarchy::

    SplitserveError
      InvalidRequestError (ValueError)   bad input, named by ``field``; nothing was queued
        PromptTooLongError
      UnknownModelError                  a request named a model this server does not serve
      UnknownRequestError (KeyError)     an operation named a request id nobody holds
      RequestStateError                  the request exists but cannot do that now (finished, already moving)
      NoCapacityError                    no worker could take the request within the wait limit
      WorkerLostError                    a worker died or stopped answering, and no other could take over
      TransferFailedError                moving KV between workers failed (``code``: the receiver's gRPC status)
      RequestFailedError                 the engine failed the request (a model step raised)
      AuthenticationError                the front door wants an API key: none was sent, or it is not valid
      ConfigurationError (ValueError)    the server's or a worker's configuration cannot work (layout mismatch, ...)
      ModelLoadError
        ModelNotFoundError (FileNotFoundError), CorruptModelError, UnsupportedModelError

:func:`status_of` gives (gRPC status name, HTTP status, OpenAI error type) for
any exception, walking its class hierarchy; anything unlisted is INTERNAL / 500.
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


class UnknownModelError(SplitserveError):
    """A request named a model this server does not serve."""


class UnknownRequestError(SplitserveError, KeyError):
    """An operation named a request id the engine (or router) does not hold."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class RequestStateError(SplitserveError):
    """The request exists but cannot do what was asked now (it finished, or is already moving)."""


class NoCapacityError(SplitserveError):
    """No worker could take the request (within the wait limit, where there is one)."""


class WorkerLostError(SplitserveError):
    """A worker died or stopped answering."""

    def __init__(self, worker: str, message: str, timed_out: bool = False):
        super().__init__(f"worker {worker} was lost: {message}")
        self.worker = worker
        self.timed_out = timed_out  # it did not answer in time (it may only be busy)


class TransferFailedError(SplitserveError):
    """Moving KV between workers failed; ``code`` is the receiver's gRPC status name (or None)."""

    def __init__(self, code: str | None, message: str):
        super().__init__(f"{code or 'ERROR'}: {message}")
        self.code = code


class RequestFailedError(SplitserveError):
    """The engine failed the request; the message gives the reason."""


class AuthenticationError(SplitserveError):
    """The request carried no API key, a malformed one, or one the server does not know (never echoed)."""


class ConfigurationError(SplitserveError, ValueError):
    """A configuration that cannot work (e.g. two workers whose KV layouts differ)."""


class ModelLoadError(SplitserveError):
    """The model could not be loaded."""


class ModelNotFoundError(ModelLoadError, FileNotFoundError):
    """The model path does not exist or holds no model."""


class CorruptModelError(ModelLoadError):
    """The model file exists but cannot be parsed, or is inconsistent."""


class UnsupportedModelError(ModelLoadError):
    """The model uses an architecture, tensor type or feature we do not support."""


# class -> (gRPC status code name, HTTP status, OpenAI error type); the most specific class wins.
STATUS: dict[type, tuple[str, int, str]] = {
    InvalidRequestError: ("INVALID_ARGUMENT", 400, "invalid_request_error"),
    UnknownModelError: ("NOT_FOUND", 404, "not_found_error"),
    UnknownRequestError: ("NOT_FOUND", 404, "not_found_error"),
    RequestStateError: ("FAILED_PRECONDITION", 409, "conflict_error"),
    NoCapacityError: ("RESOURCE_EXHAUSTED", 429, "rate_limit_error"),  # with Retry-After over HTTP
    WorkerLostError: ("UNAVAILABLE", 503, "server_error"),
    TransferFailedError: ("UNAVAILABLE", 503, "server_error"),
    RequestFailedError: ("INTERNAL", 500, "server_error"),
    AuthenticationError: ("UNAUTHENTICATED", 401, "authentication_error"),
    ConfigurationError: ("FAILED_PRECONDITION", 409, "conflict_error"),
    ModelLoadError: ("INTERNAL", 500, "server_error"),
}
_DEFAULT = ("INTERNAL", 500, "server_error")


def status_of(exc: BaseException) -> tuple[str, int, str]:
    """(gRPC status name, HTTP status, OpenAI error type) for ``exc``."""
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return _DEFAULT


def describe(exc: BaseException) -> str:
    """The client-facing message: what was wrong (naming the field for bad input)."""
    if isinstance(exc, InvalidRequestError) and exc.field and not str(exc).startswith(exc.field):
        return f"{exc.field}: {exc}"
    if isinstance(exc, SplitserveError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"
