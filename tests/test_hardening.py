"""Defects found by attacking the sidecar from loopback (issue 12), one test each.

Each test is what an operator or a participant would notice, and each failed
on the code before its fix.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from prometheus_client import REGISTRY

from sidecar.engine import Engine
from sidecar.errors import Unavailable
from sidecar.events import Caption
from sidecar.proto.captions.v1 import captions_pb2 as pb
from sidecar.proto.captions.v1 import captions_pb2_grpc as pb_grpc
from sidecar.store.local import LocalDirStore
from tests.test_api import TOKEN, connect, running_sidecar

ROOM = "full@conference.example.com"


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# -- a real full filesystem --------------------------------------------------------


@contextlib.contextmanager
def small_filesystem(where: Path, size_kb: int = 256) -> Iterator[Path]:
    """A tmpfs of ``size_kb`` mounted at ``where`` (root only: skipped otherwise)."""
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_kb}k,mode=0755", "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(fs: Path) -> Path:
    """Write a file until the filesystem says ENOSPC; returns it (delete it to free space)."""
    filler = fs / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC
    return filler


def final(text: str, n: int) -> Caption:
    # longer than a page: a full tmpfs refuses it even when a file's last page has room
    text = " ".join([text] * 300)
    return Caption(
        room=ROOM,
        participant_id="alice",
        participant_name="Alice",
        avatar_url="",
        message_id=f"u{n}",
        text=text,
        is_interim=False,
        stability=1.0,
        language="en",
        start_time_ms=1_700_000_000_000 + n * 2000,
        end_time_ms=1_700_000_001_000 + n * 2000,
        timestamp_ms=1_700_000_001_500 + n * 2000,
    )


async def test_a_full_disk_leaves_captions_on_and_says_so(tmp_path: Path) -> None:
    with small_filesystem(tmp_path / "disk") as fs:
        engine = Engine(fs / "store")
        await engine.start(preload=False)
        try:
            fill(fs)
            before = metric("captions_transcript_store_errors_total", op="open")
            # what the videobridge handler does: each kind on its own
            with pytest.raises(Unavailable) as refused:
                await engine.rooms.start(ROOM, "transcription", requested_by="videobridge")
            assert "captions work without it" in str(refused.value)
            r = await engine.rooms.start(ROOM, "captions", requested_by="videobridge")
            assert r.captioning and not r.transcribing
            assert "ENOSPC" in r.transcript_error
            assert metric("captions_transcripts_failing") >= 1
            assert metric("captions_transcript_store_errors_total", op="open") == before + 1
            got: list[Caption] = []
            r.sinks.append(got.append)
            await engine.rooms._persist_and_publish(r, final("Captions without a disk.", 1))
            assert [c.message_id for c in got] == ["u1"]
            await engine.rooms.end_room(ROOM)
            assert ROOM not in engine.rooms.rooms
        finally:
            await engine.close()


async def test_a_disk_that_fills_during_a_meeting_loses_no_final(tmp_path: Path) -> None:
    with small_filesystem(tmp_path / "disk") as fs:
        engine = Engine(fs / "store")
        await engine.start(preload=False)
        try:
            r = await engine.rooms.start(ROOM, "transcription", requested_by="prosody")
            await engine.rooms.start(ROOM, "captions", requested_by="prosody")
            shown: list[Caption] = []
            r.sinks.append(shown.append)
            rooms = engine.rooms
            await rooms._persist_and_publish(r, final("One before the disk filled.", 1))
            filler = fill(fs)
            await rooms._persist_and_publish(r, final("Two while it is full.", 2))
            await rooms._persist_and_publish(r, final("Three while it is full.", 3))
            # the participants saw every caption; the status says the transcript fails
            assert [c.message_id for c in shown] == ["u1", "u2", "u3"]
            assert "ENOSPC" in r.transcript_error
            filler.unlink()  # the operator frees space
            await rooms._persist_and_publish(r, final("Four after space was freed.", 4))
            assert r.transcript_error == ""
            tid = r.transcript_id
            lines = engine.store.get(tid, "jsonl").decode().splitlines()
            assert [json.loads(x)["message_id"] for x in lines] == ["u1", "u2", "u3", "u4"]
            # full again when the meeting ends: the end works, nothing written is lost
            await rooms._persist_and_publish(r, final("Five, the disk full again.", 5))
            fill(fs)
            await rooms.end_room(ROOM)
            assert ROOM not in rooms.rooms
        finally:
            await engine.close()
        # the next start finishes what could not be finished, from what was on disk
        (fs / "filler").unlink()
        recovered = LocalDirStore(fs / "store").recover()
        assert [m.id for m in recovered] == [tid]
        assert recovered[0].entries == 5 and not recovered[0].complete
        txt = LocalDirStore(fs / "store").get(tid, "txt").decode()
        assert "Five, the disk full again." in txt


async def test_a_store_directory_that_is_gone_is_a_clear_status(tmp_path: Path) -> None:
    """Without root: the store's directory replaced by a file (ENOTDIR from the OS)."""
    engine = Engine(tmp_path / "store")
    await engine.start(preload=False)
    try:
        os.rmdir(tmp_path / "store")
        (tmp_path / "store").write_text("not a directory")
        with pytest.raises(Unavailable) as refused:
            await engine.rooms.start(ROOM, "transcription")
        assert "ENOTDIR" in str(refused.value)
        r = await engine.rooms.start(ROOM, "captions")
        assert r.captioning and r.transcript_error
    finally:
        await engine.close()


async def test_the_bridge_gets_captions_when_the_disk_is_full(tmp_path: Path) -> None:
    """The whole chain: the videobridge's socket stays open, the status tells the operator."""
    with small_filesystem(tmp_path / "disk") as fs:
        async with running_sidecar(fs, preload=False) as sc:
            fill(fs)
            url = f"http://127.0.0.1:{sc.ports.http}/mediajson/m-full?room={ROOM}"
            async with aiohttp.ClientSession() as session:
                ws = await session.ws_connect(url, headers={"Authorization": f"Bearer {TOKEN}"})
                await ws.send_str(json.dumps({"event": "ping", "id": 1}))
                pong = await asyncio.wait_for(ws.receive(), 10)
                assert pong.type == aiohttp.WSMsgType.TEXT, pong
                for transport in ("grpc", "grpc-web"):
                    async with connect(sc, transport) as api:
                        st = await api.status(ROOM)
                        assert st.captioning and not st.transcribing
                        assert "ENOSPC" in st.transcript_error
                        err = await api.error("StartTranscription", pb.StartRequest(room=ROOM))
                        assert err.code == grpc.StatusCode.UNAVAILABLE
                        assert "captions work without it" in err.details
                await ws.close()


# -- rooms nobody asked for hold no capacity ---------------------------------------


async def _bridge(session: aiohttp.ClientSession, base: str, meeting: str) -> Any:
    """A videobridge export socket for ``meeting``; None when the sidecar refused it."""
    ws = await session.ws_connect(
        f"{base}/mediajson/{meeting}", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    await ws.send_str(json.dumps({"event": "ping", "id": 1}))
    msg = await asyncio.wait_for(ws.receive(), 20)
    if msg.type == aiohttp.WSMsgType.TEXT:
        return ws
    await ws.close()
    return None


async def test_sockets_cycling_meeting_ids_never_lock_out_a_real_meeting(tmp_path: Path) -> None:
    async with running_sidecar(tmp_path, preload=False, CAPTIONS_LIMITS_MAX_ROOMS="10") as sc:
        rooms = sc.rooms
        assert rooms.reserved_rooms == 1
        base = f"http://127.0.0.1:{sc.ports.http}"
        async with aiohttp.ClientSession() as session:
            socks = await asyncio.gather(*(_bridge(session, base, f"m{i}") for i in range(30)))
            held = [ws for ws in socks if ws is not None]
            # ingest sockets alone fill all but the reserved place
            assert len(held) == 9
            async with connect(sc, "grpc") as api:
                for i in range(2):  # the reserved place, then one made by ending a silent room
                    st = await api(
                        "StartTranscription",
                        pb.StartRequest(room=f"real{i}@conference.x", requested_by="prosody"),
                    )
                    assert st.transcribing
                assert sum(1 for r in rooms.rooms.values() if r.active) == 10
                # the bridges go without session-end: their rooms go within seconds
                for ws in held:
                    await ws.close()
                deadline = asyncio.get_running_loop().time() + 30
                while any(r.provisional for r in rooms.rooms.values()):
                    assert asyncio.get_running_loop().time() < deadline, list(rooms.rooms)
                    await asyncio.sleep(0.2)
                assert sorted(rooms.rooms) == ["real0@conference.x", "real1@conference.x"]
                # and their transcripts were closed
                metas = await asyncio.to_thread(sc.store.list)
                assert all(m.ended_at for m in metas if m.room.startswith("m"))


async def test_subscriptions_to_unknown_rooms_hold_no_capacity(tmp_path: Path) -> None:
    async with running_sidecar(tmp_path, preload=False, CAPTIONS_LIMITS_MAX_ROOMS="10") as sc:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{sc.ports.grpc}")
        stub = pb_grpc.CaptionsStub(channel)
        md = (("authorization", f"Bearer {TOKEN}"),)
        calls = [
            stub.SubscribeCaptions(pb.SubscribeRequest(room=f"nobody{i}@conference.x"), metadata=md)
            for i in range(30)
        ]
        try:
            deadline = asyncio.get_running_loop().time() + 20
            while sum(len(r.subscribers) for r in sc.rooms.rooms.values()) < 30:
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.05)
            for i in range(10):
                st = await stub.StartCaptions(
                    pb.StartRequest(room=f"real{i}@conference.x"), metadata=md, timeout=10
                )
                assert st.captioning
        finally:
            for c in calls:
                c.cancel()
            await channel.close()


# -- clients without a token hold nothing -------------------------------------------

GRPCWEB_PATH = "/captions.v1.Captions/GetRoomStatus"


def _post_head(length: int, token: str | None) -> bytes:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return (
        f"POST {GRPCWEB_PATH} HTTP/1.1\r\nHost: sidecar\r\n"
        f"Content-Type: application/grpc-web+proto\r\n{auth}Content-Length: {length}\r\n\r\n"
    ).encode()


async def _closed_within(reader: asyncio.StreamReader, seconds: float) -> bytes:
    """Everything the server sent until it closed the connection."""
    async with asyncio.timeout(seconds):
        return await reader.read(-1)


async def test_half_sent_requests_are_cut_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sidecar.server.HEADER_TIMEOUT_S", 1.0)
    monkeypatch.setattr("sidecar.server.BODY_TIMEOUT_S", 1.0)
    async with running_sidecar(tmp_path, preload=False) as sc:
        port = sc.ports.http
        conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(40)]
        for i, (_, w) in enumerate(conns):
            if i % 2:
                w.write(b"POST /captions.v1.Captions/GetRoomStatus HTTP/1.1\r\nHost: x\r\n")
            else:  # headers with the token, then a body that never comes
                w.write(_post_head(1000, TOKEN) + b"\0\0\0")
            await w.drain()
        answers = await asyncio.gather(*(_closed_within(r, 20) for r, _ in conns))
        for i, data in enumerate(answers):
            if i % 2 == 0:
                assert b"grpc-status: 4" in data.lower()  # DEADLINE_EXCEEDED, said why
                assert b"did not arrive within" in data
        for _, w in conns:
            w.close()
        # the listener still serves
        async with connect(sc, "grpc-web") as api:
            assert (await api("ListRooms", pb.ListRoomsRequest())).rooms == []


async def test_a_wrong_token_is_refused_before_the_body(tmp_path: Path) -> None:
    async with running_sidecar(tmp_path, preload=False) as sc:
        for token in (None, "wrong"):
            r, w = await asyncio.open_connection("127.0.0.1", sc.ports.http)
            w.write(_post_head(4 * 1024 * 1024, token))  # announces 4 MB, sends none
            await w.drain()
            head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
            assert b"grpc-status: 16" in head.lower(), head  # UNAUTHENTICATED
            w.close()


async def test_a_client_leaving_mid_body_is_one_quiet_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with running_sidecar(tmp_path, preload=False) as sc:
        caplog.clear()
        for _ in range(5):
            r, w = await asyncio.open_connection("127.0.0.1", sc.ports.http)
            w.write(_post_head(1000, TOKEN) + b"\0" * 10)
            await w.drain()
            await asyncio.sleep(0.2)
            w.close()
        await asyncio.sleep(1.0)
        errors = [rec for rec in caplog.records if rec.levelname in ("ERROR", "CRITICAL")]
        assert errors == []
        left = [rec for rec in caplog.records if "left before its body" in rec.getMessage()]
        assert len(left) == 5


# -- errors never echo a whole value ------------------------------------------------

HUGE = 100_000


@pytest.mark.parametrize("transport", ["grpc", "grpc-web"])
@pytest.mark.parametrize(
    "settings",
    [
        pb.Settings(language="x" * HUGE),
        pb.Settings(provider="p" * HUGE),
        pb.Settings(language="é" * HUGE),  # percent-encoded, six bytes a character
        pb.Settings(translation_languages=["de-DE", "q" * HUGE]),
    ],
    ids=["language", "provider", "multibyte", "translation"],
)
async def test_a_huge_invalid_value_is_a_short_invalid_argument(
    tmp_path: Path, transport: str, settings: pb.Settings
) -> None:
    async with running_sidecar(tmp_path, preload=False) as sc, connect(sc, transport) as api:
        err = await api.error("StartCaptions", pb.StartRequest(room=ROOM, settings=settings))
        assert err.code == grpc.StatusCode.INVALID_ARGUMENT, err
        assert len(err.details) < 1200, len(err.details)
        assert f"({HUGE} characters)" in err.details


async def test_grpc_web_status_headers_stay_small(tmp_path: Path) -> None:
    """The raw answer: every header under a proxy's 8 KB."""
    async with running_sidecar(tmp_path, preload=False) as sc:
        body = pb.StartRequest(room=ROOM, settings=pb.Settings(language="€" * HUGE))
        payload = body.SerializeToString()
        frame = b"\0" + len(payload).to_bytes(4, "big") + payload
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{sc.ports.http}/captions.v1.Captions/StartCaptions"
            headers = {
                "Content-Type": "application/grpc-web+proto",
                "Authorization": f"Bearer {TOKEN}",
            }
            async with session.post(url, data=frame, headers=headers) as resp:
                assert resp.headers["grpc-status"] == "3"
                assert all(len(k) + len(v) < 4096 for k, v in resp.headers.items())
                assert len(await resp.read()) < 4096


# -- the smaller ones ---------------------------------------------------------------


@pytest.mark.parametrize("transport", ["grpc", "grpc-web"])
async def test_a_subscription_sends_its_headers_before_any_caption(
    tmp_path: Path, transport: str
) -> None:
    async with running_sidecar(tmp_path, preload=False) as sc:
        if transport == "grpc":
            async with grpc.aio.insecure_channel(f"127.0.0.1:{sc.ports.grpc}") as channel:
                call = pb_grpc.CaptionsStub(channel).SubscribeCaptions(
                    pb.SubscribeRequest(room=ROOM),
                    metadata=(("authorization", f"Bearer {TOKEN}"),),
                )
                await asyncio.wait_for(call.initial_metadata(), 10)
                call.cancel()
            return
        req = pb.SubscribeRequest(room=ROOM).SerializeToString()
        frame = b"\0" + len(req).to_bytes(4, "big") + req
        url = f"http://127.0.0.1:{sc.ports.http}/captions.v1.Captions/SubscribeCaptions"
        headers = {"Content-Type": "application/grpc-web+proto", "Authorization": f"Bearer {TOKEN}"}
        async with aiohttp.ClientSession() as session:
            resp = await asyncio.wait_for(session.post(url, data=frame, headers=headers), 10)
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("application/grpc-web")
            assert "grpc-status" not in resp.headers  # a live stream, not an error
            resp.close()


@pytest.mark.parametrize(
    "name",
    [
        "evil\u202eroom@conference.x",  # right-to-left override
        "a\u200bb@conference.x",  # zero-width space
        "a\u2066b\u2069@conference.x",  # isolates
        "a\ufeffb",  # byte order mark
        "a\u00adb",  # soft hyphen
        "a\ue000b",  # private use
    ],
)
async def test_room_names_with_invisible_characters_are_refused(tmp_path: Path, name: str) -> None:
    async with running_sidecar(tmp_path, preload=False) as sc:
        for transport in ("grpc", "grpc-web"):
            async with connect(sc, transport) as api:
                err = await api.error("StartCaptions", pb.StartRequest(room=name))
                assert err.code == grpc.StatusCode.INVALID_ARGUMENT
                assert err.details.startswith("room: ")
        assert sc.rooms.rooms == {}


async def test_translation_languages_are_capped(tmp_path: Path) -> None:
    langs = ["de-DE", "fr-FR", "es-ES", "it", "nl-NL", "pt-PT", "pl", "sv", "da", "fi", "ja"]
    async with running_sidecar(tmp_path, preload=False) as sc, connect(sc, "grpc") as api:
        ok = await api(
            "UpdateSettings",
            pb.UpdateSettingsRequest(
                room=ROOM, settings=pb.Settings(translation_languages=langs[:10])
            ),
        )
        assert len(ok.effective.translation_languages) == 10
        err = await api.error(
            "UpdateSettings",
            pb.UpdateSettingsRequest(room=ROOM, settings=pb.Settings(translation_languages=langs)),
        )
        assert err.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "at most 10" in err.details
        err = await api.error(
            "UpdateSettings",
            pb.UpdateSettingsRequest(
                room=ROOM, settings=pb.Settings(translation_languages=["de-DE"] * 10_000)
            ),
        )
        assert "at most 10" in err.details


async def test_a_roster_cannot_take_another_rooms_ssrc(tmp_path: Path) -> None:
    async with running_sidecar(tmp_path, preload=False) as sc, connect(sc, "grpc") as api:
        a, b = "a@conference.x", "b@conference.x"
        await api(
            "UpdateRoster",
            pb.UpdateRosterRequest(room=a, participants=[pb.Participant(id="alice", ssrcs=[1234])]),
        )
        err = await api.error(
            "UpdateRoster",
            pb.UpdateRosterRequest(
                room=b,
                participants=[
                    pb.Participant(id="bob", ssrcs=[77]),
                    pb.Participant(id="mallory", ssrcs=[1234]),
                ],
            ),
        )
        assert err.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "SSRC 1234" in err.details and a not in err.details
        assert sc.rooms.ssrcs[1234] == (a, "alice")
        assert 77 not in sc.rooms.ssrcs  # nothing of the refused update was applied
        # within its own room a newer mapping replaces the older (a rejoin)
        await api(
            "UpdateRoster",
            pb.UpdateRosterRequest(
                room=a, participants=[pb.Participant(id="alice2", ssrcs=[1234])]
            ),
        )
        assert sc.rooms.ssrcs[1234] == (a, "alice2")
        # once room a has ended, its SSRCs are free
        await api("EndRoom", pb.RoomRequest(room=a))
        await api(
            "UpdateRoster",
            pb.UpdateRosterRequest(room=b, participants=[pb.Participant(id="bob", ssrcs=[1234])]),
        )
        assert sc.rooms.ssrcs[1234] == (b, "bob")


async def test_a_skynet_header_cut_inside_a_character_is_read(tmp_path: Path) -> None:
    from tests.test_skynet import HEADER_BYTES, SILENCE, serve

    engine = Engine(tmp_path)
    await engine.start(preload=False)
    try:
        async with serve(engine) as server:
            ws = await server.connect("cut-header")
            head = b"ab12cd34|de-DE" + b" " * (HEADER_BYTES - 15) + "é".encode()[:1]
            assert len(head) == HEADER_BYTES
            await ws.send_bytes(head + SILENCE)
            room = engine.rooms.get("cut-header")
            for _ in range(500):
                if room.speakers:
                    break
                await asyncio.sleep(0.01)
            assert "ab12cd34" in room.speakers and not ws.closed
            assert room.effective.language == "de-DE"
            await ws.close()
    finally:
        await engine.close()


async def test_rtp_kernel_drops_are_exported(tmp_path: Path) -> None:
    """A burst while the event loop is stalled: what the kernel dropped is a metric,
    and sent = counted + dropped."""
    import socket
    import time

    from sidecar.ingest.rtp import RtpIngest

    engine = Engine(tmp_path)
    await engine.start(preload=False)
    ingest = RtpIngest(engine.rooms)
    port = await ingest.start("127.0.0.1", 0)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        if os.geteuid() == 0:  # SO_RCVBUFFORCE: past net.core.rmem_max
            assert ingest.receive_buffer_bytes >= 16 << 20
        assert metric("captions_rtp_receive_buffer_bytes") == ingest.receive_buffer_bytes

        def counted() -> float:
            return sum(
                metric("captions_rtp_packets_total", outcome=o)
                for o in ("unknown_ssrc", "accepted", "rejected")
            )

        before, drops = counted(), metric("captions_rtp_socket_drops")
        # more than any receive buffer holds, sent while the loop cannot read
        sent = 0
        packet = bytes([0x80, 111]) + bytes(10) + b"\xf8" + bytes(1200)
        t0 = time.monotonic()
        while sent < 60_000 and time.monotonic() - t0 < 30:
            sender.sendto(packet, ("127.0.0.1", port))
            sent += 1
        for _ in range(300):
            await asyncio.sleep(0.05)
            got = counted() - before
            lost = metric("captions_rtp_socket_drops") - drops
            if got + lost >= sent:
                break
        assert lost > 0  # the burst overflowed, and the metric says by how much
        assert got + lost == sent
    finally:
        sender.close()
        ingest.close()
        await engine.close()


# -- crashes the fuzzers found (tests/test_fuzz.py, make fuzz) -------------------------


async def test_a_media_message_with_a_list_for_a_tag_is_no_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_sidecar(tmp_path, preload=False) as sc, aiohttp.ClientSession() as s:
        ws = await _bridge(s, f"http://127.0.0.1:{sc.ports.http}", "m-fuzz")
        assert ws is not None
        caplog.clear()
        for tag in ([], {}, [1, 2]):
            await ws.send_str(json.dumps({"event": "media", "media": {"tag": tag}}))
        await ws.send_str(json.dumps({"event": "ping", "id": 2}))
        pong = await asyncio.wait_for(ws.receive(), 10)
        assert json.loads(pong.data) == {"event": "pong", "id": 2}
        assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
        await ws.close()


def test_a_status_message_keeps_its_edge_spaces() -> None:
    from sidecar.api.grpcweb import decode_grpc_message, encode_trailers, parse_trailers

    for message in (" ", "  x ", "\u00e9 "):
        trailers = parse_trailers(encode_trailers(grpc.StatusCode.INTERNAL, message))
        assert decode_grpc_message(trailers["grpc-message"]) == message
