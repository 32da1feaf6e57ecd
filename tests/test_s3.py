"""S3 storage against a real S3-compatible server process on loopback (moto's server mode)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from sidecar.events import TranscriptEntry
from sidecar.store import FORMATS, LocalDirStore, TranscriptNotFound
from sidecar.store.s3 import UPLOADED_MARKER, ArchivedStore, Archiver, S3Archive, S3Error
from tests import s3_server
from tests.s3_server import Keys, S3Server

pytest.importorskip("boto3")

REPO = Path(__file__).resolve().parents[1]
ROOM = "weekly@conference.example.org"


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    server = s3_server.start()
    yield server
    s3_server.stop(server)


@pytest.fixture
def bucket(s3: S3Server) -> str:
    name = f"t-{uuid.uuid4().hex[:12]}"
    s3.client().create_bucket(Bucket=name)
    return name


def archive(s3: S3Server, bucket: str, keys: Keys | None = None) -> S3Archive:
    k = keys or s3.full
    return S3Archive(
        bucket=bucket,
        endpoint_url=s3.url,
        access_key_id=k.access_key_id,
        secret_access_key=k.secret_access_key,
        addressing_style="path",
    )


def entry(i: int, name: str = "Alice") -> TranscriptEntry:
    return TranscriptEntry(
        start_time=f"2026-12-01T20:00:{i:02d}.000Z",
        stop_time=f"2026-12-01T20:00:{i:02d}.900Z",
        speaker_id=name.lower(),
        speaker_name=name,
        text=f"sentence number {i}",
        message_id=f"m{i}",
        language="en",
    )


def finished_session(local: LocalDirStore, n: int = 3, room: str = ROOM) -> str:
    w = local.open(room, language="en", started_at=datetime(2026, 12, 1, 20, 0, tzinfo=UTC))
    for i in range(n):
        w.append(entry(i, "Alice" if i % 2 == 0 else "Bob"))
    return w.close().id


def objects(s3: S3Server, bucket: str) -> dict[str, bytes]:
    c = s3.client()
    out = {}
    for o in c.list_objects_v2(Bucket=bucket).get("Contents", []):
        out[o["Key"]] = c.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
    return out


def test_finished_session_is_uploaded_once_with_put_only_credentials(
    tmp_path: Path, s3: S3Server, bucket: str
) -> None:
    local = LocalDirStore(tmp_path)
    tid = finished_session(local)
    arch = Archiver(local, archive(s3, bucket, s3.put_only))  # no read, no delete permission
    assert arch.pending() == [tid]
    assert arch.upload_pending() == 1
    got = objects(s3, bucket)
    assert set(got) == {f"transcripts/{tid}/transcript.{f}" for f in FORMATS} | {
        f"transcripts/{tid}/meta.json"
    }
    for fmt in FORMATS:
        assert got[f"transcripts/{tid}/transcript.{fmt}"] == local.get(tid, fmt)
    assert (local.root / tid / UPLOADED_MARKER).exists()
    assert local.get(tid, "jsonl")  # the local copy is kept
    assert arch.pending() == [] and arch.upload_pending() == 0  # once


def test_open_sessions_are_not_uploaded(tmp_path: Path, s3: S3Server, bucket: str) -> None:
    local = LocalDirStore(tmp_path)
    w = local.open(ROOM, language="en")
    w.append(entry(1))
    arch = Archiver(local, archive(s3, bucket))
    assert arch.upload_pending() == 0
    assert objects(s3, bucket) == {}
    w.close()
    assert arch.upload_pending() == 1


def test_a_session_cut_off_by_a_crash_is_uploaded_at_the_next_start(
    tmp_path: Path, s3: S3Server, bucket: str
) -> None:
    script = textwrap.dedent(
        f"""
        import sys, time
        from sidecar.store import LocalDirStore
        from tests.test_s3 import entry
        w = LocalDirStore(sys.argv[1]).open({ROOM!r}, language="en")
        for i in range(4):
            w.append(entry(i))
        print(w.id, flush=True)
        time.sleep(3600)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path)],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    tid = proc.stdout.readline().strip()
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)

    # the next start: recover, then upload what was recovered
    local = LocalDirStore(tmp_path)
    arch = Archiver(local, archive(s3, bucket))
    assert arch.pending() == []  # not finished yet: nothing to upload
    (meta,) = local.recover()
    assert meta.id == tid and meta.complete is False and meta.entries == 4
    assert arch.upload_pending() == 1
    remote = archive(s3, bucket)
    assert remote.info(tid).complete is False
    assert remote.get(tid, "txt") == local.get(tid, "txt")
    assert b"sentence number 3" in remote.get(tid, "jsonl")


def test_list_get_delete_over_both_stores(tmp_path: Path, s3: S3Server, bucket: str) -> None:
    local = LocalDirStore(tmp_path)
    remote = archive(s3, bucket)
    arch = Archiver(local, remote)
    only_remote = finished_session(local, room="old@conference.example.org")
    arch.upload_pending()
    local.delete(only_remote)  # e.g. another sidecar's, or a local disk replaced
    both = finished_session(local)
    arch.upload_pending()
    only_local = finished_session(local, room="new@conference.example.org")

    store = ArchivedStore(local, remote)
    assert {m.id for m in store.list()} == {only_remote, both, only_local}
    assert [m.id for m in store.list(room="old@conference.example.org")] == [only_remote]
    assert b"sentence number 2" in store.get(only_remote, "jsonl")
    assert store.get(only_remote, "srt").startswith(b"1\n00:00:00,000 --> ")
    assert store.info(only_remote).entries == 3

    assert store.delete(both) is True
    assert not (local.root / both).exists()
    assert f"transcripts/{both}/meta.json" not in objects(s3, bucket)
    with pytest.raises(TranscriptNotFound):
        store.get(both, "txt")
    assert store.delete(only_remote) is True
    assert store.delete(only_remote) is False
    assert {m.id for m in store.list()} == {only_local}


@pytest.mark.parametrize(
    ("what", "needle"),
    [
        ("wrong secret", "the secret access key is wrong (SignatureDoesNotMatch)"),
        ("unknown key", "the access key id is not known to the server (InvalidAccessKeyId)"),
        ("missing bucket", "the bucket does not exist (NoSuchBucket)"),
    ],
)
def test_refused_upload_is_a_clear_error_and_keeps_the_local_copy(
    tmp_path: Path, s3: S3Server, bucket: str, what: str, needle: str
) -> None:
    local = LocalDirStore(tmp_path)
    tid = finished_session(local)
    before = {f: local.get(tid, f) for f in FORMATS}
    if what == "wrong secret":
        bad = archive(s3, bucket, Keys(s3.full.access_key_id, "not-the-secret"))
    elif what == "unknown key":
        bad = archive(s3, bucket, Keys("AKIANOTAKEY0000000", "whatever"))
    else:
        bad = archive(s3, bucket + "-missing")
    with pytest.raises(S3Error) as err:
        Archiver(local, bad).upload_pending()
    assert needle in str(err.value)
    assert bad.bucket in str(err.value) and s3.url in str(err.value)
    assert {f: local.get(tid, f) for f in FORMATS} == before
    assert not (local.root / tid / UPLOADED_MARKER).exists()
    # fixed configuration: the same session goes up on the next try
    assert Archiver(local, archive(s3, bucket)).upload_pending() == 1


def test_a_delete_without_permission_keeps_both_copies(
    tmp_path: Path, s3: S3Server, bucket: str
) -> None:
    local = LocalDirStore(tmp_path)
    tid = finished_session(local)
    Archiver(local, archive(s3, bucket)).upload_pending()
    store = ArchivedStore(local, archive(s3, bucket, s3.put_only))
    with pytest.raises(S3Error, match="AccessDenied"):
        store.delete(tid)
    assert (local.root / tid).exists()
    assert f"transcripts/{tid}/meta.json" in objects(s3, bucket)


async def test_the_archiver_retries_until_the_bucket_exists(
    tmp_path: Path, s3: S3Server, caplog: pytest.LogCaptureFixture
) -> None:
    name = f"t-{uuid.uuid4().hex[:12]}"
    local = LocalDirStore(tmp_path)
    tid = finished_session(local)
    arch = Archiver(local, archive(s3, name), retry_s=0.3)
    with caplog.at_level(logging.ERROR, logger="sidecar.store.s3"):
        arch.start()
        await asyncio.sleep(1.0)
        assert arch.pending() == [tid]
        s3.client().create_bucket(Bucket=name)
        async with asyncio.timeout(20):
            while arch.pending():
                arch.progress.clear()
                await arch.progress.wait()
        await arch.close()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1  # said once, not at every retry
    assert "the bucket does not exist" in errors[0] and "local copy is kept" in errors[0]
    assert archive(s3, name).info(tid).entries == 3


def test_retention_sweeps_the_bucket_and_the_local_directory(
    tmp_path: Path, s3: S3Server, bucket: str
) -> None:
    import time

    from sidecar.config import RetentionConfig
    from sidecar.retention import RetentionSweeper

    local = LocalDirStore(tmp_path)
    remote = archive(s3, bucket)
    old = finished_session(local)
    kept = finished_session(local, room="board@conference.example.org")
    Archiver(local, remote).upload_pending()
    now = time.time() + 15 * 86_400
    sweeper = RetentionSweeper(
        {"local": local, "s3": remote}, RetentionConfig(rooms=("board=0",)), clock=lambda: now
    )
    assert sorted(sweeper.sweep()) == [("local", old), ("s3", old)]
    assert [m.id for m in local.list()] == [kept]
    assert [m.id for m in remote.list()] == [kept]
    assert not any(k.startswith(f"transcripts/{old}/") for k in objects(s3, bucket))


async def test_outputs_from_config_upload_and_announce_a_ready_transcript(
    tmp_path: Path, s3: S3Server, bucket: str
) -> None:
    """The composition from config: a ready transcript is uploaded, and its webhook has the link."""
    from sidecar.config import load_config
    from sidecar.outputs.hub import Outputs
    from sidecar.outputs.webhooks import verify_signature
    from sidecar.room_events import TranscriptReady
    from tests.webhook_receiver import Receiver

    rx = await Receiver().start()
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        textwrap.dedent(
            f"""
            [store]
            store_dir = "{tmp_path / "store"}"
            storage = "s3"
            [s3]
            bucket = "{bucket}"
            endpoint_url = "{s3.url}"
            access_key_id = "{s3.put_only.access_key_id}"
            secret_access_key = "{s3.put_only.secret_access_key}"
            addressing_style = "path"
            upload_retry_s = 1
            [links]
            key = "{"k" * 40}"
            public_url = "https://meet.example.org/captions"
            [[webhooks]]
            name = "crm"
            url = "{rx.url}"
            secret = "0123456789abcdef"
            events = ["transcription.ready"]
            """
        )
    )
    outputs = Outputs(load_config(cfg, env={}), token="t" * 20)
    await outputs.start()
    tid = finished_session(outputs.local)
    meta = outputs.store.info(tid)
    outputs.bus.publish(TranscriptReady(room=ROOM, meta=meta, url=outputs.link(tid)))
    assert outputs.archiver is not None and outputs.webhooks is not None
    async with asyncio.timeout(20):
        while outputs.archiver.pending():
            outputs.archiver.progress.clear()
            await outputs.archiver.progress.wait()
        await outputs.webhooks.drained()
    await outputs.close()
    await rx.stop()
    assert archive(s3, bucket).info(tid).entries == 3
    (got,) = rx.requests
    assert verify_signature("0123456789abcdef", got.headers["Captions-Signature"], got.body)
    url = got.json["data"]["url"]
    assert url.startswith(f"https://meet.example.org/captions/t/{tid}?exp=")
    assert outputs.signer is not None
    q = dict(p.split("=", 1) for p in url.split("?", 1)[1].split("&"))
    assert outputs.signer.check(tid, q["exp"], q["sig"]).value == "ok"


def test_listing_with_the_bucket_away_still_shows_the_local_transcripts(
    tmp_path: Path, s3: S3Server
) -> None:
    local = LocalDirStore(tmp_path)
    tid = finished_session(local)
    store = ArchivedStore(local, archive(s3, "no-such-bucket-here"))
    assert [m.id for m in store.list()] == [tid]
    with pytest.raises(S3Error, match="the bucket does not exist"):
        store.get("20261201T200000Z-gone-00000000", "txt")
