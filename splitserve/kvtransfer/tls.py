"""Mutual TLS on the KV plane (optional; plaintext when off).

With ``kv_tls`` set (``ServeConfig.kv_tls``, or the ``SPLITSERVE_KV_TLS_*``
environment variables, e.g. a Kubernetes Secret mounted as files), every
worker holds one certificate that serves both ends:

    decode worker's KV server   presents its certificate; requires the sender's, signed by ``ca``
    every KVSender channel      presents its certificate; checks the server's against ``ca`` and
                                against ``server_name`` (if set) or else the address it dials (an IP SAN)
    plaintext, no client certificate, another CA   -> refused in the TLS handshake, before any call

So a worker certificate needs both extended key usages (serverAuth and
clientAuth) or none. The cluster token is still checked on every call.

Lifecycle: the driver builds :class:`KVTLS` from config or environment and
checks that the three files are there and hold PEM (``check``); the paths,
never the key, travel to the worker actors, and each worker reads the files
on its own node when it builds its server or its channels.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

ENV_PREFIX = "SPLITSERVE_KV_TLS_"  # SPLITSERVE_KV_TLS_CERT / _KEY / _CA / _SERVER_NAME
PEM_MARKERS = {"cert": b"-----BEGIN CERTIFICATE-----", "key": b"PRIVATE KEY-----",
               "ca": b"-----BEGIN CERTIFICATE-----"}


@dataclass(frozen=True)
class KVTLS:
    cert: str  # PEM file: this worker's certificate (serverAuth + clientAuth), chain after it if any
    key: str  # PEM file: its private key
    ca: str  # PEM file: the CA(s) peers' certificates must chain to
    server_name: str | None = None  # the name checked in a KV server's certificate (None: the dialled IP)

    @classmethod
    def from_dict(cls, raw: dict) -> "KVTLS":
        allowed = [f.name for f in fields(cls)]
        unknown = set(raw) - set(allowed)
        if unknown:
            raise ValueError(f"kv_tls: unknown keys {sorted(unknown)}; allowed: {allowed}")
        missing = [k for k in ("cert", "key", "ca") if not raw.get(k)]
        if missing:
            raise ValueError(f"kv_tls needs cert, key and ca (PEM file paths); missing: {missing}")
        return cls(**raw)

    @classmethod
    def from_env(cls, environ=os.environ) -> "KVTLS | None":
        """``SPLITSERVE_KV_TLS_CERT``, ``_KEY``, ``_CA`` (all three, or none: TLS off) and
        ``_SERVER_NAME`` (optional)."""
        raw = {k: environ.get(ENV_PREFIX + k.upper()) for k in ("cert", "key", "ca", "server_name")}
        if not any(raw[k] for k in ("cert", "key", "ca")):
            return None
        missing = [ENV_PREFIX + k.upper() for k in ("cert", "key", "ca") if not raw[k]]
        if missing:
            raise ValueError(f"KV TLS from the environment needs {ENV_PREFIX}CERT, _KEY and _CA together; "
                             f"missing: {missing}")
        return cls(**{k: v for k, v in raw.items() if v})

    def check(self) -> "KVTLS":
        """Each file there, readable, and holding PEM of the right kind; ValueError naming the field."""
        self.read()
        if self.server_name is not None and not (isinstance(self.server_name, str) and self.server_name.strip()):
            raise ValueError(f"kv_tls.server_name must be a host name (or null); got {self.server_name!r}")
        return self

    def read(self) -> dict[str, bytes]:
        """{"cert", "key", "ca"}: the PEM bytes of each file."""
        pems = {}
        for name, marker in PEM_MARKERS.items():
            path = getattr(self, name)
            try:
                with open(path, "rb") as f:
                    pems[name] = f.read()
            except OSError as e:
                raise ValueError(f"kv_tls.{name}: cannot read {path!r} on this node ({e.strerror}); "
                                 f"cert, key and ca must be readable PEM files on every node") from None
            if marker not in pems[name]:
                kind = "private key" if name == "key" else "certificate"
                raise ValueError(f"kv_tls.{name}: {path!r} holds no PEM {kind} (no {marker.decode()!r} line)")
        return pems

    def server_credentials(self):
        import grpc
        pems = self.read()
        return grpc.ssl_server_credentials([(pems["key"], pems["cert"])], root_certificates=pems["ca"],
                                           require_client_auth=True)

    def channel_credentials(self):
        import grpc
        pems = self.read()
        return grpc.ssl_channel_credentials(root_certificates=pems["ca"], private_key=pems["key"],
                                            certificate_chain=pems["cert"])

    def channel_options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


def checked_tls(value) -> KVTLS | None:
    """``ServeConfig.kv_tls`` as given (a mapping, a KVTLS or None), checked (files readable PEM)."""
    if isinstance(value, dict):
        value = KVTLS.from_dict(value)
    if value is not None and not isinstance(value, KVTLS):
        raise ValueError(f"kv_tls must be a mapping {{cert, key, ca, server_name}} or null; got {value!r}")
    return value.check() if value is not None else None


def explain_refusal(details: str, tls_on: bool) -> str:
    """gRPC's message for a connection that failed, with what it means on the KV plane when the cause
    is TLS (a server that refuses a handshake just closes the socket: the sender sees no reason)."""
    if "Hostname Verification" in details:
        hint = ("the KV server's certificate does not name the address dialled: give it an IP SAN for that "
                "address, or set kv_tls.server_name to a DNS name every worker certificate carries")
    elif "WRONG_VERSION_NUMBER" in details and tls_on:
        hint = "the KV server speaks plaintext: set kv_tls on every worker or on none"
    elif "CERTIFICATE_VERIFY_FAILED" in details and tls_on:
        hint = "the KV server's certificate is not signed by the CA in this worker's kv_tls.ca"
    elif "Socket closed" in details and tls_on:
        hint = ("the KV server closed the connection in the TLS handshake: it refuses this worker's certificate "
                "unless it is signed by the CA in the server's kv_tls.ca")
    elif "Socket closed" in details:
        hint = ("the KV server closed the connection: a KV server with kv_tls on refuses plaintext senders; "
                "set kv_tls on every worker or on none")
    else:
        return details
    return f"{details} ({hint})"
