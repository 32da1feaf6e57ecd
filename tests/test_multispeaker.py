"""Several participants, overlapping turns: every utterance to the right speaker.

Three espeak-ng voices take turns, the next one starting before the previous
one has finished. Each participant's audio arrives on its own stream, as the
videobridge delivers it, in real time.
"""

from __future__ import annotations

import asyncio

import pytest

from sidecar.audio import OpusEncoder
from sidecar.config import RoomSettings
from sidecar.engine import Engine
from sidecar.rooms import Participant
from sidecar.sim.voices import build_conversation
from tests.conftest import collect, normalise, play

pytestmark = pytest.mark.slow

SCRIPT = [
    ("alice", "The quarterly budget review is scheduled for Monday morning."),
    ("bob", "I will bring the updated sales figures from the northern region."),
    ("carol", "Please remember that the printer on the third floor is broken."),
    ("alice", "Thank you both, we will meet in the large conference room."),
    ("bob", "Should we invite the marketing team as well?"),
]


def _overlap(a: str, b: str) -> float:
    wa, wb = set(normalise(a).split()), set(normalise(b).split())
    return len(wa & wb) / max(1, len(wb))


async def test_overlapping_turns_attributed_to_the_right_speaker(tmp_path):
    conv = await asyncio.to_thread(build_conversation, SCRIPT, gap=0.4, overlap=1.0)
    # turns really overlap
    assert any(b.start < a.end for a, b in zip(conv.turns, conv.turns[1:], strict=False))
    engine = Engine(tmp_path)
    await engine.start()
    room = "team@conference.test"
    names = {"alice": "Alice", "bob": "Bob", "carol": "Carol"}
    await engine.rooms.update_roster(room, [Participant(k, v) for k, v in names.items()])
    await engine.rooms.start(room, "captions", RoomSettings())
    got = await collect(engine, room)
    await play(engine.rooms, room, {s: OpusEncoder().encode(t) for s, t in conv.tracks.items()})
    await engine.rooms.end_room(room)
    await engine.close()

    finals = [c for _, c in got if not c.is_interim and c.text]
    for c in finals:
        print(f"{c.participant_name}: {c.text}")
    # every turn is captioned, under its speaker's id and display name
    for turn in conv.turns:
        best = max(finals, key=lambda c, t=turn: _overlap(c.text, t.text))
        assert _overlap(best.text, turn.text) >= 0.5, turn.text
        assert best.participant_id == turn.speaker, (turn.text, best.text)
        assert best.participant_name == names[turn.speaker]
    # and no final carries words of another speaker's turn rather than its own
    for c in finals:
        own = max(
            (_overlap(c.text, t.text) for t in conv.turns if t.speaker == c.participant_id),
            default=0.0,
        )
        other = max(
            (_overlap(c.text, t.text) for t in conv.turns if t.speaker != c.participant_id),
            default=0.0,
        )
        assert own >= other, c.text
