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
from collections.abc import Callable

from prometheus_client import Gauge

from sidecar.asr.base import Hypothesis, Recognizer
from sidecar.asr.streaming import StreamOptions
from sidecar.config import (
    EffectiveSettings,
    Mode,
    RoomSettings,
    SettingError,
    Trigger,
    resolve,
)
from sidecar.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from sidecar.events import Caption, Frame
from sidecar.pipeline.segmenter import SegmenterConfig
from sidecar.pipeline.speaker import GateConfig, SpeakerPipeline
from sidecar.pipeline.vad import SileroVad
from sidecar.room_captions import CaptionOutput
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
from sidecar.store.base import TranscriptStore

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
        recognizers: dict[str, Recognizer],
        vad: SileroVad,
        max_rooms: int = 200,
        max_speakers_per_room: int = 500,
        max_subscribers_per_room: int = 20,
        gate: GateConfig | None = None,
        ingest_idle_end_s: float = 600.0,
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
        self.recognizers = recognizers
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

    def _room(self, room: str, create: bool = True) -> Room:
        name = canonical_room(room)
        r = self.rooms.get(name)
        if r is None:
            if not create:
                raise NotFound(f"room {name!r} is not known to this sidecar")
            if len(self.rooms) >= self.max_rooms:
                raise ResourceExhausted(f"this sidecar serves at most {self.max_rooms} rooms")
            r = Room(name=name, effective=self.defaults)
            self.rooms[name] = r
        return r

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
        r = self._room(room)
        # one change at a time per room: a start must not interleave with a
        # stop that is still draining, or with the room being ended
        async with r.lock:
            if self.rooms.get(r.name) is not r:
                r = self._room(room)  # it was ended meanwhile: a new one
            if room_password:
                r.room_password = room_password[:256]
            return await self._start_locked(
                r, kind, settings, trigger, requested_by, live, meeting_id
            )

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
        if eff.provider not in self.recognizers:
            raise FailedPrecondition(
                f"provider {eff.provider!r} is not configured on this sidecar "
                f"(configured: {sorted(self.recognizers)})"
            )
        was_active = r.active
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
            r.last_audio = r.active_since = time.monotonic()
            r.audio_seen = False
            r.warnings.pop("no_audio", None)
        switched_on = False
        if kind == "transcription" and not r.transcribing:
            r.writer = await asyncio.to_thread(self.store.open, r.name, language=eff.language)
            r.transcribing = switched_on = True
            r.write_failed = False
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
                    try:
                        meta = await asyncio.to_thread(writer.close)
                    except Exception as e:
                        self._emit(
                            SessionFailed(
                                room=r.name,
                                kind="transcription",
                                cause="store_close",
                                message=str(e)[:500],
                                transcript_id=writer.id,
                            )
                        )
                        raise
                log.info("room %s: transcript %s saved (%d entries)", r.name, meta.id, meta.entries)
                link = self.transcript_link(meta.id) if self.transcript_link else ""
                ready = TranscriptReady(room=r.name, meta=meta, url=link)
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
            st = r.streams[pid]
            st.set_language(eff.language)
            st.options = StreamOptions(interim_results=eff.interim_results)

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
        for p in participants:
            if not valid_participant(p.id):
                raise InvalidArgument(
                    "participants.id",
                    f"{p.id[:80]!r} is not an endpoint id ([A-Za-z0-9._~-]{{1,64}})",
                )
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
        if r.lock.locked():
            return  # a start is under way
        if not (r.active or r.subscribers or r.roster_known or r.room_settings.set_fields()):
            del self.rooms[r.name]
