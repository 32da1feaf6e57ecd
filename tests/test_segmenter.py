"""Tests of the segmenter: utterance start with pre-roll, pause/resume, end,
forced cuts at the maximum length, noise blips, live reconfiguration, flush."""

from __future__ import annotations

import dataclasses
from typing import TypeVar

import numpy as np
import pytest

from sidecar.pipeline.segmenter import (
    WINDOW_MS,
    Audio,
    End,
    Pause,
    Resume,
    SegEvent,
    Segmenter,
    SegmenterConfig,
    Start,
)
from sidecar.pipeline.vad import WINDOW

E = TypeVar("E")

VOICED = 0.9
SILENT = 0.05


class Feeder:
    """Feeds windows whose samples are their own window index, so that the
    audio in events says which windows it came from."""

    def __init__(self, config: SegmenterConfig | None = None) -> None:
        self.seg = Segmenter(config or SegmenterConfig())
        self.index = 0

    def feed(self, prob: float) -> list[SegEvent]:
        window = np.full(WINDOW, float(self.index), np.float32)
        out = self.seg.feed(window, prob, self.index * WINDOW)
        self.index += 1
        return out

    def run(self, probs: list[float]) -> list[tuple[int, SegEvent]]:
        """(window index, event) for every event except Audio."""
        events: list[tuple[int, SegEvent]] = []
        for p in probs:
            i = self.index
            events += [(i, e) for e in self.feed(p) if not isinstance(e, Audio)]
        return events


def windows_of(audio: np.ndarray) -> list[int]:
    assert len(audio) % WINDOW == 0
    return [int(audio[k]) for k in range(0, len(audio), WINDOW)]


def only(events: list[tuple[int, SegEvent]], kind: type[E]) -> list[tuple[int, E]]:
    return [(i, e) for i, e in events if isinstance(e, kind)]


# ---------------------------------------------------------------- start


def test_utterance_starts_after_start_windows_voiced_windows_with_pre_roll() -> None:
    f = Feeder()  # start_windows=2, pre_roll 320 ms = 10 windows
    assert f.run([SILENT] * 15) == []
    assert f.feed(VOICED) == []  # one voiced window is not yet speech
    assert not f.seg.in_speech
    (ev,) = f.feed(VOICED)
    assert isinstance(ev, Start)
    assert not ev.continued
    assert f.seg.in_speech
    # pre-roll: the 8 windows before the onset, then the 2 onset windows
    assert windows_of(ev.audio) == list(range(7, 17))
    assert ev.start_sample == 7 * WINDOW
    assert ev.audio.dtype == np.float32


def test_start_pre_roll_is_limited_to_the_audio_so_far() -> None:
    f = Feeder()
    f.feed(SILENT)
    f.feed(VOICED)
    (ev,) = f.feed(VOICED)
    assert isinstance(ev, Start)
    assert windows_of(ev.audio) == [0, 1, 2]
    assert ev.start_sample == 0


def test_isolated_voiced_windows_do_not_start_an_utterance() -> None:
    f = Feeder()
    assert f.run([VOICED, SILENT] * 20) == []
    assert not f.seg.in_speech


def test_start_windows_setting_is_respected() -> None:
    f = Feeder(SegmenterConfig(start_windows=4))
    assert f.run([VOICED] * 3) == []
    (ev,) = f.feed(VOICED)
    assert isinstance(ev, Start)
    assert windows_of(ev.audio) == [0, 1, 2, 3]


def test_after_start_every_window_is_passed_on_as_audio() -> None:
    f = Feeder()
    f.run([VOICED, VOICED])
    out = f.feed(VOICED)
    assert len(out) == 1 and isinstance(out[0], Audio)
    assert windows_of(out[0].audio) == [2]
    out = f.feed(SILENT)
    assert isinstance(out[0], Audio)


# ---------------------------------------------------------------- pause, resume, end


def test_pause_after_pause_ms_of_silence_and_resume_when_speech_returns() -> None:
    f = Feeder()  # pause_ms=192: 6 windows
    f.run([VOICED] * 10)  # windows 0..9
    events = f.run([SILENT] * 8)  # windows 10..17
    pauses = only(events, Pause)
    assert len(pauses) == 1, "one Pause per silent stretch"
    i, pause = pauses[0]
    assert i == 10 + 192 // WINDOW_MS - 1
    assert isinstance(pause, Pause)
    assert pause.speech_end_sample == 10 * WINDOW  # just after the last voiced window
    assert only(events, End) == []
    (ev,) = [e for _, e in f.run([VOICED])]
    assert isinstance(ev, Resume)
    # a second pause after the resumed speech refers to the new speech end
    events = f.run([SILENT] * 6)
    ((_, pause2),) = only(events, Pause)
    assert isinstance(pause2, Pause)
    assert pause2.speech_end_sample == 19 * WINDOW


def test_no_resume_without_a_pause() -> None:
    f = Feeder()
    events = f.run([VOICED] * 5 + [SILENT] * 3 + [VOICED] * 3)
    assert [type(e) for _, e in events] == [Start]


def test_end_after_silence_ms_keeps_speech_plus_post_pad() -> None:
    cfg = SegmenterConfig()  # silence 700 ms = 22 windows, post pad 160 ms
    f = Feeder(cfg)
    f.run([SILENT] * 3)
    f.run([VOICED] * 20)  # windows 3..22
    events = f.run([SILENT] * 30)  # windows 23..52
    ends = only(events, End)
    assert len(ends) == 1
    i, end = ends[0]
    assert isinstance(end, End)
    assert end.reason == "silence"
    assert i == 23 + -(-cfg.silence_ms // WINDOW_MS) - 1
    assert end.speech_end_sample == 23 * WINDOW
    start_sample = 0  # pre-roll reaches back to the stream start
    assert end.keep_samples == end.speech_end_sample - start_sample + cfg.post_pad_ms * 16
    assert not f.seg.in_speech
    # the silence after the End is idle: no more events
    assert all(not isinstance(e, Audio) for e in f.feed(SILENT))


def test_end_says_how_long_the_vad_was_sure_of_speech() -> None:
    f = Feeder()
    f.run([SILENT] * 3)
    # 2 onset windows, then 8 sure and 4 unsure (above neg_threshold, below threshold)
    f.run([VOICED] * 10 + [0.4] * 4)
    (_, end), *_ = only(f.run([SILENT] * 30), End)
    assert end.voiced_ms == 10 * WINDOW_MS


def test_keep_samples_never_exceeds_the_utterance() -> None:
    cfg = SegmenterConfig(post_pad_ms=5000, silence_ms=320)
    f = Feeder(cfg)
    f.run([VOICED] * 10)
    ((_, end),) = only(f.run([SILENT] * 10), End)
    assert isinstance(end, End)
    assert end.keep_samples == 20 * WINDOW


def test_mid_probabilities_keep_an_utterance_open() -> None:
    """Between neg_threshold and threshold is still speech once started."""
    f = Feeder()
    f.run([VOICED] * 5)
    events = f.run([0.4] * 40)
    assert events == []
    assert f.seg.in_speech


def test_a_new_utterance_starts_after_an_end() -> None:
    f = Feeder(SegmenterConfig(silence_ms=320))
    f.run([VOICED] * 10 + [SILENT] * 10)
    assert not f.seg.in_speech
    start_idx = f.index
    events = f.run([VOICED] * 2)
    ((_, start),) = only(events, Start)
    assert isinstance(start, Start)
    # pre-roll does not reach back into the previous utterance's audio
    assert windows_of(start.audio) == [start_idx, start_idx + 1]
    assert start.start_sample == start_idx * WINDOW


# ---------------------------------------------------------------- too short


@pytest.mark.parametrize(("voiced", "reason"), [(2, "too_short"), (4, "too_short"), (5, "silence")])
def test_short_blips_end_too_short(voiced: int, reason: str) -> None:
    f = Feeder()  # min_speech_ms=160: 5 windows
    f.run([SILENT] * 5 + [VOICED] * voiced)
    ((_, end),) = only(f.run([SILENT] * 30), End)
    assert isinstance(end, End)
    assert end.reason == reason


# ---------------------------------------------------------------- maximum length


def cut_config() -> SegmenterConfig:
    return SegmenterConfig(max_speech_ms=4000)  # 125 windows


def test_max_speech_forces_an_end_then_a_continued_start_at_the_quiet_point() -> None:
    cfg = cut_config()
    f = Feeder(cfg)
    # windows 100..102 are a short quiet stretch (not long enough to pause)
    probs = [VOICED] * 100 + [SILENT] * 3 + [VOICED] * 100
    events: list[tuple[int, SegEvent]] = []
    for p in probs:
        i = f.index
        events += [(i, e) for e in f.feed(p)]
        if any(isinstance(e, End) for _, e in events):
            break
    kinds = [type(e) for _, e in events if not isinstance(e, Audio)]
    assert kinds == [Start, End, Start]
    (i_end, end) = only(events, End)[0]
    (_, start2) = only(events, Start)[1]
    assert isinstance(end, End) and isinstance(start2, Start)
    utt_windows = i_end + 1
    assert utt_windows * WINDOW_MS >= cfg.max_speech_ms
    assert (utt_windows - 1) * WINDOW_MS < cfg.max_speech_ms
    assert end.reason == "max_length"
    # cut inside the quiet stretch, so no word is split
    assert 100 * WINDOW < end.keep_samples <= 103 * WINDOW
    assert end.speech_end_sample == end.keep_samples  # utterance started at sample 0
    assert start2.continued
    assert start2.start_sample == end.keep_samples
    assert len(start2.audio) == 0  # the consumer keeps the audio past keep_samples
    assert f.seg.in_speech


def test_cut_searches_only_the_last_2_5_seconds() -> None:
    f = Feeder(cut_config())
    # a deep quiet stretch 3.2 s before the cut, outside the search
    probs = [VOICED] * 20 + [SILENT] * 3 + [VOICED] * 102
    events: list[SegEvent] = []
    for p in probs:
        events += f.feed(p)
    (end,) = [e for e in events if isinstance(e, End)]
    assert end.reason == "max_length"
    assert end.keep_samples > (125 - 2500 // WINDOW_MS - 1) * WINDOW


def test_utterance_continued_after_a_cut_ends_normally() -> None:
    cfg = cut_config()
    f = Feeder(cfg)
    events = f.run([VOICED] * 100 + [SILENT] * 3 + [VOICED] * 40 + [SILENT] * 30)
    ends = [e for _, e in only(events, End)]
    assert [e.reason for e in ends] == ["max_length", "silence"]
    starts = [e for _, e in only(events, Start)]
    assert [s.continued for s in starts] == [False, True]
    cut, last = ends
    assert isinstance(cut, End) and isinstance(last, End)
    assert last.speech_end_sample == 143 * WINDOW
    # keep is measured from the continued utterance's start
    assert (
        last.keep_samples == last.speech_end_sample - cut.speech_end_sample + cfg.post_pad_ms * 16
    )


def test_long_monologue_is_cut_repeatedly_and_no_audio_is_lost() -> None:
    cfg = cut_config()
    f = Feeder(cfg)
    n = 580
    events = f.run([VOICED] * n) + f.run([SILENT] * 30)
    ends = [e for _, e in only(events, End)]
    starts = [e for _, e in only(events, Start)]
    assert all(e.reason == "max_length" for e in ends[:-1])
    assert ends[-1].reason == "silence"
    assert len(ends) >= n * WINDOW_MS // cfg.max_speech_ms
    # utterances tile the stream: each starts where the previous was cut
    for prev_end, nxt in zip(ends[:-1], starts[1:], strict=True):
        assert isinstance(prev_end, End) and isinstance(nxt, Start)
        assert nxt.start_sample == prev_end.speech_end_sample
        assert nxt.continued
    # and none exceeds the maximum length
    bounds = [s.start_sample for s in starts] + [n * WINDOW]
    for a, b in zip(bounds, bounds[1:], strict=False):
        assert 0 < b - a <= cfg.max_speech_ms * 16


def test_cut_prefers_a_moderately_quiet_stretch_over_the_search_edge() -> None:
    f = Feeder(cut_config())
    loud, quieter = 0.99, 0.7  # both voiced; the dip is a breath between words
    probs = [loud] * 100 + [quieter] * 3 + [loud] * 100
    events: list[SegEvent] = []
    for p in probs:
        events += f.feed(p)
        if any(isinstance(e, End) for e in events):
            break
    (end,) = [e for e in events if isinstance(e, End)]
    assert 100 * WINDOW < end.keep_samples <= 103 * WINDOW


# ---------------------------------------------------------------- reconfigure, flush


def test_reconfigure_changes_silence_for_the_next_windows() -> None:
    f = Feeder()
    f.run([VOICED] * 10)
    f.run([SILENT] * 5)
    f.seg.reconfigure(dataclasses.replace(f.seg.config, silence_ms=320))
    events = f.run([SILENT] * 5)
    ((i, end),) = only(events, End)
    assert isinstance(end, End)
    assert end.reason == "silence"
    assert i == 10 + 320 // WINDOW_MS - 1  # the 10th silent window, not the 22nd


def test_reconfigure_to_longer_silence_keeps_the_utterance_open() -> None:
    f = Feeder()
    f.run([VOICED] * 10)
    f.seg.reconfigure(dataclasses.replace(f.seg.config, silence_ms=2000))
    assert only(f.run([SILENT] * 30), End) == []
    assert f.seg.in_speech
    assert len(only(f.run([SILENT] * 40), End)) == 1


def test_flush_ends_the_open_utterance() -> None:
    cfg = SegmenterConfig()
    f = Feeder(cfg)
    f.run([VOICED] * 10 + [SILENT] * 10)
    (end,) = f.seg.flush()
    assert isinstance(end, End)
    assert end.reason == "flush"
    assert end.speech_end_sample == 10 * WINDOW
    assert end.keep_samples == 10 * WINDOW + cfg.post_pad_ms * 16
    assert not f.seg.in_speech
    assert f.seg.flush() == []


def test_flush_of_a_blip_is_too_short() -> None:
    f = Feeder()
    f.run([VOICED] * 2)
    (end,) = f.seg.flush()
    assert isinstance(end, End)
    assert end.reason == "too_short"


def test_flush_when_idle_forgets_the_pre_roll() -> None:
    f = Feeder()
    f.run([SILENT] * 5 + [VOICED])
    assert f.seg.flush() == []
    events = f.run([VOICED, VOICED])
    ((_, start),) = only(events, Start)
    assert isinstance(start, Start)
    # neither the old pre-roll nor the half onset before the flush count
    assert windows_of(start.audio) == [6, 7]
    assert start.start_sample == 6 * WINDOW
