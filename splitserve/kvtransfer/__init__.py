"""Moving paged KV blocks between workers over gRPC.

``wire.py`` (fingerprints, chunking, checksums), ``server.py`` (the receiving
side, served by every decode worker), ``client.py`` (the sending side),
``tls.py`` (optional mutual TLS on both sides), ``endpoint.py`` (where a KV
server listens and the address it advertises) and ``transport.py`` (the small
interface another transport would implement).
"""
