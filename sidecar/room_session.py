"""What an ingest adapter holds while its connection feeds a room.

The videobridge socket, a Jigasi socket or an RTP source opens a session on
a room through :meth:`RoomManager.open_session` and then only uses this
small interface: push frames, end a speaker, offer a caption carrier, stop
what it started, close. It never edits the room's fields; the room counts
its open sessions (an ingest-started room ends when the last one has been
gone for long enough).
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING

from sidecar.errors import NotFound
from sidecar.events import Frame

if TYPE_CHECKING:
    from sidecar.rooms import Carrier, Room, RoomManager

__all__ = ["IngestSession"]

log = logging.getLogger(__name__)


class IngestSession:
    """One ingest connection's handle on one room (made by ``RoomManager.open_session``)."""

    def __init__(self, rooms: RoomManager, room: Room, source: str) -> None:
        self._rooms = rooms
        self._room = room
        self.source = source
        self.closed = False
        room.ingest_connections += 1

    @property
    def room(self) -> str:
        """The room's canonical name."""
        return self._room.name

    @property
    def active(self) -> bool:
        """Whether the room still has captions or transcription on."""
        current = self._rooms.rooms.get(self.room)
        return not self.closed and self._room.active and current is self._room

    @property
    def started_by_this_source(self) -> bool:
        """The room was switched on by this kind of source (not by the control API)."""
        return self._room.source == self.source

    def push(self, participant: str, frame: Frame) -> bool:
        """Feed one frame; False when it was dropped (and counted)."""
        if self.closed:
            return False
        return self._rooms.push_frame(self.room, participant, frame)

    async def finish_speaker(self, participant: str) -> None:
        """That participant's audio ended: its open utterance gets its final."""
        await self._rooms.finish_speaker(self.room, participant)

    def set_carrier(self, carrier: Carrier) -> None:
        """Offer a way for the room's captions to reach participants (replaces one of that name)."""
        self._room.carriers[carrier.name] = carrier

    def drop_carrier(self, carrier: Carrier) -> None:
        """Withdraw ``carrier`` if it is still the room's carrier of that name."""
        if self._room.carriers.get(carrier.name) is carrier:
            del self._room.carriers[carrier.name]

    def carrier(self, name: str) -> Carrier | None:
        return self._room.carriers.get(name)

    async def stop(self, kind: str, *, reason: str = "source_ended") -> None:
        """The source ended ``kind`` (whatever the room's trigger)."""
        with contextlib.suppress(NotFound):
            await self._rooms.stop(self.room, kind, reason=reason, force=True)

    async def end_room(self) -> None:
        """End the room (the source's meeting is over)."""
        with contextlib.suppress(NotFound):
            await self._rooms.end_room(self.room)

    def close(self) -> None:
        """The connection is gone. Closing twice is harmless."""
        if self.closed:
            return
        self.closed = True
        self._room.ingest_connections -= 1

    def __enter__(self) -> IngestSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
