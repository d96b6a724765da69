"""Optional API keys on the front door: where they come from, and checking what a request presents.

Lifecycle::

    keys      ServeConfig.api_keys: the YAML's ``api_keys: [...]``, else $SPLITSERVE_API_KEYS
              (comma-separated); ``splitserve serve --api-key-file FILE`` (one key per line) overrides
              both. No keys: the front door is open, as before.
    ApiKeys   built by start_server from the keys; holds only their SHA-256 digests, so the keys
              themselves never travel to the Serve replica.
    request   the front door takes the credential from the HTTP headers or the gRPC metadata
              (``authorization: Bearer <key>``, or ``x-api-key: <key>``) and calls ApiKeys.check:
              None, or AuthenticationError (401 / UNAUTHENTICATED) saying what was missing or wrong.
              The presented key is compared in constant time and never echoed.

Open without a key (probes carry none): ``grpc.health.v1.Health``, server reflection, KServe
``ServerLive`` / ``ServerReady`` and HTTP ``/health``. The admin API keeps its own cluster token.
Pure: no Ray, no gRPC, no HTTP framework.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterable, Mapping

from splitserve.errors import AuthenticationError

API_KEYS_ENV = "SPLITSERVE_API_KEYS"
HOW_TO_SEND = {
    "http": "send the header 'Authorization: Bearer <key>' (or 'x-api-key: <key>')",
    "grpc": "send the metadata 'authorization: Bearer <key>' (or 'x-api-key: <key>')",
}


def _valid_key(key: str) -> bool:
    """A key fits in an HTTP header and in gRPC metadata: visible ASCII, no spaces or commas."""
    return bool(key) and key.isascii() and key.isprintable() and not any(c.isspace() or c == "," for c in key)


def check_keys(keys, source: str = "api_keys") -> tuple[str, ...]:
    """The keys as a tuple, or a ValueError naming the source and the position of a bad one (never the key)."""
    if isinstance(keys, str) or not isinstance(keys, Iterable):
        raise ValueError(f"{source} must be a list of keys, got {type(keys).__name__}")
    keys = tuple(keys)
    for i, key in enumerate(keys):
        if not isinstance(key, str) or not _valid_key(key):
            raise ValueError(f"{source}: key #{i + 1} is not a usable API key; a key is visible ASCII "
                             f"characters with no spaces or commas")
    return keys


def keys_from_env(environ: Mapping[str, str] = os.environ) -> tuple[str, ...]:
    """The keys in $SPLITSERVE_API_KEYS (comma-separated, spaces around a key ignored); unset or empty: none."""
    raw = environ.get(API_KEYS_ENV, "")
    if not raw.strip():
        return ()
    keys = tuple(k.strip() for k in raw.split(",") if k.strip())
    if not keys:
        raise ValueError(f"${API_KEYS_ENV} is set but holds no key; give comma-separated keys or unset it")
    return check_keys(keys, f"${API_KEYS_ENV}")


def load_key_file(path: str) -> tuple[str, ...]:
    """The keys in ``path``: one per line; blank lines and lines starting with '#' are skipped."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise ValueError(f"--api-key-file: no file {path!r}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--api-key-file: cannot read {path!r}: {e}") from None
    keys = []
    for number, line in enumerate(lines, 1):
        key = line.strip()
        if not key or key.startswith("#"):
            continue
        if not _valid_key(key):
            raise ValueError(f"--api-key-file {path!r}: line {number} is not a usable API key; write one key "
                             f"per line, visible ASCII characters with no spaces or commas")
        keys.append(key)
    if not keys:
        raise ValueError(f"--api-key-file {path!r} holds no key; write one key per line (lines starting "
                         f"with '#' are comments)")
    return tuple(keys)


def credential(authorization: str | None, x_api_key: str | None, protocol: str) -> str:
    """The key a request presents (``Authorization: Bearer <key>`` first, else ``x-api-key``)."""
    name = "Authorization header" if protocol == "http" else "authorization metadata"
    if authorization is not None and authorization.strip():
        scheme, _, key = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise AuthenticationError(f"the {name} must read 'Bearer <key>' (the word Bearer, a space, "
                                      f"then the API key)")
        return key.strip()
    if x_api_key is not None and x_api_key.strip():
        return x_api_key.strip()
    raise AuthenticationError(f"this server requires an API key and the request carried none: "
                              f"{HOW_TO_SEND[protocol]}")


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class ApiKeys:
    """The digests of the server's keys; ``check`` accepts a request presenting any of them."""

    def __init__(self, keys: Iterable[str] = ()):
        self._digests = tuple(_digest(k) for k in check_keys(keys))

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def __len__(self) -> int:
        return len(self._digests)

    def matches(self, key: str) -> bool:
        """Constant time in the key: equal-length digests, every stored digest compared, no early exit."""
        presented = _digest(key)
        found = False
        for d in self._digests:
            found |= hmac.compare_digest(presented, d)
        return found

    def check(self, authorization: str | None, x_api_key: str | None, protocol: str) -> None:
        """None when keys are off or the request presents a valid one; else AuthenticationError."""
        if not self._digests:
            return
        if not self.matches(credential(authorization, x_api_key, protocol)):
            raise AuthenticationError(f"the API key is not valid: it matches none of this server's keys "
                                      f"({HOW_TO_SEND[protocol]} with a key the server was given)")

    def check_grpc(self, metadata: Iterable[tuple[str, str]]) -> None:
        """``check`` on gRPC invocation metadata (keys arrive lower-case)."""
        if not self._digests:
            return
        found = {k.lower(): v for k, v in metadata or ()}
        self.check(found.get("authorization"), found.get("x-api-key"), "grpc")
