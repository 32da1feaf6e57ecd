"""One carrier per caption: the MUC or the videobridge socket, never both.

jitsi-meet shows a caption that arrives as the transcriber occupant's
json-message and one that arrives as the bridge's EndpointMessage from
"transcriber" (jvb ``Conference.ExporterEventHandlerImpl.
handleTranscriptionResult`` relays every ``transcription-result`` the service
answers on the export socket to all endpoints), so a caption sent on both is
shown twice. Here a real Prosody, a Jitsi-like participant and a bridge-like
WebSocket client count every caption the room published: each must arrive
exactly once, in total, on the two paths.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from sidecar.audio import OpusEncoder, load_audio
from sidecar.config import load_config
from sidecar.rooms import Participant
from sidecar.server import Sidecar
from tests.conftest import collect, librivox, play
from tests.jitsi_clients import JitsiClient, wait_for
from tests.prosody import DOMAIN, HIDDEN, MUC, Prosody, make_prosody
from tests.test_mediajson import TOKEN, Bridge, level_of

ROOM = f"carriers@{MUC}"
ALICE = "a1b2c3d4"


def sidecar_env(tmp_path: Path, prosody: Prosody | None, **extra: str) -> dict[str, str]:
    env = {
        "CAPTIONS_SERVER_TOKEN": TOKEN,
        "CAPTIONS_SERVER_GRPC_LISTEN": "127.0.0.1:0",
        "CAPTIONS_SERVER_HTTP_LISTEN": "127.0.0.1:0",
        "CAPTIONS_STORE_STORE_DIR": str(tmp_path / "store"),
        "CAPTIONS_INGEST_MAX_MESSAGES_PER_SECOND": "2000",
    }
    if prosody is not None:
        env |= {
            "CAPTIONS_XMPP_ENABLED": "true",
            "CAPTIONS_XMPP_JID": f"transcriber@{HIDDEN}",
            "CAPTIONS_XMPP_PASSWORD": "tsecret",
            "CAPTIONS_XMPP_HOST": "127.0.0.1",
            "CAPTIONS_XMPP_PORT": str(prosody.port),
            "CAPTIONS_XMPP_STARTTLS": "false",
        }
    return env | extra


async def play_speech(bridge: Bridge, endpoint: str, pcm: np.ndarray) -> None:
    """One participant's speech as the bridge's media events, at real-time pace."""
    packets = OpusEncoder().encode(pcm)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    for i, pk in enumerate(packets):
        lvl, vad = level_of(pcm[i * 320 : (i + 1) * 320])
        await bridge.media(endpoint, 500 + i, pk, lvl, vad)
        await asyncio.sleep(max(0.0, t0 + (i + 1) * 0.02 - loop.time()))


@pytest.mark.slow
@pytest.mark.parametrize("xmpp", [True, False], ids=["xmpp-on", "xmpp-off"])
async def test_each_caption_arrives_once_across_the_muc_and_the_bridge(tmp_path, xmpp):
    wav, _ref = librivox()[0]
    prosody = make_prosody(tmp_path)
    prosody.start()
    prosody.register("transcriber", HIDDEN, "tsecret")
    prosody.register("alice", DOMAIN, "asecret")
    sidecar = Sidecar(load_config(None, env=sidecar_env(tmp_path, prosody if xmpp else None)))
    alice = JitsiClient(f"alice@{DOMAIN}", "asecret", ROOM, ALICE, "Alice")
    try:
        await sidecar.start()
        await alice.start(prosody.port)
        await alice.join()
        await sidecar.rooms.update_roster(ROOM, [Participant(ALICE, "Alice")])
        published = await collect(sidecar, ROOM)
        meeting = str(uuid.uuid4())
        url = f"http://127.0.0.1:{sidecar.ports.http}/mediajson/{meeting}?room={ROOM}"
        async with aiohttp.ClientSession() as session:
            bridge = Bridge(session, url)
            await bridge.connect()  # auto start: captions and transcription on
            await bridge.start(ALICE)
            if xmpp:
                assert sidecar.occupant is not None
                await wait_for(lambda: sidecar.occupant.joined(ROOM), 15, "occupant joined")
            want = "muc" if xmpp else "videobridge"
            await wait_for(lambda: sidecar.rooms.get(ROOM).carrier == want, 10, want)
            pcm = np.concatenate([load_audio(wav), np.zeros(16000, np.float32)])
            await play_speech(bridge, ALICE, pcm)
            await wait_for(
                lambda: any(not c.is_interim for _, c in published), 20, "a final caption"
            )
            await asyncio.sleep(1.0)  # what is on its way arrives
            status = sidecar.service._status(sidecar.rooms.get(ROOM))
            await bridge.drop()

        def key(msg: dict) -> tuple:
            return (msg["message_id"], msg["is_interim"], msg["transcript"][0]["text"])

        on_muc = [key(m) for _, m in alice.captions()]
        on_bridge = [key(m) for _, m in bridge.replies]
        sent = [(c.message_id, c.is_interim, c.text) for _, c in published]
        assert sent, "the room published no caption"
        # every published caption exactly once, in total, on the two paths
        assert sorted(on_muc + on_bridge) == sorted(sent)
        if xmpp:
            assert on_bridge == [] and status.caption_carrier == "muc"
        else:
            assert on_muc == [] and status.caption_carrier == "videobridge"
    finally:
        alice.disconnect()
        await sidecar.stop()
        prosody.stop()


@pytest.mark.slow
@pytest.mark.parametrize("xmpp", [True, False], ids=["xmpp-on", "xmpp-off"])
async def test_a_reconnecting_bridge_is_replayed_only_what_took_the_bridge(tmp_path, xmpp):
    """Finals made while the bridge is away wait for it only when they were
    the bridge's to carry; those that went through the MUC are not replayed
    (the bridge would relay them and every endpoint would see them again)."""
    wav, _ref = librivox()[1]
    prosody = make_prosody(tmp_path)
    prosody.start()
    prosody.register("transcriber", HIDDEN, "tsecret")
    prosody.register("alice", DOMAIN, "asecret")
    sidecar = Sidecar(load_config(None, env=sidecar_env(tmp_path, prosody if xmpp else None)))
    alice = JitsiClient(f"alice@{DOMAIN}", "asecret", ROOM, ALICE, "Alice")
    try:
        await sidecar.start()
        await alice.start(prosody.port)
        await alice.join()
        await sidecar.rooms.update_roster(ROOM, [Participant(ALICE, "Alice")])
        published = await collect(sidecar, ROOM)
        url = f"http://127.0.0.1:{sidecar.ports.http}/mediajson/m-replay?room={ROOM}"
        async with aiohttp.ClientSession() as session:
            bridge = Bridge(session, url)
            await bridge.connect()
            want = "muc" if xmpp else "videobridge"
            await wait_for(lambda: sidecar.rooms.get(ROOM).carrier == want, 15, want)
            await bridge.drop()
            # the bridge is away; audio comes from another ingest meanwhile
            pcm = np.concatenate([load_audio(wav), np.zeros(16000, np.float32)])
            await play(sidecar.rooms, ROOM, {ALICE: OpusEncoder().encode(pcm)})
            await wait_for(lambda: any(not c.is_interim for _, c in published), 20, "a final")
            await asyncio.sleep(0.5)
            finals = [c.message_id for _, c in published if not c.is_interim]
            again = Bridge(session, url)
            await again.connect()
            await asyncio.sleep(1.5)
            await again.drop()
        replayed = [m["message_id"] for _, m in again.replies if not m["is_interim"]]
        on_muc = [m["message_id"] for _, m in alice.captions() if not m["is_interim"]]
        if xmpp:
            assert on_muc == finals and replayed == []
        else:
            assert on_muc == [] and replayed == finals
    finally:
        alice.disconnect()
        await sidecar.stop()
        prosody.stop()
