"""Finished transcripts in an S3-compatible bucket (AWS, MinIO, Ceph, any endpoint URL).

The local directory (:class:`~sidecar.store.local.LocalDirStore`, fsynced per
final) stays the source of truth while a session runs. When it is finished
(closed, or recovered after a crash) the :class:`Archiver` uploads its files
once, as::

    <prefix><id>/transcript.jsonl, .srt, .vtt, .txt, .md
    <prefix><id>/meta.json            (last: its presence means "complete upload")

Uploading needs only ``s3:PutObject``, never a delete permission. A failed
upload is retried every ``upload_retry_s``; the local copy is never touched
by the upload (retention removes it with the remote one). A successful upload
leaves a marker file ``.uploaded`` in the local session directory, so a
restart uploads what was missed and nothing twice.

:class:`ArchivedStore` serves list / get / info / delete over both stores:
local first, the bucket for what is only there.

Requires the ``s3`` extra (``pip install 'jitsi-captions-sidecar[s3]'``).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import json
import logging
import os
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from prometheus_client import Counter, Gauge

from sidecar.store.base import (
    FORMATS,
    StoreError,
    TranscriptMeta,
    TranscriptNotFound,
    TranscriptStore,
    TranscriptWriter,
    validate_format,
    validate_transcript_id,
)
from sidecar.store.local import LocalDirStore

__all__ = ["ArchivedStore", "Archiver", "S3Archive", "S3Error", "UPLOADED_MARKER"]

log = logging.getLogger(__name__)

UPLOADED_MARKER = ".uploaded"

UPLOADS = Counter("captions_s3_uploads_total", "Transcript uploads to S3 by result", ["result"])
UPLOAD_PENDING = Gauge("captions_s3_uploads_pending", "Finished transcripts not yet uploaded")

_CONTENT_TYPES = {
    "jsonl": "application/x-ndjson; charset=utf-8",
    "srt": "application/x-subrip; charset=utf-8",
    "vtt": "text/vtt; charset=utf-8",
    "txt": "text/plain; charset=utf-8",
    "md": "text/markdown; charset=utf-8",
}

_CODES = {
    "NoSuchBucket": "the bucket does not exist",
    "InvalidAccessKeyId": "the access key id is not known to the server",
    "SignatureDoesNotMatch": "the secret access key is wrong",
    "AccessDenied": "the credentials lack the permission",
    "InvalidBucketName": "the bucket name is not valid",
    "ExpiredToken": "the credentials have expired",
}


class S3Error(StoreError):
    """An S3 request failed; the message says which bucket, what and why."""

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code


def _import_boto3() -> Any:
    try:
        import boto3
        from botocore.config import Config
    except ImportError as e:  # pragma: no cover - depends on the install
        raise StoreError(
            "store.storage = 's3' needs boto3: pip install 'jitsi-captions-sidecar[s3]'"
        ) from e
    return boto3, Config


class S3Archive:
    """The remote half: transcripts under ``prefix`` in ``bucket``. Calls block (use a thread)."""

    def __init__(
        self,
        *,
        bucket: str,
        prefix: str = "transcripts/",
        endpoint_url: str = "",
        region: str = "us-east-1",
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        addressing_style: str = "auto",
        client: Any = None,
    ) -> None:
        if not bucket:
            raise StoreError("s3.bucket is required")
        self.bucket = bucket
        self.prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"
        self.endpoint_url = endpoint_url
        self.where = f"S3 bucket {bucket!r}" + (f" at {endpoint_url}" if endpoint_url else "")
        if client is None:
            boto3, Config = _import_boto3()
            client = boto3.client(
                "s3",
                endpoint_url=endpoint_url or None,
                region_name=region,
                aws_access_key_id=access_key_id,
                aws_secret_access_key=secret_access_key,
                config=Config(
                    s3={"addressing_style": addressing_style},
                    retries={"max_attempts": 3, "mode": "standard"},
                    connect_timeout=5,
                    read_timeout=30,
                ),
            )
        self.client = client

    @classmethod
    def from_config(cls, cfg: Any) -> S3Archive:
        """From an :class:`~sidecar.config.S3Config`."""
        return cls(
            bucket=cfg.bucket,
            prefix=cfg.prefix,
            endpoint_url=cfg.endpoint_url,
            region=cfg.region,
            access_key_id=cfg.access_key_id,
            secret_access_key=cfg.require_secret(),
            addressing_style=cfg.addressing_style,
        )

    def _key(self, tid: str, name: str) -> str:
        return f"{self.prefix}{validate_transcript_id(tid)}/{name}"

    def _error(self, what: str, exc: Exception) -> S3Error:
        code = ""
        response = getattr(exc, "response", None)
        if isinstance(response, dict):
            code = str(response.get("Error", {}).get("Code", ""))
        reason = _CODES.get(code) or (f"{code}" if code else f"{type(exc).__name__}: {exc}")
        return S3Error(
            f"{self.where}: {what} failed: {reason}" + (f" ({code})" if code else ""), code
        )

    def _call(self, what: str, fn: Callable[..., Any], **kw: Any) -> Any:
        try:
            return fn(**kw)
        except Exception as e:
            code = ""
            response = getattr(e, "response", None)
            if isinstance(response, dict):
                code = str(response.get("Error", {}).get("Code", ""))
            if code in ("NoSuchKey", "404", "NotFound"):
                raise TranscriptNotFound(f"{what}: not in {self.where}") from e
            raise self._error(what, e) from e

    def check(self) -> None:
        """Fail early, with a clear message, when the bucket cannot be reached."""
        self._call("checking the bucket", self.client.head_bucket, Bucket=self.bucket)

    def upload(self, directory: Path, tid: str) -> TranscriptMeta:
        """Upload a finished local session; meta.json goes last (the commit point)."""
        meta_raw = (directory / "meta.json").read_bytes()
        meta = _meta_from_json(meta_raw, tid)
        for fmt in FORMATS:
            path = directory / f"transcript.{fmt}"
            if not path.is_file():
                continue
            self._call(
                f"uploading {tid} ({fmt})",
                self.client.put_object,
                Bucket=self.bucket,
                Key=self._key(tid, f"transcript.{fmt}"),
                Body=path.read_bytes(),
                ContentType=_CONTENT_TYPES[fmt],
            )
        self._call(
            f"uploading {tid} (meta.json)",
            self.client.put_object,
            Bucket=self.bucket,
            Key=self._key(tid, "meta.json"),
            Body=meta_raw,
            ContentType="application/json",
        )
        return meta

    def ids(self) -> builtins.list[str]:
        """Every transcript id with a meta.json in the bucket."""
        out: builtins.list[str] = []
        token: str | None = None
        while True:
            kw: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self.prefix, "Delimiter": "/"}
            if token:
                kw["ContinuationToken"] = token
            page = self._call("listing transcripts", self.client.list_objects_v2, **kw)
            for cp in page.get("CommonPrefixes", []):
                tid = cp["Prefix"][len(self.prefix) :].rstrip("/")
                with contextlib.suppress(StoreError):
                    out.append(validate_transcript_id(tid))
            if not page.get("IsTruncated"):
                return out
            token = page.get("NextContinuationToken")

    def info(self, tid: str) -> TranscriptMeta:
        obj = self._call(
            f"reading {tid}",
            self.client.get_object,
            Bucket=self.bucket,
            Key=self._key(tid, "meta.json"),
        )
        return _meta_from_json(obj["Body"].read(), tid)

    def list(self, room: str | None = None, limit: int = 100) -> builtins.list[TranscriptMeta]:
        metas: builtins.list[TranscriptMeta] = []
        for tid in self.ids():
            try:
                meta = self.info(tid)
            except TranscriptNotFound:
                continue  # an upload in progress (files before meta.json) or a delete
            if room is None or meta.room == room:
                metas.append(meta)
        metas.sort(key=lambda m: (m.started_at, m.id), reverse=True)
        return metas[: max(0, limit)]

    def get(self, tid: str, fmt: str = "jsonl") -> bytes:
        validate_format(fmt)
        obj = self._call(
            f"reading {tid} ({fmt})",
            self.client.get_object,
            Bucket=self.bucket,
            Key=self._key(tid, f"transcript.{fmt}"),
        )
        return bytes(obj["Body"].read())

    def delete(self, tid: str) -> bool:
        """Remove every object of ``tid`` (meta.json first, so it stops being listed)."""
        validate_transcript_id(tid)
        kw: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self._key(tid, "")}
        page = self._call(f"listing {tid}", self.client.list_objects_v2, **kw)
        keys = [o["Key"] for o in page.get("Contents", [])]
        if not keys:
            return False
        keys.sort(key=lambda k: not k.endswith("/meta.json"))
        self._call(
            f"deleting {tid}",
            self.client.delete_objects,
            Bucket=self.bucket,
            Delete={"Objects": [{"Key": k} for k in keys], "Quiet": True},
        )
        log.info("transcript %s deleted from %s", tid, self.where)
        return True


def _meta_from_json(raw: bytes, tid: str) -> TranscriptMeta:
    try:
        obj = json.loads(raw)
        return TranscriptMeta(
            id=tid,
            room=str(obj.get("room", "")),
            started_at=str(obj.get("started_at", "")),
            ended_at=str(obj.get("ended_at", "")),
            language=str(obj.get("language", "")),
            entries=int(obj.get("entries", 0)),
            complete=bool(obj.get("complete", False)),
            formats=[f for f in obj.get("formats", []) if f in FORMATS],
        )
    except (ValueError, TypeError, AttributeError) as e:
        raise StoreError(f"transcript {tid}: meta.json is unreadable: {e}") from e


class Archiver:
    """Uploads finished local sessions to the bucket, once each, retrying failures."""

    def __init__(self, local: LocalDirStore, archive: S3Archive, *, retry_s: float = 60.0) -> None:
        self.local = local
        self.archive = archive
        self.retry_s = retry_s
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.last_error: S3Error | None = None
        self.progress = asyncio.Event()  # set after every round of uploads (tests, shutdown)

    def pending(self) -> builtins.list[str]:
        """Finished local sessions without an upload marker, oldest first."""
        out = []
        for meta in reversed(self.local.list(limit=1_000_000)):
            if meta.ended_at and not (self.local.root / meta.id / UPLOADED_MARKER).exists():
                out.append(meta.id)
        return out

    def upload_one(self, tid: str) -> None:
        """Upload ``tid`` and mark it; raises :class:`S3Error` (the local copy stays)."""
        directory = self.local.root / validate_transcript_id(tid)
        try:
            self.archive.upload(directory, tid)
        except FileNotFoundError:
            return  # deleted meanwhile
        except S3Error:
            UPLOADS.labels("failed").inc()
            raise
        UPLOADS.labels("ok").inc()
        marker = directory / UPLOADED_MARKER
        with contextlib.suppress(FileNotFoundError):
            fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
            os.fsync(fd)
            os.close(fd)
        log.info("transcript %s uploaded to %s", tid, self.archive.where)

    def upload_pending(self) -> int:
        """Upload everything pending; returns how many went up. Raises on the first failure."""
        todo = self.pending()
        UPLOAD_PENDING.set(len(todo))
        done = 0
        for tid in todo:
            self.upload_one(tid)
            done += 1
            UPLOAD_PENDING.set(len(todo) - done)
        return done

    def notify(self) -> None:
        """A session finished: upload now rather than at the next retry."""
        self._wake.set()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="s3-archiver")

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            try:
                await asyncio.to_thread(self.upload_pending)
                self.last_error = None
                timeout: float | None = None
            except S3Error as e:
                if self.last_error is None or str(e) != str(self.last_error):
                    log.error(
                        "%s; the local copy is kept and the upload retried in %.0f s",
                        e,
                        self.retry_s,
                    )
                self.last_error = e
                timeout = self.retry_s
            except Exception:
                log.exception("s3 archiver failed; retrying in %.0f s", self.retry_s)
                timeout = self.retry_s
            self.progress.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


class ArchivedStore(TranscriptStore):
    """A local directory in front of a bucket: writes go local, reads fall back to the bucket."""

    def __init__(self, local: LocalDirStore, archive: S3Archive) -> None:
        self.local = local
        self.archive = archive

    @property
    def root(self) -> Path:
        return self.local.root

    def open(
        self, room: str, *, language: str, started_at: datetime | None = None
    ) -> TranscriptWriter:
        return self.local.open(room, language=language, started_at=started_at)

    def list(self, room: str | None = None, limit: int = 100) -> builtins.list[TranscriptMeta]:
        try:
            remote = self.archive.list(room, limit=1_000_000)
        except S3Error as e:
            # the bucket being away must not hide what is on disk
            log.warning("%s; listing the local transcripts only", e)
            remote = []
        metas = {m.id: m for m in remote}
        metas.update({m.id: m for m in self.local.list(room, limit=1_000_000)})
        out = sorted(metas.values(), key=lambda m: (m.started_at, m.id), reverse=True)
        return out[: max(0, limit)]

    def get(self, id: str, fmt: str = "jsonl") -> bytes:
        try:
            return self.local.get(id, fmt)
        except TranscriptNotFound:
            return self.archive.get(id, fmt)

    def info(self, id: str) -> TranscriptMeta:
        try:
            return self.local.info(id)
        except TranscriptNotFound:
            return self.archive.info(id)

    def delete(self, id: str) -> bool:
        remote = self.archive.delete(id)
        local = self.local.delete(id)
        return remote or local

    def recover(self) -> builtins.list[TranscriptMeta]:
        return self.local.recover()
