"""gRPC-Web gateway: serve a grpc.aio servicer over HTTP/1.1 with aiohttp.

Prosody's HTTP client speaks only HTTP/1.1 and cannot read HTTP/2 trailers, so
native gRPC is out of reach for it. gRPC-Web moves the status into a trailer
frame at the end of the body, which any HTTP/1.1 client can read. The gateway
calls the very same servicer instance that grpc.aio serves natively, through a
context object that behaves like ``grpc.aio.ServicerContext`` for the methods
the servicer uses.

Wire format (https://github.com/grpc/grpc/blob/master/doc/PROTOCOL-WEB.md):
every message is a frame of 1 flag byte (0x00 data, 0x80 trailers, bit 0x01
compressed), a 4-byte big-endian length and the payload. The ``-text`` content
types carry the same bytes base64-encoded.

The framing helpers (:func:`encode_frame`, :func:`parse_frames`,
:class:`FrameDecoder`, :class:`Base64StreamDecoder`, trailer and timeout
codecs) are public so that :mod:`sidecar.api.grpcweb_client` shares them.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import inspect
import logging
import re
import struct
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import grpc
import grpc.aio
from aiohttp import web
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass

from sidecar.api.metrics import API_DURATION
from sidecar.api.metrics import API_REQUESTS as REQUESTS_TOTAL

__all__ = [
    "CONTENT_TYPE_PROTO",
    "CONTENT_TYPE_TEXT",
    "FLAG_COMPRESSED",
    "FLAG_DATA",
    "FLAG_TRAILERS",
    "REQUESTS_TOTAL",
    "Base64StreamDecoder",
    "FrameDecoder",
    "FrameTooLargeError",
    "GrpcWebAbortError",
    "GrpcWebGateway",
    "GrpcWebServicerContext",
    "decode_grpc_message",
    "decode_text",
    "encode_frame",
    "encode_grpc_message",
    "encode_trailers",
    "format_grpc_timeout",
    "parse_frames",
    "parse_grpc_timeout",
    "parse_trailers",
    "status_code_from_int",
]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

CONTENT_TYPE_PROTO = "application/grpc-web+proto"
CONTENT_TYPE_TEXT = "application/grpc-web-text+proto"
_BINARY_TYPES = frozenset({"application/grpc-web", CONTENT_TYPE_PROTO})
_TEXT_TYPES = frozenset({"application/grpc-web-text", CONTENT_TYPE_TEXT})

FLAG_DATA = 0x00
FLAG_COMPRESSED = 0x01
FLAG_TRAILERS = 0x80
_HEADER = struct.Struct(">BI")

_CORS_ALLOW_HEADERS = (
    "authorization, content-type, x-grpc-web, x-user-agent, grpc-timeout, grpc-accept-encoding"
)
_CORS_EXPOSE_HEADERS = "grpc-status, grpc-message"

# How often an idle call checks whether its HTTP client went away. aiohttp
# (handler_cancellation=False, its default) does not cancel a handler when the
# connection drops, and a quiet subscription never writes, so nothing else
# would notice.
_DISCONNECT_POLL_S = 0.25

# REQUESTS_TOTAL (captions_api_requests_total, transport="grpc-web") and
# API_DURATION are shared with the native gRPC server's interceptor.

_CODE_BY_INT: dict[int, grpc.StatusCode] = {code.value[0]: code for code in grpc.StatusCode}


def status_code_from_int(value: int) -> grpc.StatusCode:
    """The :class:`grpc.StatusCode` for a numeric status; UNKNOWN for unknown numbers."""
    return _CODE_BY_INT.get(value, grpc.StatusCode.UNKNOWN)


# -- framing -----------------------------------------------------------------


class FrameTooLargeError(ValueError):
    """A frame declares a payload larger than the allowed maximum."""


def encode_frame(payload: bytes, trailers: bool = False) -> bytes:
    """One gRPC-Web frame: flag byte, 4-byte big-endian length, payload."""
    flag = FLAG_TRAILERS if trailers else FLAG_DATA
    return _HEADER.pack(flag, len(payload)) + payload


class FrameDecoder:
    """Incremental frame parser for bodies that arrive in pieces.

    ``feed`` returns the frames completed by the new bytes and keeps the
    rest. With ``max_payload`` set, a frame declaring a larger payload raises
    :class:`FrameTooLargeError` as soon as its header is seen, so the caller
    never buffers it.
    """

    def __init__(self, max_payload: int | None = None) -> None:
        self._buf = bytearray()
        self._max = max_payload

    @property
    def pending(self) -> int:
        """Bytes held that do not yet form a complete frame."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """Add bytes; return the ``(flag, payload)`` frames now complete."""
        self._buf += data
        frames: list[tuple[int, bytes]] = []
        pos = 0
        while len(self._buf) - pos >= _HEADER.size:
            flag, length = _HEADER.unpack_from(self._buf, pos)
            if self._max is not None and length > self._max:
                raise FrameTooLargeError(
                    f"frame of {length} bytes exceeds the limit of {self._max} bytes"
                )
            end = pos + _HEADER.size + length
            if end > len(self._buf):
                break
            frames.append((flag, bytes(self._buf[pos + _HEADER.size : end])))
            pos = end
        del self._buf[:pos]
        return frames

    def finish(self) -> None:
        """Check that the input ended on a frame boundary; ValueError if not."""
        if not self._buf:
            return
        if len(self._buf) < _HEADER.size:
            raise ValueError(f"truncated frame header: {len(self._buf)} of {_HEADER.size} bytes")
        _, length = _HEADER.unpack_from(self._buf, 0)
        got = len(self._buf) - _HEADER.size
        raise ValueError(f"truncated frame: header says {length} bytes but only {got} follow")


def parse_frames(data: bytes, *, max_payload: int | None = None) -> list[tuple[int, bytes]]:
    """Split a complete body into ``(flag, payload)`` frames.

    Raises ValueError on a truncated header or payload, and its subclass
    :class:`FrameTooLargeError` when a frame exceeds ``max_payload``.
    """
    decoder = FrameDecoder(max_payload)
    frames = decoder.feed(data)
    decoder.finish()
    return frames


# -- grpc-web-text -----------------------------------------------------------

_WHITESPACE = b" \t\r\n"


def _b64decode_groups(data: bytes) -> bytes:
    # A sender that encodes each write separately (every streaming gateway
    # does) leaves padding in the middle; 4-character groups decode
    # independently, so split after each padded group.
    out: list[bytes] = []
    start = 0
    while start < len(data):
        pad = data.find(b"=", start)
        end = len(data) if pad < 0 else pad - pad % 4 + 4
        try:
            out.append(binascii.a2b_base64(data[start:end], strict_mode=True))
        except binascii.Error as exc:
            raise ValueError(f"invalid base64: {exc}") from None
        start = end
    return b"".join(out)


class Base64StreamDecoder:
    """Incremental base64 decoder for ``application/grpc-web-text`` bodies.

    Accepts input split anywhere and padded segments concatenated together.
    """

    def __init__(self) -> None:
        self._rest = b""

    def feed(self, data: bytes) -> bytes:
        """Decode what can be decoded; keep an incomplete 4-character group."""
        data = self._rest + bytes(data).translate(None, _WHITESPACE)
        cut = len(data) - len(data) % 4
        self._rest = data[cut:]
        return _b64decode_groups(data[:cut])

    def finish(self) -> None:
        """ValueError if the input ended inside a 4-character group."""
        if self._rest:
            raise ValueError(f"truncated base64: {len(self._rest)} trailing characters")


def decode_text(data: bytes) -> bytes:
    """Decode a complete ``grpc-web-text`` body; ValueError on bad base64."""
    decoder = Base64StreamDecoder()
    out = decoder.feed(data)
    decoder.finish()
    return out


# -- trailers and metadata ---------------------------------------------------


def encode_grpc_message(message: str) -> str:
    """Percent-encode a status message as the gRPC spec asks for ``grpc-message``.

    UTF-8 bytes outside printable ASCII, and ``%`` itself, become ``%XX``.
    """
    return "".join(
        chr(b) if 0x20 <= b <= 0x7E and b != 0x25 else f"%{b:02X}" for b in message.encode("utf-8")
    )


def decode_grpc_message(value: str) -> str:
    """Inverse of :func:`encode_grpc_message`; tolerates stray ``%``."""
    return urllib.parse.unquote_to_bytes(value).decode("utf-8", errors="replace")


def _metadata_value(key: str, value: str | bytes) -> str:
    if isinstance(value, bytes):
        # Binary metadata travels base64-encoded, as in native gRPC's HTTP/2.
        return base64.b64encode(value).decode("ascii")
    return value


def encode_trailers(
    code: grpc.StatusCode,
    message: str = "",
    metadata: Iterable[tuple[str, str | bytes]] = (),
) -> bytes:
    """Payload of a trailer frame: ``grpc-status``, ``grpc-message``, then metadata."""
    lines = [f"grpc-status:{code.value[0]}", f"grpc-message:{encode_grpc_message(message)}"]
    for key, value in metadata:
        text = _metadata_value(key, value)
        if "\r" in text or "\n" in text:
            continue  # would break the header block; native gRPC refuses it too
        lines.append(f"{key.lower()}:{text}")
    return ("\r\n".join(lines) + "\r\n").encode("latin-1", errors="replace")


def parse_trailers(payload: bytes) -> dict[str, str]:
    """Header block of a trailer frame as a dict with lowercased keys.

    Repeated keys are joined with ``,`` as HTTP does; lines without a colon
    are ignored.
    """
    out: dict[str, str] = {}
    for line in payload.decode("latin-1").split("\r\n"):
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip().lower()
        value = value.strip()
        out[key] = f"{out[key]},{value}" if key in out else value
    return out


_TIMEOUT_RE = re.compile(r"^(\d{1,8})([HMSmun])$")
_TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}


def parse_grpc_timeout(value: str) -> float:
    """Seconds from a ``grpc-timeout`` header value such as ``5S`` or ``200m``."""
    m = _TIMEOUT_RE.match(value.strip())
    if not m:
        raise ValueError(f"malformed grpc-timeout {value!r}")
    return int(m.group(1)) * _TIMEOUT_UNITS[m.group(2)]


def format_grpc_timeout(seconds: float) -> str:
    """A ``grpc-timeout`` header value for ``seconds``, at least 1 ms, rounded up."""
    millis = max(1, -int(-max(seconds, 0.0) * 1000 // 1))
    for unit, scale in (("m", 1), ("S", 1000), ("M", 60_000), ("H", 3_600_000)):
        count = -(-millis // scale)
        if count <= 99_999_999:
            return f"{count}{unit}"
    return "99999999H"


# -- servicer context ----------------------------------------------------------


class GrpcWebAbortError(grpc.aio.AbortError):  # type: ignore[misc]
    """Raised by :meth:`GrpcWebServicerContext.abort`; the gateway turns it into the status.

    It subclasses ``grpc.aio.AbortError`` so servicer code that lets that
    exception through (or catches it) behaves the same on both transports.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        details: str,
        trailing_metadata: Sequence[tuple[str, str | bytes]] = (),
    ) -> None:
        super().__init__(f"aborted with {code.name}: {details}")
        self.code = code
        self.details = details
        self.trailing_metadata = tuple(trailing_metadata)


DoneCallback = Callable[["GrpcWebServicerContext"], object]


class GrpcWebServicerContext:
    """The subset of ``grpc.aio.ServicerContext`` that the servicer relies on.

    Metadata is the HTTP request headers, lowercased; ``-bin`` headers are
    base64-decoded to bytes like native gRPC does.
    """

    def __init__(self, request: web.Request, *, timeout_s: float | None = None) -> None:
        self._request = request
        self._metadata = _headers_to_metadata(request)
        self._deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self._code: grpc.StatusCode | None = None
        self._details: str | None = None
        self._trailing: tuple[tuple[str, str | bytes], ...] = ()
        self._abort: GrpcWebAbortError | None = None
        self._cancelled = False
        self._done = False
        self._callbacks: list[DoneCallback] = []

    # grpc.aio API ----------------------------------------------------------
    def invocation_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        """The request headers as ``(lowercased key, value)`` pairs."""
        return self._metadata

    def peer(self) -> str:
        """The client address in gRPC's notation, e.g. ``ipv4:127.0.0.1:5000``."""
        transport = self._request.transport
        peer = transport.get_extra_info("peername") if transport is not None else None
        if isinstance(peer, tuple) and len(peer) >= 2:
            host, port = peer[0], peer[1]
            return f"ipv6:[{host}]:{port}" if ":" in str(host) else f"ipv4:{host}:{port}"
        if isinstance(peer, str) and peer:
            return f"unix:{peer}"
        return "unknown"

    async def abort(
        self,
        code: grpc.StatusCode,
        details: str = "",
        trailing_metadata: Sequence[tuple[str, str | bytes]] = (),
    ) -> NoReturn:
        """End the call with ``code``; raises, like grpc.aio, so the handler stops."""
        if self._abort is not None:
            raise grpc.aio.UsageError("Abort already called!")
        if code == grpc.StatusCode.OK:
            # grpc.aio leaves the client hanging here; an error is more useful.
            log.error("servicer aborted with StatusCode.OK; sending UNKNOWN instead")
            code = grpc.StatusCode.UNKNOWN
        if not details and self._details:
            details = self._details
        trailing = tuple(trailing_metadata) or self._trailing
        self._code, self._details, self._trailing = code, details, trailing
        self._abort = GrpcWebAbortError(code, details, trailing)
        raise self._abort

    def set_code(self, code: grpc.StatusCode) -> None:
        """Status to send when the handler returns."""
        self._code = code

    def set_details(self, details: str) -> None:
        """Status message to send when the handler returns."""
        self._details = details

    def code(self) -> grpc.StatusCode | None:
        """The code set so far, or None."""
        return self._code

    def details(self) -> str | None:
        """The details set so far, or None."""
        return self._details

    def set_trailing_metadata(self, trailing_metadata: Sequence[tuple[str, str | bytes]]) -> None:
        """Extra ``key:value`` lines for the trailer frame."""
        self._trailing = tuple(trailing_metadata)

    def trailing_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        """The trailing metadata set so far."""
        return self._trailing

    def cancelled(self) -> bool:
        """True once the HTTP client went away or the deadline passed."""
        return self._cancelled

    def done(self) -> bool:
        """True once the call has finished, whatever the outcome."""
        return self._done

    def time_remaining(self) -> float | None:
        """Seconds left before the ``grpc-timeout`` deadline; None without one."""
        if self._deadline is None:
            return None
        return max(0.0, self._deadline - time.monotonic())

    def add_done_callback(self, callback: DoneCallback) -> None:
        """Call ``callback(context)`` when the call finishes (at once if it has)."""
        if self._done:
            self._run_callback(callback)
        else:
            self._callbacks.append(callback)

    # gateway side ------------------------------------------------------------
    def _finish(self) -> None:
        if self._done:
            return
        self._done = True
        callbacks, self._callbacks = self._callbacks, []
        for cb in callbacks:
            self._run_callback(cb)

    def _run_callback(self, callback: DoneCallback) -> None:
        try:
            callback(self)
        except Exception:
            log.exception("done callback %r failed", callback)


def _headers_to_metadata(request: web.Request) -> tuple[tuple[str, str | bytes], ...]:
    out: list[tuple[str, str | bytes]] = []
    for key, value in request.headers.items():
        k = key.lower()
        if k.endswith("-bin"):
            try:
                out.append((k, base64.b64decode(value + "=" * (-len(value) % 4))))
                continue
            except (binascii.Error, ValueError):
                pass  # not base64 after all; hand it over as text
        out.append((k, value))
    return tuple(out)


# -- gateway -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Status:
    code: grpc.StatusCode
    details: str = ""
    trailing: tuple[tuple[str, str | bytes], ...] = ()


_GONE = _Status(grpc.StatusCode.CANCELLED, "client went away")


class _ClientGoneError(Exception):
    """Writing to the HTTP client failed: it has disconnected."""


class _StatusError(Exception):
    """A call fails with this status before the servicer is involved."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.status = _Status(code, details)


@dataclass(frozen=True, slots=True)
class _Method:
    name: str
    path: str
    request_cls: type[Message]
    response_cls: type[Message]
    server_streaming: bool
    handler: Callable[..., Any] | None


class GrpcWebGateway:
    """Serves one protobuf service of ``servicer`` as gRPC-Web on an aiohttp app.

    The method table comes from ``service_descriptor``: for every method,
    ``POST /<package.Service>/<Method>`` with the request and response types
    and the streaming kind the descriptor declares. Client-streaming methods
    cannot be carried by gRPC-Web over HTTP/1.1 and answer UNIMPLEMENTED.

    ``max_message_bytes`` bounds both the request body and each request
    message. With ``allow_origin`` set, CORS preflights are answered and
    responses carry the CORS headers browsers need to read the status.
    """

    def __init__(
        self,
        servicer: object,
        service_descriptor: ServiceDescriptor,
        *,
        max_message_bytes: int = 4 * 1024 * 1024,
        allow_origin: str | None = None,
    ) -> None:
        if max_message_bytes <= 0:
            raise ValueError("max_message_bytes must be positive")
        self._servicer = servicer
        self._service = service_descriptor.full_name
        self._max = max_message_bytes
        self._allow_origin = allow_origin
        self._methods: dict[str, _Method] = {}
        for md in service_descriptor.methods:
            self._methods[md.name] = self._describe(md)
        # Base64 inflates by 4/3; a little slack for per-chunk padding.
        binary_limit = self._max + _HEADER.size
        self._body_limit_binary = binary_limit
        self._body_limit_text = (binary_limit + 2) // 3 * 4 + 16

    def _describe(self, md: MethodDescriptor) -> _Method:
        handler = None if md.client_streaming else getattr(self._servicer, md.name, None)
        return _Method(
            name=md.name,
            path=f"/{self._service}/{md.name}",
            request_cls=GetMessageClass(md.input_type),
            response_cls=GetMessageClass(md.output_type),
            server_streaming=md.server_streaming,
            handler=handler if callable(handler) else None,
        )

    @property
    def paths(self) -> list[str]:
        """The URL path of every method of the service."""
        return [m.path for m in self._methods.values()]

    def add_routes(self, app: web.Application) -> None:
        """Register the service's POST routes (and OPTIONS for CORS) on ``app``."""
        # One dynamic route for the whole service so that an unknown method of
        # it gets a gRPC UNIMPLEMENTED rather than aiohttp's HTML 404; paths of
        # other services stay 404, which gRPC-Web clients map to UNIMPLEMENTED.
        path = "/" + self._service + "/{method}"
        app.router.add_post(path, self._handle)
        if self._allow_origin is not None:
            app.router.add_route("OPTIONS", path, self._preflight)

    # -- HTTP handlers -----------------------------------------------------------
    async def _preflight(self, request: web.Request) -> web.Response:
        headers = self._cors_headers()
        headers["Access-Control-Allow-Methods"] = "POST, OPTIONS"
        headers["Access-Control-Allow-Headers"] = _CORS_ALLOW_HEADERS
        headers["Access-Control-Max-Age"] = "86400"
        return web.Response(status=204, headers=headers)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        ctype = request.content_type.lower()
        if ctype not in _BINARY_TYPES and ctype not in _TEXT_TYPES:
            return web.Response(
                status=415,
                text=(
                    f"unsupported content-type {request.headers.get('Content-Type', '')!r}; "
                    "expected application/grpc-web[+proto] or application/grpc-web-text[+proto]\n"
                ),
                headers=self._cors_headers(),
            )
        text = ctype in _TEXT_TYPES
        name = request.match_info["method"]
        method = self._methods.get(name)
        label = method.name if method is not None else "unknown"
        ctx: GrpcWebServicerContext | None = None
        t0 = time.monotonic()
        try:
            if method is None or method.handler is None:
                raise _StatusError(
                    grpc.StatusCode.UNIMPLEMENTED, f"Method not found: /{self._service}/{name}"
                )
            timeout_s = self._timeout(request)
            ctx = GrpcWebServicerContext(request, timeout_s=timeout_s)
            try:
                async with asyncio.timeout(timeout_s):
                    message = await self._read_request(request, method, text)
            except TimeoutError:
                raise _StatusError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded") from None
        except _StatusError as exc:
            if ctx is not None:
                ctx._finish()
            REQUESTS_TOTAL.labels("grpc-web", label, exc.status.code.name).inc()
            return await self._send_trailers_only(request, exc.status, text)

        assert method is not None and ctx is not None
        # Stays CANCELLED if aiohttp cancels this handler (shutdown) mid-call.
        status = _GONE
        resp: web.StreamResponse | None = None
        try:
            if method.server_streaming:
                status, resp = await self._serve_stream(request, method, message, ctx, text)
            else:
                status, resp = await self._serve_unary(request, method, message, ctx, text)
        finally:
            if status is _GONE:
                ctx._cancelled = True
            ctx._finish()
            REQUESTS_TOTAL.labels("grpc-web", label, status.code.name).inc()
            if not method.server_streaming:
                API_DURATION.labels("grpc-web", label).observe(time.monotonic() - t0)
        # Normally already sent; when the client vanished first aiohttp finds
        # the connection gone and drops it quietly.
        return resp if resp is not None else web.Response(status=499)

    def _timeout(self, request: web.Request) -> float | None:
        value = request.headers.get("grpc-timeout")
        if value is None:
            return None
        try:
            return parse_grpc_timeout(value)
        except ValueError as exc:
            raise _StatusError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None

    async def _read_request(self, request: web.Request, method: _Method, text: bool) -> Message:
        limit = self._body_limit_text if text else self._body_limit_binary
        too_big = _StatusError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"request body larger than the limit of {self._max} bytes per message",
        )
        if request.content_length is not None and request.content_length > limit:
            raise too_big
        body = bytearray()
        # Content-Length may be absent (chunked) or lie, so count while
        # reading; the buffer never grows past the limit.
        while chunk := await request.content.readany():
            if len(body) + len(chunk) > limit:
                raise too_big
            body += chunk
        data = bytes(body)
        if text:
            try:
                data = decode_text(data)
            except ValueError as exc:
                raise _StatusError(
                    grpc.StatusCode.INVALID_ARGUMENT, f"malformed grpc-web-text body: {exc}"
                ) from None
        try:
            frames = parse_frames(data, max_payload=self._max)
        except FrameTooLargeError as exc:
            raise _StatusError(
                grpc.StatusCode.RESOURCE_EXHAUSTED, f"request message: {exc}"
            ) from None
        except ValueError as exc:
            raise _StatusError(
                grpc.StatusCode.INVALID_ARGUMENT, f"malformed gRPC-Web framing: {exc}"
            ) from None
        for flag, _ in frames:
            if flag & FLAG_COMPRESSED:
                raise _StatusError(grpc.StatusCode.UNIMPLEMENTED, "compression not supported")
            if flag & FLAG_TRAILERS:
                raise _StatusError(
                    grpc.StatusCode.INVALID_ARGUMENT, "unexpected trailer frame in the request"
                )
            if flag != FLAG_DATA:
                raise _StatusError(
                    grpc.StatusCode.INVALID_ARGUMENT, f"unknown frame flags 0x{flag:02x}"
                )
        if len(frames) != 1:
            raise _StatusError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"expected exactly one request message, got {len(frames)}",
            )
        try:
            return method.request_cls.FromString(frames[0][1])
        except DecodeError as exc:
            raise _StatusError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"request is not a valid {method.request_cls.DESCRIPTOR.full_name}: {exc}",
            ) from None

    # -- calls -------------------------------------------------------------------
    async def _serve_unary(
        self,
        request: web.Request,
        method: _Method,
        message: Message,
        ctx: GrpcWebServicerContext,
        text: bool,
    ) -> tuple[_Status, web.StreamResponse | None]:
        assert method.handler is not None
        handler = method.handler

        async def call() -> tuple[_Status, bytes | None]:
            timeout = ctx.time_remaining()
            try:
                async with asyncio.timeout(timeout) as tm:
                    result = handler(message, ctx)
                    if inspect.isawaitable(result):
                        result = await result
            except GrpcWebAbortError:
                return self._status_after_abort(ctx), None
            except TimeoutError:
                if tm.expired():
                    ctx._cancelled = True
                    return _Status(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"), None
                return self._status_after_exception(method, ctx), None
            except Exception:
                return self._status_after_exception(method, ctx), None
            status = self._status_after_return(ctx)
            if status.code != grpc.StatusCode.OK:
                return status, None
            if not isinstance(result, method.response_cls):
                log.error(
                    "gRPC-Web %s returned %s, expected %s",
                    method.path,
                    type(result).__name__,
                    method.response_cls.DESCRIPTOR.full_name,
                )
                return _Status(grpc.StatusCode.INTERNAL, "internal error"), None
            return status, result.SerializeToString()

        outcome = await self._watch_client(request, ctx, call())
        if outcome is None:
            return _GONE, None
        status, payload = outcome
        if payload is None:
            return status, await self._send_trailers_only(request, status, text)
        body = encode_frame(payload) + encode_frame(
            encode_trailers(status.code, status.details, status.trailing), trailers=True
        )
        resp = web.Response(status=200, headers=self._headers(text))
        resp.body = base64.b64encode(body) if text else body
        try:
            await resp.prepare(request)
            await resp.write_eof()
        except ConnectionError:
            return _GONE, resp
        return status, resp

    async def _serve_stream(
        self,
        request: web.Request,
        method: _Method,
        message: Message,
        ctx: GrpcWebServicerContext,
        text: bool,
    ) -> tuple[_Status, web.StreamResponse | None]:
        assert method.handler is not None
        handler = method.handler
        resp = web.StreamResponse(status=200, headers=self._headers(text))

        async def write(frame: bytes) -> None:
            # Each frame is its own base64 unit in text mode, so it can be
            # flushed at once; clients decode padded pieces back to back.
            try:
                if not resp.prepared:
                    await resp.prepare(request)
                await resp.write(base64.b64encode(frame) if text else frame)
            except ConnectionError as exc:
                raise _ClientGoneError from exc

        async def pump() -> _Status:
            agen: AsyncIterator[Message] | None = None
            timeout = ctx.time_remaining()
            try:
                async with asyncio.timeout(timeout) as tm:
                    result = handler(message, ctx)
                    if inspect.isawaitable(result) and not hasattr(result, "__aiter__"):
                        result = await result
                    if not hasattr(result, "__aiter__"):
                        raise TypeError(
                            f"streaming handler returned {type(result).__name__}, "
                            "expected an async iterator"
                        )
                    agen = result
                    async for item in agen:
                        if not isinstance(item, method.response_cls):
                            raise TypeError(
                                f"stream yielded {type(item).__name__}, expected "
                                f"{method.response_cls.DESCRIPTOR.full_name}"
                            )
                        await write(encode_frame(item.SerializeToString()))
            except GrpcWebAbortError:
                return self._status_after_abort(ctx)
            except _ClientGoneError:
                ctx._cancelled = True
                return _GONE
            except TimeoutError:
                if tm.expired():
                    ctx._cancelled = True
                    return _Status(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
                return self._status_after_exception(method, ctx)
            except Exception:
                return self._status_after_exception(method, ctx)
            finally:
                await _aclose(agen, method.path)
            return self._status_after_return(ctx)

        status = await self._watch_client(request, ctx, pump())
        if status is None or status is _GONE:
            return _GONE, resp
        if not resp.prepared:
            # Nothing was sent: a trailers-only response, readable from the headers.
            return status, await self._send_trailers_only(request, status, text)
        trailers = encode_trailers(status.code, status.details, status.trailing)
        try:
            await write(encode_frame(trailers, trailers=True))
            await resp.write_eof()
        except (_ClientGoneError, ConnectionError):
            return _GONE, resp
        return status, resp

    async def _watch_client(
        self, request: web.Request, ctx: GrpcWebServicerContext, work: Awaitable[_T]
    ) -> _T | None:
        """Run ``work`` until done, or cancel it if the HTTP client disconnects (None)."""
        task = asyncio.ensure_future(work)
        watcher = asyncio.ensure_future(_wait_disconnect(request))
        try:
            await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
        finally:
            # Reached on disconnect and also when aiohttp cancels this handler
            # (shutdown, handler_cancellation=True): the servicer must see a
            # cancellation either way.
            watcher.cancel()
            if not task.done():
                ctx._cancelled = True
                task.cancel()
            await asyncio.gather(task, watcher, return_exceptions=True)
        if task.cancelled():
            return None
        return task.result()

    # -- status helpers ----------------------------------------------------------
    @staticmethod
    def _status_after_abort(ctx: GrpcWebServicerContext) -> _Status:
        assert ctx._abort is not None
        abort = ctx._abort
        return _Status(abort.code, abort.details, abort.trailing_metadata)

    @staticmethod
    def _status_after_return(ctx: GrpcWebServicerContext) -> _Status:
        if ctx._abort is not None:
            # The servicer swallowed the AbortError; grpc.aio still sends the
            # abort status, so do the same.
            return GrpcWebGateway._status_after_abort(ctx)
        code = ctx._code or grpc.StatusCode.OK
        return _Status(code, ctx._details or "", ctx._trailing)

    @staticmethod
    def _status_after_exception(method: _Method, ctx: GrpcWebServicerContext) -> _Status:
        if ctx._abort is not None:
            return GrpcWebGateway._status_after_abort(ctx)
        if ctx._code is not None and ctx._code != grpc.StatusCode.OK:
            # A servicer that set a code before raising (the generated base
            # class does for unimplemented methods) meant that code.
            log.info("gRPC-Web %s raised after setting %s", method.path, ctx._code.name)
            return _Status(ctx._code, ctx._details or "", ctx._trailing)
        log.exception("gRPC-Web %s failed", method.path)
        return _Status(grpc.StatusCode.INTERNAL, "internal error")

    # -- responses ---------------------------------------------------------------
    def _cors_headers(self) -> dict[str, str]:
        if self._allow_origin is None:
            return {}
        headers = {
            "Access-Control-Allow-Origin": self._allow_origin,
            "Access-Control-Expose-Headers": _CORS_EXPOSE_HEADERS,
        }
        if self._allow_origin != "*":
            headers["Vary"] = "Origin"
        return headers

    def _headers(self, text: bool) -> dict[str, str]:
        headers = self._cors_headers()
        headers["Content-Type"] = CONTENT_TYPE_TEXT if text else CONTENT_TYPE_PROTO
        return headers

    async def _send_trailers_only(
        self, request: web.Request, status: _Status, text: bool
    ) -> web.StreamResponse:
        headers = self._headers(text)
        # Trailers-only: the status and trailing metadata in the headers for
        # clients that read only those, and the trailer frame for the others.
        for key, value in status.trailing:
            text_value = _metadata_value(key, value)
            if "\r" not in text_value and "\n" not in text_value:
                headers[key.lower()] = text_value
        headers["grpc-status"] = str(status.code.value[0])
        headers["grpc-message"] = encode_grpc_message(status.details)
        frame = encode_frame(encode_trailers(status.code, status.details, status.trailing), True)
        resp = web.Response(status=200, headers=headers)
        resp.body = base64.b64encode(frame) if text else frame
        try:
            await resp.prepare(request)
            await resp.write_eof()
        except ConnectionError:
            pass  # the client is gone; nothing left to tell it
        return resp


async def _aclose(agen: object, path: str) -> None:
    aclose = getattr(agen, "aclose", None)
    if aclose is None:
        return
    try:
        await aclose()
    except Exception:
        log.exception("closing the stream of %s failed", path)


async def _wait_disconnect(request: web.Request) -> None:
    while True:
        transport = request.transport
        if transport is None or transport.is_closing():
            return
        await asyncio.sleep(_DISCONNECT_POLL_S)
