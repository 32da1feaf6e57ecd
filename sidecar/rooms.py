"""Rooms: what is switched on, who is speaking, where captions go.

A room runs one :class:`~sidecar.pipeline.speaker.SpeakerPipeline` per
participant who sends audio, while captions or transcription (or both) are
on. Finals are written to the transcript (fsynced) *before* they are
published, so any final a viewer has seen survives a crash.

Captions reach the participants' screens through exactly one *carrier* per
caption, never two: jitsi-meet shows what arrives on either (the MUC
``json-message`` and the videobridge's ``EndpointMessage`` from
"transcriber", which lib-jitsi-meet raises as NON_PARTICIPANT_MESSAGE_RECEIVED),
so sending on both shows every caption twice in the CC tab and the external
API. The rule (:meth:`Room.pick_carrier`):

- ``muc``, the transcriber occupant's groupchat, whenever the sidecar's
  occupant is enabled and joined in the room. It works whatever brings the
  audio (videobridge export, RTP, the control API), its presence is what
  makes the UI show "transcribing" (lib-jitsi-meet raises the
  transcription-status only for a hidden-domain member with the transcriber
  feature), and the MUC reaches every endpoint, on every bridge of the
  conference;
- ``videobridge``, the answer on the export socket, otherwise (XMPP off, or
  the occupant not in the room: refused, reconnecting). The bridge relays it
  to every endpoint (jvb ``Conference.ExporterEventHandlerImpl.
  handleTranscriptionResult`` broadcasts an ``EndpointMessage`` with
  ``from: "transcriber"``), but that path exists only while the export is
  open.

The choice sticks to an utterance (its ``message_id``) while its carrier can
still send, so an utterance's interims and final arrive the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import unicodedata
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from prometheus_client import Counter, Gauge, Histogram

from sidecar.asr.base import Hypothesis, ProviderError, Recognizer
from sidecar.asr.provider import RecognitionStream, StreamProvider, StreamSettings, error_kind
from sidecar.asr.whisper_provider import WhisperProvider
from sidecar.config import (
    EffectiveSettings,
    Mode,
    RoomSettings,
    SettingError,
    Trigger,
    resolve,
)
from sidecar.counters import flush_all
from sidecar.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ServiceError,
    Unavailable,
    clip,
    shown,
)
from sidecar.events import Caption, Frame, TranscriptEntry
from sidecar.pipeline.segmenter import SegmenterConfig
from sidecar.pipeline.speaker import FRAMES_DROPPED, GateConfig, SpeakerPipeline
from sidecar.pipeline.vad import SileroVad
from sidecar.store.base import StoreError, TranscriptStore, TranscriptWriter

log = logging.getLogger(__name__)

CAPTIONS_OUT = Counter("captions_captions_total", "Captions published", ["kind"])
FINAL_LATENCY = Histogram(
    "captions_final_latency_seconds",
    "From the end of speech to the final caption being published",
    buckets=(0.25, 0.5, 0.75, 1, 1.25, 1.5, 2, 2.5, 3, 4, 5, 7.5, 10, 20),
)
FIRST_INTERIM_LATENCY = Histogram(
    "captions_first_interim_latency_seconds",
    "From the start of speech to the first interim caption of the utterance",
    buckets=(0.25, 0.5, 0.75, 1, 1.25, 1.5, 2, 2.5, 3, 4, 5, 7.5, 10),
)
ROOMS_ACTIVE = Gauge("captions_rooms_active", "Rooms with captions or transcription on")
SPEAKERS_ACTIVE = Gauge("captions_speaker_pipelines", "Speaker pipelines alive")
TRANSCRIPT_ERRORS = Counter(
    "captions_transcript_write_errors_total", "Finals that could not be written"
)
TRANSCRIPTS_FAILING = Gauge(
    "captions_transcripts_failing",
    "Rooms whose transcript cannot be written (disk full, read-only); their captions go on",
)
TRANSCRIPT_STORE_ERRORS = Counter(
    "captions_transcript_store_errors_total",
    "Transcript store operations that failed, by operation (open, append, close)",
    ["op"],
)
UNWRITTEN_MAX = 10_000  # finals a failing transcript keeps in memory to write later
DRAIN_TIMEOUT = 30.0  # seconds a stop waits for the last finals
INGEST_SOURCES = ("videobridge", "jigasi")
CARRIED = Counter(
    "captions_carried_total",
    "Captions sent to the participants, by carrier (each on exactly one)",
    ["carrier"],
)
NO_AUDIO = Counter(
    "captions_no_audio_warnings_total",
    "Rooms switched on that got no audio within ingest.no_audio_warning_s",
)
RECOGNIZER_FAILURES = Counter(
    "captions_room_recognition_failures_total",
    "Utterances a room's recogniser (all of a chain) failed on, by kind",
    ["kind"],
)
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


class RoomManager:
    def __init__(
        self,
        *,
        defaults: EffectiveSettings,
        store: TranscriptStore,
        providers: Mapping[str, StreamProvider] | None = None,
        recognizers: Mapping[str, Recognizer] | None = None,
        vad: SileroVad,
        max_rooms: int = 200,
        max_speakers_per_room: int = 500,
        max_subscribers_per_room: int = 20,
        gate: GateConfig | None = None,
        ingest_idle_end_s: float = 600.0,
        provisional_grace_s: float = 5.0,
        reserved_rooms: int | None = None,
        no_audio_warning_s: float = 10.0,
    ) -> None:
        self.defaults = defaults
        self.store = store
        # rooms name a provider (the ``provider`` setting); whole-utterance
        # recognisers given directly run behind the Whisper stream adapter
        self.providers: dict[str, StreamProvider] = dict(providers or {})
        for name, rec in (recognizers or {}).items():
            self.providers.setdefault(name, WhisperProvider(rec))
        self.vad = vad
        self.max_rooms = max_rooms
        self.max_speakers = max_speakers_per_room
        self.max_subscribers = max_subscribers_per_room
        self.gate = gate or GateConfig()
        self.rooms: dict[str, Room] = {}
        # plain RTP: SSRC -> (room, endpoint id), kept from roster updates
        self.ssrcs: dict[int, tuple[str, str]] = {}
        # Jitsi meeting id -> room name, from start calls
        self.meetings: dict[str, str] = {}
        self._ticker: asyncio.Task[None] | None = None
        self.on_change: list[Callable[[Room, str], None]] = []
        self.ingest_idle_end_s = ingest_idle_end_s
        # a room an ingest socket started, that never got audio, ends this
        # long after its last socket went
        self.provisional_grace_s = provisional_grace_s
        # places under max_rooms that only the control API's starts may take,
        # so sockets cycling meeting ids never lock real meetings out
        self.reserved_rooms = (
            reserved_rooms if reserved_rooms is not None else max(1, max_rooms // 10)
        )
        self.reserved_rooms = min(self.reserved_rooms, max(0, max_rooms - 1))
        # rooms known without being on (subscriptions, rosters, settings ahead
        # of a start): bounded for memory, never counted under max_rooms
        self.max_idle_rooms = 4 * max_rooms + 100
        self._last_provisional_check = time.monotonic()
        # a room on with no audio after this long gets a warning; 0: never
        self.no_audio_warning_s = no_audio_warning_s
        # where the videobridge should connect, for the warning's words
        self.mediajson_url = ""
        self._last_audio_check = time.monotonic()
        self._last_reap = time.monotonic()
        self._background: set[asyncio.Task[None]] = set()

    # -- lifecycle ---------------------------------------------------------
    def start_background(self) -> None:
        if self._ticker is None:
            self._ticker = asyncio.create_task(self._tick_loop(), name="rooms-tick")

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(0.1)
            flush_all()
            now = time.monotonic()
            if now - self._last_reap > 10:
                self._last_reap = now
                self._reap_idle_ingest_rooms(now)
            if now - self._last_provisional_check >= 0.5:
                self._last_provisional_check = now
                self._reap_provisional_rooms(now)
            if now - self._last_audio_check >= 0.5:
                self._last_audio_check = now
                self._check_no_audio(now)
            for room in list(self.rooms.values()):
                if not room.live:
                    continue
                for sp in list(room.speakers.values()):
                    try:
                        sp.idle_check(now, room.effective.silence_duration_ms)
                    except Exception:  # one stream's fault must not stop the others
                        log.exception("room %s: speaker %s failed", room.name, sp.participant_id)

    def _reap_idle_ingest_rooms(self, now: float) -> None:
        """Rooms the videobridge or Jigasi started end when their source is gone.

        A bridge that crashed never sends ``session-end``, and Jigasi's rooms
        have no Prosody module to end them: without this they would hold a
        transcript open and a place under ``max_rooms`` for ever.
        """
        for r in list(self.rooms.values()):
            if not r.provisional or r.ingest_connections > 0 or not r.active:
                continue
            last = max((sp.last_arrival for sp in r.speakers.values()), default=r.last_audio)
            if now - max(last, r.last_audio) > self.ingest_idle_end_s:
                log.info("room %s: no audio source for %.0f s; ending it", r.name, now - last)
                task = asyncio.create_task(self._end_quietly(r.name))
                self._background.add(task)
                task.add_done_callback(self._background.discard)

    def _reap_provisional_rooms(self, now: float) -> None:
        """A room an ingest socket started that never carried audio ends
        ``provisional_grace_s`` after its last socket went (a bridge that
        disconnected without ``session-end``, a client cycling meeting ids)."""
        for r in list(self.rooms.values()):
            if r.ingest_connections > 0:
                r.ingest_seen = now
                continue
            if not r.active and now - r.ingest_seen > 60:
                self._forget_if_empty(r)  # a refused start's room
                continue
            if not r.provisional or r.audio_seen or not r.active or r.lock.locked():
                continue
            if now - r.ingest_seen > self.provisional_grace_s:
                log.info("room %s: its ingest socket went and no audio came; ending it", r.name)
                self._end_in_background(r.name)

    def _end_in_background(self, name: str) -> None:
        task = asyncio.create_task(self._end_quietly(name))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _check_no_audio(self, now: float) -> None:
        """A room switched on that gets no audio says so, once, in words."""
        limit = self.no_audio_warning_s
        if limit <= 0:
            return
        for r in list(self.rooms.values()):
            if not r.active or r.audio_seen or not r.live or "no_audio" in r.warnings:
                continue
            if now - r.active_since < limit:
                continue
            r.warnings["no_audio"] = text = self._no_audio_text(r, limit)
            NO_AUDIO.inc()
            log.warning("%s", text)
            self._notify(r, "no_audio")

    def _no_audio_text(self, r: Room, limit: float) -> str:
        if r.ingest_connections > 0:
            who = "Jigasi" if r.source == "jigasi" else "the videobridge"
            return (
                f"{who} is connected for room {r.name} but sent no audio "
                f"{limit:.0f} s after start: is everyone muted? (the bridge exports only "
                "audio that participants send)"
            )
        url = self.mediajson_url or "the sidecar's mediajson URL"
        return (
            f"no audio from the videobridge for room {r.name} {limit:.0f} s after start: "
            f"check jicofo.transcription.url-template (it must point at {url}), that the "
            "room_metadata component is loaded (Jicofo turns the export on only from room "
            f"metadata with asyncTranscription and recording.isTranscribingEnabled) and that "
            f"the bridge can reach {url}"
        )

    def _audio_arrived(self, r: Room) -> None:
        r.audio_seen = True
        if r.warnings.pop("no_audio", None) is not None:
            log.info("room %s: audio arrives now; the no-audio warning is cleared", r.name)
            self._notify(r, "audio")

    async def _end_quietly(self, name: str) -> None:
        with contextlib.suppress(NotFound):
            await self.end_room(name)

    async def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None
        # all rooms at once, so they share the time a shutdown has, and one
        # failure does not leave the others open
        results = await asyncio.gather(
            *(self.end_room(name) for name in list(self.rooms)), return_exceptions=True
        )
        for res in results:
            if isinstance(res, BaseException) and not isinstance(res, NotFound):
                log.error("closing a room failed: %r", res)

    # -- rooms -------------------------------------------------------------
    def room_for_meeting(self, meeting_id: str) -> str | None:
        return self.meetings.get(meeting_id)

    def get(self, room: str) -> Room:
        name = canonical_room(room)
        try:
            return self.rooms[name]
        except KeyError:
            raise NotFound(f"room {name!r} is not known to this sidecar") from None

    def _room(self, room: str, create: bool = True, *, for_start: bool = False) -> Room:
        name = canonical_room(room)
        r = self.rooms.get(name)
        if r is None:
            if not create:
                raise NotFound(f"room {name!r} is not known to this sidecar")
            # a start is bounded by max_rooms when it switches the room on
            if not for_start and len(self.rooms) >= self.max_rooms + self.max_idle_rooms:
                raise ResourceExhausted(
                    f"this sidecar knows {len(self.rooms)} rooms already; start one first"
                )
            r = Room(name=name, effective=self.defaults)
            self.rooms[name] = r
        return r

    def _forget_if_empty(self, r: Room, *, keep_error: bool = False) -> None:
        """A room that holds nothing (a refused start, a last subscriber gone) goes.

        ``keep_error``: one whose transcript failed stays a while, so the
        start of its captions that follows shows why (the ticker clears it).
        """
        if r.lock.locked() or self.rooms.get(r.name) is not r:
            return
        if keep_error and r.transcript_error:
            return
        if not (r.active or r.subscribers or r.roster_known or r.room_settings.set_fields()):
            del self.rooms[r.name]
            if r.transcript_error:
                TRANSCRIPTS_FAILING.set(sum(1 for x in self.rooms.values() if x.transcript_error))

    async def _make_place(self, r: Room, requested_by: str) -> None:
        """A room about to go on needs a place under ``max_rooms``.

        Ingest sockets (the videobridge, Jigasi) may fill all but
        ``reserved_rooms`` places. When none is free, a provisional room
        that never had audio and whose socket is gone is ended to make one;
        for a control API start, one whose socket is still open too (its
        bridge gets nothing more, as if its session had ended), and then
        one whose socket is gone, even if it had audio.
        """
        # a room on, or going on (its start waits for its transcript file)
        on = [x for x in self.rooms.values() if x is not r and (x.active or x.lock.locked())]
        ingest = requested_by in INGEST_SOURCES
        full = len(on) >= self.max_rooms
        if ingest and not full:
            full = sum(1 for x in on if x.provisional) >= self.max_rooms - self.reserved_rooms
        if not full:
            return
        spare = [x for x in on if x.active and x.provisional and not x.lock.locked()]
        victims = sorted(
            (x for x in spare if not x.audio_seen and (not ingest or x.ingest_connections == 0)),
            key=lambda x: (x.ingest_connections, x.ingest_seen),
        )
        if not victims and not ingest:
            # then one whose socket is gone, the longest silent first
            victims = sorted(
                (x for x in spare if x.ingest_connections == 0),
                key=lambda x: max(
                    (sp.last_arrival for sp in x.speakers.values()), default=x.last_audio
                ),
            )
        if not victims:
            what = "rooms started by the videobridge or Jigasi" if ingest else "rooms"
            raise ResourceExhausted(
                f"this sidecar serves at most {self.max_rooms} rooms"
                + (f" ({self.max_rooms - self.reserved_rooms} {what})" if ingest else "")
            )
        victim = victims[0]
        log.warning(
            "room %s: ended to make a place for room %s (it never had audio)",
            victim.name,
            r.name,
        )
        await self._end_quietly(victim.name)

    def _resolve(self, room: Room, start: RoomSettings | None = None) -> EffectiveSettings:
        try:
            return resolve(
                self.defaults,
                room.room_settings,
                start if start is not None else room.start_settings,
            )
        except SettingError as e:
            raise InvalidArgument(e.field, e.message) from e

    def _notify(self, room: Room, what: str) -> None:
        for cb in self.on_change:
            try:
                cb(room, what)
            except Exception:
                log.exception("room change listener failed")

    async def start(
        self,
        room: str,
        kind: str,
        settings: RoomSettings | None = None,
        *,
        trigger: Trigger = Trigger.MANUAL,
        requested_by: str = "",
        live: bool = True,
        meeting_id: str = "",
        room_password: str = "",
    ) -> Room:
        """Switch ``kind`` ("transcription" or "captions") on. Idempotent.

        ``room_password``: the MUC room's password (the dial's
        ``JvbRoomPassword``), for the transcriber occupant."""
        r = self._room(room, for_start=True)
        # one change at a time per room: a start must not interleave with a
        # stop that is still draining, or with the room being ended
        try:
            async with r.lock:
                if self.rooms.get(r.name) is not r:
                    r = self._room(room, for_start=True)  # it was ended meanwhile: a new one
                if room_password:
                    r.room_password = room_password[:256]
                return await self._start_locked(
                    r, kind, settings, trigger, requested_by, live, meeting_id
                )
        finally:
            self._forget_if_empty(r, keep_error=True)

    async def _start_locked(
        self,
        r: Room,
        kind: str,
        settings: RoomSettings | None,
        trigger: Trigger,
        requested_by: str,
        live: bool,
        meeting_id: str,
    ) -> Room:
        start = settings if settings is not None else RoomSettings()
        eff = self._resolve(r, start)
        mode = eff.transcription_mode if kind == "transcription" else eff.captions_mode
        if mode == Mode.DISABLED:
            raise FailedPrecondition(f"{kind} is disabled for room {r.name}")
        provider = self.providers.get(eff.provider)
        if provider is None:
            raise FailedPrecondition(
                f"provider {eff.provider!r} is not configured on this sidecar "
                f"(configured: {sorted(self.providers)})"
            )
        if not provider.capabilities.supports(eff.language):
            langs = provider.capabilities.languages
            raise FailedPrecondition(
                f"provider {eff.provider!r} cannot recognise language {eff.language!r} "
                + (
                    "(it does not detect languages: name one)"
                    if eff.language == "auto"
                    else f"(it serves: {', '.join(langs or ())})"
                )
            )
        was_active = r.active
        if not was_active:
            r.source = requested_by  # counted from now on, by whom it is for
            await self._make_place(r, requested_by)
        if requested_by not in INGEST_SOURCES:
            r.claimed = True
        if meeting_id:
            if not _MEETING_RE.fullmatch(meeting_id):
                raise InvalidArgument("meeting_id", "1..128 characters of [A-Za-z0-9._-]")
            r.meeting_id = meeting_id
            self.meetings[meeting_id] = r.name
        # a later start's parameters add to the earlier ones: starting captions
        # without settings must not undo the language transcription started with
        r.start_settings = r.start_settings.merged(start) if was_active else start
        eff = self._resolve(r)
        self._apply(r, eff)
        r.live = live
        if requested_by and requested_by not in INGEST_SOURCES:
            r.requested_by = requested_by
        if not was_active:
            r.trigger = trigger
            r.source = requested_by
            r.last_audio = r.active_since = r.ingest_seen = time.monotonic()
            r.audio_seen = False
            r.warnings.pop("no_audio", None)
        if kind == "transcription" and not r.transcribing:
            try:
                r.writer = await asyncio.to_thread(self.store.open, r.name, language=eff.language)
            except (StoreError, OSError) as e:
                # captions need no disk: the caller (or the ingest's fallback)
                # still gets them, and the room's status says what is wrong
                self._transcript_failed(r, "open", e)
                raise Unavailable(
                    f"the transcript of room {r.name} cannot be written ({clip(str(e), 200)}); "
                    "captions work without it"
                ) from e
            self._transcript_ok(r)
            r.transcribing = True
            log.info("room %s: transcription on (%s) -> %s", r.name, requested_by, r.writer.id)
        elif kind == "captions" and not r.captioning:
            r.captioning = True
            log.info("room %s: captions on (%s)", r.name, requested_by)
        ROOMS_ACTIVE.set(sum(1 for x in self.rooms.values() if x.active))
        self._notify(r, "start")
        return r

    async def stop(
        self, room: str, kind: str, *, reason: str = "user", force: bool = False
    ) -> Room:
        """Switch ``kind`` off. ``force``: the audio source itself ended (the
        videobridge closed the session), whatever the trigger."""
        r = self.get(room)
        async with r.lock:
            return await self._stop_locked(r, kind, force)

    async def _stop_locked(self, r: Room, kind: str, force: bool) -> Room:
        on = r.transcribing if kind == "transcription" else r.captioning
        if not on:
            return r
        mode = (
            r.effective.transcription_mode if kind == "transcription" else r.effective.captions_mode
        )
        if not force and mode == Mode.AUTO_ON and r.trigger != Trigger.MANUAL:
            raise FailedPrecondition(
                f"{kind} in room {r.name} was started automatically ({r.trigger.value}) "
                "and stays on until the room ends"
            )
        await self._switch_off(r, kind)
        return r

    async def _switch_off(self, r: Room, kind: str) -> None:
        if not (r.transcribing and r.captioning):
            # the last consumer goes: finish open utterances first
            await self._finish_speakers(r)
        if kind == "transcription":
            r.transcribing = False
            writer, r.writer = r.writer, None
            if writer is not None:
                async with r.write_lock:
                    await self._write_unwritten(r, writer)
                    lost = len(r.unwritten)
                    r.unwritten.clear()
                    try:
                        # finals it could not take make it incomplete
                        meta = await asyncio.to_thread(writer.close, lost == 0)
                    except (StoreError, OSError) as e:
                        self._transcript_failed(r, "close", e)
                        log.warning(
                            "room %s: transcript %s could not be finished (%s); what it "
                            "holds stays on disk and is finished at the next start",
                            r.name,
                            writer.id,
                            clip(str(e), 200),
                        )
                    else:
                        log.info(
                            "room %s: transcript %s saved (%d entries)",
                            r.name,
                            meta.id,
                            meta.entries,
                        )
                    if lost:
                        log.error(
                            "room %s: %d finals could not be written to transcript %s",
                            r.name,
                            lost,
                            writer.id,
                        )
        else:
            r.captioning = False
        if not r.active:
            r.warnings.pop("no_audio", None)
        ROOMS_ACTIVE.set(sum(1 for x in self.rooms.values() if x.active))
        self._notify(r, "stop")

    async def _finish_speakers(self, r: Room) -> None:
        """Open utterances get their finals, then the pipelines go.

        Bounded: after ``DRAIN_TIMEOUT`` what is still pending is given up
        (logged) so that a stop or a shutdown always completes and the
        transcript is always closed.
        """
        r.stopping = True
        try:
            for sp in r.speakers.values():
                sp.finish()
            streams = list(r.streams.values())
            try:
                async with asyncio.timeout(DRAIN_TIMEOUT):
                    await asyncio.gather(*(s.drain() for s in streams), return_exceptions=True)
                    if r.pending:
                        await asyncio.wait(set(r.pending))
            except TimeoutError:
                log.warning(
                    "room %s: finals still pending after %.0f s; closing without them",
                    r.name,
                    DRAIN_TIMEOUT,
                )
            for s in streams:
                await s.aclose()
            SPEAKERS_ACTIVE.dec(len(r.speakers))
            r.speakers.clear()
            r.streams.clear()
        finally:
            r.stopping = False

    async def end_room(self, room: str) -> Room:
        r = self.get(room)
        async with r.lock:
            for kind in ("captions", "transcription"):
                on = r.transcribing if kind == "transcription" else r.captioning
                if on:
                    await self._switch_off(r, kind)
        for sub in r.subscribers:
            sub.close()
        r.subscribers.clear()
        if self.rooms.get(r.name) is r:
            del self.rooms[r.name]
        if r.transcript_error:
            TRANSCRIPTS_FAILING.set(sum(1 for x in self.rooms.values() if x.transcript_error))
        for ssrc in [k for k, v in self.ssrcs.items() if v[0] == r.name]:
            del self.ssrcs[ssrc]
        if r.meeting_id and self.meetings.get(r.meeting_id) == r.name:
            del self.meetings[r.meeting_id]
        self._notify(r, "end")
        return r

    async def update_settings(self, room: str, settings: RoomSettings) -> Room:
        r = self._room(room)
        try:
            validated = settings.validate()
        except SettingError as e:
            raise InvalidArgument(e.field, e.message) from e
        r.room_settings = r.room_settings.merged(validated)
        self._apply(r, self._resolve(r))
        await self._auto_start(r)
        return r

    def _apply(self, r: Room, eff: EffectiveSettings) -> None:
        """Propagate settings to the running pipelines."""
        r.effective = eff
        seg = self._segmenter_config(eff)
        for pid, sp in r.speakers.items():
            sp.reconfigure(seg)
            r.streams[pid].configure(self._stream_settings(eff, pid))

    def _stream_settings(self, eff: EffectiveSettings, pid: str) -> StreamSettings:
        provider = self.providers.get(eff.provider)
        interims = eff.interim_results and (
            provider is None or provider.capabilities.interim_results
        )
        return StreamSettings(
            language=eff.language,
            interim_results=interims,
            silence_duration_ms=eff.silence_duration_ms,
            speaker=pid,
        )

    @staticmethod
    def _segmenter_config(eff: EffectiveSettings) -> SegmenterConfig:
        return SegmenterConfig(
            silence_ms=eff.silence_duration_ms, max_speech_ms=eff.max_speech_caption_ms
        )

    async def update_roster(
        self,
        room: str,
        participants: list[Participant],
        *,
        replace: bool = False,
        left: list[str] | None = None,
    ) -> Room:
        r = self._room(room)
        try:
            self._check_roster(r, participants)
        except ServiceError:
            self._forget_if_empty(r)
            raise
        if replace:
            gone = set(r.roster) - {p.id for p in participants}
            r.roster = {}
        else:
            gone = set()
        for p in participants:
            r.roster[p.id] = Participant(p.id, p.name[:256], p.avatar_url[:2048], p.ssrcs[:16])
            for ssrc in p.ssrcs[:16]:
                self.ssrcs[ssrc] = (r.name, p.id)
        for pid in left or []:
            r.roster.pop(pid, None)
            gone.add(pid)
        for ssrc in [k for k, v in self.ssrcs.items() if v[0] == r.name and v[1] in gone]:
            del self.ssrcs[ssrc]
        r.roster_known = True
        for pid in gone:
            await self._drop_speaker(r, pid)
        await self._auto_start(r)
        return r

    def _check_roster(self, r: Room, participants: list[Participant]) -> None:
        """Refuse the whole update, before any change, when it is not valid.

        An SSRC already mapped in another live room is refused: plain RTP is
        routed by SSRC alone, so taking it over would send that room's
        speech into this one's captions and transcript. (Within one room a
        newer mapping replaces the older: a participant who rejoined.)
        """
        for p in participants:
            if not valid_participant(p.id):
                raise InvalidArgument(
                    "participants.id",
                    f"{shown(p.id)} is not an endpoint id ([A-Za-z0-9._~-]{{1,64}})",
                )
            for ssrc in p.ssrcs[:16]:
                owner = self.ssrcs.get(ssrc)
                if owner is not None and owner[0] != r.name and owner[0] in self.rooms:
                    raise FailedPrecondition(
                        f"participants.ssrcs: SSRC {ssrc} of participant {p.id} is mapped "
                        "in another room; one SSRC feeds one room (end that room or send "
                        "its roster without it first)"
                    )

    async def finish_speaker(self, room: str, pid: str) -> None:
        """A participant's audio source ended: its open utterance gets its final."""
        r = self.rooms.get(room.lower())
        if r is not None:
            await self._drop_speaker(r, pid)

    async def _drop_speaker(self, r: Room, pid: str) -> None:
        sp = r.speakers.pop(pid, None)
        st = r.streams.pop(pid, None)
        if sp is None or st is None:
            return
        sp.finish()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(st.drain(), 30)
        await st.aclose()
        SPEAKERS_ACTIVE.dec()

    async def _auto_start(self, r: Room) -> None:
        eff = r.effective
        n = len(r.roster)
        for kind, mode in (
            ("transcription", eff.transcription_mode),
            ("captions", eff.captions_mode),
        ):
            on = r.transcribing if kind == "transcription" else r.captioning
            if on or mode != Mode.AUTO_ON or eff.trigger == Trigger.MANUAL:
                continue
            need = 2 if eff.trigger == Trigger.AUTOMATIC_2ND_PARTICIPANT else 1
            if n >= need:
                await self.start(
                    r.name, kind, r.start_settings, trigger=eff.trigger, requested_by="auto"
                )

    # -- audio in ----------------------------------------------------------
    def push_frame(self, room: str, participant: str, frame: Frame) -> bool:
        """Feed one frame. Returns False when it was dropped (and counted)."""
        r = self.rooms.get(room) if isinstance(room, str) else None
        if r is None and isinstance(room, str):
            r = self.rooms.get(room.lower())
        if r is None or not r.active:
            FRAMES_DROPPED.labels("room_inactive").inc()
            return False
        sp = r.speakers.get(participant)
        if sp is None:
            if r.stopping:
                FRAMES_DROPPED.labels("room_stopping").inc()
                return False
            if not valid_participant(participant):
                FRAMES_DROPPED.labels("invalid_participant").inc()
                return False
            if r.roster_known and participant not in r.roster:
                FRAMES_DROPPED.labels("unknown_participant").inc()
                return False
            if len(r.speakers) >= self.max_speakers:
                FRAMES_DROPPED.labels("too_many_speakers").inc()
                return False
            sp = self._new_speaker(r, participant)
        if not r.audio_seen:
            self._audio_arrived(r)
        try:
            sp.push(frame)
        except Exception:
            # a bug on one stream must not take the room down: reset that stream
            log.exception("room %s: speaker %s failed; resetting it", r.name, participant)
            FRAMES_DROPPED.labels("internal").inc()
            r.speakers.pop(participant, None)
            st = r.streams.pop(participant, None)
            if st is not None:
                task = asyncio.ensure_future(st.aclose())
                r.pending.add(task)  # type: ignore[arg-type]
                task.add_done_callback(r.pending.discard)  # type: ignore[arg-type]
            SPEAKERS_ACTIVE.dec()
            return False
        return True

    def _new_speaker(self, r: Room, pid: str) -> SpeakerPipeline:
        eff = r.effective
        provider = self.providers[eff.provider]
        holder: list[SpeakerPipeline] = []
        stream = provider.open_stream(
            self._stream_settings(eff, pid),
            on_result=lambda h: self._on_hypothesis(r, holder[0], h),
            on_error=lambda utt, err: self._on_recognizer_error(r, pid, utt, err),
        )
        sp = SpeakerPipeline(
            pid,
            vad=self.vad,
            stream=stream,
            segmenter=self._segmenter_config(eff),
            gate=self.gate,
        )
        holder.append(sp)
        r.speakers[pid] = sp
        r.streams[pid] = stream
        SPEAKERS_ACTIVE.inc()
        return sp

    # -- captions out --------------------------------------------------------
    def _on_recognizer_error(self, r: Room, pid: str, utt: str, err: ProviderError) -> None:
        """The room's recogniser failed on an utterance (a chain: all of it)."""
        RECOGNIZER_FAILURES.labels(error_kind(err)).inc()
        first = "recognizer" not in r.warnings
        r.warnings["recognizer"] = f"recognition failed for {pid}: {err}"
        log.warning(
            "room %s: recognition failed for %s (utterance %s): %s", r.name, pid, utt or "-", err
        )
        if first:
            self._notify(r, "recognizer")

    def _on_hypothesis(self, r: Room, sp: SpeakerPipeline, h: Hypothesis) -> None:
        if h.is_final and h.text and "error" not in h.extra:
            r.warnings.pop("recognizer", None)  # captions flow again
        times = sp.times.get(h.utterance_id)
        start = sp.sample_to_epoch_ms(times.start_sample) if times else int(time.time() * 1000)
        end = sp.sample_to_epoch_ms(times.end_sample) if times else start
        p = r.roster.get(sp.participant_id)
        cap = Caption(
            room=r.name,
            participant_id=sp.participant_id,
            participant_name=(p.name if p and p.name else sp.participant_id),
            avatar_url=p.avatar_url if p else "",
            message_id=h.utterance_id,
            text=h.text,
            is_interim=not h.is_final,
            stability=h.stability,
            language=h.language,
            start_time_ms=start,
            end_time_ms=end,
            timestamp_ms=int(time.time() * 1000),
            confidence=h.confidence,
        )
        if h.is_final:
            sp.times.pop(h.utterance_id, None)
            task = asyncio.create_task(self._persist_and_publish(r, cap))
            r.pending.add(task)
            task.add_done_callback(r.pending.discard)
        else:
            if r.live and h.utterance_id not in r.first_interim_seen:
                r.first_interim_seen.add(h.utterance_id)
                FIRST_INTERIM_LATENCY.observe(max(0.0, (cap.timestamp_ms - start) / 1000))
            self._publish(r, cap)

    async def _persist_and_publish(self, r: Room, cap: Caption) -> None:
        r.first_interim_seen.discard(cap.message_id)
        if cap.text and r.transcribing and r.writer is not None:
            entry = TranscriptEntry(
                start_time=_iso(cap.start_time_ms),
                stop_time=_iso(cap.end_time_ms),
                speaker_id=cap.participant_id,
                speaker_name=cap.participant_name,
                text=cap.text,
                message_id=cap.message_id,
                language=cap.language,
            )
            writer = r.writer
            async with r.write_lock:
                r.unwritten.append(entry)
                await self._write_unwritten(r, writer)
        if r.live:
            FINAL_LATENCY.observe(max(0.0, (time.time() * 1000 - cap.end_time_ms) / 1000))
        self._publish(r, cap)

    async def _write_unwritten(self, r: Room, writer: TranscriptWriter) -> None:
        """Write the finals waiting for the disk, oldest first (under ``write_lock``).

        A disk that refuses them keeps them in memory (at most
        ``UNWRITTEN_MAX``) for the next final or the close to try again.
        """
        if not r.unwritten:
            return

        def write() -> Exception | None:
            while r.unwritten:
                try:
                    writer.append(r.unwritten[0])
                except Exception as e:  # StoreError, or a bug: the captions go on
                    return e
                del r.unwritten[0]
            return None

        err = await asyncio.to_thread(write)
        if err is None:
            self._transcript_ok(r)
            return
        TRANSCRIPT_ERRORS.inc()
        self._transcript_failed(r, "append", err)
        if len(r.unwritten) > UNWRITTEN_MAX:
            dropped = len(r.unwritten) - UNWRITTEN_MAX
            del r.unwritten[:dropped]
            log.error("room %s: %d finals lost: the transcript cannot be written", r.name, dropped)

    def _transcript_failed(self, r: Room, op: str, e: BaseException) -> None:
        TRANSCRIPT_STORE_ERRORS.labels(op).inc()
        if not r.transcript_error:
            # once per outage, not once per final
            log.warning("room %s: transcript %s failed: %s", r.name, op, clip(str(e), 300))
        r.transcript_error = f"transcript {op} failed: {clip(str(e), 300)}"
        r.warnings["transcript"] = f"room {r.name}: {r.transcript_error}; captions go on"
        TRANSCRIPTS_FAILING.set(sum(1 for x in self.rooms.values() if x.transcript_error))

    def _transcript_ok(self, r: Room) -> None:
        if r.transcript_error:
            log.info("room %s: the transcript is written again", r.name)
            r.transcript_error = ""
            r.warnings.pop("transcript", None)
            TRANSCRIPTS_FAILING.set(sum(1 for x in self.rooms.values() if x.transcript_error))

    def _publish(self, r: Room, cap: Caption) -> None:
        r.captions_sent += 1
        CAPTIONS_OUT.labels("interim" if cap.is_interim else "final").inc()
        for sub in list(r.subscribers):
            sub.offer(cap)
        if not r.captioning:
            return
        for sink in list(r.sinks):
            try:
                sink(cap)
            except Exception:
                log.exception("room %s: caption sink failed", r.name)
        carrier = r.pick_carrier(cap.message_id)
        if carrier is None:
            CARRIED.labels("none").inc()
            return
        if cap.is_interim:
            if len(r.carrier_by_message) > 1000:  # utterances that never got a final
                r.carrier_by_message.clear()
            r.carrier_by_message[cap.message_id] = carrier.name
        else:
            r.carrier_by_message.pop(cap.message_id, None)
        try:
            carrier.send(cap)
            CARRIED.labels(carrier.name).inc()
        except Exception:
            log.exception("room %s: caption carrier %s failed", r.name, carrier.name)

    def subscribe(self, room: str, include_interims: bool) -> Subscriber:
        r = self._room(room)
        if len(r.subscribers) >= self.max_subscribers:
            raise ResourceExhausted(f"room {r.name} has {self.max_subscribers} subscribers already")
        sub = Subscriber(include_interims)
        r.subscribers.add(sub)
        return sub

    def unsubscribe(self, room: str, sub: Subscriber) -> None:
        r = self.rooms.get(room.lower())
        if r is None:
            return
        r.subscribers.discard(sub)
        # a room made only for a subscription leaves with its last subscriber
        self._forget_if_empty(r)


def _iso(ms: int) -> str:
    dt = datetime.fromtimestamp(ms / 1000, tz=UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"
