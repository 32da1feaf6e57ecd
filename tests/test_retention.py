"""Retention with a controllable clock: per deployment, per room, 0 keeps."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from sidecar.config import ConfigError, RetentionConfig, load_config
from sidecar.events import TranscriptEntry
from sidecar.retention import RetentionSweeper
from sidecar.store import LocalDirStore

DAY = 86_400.0


def session(store: LocalDirStore, room: str) -> str:
    w = store.open(room, language="en")
    w.append(
        TranscriptEntry(
            start_time="2026-12-01T20:00:00.000Z",
            stop_time="2026-12-01T20:00:01.000Z",
            speaker_id="a",
            speaker_name="A",
            text="hello",
        )
    )
    return w.close().id


def deleted_total(store: str) -> float:
    return REGISTRY.get_sample_value("captions_retention_deleted_total", {"store": store}) or 0.0


def test_default_is_fourteen_days_and_rooms_override_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert RetentionConfig().days == 14
    store = LocalDirStore(tmp_path)
    plain = session(store, "weekly@conference.example.org")
    keep = session(store, "board@conference.example.org")
    short = session(store, "standup@conference.example.org")
    still_open = store.open("weekly@conference.example.org", language="en")
    now = [time.time()]
    policy = RetentionConfig(rooms=("board=0", "standup@conference.example.org=2"))
    sweeper = RetentionSweeper({"local": store}, policy, clock=lambda: now[0])

    now[0] += 1.5 * DAY
    assert sweeper.sweep() == []
    now[0] += 1 * DAY  # 2.5 days: past standup's 2
    before = deleted_total("local")
    with caplog.at_level(logging.INFO, logger="sidecar.retention"):
        assert sweeper.sweep() == [("local", short)]
    assert deleted_total("local") == before + 1
    assert f"retention: deleted transcript {short} of room standup@conference.example.org" in (
        caplog.text
    )
    assert "retention 2 days" in caplog.text
    now[0] += 12 * DAY  # 14.5 days: past the default
    assert sweeper.sweep() == [("local", plain)]
    now[0] += 10_000 * DAY
    assert sweeper.sweep() == []  # board keeps (0) and the open session is never touched
    assert {m.id for m in store.list()} == {keep, still_open.id}
    still_open.close()


def test_zero_days_keeps_everything(tmp_path: Path) -> None:
    store = LocalDirStore(tmp_path)
    tid = session(store, "weekly@conference.example.org")
    sweeper = RetentionSweeper(
        {"local": store}, RetentionConfig(days=0), clock=lambda: time.time() + 1e6 * DAY
    )
    assert sweeper.sweep() == []
    assert store.info(tid)


def test_retention_configuration(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[retention]\ndays = 30\nrooms = ["board=0", "x@conference.y=3"]\n')
    r = load_config(cfg, env={}).retention
    assert (r.days_for("Board@conference.example.org"), r.days_for("x@conference.y")) == (0, 3)
    assert r.days_for("other@conference.y") == 30
    env = {"CAPTIONS_RETENTION_DAYS": "7", "CAPTIONS_RETENTION_ROOMS": "a=1,b=2"}
    r = load_config(None, env=env).retention
    assert (r.days, r.days_for("b@c.d")) == (7, 2)
    cfg.write_text('[retention]\nrooms = ["board"]\n')
    with pytest.raises(ConfigError, match="retention.rooms: 'board' is not ROOM=DAYS"):
        load_config(cfg, env={})
