"""Captions out of a room: recognised text to captions, the transcript, the outputs.

A final is written to the room's transcript (fsynced) *before* it is
published, so any final a viewer has seen survives a crash. Publishing puts
every caption on the room event bus (the gRPC subscriptions, webhooks and
transcript pages take it from there) and, while captions are on, sends it
to the participants on exactly one carrier.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge, Histogram

from sidecar.asr.base import Hypothesis, ProviderError
from sidecar.asr.provider import error_kind
from sidecar.errors import clip
from sidecar.events import Caption, TranscriptEntry
from sidecar.pipeline.speaker import SpeakerPipeline
from sidecar.room_events import CaptionPublished, RoomEvent, SessionFailed, TranscriptReady
from sidecar.room_model import Room
from sidecar.store.base import StoreError, TranscriptWriter

if TYPE_CHECKING:
    from sidecar.rooms import RoomManager

__all__ = ["CaptionOutput"]

log = logging.getLogger("sidecar.rooms")

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
CARRIED = Counter(
    "captions_carried_total",
    "Captions sent to the participants, by carrier (each on exactly one)",
    ["carrier"],
)

RECOGNIZER_FAILURES = Counter(
    "captions_room_recognition_failures_total",
    "Utterances a room's recogniser (all of a chain) failed on, by kind",
    ["kind"],
)


class CaptionOutput:
    """The caption path of every room of one :class:`~sidecar.rooms.RoomManager`."""

    def __init__(self, manager: RoomManager) -> None:
        self.m = manager

    def on_hypothesis(self, r: Room, sp: SpeakerPipeline, h: Hypothesis) -> None:
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
            task = asyncio.create_task(self.persist_and_publish(r, cap))
            r.pending.add(task)
            task.add_done_callback(r.pending.discard)
        else:
            if r.live and h.utterance_id not in r.first_interim_seen:
                r.first_interim_seen.add(h.utterance_id)
                FIRST_INTERIM_LATENCY.observe(max(0.0, (cap.timestamp_ms - start) / 1000))
            self.publish(r, cap)

    async def persist_and_publish(self, r: Room, cap: Caption) -> None:
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
                await self.write_unwritten(r, writer)
        if r.live:
            FINAL_LATENCY.observe(max(0.0, (time.time() * 1000 - cap.end_time_ms) / 1000))
        self.publish(r, cap)

    async def write_unwritten(self, r: Room, writer: TranscriptWriter) -> None:
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
            self.transcript_ok(r)
            return
        TRANSCRIPT_ERRORS.inc()
        self.transcript_failed(r, "append", err, transcript_id=writer.id)
        if len(r.unwritten) > UNWRITTEN_MAX:
            dropped = len(r.unwritten) - UNWRITTEN_MAX
            del r.unwritten[:dropped]
            log.error("room %s: %d finals lost: the transcript cannot be written", r.name, dropped)

    async def close_transcript(self, r: Room, writer: TranscriptWriter) -> TranscriptReady | None:
        """Finish the transcript of a room switched off; its ready event if it was saved."""
        ready: TranscriptReady | None = None
        async with r.write_lock:
            await self.write_unwritten(r, writer)
            lost = len(r.unwritten)
            r.unwritten.clear()
            try:
                # finals it could not take make it incomplete
                meta = await asyncio.to_thread(writer.close, lost == 0)
            except (StoreError, OSError) as e:
                self.transcript_failed(r, "close", e)
                self.m._emit(
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
                link = self.m.transcript_link(meta.id) if self.m.transcript_link else ""
                ready = TranscriptReady(room=r.name, meta=meta, url=link)
            if lost:
                log.error(
                    "room %s: %d finals could not be written to transcript %s",
                    r.name,
                    lost,
                    writer.id,
                )
        return ready

    def recognizer_failed(self, r: Room, pid: str, utt: str, err: ProviderError) -> None:
        """The room's recogniser failed on an utterance (a chain: all of it)."""
        RECOGNIZER_FAILURES.labels(error_kind(err)).inc()
        first = "recognizer" not in r.warnings
        r.warnings["recognizer"] = f"recognition failed for {pid}: {err}"
        log.warning(
            "room %s: recognition failed for %s (utterance %s): %s", r.name, pid, utt or "-", err
        )
        if first:
            self.m._notify(r, "recognizer")
            # said once until captions flow again
            self.m._emit(
                SessionFailed(
                    room=r.name,
                    kind="captions" if r.captioning else "transcription",
                    cause="recognizer",
                    message=clip(str(err), 500),
                    transcript_id=r.transcript_id,
                )
            )

    def transcript_failed(
        self, r: Room, op: str, e: BaseException, *, transcript_id: str = ""
    ) -> None:
        """The store refused ``op`` (open, append, close): said once per outage."""
        TRANSCRIPT_STORE_ERRORS.labels(op).inc()
        if not r.transcript_error:
            # once per outage, not once per final
            log.warning("room %s: transcript %s failed: %s", r.name, op, clip(str(e), 300))
            if op == "append":
                # open and close failures are published by the manager, which knows more
                self.m._emit(
                    SessionFailed(
                        room=r.name,
                        kind="transcription",
                        cause="store_write",
                        message=clip(str(e), 500),
                        transcript_id=transcript_id,
                    )
                )
        r.transcript_error = f"transcript {op} failed: {clip(str(e), 300)}"
        r.warnings["transcript"] = f"room {r.name}: {r.transcript_error}; captions go on"
        TRANSCRIPTS_FAILING.set(sum(1 for x in self.m.rooms.values() if x.transcript_error))

    def transcript_ok(self, r: Room) -> None:
        if r.transcript_error:
            log.info("room %s: the transcript is written again", r.name)
            r.transcript_error = ""
            r.warnings.pop("transcript", None)
            TRANSCRIPTS_FAILING.set(sum(1 for x in self.m.rooms.values() if x.transcript_error))

    def publish(self, r: Room, cap: Caption) -> None:
        r.captions_sent += 1
        CAPTIONS_OUT.labels("interim" if cap.is_interim else "final").inc()
        # the gRPC subscriptions, webhooks and transcript pages take it from here
        self.m._emit(CaptionPublished(room=r.name, caption=cap, transcript_id=r.transcript_id))
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

    def to_subscribers(self, event: RoomEvent) -> None:
        """The gRPC subscriptions of a room are fed from its caption events."""
        if isinstance(event, CaptionPublished):
            r = self.m.rooms.get(event.room)
            if r is not None:
                for sub in list(r.subscribers):
                    sub.offer(event.caption)


def _iso(ms: int) -> str:
    dt = datetime.fromtimestamp(ms / 1000, tz=UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"
