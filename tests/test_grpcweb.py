"""The gRPC-Web gateway against the same servicer served by native grpc.aio."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import socket
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import grpc
import grpc.aio
import pytest
from aiohttp import web
from prometheus_client import REGISTRY

from sidecar.api.grpcweb import (
    Base64StreamDecoder,
    FrameTooLargeError,
    GrpcWebGateway,
    decode_grpc_message,
    decode_text,
    encode_frame,
    encode_grpc_message,
    encode_trailers,
    format_grpc_timeout,
    parse_frames,
    parse_grpc_timeout,
    parse_trailers,
)
from sidecar.api.grpcweb_client import GrpcWebError, server_stream, unary
from sidecar.proto.captions.v1 import captions_pb2 as pb
from sidecar.proto.captions.v1 import captions_pb2_grpc as pb_grpc

SERVICE = pb.DESCRIPTOR.services_by_name["Captions"]
TOKEN = "s3cret"
LIMIT = 64 * 1024  # max message bytes, gateway and native alike
ORIGIN = "https://meet.example.com"
SECRET_IN_EXCEPTION = "db password is hunter2"

GET_STATUS = "/captions.v1.Captions/GetRoomStatus"
START_CAPTIONS = "/captions.v1.Captions/StartCaptions"
END_ROOM = "/captions.v1.Captions/EndRoom"
LIST_ROOMS = "/captions.v1.Captions/ListRooms"
SUBSCRIBE = "/captions.v1.Captions/SubscribeCaptions"


class FakeCaptions(pb_grpc.CaptionsServicer):
    """A few methods with behaviour that is easy to compare across transports."""

    def __init__(self) -> None:
        self.time_remaining: list[float | None] = []
        self.peers: list[str] = []
        self.stream_exit: asyncio.Future[str] | None = None
        self.stream_done: list[tuple[bool, bool]] = []

    async def GetRoomStatus(self, request: pb.RoomRequest, context: Any) -> pb.RoomStatus:
        self.time_remaining.append(context.time_remaining())
        self.peers.append(context.peer())
        if request.room == "slow":
            await asyncio.sleep(5)
        return pb.RoomStatus(room=request.room, participants=len(request.room), captions_sent=7)

    async def StartCaptions(self, request: pb.StartRequest, context: Any) -> pb.RoomStatus:
        md = dict(context.invocation_metadata())
        if md.get("authorization") != f"Bearer {TOKEN}":
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong token: ünïcode%")
        return pb.RoomStatus(room=request.room, captioning=True)

    async def EndRoom(self, request: pb.RoomRequest, context: Any) -> pb.RoomStatus:
        raise RuntimeError(SECRET_IN_EXCEPTION)

    async def SubscribeCaptions(
        self, request: pb.SubscribeRequest, context: Any
    ) -> AsyncIterator[pb.CaptionEvent]:
        context.add_done_callback(
            lambda ctx: self.stream_done.append((ctx.cancelled(), ctx.done()))
        )
        if request.room == "missing":
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                "no such room",
                trailing_metadata=(("x-room", "missing"),),
            )
        how = "finished"
        try:
            for i in range(3):
                await asyncio.sleep(0.01)
                yield pb.CaptionEvent(room=request.room, message_id=f"m{i}", text=f"word {i}")
            if request.room == "fail-after-3":
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "room ended")
            if request.room == "forever":
                await asyncio.sleep(3600)
        except asyncio.CancelledError:
            how = "cancelled"
            raise
        except GeneratorExit:
            how = "closed"
            raise
        finally:
            if self.stream_exit is not None and not self.stream_exit.done():
                self.stream_exit.set_result(how)


@dataclass
class Servers:
    servicer: FakeCaptions
    url: str
    port: int
    session: aiohttp.ClientSession
    stub: pb_grpc.CaptionsStub
    channel: grpc.aio.Channel


@pytest.fixture
async def servers() -> AsyncIterator[Servers]:
    servicer = FakeCaptions()

    app = web.Application()
    GrpcWebGateway(servicer, SERVICE, max_message_bytes=LIMIT, allow_origin=ORIGIN).add_routes(app)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    assert runner.addresses
    port = runner.addresses[0][1]

    native = grpc.aio.server(options=[("grpc.max_receive_message_length", LIMIT)])
    pb_grpc.add_CaptionsServicer_to_server(servicer, native)
    native_port = native.add_insecure_port("127.0.0.1:0")
    await native.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{native_port}")

    async with aiohttp.ClientSession() as session:
        yield Servers(
            servicer=servicer,
            url=f"http://127.0.0.1:{port}",
            port=port,
            session=session,
            stub=pb_grpc.CaptionsStub(channel),
            channel=channel,
        )
    await channel.close()
    await native.stop(None)
    await runner.cleanup()


async def native_status(coro: Any) -> tuple[grpc.StatusCode, str, Any]:
    try:
        return grpc.StatusCode.OK, "", await coro
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or "", None


async def web_status(coro: Any) -> tuple[grpc.StatusCode, str, Any]:
    try:
        return grpc.StatusCode.OK, "", await coro
    except GrpcWebError as exc:
        return exc.code, exc.details, None


async def raw_post(
    s: Servers,
    path: str,
    body: bytes,
    *,
    content_type: str = "application/grpc-web+proto",
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    hdrs = {"Content-Type": content_type, "Authorization": f"Bearer {TOKEN}"}
    hdrs.update(headers or {})
    async with s.session.post(s.url + path, data=body, headers=hdrs) as resp:
        return resp.status, {k.lower(): v for k, v in resp.headers.items()}, await resp.read()


def status_of(body: bytes) -> dict[str, str]:
    """The trailers of a binary gRPC-Web body, checked to be its last frame."""
    frames = parse_frames(body)
    assert frames and frames[-1][0] == 0x80, frames
    assert all(flag == 0x00 for flag, _ in frames[:-1])
    return parse_trailers(frames[-1][1])


def counter(method: str, code: str) -> float:
    value = REGISTRY.get_sample_value(
        "captions_api_requests_total", {"transport": "grpc-web", "method": method, "code": code}
    )
    return value or 0.0


# -- same calls, same answers --------------------------------------------------


@pytest.mark.parametrize("text", [False, True], ids=["binary", "text"])
async def test_unary_matches_native(servers: Servers, text: bool) -> None:
    req = pb.RoomRequest(room="lobby@conference.example.com")
    via_web = await unary(
        servers.session, servers.url, GET_STATUS, req, pb.RoomStatus, token=TOKEN, text=text
    )
    via_native = await servers.stub.GetRoomStatus(req)
    assert via_web == via_native
    assert via_web.room == req.room and via_web.captions_sent == 7
    assert servers.servicer.time_remaining == [None, None]  # no deadline on either
    assert servers.servicer.peers[0].startswith("ipv4:127.0.0.1:")


@pytest.mark.parametrize("text", [False, True], ids=["binary", "text"])
async def test_auth_metadata_and_abort_match_native(servers: Servers, text: bool) -> None:
    req = pb.StartRequest(room="r1")
    web_bad = await web_status(
        unary(servers.session, servers.url, START_CAPTIONS, req, pb.RoomStatus, text=text)
    )
    native_bad = await native_status(servers.stub.StartCaptions(req))
    assert web_bad[:2] == native_bad[:2]
    assert web_bad[0] == grpc.StatusCode.UNAUTHENTICATED
    assert web_bad[1] == "missing or wrong token: ünïcode%"

    web_wrong = await web_status(
        unary(servers.session, servers.url, START_CAPTIONS, req, pb.RoomStatus, token="nope")
    )
    native_wrong = await native_status(
        servers.stub.StartCaptions(req, metadata=[("authorization", "Bearer nope")])
    )
    assert web_wrong[0] == native_wrong[0] == grpc.StatusCode.UNAUTHENTICATED

    web_ok = await unary(
        servers.session, servers.url, START_CAPTIONS, req, pb.RoomStatus, token=TOKEN, text=text
    )
    native_ok = await servers.stub.StartCaptions(
        req, metadata=[("authorization", f"Bearer {TOKEN}")]
    )
    assert web_ok == native_ok == pb.RoomStatus(room="r1", captioning=True)


async def test_exception_is_internal_and_not_leaked(
    servers: Servers, caplog: pytest.LogCaptureFixture
) -> None:
    req = pb.RoomRequest(room="r")
    with caplog.at_level(logging.ERROR, logger="sidecar.api.grpcweb"):
        code, details, _ = await web_status(
            unary(servers.session, servers.url, END_ROOM, req, pb.RoomStatus, token=TOKEN)
        )
    assert code == grpc.StatusCode.INTERNAL
    assert "hunter2" not in details and "RuntimeError" not in details
    assert any(r.exc_info and SECRET_IN_EXCEPTION in str(r.exc_info[1]) for r in caplog.records), (
        "the traceback is logged"
    )
    # grpc.aio answers UNKNOWN and puts the exception text in the details;
    # the gateway deliberately does neither. Both are errors.
    native_code, _, _ = await native_status(servers.stub.EndRoom(req))
    assert native_code == grpc.StatusCode.UNKNOWN


async def test_unimplemented_servicer_method_matches_native(servers: Servers) -> None:
    req = pb.ListRoomsRequest()
    web_code, web_details, _ = await web_status(
        unary(servers.session, servers.url, LIST_ROOMS, req, pb.ListRoomsResponse)
    )
    native_code, native_details, _ = await native_status(servers.stub.ListRooms(req))
    assert web_code == native_code == grpc.StatusCode.UNIMPLEMENTED
    assert "Method not implemented!" in web_details
    assert "Method not implemented!" in native_details


@pytest.mark.parametrize("text", [False, True], ids=["binary", "text"])
async def test_stream_matches_native(servers: Servers, text: bool) -> None:
    req = pb.SubscribeRequest(room="r2")
    via_web = [
        e
        async for e in server_stream(
            servers.session, servers.url, SUBSCRIBE, req, pb.CaptionEvent, text=text
        )
    ]
    via_native = [e async for e in servers.stub.SubscribeCaptions(req)]
    assert via_web == via_native
    assert [e.text for e in via_web] == ["word 0", "word 1", "word 2"]
    # Both transports finished normally: not cancelled, done by callback time.
    assert servers.servicer.stream_done[0] == (False, True)


async def test_stream_error_after_messages_matches_native(servers: Servers) -> None:
    req = pb.SubscribeRequest(room="fail-after-3")
    got: list[str] = []
    with pytest.raises(GrpcWebError) as err:
        async for e in server_stream(servers.session, servers.url, SUBSCRIBE, req, pb.CaptionEvent):
            got.append(e.text)
    native_got: list[str] = []
    with pytest.raises(grpc.aio.AioRpcError) as native_err:
        async for e in servers.stub.SubscribeCaptions(req):
            native_got.append(e.text)
    assert got == native_got == ["word 0", "word 1", "word 2"]
    assert err.value.code == native_err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert err.value.details == native_err.value.details() == "room ended"


async def test_stream_error_before_messages_is_trailers_only(servers: Servers) -> None:
    body = encode_frame(pb.SubscribeRequest(room="missing").SerializeToString())
    status, headers, data = await raw_post(servers, SUBSCRIBE, body)
    assert status == 200
    assert headers["grpc-status"] == str(grpc.StatusCode.NOT_FOUND.value[0])
    assert headers["grpc-message"] == "no such room"
    assert headers["x-room"] == "missing"
    assert status_of(data) == {
        "grpc-status": "5",
        "grpc-message": "no such room",
        "x-room": "missing",
    }
    call = servers.stub.SubscribeCaptions(pb.SubscribeRequest(room="missing"))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in call:
            pass
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert ("x-room", "missing") in tuple(await call.trailing_metadata())


async def test_unknown_method_matches_native(servers: Servers) -> None:
    req = pb.RoomRequest(room="r")
    web_code, web_details, _ = await web_status(
        unary(servers.session, servers.url, "/captions.v1.Captions/Nope", req, pb.RoomStatus)
    )
    native_call = servers.channel.unary_unary(
        "/captions.v1.Captions/Nope",
        request_serializer=pb.RoomRequest.SerializeToString,
        response_deserializer=pb.RoomStatus.FromString,
    )
    native_code, _, _ = await native_status(native_call(req))
    assert web_code == native_code == grpc.StatusCode.UNIMPLEMENTED
    assert "/captions.v1.Captions/Nope" in web_details
    # Another service's path is an HTTP 404, which clients read as UNIMPLEMENTED.
    other_code, _, _ = await web_status(
        unary(servers.session, servers.url, "/other.v1.Service/Call", req, pb.RoomStatus)
    )
    assert other_code == grpc.StatusCode.UNIMPLEMENTED


# -- wire format ---------------------------------------------------------------


async def test_trailer_frame_content_binary(servers: Servers) -> None:
    before = counter("GetRoomStatus", "OK")
    body = encode_frame(pb.RoomRequest(room="abc").SerializeToString())
    status, headers, data = await raw_post(servers, GET_STATUS, body)
    assert status == 200
    assert headers["content-type"] == "application/grpc-web+proto"
    assert "grpc-status" not in headers  # success: the status is in the body only
    frames = parse_frames(data)
    assert [flag for flag, _ in frames] == [0x00, 0x80]
    assert pb.RoomStatus.FromString(frames[0][1]).room == "abc"
    assert frames[1][1] == b"grpc-status:0\r\ngrpc-message:\r\n"
    assert counter("GetRoomStatus", "OK") == before + 1


@pytest.mark.parametrize("ctype", ["application/grpc-web-text", "application/grpc-web-text+proto"])
async def test_text_mode_is_base64_both_ways(servers: Servers, ctype: str) -> None:
    body = base64.b64encode(encode_frame(pb.RoomRequest(room="txt").SerializeToString()))
    status, headers, data = await raw_post(servers, GET_STATUS, body, content_type=ctype)
    assert status == 200
    assert headers["content-type"] == "application/grpc-web-text+proto"
    frames = parse_frames(base64.b64decode(data, validate=True))
    assert pb.RoomStatus.FromString(frames[0][1]).room == "txt"
    assert frames[1] == (0x80, b"grpc-status:0\r\ngrpc-message:\r\n")


async def test_text_stream_is_padded_chunks(servers: Servers) -> None:
    body = base64.b64encode(encode_frame(pb.SubscribeRequest(room="t").SerializeToString()))
    status, _, data = await raw_post(
        servers, SUBSCRIBE, body, content_type="application/grpc-web-text"
    )
    assert status == 200
    frames = parse_frames(decode_text(data))
    assert [flag for flag, _ in frames] == [0, 0, 0, 0x80]
    assert parse_trailers(frames[-1][1])["grpc-status"] == "0"


async def test_trailers_only_error_headers(servers: Servers) -> None:
    body = encode_frame(pb.StartRequest(room="r").SerializeToString())
    status, headers, data = await raw_post(
        servers, START_CAPTIONS, body, headers={"Authorization": "Bearer wrong"}
    )
    assert status == 200
    assert headers["grpc-status"] == "16"
    assert headers["grpc-message"] == "missing or wrong token: %C3%BCn%C3%AFcode%25"
    assert decode_grpc_message(headers["grpc-message"]) == "missing or wrong token: ünïcode%"
    assert status_of(data) == {
        "grpc-status": "16",
        "grpc-message": "missing or wrong token: %C3%BCn%C3%AFcode%25",
    }


async def test_wrong_content_type_is_415(servers: Servers) -> None:
    status, headers, data = await raw_post(
        servers, GET_STATUS, b'{"room": "r"}', content_type="application/json"
    )
    assert status == 415
    assert headers["content-type"].startswith("text/plain")
    assert b"application/json" in data and b"application/grpc-web" in data


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b"\x00\x00", "truncated frame header"),
        (b"\x00\x00\x00\x00\x0a" + b"abc", "truncated frame: header says 10 bytes"),
        (b"", "expected exactly one request message, got 0"),
        (encode_frame(b"") + encode_frame(b""), "expected exactly one request message, got 2"),
        (encode_frame(b"\xff\xff\xff\xff"), "not a valid captions.v1.RoomRequest"),
        (encode_frame(b"\x0a\x05ab"), "not a valid captions.v1.RoomRequest"),
        (encode_frame(b"grpc-status:0\r\n", trailers=True), "unexpected trailer frame"),
        (b"\x40" + struct.pack(">I", 0), "unknown frame flags 0x40"),
    ],
    ids=[
        "short-header",
        "truncated",
        "empty",
        "two-messages",
        "garbage",
        "cut-proto",
        "trailer",
        "flags",
    ],
)
async def test_malformed_requests_are_invalid_argument(
    servers: Servers, body: bytes, words: str
) -> None:
    status, headers, data = await raw_post(servers, GET_STATUS, body)
    assert status == 200
    assert headers["grpc-status"] == str(grpc.StatusCode.INVALID_ARGUMENT.value[0])
    assert words in decode_grpc_message(headers["grpc-message"])
    assert status_of(data)["grpc-status"] == "3"
    # The connection and the server stay usable.
    ok = await unary(
        servers.session, servers.url, GET_STATUS, pb.RoomRequest(room="x"), pb.RoomStatus
    )
    assert ok.room == "x"


async def test_bad_base64_is_invalid_argument(servers: Servers) -> None:
    status, headers, _ = await raw_post(
        servers, GET_STATUS, b"AAAA*AAA", content_type="application/grpc-web-text"
    )
    assert status == 200
    assert headers["grpc-status"] == "3"
    assert "base64" in decode_grpc_message(headers["grpc-message"])


async def test_compressed_frame_is_unimplemented(servers: Servers) -> None:
    payload = pb.RoomRequest(room="r").SerializeToString()
    body = struct.pack(">BI", 0x01, len(payload)) + payload
    status, headers, _ = await raw_post(servers, GET_STATUS, body)
    assert status == 200
    assert headers["grpc-status"] == str(grpc.StatusCode.UNIMPLEMENTED.value[0])
    assert headers["grpc-message"] == "compression not supported"


@pytest.mark.parametrize("text", [False, True], ids=["binary", "text"])
async def test_oversized_body_is_resource_exhausted(servers: Servers, text: bool) -> None:
    big = pb.RoomRequest(room="x" * (LIMIT + 100))
    web_code, web_details, _ = await web_status(
        unary(servers.session, servers.url, GET_STATUS, big, pb.RoomStatus, text=text)
    )
    native_code, _, _ = await native_status(servers.stub.GetRoomStatus(big))
    assert web_code == native_code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert str(LIMIT) in web_details
    # A message just under the limit still passes, and the server keeps serving.
    fits = pb.RoomRequest(room="y" * (LIMIT - 100))
    got = await unary(servers.session, servers.url, GET_STATUS, fits, pb.RoomStatus, text=text)
    assert got.room == fits.room


async def test_oversized_body_without_content_length(servers: Servers) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"\x00" * (LIMIT // 4)

    status, headers, _ = await raw_post(servers, GET_STATUS, chunks())  # type: ignore[arg-type]
    assert status == 200
    assert headers["grpc-status"] == str(grpc.StatusCode.RESOURCE_EXHAUSTED.value[0])
    ok = await unary(
        servers.session, servers.url, GET_STATUS, pb.RoomRequest(room="n"), pb.RoomStatus
    )
    assert ok.room == "n"


async def test_frame_declaring_huge_length_is_resource_exhausted(servers: Servers) -> None:
    body = struct.pack(">BI", 0, 10 * LIMIT) + b"tiny"
    status, headers, _ = await raw_post(servers, GET_STATUS, body)
    assert status == 200
    assert headers["grpc-status"] == str(grpc.StatusCode.RESOURCE_EXHAUSTED.value[0])


# -- deadlines -------------------------------------------------------------------


async def test_deadline_exceeded_matches_native(servers: Servers) -> None:
    req = pb.RoomRequest(room="slow")
    t0 = time.monotonic()
    web_code, _, _ = await web_status(
        unary(servers.session, servers.url, GET_STATUS, req, pb.RoomStatus, timeout=0.3)
    )
    native_code, _, _ = await native_status(servers.stub.GetRoomStatus(req, timeout=0.3))
    assert web_code == native_code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - t0 < 3


async def test_grpc_timeout_header_is_enforced_by_the_server(servers: Servers) -> None:
    # No client-side timer here: only the gateway can end the call.
    body = encode_frame(pb.RoomRequest(room="slow").SerializeToString())
    t0 = time.monotonic()
    status, headers, data = await raw_post(
        servers, GET_STATUS, body, headers={"grpc-timeout": "200m"}
    )
    elapsed = time.monotonic() - t0
    assert status == 200
    assert headers["grpc-status"] == str(grpc.StatusCode.DEADLINE_EXCEEDED.value[0])
    assert status_of(data)["grpc-message"] == "Deadline Exceeded"
    assert 0.15 < elapsed < 2


async def test_time_remaining_follows_grpc_timeout(servers: Servers) -> None:
    await unary(
        servers.session,
        servers.url,
        GET_STATUS,
        pb.RoomRequest(room="t"),
        pb.RoomStatus,
        metadata=[("grpc-timeout", "5S")],
    )
    remaining = servers.servicer.time_remaining[-1]
    assert remaining is not None and 4.0 < remaining <= 5.0


async def test_malformed_grpc_timeout_is_invalid_argument(servers: Servers) -> None:
    body = encode_frame(pb.RoomRequest(room="t").SerializeToString())
    status, headers, _ = await raw_post(servers, GET_STATUS, body, headers={"grpc-timeout": "5s"})
    assert headers["grpc-status"] == "3"
    assert "grpc-timeout" in decode_grpc_message(headers["grpc-message"])


# -- streaming cancellation -----------------------------------------------------------


async def test_stream_client_disconnect_closes_the_generator(servers: Servers) -> None:
    loop = asyncio.get_running_loop()
    servers.servicer.stream_exit = loop.create_future()
    before = counter("SubscribeCaptions", "CANCELLED")
    req = pb.SubscribeRequest(room="forever")
    got: list[str] = []
    async with contextlib.aclosing(
        server_stream(servers.session, servers.url, SUBSCRIBE, req, pb.CaptionEvent)
    ) as events:
        async for event in events:
            got.append(event.text)
            if len(got) == 3:
                break
    # The generator now sleeps "forever"; hanging up must reach it.
    how = await asyncio.wait_for(servers.servicer.stream_exit, 5)
    assert how in {"cancelled", "closed"}
    for _ in range(50):
        if servers.servicer.stream_done:
            break
        await asyncio.sleep(0.02)
    assert servers.servicer.stream_done == [(True, True)]  # cancelled(), done() in the callback
    assert counter("SubscribeCaptions", "CANCELLED") == before + 1
    # The gateway is still fine.
    again = [
        e.text
        async for e in server_stream(
            servers.session, servers.url, SUBSCRIBE, pb.SubscribeRequest(room="a"), pb.CaptionEvent
        )
    ]
    assert again == ["word 0", "word 1", "word 2"]


async def test_stream_deadline(servers: Servers) -> None:
    req = pb.SubscribeRequest(room="forever")
    got: list[str] = []
    with pytest.raises(GrpcWebError) as err:
        async for e in server_stream(
            servers.session, servers.url, SUBSCRIBE, req, pb.CaptionEvent, timeout=0.5
        ):
            got.append(e.text)
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert got == ["word 0", "word 1", "word 2"]


# -- CORS ----------------------------------------------------------------------------


async def test_cors_preflight_and_headers(servers: Servers) -> None:
    async with servers.session.options(
        servers.url + GET_STATUS,
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type, x-grpc-web",
        },
    ) as resp:
        assert resp.status in (200, 204)
        h = resp.headers
        assert h["Access-Control-Allow-Origin"] == ORIGIN
        assert "POST" in h["Access-Control-Allow-Methods"]
        allowed = {v.strip() for v in h["Access-Control-Allow-Headers"].split(",")}
        assert {
            "authorization",
            "content-type",
            "x-grpc-web",
            "x-user-agent",
            "grpc-timeout",
        } <= allowed
    body = encode_frame(pb.RoomRequest(room="c").SerializeToString())
    _, headers, _ = await raw_post(servers, GET_STATUS, body, headers={"Origin": ORIGIN})
    assert headers["access-control-allow-origin"] == ORIGIN
    exposed = {v.strip() for v in headers["access-control-expose-headers"].split(",")}
    assert {"grpc-status", "grpc-message"} <= exposed


async def test_no_cors_without_allow_origin() -> None:
    app = web.Application()
    GrpcWebGateway(FakeCaptions(), SERVICE).add_routes(app)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with aiohttp.ClientSession() as session:
            async with session.options(f"http://127.0.0.1:{port}{GET_STATUS}") as resp:
                assert resp.status == 405
            got = await unary(
                session,
                f"http://127.0.0.1:{port}",
                GET_STATUS,
                pb.RoomRequest(room="q"),
                pb.RoomStatus,
            )
            assert got.room == "q"
    finally:
        await runner.cleanup()


# -- a minimal HTTP/1.1 client, as Prosody's ---------------------------------------


def _http11_call(port: int, path: str, payload: bytes) -> tuple[str, dict[str, str], bytes]:
    body = encode_frame(payload)
    head = (
        f"POST {path} HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{port}\r\n"
        "Content-Type: application/grpc-web+proto\r\n"
        f"Authorization: Bearer {TOKEN}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n"
        "\r\n"
    ).encode("ascii")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(head + body)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    raw_head, _, raw_body = received.partition(b"\r\n\r\n")
    lines = raw_head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    return lines[0], headers, raw_body


async def test_plain_http11_socket_client(servers: Servers) -> None:
    status_line, headers, body = await asyncio.to_thread(
        _http11_call, servers.port, START_CAPTIONS, pb.StartRequest(room="pros").SerializeToString()
    )
    assert status_line == "HTTP/1.1 200 OK"
    # A unary answer has a plain Content-Length body: no chunked decoding needed.
    assert "chunked" not in headers.get("transfer-encoding", "")
    assert int(headers["content-length"]) == len(body)
    frames = parse_frames(body)
    assert pb.RoomStatus.FromString(frames[0][1]) == pb.RoomStatus(room="pros", captioning=True)
    assert parse_trailers(frames[1][1]) == {"grpc-status": "0", "grpc-message": ""}


# -- pure helpers ------------------------------------------------------------------------


def test_encode_and_parse_frames() -> None:
    data = encode_frame(b"hello") + encode_frame(b"") + encode_frame(b"k:v\r\n", trailers=True)
    assert data[:5] == b"\x00\x00\x00\x00\x05"
    assert parse_frames(data) == [(0, b"hello"), (0, b""), (0x80, b"k:v\r\n")]
    assert parse_frames(b"") == []
    with pytest.raises(ValueError, match="truncated frame header"):
        parse_frames(b"\x00\x00\x00")
    with pytest.raises(ValueError, match="truncated frame"):
        parse_frames(encode_frame(b"hello")[:-1])
    with pytest.raises(FrameTooLargeError):
        parse_frames(encode_frame(b"x" * 11), max_payload=10)


def test_base64_stream_decoder_handles_split_and_padded_pieces() -> None:
    pieces = [base64.b64encode(encode_frame(b"a" * n)) for n in (1, 2, 3)]
    joined = b"".join(pieces)
    assert b"=" in joined[:-2]  # padding in the middle
    dec = Base64StreamDecoder()
    out = b"".join(dec.feed(joined[i : i + 3]) for i in range(0, len(joined), 3))
    dec.finish()
    assert parse_frames(out) == [(0, b"a"), (0, b"aa"), (0, b"aaa")]
    with pytest.raises(ValueError):
        decode_text(b"AAA")
    with pytest.raises(ValueError):
        decode_text(b"AB=C")


def test_trailers_and_messages() -> None:
    payload = encode_trailers(
        grpc.StatusCode.NOT_FOUND, "nö\r\n100%", [("x-a", "1"), ("x-b-bin", b"\x00")]
    )
    assert (
        payload == b"grpc-status:5\r\ngrpc-message:n%C3%B6%0D%0A100%25\r\nx-a:1\r\nx-b-bin:AA==\r\n"
    )
    fields = parse_trailers(payload)
    assert decode_grpc_message(fields["grpc-message"]) == "nö\r\n100%"
    assert encode_grpc_message("plain text ok") == "plain text ok"
    assert decode_grpc_message("bad %zz escape") == "bad %zz escape"


def test_grpc_timeout_codec() -> None:
    assert parse_grpc_timeout("5S") == 5.0
    assert parse_grpc_timeout("200m") == pytest.approx(0.2)
    assert parse_grpc_timeout("1H") == 3600.0
    assert parse_grpc_timeout("100u") == pytest.approx(1e-4)
    for bad in ("5s", "", "S", "123456789S", "-1S", "1.5S"):
        with pytest.raises(ValueError):
            parse_grpc_timeout(bad)
    assert format_grpc_timeout(0.2) == "200m"
    assert format_grpc_timeout(0.0001) == "1m"
    assert parse_grpc_timeout(format_grpc_timeout(10**6)) == 10**6


async def test_stream_grpc_timeout_is_enforced_by_the_server(servers: Servers) -> None:
    body = encode_frame(pb.SubscribeRequest(room="forever").SerializeToString())
    status, headers, data = await raw_post(
        servers, SUBSCRIBE, body, headers={"grpc-timeout": "300m"}
    )
    assert status == 200
    assert "grpc-status" not in headers  # messages went out first
    frames = parse_frames(data)
    assert [flag for flag, _ in frames] == [0, 0, 0, 0x80]
    assert parse_trailers(frames[-1][1]) == {
        "grpc-status": str(grpc.StatusCode.DEADLINE_EXCEEDED.value[0]),
        "grpc-message": "Deadline Exceeded",
    }


async def test_stream_disconnect_with_aiohttp_handler_cancellation() -> None:
    # With handler_cancellation=True aiohttp cancels the handler itself on a
    # disconnect; the servicer must see that the same way.
    servicer = FakeCaptions()
    servicer.stream_exit = asyncio.get_running_loop().create_future()
    app = web.Application()
    GrpcWebGateway(servicer, SERVICE).add_routes(app)
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        async with aiohttp.ClientSession() as session:
            req = pb.SubscribeRequest(room="forever")
            async with contextlib.aclosing(
                server_stream(session, url, SUBSCRIBE, req, pb.CaptionEvent)
            ) as events:
                async for _ in events:
                    break
            assert await asyncio.wait_for(servicer.stream_exit, 5) in {"cancelled", "closed"}
            for _ in range(50):
                if servicer.stream_done:
                    break
                await asyncio.sleep(0.02)
            assert servicer.stream_done == [(True, True)]
    finally:
        await runner.cleanup()
