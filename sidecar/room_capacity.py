"""Which rooms may exist: places under ``max_rooms``, and rooms that hold nothing.

A room switched on takes a place under ``max_rooms``; ingest sockets (the
videobridge, Jigasi) may fill all but ``reserved_rooms`` of them, and a
provisional room that never had audio gives its place up first. Rooms known
without being on (subscriptions, rosters, settings ahead of a start) are
bounded by ``max_idle_rooms`` and go when they hold nothing.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from sidecar.errors import NotFound, ResourceExhausted
from sidecar.room_captions import TRANSCRIPTS_FAILING
from sidecar.room_model import INGEST_SOURCES, Room, canonical_room

if TYPE_CHECKING:
    from sidecar.rooms import RoomManager

__all__ = ["RoomPlacement"]

log = logging.getLogger("sidecar.rooms")


class RoomPlacement:
    """The room table's bounds of one :class:`~sidecar.rooms.RoomManager`."""

    def __init__(self, manager: RoomManager) -> None:
        self.m = manager

    def room(self, room: str, create: bool = True, *, for_start: bool = False) -> Room:
        m = self.m
        name = canonical_room(room)
        r = m.rooms.get(name)
        if r is None:
            if not create:
                raise NotFound(f"room {name!r} is not known to this sidecar")
            # a start is bounded by max_rooms when it switches the room on
            if not for_start and len(m.rooms) >= m.max_rooms + m.max_idle_rooms:
                raise ResourceExhausted(
                    f"this sidecar knows {len(m.rooms)} rooms already; start one first"
                )
            r = Room(name=name, effective=m.defaults)
            m.rooms[name] = r
        return r

    def forget_if_empty(self, r: Room, *, keep_error: bool = False) -> None:
        """A room that holds nothing (a refused start, a last subscriber gone) goes.

        ``keep_error``: one whose transcript failed stays a while, so the
        start of its captions that follows shows why (the ticker clears it).
        """
        rooms = self.m.rooms
        if r.lock.locked() or rooms.get(r.name) is not r:
            return
        if keep_error and r.transcript_error:
            return
        if not (r.active or r.subscribers or r.roster_known or r.room_settings.set_fields()):
            del rooms[r.name]
            if r.transcript_error:
                TRANSCRIPTS_FAILING.set(sum(1 for x in rooms.values() if x.transcript_error))

    async def make_place(self, r: Room, requested_by: str) -> None:
        """A room about to go on needs a place under ``max_rooms``.

        Ingest sockets (the videobridge, Jigasi) may fill all but
        ``reserved_rooms`` places. When none is free, a provisional room
        that never had audio and whose socket is gone is ended to make one;
        for a control API start, one whose socket is still open too (its
        bridge gets nothing more, as if its session had ended), and then
        one whose socket is gone, even if it had audio.
        """
        m = self.m
        # a room on, or going on (its start waits for its transcript file)
        on = [x for x in m.rooms.values() if x is not r and (x.active or x.lock.locked())]
        ingest = requested_by in INGEST_SOURCES
        full = len(on) >= m.max_rooms
        if ingest and not full:
            full = sum(1 for x in on if x.provisional) >= m.max_rooms - m.reserved_rooms
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
                f"this sidecar serves at most {m.max_rooms} rooms"
                + (f" ({m.max_rooms - m.reserved_rooms} {what})" if ingest else "")
            )
        victim = victims[0]
        log.warning(
            "room %s: ended to make a place for room %s (it never had audio)",
            victim.name,
            r.name,
        )
        await m._end_quietly(victim.name)
