"""Conversation: one-word replies between two speakers get their captions.

Two espeak-ng voices, quick turns (0.3 s apart); bob only ever answers in
one word. tiny.en decodes such a lone word right but with a no-speech
probability of 0.2-0.4, which the hallucination guard used to take for a
phantom "thanks" or "okay" on silence; the VAD heard the word, and that
now counts.
"""

from __future__ import annotations

import asyncio

import pytest

from sidecar.audio import OpusEncoder
from sidecar.config import RoomSettings
from sidecar.engine import Engine
from sidecar.sim.voices import build_conversation
from tests.conftest import collect, normalise, play

pytestmark = pytest.mark.slow

SCRIPT = [
    ("alice", "I have sent you the report about the northern region."),
    ("bob", "Thanks."),
    ("alice", "Can we talk about it on Monday morning?"),
    ("bob", "Okay."),
    ("alice", "Good, see you then."),
    ("bob", "Bye."),
]


async def test_one_word_replies_get_their_captions(tmp_path):
    conv = await asyncio.to_thread(
        build_conversation, SCRIPT, {"alice": "en-us+f3", "bob": "en-us+m3"}, gap=0.3
    )
    engine = Engine(tmp_path)
    await engine.start()
    room = "call@conference.test"
    await engine.rooms.start(room, "captions", RoomSettings())
    got = await collect(engine, room)
    await play(engine.rooms, room, {s: OpusEncoder().encode(t) for s, t in conv.tracks.items()})
    await asyncio.sleep(1.0)
    await engine.rooms.end_room(room)
    await engine.close()

    bob = [normalise(c.text) for _, c in got if not c.is_interim and c.participant_id == "bob"]
    print("bob:", bob)
    for word in ("thanks", "okay", "bye"):
        assert any(word in text.split() for text in bob), (word, bob)
