"""Behaviour that a review found missing: each test is what a user would notice."""

from __future__ import annotations

import asyncio
import time

from sidecar.config import RoomSettings
from sidecar.engine import Engine
from sidecar.events import Caption, TranscriptEntry
from sidecar.rooms import Subscriber
from sidecar.store.render import to_srt, to_vtt


def entry(start: str, stop: str, who: str, text: str) -> TranscriptEntry:
    return TranscriptEntry(
        start_time=start, stop_time=stop, speaker_id=who, speaker_name=who, text=text
    )


def test_cues_come_in_time_order_even_when_finals_did_not():
    # Alice's long utterance began first but finished (and was written) after Bob's
    entries = [
        entry("2026-01-01T10:00:05.000Z", "2026-01-01T10:00:06.000Z", "Bob", "Yes."),
        entry("2026-01-01T10:00:01.000Z", "2026-01-01T10:00:09.000Z", "Alice", "A long one."),
    ]
    vtt = to_vtt(entries)
    assert vtt.index("Alice") < vtt.index("Bob")
    srt = to_srt(entries)
    assert srt.index("1\n00:00:00,000") < srt.index("Alice") < srt.index("Bob")


async def test_a_full_subscriber_still_learns_that_the_room_ended():
    sub = Subscriber(include_interims=True, maxsize=2)
    cap = Caption("r", "p", "P", "m", "t", False, 1.0, "en", 0, 0, 0)
    for _ in range(5):
        sub.offer(cap)
    sub.close()
    got = [c async for c in sub]
    assert len(got) <= 2  # and the iteration ended


async def test_rooms_the_videobridge_started_end_when_the_bridge_is_gone(tmp_path):
    engine = Engine(tmp_path)
    await engine.start(preload=False)
    engine.rooms.ingest_idle_end_s = 0.3
    engine.rooms._last_reap = 0.0
    await engine.rooms.start("bridged@conference.x", "transcription", requested_by="videobridge")
    await engine.rooms.start("manual@conference.x", "transcription", requested_by="prosody")
    t0 = time.monotonic()
    while "bridged@conference.x" in engine.rooms.rooms and time.monotonic() - t0 < 15:
        engine.rooms._last_reap = 0.0
        await asyncio.sleep(0.2)
    assert "bridged@conference.x" not in engine.rooms.rooms
    assert "manual@conference.x" in engine.rooms.rooms  # Prosody's rooms are Prosody's to end
    # the ended room's transcript was closed and rendered
    metas = {m.room: m for m in engine.store.list()}
    assert metas["bridged@conference.x"].complete
    await engine.close()


async def test_starting_captions_keeps_the_language_transcription_started_with(tmp_path):
    engine = Engine(tmp_path)
    await engine.start(preload=False)
    r = await engine.rooms.start("r@conference.x", "transcription", RoomSettings(language="fr-FR"))
    await engine.rooms.start("r@conference.x", "captions")
    assert r.effective.language == "fr-FR"
    await engine.close()
