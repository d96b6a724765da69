"""splitserve: a disaggregated LLM server.

Prefill and decode run in separate pools; the paged KV cache travels between
them. ``splitserve.engine`` holds the model and the engine both pools share.
"""

__version__ = "0.1.0"
