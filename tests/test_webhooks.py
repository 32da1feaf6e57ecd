"""Webhooks against a real HTTP receiver: signatures, retries, the durable outbox."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from sidecar.config import ConfigError, WebhookEndpoint, load_config
from sidecar.events import Caption
from sidecar.outputs.outbox import Outbox, OutboxRecord
from sidecar.outputs.webhooks import SIGNATURE_HEADER, WebhookSender, sign, verify_signature
from sidecar.room_events import (
    EVENT_TYPES,
    CaptionPublished,
    EventBus,
    RoomEnded,
    RoomEvent,
    SessionFailed,
    SessionStarted,
    SessionStopped,
    TranscriptReady,
)
from sidecar.store.base import TranscriptMeta
from tests.webhook_receiver import Receiver, free_port

REPO = Path(__file__).resolve().parents[1]
SECRET = "whsec-test-0123456789abcdef"
ROOM = "weekly@conference.example.org"


def endpoint(url: str, events: set[str] | None = None, name: str = "crm", **kw: float):
    kw.setdefault("backoff_initial_s", 0.05)
    kw.setdefault("backoff_max_s", 0.2)
    kw.setdefault("timeout_s", 2.0)
    return WebhookEndpoint(name, url, SECRET, frozenset(events or EVENT_TYPES), **kw)


def caption(text: str, interim: bool = False) -> Caption:
    return Caption(
        room=ROOM,
        participant_id="abcd1234",
        participant_name="Alice",
        message_id="m1",
        text=text,
        is_interim=interim,
        stability=0.5,
        language="en",
        start_time_ms=1_764_600_000_000,
        end_time_ms=1_764_600_002_000,
        timestamp_ms=1_764_600_002_100,
    )


def one_of_each() -> list[RoomEvent]:
    meta = TranscriptMeta(
        id="20261201T200000Z-weekly-0011aabb",
        room=ROOM,
        started_at="2026-12-01T20:00:00.000Z",
        ended_at="2026-12-01T20:30:00.000Z",
        language="en",
        entries=3,
        complete=True,
        formats=["jsonl", "srt", "vtt", "txt", "md"],
    )
    return [
        SessionStarted(room=ROOM, kind="transcription", transcript_id=meta.id),
        SessionStarted(room=ROOM, kind="captions"),
        CaptionPublished(room=ROOM, caption=caption("hel", interim=True)),
        CaptionPublished(room=ROOM, caption=caption("hello")),
        SessionFailed(room=ROOM, kind="captions", cause="xmpp", message="cannot join"),
        SessionFailed(room=ROOM, kind="transcription", cause="store_write", message="disk"),
        SessionStopped(room=ROOM, kind="captions", reason="user"),
        SessionStopped(room=ROOM, kind="transcription", reason="source_ended"),
        TranscriptReady(room=ROOM, meta=meta, url="https://meet.example.org/t/x"),
        RoomEnded(room=ROOM),
    ]


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_every_event_type_arrives_signed_with_a_stable_schema(tmp_path: Path) -> None:
    rx = await Receiver().start()
    bus = EventBus()
    sender = WebhookSender([endpoint(rx.url)], tmp_path / "outbox")
    sender.attach(bus)
    await sender.start()
    events = one_of_each()
    assert sorted({e.type for e in events}) == sorted(EVENT_TYPES)
    for e in events:
        bus.publish(e)
    async with asyncio.timeout(20):
        await sender.drained()
    await sender.close()
    await rx.stop()

    assert [r.json["type"] for r in rx.requests] == [e.type for e in events]  # in order
    for r, e in zip(rx.requests, events, strict=True):
        assert verify_signature(SECRET, r.headers[SIGNATURE_HEADER], r.body)
        assert not verify_signature(
            "another-secret-0123456789", r.headers[SIGNATURE_HEADER], r.body
        )
        assert not verify_signature(SECRET, r.headers[SIGNATURE_HEADER], r.body + b" ")
        body = r.json
        assert body["version"] == 1
        assert body["id"] == e.id == r.headers["Captions-Event-Id"]
        assert r.headers["Captions-Event-Type"] == e.type
        assert body["room"] == ROOM
        assert set(body) == {"version", "id", "type", "created_at", "room", "data"}
    ready = next(r.json for r in rx.requests if r.json["type"] == "transcription.ready")
    assert ready["data"]["transcript"]["formats"] == ["jsonl", "srt", "vtt", "txt", "md"]
    assert ready["data"]["url"] == "https://meet.example.org/t/x"
    stopped = next(r.json for r in rx.requests if r.json["type"] == "transcription.stopped")
    assert stopped["data"]["reason"] == "source_ended"
    failed = next(r.json for r in rx.requests if r.json["type"] == "transcription.failed")
    assert failed["data"]["cause"] == "store_write"
    final = next(r.json for r in rx.requests if r.json["type"] == "caption.final")
    assert final["data"]["text"] == "hello"
    assert final["data"]["participant"] == {"id": "abcd1234", "name": "Alice"}
    assert sender.pending() == 0


async def test_each_endpoint_gets_only_the_events_it_asked_for(tmp_path: Path) -> None:
    crm, ops = await Receiver().start(), await Receiver().start()
    bus = EventBus()
    sender = WebhookSender(
        [
            endpoint(crm.url, {"transcription.ready"}, name="crm"),
            endpoint(ops.url, {"transcription.failed", "captions.failed"}, name="ops"),
        ],
        tmp_path / "outbox",
    )
    sender.attach(bus)
    await sender.start()
    for e in one_of_each():
        bus.publish(e)
    async with asyncio.timeout(20):
        await sender.drained()
    await sender.close()
    await crm.stop()
    await ops.stop()
    assert [r.json["type"] for r in crm.requests] == ["transcription.ready"]
    assert sorted(r.json["type"] for r in ops.requests) == [
        "captions.failed",
        "transcription.failed",
    ]


def test_signature_is_hmac_sha256_over_timestamp_dot_body_and_expires() -> None:
    import hashlib
    import hmac

    body = b'{"a":1}'
    header = sign(SECRET, 1_764_600_000, body)
    mac = hmac.new(SECRET.encode(), b"1764600000." + body, hashlib.sha256).hexdigest()
    assert header == f"t=1764600000,v1={mac}"
    assert verify_signature(SECRET, header, body, now=1_764_600_100)
    assert not verify_signature(SECRET, header, body, now=1_764_600_000 + 301)  # replayed late
    assert not verify_signature(SECRET, "t=1764600000,v1=00", body, now=1_764_600_000)
    assert not verify_signature(SECRET, "garbage", body)


async def test_receiver_down_then_back_gets_everything_once(tmp_path: Path) -> None:
    rx = Receiver()  # not listening yet: connections are refused
    bus = EventBus()
    sender = WebhookSender([endpoint(rx.url, {"transcription.started"})], tmp_path / "outbox")
    sender.attach(bus)
    await sender.start()
    events = [SessionStarted(room=f"r{i}@conference.x", kind="transcription") for i in range(30)]
    for e in events:
        bus.publish(e)
    async with asyncio.timeout(10):
        await sender.flushed()
    before = metric("captions_webhook_attempts_total", endpoint="crm", result="network_error")
    await asyncio.sleep(1.0)
    assert sender.pending("crm") == 30
    assert (
        metric("captions_webhook_attempts_total", endpoint="crm", result="network_error") > before
    )
    await rx.start()
    async with asyncio.timeout(30):
        await sender.drained()
    await sender.close()
    await rx.stop()
    ids = [r.event_id for r in rx.accepted]
    assert ids == [e.id for e in events]  # all, in order, none twice
    assert Outbox(tmp_path / "outbox").pending() == []


async def test_server_errors_are_retried_with_backoff_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # the first 8 answers are 503, then 200
    rx = await Receiver(status=lambda n: 503 if n <= 8 else 200).start()
    url = rx.url + "?api_key=TOPSECRETKEY"
    bus = EventBus()
    sender = WebhookSender([endpoint(url, {"room.ended"}, name="flaky")], tmp_path / "outbox")
    sender.attach(bus)
    await sender.start()
    events = [RoomEnded(room=f"r{i}@conference.x") for i in range(3)]
    with caplog.at_level(logging.WARNING, logger="sidecar.outputs.webhooks"):
        for e in events:
            bus.publish(e)
        async with asyncio.timeout(30):
            await sender.drained()
    await sender.close()
    await rx.stop()
    assert [r.event_id for r in rx.accepted] == [e.id for e in events]
    # the first message was tried until the receiver recovered, with growing gaps
    first = [r for r in rx.requests if r.event_id == events[0].id]
    assert [r.headers["Captions-Delivery-Attempt"] for r in first] == [str(i) for i in range(1, 10)]
    text = caplog.text
    assert "webhook endpoint 'flaky' keeps failing: 5 attempts in a row, last: HTTP 503" in text
    assert "'flaky' is delivering again" in text
    assert "TOPSECRETKEY" not in text


async def test_a_lost_answer_means_the_same_event_again_with_the_same_id(tmp_path: Path) -> None:
    # the receiver takes the first request but answers too late: the sender retries
    rx = await Receiver().start()
    rx.delay_s = 1.5
    bus = EventBus()
    sender = WebhookSender([endpoint(rx.url, {"room.ended"}, timeout_s=0.5)], tmp_path / "outbox")
    sender.attach(bus)
    await sender.start()
    e = RoomEnded(room=ROOM)
    bus.publish(e)
    await asyncio.sleep(1.2)
    rx.delay_s = 0.0
    async with asyncio.timeout(20):
        await sender.drained()
    await sender.close()
    await rx.stop()
    assert len(rx.requests) >= 2
    assert {r.event_id for r in rx.requests} == {e.id}  # receivers deduplicate on it
    assert len({r.body for r in rx.requests}) == 1  # the very same bytes


async def test_events_in_the_outbox_survive_sigkill_and_go_out_after_restart(
    tmp_path: Path,
) -> None:
    port = free_port()
    outbox = tmp_path / "outbox"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(  # noqa: ASYNC220 (a child we SIGKILL, not awaited)
        [
            sys.executable,
            "-m",
            "tests.webhook_child",
            str(outbox),
            f"http://127.0.0.1:{port}/hook",
            "25",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 60)
        assert line.startswith("QUEUED "), line
        ids = line.split()[1:]
        assert len(ids) == 25
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    assert proc.returncode == -signal.SIGKILL

    rx = await Receiver(port=port).start()
    from tests.webhook_child import SECRET as CHILD_SECRET

    ep = WebhookEndpoint("crash", rx.url, CHILD_SECRET, frozenset({"transcription.started"}))
    sender = WebhookSender([ep], outbox)
    await sender.start()  # no bus: only what the outbox holds
    async with asyncio.timeout(30):
        await sender.drained()
    await sender.close()
    await rx.stop()
    assert [r.event_id for r in rx.accepted] == ids
    for r in rx.accepted:
        assert verify_signature(CHILD_SECRET, r.headers[SIGNATURE_HEADER], r.body)


def test_outbox_replay_skips_a_torn_line_and_compacts(tmp_path: Path) -> None:
    box = Outbox(tmp_path)
    recs = [
        OutboxRecord(f"e/{i}", "e", str(i), "room.ended", time.time(), json.dumps({"i": i}))
        for i in range(600)
    ]
    box.put(recs)
    box.done([r.key for r in recs[:590]])
    box.close()
    # compaction rewrote the file with the pending ones only
    lines = (tmp_path / "outbox.jsonl").read_bytes().splitlines()
    assert len(lines) < 600
    with open(tmp_path / "outbox.jsonl", "ab") as f:
        f.write(b'{"op":"put","key":"e/torn","endp')  # a crash in the middle of a write
    again = Outbox(tmp_path)
    assert [r.key for r in again.pending()] == [r.key for r in recs[590:]]
    again.put([OutboxRecord("e/new", "e", "new", "room.ended", time.time(), "{}")])
    again.close()
    assert [r.key for r in Outbox(tmp_path).pending()][-1] == "e/new"  # not glued to the fragment


async def test_messages_older_than_max_age_are_dropped_with_an_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    now = [1_000_000.0]
    rx = Receiver()  # down for good
    sender = WebhookSender(
        [endpoint(rx.url, {"room.ended"}, max_age_s=60.0, name="gone")],
        tmp_path / "outbox",
        clock=lambda: now[0],
    )
    await sender.start()
    await sender.accept([RoomEnded(room=ROOM)])
    await asyncio.sleep(0.3)
    assert sender.pending() == 1
    now[0] += 61
    with caplog.at_level(logging.ERROR, logger="sidecar.outputs.webhooks"):
        async with asyncio.timeout(10):
            await sender.drained()
    await sender.close()
    assert sender.pending() == 0
    assert "webhook endpoint 'gone': dropping room.ended event" in caplog.text
    assert metric("captions_webhook_deliveries_total", endpoint="gone", result="dropped") == 1


def test_webhook_configuration_errors_name_the_entry(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        '[[webhooks]]\nname = "a"\nurl = "http://127.0.0.1/h"\nsecret = "0123456789abcdef"\n'
        'events = ["transcription.ready", "caption.final"]\n'
    )
    (ep,) = load_config(cfg, env={}).webhooks
    assert ep.events == {"transcription.ready", "caption.final"}
    for bad, needle in (
        ('name = "A B"\nurl = "http://x/"\nsecret = "0123456789abcdef"', "webhooks[0].name"),
        ('name = "a"\nurl = "ftp://x/"\nsecret = "0123456789abcdef"', "webhooks[a].url"),
        ('name = "a"\nurl = "http://x/"\nsecret = "short"', "webhooks[a].secret"),
        (
            'name = "a"\nurl = "http://x/"\nsecret = "0123456789abcdef"\nevents = ["nope"]',
            "'nope' is not one of",
        ),
    ):
        cfg.write_text("[[webhooks]]\n" + bad + "\n")
        with pytest.raises(ConfigError, match=__import__("re").escape(needle)):
            load_config(cfg, env={})


async def test_the_documented_receiver_verifies_real_deliveries(tmp_path: Path) -> None:
    """docs/examples/webhook_receiver.py, run as the docs say, accepts what the sender signs."""
    port = free_port()
    proc = subprocess.Popen(  # noqa: ASYNC220 (a child we terminate)
        [sys.executable, str(REPO / "docs/examples/webhook_receiver.py"), str(port)],
        env=dict(os.environ, WEBHOOK_SECRET=SECRET),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        bus = EventBus()
        url = f"http://127.0.0.1:{port}/"
        good = endpoint(url, {"room.ended"}, name="docs")
        bad = WebhookEndpoint(
            "docs-bad",
            url,
            "a-different-secret-0000",
            frozenset({"room.ended"}),
            backoff_initial_s=5.0,
        )
        sender = WebhookSender([good, bad], tmp_path / "outbox")
        sender.attach(bus)
        await sender.start()
        e = RoomEnded(room=ROOM)
        bus.publish(e)
        assert proc.stdout is not None
        lines = []
        while len(lines) < 2:
            lines.append(await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 30))
        assert sorted(lines) == sorted(
            [f"verified room.ended {e.id} room={ROOM}\n", "refused: bad signature\n"]
        )
        assert sender.pending("docs-bad") == 1  # a refused delivery stays to be retried
        await sender.close()
    finally:
        proc.terminate()
        proc.wait(10)


async def test_the_sidecar_sigkilled_with_events_in_the_outbox_sends_them_after_restart(
    tmp_path: Path,
) -> None:
    """The whole sidecar, not just the sender: its room events survive a SIGKILL."""
    from sidecar.server import Sidecar

    port = free_port()
    cfg = tmp_path / "sidecar.toml"
    cfg.write_text(
        f"""
[server]
token = "crash-token-0123456789"
grpc_listen = "127.0.0.1:0"
http_listen = "127.0.0.1:0"
[store]
store_dir = "{tmp_path / "store"}"
[[webhooks]]
name = "crm"
url = "http://127.0.0.1:{port}/hook"
secret = "{SECRET}"
backoff_initial_s = 0.05
backoff_max_s = 0.2
"""
    )
    proc = subprocess.Popen(  # noqa: ASYNC220 (a child we SIGKILL)
        [sys.executable, "-m", "tests.webhook_sidecar_child", str(cfg)],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 120)
        assert line.startswith("QUEUED "), line
        ids = line.split()[1:]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    assert len(ids) == 6  # two starts, ready, two stops, ended

    rx = await Receiver(port=port).start()
    sidecar = Sidecar(load_config(cfg, env={}))
    await sidecar.start(preload=False)
    assert sidecar.outputs.webhooks is not None
    async with asyncio.timeout(30):
        await sidecar.outputs.webhooks.drained()
    await sidecar.stop()
    await rx.stop()
    assert [r.event_id for r in rx.accepted] == ids
    types = [r.json["type"] for r in rx.accepted]
    assert types == [
        "transcription.started",
        "captions.started",
        "captions.stopped",
        "transcription.ready",
        "transcription.stopped",
        "room.ended",
    ]
    for r in rx.accepted:
        assert verify_signature(SECRET, r.headers[SIGNATURE_HEADER], r.body)
