"""The videobridge media export, spoken to as jitsi-videobridge does.

A real WebSocket client plays the bridge (jitsi-protocol.md 4b): ``info``,
``start`` per source with the endpoint id, ``media`` with base64 Opus and
string numbers, pings; it drops the socket in the middle of an utterance and
reconnects, re-sending ``start`` with a restarted message counter but the
same RTP sequence numbers, as the bridge does.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
import uuid
from pathlib import Path

import aiohttp
import jiwer
import numpy as np
import pytest
from prometheus_client import REGISTRY

from sidecar.audio import OpusEncoder, load_audio
from sidecar.config import load_config
from sidecar.rooms import Participant
from sidecar.server import Sidecar
from tests.conftest import librivox, normalise

TOKEN = "bridge-secret"


def make_sidecar(tmp_path: Path) -> Sidecar:
    cfg = load_config(
        None,
        env={
            "CAPTIONS_SERVER_TOKEN": TOKEN,
            "CAPTIONS_SERVER_GRPC_LISTEN": "127.0.0.1:0",
            "CAPTIONS_SERVER_HTTP_LISTEN": "127.0.0.1:0",
            "CAPTIONS_STORE_STORE_DIR": str(tmp_path / "store"),
            "CAPTIONS_INGEST_MAX_MESSAGES_PER_SECOND": "2000",
        },
    )
    return Sidecar(cfg)


class Bridge:
    """What jitsi-videobridge's Exporter sends, message by message."""

    def __init__(self, session: aiohttp.ClientSession, url: str) -> None:
        self.session = session
        self.url = url
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.seq = 0
        self.replies: list[tuple[float, dict]] = []
        self.raw: list[str] = []
        self.pongs: list[int] = []
        self.reader: asyncio.Task | None = None

    async def connect(self, token: str = TOKEN) -> None:
        self.ws = await self.session.ws_connect(
            self.url, headers={"Authorization": f"Bearer {token}"}
        )
        self.seq = 0
        self.reader = asyncio.create_task(self._read(self.ws))
        await self.send({"event": "info", "application": "jitsi-videobridge", "version": "2.3"})

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                data = json.loads(msg.data)
                if data.get("event") == "pong":
                    self.pongs.append(data["id"])
                else:
                    self.raw.append(msg.data)
                    self.replies.append((time.monotonic(), data))

    async def send(self, obj: dict) -> None:
        assert self.ws is not None
        await self.ws.send_str(json.dumps(obj))

    async def start(self, endpoint: str) -> None:
        self.seq += 1
        await self.send(
            {
                "event": "start",
                "sequenceNumber": str(self.seq),
                "start": {
                    "tag": f"{endpoint}-a0",
                    "mediaFormat": {"encoding": "opus", "sampleRate": 48000, "channels": 2},
                    "customParameters": {"endpointId": endpoint},
                },
            }
        )

    async def media(self, endpoint: str, chunk: int, packet: bytes, level: int, vad: bool) -> None:
        self.seq += 1
        await self.send(
            {
                "event": "media",
                "sequenceNumber": str(self.seq),
                "media": {
                    "tag": f"{endpoint}-a0",
                    "chunk": str(chunk),
                    "timestamp": str(chunk * 960),
                    "payload": base64.b64encode(packet).decode(),
                    "audioLevel": level,
                    "vad": vad,
                },
            }
        )

    async def drop(self) -> None:
        assert self.ws is not None
        await self.ws.close()
        if self.reader:
            await self.reader


def level_of(pcm: np.ndarray) -> tuple[int, bool]:
    rms = float(np.sqrt(np.mean(pcm**2))) + 1e-9
    dbov = int(min(127, max(0, -20 * np.log10(rms))))
    return dbov, dbov < 50


@pytest.mark.slow
async def test_bridge_session_with_pings_and_a_reconnect_mid_utterance(tmp_path):
    corpus = librivox()
    sidecar = make_sidecar(tmp_path)
    await sidecar.start()
    room = "standup@conference.example.org"
    meeting = str(uuid.uuid4())
    await sidecar.rooms.update_roster(
        room, [Participant("a1b2c3d4", "Alice"), Participant("e5f6a7b8", "Bob")]
    )
    # two speakers: Alice reads utterance 0 then 2, Bob 1 after a pause
    sr = 16000
    silence = np.zeros(sr, np.float32)
    alice_pcm = np.concatenate(
        [
            silence,
            load_audio(corpus[0][0]),
            silence * 0,
            silence,
            load_audio(corpus[2][0]),
            silence,
            silence,
        ]
    )
    bob_pcm = np.concatenate([np.zeros(3 * sr, np.float32), load_audio(corpus[1][0])])
    bob_pcm = np.concatenate([bob_pcm, np.zeros(len(alice_pcm) - len(bob_pcm), np.float32)])
    tracks = {"a1b2c3d4": alice_pcm, "e5f6a7b8": bob_pcm}
    packets = {ep: OpusEncoder().encode(pcm) for ep, pcm in tracks.items()}
    n = min(len(p) for p in packets.values())
    # drop the socket 2.5 s into Alice's first utterance
    cut = int((1.0 + 2.5) / 0.02)

    url = f"http://127.0.0.1:{sidecar.ports.http}/mediajson/{meeting}?room={room}"
    async with aiohttp.ClientSession() as session:
        bridge = Bridge(session, url)
        await bridge.connect()
        for ep in tracks:
            await bridge.start(ep)
        t0 = time.monotonic()
        for i in range(n):
            if i == cut:
                await bridge.drop()
                first_socket = list(bridge.replies)
                await bridge.connect()
                for ep in tracks:
                    await bridge.start(ep)
            if i % 250 == 100:
                await bridge.send({"event": "ping", "id": i})
            for ep, pk in packets.items():
                frame_pcm = tracks[ep][i * 320 : (i + 1) * 320]
                lvl, vad = level_of(frame_pcm)
                await bridge.media(ep, 1000 + i, pk[i], lvl, vad)
            await asyncio.sleep(max(0.0, t0 + (i + 1) * 0.02 - time.monotonic()))
        await asyncio.sleep(1.5)
        status = sidecar.rooms.get(room)
        tid = status.transcript_id
        await bridge.send({"event": "session-end"})
        await asyncio.wait_for(bridge.reader, 10)
        assert bridge.ws is not None and bridge.ws.close_code == 1000
    await sidecar.stop()

    # pings answered with the same id
    assert bridge.pongs == [i for i in range(n) if i % 250 == 100]
    # every reply is the JSON of jitsi-protocol.md section 3, field by field
    for raw in bridge.raw:
        msg = json.loads(raw)
        assert msg["type"] == "transcription-result"
        assert msg["event"] == "transcription-result"
        assert isinstance(msg["timestamp"], int) and msg["timestamp"] > 1.7e12
        assert set(msg["participant"]) >= {"id", "name"}
        assert msg["participant"]["id"] in tracks
        assert (
            msg["participant"]["name"]
            == {"a1b2c3d4": "Alice", "e5f6a7b8": "Bob"}[msg["participant"]["id"]]
        )
        assert isinstance(msg["transcript"], list) and isinstance(msg["transcript"][0]["text"], str)
        assert isinstance(msg["transcript"][0]["confidence"], float)
        assert msg["language"] == "en-US"
        assert isinstance(msg["is_interim"], bool)
        assert re.fullmatch(r"[0-9a-f-]{36}", msg["message_id"])
        assert 0.0 <= msg["stability"] <= 1.0
    finals = [m for _, m in bridge.replies if not m["is_interim"] and m["transcript"][0]["text"]]
    # one final per utterance, none twice, each to its speaker, none lost in the reconnect
    assert len({m["message_id"] for m in finals}) == len(finals) == 3
    texts = {(m["participant"]["name"], normalise(m["transcript"][0]["text"])) for m in finals}
    alice = [t for name, t in texts if name == "Alice"]
    bob = [t for name, t in texts if name == "Bob"]
    assert len(alice) == 2 and len(bob) == 1
    refs = {normalise(corpus[k][1]) for k in (0, 2)}
    for t in alice:
        assert min(jiwer.wer(ref, t) for ref in refs) < 0.3, t
    assert jiwer.wer(normalise(corpus[1][1]), bob[0]) < 0.3
    # the utterance cut by the reconnect went on: its interims span both sockets
    cut_id = next(
        m["message_id"]
        for m in finals
        if jiwer.wer(normalise(corpus[0][1]), normalise(m["transcript"][0]["text"])) < 0.3
    )
    assert any(m["message_id"] == cut_id for _, m in first_socket)
    # one transcript for the whole meeting, with the three finals
    lines = sidecar.store.get(tid, "jsonl").decode().splitlines()
    assert len(lines) == 3
    assert len(sidecar.store.list()) == 1


async def test_bad_bridges_are_cut_and_others_go_on(tmp_path):
    sidecar = make_sidecar(tmp_path)
    await sidecar.start(preload=False)
    base = f"http://127.0.0.1:{sidecar.ports.http}/mediajson"

    def count(outcome: str) -> float:
        return (
            REGISTRY.get_sample_value("captions_mediajson_messages_total", {"outcome": outcome})
            or 0.0
        )

    async with aiohttp.ClientSession() as session:
        # wrong token: refused before the upgrade
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await session.ws_connect(f"{base}/m1", headers={"Authorization": "Bearer nope"})
        assert info.value.status == 401

        good = Bridge(session, f"{base}/good-meeting?room=good@conference.test")
        await good.connect()
        await good.start("ep000001")

        async def expect_close(first: str | bytes, code: int, meeting: str) -> None:
            ws = await session.ws_connect(
                f"{base}/{meeting}", headers={"Authorization": f"Bearer {TOKEN}"}
            )
            if isinstance(first, bytes):
                await ws.send_bytes(first)
            else:
                await ws.send_str(first)
            msg = await ws.receive(timeout=5)
            assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED), msg
            assert ws.close_code == code, (first[:40], ws.close_code)
            await ws.close()

        await expect_close("{not json", 1007, "m2")
        # (an unknown event is counted and ignored: tests/test_mediajson_compat.py)
        await expect_close("[1, 2, 3]", 1007, "m4")
        await expect_close(b"\x00\x01", 1003, "m5")
        await expect_close(json.dumps({"event": "info", "pad": "x" * (1 << 20)}), 1009, "m6")

        # base64 that is not Opus, and not base64 at all: counted, connection lives
        before_bad = count("bad_media")
        await good.send(
            {
                "event": "media",
                "media": {"tag": "ep000001-a0", "chunk": "1", "timestamp": "0", "payload": "%%%"},
            }
        )
        await good.media("ep000001", 2, b"\xff\x00garbage-not-opus", 30, True)
        await good.send(
            {
                "event": "media",
                "media": {"tag": "nobody-a0", "chunk": "3", "timestamp": "0", "payload": "AAAA"},
            }
        )
        await good.send({"event": "ping", "id": 7})
        await asyncio.sleep(0.3)
        assert good.pongs == [7]
        assert count("bad_media") == before_bad + 1
        assert count("unknown_source") >= 1

        # a flood is cut with a policy close
        ws = await session.ws_connect(f"{base}/m7", headers={"Authorization": f"Bearer {TOKEN}"})
        for _i in range(5000):
            if ws.closed:
                break
            try:
                await ws.send_str('{"event":"pong","id":1}')
            except ConnectionError:
                break
        await ws.receive(timeout=5)
        assert ws.close_code == 1008
        await ws.close()

        # the good bridge is still served
        await good.send({"event": "ping", "id": 8})
        await asyncio.sleep(0.3)
        assert good.pongs == [7, 8]
        await good.drop()
    await sidecar.stop()


async def test_a_bridge_that_came_before_its_room_was_known_is_moved_there(tmp_path):
    """A restarted sidecar: the bridge reconnects before Prosody has re-applied
    the room, lands in a stand-in room, and is sent to the real one as soon as
    the meeting id is mapped."""
    sidecar = make_sidecar(tmp_path)
    await sidecar.start(preload=False)
    sidecar.mediajson.mapping_wait = 0.2
    url = f"http://127.0.0.1:{sidecar.ports.http}/mediajson/meeting-42"
    room = "weekly@conference.example.org"
    async with aiohttp.ClientSession() as session:
        bridge = Bridge(session, url)
        await bridge.connect()
        await bridge.start("ep000001")
        assert "meeting-42" in sidecar.rooms.rooms  # the stand-in
        await sidecar.rooms.start(room, "captions", meeting_id="meeting-42")
        quiet = base64.b64decode("+P/+")  # a tiny valid Opus silence frame
        for i in range(150):
            if bridge.ws is None or bridge.ws.closed:
                break
            try:
                await bridge.media("ep000001", i, quiet, 127, False)
            except ConnectionError:
                break
            await asyncio.sleep(0.02)
        await asyncio.wait_for(bridge.reader, 5)
        assert bridge.ws is not None and bridge.ws.close_code == 1012
        # the bridge reconnects, as jitsi-videobridge does at once after a close
        await bridge.connect()
        await bridge.start("ep000001")
        await asyncio.sleep(0.3)
        assert sidecar.mediajson.latest.get(room) is not None
        for _ in range(50):
            if "meeting-42" not in sidecar.rooms.rooms:
                break
            await asyncio.sleep(0.1)
        assert "meeting-42" not in sidecar.rooms.rooms  # the stand-in is gone
        await bridge.drop()
    await sidecar.stop()


async def test_a_jicofo_without_http_headers_can_put_the_token_in_the_url(tmp_path):
    """jicofo.transcription.http-headers exists only since December 2025; an
    older Jicofo sends no header, so the url-template carries ?token=."""
    sidecar = make_sidecar(tmp_path)
    await sidecar.start(preload=False)
    base = f"http://127.0.0.1:{sidecar.ports.http}/mediajson"
    try:
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                await session.ws_connect(f"{base}/m1?token=nope&room=r@conference.test")
            assert info.value.status == 401
            ws = await session.ws_connect(f"{base}/m1?token={TOKEN}&room=r@conference.test")
            await ws.send_str(json.dumps({"event": "ping", "id": 7}))
            msg = await ws.receive(timeout=5)
            assert json.loads(msg.data) == {"event": "pong", "id": 7}
            await ws.close()
            # a header, when there is one, decides: a wrong header is not saved by the URL
            with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                await session.ws_connect(
                    f"{base}/m1?token={TOKEN}", headers={"Authorization": "Bearer nope"}
                )
            assert info.value.status == 401
    finally:
        await sidecar.stop()
