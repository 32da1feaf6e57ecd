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

The parts: :mod:`sidecar.room_model` (the room's data), this module's
:class:`RoomManager` (which rooms exist, switching on and off, settings,
roster, background checks; it publishes every change as a typed event of
:mod:`sidecar.room_events`), :mod:`sidecar.room_speakers` (audio in, one
pipeline per speaker), :mod:`sidecar.room_captions` (captions out: the
transcript, the event bus, the carriers) and :mod:`sidecar.room_session`
(the handle an ingest adapter holds on a room).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping

from prometheus_client import Counter, Gauge

from sidecar.asr.base import Hypothesis, ProviderError, Recognizer
from sidecar.asr.provider import StreamProvider, StreamSettings, error_kind
from sidecar.asr.whisper_provider import WhisperProvider
from sidecar.config import (
    EffectiveSettings,
    Mode,
    RoomSettings,
    SettingError,
    Trigger,
    resolve,
)
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
from sidecar.events import Caption, Frame
from sidecar.pipeline.segmenter import SegmenterConfig
from sidecar.pipeline.speaker import GateConfig, SpeakerPipeline
from sidecar.pipeline.vad import SileroVad
from sidecar.room_captions import TRANSCRIPTS_FAILING, CaptionOutput
from sidecar.room_events import (
    EventBus,
    RoomEnded,
    RoomEvent,
    SessionFailed,
    SessionStarted,
    SessionStopped,
    TranscriptReady,
)
from sidecar.room_model import (
    _MEETING_RE,
    CARRIERS,
    INGEST_SOURCES,
    CaptionSink,
    Carrier,
    Participant,
    Room,
    Subscriber,
    canonical_room,
    valid_participant,
)
from sidecar.room_session import IngestSession
from sidecar.room_speakers import DRAIN_TIMEOUT, SpeakerPool
from sidecar.room_watch import RoomWatch
from sidecar.store.base import StoreError, TranscriptStore, TranscriptWriter

__all__ = [
    "CARRIERS",
    "DRAIN_TIMEOUT",
    "INGEST_SOURCES",
    "CaptionSink",
    "Carrier",
    "Participant",
    "Room",
    "RoomManager",
    "Subscriber",
    "canonical_room",
    "valid_participant",
]

log = logging.getLogger(__name__)

ROOMS_ACTIVE = Gauge("captions_rooms_active", "Rooms with captions or transcription on")
RECOGNIZER_FAILURES = Counter(
    "captions_room_recognition_failures_total",
    "Utterances a room's recogniser (all of a chain) failed on, by kind",
    ["kind"],
)


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
        events: EventBus | None = None,
        transcript_link: Callable[[str], str] | None = None,
    ) -> None:
        self.defaults = defaults
        # every change of a room is published here as a typed event; the
        # outputs (MUC occupant, gRPC subscriptions, webhooks, archiver, the
        # transcript page) are its subscribers
        self.events = events if events is not None else EventBus()
        # the two halves of a room's work, each its own part
        self.pipelines = SpeakerPool(self)  # audio in
        self.captions = CaptionOutput(self)  # captions out
        self.watch = RoomWatch(self)  # the ticker: idle speakers, gone sources, no audio
        self.events.add_listener("grpc_subscriptions", self.captions.to_subscribers)
        # the signed link of a transcript, for TranscriptReady; None: no links
        self.transcript_link = transcript_link
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
            self._ticker = asyncio.create_task(self.watch.run(), name="rooms-tick")

    def _audio_arrived(self, r: Room) -> None:
        self.watch.audio_arrived(r)

    def _end_in_background(self, name: str, reason: str = "room_ended") -> None:
        task = asyncio.create_task(self._end_quietly(name, reason=reason))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _end_quietly(self, name: str, reason: str = "room_ended") -> None:
        with contextlib.suppress(NotFound):
            await self.end_room(name, reason=reason)

    async def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None
        # all rooms at once, so they share the time a shutdown has, and one
        # failure does not leave the others open
        results = await asyncio.gather(
            *(self.end_room(name, reason="shutdown") for name in list(self.rooms)),
            return_exceptions=True,
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

    def _emit(self, event: RoomEvent) -> None:
        self.events.publish(event)

    def open_session(self, room: str, source: str) -> IngestSession:
        """An ingest connection's handle on ``room`` (which must exist); close it when done."""
        return IngestSession(self, self.get(room), source)

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
        switched_on = False
        if kind == "transcription" and not r.transcribing:
            try:
                r.writer = await asyncio.to_thread(self.store.open, r.name, language=eff.language)
            except (StoreError, OSError) as e:
                # captions need no disk: the caller (or the ingest's fallback)
                # still gets them, and the room's status says what is wrong
                self._transcript_failed(r, "open", e)
                self._emit(
                    SessionFailed(
                        room=r.name,
                        kind="transcription",
                        cause="store_open",
                        message=clip(str(e), 500),
                    )
                )
                raise Unavailable(
                    f"the transcript of room {r.name} cannot be written ({clip(str(e), 200)}); "
                    "captions work without it"
                ) from e
            self._transcript_ok(r)
            r.transcribing = switched_on = True
            log.info("room %s: transcription on (%s) -> %s", r.name, requested_by, r.writer.id)
        elif kind == "captions" and not r.captioning:
            r.captioning = switched_on = True
            log.info("room %s: captions on (%s)", r.name, requested_by)
        ROOMS_ACTIVE.set(sum(1 for x in self.rooms.values() if x.active))
        self._notify(r, "start")
        if switched_on:
            self._emit(
                SessionStarted(
                    room=r.name,
                    kind=kind,
                    transcript_id=r.transcript_id,
                    trigger=r.trigger.value,
                    requested_by=requested_by,
                    meeting_id=r.meeting_id,
                )
            )
        return r

    async def stop(
        self, room: str, kind: str, *, reason: str = "user", force: bool = False
    ) -> Room:
        """Switch ``kind`` off. ``force``: the audio source itself ended (the
        videobridge closed the session), whatever the trigger."""
        r = self.get(room)
        async with r.lock:
            return await self._stop_locked(r, kind, force, reason)

    async def _stop_locked(self, r: Room, kind: str, force: bool, reason: str = "user") -> Room:
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
        await self._switch_off(r, kind, reason)
        return r

    async def _switch_off(self, r: Room, kind: str, reason: str = "user") -> None:
        if not (r.transcribing and r.captioning):
            # the last consumer goes: finish open utterances first
            await self._finish_speakers(r)
        transcript_id = ""
        ready: TranscriptReady | None = None
        if kind == "transcription":
            r.transcribing = False
            writer, r.writer = r.writer, None
            if writer is not None:
                transcript_id = writer.id
                async with r.write_lock:
                    await self._write_unwritten(r, writer)
                    lost = len(r.unwritten)
                    r.unwritten.clear()
                    try:
                        # finals it could not take make it incomplete
                        meta = await asyncio.to_thread(writer.close, lost == 0)
                    except (StoreError, OSError) as e:
                        self._transcript_failed(r, "close", e)
                        self._emit(
                            SessionFailed(
                                room=r.name,
                                kind="transcription",
                                cause="store_close",
                                message=clip(str(e), 500),
                                transcript_id=writer.id,
                            )
                        )
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
                        link = self.transcript_link(meta.id) if self.transcript_link else ""
                        ready = TranscriptReady(room=r.name, meta=meta, url=link)
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
        # the ready link first: the MUC occupant posts it before it leaves
        if ready is not None:
            self._emit(ready)
        self._emit(
            SessionStopped(room=r.name, kind=kind, reason=reason, transcript_id=transcript_id)
        )
        self._notify(r, "stop")

    # -- audio in: the speaker pipelines (sidecar.room_speakers) --------------
    def push_frame(self, room: str, participant: str, frame: Frame) -> bool:
        """Feed one frame. Returns False when it was dropped (and counted)."""
        return self.pipelines.push_frame(room, participant, frame)

    async def finish_speaker(self, room: str, pid: str) -> None:
        """A participant's audio source ended: its open utterance gets its final."""
        await self.pipelines.finish_speaker(room, pid)

    def _new_speaker(self, r: Room, pid: str) -> SpeakerPipeline:
        return self.pipelines.new_speaker(r, pid)

    async def _drop_speaker(self, r: Room, pid: str) -> None:
        await self.pipelines.drop_speaker(r, pid)

    async def _finish_speakers(self, r: Room) -> None:
        await self.pipelines.finish_all(r)

    # -- captions out (sidecar.room_captions) -------------------------------------------
    def _on_hypothesis(self, r: Room, sp: SpeakerPipeline, h: Hypothesis) -> None:
        self.captions.on_hypothesis(r, sp, h)

    async def _persist_and_publish(self, r: Room, cap: Caption) -> None:
        await self.captions.persist_and_publish(r, cap)

    def _publish(self, r: Room, cap: Caption) -> None:
        self.captions.publish(r, cap)

    async def end_room(self, room: str, *, reason: str = "room_ended") -> Room:
        r = self.get(room)
        async with r.lock:
            for kind in ("captions", "transcription"):
                on = r.transcribing if kind == "transcription" else r.captioning
                if on:
                    await self._switch_off(r, kind, reason)
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
        self._emit(RoomEnded(room=r.name))
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

    # -- recognition failures -------------------------------------------------
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
            # said once until captions flow again
            self._emit(
                SessionFailed(
                    room=r.name,
                    kind="captions" if r.captioning else "transcription",
                    cause="recognizer",
                    message=clip(str(err), 500),
                    transcript_id=r.transcript_id,
                )
            )

    def _transcript_failed(self, r: Room, op: str, e: BaseException) -> None:
        self.captions.transcript_failed(r, op, e)

    def _transcript_ok(self, r: Room) -> None:
        self.captions.transcript_ok(r)

    async def _write_unwritten(self, r: Room, writer: TranscriptWriter) -> None:
        await self.captions.write_unwritten(r, writer)

    # -- subscriptions ------------------------------------------------------
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
