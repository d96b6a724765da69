"""Streaming clients for the load generator: each yields, as a chunk arrives, how many tokens it holds.

A server may hand over several tokens in one chunk (ours does when its reader fell behind): a KServe
response says how many in its ``num_output_tokens`` parameter (a server without it: one per
response); an OpenAI stream ends with the usage (``stream_options.include_usage``), and tokens it
counts beyond the chunks are put at the last chunk's arrival.

* :class:`KServeClient`: KServe v2 gRPC ModelStreamInfer through tritonclient's asyncio client
  (one stream per request, Triton-vLLM conventions: text_input, stream, sampling_parameters).
* :class:`OpenAIClient`: /v1/completions with server-sent events through the openai package.

Both ask for exactly ``max_tokens`` tokens (``ignore_eos``) so every server does the same work.
"""

from __future__ import annotations

import json

import numpy as np


class KServeClient:
    def __init__(self, url: str, model: str):
        import tritonclient.grpc.aio as tga
        self.tga = tga
        self.client = tga.InferenceServerClient(url)
        self.model = model

    def _inputs(self, prompt: str, max_tokens: int):
        tga = self.tga
        text = tga.InferInput("text_input", [1], "BYTES")
        text.set_data_from_numpy(np.array([prompt.encode()], dtype=object))
        stream = tga.InferInput("stream", [1], "BOOL")
        stream.set_data_from_numpy(np.array([True], dtype=bool))
        params = tga.InferInput("sampling_parameters", [1], "BYTES")
        params.set_data_from_numpy(np.array([json.dumps(
            {"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}).encode()], dtype=object))
        return [text, stream, params]

    async def stream(self, request_id: str, prompt: str, max_tokens: int):
        async def requests():
            yield {"model_name": self.model, "inputs": self._inputs(prompt, max_tokens), "request_id": request_id,
                   "enable_empty_final_response": True}

        async for result, error in self.client.stream_infer(requests()):
            if error is not None:
                raise RuntimeError(str(error))
            response = result.get_response()
            final = response.parameters["triton_final_response"].bool_param \
                if "triton_final_response" in response.parameters else False
            yield response.parameters["num_output_tokens"].int64_param \
                if "num_output_tokens" in response.parameters else 1
            if final:
                return

    async def close(self) -> None:
        await self.client.close()


class OpenAIClient:
    def __init__(self, base_url: str, model: str):
        import openai
        self.client = openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0)
        self.model = model

    async def stream(self, request_id: str, prompt: str, max_tokens: int):
        stream = await self.client.completions.create(model=self.model, prompt=prompt, max_tokens=max_tokens,
                                                      temperature=0, stream=True, extra_body={"ignore_eos": True},
                                                      stream_options={"include_usage": True})
        chunks = 0
        async for chunk in stream:
            if chunk.choices:
                chunks += 1
                yield 1
            usage = getattr(chunk, "usage", None)
            if usage is not None and usage.completion_tokens > chunks:
                yield usage.completion_tokens - chunks

    async def close(self) -> None:
        await self.client.close()


def make_client(protocol: str, url: str, model: str):
    if protocol == "kserve":
        return KServeClient(url, model)
    if protocol == "openai":
        return OpenAIClient(url, model)
    raise ValueError(f"protocol must be kserve or openai, got {protocol!r}")
