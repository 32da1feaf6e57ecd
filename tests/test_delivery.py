"""Silence in the audio is not a pause in delivery.

The same utterances, delivered as the videobridge does (20 ms Opus frames),
as Jigasi does (1.46 s of PCM per message, ``sidecar.sim.delivery`` cites
its source), in 0.2 s, 1 s and 2 s blocks, and behind a link that stalls
and releases bursts, must give one final per utterance and the same words.
A sender that really stops mid-utterance (muted, gone) must still get its
final; a sender whose RTP clock jumps (DTX) has been silent for that long.
"""

from __future__ import annotations

import asyncio
import types

import jiwer
import numpy as np
import pytest

from sidecar.audio import encode_opus, load_audio
from sidecar.config import RoomSettings
from sidecar.engine import Engine
from sidecar.pipeline.segmenter import SegmenterConfig
from sidecar.pipeline.speaker import SR, SpeakerPipeline
from sidecar.pipeline.vad import SileroVad
from sidecar.sim.delivery import feed, jigasi_messages, jittered, opus_frames, schedule
from tests.conftest import librivox, normalise

# ------------------------------------------------------- the pipeline alone


class Clock:
    """Fake monotonic and wall clocks for the speaker pipeline."""

    def __init__(self) -> None:
        self.t = 1000.0

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import sidecar.pipeline.speaker as speaker

        fake = types.SimpleNamespace(monotonic=lambda: self.t, time=lambda: self.t + 1.7e9)
        monkeypatch.setattr(speaker, "time", fake)


class Recorder:
    """Stands where the decoding stream is: records what the segmenter decided."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []

    def begin(self, utt_id: str, audio: np.ndarray) -> None:
        self.events.append(("begin", len(audio)))

    def push(self, audio: np.ndarray) -> None:
        pass

    def pause(self) -> None:
        pass

    def resume(self) -> None:
        pass

    def end(self, keep: int, discard: bool = False, voiced_ms: int | None = None) -> None:
        self.events.append(("end", keep))

    @property
    def utterances(self) -> int:
        return sum(1 for kind, _ in self.events if kind == "end")


@pytest.fixture(scope="module")
def vad() -> SileroVad:
    return SileroVad()


def _pipeline(vad: SileroVad) -> tuple[SpeakerPipeline, Recorder]:
    rec = Recorder()
    sp = SpeakerPipeline("p", vad=vad, stream=rec, segmenter=SegmenterConfig())  # type: ignore[arg-type]
    return sp, rec


def _speech(k: int = 0) -> np.ndarray:
    return load_audio(librivox()[k][0])


def _run(sp: SpeakerPipeline, clock: Clock, items, until: float) -> None:  # type: ignore[no-untyped-def]
    """Deliver ``items`` at their times, ticking the idle check every 0.1 s as rooms does."""
    from sidecar.events import Frame

    start = clock.t
    pending = list(items)
    samples = 0
    while clock.t - start < until:
        while pending and pending[0].at <= clock.t - start + 1e-9:
            it = pending.pop(0)
            if it.packet is not None:
                sp.push(Frame(it.packet, it.index % 65536, it.index * 960))
            else:
                sp.push(Frame(b"", it.index, samples, pcm=it.pcm))
                samples += len(it.pcm)
        sp.idle_check(clock.t, 700)
        clock.t += 0.02


@pytest.mark.parametrize("pattern", ["chunks-1s", "jigasi-1.5s", "chunks-2s", "jittered"])
def test_a_pause_in_delivery_does_not_cut_an_utterance(vad, monkeypatch, pattern) -> None:
    clock = Clock()
    clock.install(monkeypatch)
    sp, rec = _pipeline(vad)
    pcm = np.concatenate([np.zeros(SR // 2, np.float32), _speech(0), np.zeros(2 * SR, np.float32)])
    _run(sp, clock, schedule(pattern, pcm), until=len(pcm) / SR + 4)
    assert rec.utterances == 1, rec.events
    # the whole utterance, not a piece of it (7.1 s of speech)
    assert rec.events[-1][1] > 6 * SR


def test_a_sender_that_stops_mid_utterance_gets_its_end(vad, monkeypatch) -> None:
    clock = Clock()
    clock.install(monkeypatch)
    sp, rec = _pipeline(vad)
    pcm = np.concatenate([np.zeros(SR // 2, np.float32), _speech(0)[: 3 * SR]])
    items = opus_frames(encode_opus(pcm))
    _run(sp, clock, items, until=items[-1].at + 0.01)
    assert rec.utterances == 0
    stopped = clock.t
    while rec.utterances == 0 and clock.t - stopped < 5:
        sp.idle_check(clock.t, 700)
        clock.t += 0.02
    assert rec.utterances == 1
    # not before a speaker who fell silent would have been ended, nor much later
    assert 0.7 <= clock.t - stopped <= 1.3


def test_jigasi_sender_that_stops_gets_its_end_after_its_message_gap(vad, monkeypatch) -> None:
    clock = Clock()
    clock.install(monkeypatch)
    sp, rec = _pipeline(vad)
    pcm = np.concatenate([np.zeros(SR // 2, np.float32), _speech(0)[: 4 * SR]])
    items = jigasi_messages(pcm)
    _run(sp, clock, items, until=items[-1].at + 0.01)
    stopped = clock.t
    while rec.utterances == 0 and clock.t - stopped < 6:
        sp.idle_check(clock.t, 700)
        clock.t += 0.02
    assert rec.utterances == 1
    assert 1.46 + 0.7 <= clock.t - stopped <= 3.0


def test_an_rtp_timestamp_jump_is_silence_in_the_audio(vad, monkeypatch) -> None:
    """DTX: the sender skips 1.5 s of its clock without a sequence gap, and the
    frames behind the jump come at once (no wall-clock pause to go by)."""
    from sidecar.events import Frame

    clock = Clock()
    clock.install(monkeypatch)
    sp, rec = _pipeline(vad)
    a = encode_opus(np.concatenate([np.zeros(SR // 2, np.float32), _speech(1)]))
    b = encode_opus(_speech(4))
    jump = 75 * 960  # 1.5 s of 48 kHz ticks
    for i, pkt in enumerate(a):
        sp.push(Frame(pkt, i, i * 960))
    assert rec.utterances == 0  # the trailing silence of `a` is shorter than 0.7 s
    for j, pkt in enumerate(b):
        sp.push(Frame(pkt, len(a) + j, (len(a) + j) * 960 + jump))
    sp.finish()
    assert rec.utterances == 2, rec.events
    # and the timeline holds the skipped time: the second starts after it
    starts = sorted(t.start_sample for t in sp.times.values())
    assert starts[-1] >= (len(a) * 960 + jump) // 3 - SR // 2


def test_a_restarted_sender_with_a_new_rtp_clock_adds_no_silence(vad, monkeypatch) -> None:
    from sidecar.events import Frame

    clock = Clock()
    clock.install(monkeypatch)
    sp, _ = _pipeline(vad)
    silence = encode_opus(np.zeros(SR, np.float32))
    for i, pkt in enumerate(silence):
        sp.push(Frame(pkt, 100 + i, i * 960))
    before = sp.clock
    # new sequence and timestamp bases, the timestamps 20 s ahead of the old clock
    for j, pkt in enumerate(silence):
        sp.push(Frame(pkt, 30000 + j, 20 * 48000 + j * 960))
    sp.finish()
    assert sp.clock - before < 2 * SR


def test_jigasi_messages_follow_its_buffer() -> None:
    """Participant.java: a 48000-byte buffer sent when under 1920 bytes are left."""
    pcm = np.ones(10 * SR, np.float32)
    msgs = jigasi_messages(pcm)
    assert all(len(m.pcm) * 2 == 48000 for m in msgs)
    assert all(np.all(m.pcm[:23360] == 1) and np.all(m.pcm[23360:] == 0) for m in msgs)
    assert [round(m.at, 2) for m in msgs[:2]] == [1.46, 2.92]
    assert len(msgs) == int(10 / 1.46)


def test_jittered_delivery_keeps_order_and_never_runs_early() -> None:
    items = opus_frames([bytes([i % 256]) for i in range(500)])
    late = jittered(items)
    assert [x.index for x in late] == [x.index for x in items]
    assert all(b.at >= a.at for a, b in zip(items, late, strict=True))
    assert all(b.at >= a.at for a, b in zip(late, late[1:], strict=False))
    assert max(b.at - a.at for a, b in zip(items, late, strict=True)) > 0.3  # it does stall


# ------------------------------------------------- end to end, real model


PATTERNS = ["frames-20ms", "chunks-0.2s", "chunks-1s", "jigasi-1.5s", "chunks-2s", "jittered"]


@pytest.mark.slow
async def test_every_delivery_pattern_gives_the_same_finals(tmp_path) -> None:
    corpus = librivox()[:3]
    gap = np.zeros(SR, np.float32)
    pcm = np.concatenate(
        [np.zeros(SR // 2, np.float32)]
        + [x for wav, _ in corpus for x in (load_audio(wav), gap)]
        + [np.zeros(SR, np.float32)]
    )
    engine = Engine(tmp_path)
    await engine.start()
    got: dict[str, list] = {p: [] for p in PATTERNS}

    async def one(pattern: str) -> None:
        room = f"d-{pattern.replace('.', '_')}@conference.test"
        # no interims: six streams at once on a small machine, finals are what counts
        r = await engine.rooms.start(room, "captions", RoomSettings(interim_results=False))
        r.sinks.append(lambda c: got[pattern].append(c) if not c.is_interim and c.text else None)
        await feed(engine.rooms, room, "reader", schedule(pattern, pcm))
        await engine.rooms.finish_speaker(room, "reader")
        await engine.rooms.end_room(room)

    await asyncio.gather(*(one(p) for p in PATTERNS))
    await engine.close()

    ref = normalise(" ".join(t for _, t in corpus))
    base = normalise(" ".join(c.text for c in got["frames-20ms"]))
    for pattern in PATTERNS:
        finals = got[pattern]
        text = normalise(" ".join(c.text for c in finals))
        print(f"{pattern}: {len(finals)} finals, WER {jiwer.wer(ref, text):.3f}: {text}")
        assert len(finals) == len(corpus), (pattern, [c.text for c in finals])
        assert jiwer.wer(base, text) <= 0.1, (pattern, text)
        # caption times on the audio's own timeline, whatever the delivery: the
        # utterances lie as far apart as in the audio (the first one's offset
        # is when the event loop got to the first push, which a busy machine
        # delays)
        rel = [(c.start_time_ms - finals[0].start_time_ms) / 1000 for c in finals]
        base_finals = got["frames-20ms"]
        ref_rel = [(c.start_time_ms - base_finals[0].start_time_ms) / 1000 for c in base_finals]
        assert max(abs(a - b) for a, b in zip(rel, ref_rel, strict=True)) < 0.6, (pattern, rel)
