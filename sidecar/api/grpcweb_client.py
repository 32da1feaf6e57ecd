"""A small asyncio gRPC-Web client over aiohttp, for tests and tools.

It speaks what :class:`sidecar.api.grpcweb.GrpcWebGateway` serves (and any
other gRPC-Web server): unary calls and server streams, binary or base64
(``-text``) bodies, status from the trailer frame or from the headers of a
trailers-only response. A non-OK status raises :class:`GrpcWebError`.

To stop reading a stream early and hang up at once, close the iterator::

    async with contextlib.aclosing(server_stream(...)) as events:
        async for event in events:
            ...
"""

from __future__ import annotations

import base64
from collections.abc import AsyncGenerator, Mapping, Sequence
from typing import TypeVar

import aiohttp
import grpc
from google.protobuf.message import DecodeError, Message

from sidecar.api.grpcweb import (
    CONTENT_TYPE_PROTO,
    CONTENT_TYPE_TEXT,
    FLAG_COMPRESSED,
    FLAG_TRAILERS,
    Base64StreamDecoder,
    FrameDecoder,
    FrameTooLargeError,
    decode_grpc_message,
    encode_frame,
    format_grpc_timeout,
    parse_frames,
    parse_trailers,
    status_code_from_int,
)

__all__ = ["GrpcWebError", "encode_frame", "parse_frames", "server_stream", "unary"]

M = TypeVar("M", bound=Message)

DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024

_TEXT_TYPES = frozenset({"application/grpc-web-text", CONTENT_TYPE_TEXT})
_GRPC_WEB_TYPES = frozenset({"application/grpc-web", CONTENT_TYPE_PROTO}) | _TEXT_TYPES

# What the gRPC spec says a client should make of an HTTP error without a
# grpc-status (doc/http-grpc-status-mapping.md).
_HTTP_TO_GRPC = {
    400: grpc.StatusCode.INTERNAL,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.UNIMPLEMENTED,
    429: grpc.StatusCode.UNAVAILABLE,
    502: grpc.StatusCode.UNAVAILABLE,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.UNAVAILABLE,
}


class GrpcWebError(Exception):
    """A call ended with a non-OK gRPC status.

    ``code`` is a :class:`grpc.StatusCode`, ``details`` the decoded
    ``grpc-message`` and ``trailers`` every trailer (or header, for a
    trailers-only answer) with lowercased keys.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        details: str = "",
        trailers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.trailers: dict[str, str] = dict(trailers or {})


def _check_status(fields: Mapping[str, str]) -> None:
    raw = fields.get("grpc-status")
    if raw is None:
        raise GrpcWebError(grpc.StatusCode.INTERNAL, "trailers without grpc-status", fields)
    try:
        code = status_code_from_int(int(raw))
    except ValueError:
        raise GrpcWebError(
            grpc.StatusCode.UNKNOWN, f"invalid grpc-status {raw!r}", fields
        ) from None
    if code != grpc.StatusCode.OK:
        raise GrpcWebError(code, decode_grpc_message(fields.get("grpc-message", "")), fields)


async def _exchange(
    session: aiohttp.ClientSession,
    base_url: str,
    method: str,
    request: Message,
    *,
    token: str | None,
    text: bool,
    deadline_s: float | None,
    metadata: Sequence[tuple[str, str]],
    max_message_bytes: int,
) -> AsyncGenerator[bytes, None]:
    """POST one request; yield the payload of each data frame; raise on a bad status."""
    ctype = CONTENT_TYPE_TEXT if text else CONTENT_TYPE_PROTO
    headers = {"Content-Type": ctype, "Accept": ctype, "X-Grpc-Web": "1"}
    for key, value in metadata:
        headers[key] = value
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if deadline_s is not None:
        headers["grpc-timeout"] = format_grpc_timeout(deadline_s)
    body = encode_frame(request.SerializeToString())
    if text:
        body = base64.b64encode(body)
    url = base_url.rstrip("/") + "/" + method.lstrip("/")
    try:
        async with session.post(
            url,
            data=body,
            headers=headers,
            # The deadline is enforced here too, as a gRPC client does, so a
            # server that ignores grpc-timeout cannot hold the caller.
            timeout=aiohttp.ClientTimeout(total=deadline_s),
        ) as resp:
            header_fields = {k.lower(): v for k, v in resp.headers.items()}
            if resp.status != 200:
                if "grpc-status" in header_fields:
                    _check_status(header_fields)
                snippet = (await resp.content.read(200)).decode("utf-8", errors="replace")
                code = _HTTP_TO_GRPC.get(resp.status, grpc.StatusCode.UNKNOWN)
                raise GrpcWebError(code, f"HTTP {resp.status}: {snippet.strip()}", header_fields)
            if "grpc-status" in header_fields:
                # Trailers-only: the status is in the headers and no message follows.
                _check_status(header_fields)
                return
            rtype = resp.content_type.lower()
            if rtype not in _GRPC_WEB_TYPES:
                raise GrpcWebError(
                    grpc.StatusCode.UNKNOWN, f"unexpected content-type {rtype!r}", header_fields
                )
            b64 = Base64StreamDecoder() if rtype in _TEXT_TYPES else None
            frames = FrameDecoder(max_message_bytes)
            trailers: dict[str, str] | None = None
            try:
                async for chunk in resp.content.iter_any():
                    data = b64.feed(chunk) if b64 is not None else chunk
                    for flag, payload in frames.feed(data):
                        if trailers is not None:
                            raise ValueError("frame after the trailer frame")
                        if flag & FLAG_TRAILERS:
                            trailers = parse_trailers(payload)
                        elif flag & FLAG_COMPRESSED:
                            raise ValueError("compressed response frames are not supported")
                        else:
                            yield payload
                if b64 is not None:
                    b64.finish()
                frames.finish()
            except FrameTooLargeError as exc:
                raise GrpcWebError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)) from None
            except ValueError as exc:
                raise GrpcWebError(
                    grpc.StatusCode.INTERNAL, f"malformed gRPC-Web response: {exc}"
                ) from None
            if trailers is None:
                raise GrpcWebError(
                    grpc.StatusCode.INTERNAL, "response ended without a trailer frame"
                )
            _check_status(trailers)
    except TimeoutError:
        raise GrpcWebError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded") from None
    except aiohttp.ClientError as exc:
        raise GrpcWebError(grpc.StatusCode.UNAVAILABLE, f"{type(exc).__name__}: {exc}") from None


def _parse(response_cls: type[M], payload: bytes) -> M:
    try:
        return response_cls.FromString(payload)
    except DecodeError as exc:
        raise GrpcWebError(
            grpc.StatusCode.INTERNAL,
            f"response is not a valid {response_cls.DESCRIPTOR.full_name}: {exc}",
        ) from None


async def unary(
    session: aiohttp.ClientSession,
    base_url: str,
    method: str,
    request: Message,
    response_cls: type[M],
    *,
    token: str | None = None,
    text: bool = False,
    # A gRPC deadline: it travels as grpc-timeout, so asyncio.timeout() cannot replace it.
    timeout: float | None = None,  # noqa: ASYNC109
    metadata: Sequence[tuple[str, str]] = (),
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> M:
    """Make a unary call and return the response message.

    ``method`` is the full path, e.g. ``"/captions.v1.Captions/GetRoomStatus"``;
    ``token`` goes out as ``authorization: Bearer <token>``; ``text`` picks
    ``application/grpc-web-text``; ``timeout`` (seconds) is sent as
    ``grpc-timeout`` and enforced locally. Raises :class:`GrpcWebError`.
    """
    payloads: list[bytes] = []
    stream = _exchange(
        session,
        base_url,
        method,
        request,
        token=token,
        text=text,
        deadline_s=timeout,
        metadata=metadata,
        max_message_bytes=max_message_bytes,
    )
    async for payload in stream:
        payloads.append(payload)
    if len(payloads) != 1:
        raise GrpcWebError(
            grpc.StatusCode.INTERNAL,
            f"expected one response message for a unary call, got {len(payloads)}",
        )
    return _parse(response_cls, payloads[0])


async def server_stream(
    session: aiohttp.ClientSession,
    base_url: str,
    method: str,
    request: Message,
    response_cls: type[M],
    *,
    token: str | None = None,
    text: bool = False,
    # A gRPC deadline: it travels as grpc-timeout, so asyncio.timeout() cannot replace it.
    timeout: float | None = None,  # noqa: ASYNC109
    metadata: Sequence[tuple[str, str]] = (),
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> AsyncGenerator[M, None]:
    """Make a server-streaming call; yield each message as it arrives.

    Same arguments as :func:`unary`; ``timeout`` covers the whole stream. A
    non-OK final status raises :class:`GrpcWebError` after the messages
    before it. Closing the iterator (``aclose``) hangs up the HTTP request,
    which the server sees as a cancellation.
    """
    stream = _exchange(
        session,
        base_url,
        method,
        request,
        token=token,
        text=text,
        deadline_s=timeout,
        metadata=metadata,
        max_message_bytes=max_message_bytes,
    )
    try:
        async for payload in stream:
            yield _parse(response_cls, payload)
    finally:
        # Close the HTTP response now rather than whenever the garbage
        # collector finalises the inner generator.
        await stream.aclose()
