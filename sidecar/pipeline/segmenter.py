"""Cuts one speaker's audio into utterances from per-window VAD probabilities.

An utterance ends (and gets its final caption) after ``silence_ms`` of
silence, or is cut at ``max_speech_ms``, at the quietest point of its last
seconds so that words are not split. A ``Pause`` event comes earlier, after
``pause_ms`` of silence, so that the recogniser can start the final decode
while the segmenter is still waiting to be sure the speaker has finished:
when the silence holds, the final is already (nearly) done.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from sidecar.pipeline.vad import WINDOW

WINDOW_MS = WINDOW * 1000 // 16000  # 32


@dataclass(frozen=True, slots=True)
class SegmenterConfig:
    silence_ms: int = 700
    max_speech_ms: int = 9000
    pause_ms: int = 192
    pre_roll_ms: int = 320
    post_pad_ms: int = 160
    min_speech_ms: int = 160  # voiced time below which an utterance is noise
    threshold: float = 0.5
    neg_threshold: float = 0.35
    start_windows: int = 2


@dataclass(slots=True)
class Start:
    start_sample: int  # stream sample index of the first sample of the utterance
    audio: np.ndarray  # pre-roll and onset
    # True after a cut at the maximum length: the utterance starts with the
    # audio of the previous one past its End.keep_samples (the consumer has it)
    continued: bool = False


@dataclass(slots=True)
class Audio:
    audio: np.ndarray


@dataclass(slots=True)
class Pause:
    speech_end_sample: int


@dataclass(slots=True)
class Resume:
    pass


@dataclass(slots=True)
class End:
    reason: str  # "silence" | "max_length" | "flush" | "too_short"
    speech_end_sample: int
    keep_samples: int  # the utterance's audio is its first keep_samples samples
    # how long the VAD was sure it heard speech (windows at or above the start
    # threshold): what tells a real one-word reply from a decode of noise
    voiced_ms: int = 0


SegEvent = Start | Audio | Pause | Resume | End


class Segmenter:
    def __init__(self, config: SegmenterConfig) -> None:
        self.config = config
        self._pre: deque[np.ndarray] = deque(maxlen=max(1, config.pre_roll_ms // WINDOW_MS))
        self._onset = 0
        self.in_speech = False
        self._utt_start = 0  # sample index
        self._utt_len = 0  # samples in the current utterance
        self._probs: list[float] = []  # per window of the utterance
        self._silent = 0  # consecutive silent windows
        self._voiced = 0  # voiced windows in the utterance
        self._paused = False
        self._speech_end = 0  # sample index just after the last voiced window

    def reconfigure(self, config: SegmenterConfig) -> None:
        """Takes effect from the next window (a live settings change)."""
        self.config = config

    def feed(self, window: np.ndarray, prob: float, start_sample: int) -> list[SegEvent]:
        cfg = self.config
        if not self.in_speech:
            self._pre.append(window)
            if prob >= cfg.threshold:
                self._onset += 1
            else:
                self._onset = 0
            if self._onset < cfg.start_windows:
                return []
            audio = np.concatenate(list(self._pre))
            self._pre.clear()
            self.in_speech = True
            self._utt_start = start_sample + len(window) - len(audio)
            self._utt_len = len(audio)
            n = len(audio) // WINDOW
            self._probs = [0.0] * (n - self._onset) + [1.0] * self._onset
            self._silent = 0
            self._voiced = self._onset
            self._paused = False
            self._speech_end = start_sample + len(window)
            self._onset = 0
            return [Start(self._utt_start, audio)]

        out: list[SegEvent] = [Audio(window)]
        self._utt_len += len(window)
        self._probs.append(prob)
        if prob >= cfg.neg_threshold:
            if self._paused:
                out.append(Resume())
                self._paused = False
            self._silent = 0
            self._voiced += 1
            self._speech_end = start_sample + len(window)
        else:
            self._silent += 1
            if not self._paused and self._silent * WINDOW_MS >= cfg.pause_ms:
                self._paused = True
                out.append(Pause(self._speech_end))
        if self._silent * WINDOW_MS >= cfg.silence_ms:
            out.append(self._end("silence"))
        elif self._utt_len * 1000 // 16000 >= cfg.max_speech_ms:
            out.extend(self._cut())
        return out

    def _end(self, reason: str) -> End:
        cfg = self.config
        keep = self._speech_end - self._utt_start + cfg.post_pad_ms * 16
        keep = max(0, min(keep, self._utt_len))
        if reason != "max_length" and self._voiced * WINDOW_MS < cfg.min_speech_ms:
            reason = "too_short"
        self.in_speech = False
        self._pre.clear()
        self._onset = 0
        return End(reason, self._speech_end, keep, self._sure_ms(len(self._probs)))

    def _sure_ms(self, windows: int) -> int:
        t = self.config.threshold
        return sum(1 for q in self._probs[:windows] if q >= t) * WINDOW_MS

    def _cut(self) -> list[SegEvent]:
        """Forced end at the maximum length, at the quietest recent window."""
        probs = self._probs
        look = min(len(probs) - 1, 2500 // WINDOW_MS)  # search the last 2.5 s
        lo = len(probs) - look
        if look <= 0:
            idx = len(probs)
        else:
            # smoothed over 3 windows so a single dip inside a word does not win
            p = np.asarray(probs[lo:], dtype=np.float32)
            # edge-padded, so the ends of the search are not favoured
            sm = np.convolve(np.pad(p, 1, mode="edge"), np.ones(3, np.float32) / 3, "valid")
            idx = lo + int(np.argmin(sm)) + 1
        keep = idx * WINDOW
        end = End("max_length", self._utt_start + keep, keep, self._sure_ms(idx))
        # the rest continues as a new utterance with the same audio
        new_start = self._utt_start + keep
        self._utt_start = new_start
        self._utt_len = self._utt_len - keep
        self._probs = probs[idx:]
        self._voiced = sum(1 for q in self._probs if q >= self.config.neg_threshold)
        self._silent = 0
        self._paused = False
        if self._voiced == 0:
            # the cut fell in the silence after the speech: nothing continues
            self.in_speech = False
            self._pre.clear()
            self._onset = 0
            return [end]
        return [end, Start(new_start, np.zeros(0, np.float32), continued=True)]

    def flush(self) -> list[SegEvent]:
        """End the current utterance now (stream ended or room stopped)."""
        if not self.in_speech:
            self._pre.clear()
            self._onset = 0
            return []
        return [self._end("flush")]
