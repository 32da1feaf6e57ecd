"""Stable interim captions by agreement between successive decodes.

Whisper re-decodes the growing utterance each time, so the end of its text
changes from one decode to the next. A word becomes stable once two
successive decodes agree on it and everything before it (and it is not the
last word, which may be cut by the edge of the audio). Stable words are
never changed again in interims: only the tail after them is revised, so
captions do not flicker.

A new decode may insert or drop a word inside the stable part ("Mr. John
Dashwood" after "Mr. Dashwood"); the stable words are aligned to it so that
its tail starts after them, and the insertion is not shown twice.
"""

from __future__ import annotations

import re
from difflib import SequenceMatcher

_NORM = re.compile(r"[^\w']+")


def _norm(word: str) -> str:
    return _NORM.sub("", word.lower())


class StablePrefix:
    def __init__(self) -> None:
        self.committed: list[str] = []
        self._prev_tail: list[str] = []

    def _tail(self, words: list[str]) -> list[str]:
        """The words of a hypothesis that come after the stable part."""
        if not self.committed:
            return words
        a = [_norm(w) for w in self.committed]
        b = [_norm(w) for w in words]
        blocks = [
            m for m in SequenceMatcher(None, a, b, autojunk=False).get_matching_blocks() if m.size
        ]
        if not blocks:
            return words[len(self.committed) :]
        last = blocks[-1]
        a_end, b_end = last.a + last.size, last.b + last.size
        # stable words after the last match are skipped position by position
        return words[b_end + (len(a) - a_end) :]

    def update(self, text: str) -> tuple[str, float]:
        """Merge a new hypothesis; returns (interim text, stability 0..1)."""
        tail = self._tail(text.split())
        n = 0
        limit = min(len(self._prev_tail), len(tail) - 1)
        while n < limit and _norm(self._prev_tail[n]) == _norm(tail[n]):
            n += 1
        self.committed = self.committed + tail[:n]
        tail = tail[n:]
        self._prev_tail = tail
        out = self.committed + tail
        stability = len(self.committed) / len(out) if out else 0.0
        return " ".join(out), stability

    @property
    def text(self) -> str:
        return " ".join(self.committed)
