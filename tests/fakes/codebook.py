"""Synthetic speech that every fake recogniser "recognises" the same way.

A word is a block of constant samples whose level names it in
:data:`VOCABULARY`; words are separated by a short digital silence. The
fakes decode what they are sent, so a test can check exactly which audio a
service received: nothing lost, nothing sent twice, in order, after a
failover or a stream restart. Levels survive the float32 -> 16-bit PCM
conversion of the adapters (a step of 256 leaves room for rounding).
"""

from __future__ import annotations

import numpy as np

SR = 16000
WORD_MS = 200
GAP_MS = 60
STEP = 256  # int16 levels per word index
MIN_RUN = SR * 40 // 1000  # shorter runs are edges of a cut word

_WORDS = (
    "hello world this is a test of the captions sidecar we are speaking about "
    "weather coffee meeting tomorrow morning please send notes budget plan next "
    "week project review good idea thanks everyone agenda first item second third "
    "question answer later again sorry yes no maybe team release monday friday"
)
VOCABULARY = tuple(_WORDS.split())
_INDEX = {w: i for i, w in enumerate(VOCABULARY)}


def encode(text: str, *, gap_ms: int = GAP_MS, lead_ms: int = 0) -> np.ndarray:
    """float32 audio for ``text`` (words of VOCABULARY)."""
    parts = [np.zeros(SR * lead_ms // 1000, np.float32)]
    for w in text.lower().split():
        level = (_INDEX[w] + 1) * STEP
        parts.append(np.full(SR * WORD_MS // 1000, level / 32767.0, np.float32))
        parts.append(np.zeros(SR * gap_ms // 1000, np.float32))
    return np.concatenate(parts)


def silence(ms: int) -> np.ndarray:
    return np.zeros(SR * ms // 1000, np.float32)


def runs(pcm: np.ndarray) -> list[tuple[int, int, int]]:
    """(start, end, word index or -1 for silence) runs of int16 samples."""
    if not len(pcm):
        return []
    idx = np.rint(pcm.astype(np.int32) / STEP).astype(np.int32) - 1
    change = np.flatnonzero(np.diff(idx)) + 1
    starts = np.concatenate([[0], change])
    ends = np.concatenate([change, [len(idx)]])
    return [(int(s), int(e), int(idx[s])) for s, e in zip(starts, ends, strict=True)]


def decode_pcm16(data: bytes) -> list[str]:
    """The words in 16-bit little-endian PCM (runs cut short at an edge are dropped)."""
    pcm = np.frombuffer(data[: len(data) // 2 * 2], "<i2")
    return [VOCABULARY[i] for s, e, i in runs(pcm) if 0 <= i < len(VOCABULARY) and e - s >= MIN_RUN]


def word_ends(data: bytes) -> list[tuple[str, int]]:
    """(word, sample index after it) for each word in 16-bit PCM."""
    pcm = np.frombuffer(data[: len(data) // 2 * 2], "<i2")
    return [
        (VOCABULARY[i], e) for s, e, i in runs(pcm) if 0 <= i < len(VOCABULARY) and e - s >= MIN_RUN
    ]


def decode_float(audio: np.ndarray) -> list[str]:
    return decode_pcm16((np.clip(audio, -1, 1) * 32767.0).astype("<i2").tobytes())
