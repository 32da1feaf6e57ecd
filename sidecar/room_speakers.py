"""Audio into a room: one speaker pipeline per participant who sends audio.

Each pipeline (reorder, gate, decode, VAD, segmenter, recogniser stream) is
made on a participant's first frame, finished when its source ends or the
room stops, and reset alone when it fails: one bad stream never takes the
room down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from prometheus_client import Gauge

from sidecar.events import Frame
from sidecar.pipeline.speaker import FRAMES_DROPPED, SpeakerPipeline
from sidecar.room_model import Room, valid_participant

if TYPE_CHECKING:
    from sidecar.rooms import RoomManager

__all__ = ["DRAIN_TIMEOUT", "SpeakerPool"]

log = logging.getLogger("sidecar.rooms")

SPEAKERS_ACTIVE = Gauge("captions_speaker_pipelines", "Speaker pipelines alive")
DRAIN_TIMEOUT = 30.0  # seconds a stop waits for the last finals


class SpeakerPool:
    """The speaker pipelines of every room of one :class:`~sidecar.rooms.RoomManager`."""

    def __init__(self, manager: RoomManager) -> None:
        self.m = manager

    def push_frame(self, room: str, participant: str, frame: Frame) -> bool:
        """Feed one frame. Returns False when it was dropped (and counted)."""
        r = self.m.rooms.get(room) if isinstance(room, str) else None
        if r is None and isinstance(room, str):
            r = self.m.rooms.get(room.lower())
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
            if len(r.speakers) >= self.m.max_speakers:
                FRAMES_DROPPED.labels("too_many_speakers").inc()
                return False
            sp = self.new_speaker(r, participant)
        if not r.audio_seen:
            self.m._audio_arrived(r)
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

    def new_speaker(self, r: Room, pid: str) -> SpeakerPipeline:
        eff = r.effective
        provider = self.m.providers[eff.provider]
        holder: list[SpeakerPipeline] = []
        stream = provider.open_stream(
            self.m._stream_settings(eff, pid),
            on_result=lambda h: self.m.captions.on_hypothesis(r, holder[0], h),
            on_error=lambda utt, err: self.m._on_recognizer_error(r, pid, utt, err),
        )
        sp = SpeakerPipeline(
            pid,
            vad=self.m.vad,
            stream=stream,
            segmenter=self.m._segmenter_config(eff),
            gate=self.m.gate,
        )
        holder.append(sp)
        r.speakers[pid] = sp
        r.streams[pid] = stream
        SPEAKERS_ACTIVE.inc()
        return sp

    async def drop_speaker(self, r: Room, pid: str) -> None:
        sp = r.speakers.pop(pid, None)
        st = r.streams.pop(pid, None)
        if sp is None or st is None:
            return
        sp.finish()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(st.drain(), 30)
        await st.aclose()
        SPEAKERS_ACTIVE.dec()

    async def finish_speaker(self, room: str, pid: str) -> None:
        """A participant's audio source ended: its open utterance gets its final."""
        r = self.m.rooms.get(room.lower())
        if r is not None:
            await self.drop_speaker(r, pid)

    async def finish_all(self, r: Room) -> None:
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
