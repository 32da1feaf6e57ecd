"""The rooms' ticker: what must happen without anyone asking.

Every 100 ms it flushes the batched counters and gives idle speakers their
finals; every 10 s it ends rooms whose videobridge or Jigasi source has been
gone for ``ingest_idle_end_s``; every 500 ms it warns, once and in words,
about a room switched on that gets no audio.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from prometheus_client import Counter

from sidecar.counters import flush_all
from sidecar.room_model import Room

if TYPE_CHECKING:
    from sidecar.rooms import RoomManager

__all__ = ["RoomWatch"]

log = logging.getLogger("sidecar.rooms")

NO_AUDIO = Counter(
    "captions_no_audio_warnings_total",
    "Rooms switched on that got no audio within ingest.no_audio_warning_s",
)


class RoomWatch:
    """The background checks of one :class:`~sidecar.rooms.RoomManager`."""

    def __init__(self, manager: RoomManager) -> None:
        self.m = manager

    async def run(self) -> None:
        while True:
            await asyncio.sleep(0.1)
            flush_all()
            now = time.monotonic()
            if now - self.m._last_reap > 10:
                self.m._last_reap = now
                self.reap_idle_ingest_rooms(now)
            if now - self.m._last_provisional_check >= 0.5:
                self.m._last_provisional_check = now
                self.reap_provisional_rooms(now)
            if now - self.m._last_audio_check >= 0.5:
                self.m._last_audio_check = now
                self.check_no_audio(now)
            for room in list(self.m.rooms.values()):
                if not room.live:
                    continue
                for sp in list(room.speakers.values()):
                    try:
                        sp.idle_check(now, room.effective.silence_duration_ms)
                    except Exception:  # one stream's fault must not stop the others
                        log.exception("room %s: speaker %s failed", room.name, sp.participant_id)

    def reap_idle_ingest_rooms(self, now: float) -> None:
        """Rooms the videobridge or Jigasi started end when their source is gone.

        A bridge that crashed never sends ``session-end``, and Jigasi's rooms
        have no Prosody module to end them: without this they would hold a
        transcript open and a place under ``max_rooms`` for ever.
        """
        for r in list(self.m.rooms.values()):
            if not r.provisional or r.ingest_connections > 0 or not r.active:
                continue
            last = max((sp.last_arrival for sp in r.speakers.values()), default=r.last_audio)
            if now - max(last, r.last_audio) > self.m.ingest_idle_end_s:
                log.info("room %s: no audio source for %.0f s; ending it", r.name, now - last)
                task = asyncio.create_task(self.m._end_quietly(r.name, reason="idle"))
                self.m._background.add(task)
                task.add_done_callback(self.m._background.discard)

    def reap_provisional_rooms(self, now: float) -> None:
        """A room an ingest socket started that never carried audio ends
        ``provisional_grace_s`` after its last socket went (a bridge that
        disconnected without ``session-end``, a client cycling meeting ids)."""
        for r in list(self.m.rooms.values()):
            if r.ingest_connections > 0:
                r.ingest_seen = now
                continue
            if not r.active and now - r.ingest_seen > 60:
                self.m._forget_if_empty(r)  # a refused start's room
                continue
            if not r.provisional or r.audio_seen or not r.active or r.lock.locked():
                continue
            if now - r.ingest_seen > self.m.provisional_grace_s:
                log.info("room %s: its ingest socket went and no audio came; ending it", r.name)
                self.m._end_in_background(r.name, reason="idle")

    def check_no_audio(self, now: float) -> None:
        """A room switched on that gets no audio says so, once, in words."""
        limit = self.m.no_audio_warning_s
        if limit <= 0:
            return
        for r in list(self.m.rooms.values()):
            if not r.active or r.audio_seen or not r.live or "no_audio" in r.warnings:
                continue
            if now - r.active_since < limit:
                continue
            r.warnings["no_audio"] = text = self.no_audio_text(r, limit)
            NO_AUDIO.inc()
            log.warning("%s", text)
            self.m._notify(r, "no_audio")

    def no_audio_text(self, r: Room, limit: float) -> str:
        if r.ingest_connections > 0:
            who = "Jigasi" if r.source == "jigasi" else "the videobridge"
            return (
                f"{who} is connected for room {r.name} but sent no audio "
                f"{limit:.0f} s after start: is everyone muted? (the bridge exports only "
                "audio that participants send)"
            )
        url = self.m.mediajson_url or "the sidecar's mediajson URL"
        return (
            f"no audio from the videobridge for room {r.name} {limit:.0f} s after start: "
            f"check jicofo.transcription.url-template (it must point at {url}), that the "
            "room_metadata component is loaded (Jicofo turns the export on only from room "
            f"metadata with asyncTranscription and recording.isTranscribingEnabled) and that "
            f"the bridge can reach {url}"
        )

    def audio_arrived(self, r: Room) -> None:
        r.audio_seen = True
        if r.warnings.pop("no_audio", None) is not None:
            log.info("room %s: audio arrives now; the no-audio warning is cleared", r.name)
            self.m._notify(r, "audio")
