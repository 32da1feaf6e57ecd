"""Who is in a room: the roster, the SSRC map plain RTP is routed by, auto-start.

A roster update is checked whole before any change (an SSRC mapped in
another live room is refused); participants who left lose their speaker
pipelines; a room whose settings say ``auto_on`` starts once enough
participants are in it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sidecar.config import Mode, Trigger
from sidecar.errors import FailedPrecondition, InvalidArgument, ServiceError, shown
from sidecar.room_model import Participant, Room, valid_participant

if TYPE_CHECKING:
    from sidecar.rooms import RoomManager

__all__ = ["Roster"]


class Roster:
    """The rosters and SSRC map of one :class:`~sidecar.rooms.RoomManager`."""

    def __init__(self, manager: RoomManager) -> None:
        self.m = manager

    async def update(
        self,
        room: str,
        participants: list[Participant],
        *,
        replace: bool = False,
        left: list[str] | None = None,
    ) -> Room:
        m = self.m
        r = m._room(room)
        try:
            self.check(r, participants)
        except ServiceError:
            m._forget_if_empty(r)
            raise
        if replace:
            gone = set(r.roster) - {p.id for p in participants}
            r.roster = {}
        else:
            gone = set()
        for p in participants:
            r.roster[p.id] = Participant(p.id, p.name[:256], p.avatar_url[:2048], p.ssrcs[:16])
            for ssrc in p.ssrcs[:16]:
                m.ssrcs[ssrc] = (r.name, p.id)
        for pid in left or []:
            r.roster.pop(pid, None)
            gone.add(pid)
        for ssrc in [k for k, v in m.ssrcs.items() if v[0] == r.name and v[1] in gone]:
            del m.ssrcs[ssrc]
        r.roster_known = True
        for pid in gone:
            await m._drop_speaker(r, pid)
        await self.auto_start(r)
        return r

    def check(self, r: Room, participants: list[Participant]) -> None:
        """Refuse the whole update, before any change, when it is not valid.

        An SSRC already mapped in another live room is refused: plain RTP is
        routed by SSRC alone, so taking it over would send that room's
        speech into this one's captions and transcript. (Within one room a
        newer mapping replaces the older: a participant who rejoined.)
        """
        m = self.m
        for p in participants:
            if not valid_participant(p.id):
                raise InvalidArgument(
                    "participants.id",
                    f"{shown(p.id)} is not an endpoint id ([A-Za-z0-9._~-]{{1,64}})",
                )
            for ssrc in p.ssrcs[:16]:
                owner = m.ssrcs.get(ssrc)
                if owner is not None and owner[0] != r.name and owner[0] in m.rooms:
                    raise FailedPrecondition(
                        f"participants.ssrcs: SSRC {ssrc} of participant {p.id} is mapped "
                        "in another room; one SSRC feeds one room (end that room or send "
                        "its roster without it first)"
                    )

    def forget_room(self, name: str) -> None:
        """An ended room's SSRCs are free again."""
        ssrcs = self.m.ssrcs
        for ssrc in [k for k, v in ssrcs.items() if v[0] == name]:
            del ssrcs[ssrc]

    async def auto_start(self, r: Room) -> None:
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
                await self.m.start(
                    r.name, kind, r.start_settings, trigger=eff.trigger, requested_by="auto"
                )
