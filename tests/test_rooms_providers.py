"""Rooms on the provider interface, without a model: real speech through the
real VAD and segmenter, recognised by the scripted provider.

What a user sees: captions with the right speaker and text in order, a room
served by a failover chain keeps its captions when the first recogniser
fails, a room whose recogniser is down says so while the other rooms go
on, and a provider that cannot serve a room's language is refused with a
clear error when captions are started.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import numpy as np
import pytest

from sidecar.asr.failover import FailoverProvider
from sidecar.audio import load_audio
from sidecar.config import EffectiveSettings, RoomSettings
from sidecar.errors import FailedPrecondition
from sidecar.events import Caption, Frame
from sidecar.pipeline.vad import SileroVad
from sidecar.rooms import RoomManager
from sidecar.store.local import LocalDirStore
from tests.conftest import librivox
from tests.fakes.scripted import ScriptedProvider

SR = 16000
TEXTS = [f"caption number {i}" for i in range(40)]


def speech() -> np.ndarray:
    """Two read sentences with a second of silence after each."""
    gap = np.zeros(SR, np.float32)
    wavs = [wav for wav, _ in librivox()[:2]]
    return np.concatenate([x for w in wavs for x in (load_audio(w), gap)])


def manager(tmp_path: Path, providers: dict, **defaults: object) -> RoomManager:
    return RoomManager(
        defaults=EffectiveSettings(**defaults),  # type: ignore[arg-type]
        store=LocalDirStore(tmp_path),
        providers=providers,
        vad=SileroVad(),
    )


async def feed(rooms: RoomManager, room: str, tracks: dict[str, np.ndarray]) -> None:
    """20 ms PCM frames of each participant, interleaved, faster than real time."""
    n = max(len(a) for a in tracks.values()) // 320
    for i in range(n):
        for pid, audio in tracks.items():
            chunk = audio[i * 320 : (i + 1) * 320]
            if len(chunk) == 320:
                rooms.push_frame(room, pid, Frame(b"", i % 65536, i * 320, pcm=chunk))
        if i % 5 == 0:
            await asyncio.sleep(0.001)


async def run_room(rooms: RoomManager, room: str, tracks: dict[str, np.ndarray]) -> list[Caption]:
    await rooms.start(room, "captions", RoomSettings(), live=False)
    got: list[Caption] = []
    rooms.get(room).sinks.append(got.append)
    await feed(rooms, room, tracks)
    for pid in tracks:
        await rooms.finish_speaker(room, pid)
    await asyncio.sleep(0.1)
    return got


def finals(caps: list[Caption], pid: str) -> list[str]:
    return [c.text for c in caps if not c.is_interim and c.participant_id == pid and c.text]


async def test_room_captions_from_the_scripted_provider(tmp_path: Path) -> None:
    provider = ScriptedProvider(texts=TEXTS)
    rooms = manager(tmp_path, {"whisper": provider})
    audio = speech()
    caps = await run_room(rooms, "room1", {"alice": audio, "bob": audio[SR // 2 :]})
    for pid in ("alice", "bob"):
        got = finals(caps, pid)
        assert got and got == TEXTS[: len(got)], got  # in order, one per utterance
    ids = [c.message_id for c in caps if not c.is_interim]
    assert len(ids) == len(set(ids))  # one final per utterance
    await rooms.close()


async def test_room_on_a_chain_keeps_its_captions_when_the_first_fails(tmp_path: Path) -> None:
    # the room names "azure": a chain of a failing recogniser, then a working one
    bad = ScriptedProvider("azure", texts=TEXTS, faults={"*": "mid"})
    good = ScriptedProvider("whisper", texts=TEXTS)
    chain = FailoverProvider([bad, good], cooldown_s=0.0, name="azure")
    rooms = manager(tmp_path, {"whisper": good, "azure": chain})
    await rooms.update_settings("room1", RoomSettings(provider="azure"))
    caps = await run_room(rooms, "room1", {"alice": speech()})
    got = finals(caps, "alice")
    assert got and got == TEXTS[: len(got)]
    assert "recognition failed" not in rooms.get("room1").warning
    await rooms.close()


async def test_a_failed_recogniser_shows_in_its_room_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    down = ScriptedProvider("google", faults={"*": "auth"})
    ok = ScriptedProvider(texts=TEXTS)
    rooms = manager(tmp_path, {"whisper": ok, "google": down})
    await rooms.update_settings("bad", RoomSettings(provider="google"))
    audio = speech()
    with caplog.at_level(logging.WARNING):
        bad_caps, good_caps = await asyncio.gather(
            run_room(rooms, "bad", {"alice": audio}), run_room(rooms, "good", {"bob": audio})
        )
    assert finals(bad_caps, "alice") == []
    assert finals(good_caps, "bob") and finals(good_caps, "bob")[0] == TEXTS[0]
    bad, good = rooms.get("bad"), rooms.get("good")
    # the room's status says what went wrong; the other room's says nothing
    assert "recognition failed for alice" in bad.warning
    assert "invalid credentials" in bad.warning
    assert "recognition failed" not in good.warning
    assert any("invalid credentials" in r.getMessage() for r in caplog.records)
    await rooms.close()


async def test_capabilities_are_read_when_captions_start(tmp_path: Path) -> None:
    english_only = ScriptedProvider("google", languages=("en-US",), language_detection=False)
    rooms = manager(tmp_path, {"whisper": ScriptedProvider(), "google": english_only})
    await rooms.update_settings("room1", RoomSettings(provider="google", language="de-DE"))
    with pytest.raises(FailedPrecondition, match="de-DE"):
        await rooms.start("room1", "captions")
    await rooms.update_settings("room1", RoomSettings(language="en-US"))
    await rooms.start("room1", "captions")
    await rooms.close()


def test_provider_sections_reach_their_adapters(tmp_path: Path) -> None:
    from sidecar.config import ConfigError, load_config
    from sidecar.engine import Engine

    cfg = tmp_path / "sidecar.toml"
    cfg.write_text(
        '[defaults]\nprovider = "azure"\n[azure]\nregion = "westeurope"\nfallback = ["whisper"]\n'
    )
    env = {"CAPTIONS_AZURE_KEY": "secret"}
    config = load_config(cfg, env=env)
    assert config.providers == {"azure": {"region": "westeurope", "fallback": ["whisper"]}}
    assert config.provider_env == env
    engine = Engine(
        tmp_path,
        defaults=config.defaults,
        providers=config.providers,
        provider_env=config.provider_env,
    )
    chain = engine.rooms.providers["azure"]
    assert isinstance(chain, FailoverProvider)
    assert [p.name for p in chain.providers] == ["azure", "whisper"]
    # a missing credential stops the start with the setting's name
    with pytest.raises(ConfigError, match="CAPTIONS_AZURE_KEY"):
        Engine(tmp_path, providers=config.providers, provider_env={})
