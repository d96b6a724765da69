"""The decode pool: Ray actors that receive KV over gRPC and decode with continuous batching."""
