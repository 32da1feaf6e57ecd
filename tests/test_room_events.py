"""The rooms publish typed events; the outputs are subscribers (no Whisper needed here)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from sidecar.config import load_config
from sidecar.engine import Engine
from sidecar.events import Caption, Frame
from sidecar.outputs.links import LinkCheck, LinkSigner
from sidecar.room_events import (
    CaptionPublished,
    EventBus,
    RoomEnded,
    RoomEvent,
    SessionFailed,
    SessionStarted,
    SessionStopped,
    SubscriberLagged,
    TranscriptReady,
)
from sidecar.server import Sidecar
from tests.prosody import DOMAIN, HIDDEN, make_prosody
from tests.test_xmpp import ROOM as MUC_ROOM
from tests.test_xmpp import Participant_, wait_for

ROOM = "weekly@conference.example.org"
KEY = b"L" * 40


def caption(room: str, text: str, interim: bool = False, mid: str = "m1") -> Caption:
    return Caption(room, "a1b2c3d4", "Alice", mid, text, interim, 0.9, "en", 0, 1000, 1100)


@pytest.fixture
async def engine(tmp_path: Path):  # type: ignore[no-untyped-def]
    e = Engine(tmp_path / "store")
    await e.start(preload=False)
    yield e
    await e.close()


def recorder(bus: EventBus) -> list[RoomEvent]:
    got: list[RoomEvent] = []
    bus.add_listener("test", got.append)
    return got


async def test_a_room_s_life_is_published_with_reasons_and_the_ready_link(engine: Engine) -> None:
    rooms = engine.rooms
    signer = LinkSigner(KEY)
    rooms.transcript_link = signer.url
    got = recorder(rooms.events)
    await rooms.start(ROOM, "transcription", requested_by="prosody", meeting_id="m-1")
    await rooms.start(ROOM, "captions", requested_by="prosody")
    await rooms.start(ROOM, "captions", requested_by="prosody")  # idempotent: no new event
    r = rooms.get(ROOM)
    tid = r.transcript_id
    rooms._publish(r, caption(r.name, "hello there"))
    await rooms.stop(ROOM, "captions", reason="user")
    await rooms.stop(ROOM, "transcription", reason="source_ended")
    await rooms.start(ROOM, "captions")
    await rooms.end_room(ROOM)

    kinds = [(type(e).__name__, e.type) for e in got]
    assert kinds == [
        ("SessionStarted", "transcription.started"),
        ("SessionStarted", "captions.started"),
        ("CaptionPublished", "caption.final"),
        ("SessionStopped", "captions.stopped"),
        ("TranscriptReady", "transcription.ready"),
        ("SessionStopped", "transcription.stopped"),
        ("SessionStarted", "captions.started"),
        ("SessionStopped", "captions.stopped"),
        ("RoomEnded", "room.ended"),
    ]
    started = got[0]
    assert isinstance(started, SessionStarted)
    assert (started.transcript_id, started.requested_by, started.meeting_id) == (
        tid,
        "prosody",
        "m-1",
    )
    assert isinstance(got[2], CaptionPublished) and got[2].transcript_id == tid
    stops = [e for e in got if isinstance(e, SessionStopped)]
    assert [s.reason for s in stops] == ["user", "source_ended", "room_ended"]
    assert stops[1].transcript_id == tid
    ready = next(e for e in got if isinstance(e, TranscriptReady))
    assert ready.meta.id == tid and ready.meta.complete and "jsonl" in ready.meta.formats
    q = dict(p.split("=", 1) for p in ready.url.split("?", 1)[1].split("&"))
    assert signer.check(tid, q["exp"], q["sig"]) is LinkCheck.OK
    assert all(e.room == ROOM for e in got)
    assert len({e.id for e in got}) == len(got)  # every event its own id


async def test_shutdown_and_idle_rooms_say_why_they_stopped(engine: Engine) -> None:
    rooms = engine.rooms
    got = recorder(rooms.events)
    await rooms.start("a@conference.x", "transcription")
    await rooms.start("b@conference.x", "captions", requested_by="videobridge")
    await rooms._end_quietly("b@conference.x", reason="idle")
    await rooms.close()
    reasons = {(e.room, e.reason) for e in got if isinstance(e, SessionStopped)}
    assert reasons == {("a@conference.x", "shutdown"), ("b@conference.x", "idle")}
    assert {e.room for e in got if isinstance(e, RoomEnded)} == {"a@conference.x", "b@conference.x"}


async def test_a_transcript_that_cannot_be_written_fails_once(engine: Engine) -> None:
    rooms = engine.rooms
    got = recorder(rooms.events)
    r = await rooms.start(ROOM, "transcription")

    def broken(entry: object) -> None:
        raise OSError(28, "No space left on device")

    assert r.writer is not None
    r.writer.append = broken  # type: ignore[method-assign]
    for i in range(3):
        await rooms._persist_and_publish(r, caption(r.name, f"words {i}", mid=f"m{i}"))
    failed = [e for e in got if isinstance(e, SessionFailed)]
    assert len(failed) == 1
    assert (failed[0].type, failed[0].cause) == ("transcription.failed", "store_write")
    assert "No space left" in failed[0].message
    # the captions still went out
    assert sum(isinstance(e, CaptionPublished) for e in got) == 3


async def test_grpc_style_subscribers_are_fed_from_the_events(engine: Engine) -> None:
    rooms = engine.rooms
    await rooms.start(ROOM, "captions")
    sub = rooms.subscribe(ROOM, include_interims=False)
    rooms.events.publish(CaptionPublished(room=ROOM, caption=caption(ROOM, "from the bus")))
    rooms.events.publish(
        CaptionPublished(room=ROOM, caption=caption(ROOM, "interim", interim=True))
    )
    rooms.events.publish(CaptionPublished(room="other@x", caption=caption("other@x", "no")))
    await rooms.end_room(ROOM)
    assert [c.text async for c in sub] == ["from the bus"]


async def test_ingest_sessions_count_connections_and_carry_frames(engine: Engine) -> None:
    rooms = engine.rooms
    await rooms.start(ROOM, "captions", requested_by="videobridge")
    with rooms.open_session(ROOM, "videobridge") as session:
        assert rooms.get(ROOM).ingest_connections == 1
        assert session.started_by_this_source and session.active
        assert session.push("a1b2c3d4", Frame(b"\xf8\xff\xfe", 0, 0)) is True
        assert "a1b2c3d4" in rooms.get(ROOM).speakers
        await session.finish_speaker("a1b2c3d4")
        assert "a1b2c3d4" not in rooms.get(ROOM).speakers
    assert rooms.get(ROOM).ingest_connections == 0
    session.close()  # twice: harmless
    assert rooms.get(ROOM).ingest_connections == 0
    assert session.push("a1b2c3d4", Frame(b"\xf8\xff\xfe", 1, 960)) is False


async def test_a_subscriber_that_stops_reading_is_cut_off_not_grown() -> None:
    bus = EventBus()
    slow = bus.subscribe("slow", maxsize=3)
    for i in range(2):
        bus.publish(CaptionPublished(room=ROOM, caption=caption(ROOM, f"i{i}", interim=True)))
    bus.publish(CaptionPublished(room=ROOM, caption=caption(ROOM, "final")))
    # full: a new interim is dropped, a lifecycle event evicts the oldest interim
    bus.publish(CaptionPublished(room=ROOM, caption=caption(ROOM, "i2", interim=True)))
    bus.publish(SessionStarted(room=ROOM, kind="captions"))
    queued = [slow.get_nowait() for _ in range(3)]
    assert [e.type for e in queued] == ["caption.interim", "caption.final", "captions.started"]
    assert [e.caption.text for e in queued[:2] if isinstance(e, CaptionPublished)] == [
        "i1",
        "final",
    ]
    for _ in range(3):
        bus.publish(SessionStarted(room=ROOM, kind="captions"))
    bus.publish(RoomEnded(room=ROOM))  # nothing but lifecycle events queued: cut off
    assert slow.lagged and slow.closed
    for _ in range(3):
        await slow.get()
    with pytest.raises(SubscriberLagged):
        await slow.get()
    assert bus.subscribers == 0


async def test_the_transcriber_posts_the_signed_link_at_start_and_when_ready(
    tmp_path: Path,
) -> None:
    prosody = make_prosody(tmp_path)
    prosody.start()
    prosody.register("transcriber", HIDDEN, "tsecret")
    prosody.register("alice", DOMAIN, "asecret")
    room = MUC_ROOM
    cfg = load_config(
        None,
        env={
            "CAPTIONS_SERVER_TOKEN": "t" * 24,
            "CAPTIONS_SERVER_GRPC_LISTEN": "127.0.0.1:0",
            "CAPTIONS_SERVER_HTTP_LISTEN": "127.0.0.1:0",
            "CAPTIONS_STORE_STORE_DIR": str(tmp_path / "store"),
            "CAPTIONS_XMPP_ENABLED": "true",
            "CAPTIONS_XMPP_JID": f"transcriber@{HIDDEN}",
            "CAPTIONS_XMPP_PASSWORD": "tsecret",
            "CAPTIONS_XMPP_HOST": "127.0.0.1",
            "CAPTIONS_XMPP_PORT": str(prosody.port),
            "CAPTIONS_XMPP_STARTTLS": "false",
            "CAPTIONS_LINKS_KEY": KEY.decode(),
            "CAPTIONS_LINKS_PUBLIC_URL": "https://meet.example.org/captions",
        },
    )
    sidecar = Sidecar(cfg)
    alice = Participant_(f"alice@{DOMAIN}", "asecret", "a1b2c3d4", "Alice")
    try:
        await sidecar.start(preload=False)
        alice.connect("127.0.0.1", prosody.port)
        await asyncio.wait_for(alice.online.wait(), 10)
        await wait_for(
            lambda: any(
                k == "presence" and el.get("from") == f"{room}/a1b2c3d4"
                for _, k, el in alice.events
            )
        )
        await sidecar.rooms.start(room, "transcription")
        tid = sidecar.rooms.get(room).transcript_id

        def bodies() -> list[str]:
            out = []
            for _, kind, el in alice.events:
                b = el.find("{jabber:client}body") if kind == "message" else None
                if b is not None and b.text:
                    out.append(b.text)
            return out

        await wait_for(lambda: any(tid in b for b in bodies()))
        (start,) = [b for b in bodies() if tid in b]
        assert start.startswith(
            f"This meeting is being transcribed. The transcript: "
            f"https://meet.example.org/captions/t/{tid}?exp="
        )
        await sidecar.rooms.stop(room, "transcription")
        await wait_for(
            lambda: any(b.startswith("The transcript of this meeting is ready") for b in bodies())
        )
        ready = [b for b in bodies() if b.startswith("The transcript of this meeting is ready")]
        assert len(ready) == 1
        url = ready[0].split(": ", 1)[1]
        q = dict(p.split("=", 1) for p in url.split("?", 1)[1].split("&"))
        assert sidecar.outputs.signer is not None
        assert sidecar.outputs.signer.check(tid, q["exp"], q["sig"]) is LinkCheck.OK
        # the link opens the page on the sidecar's own listener
        import aiohttp

        local = url.replace(
            "https://meet.example.org/captions", f"http://127.0.0.1:{sidecar.ports.http}"
        )
        async with aiohttp.ClientSession() as http, http.get(local) as resp:
            assert resp.status == 200
            assert "Transcript" in await resp.text()
    finally:
        alice.disconnect()
        await sidecar.stop()
        prosody.stop()


async def test_the_videobridge_ending_its_session_stops_with_source_ended(tmp_path: Path) -> None:
    import aiohttp

    token = "bridge-token-0123456789"
    cfg = load_config(
        None,
        env={
            "CAPTIONS_SERVER_TOKEN": token,
            "CAPTIONS_SERVER_GRPC_LISTEN": "127.0.0.1:0",
            "CAPTIONS_SERVER_HTTP_LISTEN": "127.0.0.1:0",
            "CAPTIONS_STORE_STORE_DIR": str(tmp_path / "store"),
        },
    )
    sidecar = Sidecar(cfg)
    got = recorder(sidecar.events)
    await sidecar.start(preload=False)
    url = f"http://127.0.0.1:{sidecar.ports.http}/mediajson/meet-1?room={ROOM}"
    try:
        async with (
            aiohttp.ClientSession() as http,
            http.ws_connect(url, headers={"Authorization": f"Bearer {token}"}) as ws,
        ):
            await wait_for(lambda: sum(isinstance(e, SessionStarted) for e in got) == 2)
            assert sidecar.rooms.get(ROOM).ingest_connections == 1
            await ws.send_json({"event": "session-end"})
            await wait_for(lambda: sum(isinstance(e, SessionStopped) for e in got) == 2)
        await wait_for(
            lambda: (
                sidecar.rooms.rooms.get(ROOM) is None
                or (sidecar.rooms.get(ROOM).ingest_connections == 0)
            )
        )
    finally:
        await sidecar.stop()
    stops = [e for e in got if isinstance(e, SessionStopped)]
    assert {(s.kind, s.reason) for s in stops[:2]} == {
        ("captions", "source_ended"),
        ("transcription", "source_ended"),
    }
    assert all(isinstance(e, SessionStarted) and e.requested_by == "videobridge" for e in got[:2])
