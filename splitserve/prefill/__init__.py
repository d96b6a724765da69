"""The prefill pool: Ray actors that run prompts into paged KV and hand it to decode workers."""
