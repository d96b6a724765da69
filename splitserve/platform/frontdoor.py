"""The front door: one Ray Serve deployment speaking KServe v2 gRPC and OpenAI HTTP, plus an admin API.
The KServe gRPC methods and gRPC health are ``kserve_front.KServeFront`` (mixed in);
the shared request path, the OpenAI routes and the admin API are here.

Path of a request here: validate (clear error naming the field) -> tokenize
(chat template for chat) -> router (prefill pool -> KV transfer -> decode pool,
following the request when it migrates or its worker is lost) -> responses
(gRPC messages or server-sent events). Cancellation (client gone) propagates to
whichever worker holds the request through the router.

Errors: every failure is a ``splitserve.errors`` type, turned into a gRPC
status / HTTP status by the one table there (bad input -> INVALID_ARGUMENT /
400 naming the field; unknown model -> NOT_FOUND / 404; no capacity within
the wait limit -> RESOURCE_EXHAUSTED / 429 with Retry-After; worker lost beyond
recovery -> UNAVAILABLE / 503), with a JSON body on every non-2xx HTTP answer.
An SSE stream starts only with the request's first output, so a refusal is a
plain 429 before any byte is streamed. A stream that fails later says so: an
``error_message`` on the KServe stream, an error event (``data: {"error":
...}``) over SSE; a failed request never ends like a normal one. Long prompts
are tokenized off the event loop.

API keys (optional, ``ServeConfig.api_keys``; ``auth.py``): when the server has keys, every KServe
and OpenAI call must present one (``authorization: Bearer <key>`` or ``x-api-key: <key>``, as an
HTTP header or gRPC metadata), else AuthenticationError -> 401 / UNAUTHENTICATED saying what was
missing. Open to all: ``grpc.health.v1.Health`` (``Check``: SERVING while each pool has a live
worker, else NOT_SERVING; ``Watch``: the same, sent on every change), server reflection (run by
Serve's proxy itself, never routed here), KServe ``ServerLive`` / ``ServerReady``, HTTP ``/health``.

Admin (HTTP, header ``x-splitserve-token: <cluster token>``)::

    GET    /admin/workers                      membership and per-worker stats
    POST   /admin/workers {"pool": "decode"}   add a worker; answers once it takes traffic
    POST   /admin/workers/{name}/drain         migrate its requests away, take nothing new
    POST   /admin/workers/{name}/undrain       take traffic again
    DELETE /admin/workers/{name}               drain, then stop it
    GET    /admin/requests                     requests in flight here and where they are
    POST   /admin/requests/{id}/migrate {"target": name}   live migration of one request
"""


import asyncio
import hmac
import json
from contextlib import aclosing

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from splitserve.engine.request import serialize_params
from splitserve.engine.tokenizer import load_tokenizer
from splitserve.errors import (AuthenticationError, InvalidRequestError, RequestFailedError, SplitserveError,
                               UnknownRequestError)
from splitserve.platform import openai_api
from splitserve.platform.auth import ApiKeys, keys_from_env
from splitserve.platform.kserve_front import KServeFront
from splitserve.platform.pools import make_router

app = FastAPI(title="splitserve")
ADMIN_TOKEN_HEADER = "x-splitserve-token"


def _failed(out) -> Exception | None:
    """A final output that is not a normal ending, as the error the client must see."""
    if out.finish_reason == "error":
        return RequestFailedError(out.error or "the request failed on the server")
    if out.finish_reason == "abort":
        return RequestFailedError("the request was aborted on the server (a stalled reader or a shutdown)")
    return None


def _error_response(e: Exception, retry_after_s: int | None = None) -> JSONResponse:
    """The OpenAI error object for ``e``, with its status; a 429 says when to try again."""
    status, body = openai_api.error_body(e)
    headers = {"Retry-After": str(retry_after_s)} if status == 429 and retry_after_s else None
    return JSONResponse(body, status_code=status, headers=headers)


INLINE_TOKENIZE_CHARS = 16 << 10  # longer texts are tokenized in a helper thread, not on the event loop


async def _with_first(first, rest):
    """``first``, then the outputs of ``rest`` (closed with this generator: a client that leaves
    aborts the request at once, not when the garbage collector finds it)."""
    async with aclosing(rest):
        yield first
        async for out in rest:
            yield out


async def _unwrapped(ref):
    """A controller call's result, or the error the controller raised (not Ray's wrapper)."""
    try:
        return await ref
    except ray.exceptions.RayTaskError as e:
        raise e.cause if isinstance(e.cause, Exception) else e from None


@app.exception_handler(Exception)
async def _any_error(request: Request, e: Exception) -> JSONResponse:
    """Whatever an endpoint did not catch still answers with the OpenAI error object (a JSON 500)."""
    return _error_response(e)


# Helpers sit above the deployment: @serve.deployment serializes the class when it is defined.


@serve.deployment(ray_actor_options={"num_cpus": 0, "resources": {"node:__internal_head__": 0.001}},
                  max_ongoing_requests=1000)  # on the head, with the control plane (see pools.ON_HEAD)
@serve.ingress(app)
class FrontDoor(KServeFront):
    def __init__(self, handles: dict, model_name: str, model_path: str | None, api_keys: ApiKeys | None = None):
        self.router = make_router(handles)
        # None (a caller that passed no keys): this host's $SPLITSERVE_API_KEYS, so keys set there are never
        # silently dropped; start_server always passes the config's keys (ApiKeys() when there are none)
        self.api_keys = api_keys if api_keys is not None else ApiKeys(keys_from_env())
        self.controller = handles["controller"]
        self.autoscaler = handles.get("autoscaler")
        self.token = handles["cluster_token"]
        self.retry_after_s = handles.get("retry_after_s", 2)
        self.model_name = model_name
        self.tokenizer = load_tokenizer(model_path)
        self.max_model_len = min(s.engine.max_model_len for s in ray.get(self.controller.stats.remote()).values())

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

    async def _tokenize(self, prompt: str | None = None, messages: list | None = None) -> list[int]:
        """``_tokens``, in a helper thread for long inputs (a 2 MB prompt would stall every other client)."""
        size = len(prompt or "") if messages is None else sum(len(str(m)) for m in messages)
        if size <= INLINE_TOKENIZE_CHARS:
            return self._tokens(prompt, messages)
        return await asyncio.to_thread(self._tokens, prompt, messages)

    async def _ready(self) -> bool:
        """Requests can be served: a live worker in each pool (the membership says so within 5 s)."""
        try:
            return await asyncio.wait_for(self.router.ready(), timeout=5)
        except (asyncio.TimeoutError, ray.exceptions.RayError):
            return False

    async def _run(self, rid, ids, params, label=None):
        """One request through the router: RequestOutput deltas until the finished one; a request that
        fails or is aborted raises (it never looks like a normal ending)."""
        async for out in self.router.generate(rid, ids, serialize_params(params), label):
            if out.finished and (error := _failed(out)) is not None:
                raise error
            yield out

    # -- OpenAI HTTP -------------------------------------------------------------------

    def _authenticate_http(self, request: Request) -> JSONResponse | None:
        """None when the request may go on, else the 401 to send."""
        try:
            self.api_keys.check(request.headers.get("authorization"), request.headers.get("x-api-key"), "http")
        except AuthenticationError as e:
            return _error_response(e)
        return None

    def _refusal(self, e: Exception) -> JSONResponse:
        return _error_response(e, self.retry_after_s)

    @app.get("/v1/models")
    async def models(self, request: Request):
        if (denied := self._authenticate_http(request)) is not None:
            return denied
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
        if (denied := self._authenticate_http(request)) is not None:
            return denied
        try:
            try:
                body = await request.json()
            except ValueError as e:  # not JSON, or not UTF-8
                raise InvalidRequestError("body", f"the request body is not valid JSON in UTF-8: {e}") from None
            params, prompt, messages = openai_api.parse_request(body, chat, self.model_name)
            ids = await self._tokenize(prompt, messages)
        except Exception as e:  # bad input: 400 naming the field; anything else: a JSON 500, never plain text
            return _error_response(e)
        rid = openai_api.new_id("chatcmpl" if chat else "cmpl")
        echo = prompt if body.get("echo") else ""  # completions: the prompt before the completion
        outs = self._run(rid, ids, params)
        try:  # admitted or refused before any byte goes out: a refusal is a plain 429, not a broken stream
            first = await outs.__anext__()
        except asyncio.CancelledError:  # the client left while it waited: stop the request now
            await outs.aclose()
            raise
        except Exception as e:
            return self._refusal(e)
        logprobs = openai_api.LogprobsShape(chat, self.tokenizer.token_bytes) if params.logprobs is not None else None
        if body.get("stream"):
            return StreamingResponse(self._sse(rid, first, outs, len(ids), chat, echo, openai_api.include_usage(body),
                                               logprobs), media_type="text/event-stream")
        text, reason, n_out, token_ids, entries = echo, None, 0, [], []
        try:
            async for out in _with_first(first, outs):
                text += out.new_text
                n_out = out.num_output_tokens or n_out
                reason = out.finish_reason
                token_ids += out.new_token_ids
                entries += out.logprobs or []
        except Exception as e:
            return self._refusal(e)
        shape = openai_api.chat_body if chat else openai_api.completion_body
        return shape(rid, self.model_name, text, openai_api.openai_finish_reason(reason), len(ids), n_out,
                     logprobs and logprobs(token_ids, entries))

    async def _sse(self, rid, first_out, outs, num_prompt_tokens, chat, echo="", usage=False, logprobs=None):
        """Server-sent events of a request whose first output has come (``first_out``; ``outs``: the rest);
        ``logprobs``: an ``openai_api.LogprobsShape`` when the request asked for them."""
        first = True
        try:
            if echo:
                yield f"data: {json.dumps(openai_api.completion_chunk(rid, self.model_name, echo, None))}\n\n"
            async for out in _with_first(first_out, outs):
                reason = openai_api.openai_finish_reason(out.finish_reason) if out.finished else None
                lp = logprobs and logprobs(out.new_token_ids, out.logprobs)
                chunk = openai_api.chat_chunk(rid, self.model_name, out.new_text, reason, first, lp) if chat \
                    else openai_api.completion_chunk(rid, self.model_name, out.new_text, reason, lp)
                first = False
                yield f"data: {json.dumps(chunk)}\n\n"
                if out.finished and usage:
                    last = openai_api.usage_chunk(rid, self.model_name, chat, num_prompt_tokens,
                                                  out.num_output_tokens)
                    yield f"data: {json.dumps(last)}\n\n"
        except Exception as e:  # an error event: the OpenAI client raises it, never a normal "stop"
            yield f"data: {json.dumps(openai_api.error_body(e)[1])}\n\n"
        yield "data: [DONE]\n\n"

    # -- admin -----------------------------------------------------------------------------------

    def _admin(self, request: Request) -> None:
        given = request.headers.get(ADMIN_TOKEN_HEADER, "")
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            raise AuthenticationError(f"admin calls need the cluster token in the {ADMIN_TOKEN_HEADER!r} header")

    async def _admin_call(self, request: Request, call):
        try:
            self._admin(request)
            return JSONResponse(await call())
        except KeyError as e:  # controller: no such worker
            e = e if isinstance(e, SplitserveError) else UnknownRequestError(str(e.args[0]) if e.args else str(e))
            return _error_response(e)
        except ValueError as e:  # controller: not allowed (the last worker of a pool, wrong pool)
            return _error_response(e if isinstance(e, SplitserveError) else InvalidRequestError("worker", str(e)))
        except Exception as e:
            return _error_response(e)

    @app.get("/admin/workers")
    async def admin_workers(self, request: Request):
        async def call():
            view = await self.controller.view.remote()
            stats = await self.controller.stats.remote()
            return {"version": view.version,
                    "workers": [{**m.as_dict(), "stats": s.as_dict() if (s := stats.get(m.name)) else None}
                                for m in view.members]}
        return await self._admin_call(request, call)

    @app.post("/admin/workers")
    async def admin_add_worker(self, request: Request):
        async def call():
            body = await request.json()
            body = body if isinstance(body, dict) else {}
            return {"added": await _unwrapped(self.controller.add_worker.remote(body.get("pool"),
                                                                                 body.get("instance_type")))}
        return await self._admin_call(request, call)

    @app.post("/admin/workers/{name}/drain")
    async def admin_drain(self, name: str, request: Request):
        return await self._admin_call(request, lambda: _unwrapped(self.controller.drain.remote(name)))

    @app.post("/admin/workers/{name}/undrain")
    async def admin_undrain(self, name: str, request: Request):
        return await self._admin_call(request, lambda: _unwrapped(self.controller.undrain.remote(name)))

    @app.delete("/admin/workers/{name}")
    async def admin_remove(self, name: str, request: Request):
        return await self._admin_call(request, lambda: _unwrapped(self.controller.remove_worker.remote(name)))

    @app.get("/admin/autoscaler")
    async def admin_autoscaler(self, request: Request):
        """The autoscaler's latest snapshot and decisions (``?acted=1``: only those that acted)."""
        async def call():
            if self.autoscaler is None:
                return {"enabled": False}
            acted = request.query_params.get("acted") in ("1", "true")
            return {"enabled": True, "snapshot": await self.autoscaler.snapshot.remote(),
                    "decisions": await self.autoscaler.decisions.remote(50, acted)}
        return await self._admin_call(request, call)

    @app.get("/admin/requests")
    async def admin_requests(self, request: Request):
        async def call():
            return {"requests": self.router.requests(), "open_streams": self.router.cluster.open_streams()}
        return await self._admin_call(request, call)

    @app.post("/admin/requests/{request_id}/migrate")
    async def admin_migrate(self, request_id: str, request: Request):
        async def call():
            body = await request.json()
            target = body.get("target") if isinstance(body, dict) else None
            if not isinstance(target, str):
                raise InvalidRequestError("target", 'give the target decode worker: {"target": "<name>"}')
            return await self.router.migrate(request_id, target)
        return await self._admin_call(request, call)

