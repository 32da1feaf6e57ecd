"""The data of a room: who is in it, what is on, where its captions go.

:class:`Room` is the state :class:`~sidecar.rooms.RoomManager` keeps per
room; the manager, the speaker pipelines (:mod:`sidecar.room_speakers`) and
the caption output (:mod:`sidecar.room_captions`) change it. Everything
outside them reads it, or goes through the manager's methods and an
:class:`~sidecar.room_session.IngestSession`.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import unicodedata
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from prometheus_client import Counter

from sidecar.asr.provider import RecognitionStream
from sidecar.config import EffectiveSettings, RoomSettings, Trigger
from sidecar.errors import InvalidArgument
from sidecar.events import Caption, TranscriptEntry
from sidecar.pipeline.speaker import SpeakerPipeline
from sidecar.store.base import TranscriptWriter

__all__ = [
    "CARRIERS",
    "INGEST_SOURCES",
    "Carrier",
    "CaptionSink",
    "Participant",
    "Room",
    "Subscriber",
    "canonical_room",
    "valid_participant",
]

INGEST_SOURCES = ("videobridge", "jigasi")
SUBSCRIBER_DROPS = Counter(
    "captions_subscriber_dropped_total", "Caption events not delivered to a slow subscriber"
)

_ROOM_RE = re.compile(r"[^\s\x00-\x1f\x7f@/\\\"&'<>:]{1,256}(@[A-Za-z0-9.\-]{1,253})?")
_PARTICIPANT_RE = re.compile(r"[A-Za-z0-9._~\-]{1,64}")
_MEETING_RE = re.compile(r"[A-Za-z0-9._\-]{1,128}")


def _invisible(text: str) -> bool:
    """Format, private-use, unassigned or separator characters: a room name
    with U+202E (right-to-left override), U+200B or U+2066 reads as another."""
    return any(unicodedata.category(ch)[0] in "CZ" for ch in text if ord(ch) > 0x7E)


def canonical_room(room: str) -> str:
    if not isinstance(room, str) or not _ROOM_RE.fullmatch(room) or _invisible(room):
        raise InvalidArgument(
            "room",
            f"{room[:80]!r} is not a room name (ROOM or ROOM@conference.HOST; ROOM is "
            "1..256 characters without spaces, control or invisible format characters, "
            "quotes, slashes, '<', '>', '&' or ':')",
        )
    return room.lower()


def valid_participant(pid: str) -> bool:
    return isinstance(pid, str) and bool(_PARTICIPANT_RE.fullmatch(pid))


@dataclass(slots=True)
class Participant:
    id: str
    name: str = ""
    avatar_url: str = ""
    ssrcs: tuple[int, ...] = ()


class Subscriber:
    """A bounded queue of caption events for one listener."""

    def __init__(self, include_interims: bool, maxsize: int = 256) -> None:
        self.include_interims = include_interims
        self.queue: asyncio.Queue[Caption | None] = asyncio.Queue(maxsize)

    def offer(self, caption: Caption) -> None:
        if caption.is_interim and not self.include_interims:
            return
        if self.queue.full():
            if caption.is_interim:
                SUBSCRIBER_DROPS.inc()
                return
            with contextlib.suppress(asyncio.QueueEmpty):
                self.queue.get_nowait()  # make room for the final
                SUBSCRIBER_DROPS.inc()
        self.queue.put_nowait(caption)

    def close(self) -> None:
        if self.queue.full():
            # the end marker must get in, or the subscriber waits forever
            with contextlib.suppress(asyncio.QueueEmpty):
                self.queue.get_nowait()
        with contextlib.suppress(asyncio.QueueFull):
            self.queue.put_nowait(None)

    async def __aiter__(self) -> AsyncIterator[Caption]:
        while True:
            item = await self.queue.get()
            if item is None:
                return
            yield item


CaptionSink = Callable[[Caption], None]

CARRIERS = ("muc", "videobridge")  # in order of preference, see the module doc


@dataclass(slots=True)
class Carrier:
    """One way captions reach the participants: ``send`` when ``ready()``."""

    name: str  # one of CARRIERS
    ready: Callable[[], bool]
    send: CaptionSink


@dataclass
class Room:
    name: str
    room_settings: RoomSettings = field(default_factory=RoomSettings)
    start_settings: RoomSettings = field(default_factory=RoomSettings)
    effective: EffectiveSettings = field(default_factory=EffectiveSettings)
    transcribing: bool = False
    captioning: bool = False
    trigger: Trigger = Trigger.MANUAL
    roster: dict[str, Participant] = field(default_factory=dict)
    roster_known: bool = False
    speakers: dict[str, SpeakerPipeline] = field(default_factory=dict)
    streams: dict[str, RecognitionStream] = field(default_factory=dict)
    writer: TranscriptWriter | None = None
    subscribers: set[Subscriber] = field(default_factory=set)
    sinks: list[CaptionSink] = field(default_factory=list)
    captions_sent: int = 0
    live: bool = True  # false for files decoded faster than real time
    write_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    first_interim_seen: set[str] = field(default_factory=set)
    pending: set[asyncio.Task[None]] = field(default_factory=set)
    meeting_id: str = ""
    stopping: bool = False  # finishing its pipelines: no new speakers
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # start/stop/end one at a time
    ingest_connections: int = 0  # open videobridge / Jigasi sockets
    last_audio: float = field(default_factory=time.monotonic)
    source: str = ""  # who started it: "videobridge", "jigasi", or a control API caller
    # why the transcript cannot be written now ("" when it can); captions go on
    transcript_error: str = ""
    unwritten: list[TranscriptEntry] = field(default_factory=list)  # finals to write again
    # a start call of the control API (Prosody) owns it: it is no longer
    # only what an ingest socket asked for
    claimed: bool = False
    ingest_seen: float = field(default_factory=time.monotonic)  # an ingest socket was open

    @property
    def provisional(self) -> bool:
        """Started by an ingest socket alone (no start call of the control API)."""
        return self.source in INGEST_SOURCES and not self.claimed

    # where captions go to the participants' screens, by CARRIERS name
    carriers: dict[str, Carrier] = field(default_factory=dict)
    carrier_by_message: dict[str, str] = field(default_factory=dict)
    # what an operator should act on, by kind ("no_audio", "join"), in words
    warnings: dict[str, str] = field(default_factory=dict)
    active_since: float = field(default_factory=time.monotonic)
    audio_seen: bool = False  # a frame arrived since captions/transcription went on
    requested_by: str = ""  # the last person (endpoint id) who asked, for notices
    room_password: str = ""  # for the transcriber occupant's join; never logged

    @property
    def active(self) -> bool:
        return self.transcribing or self.captioning

    def pick_carrier(self, message_id: str = "") -> Carrier | None:
        """The one carrier a caption goes out on (see the module doc)."""
        name = self.carrier_by_message.get(message_id) if message_id else None
        if name is not None:
            c = self.carriers.get(name)
            if c is not None and c.ready():
                return c
        for name in CARRIERS:
            c = self.carriers.get(name)
            if c is not None and c.ready():
                return c
        return None

    @property
    def warning(self) -> str:
        return " | ".join(self.warnings.values())

    @property
    def carrier(self) -> str:
        """The carrier a new caption would take now ("" for none)."""
        c = self.pick_carrier()
        return c.name if c is not None else ""

    @property
    def transcript_id(self) -> str:
        return self.writer.id if self.writer is not None else ""
