"""Interfaces, value types and errors shared by every transcript store backend."""

from __future__ import annotations

import abc
import builtins
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime
from types import TracebackType

from sidecar.events import TranscriptEntry

__all__ = [
    "FORMATS",
    "InvalidTranscriptId",
    "StoreError",
    "TranscriptMeta",
    "TranscriptNotFound",
    "TranscriptStore",
    "TranscriptWriter",
    "UnknownFormat",
    "validate_format",
    "validate_transcript_id",
]

#: Every format ``TranscriptStore.get`` can serve; ``jsonl`` is the source of truth.
FORMATS: tuple[str, ...] = ("jsonl", "srt", "vtt", "txt", "md")

_ID_PATTERN = "^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class StoreError(Exception):
    """Base class of every error raised by a transcript store."""


class InvalidTranscriptId(StoreError, ValueError):
    """A transcript id is malformed, or would name a path outside the store."""


class TranscriptNotFound(StoreError, KeyError):
    """No transcript has the requested id."""

    def __str__(self) -> str:
        # KeyError.__str__ repr()s its argument, which would quote the message.
        return str(self.args[0]) if self.args else ""


class UnknownFormat(StoreError, ValueError):
    """A transcript was requested in a format the store cannot produce."""


def _shorten(value: object, limit: int = 80) -> str:
    """repr() of a caller-supplied value, cut short so hostile input cannot flood logs."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def validate_transcript_id(id: str) -> str:
    """Return ``id`` unchanged if it is a well-formed transcript id.

    Ids match ``^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$`` and never contain ``..``,
    so no id can name a path outside the store (no separators, no parent
    references, no absolute paths, no NUL).

    Raises:
        InvalidTranscriptId: for anything else, including non-strings.
    """
    # fullmatch, not match with "$": "$" also matches before a trailing newline.
    if not isinstance(id, str) or _ID_RE.fullmatch(id) is None or ".." in id:
        raise InvalidTranscriptId(
            f"invalid transcript id {_shorten(id)}: expected 1-128 characters matching "
            f"{_ID_PATTERN} with no '..'"
        )
    return id


def validate_format(fmt: str) -> str:
    """Return ``fmt`` if it is one of :data:`FORMATS`, else raise :class:`UnknownFormat`."""
    if not isinstance(fmt, str) or fmt not in FORMATS:
        raise UnknownFormat(
            f"unknown transcript format {_shorten(fmt)}: expected one of {', '.join(FORMATS)}"
        )
    return fmt


@dataclass
class TranscriptMeta:
    """What a store knows about one transcript session.

    ``ended_at`` is ``""`` while the session is open (or was cut off and not
    yet recovered). ``complete`` is False while open and when the session was
    cut off by a crash and finished by :meth:`TranscriptStore.recover`.
    ``formats`` lists the formats stored for the session; ``get`` can still
    render the others on demand.
    """

    id: str
    room: str
    started_at: str
    ended_at: str
    language: str
    entries: int
    complete: bool
    formats: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready copy (used for meta.json and by HTTP handlers)."""
        return asdict(self)


class TranscriptWriter(abc.ABC):
    """Appends entries to one open transcript session.

    A writer may be used from any thread, but from one thread at a time. It is
    a context manager: leaving the block closes it, marking the transcript
    incomplete if the block raised.
    """

    id: str
    meta: TranscriptMeta

    @abc.abstractmethod
    def append(self, entry: TranscriptEntry) -> None:
        """Store ``entry`` durably; once this returns, a crash cannot lose it."""

    @abc.abstractmethod
    def close(self, complete: bool = True) -> TranscriptMeta:
        """Finish the session, write its renderings and return the final meta.

        Closing twice is harmless and returns the same meta.
        """

    @property
    @abc.abstractmethod
    def closed(self) -> bool:
        """True once :meth:`close` has run."""

    def __enter__(self) -> TranscriptWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self.closed:
            self.close(complete=exc_type is None)


class TranscriptStore(abc.ABC):
    """Where finished and in-progress transcripts live.

    All methods are synchronous and may block on disk or network; async
    callers run them in a thread.
    """

    @abc.abstractmethod
    def open(
        self, room: str, *, language: str, started_at: datetime | None = None
    ) -> TranscriptWriter:
        """Start a new transcript session for ``room``; the store picks its id."""

    @abc.abstractmethod
    def list(self, room: str | None = None, limit: int = 100) -> builtins.list[TranscriptMeta]:
        """Sessions, newest first, optionally only those of ``room`` (at most ``limit``)."""

    @abc.abstractmethod
    def get(self, id: str, fmt: str = "jsonl") -> bytes:
        """The transcript ``id`` in format ``fmt`` (one of :data:`FORMATS`).

        Raises:
            InvalidTranscriptId, TranscriptNotFound, UnknownFormat.
        """

    @abc.abstractmethod
    def info(self, id: str) -> TranscriptMeta:
        """Metadata of transcript ``id``.

        Raises:
            InvalidTranscriptId, TranscriptNotFound.
        """

    @abc.abstractmethod
    def delete(self, id: str) -> bool:
        """Remove transcript ``id``; False if there was none.

        Raises:
            InvalidTranscriptId.
        """

    @abc.abstractmethod
    def recover(self) -> builtins.list[TranscriptMeta]:
        """Finish sessions a crash left open (render them, mark them incomplete).

        Sessions still being written by a live writer are left alone. Returns
        the metas of the sessions it finished.
        """
