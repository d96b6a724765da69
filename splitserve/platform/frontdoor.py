"""The front door: one Ray Serve deployment speaking KServe v2 gRPC and OpenAI HTTP.

Path of a request here: validate (clear error naming the field) -> tokenize
(chat template for chat) -> router (prefill pool -> KV transfer -> decode pool)
-> responses (gRPC messages or server-sent events). Cancellation (client gone)
propagates to whichever worker holds the request through the router.

Status mapping: bad input -> INVALID_ARGUMENT / HTTP 400 naming the field;
unknown model -> NOT_FOUND / 404; no capacity within the wait limit ->
RESOURCE_EXHAUSTED / 503.
"""


import asyncio
import json
import os
import time
import uuid

import grpc
import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from splitserve.errors import InvalidRequestError
from splitserve.engine.request import serialize_params
from splitserve.engine.tokenizer import load_tokenizer
from splitserve.platform import kserve, openai_api
from splitserve.platform.kserve import pb
from splitserve.platform.pools import make_router
from splitserve.platform.router import NoCapacityError

app = FastAPI(title="splitserve")
STALLED_READER_S = 10.0  # a bidi stream whose responses nobody takes for this long is abandoned


def _grpc_error(e: Exception) -> tuple[grpc.StatusCode, str]:
    if isinstance(e, kserve.ProtocolError):
        return e.code, str(e)
    if isinstance(e, InvalidRequestError):
        return grpc.StatusCode.INVALID_ARGUMENT, f"{e.field}: {e}"
    if isinstance(e, NoCapacityError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)
    return grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}"


# Helpers sit above the deployment: @serve.deployment serializes the class when it is defined.


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
@serve.ingress(app)
class FrontDoor:
    def __init__(self, handles: dict, model_name: str, model_path: str | None):
        self.router = make_router(handles)
        self.model_name = model_name
        self.tokenizer = load_tokenizer(model_path)
        self.actors = [*handles["prefill"].values(), *handles["decode"].values(), *handles["colocated"].values()]
        self.max_model_len = min(s["max_model_len"] for s in ray.get([a.stats.remote() for a in self.actors]))

    # -- shared --------------------------------------------------------------------

    def _tokens(self, prompt: str | None = None, messages: list | None = None) -> list[int]:
        if messages is not None:
            ids = self.tokenizer.apply_chat_template(messages)
        else:
            if not prompt:
                raise InvalidRequestError("prompt", "prompt is empty; send at least one character of text")
            ids = self.tokenizer.encode(prompt)
        if len(ids) > self.max_model_len - 1:
            raise InvalidRequestError("prompt", f"prompt has {len(ids)} tokens but the model allows at most "
                                                f"{self.max_model_len - 1} prompt tokens")
        return ids

    async def _ready(self) -> bool:
        """Both pools are up: every worker answers within 5 s."""
        try:
            await asyncio.wait_for(asyncio.gather(*(a.stats.remote() for a in self.actors)), timeout=5)
            return True
        except (asyncio.TimeoutError, ray.exceptions.RayError):
            return False

    async def _run(self, rid, ids, params):
        """One request through the router: RequestOutput deltas until the finished one."""
        async for out in self.router.generate(rid, ids, serialize_params(params)):
            yield out

    # -- KServe v2 gRPC ------------------------------------------------------------

    async def ServerLive(self, request):
        return pb().ServerLiveResponse(live=True)

    async def ServerReady(self, request):
        return pb().ServerReadyResponse(ready=await self._ready())

    async def ModelReady(self, request):
        return pb().ModelReadyResponse(ready=request.name == self.model_name and await self._ready())

    async def ServerMetadata(self, request):
        from splitserve import __version__
        return pb().ServerMetadataResponse(name="splitserve", version=__version__, extensions=[])

    async def ModelMetadata(self, request, grpc_context=None):
        if request.name != self.model_name:
            grpc_context.set_code(grpc.StatusCode.NOT_FOUND)
            grpc_context.set_details(f"unknown model '{request.name}'; this server serves '{self.model_name}'")
            return pb().ModelMetadataResponse()
        return kserve.model_metadata(self.model_name)

    async def ModelInfer(self, request, grpc_context=None):
        try:
            req = kserve.parse_infer_request(request, self.model_name, uuid.uuid4().hex)
            ids = self._tokens(req.prompt)
            text, reason = "", None
            async for out in self._run(req.request_id, ids, req.params):
                text += out.new_text
                if out.finished:
                    reason = out.finish_reason
                    if out.error:
                        raise kserve.ProtocolError(grpc.StatusCode.INTERNAL, out.error)
            return kserve.infer_response(self.model_name, req.request_id,
                                         text if req.exclude_input else req.prompt + text, reason)
        except Exception as e:
            code, message = _grpc_error(e)
            grpc_context.set_code(code)
            grpc_context.set_details(message)
            return pb().ModelInferResponse()

    async def ModelStreamInfer(self, request_stream):
        """Bidirectional: every request on the stream is served concurrently; responses interleave."""
        queue: asyncio.Queue = asyncio.Queue()
        tasks: set[asyncio.Task] = set()

        async def serve_one(request):
            rid = request.id or uuid.uuid4().hex
            try:
                req = kserve.parse_infer_request(request, self.model_name, rid)
                ids = self._tokens(req.prompt)
                text = ""
                async for out in self._run(req.request_id, ids, req.params):
                    if out.error:
                        raise kserve.ProtocolError(grpc.StatusCode.INTERNAL, out.error)
                    flag = out.finished if req.want_final_flag else None
                    if req.stream:  # one response per delta
                        await queue.put(pb().ModelStreamInferResponse(infer_response=kserve.infer_response(
                            self.model_name, req.request_id, out.new_text, out.finish_reason, flag)))
                        continue
                    text += out.new_text
                    if out.finished:  # one response with the whole text
                        full = text if req.exclude_input else req.prompt + text
                        await queue.put(pb().ModelStreamInferResponse(infer_response=kserve.infer_response(
                            self.model_name, req.request_id, full, out.finish_reason, flag)))
            except Exception as e:
                _, message = _grpc_error(e)
                await queue.put(pb().ModelStreamInferResponse(
                    error_message=message, infer_response=pb().ModelInferResponse(id=rid, model_name=request.model_name)))

        def cancel_tasks():
            for t in list(tasks):
                t.cancel()  # the router aborts the request on whichever worker holds it

        async def read_requests():
            try:
                async for request in request_stream:
                    t = asyncio.create_task(serve_one(request))
                    tasks.add(t)
                    t.add_done_callback(tasks.discard)
            except Exception:  # the request stream broke: the client is gone
                cancel_tasks()
            if getattr(request_stream, "is_cancelled", lambda: False)():
                cancel_tasks()
            await asyncio.gather(*list(tasks), return_exceptions=True)
            await queue.put(None)

        async def watch_client():
            # Serve may stop iterating this generator without closing it when the client cancels,
            # so the requests are not tied to this frame: cancel them when the client is seen to
            # be gone, or when nobody has taken a response for STALLED_READER_S.
            while not reader.done():
                stalled = queue.qsize() > 0 and time.monotonic() - last_taken[0] > STALLED_READER_S
                if stalled or getattr(request_stream, "is_cancelled", lambda: False)():
                    cancel_tasks()
                    return
                await asyncio.sleep(0.1)

        last_taken = [time.monotonic()]
        reader = asyncio.create_task(read_requests())
        watcher = asyncio.create_task(watch_client())
        try:
            while (item := await queue.get()) is not None:
                last_taken[0] = time.monotonic()
                yield item
        finally:  # the stream is over, or the client is gone
            watcher.cancel()
            reader.cancel()
            cancel_tasks()

    # -- OpenAI HTTP -------------------------------------------------------------------

    @app.get("/v1/models")
    async def models(self):
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "owned_by": "splitserve"}]}

    @app.get("/health")
    async def health(self):
        ok = await self._ready()
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._openai(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._openai(request, chat=True)

    async def _openai(self, request: Request, chat: bool):
        try:
            try:
                body = await request.json()
            except json.JSONDecodeError as e:
                raise openai_api.APIError(400, f"the request body is not valid JSON: {e}")
            if not isinstance(body, dict):
                raise openai_api.APIError(400, "the request body must be a JSON object")
            openai_api.check_model(body, self.model_name)
            params = openai_api.sampling_params(body)
            ids = self._tokens(messages=openai_api.chat_messages(body)) if chat \
                else self._tokens(prompt=openai_api.completion_prompt(body))
        except openai_api.APIError as e:
            return JSONResponse(e.body(), status_code=e.status)
        except InvalidRequestError as e:
            return JSONResponse(openai_api.APIError(400, str(e), e.field).body(), status_code=400)
        rid = openai_api.new_id("chatcmpl" if chat else "cmpl")
        if body.get("stream"):
            return StreamingResponse(self._sse(rid, ids, params, chat), media_type="text/event-stream")
        text, reason, n_out = "", None, 0
        try:
            async for out in self._run(rid, ids, params):
                text += out.new_text
                n_out = out.num_output_tokens or n_out
                if out.finished:
                    reason = out.finish_reason
                    if out.error:
                        return JSONResponse(openai_api.APIError(500, out.error, kind="server_error").body(), 500)
        except NoCapacityError as e:
            return JSONResponse(openai_api.APIError(503, str(e), kind="overloaded").body(), status_code=503)
        shape = openai_api.chat_body if chat else openai_api.completion_body
        return shape(rid, self.model_name, text, openai_api.openai_finish_reason(reason), len(ids), n_out)

    async def _sse(self, rid, ids, params, chat):
        first = True
        try:
            async for out in self._run(rid, ids, params):
                reason = openai_api.openai_finish_reason(out.finish_reason) if out.finished else None
                chunk = openai_api.chat_chunk(rid, self.model_name, out.new_text, reason, first) if chat \
                    else openai_api.completion_chunk(rid, self.model_name, out.new_text, reason)
                first = False
                yield f"data: {json.dumps(chunk)}\n\n"
        except NoCapacityError as e:
            yield f"data: {json.dumps(openai_api.APIError(503, str(e), kind='overloaded').body())}\n\n"
        yield "data: [DONE]\n\n"

