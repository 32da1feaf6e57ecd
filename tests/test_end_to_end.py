"""End to end: Jitsi's signalling in a real Prosody, audio from the videobridge
export, captions back through the MUC to a participant.

A moderator asks for captions with the CC button's dial IQ; mod_captions
starts the sidecar and sends it the roster; the conference simulator plays
two participants' speech as jitsi-videobridge does (mediajson WebSocket, 20
ms Opus frames, endpoint ids only); a third participant receives the
captions as json-message from the hidden transcriber, with the display
names that only Prosody knew, and the bridge socket carries none (one
carrier per caption, see sidecar/rooms.py).
"""

from __future__ import annotations

import uuid

import jiwer
import pytest

from sidecar.sim.conference import SimConfig, SimParticipant, run_conference
from tests.conftest import normalise
from tests.jitsi_clients import wait_for
from tests.test_prosody_module import ROOM, TOKEN, deployment

pytestmark = pytest.mark.slow

SCRIPT = [
    ("Alice", "The new release is ready for testing on Monday."),
    ("Bob", "I will prepare the test servers this afternoon."),
    ("Alice", "Thank you, please write down any problems you find."),
]


async def test_videobridge_audio_in_muc_captions_out_with_names(tmp_path):
    async with deployment(tmp_path, preload=True) as d:
        focus = await d.focus()
        alice = await d.client("alice", "a1b2c3d4", "Alice")
        bob = await d.client("bob", "b5e6f7a8", "Bob")
        carol = await d.client("carol", "c9d0e1f2", "Carol")
        await focus.grant_moderator(alice.endpoint)

        alice.set_property("requestingTranscription", "true")
        reply = await alice.dial()
        assert reply.get("type") == "result"
        await wait_for(lambda: bool(carol.transcriber_presences("recorder.localhost")), 10)

        report = await run_conference(
            SimConfig(
                participants=[
                    SimParticipant(name="alice-ep", endpoint=alice.endpoint),
                    SimParticipant(name="bob-ep", endpoint=bob.endpoint),
                ],
                script=[("alice-ep" if w == "Alice" else "bob-ep", t) for w, t in SCRIPT],
                url=f"ws://127.0.0.1:{d.http_port}/mediajson/{uuid.uuid4()}?room={ROOM}",
                token=TOKEN,
                listeners=3,
                update_roster=False,  # names must come from Prosody, not from the simulator
                end_session=False,
            )
        )
        # the transcriber occupant is in the room: captions go once, through
        # the MUC, and none on the bridge socket (the bridge would relay them
        # to every endpoint a second time)
        assert report.captions == [], report.to_markdown()
        assert report.pongs_missed == 0

        await wait_for(lambda: sum(1 for _, c in carol.captions() if not c["is_interim"]) >= 3)
        finals = [c for _, c in carol.captions() if not c["is_interim"]]
        by_name = {}
        for c in finals:
            by_name.setdefault(c["participant"]["name"], []).append(c["transcript"][0]["text"])
        assert set(by_name) == {"Alice", "Bob"}
        for c in finals:
            want = {"Alice": alice.endpoint, "Bob": bob.endpoint}[c["participant"]["name"]]
            assert c["participant"]["id"] == want
        for who, text in SCRIPT:
            best = min(jiwer.wer(normalise(text), normalise(h)) for h in by_name[who])
            assert best < 0.35, (who, text, by_name[who])
        assert d.sidecar.rooms.get(ROOM).carrier == "muc"
