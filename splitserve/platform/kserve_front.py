"""The front door's KServe v2 gRPC side, and gRPC health (a mixin of ``frontdoor.FrontDoor``).

Path of a call here: authenticate (API keys, when the server has them) ->
``kserve.parse_infer_request`` (bad input -> INVALID_ARGUMENT naming the input)
-> the front door's shared ``_tokenize`` and ``_run`` -> ``kserve.infer_response``
messages. ``ModelInfer`` answers once; ``ModelStreamInfer`` runs each request
of the bidi stream as its own task and sends their deltas as they come (an
error is that request's ``error_message``: "[CODE] request '<id>': <reason>"; a reader that takes nothing for
``STALLED_READER_S`` is abandoned and its requests aborted). Health:
``Check`` / ``Watch`` say SERVING while each pool has a live worker.

The class is mixed into the Serve deployment: its methods run on the front
door's replica and use its state (``router``, ``api_keys``, ``model_name``,
``tokenizer``) and its shared methods (``_tokenize``, ``_run``, ``_ready``).
"""

import asyncio
import time
import uuid

import grpc

from splitserve.errors import (AuthenticationError, InvalidRequestError, SplitserveError, UnknownModelError, describe,
                               status_of)
from splitserve.platform import kserve
from splitserve.platform.kserve import pb

STALLED_READER_S = 10.0  # a bidi stream whose responses nobody takes for this long is abandoned
HEALTH_POLL_S = 1.0  # Health/Watch looks at readiness this often, and sends each change
SERVED_SERVICES = ("", "inference.GRPCInferenceService")  # what Health/Check answers for ("": the server)


def _grpc_error(e: Exception) -> tuple[grpc.StatusCode, str]:
    code, _, _ = status_of(e)
    return grpc.StatusCode[code], describe(e)


def _grpc_fail(grpc_context, e: Exception, empty):
    """A unary call's error: its status on the context (Serve's proxy sends it), an empty message."""
    code, message = _grpc_error(e)
    if grpc_context is not None:  # None: called through a deployment handle, not by Serve's gRPC proxy
        grpc_context.set_code(code)
        grpc_context.set_details(message)
    return empty


def _request_grpc_context():
    """The gRPC context of the call being served (None outside a Serve gRPC request)."""
    from ray.serve import context
    ctx = context._serve_request_context.get()
    return getattr(ctx, "grpc_context", None)


def _health():
    from grpc_health.v1 import health_pb2  # grpcio-health-checking
    return health_pb2


class KServeFront:
    """KServe v2 ``GRPCInferenceService`` and ``grpc.health.v1.Health``, served by the front door."""

    def _authenticate(self, grpc_context) -> None:
        """AuthenticationError unless keys are off or the call's metadata presents a valid key."""
        self.api_keys.check_grpc(grpc_context.invocation_metadata() if grpc_context is not None else ())

    async def ServerLive(self, request):  # a probe: open
        return pb().ServerLiveResponse(live=True)

    async def ServerReady(self, request):  # a probe: open
        return pb().ServerReadyResponse(ready=await self._ready())

    async def ModelReady(self, request, grpc_context=None):
        try:
            self._authenticate(grpc_context)
        except AuthenticationError as e:
            return _grpc_fail(grpc_context, e, pb().ModelReadyResponse())
        return pb().ModelReadyResponse(ready=request.name == self.model_name and await self._ready())

    async def ServerMetadata(self, request, grpc_context=None):
        from splitserve import __version__
        try:
            self._authenticate(grpc_context)
        except AuthenticationError as e:
            return _grpc_fail(grpc_context, e, pb().ServerMetadataResponse())
        return pb().ServerMetadataResponse(name="splitserve", version=__version__, extensions=[])

    async def ModelMetadata(self, request, grpc_context=None):
        try:
            self._authenticate(grpc_context)
            if request.name != self.model_name:
                raise UnknownModelError(f"unknown model '{request.name}'; this server serves '{self.model_name}'")
        except SplitserveError as e:
            return _grpc_fail(grpc_context, e, pb().ModelMetadataResponse())
        return kserve.model_metadata(self.model_name)

    async def ModelInfer(self, request, grpc_context=None):
        try:
            self._authenticate(grpc_context)
            req = kserve.parse_infer_request(request, self.model_name)
            if req.stream:
                raise InvalidRequestError("stream", "input 'stream' is true, but ModelInfer answers once: stream "
                                                    "over ModelStreamInfer, or send stream false")
            ids = await self._tokenize(req.prompt)
            text, reason = "", None
            # our own unique id for the request; the client's id is only a label, echoed on the response
            async for out in self._run(uuid.uuid4().hex, ids, req.params, req.client_id or None):
                text += out.new_text
                reason = out.finish_reason
            return kserve.infer_response(self.model_name, req.client_id,
                                         text if req.exclude_input else req.prompt + text, reason)
        except Exception as e:
            return _grpc_fail(grpc_context, e, pb().ModelInferResponse())

    async def ModelStreamInfer(self, request_stream):
        """Bidirectional: every request on the stream is served concurrently; responses interleave."""
        # The call's metadata comes from Serve's request context: declaring a ``grpc_context`` parameter
        # on this bidi method changed how Serve fed the request stream (requests on one stream were no
        # longer served side by side: test_moving_e2e's six streams), so it is not declared.
        grpc_context = _request_grpc_context()
        try:
            self._authenticate(grpc_context)
        except AuthenticationError as e:
            # a stream that never started: its status, through the exception Serve's proxy turns into it
            _grpc_fail(grpc_context, e, None)
            raise
        queue: asyncio.Queue = asyncio.Queue()
        tasks: set[asyncio.Task] = set()

        async def serve_one(request):
            try:
                req = kserve.parse_infer_request(request, self.model_name)
                ids = await self._tokenize(req.prompt)
                text = ""
                # our own unique id: requests on one stream (or many) may share a client id
                async for out in self._run(uuid.uuid4().hex, ids, req.params, req.client_id or None):
                    flag = out.finished if req.want_final_flag else None
                    if req.stream:  # one response per delta
                        await queue.put(pb().ModelStreamInferResponse(infer_response=kserve.infer_response(
                            self.model_name, req.client_id, out.new_text, out.finish_reason, flag, out.index,
                            len(out.new_token_ids))))
                        continue
                    text += out.new_text
                    if out.finished:  # one response with the whole text
                        full = text if req.exclude_input else req.prompt + text
                        await queue.put(pb().ModelStreamInferResponse(infer_response=kserve.infer_response(
                            self.model_name, req.client_id, full, out.finish_reason, flag)))
            except Exception as e:
                code, message = _grpc_error(e)
                # tritonclient hands a stream's error to its callback without the response: the message
                # names the request, so a client with several on one stream knows which one failed
                message = f"[{code.name}] request {request.id!r}: {message}" if request.id else \
                    f"[{code.name}] {message}"
                await queue.put(pb().ModelStreamInferResponse(
                    error_message=message, infer_response=pb().ModelInferResponse(id=request.id,
                                                                                  model_name=request.model_name)))

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

    # -- grpc.health.v1 (open: probes carry no key) ---------------------------------------

    async def _health_status(self, service: str) -> int:
        status = _health().HealthCheckResponse
        if service not in SERVED_SERVICES:
            return status.SERVICE_UNKNOWN
        return status.SERVING if await self._ready() else status.NOT_SERVING

    async def Check(self, request, grpc_context=None):
        status = await self._health_status(request.service)
        if status == _health().HealthCheckResponse.SERVICE_UNKNOWN:  # the health protocol's NOT_FOUND
            grpc_context.set_code(grpc.StatusCode.NOT_FOUND)
            grpc_context.set_details(f"unknown service '{request.service}'; health is kept for "
                                     f"{list(SERVED_SERVICES)} ('' is the whole server)")
            return _health().HealthCheckResponse()
        return _health().HealthCheckResponse(status=status)

    async def Watch(self, request):
        """The status now, then each change, until the client goes (an unknown service may appear later)."""
        last = None
        while True:
            status = await self._health_status(request.service)
            if status != last:
                yield _health().HealthCheckResponse(status=status)
                last = status
            await asyncio.sleep(HEALTH_POLL_S)
