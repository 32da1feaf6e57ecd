"""Synthetic multi-speaker speech with espeak-ng, with the true timings.

The truth (who spoke what, when) is what tests and benchmarks measure
captions against.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sidecar.audio import SAMPLE_RATE, load_audio

VOICES = ("en-us+m3", "en-us+f3", "en-gb+m1", "en-us+f4", "en-gb+f2", "en-us+m7")


class SynthesisUnavailable(RuntimeError):
    pass


def synthesize(text: str, voice: str = VOICES[0], speed: int = 150) -> np.ndarray:
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise SynthesisUnavailable("espeak-ng is not installed (apt-get install espeak-ng)")
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "out.wav"
        subprocess.run(
            [exe, "-v", voice, "-s", str(speed), "-w", str(wav), text],
            check=True,
            capture_output=True,
            timeout=60,
        )
        pcm = load_audio(wav)
    return trim(pcm)


def trim(pcm: np.ndarray, threshold: float = 0.01) -> np.ndarray:
    """Cut leading and trailing silence so the truth timings are exact."""
    idx = np.flatnonzero(np.abs(pcm) > threshold)
    if len(idx) == 0:
        return pcm[:0]
    return pcm[idx[0] : idx[-1] + 1]


@dataclass(frozen=True, slots=True)
class Turn:
    speaker: str
    text: str
    start: float  # seconds from the start of the conversation
    end: float


@dataclass
class Conversation:
    tracks: dict[str, np.ndarray]  # one equal-length track per speaker
    turns: list[Turn]

    @property
    def duration(self) -> float:
        return max((len(t) for t in self.tracks.values()), default=0) / SAMPLE_RATE


def build_conversation(
    script: list[tuple[str, str]],
    voices: dict[str, str] | None = None,
    *,
    gap: float = 0.8,
    overlap: float = 0.0,
    lead: float = 0.5,
    tail: float = 1.5,
) -> Conversation:
    """Lay out turns one after another; ``overlap`` > 0 starts a turn that
    many seconds before the previous one ends (when speakers differ)."""
    speakers = list(dict.fromkeys(s for s, _ in script))
    voices = voices or {s: VOICES[i % len(VOICES)] for i, s in enumerate(speakers)}
    clips = [(s, text, synthesize(text, voices[s])) for s, text in script]
    t = lead
    turns: list[Turn] = []
    prev_speaker = None
    for s, text, pcm in clips:
        if prev_speaker is not None and prev_speaker != s and overlap > 0:
            t = max(turns[-1].start + 0.3, t - gap - overlap)
        start = t
        end = start + len(pcm) / SAMPLE_RATE
        turns.append(Turn(s, text, start, end))
        t = end + gap
        prev_speaker = s
    total = int((max(tr.end for tr in turns) + tail) * SAMPLE_RATE)
    tracks = {s: np.zeros(total, np.float32) for s in speakers}
    for (s, _, pcm), tr in zip(clips, turns, strict=True):
        i = int(tr.start * SAMPLE_RATE)
        tracks[s][i : i + len(pcm)] += pcm * 0.8
    return Conversation(tracks, turns)
