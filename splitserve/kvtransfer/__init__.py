"""Moving paged KV blocks between workers over gRPC.

``wire.py`` (fingerprints, chunking, checksums), ``server.py`` (the receiving
side, served by every decode worker), ``client.py`` (the sending side) and
``transport.py`` (the small interface another transport would implement).
"""
