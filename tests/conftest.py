"""Shared fixtures: real speech, the real model, the real pipeline."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import pytest

LIBRIVOX = Path("/usr/share/pocketsphinx/test/data/librivox")


def librivox() -> list[tuple[Path, str]]:
    """(wav, reference) pairs from Debian's pocketsphinx-testdata."""
    if not (LIBRIVOX / "transcription").is_file():
        pytest.skip(
            "pocketsphinx-testdata is not installed (apt-get install pocketsphinx-testdata)"
        )
    out = []
    for line in (LIBRIVOX / "transcription").read_text().splitlines():
        m = re.match(r"<s>\s*(.*?)\s*</s>\s*\((.+)\)", line.strip())
        if m:
            out.append((LIBRIVOX / f"{m.group(2)}.wav", m.group(1)))
    return out


_NUM = {"mr": "mister", "mrs": "missus", "dr": "doctor"}


def normalise(text: str) -> str:
    """Lower case, no punctuation, hyphens split, titles spelled out."""
    text = text.lower().replace("-", " ")
    words = re.findall(r"[a-z0-9']+", text)
    return " ".join(_NUM.get(w, w) for w in words)


async def collect(engine, room: str):  # type: ignore[no-untyped-def]
    """Every caption of a room, in publication order, with arrival times."""
    got: list = []
    r = engine.rooms._room(room)
    loop = asyncio.get_running_loop()
    r.sinks.append(lambda c: got.append((loop.time(), c)))
    return got


async def play(rooms, room: str, tracks: dict[str, list[bytes]]) -> None:  # type: ignore[no-untyped-def]
    """Each participant's 20 ms Opus packets into a room at real-time pace,
    one frame per participant every 20 ms, as the videobridge delivers them."""
    from sidecar.events import Frame

    n = max(len(p) for p in tracks.values())
    t0 = time.monotonic()
    for i in range(n):
        for pid, packets in tracks.items():
            if i < len(packets):
                rooms.push_frame(room, pid, Frame(packets[i], i % 65536, i * 960))
        await asyncio.sleep(max(0.0, t0 + (i + 1) * 0.02 - time.monotonic()))
