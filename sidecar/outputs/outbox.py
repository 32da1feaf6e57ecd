"""A durable outbox: what must still be sent survives a restart or a crash.

One append-only file of JSON lines, each written with a single ``write`` on
an ``O_APPEND`` descriptor and fsynced before the call returns:

- ``{"op":"put", "key":K, "endpoint":E, ...}`` a message to deliver;
- ``{"op":"done", "key":K, "result":"delivered"|"dropped"}`` it is finished.

At start the file is replayed: what was put and not done is pending again,
in the order it was put. A put is fsynced before the event is reported as
accepted, and a done only after the receiver answered, so a crash at any
point loses nothing and at worst sends a message once more (at-least-once;
receivers deduplicate on the event id). A line torn by a crash is skipped.

When the finished records outnumber the pending ones the file is rewritten
with only the pending ones (to a temporary file, fsynced, renamed over the
old one, directory fsynced), so it does not grow for ever.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from sidecar.durable import write_atomic

__all__ = ["Outbox", "OutboxRecord"]

log = logging.getLogger(__name__)

_FILE = "outbox.jsonl"
_COMPACT_MIN_DONE = 256


@dataclass
class OutboxRecord:
    """One message for one endpoint."""

    key: str  # unique: "<endpoint>/<event id>"
    endpoint: str
    event_id: str
    type: str
    created: float  # epoch seconds, when it was put
    body: str  # the exact JSON text to send (signed as is)
    attempts: int = field(default=0, compare=False)

    def to_line(self) -> bytes:
        obj = {
            "op": "put",
            "key": self.key,
            "endpoint": self.endpoint,
            "event_id": self.event_id,
            "type": self.type,
            "created": self.created,
            "body": self.body,
        }
        return (json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n").encode()


class Outbox:
    """The outbox in ``directory`` (created if missing). Thread-safe; calls block on disk."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / _FILE
        self._lock = threading.Lock()
        self._pending: dict[str, OutboxRecord] = {}
        self._done = 0
        self._replay()
        self._fd = self._open()

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)

    def _replay(self) -> None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
        lines = data.split(b"\n")
        torn = lines.pop()
        if torn.strip():
            log.warning(
                "outbox %s: skipping a line torn by a crash (%d bytes)", self.path, len(torn)
            )
        for number, raw in enumerate(lines, 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
                op = obj["op"]
                key = str(obj["key"])
            except (ValueError, KeyError, TypeError):
                log.warning("outbox %s: skipping unreadable line %d", self.path, number)
                continue
            if op == "put":
                try:
                    self._pending[key] = OutboxRecord(
                        key=key,
                        endpoint=str(obj["endpoint"]),
                        event_id=str(obj["event_id"]),
                        type=str(obj["type"]),
                        created=float(obj["created"]),
                        body=str(obj["body"]),
                    )
                except (KeyError, TypeError, ValueError):
                    log.warning("outbox %s: skipping incomplete line %d", self.path, number)
            elif op == "done" and self._pending.pop(key, None) is not None:
                self._done += 1
        if torn.strip():
            # cut the torn fragment off, or the next line would be glued to it
            with open(self.path, "r+b") as f:
                f.truncate(len(data) - len(torn))
                f.flush()
                os.fsync(f.fileno())
        if self._pending:
            log.info("outbox %s: %d messages still to send", self.path, len(self._pending))

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]
        os.fsync(self._fd)

    def put(self, records: Iterable[OutboxRecord]) -> None:
        """Store ``records`` durably (one write and one fsync for all of them)."""
        with self._lock:
            batch = [r for r in records if r.key not in self._pending]
            if not batch:
                return
            self._write(b"".join(r.to_line() for r in batch))
            for r in batch:
                self._pending[r.key] = r

    def done(self, keys: Iterable[str], result: str = "delivered") -> None:
        """Mark ``keys`` finished (durably); unknown keys are ignored."""
        with self._lock:
            known = [k for k in keys if k in self._pending]
            if not known:
                return
            data = b"".join(
                (json.dumps({"op": "done", "key": k, "result": result}) + "\n").encode()
                for k in known
            )
            self._write(data)
            for k in known:
                del self._pending[k]
            self._done += len(known)
            if self._done >= _COMPACT_MIN_DONE and self._done > 2 * len(self._pending):
                self._compact()

    def _compact(self) -> None:
        data = b"".join(r.to_line() for r in self._pending.values())
        write_atomic(self.path, data, mode=0o600)
        os.close(self._fd)
        self._fd = self._open()
        self._done = 0

    def pending(self, endpoint: str | None = None) -> list[OutboxRecord]:
        """What is still to send, oldest first (only ``endpoint``'s when given)."""
        with self._lock:
            return [r for r in self._pending.values() if endpoint is None or r.endpoint == endpoint]

    def __len__(self) -> int:
        return len(self._pending)

    def close(self) -> None:
        with self._lock, contextlib.suppress(OSError):
            os.close(self._fd)
