"""The transcript routes on a real aiohttp listener on loopback, with a store, a bus and links.

``LiveMeeting`` plays a meeting the way the rooms do it: each final is
appended (fsynced) to the transcript first, then published as a room event;
interims are only published.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from aiohttp import web

from sidecar.events import Caption, TranscriptEntry
from sidecar.outputs.http import TranscriptRoutes
from sidecar.outputs.links import LinkSigner
from sidecar.room_events import CaptionPublished, EventBus, SessionStopped, TranscriptReady
from sidecar.store import LocalDirStore, TranscriptWriter
from sidecar.store.render import format_iso

TOKEN = "operator-token-for-tests"
KEY = b"k" * 40
T0 = datetime(2026, 12, 1, 19, 0, 0, tzinfo=UTC)


def iso_ms(ms: int) -> str:
    return format_iso(datetime.fromtimestamp(ms / 1000, tz=UTC))


@dataclass
class Site:
    store: LocalDirStore
    bus: EventBus
    signer: LinkSigner
    routes: TranscriptRoutes
    runner: web.AppRunner
    base: str

    def link(self, tid: str, expires: int | None = None) -> str:
        return self.base + self.signer.url(tid, expires)

    async def close(self) -> None:
        await self.routes.close()
        await self.runner.cleanup()


async def start_site(root: Path, clock=time.time) -> Site:  # type: ignore[no-untyped-def]
    store = LocalDirStore(root)
    bus = EventBus()
    signer = LinkSigner(KEY, ttl_s=3600, clock=clock)
    routes = TranscriptRoutes(store, token=TOKEN, signer=signer, bus=bus)
    app = web.Application()
    routes.add_routes(app)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return Site(store, bus, signer, routes, runner, f"http://127.0.0.1:{port}")


@dataclass
class LiveMeeting:
    site: Site
    room: str
    writer: TranscriptWriter = field(init=False)
    start_ms: int = field(init=False)
    n: int = 0

    def __post_init__(self) -> None:
        self.writer = self.site.store.open(self.room, language="en", started_at=T0)
        self.start_ms = int(T0.timestamp() * 1000)

    @property
    def id(self) -> str:
        return self.writer.id

    def _caption(self, pid: str, name: str, text: str, interim: bool, at_s: float) -> Caption:
        start = self.start_ms + int(at_s * 1000)
        return Caption(
            room=self.room,
            participant_id=pid,
            participant_name=name,
            message_id=f"{self.id}-{self.n}",
            text=text,
            is_interim=interim,
            stability=0.5,
            language="en",
            start_time_ms=start,
            end_time_ms=start + 1500,
            timestamp_ms=start + 1600,
        )

    def interim(self, pid: str, name: str, text: str, at_s: float) -> None:
        c = self._caption(pid, name, text, True, at_s)
        self.site.bus.publish(CaptionPublished(room=self.room, caption=c, transcript_id=self.id))

    def final(self, pid: str, name: str, text: str, at_s: float) -> None:
        c = self._caption(pid, name, text, False, at_s)
        self.n += 1
        self.writer.append(
            TranscriptEntry(
                start_time=iso_ms(c.start_time_ms),
                stop_time=iso_ms(c.end_time_ms),
                speaker_id=pid,
                speaker_name=name,
                text=text,
                message_id=c.message_id,
                language="en",
            )
        )
        self.site.bus.publish(CaptionPublished(room=self.room, caption=c, transcript_id=self.id))

    def end(self) -> None:
        meta = self.writer.close()
        self.site.bus.publish(
            SessionStopped(room=self.room, kind="transcription", transcript_id=self.id)
        )
        self.site.bus.publish(TranscriptReady(room=self.room, meta=meta))


MEETING = [
    ("alice01", "Alice Martin", "Good evening everyone, thanks for joining the planning call.", 2),
    ("bob0002", "Bob Okafor", "Happy to be here. Shall we start with the budget?", 7),
    ("carol03", "Carol Nguyen", "Yes, the budget first, then the release dates.", 12),
    ("alice01", "Alice Martin", "The budget for the winter release is approved.", 18),
    ("bob0002", "Bob Okafor", "Great news. The release dates stay as planned.", 25),
]


def finished_meeting(site: Site, room: str = "planning-call@conference.meet.example") -> str:
    m = LiveMeeting(site, room)
    for pid, name, text, at in MEETING:
        m.final(pid, name, text, at)
    m.writer.close()
    return m.id
