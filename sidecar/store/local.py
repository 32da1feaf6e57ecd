"""A transcript store in a local directory, built so that a crash loses nothing acknowledged.

Layout, one directory per session::

    <root>/<id>/transcript.jsonl   one Stream-format object per line, appended as we go
    <root>/<id>/meta.json          TranscriptMeta, replaced atomically at open and close
    <root>/<id>/transcript.srt|vtt|txt|md   renderings, written at close (or by recover)

Sessions are assembled in ``<root>/.new-<id>`` and renamed into place, so a
session directory is never seen without its JSONL file and meta.json. Deleting
renames the directory to ``<root>/.trash-...`` first, so readers see a session
either whole or not at all. A writer holds an exclusive ``flock`` on its JSONL
file for as long as it is open; the kernel drops the lock when the process
dies, which is how :meth:`LocalDirStore.recover` tells a crashed session from a
live one, in this process or another.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import threading
import time
import unicodedata
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from prometheus_client import Counter, Histogram

from sidecar.durable import fsync_dir, write_atomic
from sidecar.events import TranscriptEntry
from sidecar.store.base import (
    FORMATS,
    InvalidTranscriptId,
    StoreError,
    TranscriptMeta,
    TranscriptNotFound,
    TranscriptStore,
    TranscriptWriter,
    validate_format,
    validate_transcript_id,
)
from sidecar.store.render import (
    entry_from_dict,
    entry_to_json_line,
    format_iso,
    parse_iso,
    render,
)

__all__ = ["LocalDirStore", "LocalTranscriptWriter"]

log = logging.getLogger(__name__)
WRITE_SECONDS = Histogram(
    "captions_transcript_write_seconds",
    "Time to append and fsync one transcript line",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
WRITTEN_BYTES = Counter("captions_transcript_written_bytes_total", "Transcript bytes appended")

_JSONL = "transcript.jsonl"
_META = "meta.json"
_RENDERED: tuple[str, ...] = tuple(f for f in FORMATS if f != "jsonl")
_NEW_PREFIX = ".new-"
_TRASH_PREFIX = ".trash-"
# A staging directory lives for milliseconds; one this old was left by a crash.
_STALE_STAGING_S = 300.0
_STAMP_RE = re.compile(r"(\d{8}T\d{6}Z)-")
_ID_ATTEMPTS = 8


# --- small filesystem helpers -------------------------------------------------------------


def _room_slug(room: str) -> str:
    """``[a-z0-9-]{1,40}`` from the local part of a room JID (``name@conference.host``)."""
    local = room.split("@", 1)[0]
    # NFKD then ASCII drops accents ("Réunion" -> "reunion") instead of whole letters.
    folded = unicodedata.normalize("NFKD", local).encode("ascii", "ignore").decode("ascii")
    slug = re.sub(r"[^a-z0-9]+", "-", folded.lower()).strip("-")
    return slug[:40].rstrip("-") or "room"


def _os_reason(exc: OSError) -> str:
    """``ENOSPC (No space left on device)``: short, and without a caller's path."""
    name = errno.errorcode.get(exc.errno or 0, "")
    text = exc.strerror or str(exc)
    return f"{name} ({text})" if name else text


def _meta_bytes(meta: TranscriptMeta) -> bytes:
    return (json.dumps(meta.to_dict(), indent=2) + "\n").encode("ascii")


def _parse_line(raw: bytes) -> TranscriptEntry | None:
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    return entry_from_dict(obj) if isinstance(obj, dict) else None


def _split_jsonl(data: bytes, where: str) -> tuple[list[TranscriptEntry], bytes]:
    """Entries in ``data`` and the bytes that hold them, leaving out damaged lines.

    The second value is ``data`` cut after its last complete line: a crash in
    the middle of a write can leave a fragment without its newline.
    """
    entries: list[TranscriptEntry] = []
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" unless the last write was torn
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        entry = _parse_line(raw)
        if entry is None:
            log.warning("%s: skipping unreadable line %d", where, number)
        else:
            entries.append(entry)
    kept = data[: len(data) - len(tail)]
    if tail.strip():
        entry = _parse_line(tail)
        if entry is None:
            log.warning(
                "%s: skipping truncated last line (%d bytes) left by an interrupted write",
                where,
                len(tail),
            )
        else:
            # A whole object that only lost its newline: a torn prefix cannot parse,
            # because the closing brace is the last byte of the line.
            entries.append(entry)
            kept = data + b"\n"
    return entries, kept


def _read_jsonl(directory: Path) -> tuple[list[TranscriptEntry], bytes]:
    path = directory / _JSONL
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        if not directory.is_dir():
            raise
        return [], b""
    return _split_jsonl(data, str(path))


def _stamp_time(tid: str) -> str:
    """The start time encoded in a store-made id, or ``""``."""
    match = _STAMP_RE.match(tid)
    if match is None:
        return ""
    try:
        moment = datetime.strptime(match.group(1), "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    except ValueError:
        return ""
    return format_iso(moment)


def _present_formats(directory: Path) -> list[str]:
    return [f for f in FORMATS if (directory / f"transcript.{f}").is_file()]


def _load_meta(directory: Path) -> TranscriptMeta:
    """meta.json of a session, falling back to what the directory itself shows.

    Never raises for bad content: a missing or corrupt meta.json yields a meta
    with ``complete=False`` and ``ended_at=""`` (so :meth:`LocalDirStore.recover`
    finishes it), with the other fields derived from the id and the entries.
    """
    tid = directory.name
    raw: object = None
    try:
        raw = json.loads((directory / _META).read_bytes())
    except FileNotFoundError:
        if not directory.is_dir():
            raise
        log.warning("%s: meta.json is missing; deriving metadata", directory)
    except (OSError, ValueError) as exc:
        log.warning("%s: meta.json is unreadable (%s); deriving metadata", directory, exc)
    fields: dict[str, object] = raw if isinstance(raw, dict) else {}
    bad: list[str] = [] if fields else ["everything"]

    def text(key: str) -> str | None:
        value = fields.get(key)
        if isinstance(value, str):
            return value
        bad.append(key)
        return None

    room = text("room")
    started_at = text("started_at")
    ended_at = text("ended_at")
    language = text("language")
    count = fields.get("entries")
    # bool is an int subclass; "entries": true is as corrupt as a string.
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        bad.append("entries")
    complete = fields.get("complete")
    if not isinstance(complete, bool):
        bad.append("complete")
    formats = fields.get("formats")
    if not isinstance(formats, list):
        bad.append("formats")

    if not bad and ended_at:
        return TranscriptMeta(
            id=tid,
            room=room or "",
            started_at=started_at or "",
            ended_at=ended_at,
            language=language or "",
            entries=count if isinstance(count, int) else 0,
            complete=complete is True,
            formats=[f for f in formats if f in FORMATS] if isinstance(formats, list) else [],
        )
    if bad and fields:
        log.warning("%s: meta.json has bad fields %s; deriving them", directory, bad)

    # Open, crashed or damaged: the JSONL file is the only trustworthy count, and an
    # unknown end is treated as "never finished" so that recover() repairs it.
    entries, _ = _read_jsonl(directory)
    if not started_at:
        started_at = _stamp_time(tid) or (entries[0].start_time if entries else "")
    if language is None:
        language = next((e.language for e in entries if e.language), "")
    return TranscriptMeta(
        id=tid,
        room=room or "",
        started_at=started_at,
        ended_at="",
        language=language,
        entries=len(entries),
        complete=False,
        formats=_present_formats(directory),
    )


def _render_session(fmt: str, entries: list[TranscriptEntry], meta: TranscriptMeta) -> str:
    title = f"Transcript: {meta.room}" if meta.room else f"Transcript {meta.id}"
    return render(
        fmt,
        entries,
        title=title,
        meta=meta.to_dict(),
        # Cue times count from the session start, so they match the meeting clock.
        origin=parse_iso(meta.started_at),
    )


def _finish(directory: Path, meta: TranscriptMeta, entries: list[TranscriptEntry]) -> None:
    """Write every rendering, then meta.json: the meta is the commit point of a close."""
    formats = ["jsonl"] if (directory / _JSONL).is_file() else []
    for fmt in _RENDERED:
        try:
            text = _render_session(fmt, entries, meta)
        except Exception:
            # A rendering bug must not keep the session from being closed;
            # get() retries rendering on demand.
            log.exception("transcript %s: could not render %s", meta.id, fmt)
            continue
        write_atomic(directory / f"transcript.{fmt}", text.encode("utf-8"))
        formats.append(fmt)
    meta.entries = len(entries)
    meta.formats = formats
    write_atomic(directory / _META, _meta_bytes(meta))


# --- the writer ---------------------------------------------------------------------------


class LocalTranscriptWriter(TranscriptWriter):
    """Appends to ``<root>/<id>/transcript.jsonl``; made by :meth:`LocalDirStore.open`."""

    def __init__(self, directory: Path, fd: int, meta: TranscriptMeta) -> None:
        self.id = meta.id
        self.meta = meta
        self.directory = directory
        self._fd = fd
        self._size = os.fstat(fd).st_size
        self._closed = False
        # Callers promise one thread at a time; the lock makes a broken promise
        # fail safe instead of interleaving a close with an append.
        self._lock = threading.Lock()

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has run."""
        return self._closed

    def append(self, entry: TranscriptEntry) -> None:
        """Write ``entry`` as one JSONL line and fsync it before returning.

        The line goes out in a single ``os.write`` on an ``O_APPEND`` file, so
        after a crash the file ends either before the line or after all of it.

        Raises:
            StoreError: when the writer is closed or the disk refuses the line
                (a partly written line is cut off again so the file stays valid).
        """
        if not isinstance(entry, TranscriptEntry):
            raise TypeError(f"expected TranscriptEntry, got {type(entry).__name__}")
        line = entry_to_json_line(entry)
        with self._lock:
            if self._closed:
                raise StoreError(f"transcript {self.id} is closed")
            t0 = time.monotonic()
            try:
                written = os.write(self._fd, line)
            except OSError as exc:
                self._cut_back()
                raise StoreError(
                    f"transcript {self.id}: could not append: {_os_reason(exc)}"
                ) from exc
            if written != len(line):
                # a short write is how a filling disk first shows; the next
                # write of the rest names the reason (ENOSPC, EDQUOT, EFBIG)
                reason = "the disk took no more"
                try:
                    os.write(self._fd, line[written:])
                except OSError as exc:
                    reason = _os_reason(exc)
                self._cut_back()
                raise StoreError(
                    f"transcript {self.id}: short write ({written} of {len(line)} bytes): {reason}"
                )
            try:
                os.fsync(self._fd)
            except OSError as exc:
                # not durable, so not written: the caller may try the line again
                self._cut_back()
                raise StoreError(
                    f"transcript {self.id}: could not sync: {_os_reason(exc)}"
                ) from exc
            self._size += written
            self.meta.entries += 1
            WRITE_SECONDS.observe(time.monotonic() - t0)
            WRITTEN_BYTES.inc(written)

    def _cut_back(self) -> None:
        # Without this, the next line would be glued to the fragment and both lost.
        try:
            os.ftruncate(self._fd, self._size)
        except OSError:
            log.exception("transcript %s: could not remove a partly written line", self.id)

    def close(self, complete: bool = True) -> TranscriptMeta:
        """Write the renderings and the final meta.json, then release the file.

        Closing a session that was deleted while open writes nothing. Closing
        twice returns the same meta.

        Raises:
            StoreError: if the files could not be written; the session then stays
                open on disk and :meth:`LocalDirStore.recover` will finish it.
        """
        with self._lock:
            if self._closed:
                return self.meta
            self._closed = True
            try:
                self.meta.ended_at = format_iso(datetime.now(UTC))
                self.meta.complete = complete
                try:
                    entries, _ = _read_jsonl(self.directory)
                    _finish(self.directory, self.meta, entries)
                except FileNotFoundError:
                    log.info("transcript %s was deleted while open; nothing to finish", self.id)
                except OSError as exc:
                    raise StoreError(
                        f"transcript {self.id}: could not close: {_os_reason(exc)}"
                    ) from exc
            finally:
                # Closing the descriptor also drops the flock that marks us live.
                os.close(self._fd)
            return self.meta

    def __del__(self) -> None:
        # A writer dropped without close() must not leak its descriptor (and lock);
        # the session stays open on disk for recover() to finish.
        if not getattr(self, "_closed", True):
            self._closed = True
            with contextlib.suppress(OSError):
                os.close(self._fd)


# --- the store ----------------------------------------------------------------------------


class LocalDirStore(TranscriptStore):
    """Transcripts as plain files under ``root`` (created if missing)."""

    def __init__(self, root: Path) -> None:
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        self.root = root.resolve()

    def _dir_for(self, tid: str) -> Path:
        validate_transcript_id(tid)
        path = self.root / tid
        # Belt and braces: even a valid-looking id must not escape through a symlink.
        resolved = path.resolve()
        if resolved.parent != self.root or resolved.name != tid:
            raise InvalidTranscriptId(f"transcript id {tid!r} resolves outside the store")
        return path

    def _session_dirs(self) -> Iterator[Path]:
        try:
            items = list(os.scandir(self.root))
        except FileNotFoundError:
            return
        for item in items:
            try:
                validate_transcript_id(item.name)
            except InvalidTranscriptId:
                continue  # staging, trash and stray files
            if item.is_dir(follow_symlinks=False):
                yield self.root / item.name

    def open(
        self, room: str, *, language: str, started_at: datetime | None = None
    ) -> LocalTranscriptWriter:
        """Create a session ``<yyyymmddTHHMMSSZ>-<room slug>-<8 hex>`` and return its writer.

        Raises:
            StoreError: when the disk refuses (full, read-only, gone); nothing
                of the attempt is left behind.
        """
        try:
            return self._open(room, language=language, started_at=started_at)
        except StoreError:
            raise
        except OSError as exc:
            raise StoreError(
                f"cannot open a transcript under {self.root}: {_os_reason(exc)}"
            ) from exc

    def _open(
        self, room: str, *, language: str, started_at: datetime | None = None
    ) -> LocalTranscriptWriter:
        if not isinstance(room, str):
            raise TypeError(f"room must be a str, got {type(room).__name__}")
        start = datetime.now(UTC) if started_at is None else started_at
        start = start.replace(tzinfo=UTC) if start.tzinfo is None else start.astimezone(UTC)
        prefix = f"{start.strftime('%Y%m%dT%H%M%SZ')}-{_room_slug(room)}-"
        for _ in range(_ID_ATTEMPTS):
            tid = prefix + secrets.token_hex(4)
            final = self._dir_for(tid)
            staging = self.root / f"{_NEW_PREFIX}{tid}"
            if final.exists():
                continue
            try:
                staging.mkdir()
            except FileExistsError:
                continue
            fd: int | None = None
            try:
                fd = os.open(
                    staging / _JSONL,
                    os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC,
                    0o644,
                )
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                meta = TranscriptMeta(
                    id=tid,
                    room=room,
                    started_at=format_iso(start),
                    ended_at="",
                    language=language,
                    entries=0,
                    complete=False,
                    formats=["jsonl"],
                )
                write_atomic(staging / _META, _meta_bytes(meta))
                try:
                    # rename() refuses a non-empty target, so a racing twin cannot be clobbered.
                    os.rename(staging, final)
                except OSError as exc:
                    if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                        raise
                    os.close(fd)
                    fd = None
                    shutil.rmtree(staging, ignore_errors=True)
                    continue
                fsync_dir(self.root)
            except BaseException:
                if fd is not None:
                    os.close(fd)
                shutil.rmtree(staging, ignore_errors=True)
                raise
            log.info("transcript %s opened for room %s", tid, room)
            return LocalTranscriptWriter(final, fd, meta)
        raise StoreError(f"could not find a free transcript id after {_ID_ATTEMPTS} tries")

    def list(self, room: str | None = None, limit: int = 100) -> builtins.list[TranscriptMeta]:
        """Sessions newest first (by start time, then id), only ``room``'s when given."""
        if limit <= 0:
            return []
        metas: builtins.list[TranscriptMeta] = []
        for directory in self._session_dirs():
            try:
                meta = _load_meta(directory)
            except FileNotFoundError:
                continue  # deleted while we looked
            if room is None or meta.room == room:
                metas.append(meta)
        metas.sort(key=lambda m: (m.started_at, m.id), reverse=True)
        return metas[:limit]

    def get(self, id: str, fmt: str = "jsonl") -> bytes:
        """The transcript in ``fmt``.

        JSONL is served from the file as written (a fragment torn by a crash is
        left out). Other formats come from the rendering written at close, or
        are rendered now for a session that is open or lacks the file.
        """
        directory = self._dir_for(id)
        validate_format(fmt)
        if not directory.is_dir():
            raise TranscriptNotFound(f"no transcript with id {id!r}")
        try:
            if fmt == "jsonl":
                return _read_jsonl(directory)[1]
            try:
                return (directory / f"transcript.{fmt}").read_bytes()
            except FileNotFoundError:
                pass
            meta = _load_meta(directory)
            entries, _ = _read_jsonl(directory)
            return _render_session(fmt, entries, meta).encode("utf-8")
        except FileNotFoundError as exc:
            raise TranscriptNotFound(f"transcript {id!r} was deleted") from exc

    def info(self, id: str) -> TranscriptMeta:
        """Metadata of the transcript (entry count read from the file while open)."""
        directory = self._dir_for(id)
        try:
            if directory.is_dir():
                return _load_meta(directory)
        except FileNotFoundError:
            pass
        raise TranscriptNotFound(f"no transcript with id {id!r}")

    def delete(self, id: str) -> bool:
        """Remove the transcript's directory; False if there was none.

        A writer still open on it keeps appending into the void and its close
        writes nothing.
        """
        directory = self._dir_for(id)
        if not directory.is_dir():
            return False
        trash = self.root / f"{_TRASH_PREFIX}{id}-{secrets.token_hex(4)}"
        try:
            # One atomic step out of sight; the slow rmtree happens where no reader looks.
            os.rename(directory, trash)
        except FileNotFoundError:
            return False
        fsync_dir(self.root)
        shutil.rmtree(trash, ignore_errors=True)
        if trash.exists():
            log.warning("could not remove %s completely; recover() will retry", trash)
        log.info("transcript %s deleted", id)
        return True

    def recover(self) -> builtins.list[TranscriptMeta]:
        """Finish sessions left open by a crash: render them and mark them incomplete.

        Sessions whose writer is alive (in this process or another) are skipped.
        The end time becomes the last entry's stop time (the start time when
        there are none). Also clears staging and trash left by crashes.
        """
        self._sweep()
        recovered: builtins.list[TranscriptMeta] = []
        for directory in sorted(self._session_dirs()):
            try:
                if _load_meta(directory).ended_at:
                    continue
                meta = self._recover_one(directory)
            except FileNotFoundError:
                continue
            except OSError:
                # One damaged session must not keep the others from being recovered.
                log.exception("could not recover transcript %s", directory.name)
                continue
            if meta is not None:
                recovered.append(meta)
        return recovered

    def _recover_one(self, directory: Path) -> TranscriptMeta | None:
        fd: int | None
        try:
            fd = os.open(directory / _JSONL, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            if not directory.is_dir():
                return None
            fd = None  # sessions are published with their JSONL, so no writer can exist
        try:
            if fd is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return None  # a live writer holds it
            # Read again under the lock: the writer may have closed in between.
            meta = _load_meta(directory)
            if meta.ended_at:
                return None
            entries, _ = _read_jsonl(directory)
            stops = [t for t in (parse_iso(e.stop_time) for e in entries) if t is not None]
            if stops:
                meta.ended_at = format_iso(max(stops))
            else:
                meta.ended_at = meta.started_at or format_iso(datetime.now(UTC))
            meta.complete = False
            _finish(directory, meta, entries)
        finally:
            if fd is not None:
                os.close(fd)
        log.warning(
            "transcript %s was left open by a crash; recovered %d entries, marked incomplete",
            meta.id,
            meta.entries,
        )
        return meta

    def _sweep(self) -> None:
        try:
            items = list(os.scandir(self.root))
        except FileNotFoundError:
            return
        now = time.time()
        for item in items:
            if item.name.startswith(_TRASH_PREFIX):
                shutil.rmtree(item.path, ignore_errors=True)
            elif item.name.startswith(_NEW_PREFIX):
                try:
                    age = now - item.stat(follow_symlinks=False).st_mtime
                except FileNotFoundError:
                    continue
                if age > _STALE_STAGING_S:
                    # Its open() never returned, so no entry in it was acknowledged.
                    shutil.rmtree(item.path, ignore_errors=True)
