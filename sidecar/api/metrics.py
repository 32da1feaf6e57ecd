"""Control API metrics, the same for both transports.

``captions_api_requests_total{transport, method, code}`` counts every call
when it ends, by its final gRPC status; ``transport`` is ``grpc`` (native,
through :class:`MetricsInterceptor`) or ``grpc-web`` (the HTTP gateway in
:mod:`sidecar.api.grpcweb`). ``captions_api_request_duration_seconds`` times
unary calls only: a subscription lasts as long as its meeting, which would
say nothing about how fast the API answers.

``method`` is the bare method name of a registered service (or ``unknown``
for a name that matched nothing), so the label set stays bounded.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from prometheus_client import Counter, Histogram

API_REQUESTS = Counter(
    "captions_api_requests_total",
    "Control API calls answered, by transport, method and final gRPC status",
    ["transport", "method", "code"],
)
API_DURATION = Histogram(
    "captions_api_request_duration_seconds",
    "Time to answer a unary control API call, by transport and method",
    ["transport", "method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
TRANSPORTS = ("grpc", "grpc-web")


def _code_of(context: Any, exc: BaseException | None) -> str:
    code = None
    try:
        code = context.code()
    except Exception:  # an older grpc without ServicerContext.code()
        code = None
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int):
        for c in grpc.StatusCode:
            if c.value[0] == code:
                return c.name
    if isinstance(exc, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED.name
    if exc is not None:
        return grpc.StatusCode.UNKNOWN.name
    return grpc.StatusCode.OK.name


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts and times native gRPC calls into :data:`API_REQUESTS` / :data:`API_DURATION`."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            # grpc answers UNIMPLEMENTED itself; no behaviour runs to observe
            API_REQUESTS.labels("grpc", "unknown", grpc.StatusCode.UNIMPLEMENTED.name).inc()
            return handler
        method = str(handler_call_details.method).rsplit("/", 1)[-1] or "unknown"
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _timed_unary(handler.unary_unary, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _counted_stream(handler.unary_stream, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler  # client or bidirectional streaming: none in these services


def _timed_unary(behaviour: Callable[..., Any], method: str) -> Callable[..., Any]:
    async def wrapper(request: Any, context: Any) -> Any:
        t0 = time.monotonic()
        exc: BaseException | None = None
        try:
            return await behaviour(request, context)
        except BaseException as e:
            exc = e
            raise
        finally:
            API_REQUESTS.labels("grpc", method, _code_of(context, exc)).inc()
            API_DURATION.labels("grpc", method).observe(time.monotonic() - t0)

    return wrapper


def _counted_stream(behaviour: Callable[..., Any], method: str) -> Callable[..., Any]:
    if inspect.isasyncgenfunction(behaviour):

        async def gen(request: Any, context: Any) -> AsyncIterator[Any]:
            exc: BaseException | None = None
            try:
                async for item in behaviour(request, context):
                    yield item
            except BaseException as e:
                exc = e
                raise
            finally:
                API_REQUESTS.labels("grpc", method, _code_of(context, exc)).inc()

        return gen

    async def coro(request: Any, context: Any) -> Any:
        exc: BaseException | None = None
        try:
            return await behaviour(request, context)
        except BaseException as e:
            exc = e
            raise
        finally:
            API_REQUESTS.labels("grpc", method, _code_of(context, exc)).inc()

    return coro
