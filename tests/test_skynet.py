"""The Jigasi-compatible (skynet streaming-whisper) WebSocket endpoint.

A real aiohttp server and a real WebSocket client that frames audio exactly
as Jigasi's ``WhisperWebsocket`` does: a 60-byte NUL-padded
``participantId|language`` header, then 16 kHz s16le mono PCM. The fast
tests run the rooms without the Whisper model (the audio is digital silence,
which never reaches it); the slow one sends real speech in real time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import jiwer
import numpy as np
import pytest
from aiohttp import WSMsgType, web
from prometheus_client import REGISTRY

from sidecar.audio import load_audio
from sidecar.engine import Engine
from sidecar.events import Caption
from sidecar.ingest.skynet import HEADER_BYTES, SkynetEndpoint, caption_reply
from tests.conftest import librivox, normalise

TOKEN = "jigasi-shared-secret"
PATH = "/streaming-whisper/ws"
CHUNK = 1600  # 100 ms at 16 kHz
RATE_LIMIT = 100  # messages a second in the fast server, so a flood is quick to make


def header(pid: str, language: str = "en-US") -> bytes:
    raw = f"{pid}|{language}".encode()
    assert len(raw) <= HEADER_BYTES
    return raw.ljust(HEADER_BYTES, b"\x00")


def s16le(pcm: np.ndarray) -> bytes:
    return (np.clip(pcm, -1.0, 1.0) * 32767).astype("<i2").tobytes()


SILENCE = bytes(2 * CHUNK)


def messages(outcome: str) -> float:
    return REGISTRY.get_sample_value("captions_skynet_messages_total", {"outcome": outcome}) or 0.0


@dataclass
class Server:
    engine: Engine
    endpoint: SkynetEndpoint
    base: str  # ws://127.0.0.1:PORT/streaming-whisper/ws
    http: aiohttp.ClientSession

    def url(self, meeting: str) -> str:
        return f"{self.base}/{meeting}"

    async def connect(
        self, meeting: str, token: str | None = TOKEN
    ) -> aiohttp.ClientWebSocketResponse:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        return await self.http.ws_connect(self.url(meeting), headers=headers, autoclose=False)


@contextlib.asynccontextmanager
async def serve(engine: Engine, max_messages_per_second: int = 5000) -> AsyncIterator[Server]:
    endpoint = SkynetEndpoint(
        engine.rooms, token=TOKEN, max_messages_per_second=max_messages_per_second
    )
    app = web.Application()
    endpoint.add_routes(app, PATH)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with aiohttp.ClientSession() as http:
            yield Server(engine, endpoint, f"ws://127.0.0.1:{port}{PATH}", http)
    finally:
        await endpoint.close()
        await runner.cleanup()


@pytest.fixture
async def fast(tmp_path: Path) -> AsyncIterator[Server]:
    engine = Engine(tmp_path)
    await engine.start(preload=False)
    async with serve(engine, max_messages_per_second=RATE_LIMIT) as server:
        yield server
    await engine.close()


async def until(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    """Wait for ``condition`` (the server finishes its side after the client's)."""
    for _ in range(int(seconds / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met in time")


async def next_close(ws: aiohttp.ClientWebSocketResponse) -> int | None:
    """Read until the server's close frame; returns its code."""
    async with asyncio.timeout(10):
        while True:
            msg = await ws.receive()
            if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.ERROR):
                await ws.close()
                return ws.close_code


async def converse(server: Server, meeting: str, pid: str = "ab12cd34") -> None:
    """A well-behaved Jigasi: a little audio, the end byte, then a clean close."""
    before = messages("audio")
    ws = await server.connect(meeting)
    for _ in range(3):
        await ws.send_bytes(header(pid) + SILENCE)
    await ws.send_bytes(b"\x00")
    assert await next_close(ws) == 1000
    assert messages("audio") - before == 3
    room = server.engine.rooms.get(meeting)
    assert not room.active  # the end byte switched captions and transcription off


def caption(pid: str, text: str, *, interim: bool, stability: float, message_id: str) -> Caption:
    now = int(time.time() * 1000)
    return Caption(
        room="r",
        participant_id=pid,
        participant_name=pid,
        message_id=message_id,
        text=text,
        is_interim=interim,
        stability=stability,
        language="en-US",
        start_time_ms=now - 1500,
        end_time_ms=now,
        timestamp_ms=now,
    )


# -- the reply format --------------------------------------------------------


def test_reply_is_what_jigasi_parses() -> None:
    mid = str(uuid.uuid4())
    final = json.loads(
        caption_reply(caption("p1", "hello", interim=False, stability=1, message_id=mid))
    )
    assert set(final) == {"id", "participant_id", "ts", "text", "type", "variance"}
    assert final["id"] == mid and final["type"] == "final" and final["participant_id"] == "p1"
    assert isinstance(final["ts"], int) and isinstance(final["variance"], float)
    assert final["variance"] == 1.0
    raw = caption_reply(caption("p1", "hel", interim=True, stability=0, message_id="not-a-uuid"))
    interim = json.loads(raw)
    assert '"variance":0.0' in raw  # a JSON float even when the value is whole
    assert interim["type"] == "interim"
    uuid.UUID(interim["id"])  # Jigasi calls UUID.fromString on it
    nan = json.loads(
        caption_reply(caption("p1", "x", interim=True, stability=float("nan"), message_id=mid))
    )
    assert nan["variance"] == 0.0


# -- connecting ----------------------------------------------------------------


async def test_wrong_or_missing_token_is_401_before_the_upgrade(fast: Server) -> None:
    meeting = str(uuid.uuid4())
    for token in ("wrong", None, ""):
        with pytest.raises(aiohttp.WSServerHandshakeError) as e:
            await fast.connect(meeting, token=token)
        assert e.value.status == 401
    async with fast.http.get(fast.url(meeting).replace("ws://", "http://")) as resp:
        assert resp.status == 401
        assert resp.content_type == "text/plain"
        assert "token" in await resp.text()
    assert meeting not in fast.engine.rooms.rooms  # nothing was started
    # the auth_token query parameter (what Jigasi sends) works too
    ws = await fast.http.ws_connect(fast.url(meeting) + f"?auth_token={TOKEN}")
    await ws.send_bytes(b"\x00")
    assert await next_close(ws) == 1000
    await converse(fast, str(uuid.uuid4()))


async def test_invalid_meeting_id_is_400(fast: Server) -> None:
    with pytest.raises(aiohttp.WSServerHandshakeError) as e:
        await fast.connect("bad%20room")
    assert e.value.status == 400


async def test_connect_starts_the_room_and_a_disconnect_keeps_it(fast: Server) -> None:
    meeting = str(uuid.uuid4())
    ws = await fast.connect(meeting)
    room = fast.engine.rooms.get(meeting)
    assert room.captioning and room.transcribing and len(room.sinks) == 1
    await ws.send_bytes(header("ab12cd34", "de-DE") + SILENCE)
    await ws.send_bytes(header("ab12cd34", "fr-FR") + SILENCE)  # only the first one counts
    await ws.close()  # no end byte: Jigasi may reconnect
    await until(lambda: room.sinks == [])  # our sink went with the socket
    assert room.active
    assert room.effective.language == "de-DE"
    # the reconnect reaches the same room and finishes it
    await converse(fast, meeting)
    meta = fast.engine.store.list(room=room.name)
    assert meta and meta[0].ended_at  # the transcript was closed and saved


async def test_bad_audio_is_dropped_and_counted(fast: Server) -> None:
    meeting = str(uuid.uuid4())
    ws = await fast.connect(meeting)
    odd, short, bad_pid = messages("odd_length"), messages("short"), messages("bad_participant")
    await ws.send_bytes(header("ab12cd34") + SILENCE + b"\x01")
    await ws.send_bytes(b"abc")
    await ws.send_bytes(header("no spaces allowed") + SILENCE)
    await ws.send_bytes(header("ab12cd34", "xx-nope") + SILENCE)  # kept; language ignored
    await ws.send_bytes(b"\x00")
    assert await next_close(ws) == 1000
    assert messages("odd_length") - odd == 1
    assert messages("short") - short == 1
    assert messages("bad_participant") - bad_pid == 1
    assert fast.engine.rooms.get(meeting).effective.language == "en-US"


async def test_captions_go_back_for_this_connections_participants_only(fast: Server) -> None:
    meeting = str(uuid.uuid4())
    ws = await fast.connect(meeting)
    await ws.send_bytes(header("ab12cd34") + SILENCE)
    room = fast.engine.rooms.get(meeting)
    await until(lambda: bool(room.speakers))
    mid = str(uuid.uuid4())
    published = [
        caption("someone-else", "not mine", interim=False, stability=1.0, message_id=mid),
        caption("ab12cd34", "hello", interim=True, stability=0.5, message_id=mid),
        caption("ab12cd34", "", interim=True, stability=0.0, message_id=mid),  # nothing to show
        caption("ab12cd34", "hello world", interim=False, stability=1.0, message_id=mid),
    ]
    for c in published:  # what the room does when it publishes
        for sink in list(room.sinks):
            sink(c)
    got: list[dict[str, object]] = []
    async with asyncio.timeout(5):
        while len(got) < 2:
            msg = await ws.receive()
            assert msg.type == WSMsgType.TEXT
            got.append(json.loads(msg.data))
    assert [(g["type"], g["text"], g["variance"]) for g in got] == [
        ("interim", "hello", 0.5),
        ("final", "hello world", 1.0),
    ]
    await ws.send_bytes(b"\x00")
    assert await next_close(ws) == 1000


# -- one bad connection, the others unharmed --------------------------------------


async def _bad_utf8(ws: aiohttp.ClientWebSocketResponse) -> None:
    await ws.send_bytes(b"\xff\xfe|en".ljust(HEADER_BYTES, b"\x00") + SILENCE)


async def _too_big(ws: aiohttp.ClientWebSocketResponse) -> None:
    await ws.send_bytes(header("ab12cd34") + bytes(1024 * 1024))


async def _flood(ws: aiohttp.ClientWebSocketResponse) -> None:
    for _ in range(3 * RATE_LIMIT):
        await ws.send_bytes(header("ab12cd34") + bytes(320))


async def _text(ws: aiohttp.ClientWebSocketResponse) -> None:
    await ws.send_str('{"event": "media"}')


@pytest.mark.parametrize(
    ("misbehave", "code", "outcome"),
    [
        (_bad_utf8, 1007, "bad_header"),
        (_too_big, 1009, "too_big"),
        (_flood, 1008, "rate_limited"),
        (_text, 1003, "text"),
    ],
    ids=["bad-utf8-1007", "1MB-1009", "flood-1008", "text-1003"],
)
async def test_a_bad_connection_is_closed_and_the_others_go_on(
    fast: Server,
    misbehave: Callable[[aiohttp.ClientWebSocketResponse], Awaitable[None]],
    code: int,
    outcome: str,
) -> None:
    good_meeting = str(uuid.uuid4())
    good = await fast.connect(good_meeting)
    await good.send_bytes(header("ab12cd34") + SILENCE)

    before = messages(outcome)
    bad = await fast.connect(str(uuid.uuid4()))
    # the server may hang up while a big message or a flood is still going out
    with contextlib.suppress(ConnectionError, aiohttp.ClientError):
        await misbehave(bad)
    assert await next_close(bad) == code
    assert messages(outcome) - before == 1

    # the connection that was open meanwhile still works, and so does a new one
    audio = messages("audio")
    await good.send_bytes(header("ab12cd34") + SILENCE)
    await good.send_bytes(b"\x00")
    assert await next_close(good) == 1000
    assert messages("audio") - audio == 1
    await converse(fast, str(uuid.uuid4()))
    await until(lambda: fast.endpoint.open_connections == 0)


# -- real speech --------------------------------------------------------------------


@pytest.mark.slow
async def test_two_participants_in_one_connection_get_their_captions(tmp_path: Path) -> None:
    corpus = dict((wav.name, (wav, text)) for wav, text in librivox())
    speakers = {
        # endpoint ids as Jigasi sends them: (utterance, first 100 ms tick,
        # seconds of silence after it). The first speaker pauses long enough
        # for a final of its own; the second is still talking when the end
        # byte comes, so its final is made by the end of the stream.
        "3f9a1c2e": (corpus["sense_and_sensibility_01_austen_64kb-0890.wav"], 0, 1.2),
        "7b4d0e91": (corpus["sense_and_sensibility_01_austen_64kb-0920.wav"], 15, 0.0),
    }
    engine = Engine(tmp_path)
    await engine.start()
    try:
        async with serve(engine) as server:
            meeting = str(uuid.uuid4())
            ws = await server.connect(meeting)
            replies: list[str] = []

            async def read() -> None:
                async for msg in ws:
                    if msg.type == WSMsgType.TEXT:
                        replies.append(msg.data)

            reader = asyncio.create_task(read())
            chunks: dict[str, list[bytes]] = {}
            for pid, ((wav, _), _, silence) in speakers.items():
                pcm = np.concatenate([load_audio(wav), np.zeros(int(silence * 16000), np.float32)])
                data = s16le(pcm)
                chunks[pid] = [data[i : i + 2 * CHUNK] for i in range(0, len(data), 2 * CHUNK)]
            ticks = max(start + len(chunks[pid]) for pid, (_, start, _) in speakers.items())
            t0 = time.monotonic()
            for tick in range(ticks):
                for pid, (_, start, _) in speakers.items():
                    i = tick - start
                    if 0 <= i < len(chunks[pid]):
                        await ws.send_bytes(header(pid, "en-US") + chunks[pid][i])
                await asyncio.sleep(max(0.0, t0 + (tick + 1) * 0.1 - time.monotonic()))
            # Jigasi: the last participant left
            await ws.send_bytes(b"\x00")
            await asyncio.wait_for(reader, 30)
            assert ws.close_code == 1000
            room = engine.rooms.get(meeting)
            assert not room.active

        parsed = [json.loads(raw) for raw in replies]
        for raw, r in zip(replies, parsed, strict=True):
            assert set(r) == {"id", "participant_id", "ts", "text", "type", "variance"}, raw
            assert isinstance(r["variance"], float), raw  # never a JSON integer
            assert 0.0 <= r["variance"] <= 1.0
            assert isinstance(r["ts"], int) and r["type"] in ("interim", "final")
            assert r["participant_id"] in speakers
            uuid.UUID(r["id"])

        for pid, ((_, reference), _, _) in speakers.items():
            mine = [r for r in parsed if r["participant_id"] == pid]
            final_ids = [r["id"] for r in mine if r["type"] == "final"]
            text = " ".join(r["text"] for r in mine if r["type"] == "final")
            wer = jiwer.wer(normalise(reference), normalise(text))
            interims = sum(r["type"] == "interim" for r in mine)
            print(f"\n{pid}: {text!r} WER {wer:.2f}, {interims} interims")
            assert wer < 0.3, (reference, text)
            # interims come first and share their final's id; none after it
            seen_final: set[str] = set()
            interim_before_final = False
            for r in mine:
                if r["type"] == "final":
                    seen_final.add(r["id"])
                else:
                    assert r["id"] not in seen_final, r
                    interim_before_final |= r["id"] in final_ids
            assert interim_before_final, mine

        # the end byte closed the transcript, both speakers in it
        metas = engine.store.list(room=meeting)
        assert len(metas) == 1 and metas[0].ended_at
        lines = [json.loads(x) for x in engine.store.get(metas[0].id).decode().splitlines()]
        assert {x["speaker_id"] for x in lines} == set(speakers)
    finally:
        await engine.close()


async def test_jigasi_asap_jwt_is_checked_against_its_public_key(fast: Server, tmp_path: Path):
    """Jigasi signs a short-lived RS256 JWT with a kid and sends it as ?auth_token=."""
    import hashlib as _hashlib
    import time as _time

    import jwt
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    keys = tmp_path / "asap"
    keys.mkdir()
    kid = "jitsi/jigasi"
    (keys / f"{_hashlib.sha256(kid.encode()).hexdigest()}.pem").write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    fast.endpoint.jwt_keys_dir = keys

    def token(signer, *, exp: float, aud: str = "jitsi", k: str = kid) -> str:  # type: ignore[no-untyped-def]
        now = int(_time.time())
        claims = {"iss": "jigasi", "aud": aud, "iat": now, "nbf": now, "exp": int(now + exp)}
        return jwt.encode(claims, signer, algorithm="RS256", headers={"kid": k})

    async def status(tok: str) -> int:
        try:
            ws = await fast.http.ws_connect(fast.url("jwt-room") + f"?auth_token={tok}")
        except aiohttp.WSServerHandshakeError as e:
            return e.status
        await ws.close()
        return 101

    assert await status(token(key, exp=300)) == 101
    assert await status(token(key, exp=-10)) == 401  # expired
    assert await status(token(other, exp=300)) == 401  # signed by someone else
    assert await status(token(key, exp=300, aud="elsewhere")) == 401
    assert await status(token(key, exp=300, k="unknown-kid")) == 401
    assert await status("not.a.jwt") == 401
