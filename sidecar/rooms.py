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
:class:`RoomManager` (which rooms exist, switching on and off, settings;
it publishes every change as a typed event of :mod:`sidecar.room_events`),
:mod:`sidecar.room_capacity` (places under ``max_rooms``, rooms that hold
nothing), :mod:`sidecar.room_roster` (rosters, the SSRC map, auto-start),
:mod:`sidecar.room_speakers` (audio in, one pipeline per speaker),
:mod:`sidecar.room_captions` (captions out: the transcript, the event bus,
the carriers), :mod:`sidecar.room_watch` (the background checks) and
:mod:`sidecar.room_session` (the handle an ingest adapter holds on a room).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping

from prometheus_client import Gauge

from sidecar.asr.base import ProviderError, Recognizer
from sidecar.asr.provider import StreamProvider, StreamSettings
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
    Unavailable,
    clip,
)
from sidecar.events import Caption, Frame
from sidecar.pipeline.segmenter import SegmenterConfig
from sidecar.pipeline.speaker import GateConfig
from sidecar.pipeline.vad import SileroVad
from sidecar.room_capacity import RoomPlacement
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
from sidecar.room_roster import Roster
from sidecar.room_session import IngestSession
from sidecar.room_speakers import DRAIN_TIMEOUT, SpeakerPool
from sidecar.room_watch import RoomWatch
from sidecar.store.base import StoreError, TranscriptStore

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
        self.placement = RoomPlacement(self)  # places under max_rooms
        self.roster = Roster(self)  # who is in a room, SSRC -> speaker
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

    # -- places under max_rooms (sidecar.room_capacity) ----------------------
    def _room(self, room: str, create: bool = True, *, for_start: bool = False) -> Room:
        return self.placement.room(room, create, for_start=for_start)

    def _forget_if_empty(self, r: Room, *, keep_error: bool = False) -> None:
        self.placement.forget_if_empty(r, keep_error=keep_error)

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
            await self.placement.make_place(r, requested_by)
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
                self.captions.transcript_failed(r, "open", e)
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
            self.captions.transcript_ok(r)
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
                ready = await self.captions.close_transcript(r, writer)
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

    async def _drop_speaker(self, r: Room, pid: str) -> None:
        await self.pipelines.drop_speaker(r, pid)

    async def _finish_speakers(self, r: Room) -> None:
        await self.pipelines.finish_all(r)

    # -- captions out (sidecar.room_captions) -------------------------------------------
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
        self.roster.forget_room(r.name)
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
        await self.roster.auto_start(r)
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

    # -- the roster and SSRC map (sidecar.room_roster) -------------------------
    async def update_roster(
        self,
        room: str,
        participants: list[Participant],
        *,
        replace: bool = False,
        left: list[str] | None = None,
    ) -> Room:
        return await self.roster.update(room, participants, replace=replace, left=left)

    # -- recognition failures -------------------------------------------------
    def _on_recognizer_error(self, r: Room, pid: str, utt: str, err: ProviderError) -> None:
        self.captions.recognizer_failed(r, pid, utt, err)

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
