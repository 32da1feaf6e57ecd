"""Bad audio input is counted and dropped; nobody else in the room notices."""

from __future__ import annotations

import asyncio
import os
import random
import time

import jiwer
import numpy as np
import pytest
from prometheus_client import REGISTRY

from sidecar.audio import encode_opus, load_audio
from sidecar.config import RoomSettings
from sidecar.engine import Engine
from sidecar.events import Frame
from sidecar.rooms import Participant
from tests.conftest import collect, librivox, normalise


def dropped(reason: str) -> float:
    return REGISTRY.get_sample_value("captions_frames_dropped_total", {"reason": reason}) or 0.0


def lost() -> float:
    return REGISTRY.get_sample_value("captions_frames_lost_total") or 0.0


@pytest.mark.slow
async def test_bad_streams_do_not_disturb_good_ones(tmp_path):
    (wav_a, ref_a), (wav_b, ref_b) = librivox()[0], librivox()[3]
    lead = np.zeros(8000, np.float32)
    good = encode_opus(np.concatenate([lead, load_audio(wav_a), np.zeros(24000, np.float32)]))
    messy = encode_opus(np.concatenate([lead, load_audio(wav_b), np.zeros(24000, np.float32)]))
    n = min(len(good), len(messy))
    rng = random.Random(7)

    engine = Engine(tmp_path)
    await engine.start()
    room = "mess@conference.test"
    people = ["good", "messy", "garbage", "huge"]
    await engine.rooms.update_roster(room, [Participant(p, p.title()) for p in people])
    await engine.rooms.start(room, "captions", RoomSettings())
    got = await collect(engine, room)
    before = {r: dropped(r) for r in ("corrupt", "oversized", "duplicate", "unknown_participant")}
    lost_before = lost()

    # the messy stream: every 7th frame duplicated, pairs swapped, 3 frames lost
    order: list[int] = []
    i = 0
    while i < n:
        if i % 11 == 5 and i + 1 < n:
            order += [i + 1, i]
            i += 2
            continue
        order.append(i)
        if i % 7 == 0:
            order.append(i)
        i += 1
    for gone in (40, 80, 81):
        order.remove(gone)

    t0 = time.monotonic()
    for k in range(n):
        engine.rooms.push_frame(room, "good", Frame(good[k], k, k * 960))
        m = order[k] if k < len(order) else None
        if m is not None:
            engine.rooms.push_frame(room, "messy", Frame(messy[m], m, m * 960))
        # not Opus at all; then a 10 MB frame; then a stranger
        engine.rooms.push_frame(room, "garbage", Frame(os.urandom(rng.randint(1, 200)), k, k * 960))
        if k % 25 == 0:
            engine.rooms.push_frame(room, "huge", Frame(b"\xfc" * (10 * 1024 * 1024), k, k * 960))
            engine.rooms.push_frame(room, "intruder", Frame(good[k], k, k * 960))
            engine.rooms.push_frame(room, "../etc", Frame(good[k], k, k * 960))
        await asyncio.sleep(max(0.0, t0 + (k + 1) * 0.02 - time.monotonic()))
    for k in range(len(order) - n):
        m = order[n + k]
        engine.rooms.push_frame(room, "messy", Frame(messy[m], m, m * 960))
    await asyncio.sleep(1.0)
    await engine.rooms.end_room(room)
    await engine.close()

    finals = {c.participant_id: c.text for _, c in got if not c.is_interim and c.text}
    print(finals)
    assert jiwer.wer(normalise(ref_a), normalise(finals["good"])) < 0.25
    assert jiwer.wer(normalise(ref_b), normalise(finals["messy"])) < 0.35
    assert "garbage" not in finals or len(finals["garbage"].split()) < 4
    assert "intruder" not in finals and "../etc" not in finals and "huge" not in finals
    assert dropped("corrupt") > before["corrupt"]
    assert dropped("oversized") - before["oversized"] >= n // 25
    assert dropped("duplicate") > before["duplicate"]
    assert dropped("unknown_participant") > before["unknown_participant"]
    assert dropped("invalid_participant") > 0
    assert lost() - lost_before >= 3


async def test_frames_for_rooms_that_are_off_are_dropped(tmp_path):
    # no Whisper: this one runs in make test-fast
    engine = Engine(tmp_path)
    await engine.start(preload=False)
    before = dropped("room_inactive")
    assert not engine.rooms.push_frame("nowhere@conference.test", "a", Frame(b"\x78", 1, 0))
    assert dropped("room_inactive") == before + 1
    await engine.close()
