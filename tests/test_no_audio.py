"""Captions on and no audio: said in the room status, the log and the room.

On a real deployment the most common failure is silent: the CC button is
pressed, the transcriber joins, the UI says "transcribing" and no audio ever
arrives (Jicofo without the export url-template, no room-metadata component,
a bridge that cannot reach the sidecar). Here, with a real Prosody and
Jitsi-like clients, the room gets a warning an operator can act on within
``ingest.no_audio_warning_s``, one WARNING line, and the moderator who asked
one plain-text message; the warning goes when audio comes.
"""

from __future__ import annotations

import asyncio
import base64
import logging

import aiohttp
import pytest

from sidecar.config import ConfigError, load_config
from sidecar.events import Frame
from sidecar.server import Sidecar
from tests.jitsi_clients import JitsiClient, wait_for
from tests.prosody import DOMAIN, HIDDEN, MUC, make_prosody
from tests.test_carriers import sidecar_env
from tests.test_mediajson import Bridge

ROOM = f"quiet@{MUC}"
ALICE, BOB = "a1b2c3d4", "e5f6a7b8"
QUIET = base64.b64decode("+P/+")  # an Opus silence frame


def bodies(client: JitsiClient) -> list[tuple[str, str, str]]:
    """(type, from, body) of the messages with a body the client got."""
    out = []
    for _, kind, el in client.events:
        body = el.find("{jabber:client}body")
        if kind == "message" and body is not None and body.text:
            out.append((el.get("type") or "", el.get("from") or "", body.text))
    return out


def no_audio_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and "no audio from the videobridge" in r.getMessage()
    ]


@pytest.mark.parametrize("requester", [ALICE, ""], ids=["requester-known", "requester-unknown"])
async def test_no_audio_after_start_is_said_and_cleared_when_audio_comes(
    tmp_path, caplog, requester
):
    caplog.set_level(logging.INFO)
    prosody = make_prosody(tmp_path)
    prosody.start()
    prosody.register("transcriber", HIDDEN, "tsecret")
    prosody.register("alice", DOMAIN, "asecret")
    prosody.register("bob", DOMAIN, "bsecret")
    env = sidecar_env(tmp_path, prosody, CAPTIONS_INGEST_NO_AUDIO_WARNING_S="2")
    sidecar = Sidecar(load_config(None, env=env))
    alice = JitsiClient(f"alice@{DOMAIN}", "asecret", ROOM, ALICE, "Alice")
    bob = JitsiClient(f"bob@{DOMAIN}", "bsecret", ROOM, BOB, "Bob")
    try:
        await sidecar.start(preload=False)
        for c in (alice, bob):
            await c.start(prosody.port)
            await c.join()
        await sidecar.rooms.start(ROOM, "captions", requested_by=requester)
        assert sidecar.occupant is not None
        await wait_for(lambda: sidecar.occupant.joined(ROOM), 15, "occupant joined")
        status = sidecar.service._status(sidecar.rooms.get(ROOM))
        assert status.warning == ""  # not before the time is up

        def warning() -> str:
            return sidecar.service._status(sidecar.rooms.get(ROOM)).warning

        await wait_for(lambda: warning(), 10, "the no-audio warning")
        text = warning()
        assert f"no audio from the videobridge for room {ROOM} 2 s after start" in text
        assert "jicofo.transcription.url-template" in text
        assert "room_metadata" in text
        assert f"ws://127.0.0.1:{sidecar.ports.http}/mediajson/{{{{MEETING_ID}}}}" in text

        def notices(client: JitsiClient) -> list[tuple[str, str, str]]:
            return [b for b in bodies(client) if "no audio reaches the transcriber" in b[2]]

        if requester:
            # a private MUC message to the moderator who asked, nobody else
            await wait_for(lambda: notices(alice), 10, "the private notice")
            [(mtype, sender, _)] = notices(alice)
            assert mtype == "chat" and sender.startswith(ROOM + "/")
            await asyncio.sleep(0.5)
            assert notices(bob) == []
        else:
            await wait_for(lambda: notices(alice) and notices(bob), 10, "the room notice")
            assert [n[0] for n in notices(alice)] == ["groupchat"]
        await asyncio.sleep(1.5)  # more checks pass: still one line, one message
        assert len(no_audio_lines(caplog)) == 1
        assert len(notices(alice)) == 1

        # audio arrives: the warning goes, nothing more is said
        for i in range(5):
            sidecar.rooms.push_frame(ROOM, ALICE, Frame(QUIET, i, i * 960))
        assert warning() == ""
        await asyncio.sleep(1.5)
        assert len(notices(alice)) == 1 and len(no_audio_lines(caplog)) == 1
    finally:
        alice.disconnect()
        bob.disconnect()
        await sidecar.stop()
        prosody.stop()


async def test_a_connected_bridge_that_sends_nothing_is_told_apart(tmp_path, caplog):
    env = sidecar_env(tmp_path, None, CAPTIONS_INGEST_NO_AUDIO_WARNING_S="1")
    sidecar = Sidecar(load_config(None, env=env))
    await sidecar.start(preload=False)
    room = "muted@conference.example.org"
    url = f"http://127.0.0.1:{sidecar.ports.http}/mediajson/m-muted?room={room}"
    try:
        async with aiohttp.ClientSession() as session:
            bridge = Bridge(session, url)
            await bridge.connect()
            await wait_for(lambda: room in sidecar.rooms.rooms, 5)
            r = sidecar.rooms.get(room)
            await wait_for(lambda: r.warning, 10, "the warning")
            assert "the videobridge is connected for room" in r.warning
            assert "sent no audio" in r.warning
            await bridge.start("a1b2c3d4")
            await bridge.media("a1b2c3d4", 1, QUIET, 127, False)
            await wait_for(lambda: not r.warning, 5, "cleared")
            await bridge.drop()
    finally:
        await sidecar.stop()


def test_the_no_audio_delay_is_a_bounded_setting(tmp_path):
    base = {"CAPTIONS_SERVER_TOKEN": "t"}
    assert load_config(None, env=base).ingest.no_audio_warning_s == 10
    assert (
        load_config(
            None, env=base | {"CAPTIONS_INGEST_NO_AUDIO_WARNING_S": "0"}
        ).ingest.no_audio_warning_s
        == 0
    )
    with pytest.raises(ConfigError, match=r"ingest.no_audio_warning_s.*0\.\.600"):
        load_config(None, env=base | {"CAPTIONS_INGEST_NO_AUDIO_WARNING_S": "601"})
