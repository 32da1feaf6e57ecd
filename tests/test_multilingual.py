"""Non-English rooms use the multilingual model; "auto" detects the language."""

from __future__ import annotations

import asyncio
import json

import pytest

from sidecar.config import RoomSettings, WhisperConfig
from sidecar.engine import Engine
from sidecar.sim.voices import synthesize
from sidecar.transcribe import transcribe_pcm
from tests.conftest import normalise

pytestmark = pytest.mark.slow

GERMAN = "Guten Morgen. Heute sprechen wir über das neue Projekt und den Zeitplan."


def overlap(hyp: str, ref: str) -> float:
    h, r = set(normalise(hyp).split()), set(normalise(ref).split())
    return len(h & r) / len(r)


async def test_german_room_and_auto_detection(tmp_path):
    pcm = await asyncio.to_thread(synthesize, GERMAN, "de")
    engine = Engine(tmp_path / "store", whisper=WhisperConfig(model_cache_dir=tmp_path / "cache"))
    await engine.start(preload=False)
    try:
        results = {}
        for lang in ("de", "auto"):
            tid = await transcribe_pcm(engine, f"room-{lang}", pcm, RoomSettings(language=lang))
            lines = engine.store.get(tid, "jsonl").decode().splitlines()
            results[lang] = [json.loads(x) for x in lines]
    finally:
        await engine.close()
    # the two parts of "base" were joined once into the cache
    assert (tmp_path / "cache" / "whisper-base" / "model.bin").stat().st_size > 100_000_000
    for lang, entries in results.items():
        text = " ".join(e["text"] for e in entries)
        print(lang, text)
        assert overlap(text, GERMAN) >= 0.5, (lang, text)
    assert {e["language"] for e in results["de"]} == {"de"}
    assert {e["language"] for e in results["auto"]} == {"de"}  # detected, not assumed
