"""The control API, one implementation for native gRPC and gRPC-Web.

Authentication and the mapping of service errors to status codes happen
here, once, for every method; the methods themselves talk to the
:class:`~sidecar.rooms.RoomManager` and the transcript store.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from sidecar.config import (
    RoomSettings,
    SettingError,
    settings_from_proto,
    settings_to_proto,
    trigger_from_proto,
    trigger_to_proto,
)
from sidecar.config import Trigger as TriggerEnum
from sidecar.errors import InvalidArgument, ServiceError
from sidecar.events import Caption
from sidecar.proto.captions.v1 import captions_pb2 as pb
from sidecar.proto.captions.v1 import captions_pb2_grpc as pb_grpc
from sidecar.rooms import Participant, Room, RoomManager
from sidecar.store.base import (
    FORMATS,
    InvalidTranscriptId,
    TranscriptMeta,
    TranscriptNotFound,
    TranscriptStore,
    UnknownFormat,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
_STATUS = {
    "INVALID_ARGUMENT": grpc.StatusCode.INVALID_ARGUMENT,
    "NOT_FOUND": grpc.StatusCode.NOT_FOUND,
    "FAILED_PRECONDITION": grpc.StatusCode.FAILED_PRECONDITION,
    "RESOURCE_EXHAUSTED": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "UNAVAILABLE": grpc.StatusCode.UNAVAILABLE,
    "INTERNAL": grpc.StatusCode.INTERNAL,
}


def _error_status(e: Exception) -> tuple[grpc.StatusCode, str]:
    if isinstance(e, ServiceError):
        return _STATUS.get(e.code, grpc.StatusCode.INTERNAL), str(e)
    if isinstance(e, SettingError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(e)
    if isinstance(e, InvalidTranscriptId | UnknownFormat):
        return grpc.StatusCode.INVALID_ARGUMENT, str(e)
    if isinstance(e, TranscriptNotFound):
        return grpc.StatusCode.NOT_FOUND, str(e)
    log.exception("internal error", exc_info=e)
    return grpc.StatusCode.INTERNAL, "internal error (see the sidecar's log)"


def unary(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    @functools.wraps(fn)
    async def wrapper(self: CaptionsService, request: Any, context: Any) -> T:
        await self._authenticate(context)
        try:
            return await fn(self, request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as e:
            if _is_abort(e):
                raise
            code, message = _error_status(e)
            await context.abort(code, message)
            raise AssertionError("unreachable") from e

    return wrapper


def _is_abort(e: BaseException) -> bool:
    # the gRPC-Web context raises its own abort exception type
    return getattr(e, "is_grpc_abort", False)


class CaptionsService(pb_grpc.CaptionsServicer):
    def __init__(self, rooms: RoomManager, store: TranscriptStore, token: str) -> None:
        self.rooms = rooms
        self.store = store
        self._token = token.encode()

    async def _authenticate(self, context: Any) -> None:
        presented = b""
        for key, value in context.invocation_metadata() or ():
            if key.lower() == "authorization":
                v = value if isinstance(value, str) else value.decode("latin-1")
                if v[:7].lower() == "bearer ":
                    presented = v[7:].strip().encode()
                break
        if not presented or not hmac.compare_digest(presented, self._token):
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing or wrong bearer token (metadata 'authorization: Bearer <token>')",
            )

    # -- helpers -----------------------------------------------------------
    def _status(self, r: Room) -> pb.RoomStatus:
        return pb.RoomStatus(
            room=r.name,
            transcribing=r.transcribing,
            captioning=r.captioning,
            effective=settings_to_proto(r.effective),
            transcript_id=r.transcript_id,
            participants=len(r.roster),
            active_speakers=sum(1 for s in r.speakers.values() if s.seg.in_speech),
            captions_sent=r.captions_sent,
            trigger=trigger_to_proto(r.trigger),
            warning=r.warning,
            caption_carrier=r.carrier if r.captioning else "",
        )

    @staticmethod
    def _settings(msg: pb.Settings, field: str = "settings") -> RoomSettings:
        try:
            return settings_from_proto(msg)
        except SettingError as e:
            raise InvalidArgument(f"{field}.{e.field}", e.message) from e

    async def _start(self, request: pb.StartRequest, kind: str) -> pb.RoomStatus:
        settings = self._settings(request.settings)
        trigger = trigger_from_proto(request.trigger, "trigger") or TriggerEnum.MANUAL
        r = await self.rooms.start(
            request.room,
            kind,
            settings,
            trigger=trigger,
            requested_by=request.requested_by[:256],
            meeting_id=request.meeting_id,
            room_password=request.room_password,
        )
        return self._status(r)

    async def _stop(self, request: pb.StopRequest, kind: str) -> pb.RoomStatus:
        reason = "no-requesters" if request.reason == pb.STOP_REASON_NO_REQUESTERS else "user"
        r = await self.rooms.stop(request.room, kind, reason=reason)
        return self._status(r)

    # -- methods -------------------------------------------------------------
    @unary
    async def StartTranscription(self, request: pb.StartRequest, context: Any) -> pb.RoomStatus:
        return await self._start(request, "transcription")

    @unary
    async def StopTranscription(self, request: pb.StopRequest, context: Any) -> pb.RoomStatus:
        return await self._stop(request, "transcription")

    @unary
    async def StartCaptions(self, request: pb.StartRequest, context: Any) -> pb.RoomStatus:
        return await self._start(request, "captions")

    @unary
    async def StopCaptions(self, request: pb.StopRequest, context: Any) -> pb.RoomStatus:
        return await self._stop(request, "captions")

    @unary
    async def UpdateSettings(
        self, request: pb.UpdateSettingsRequest, context: Any
    ) -> pb.RoomStatus:
        r = await self.rooms.update_settings(request.room, self._settings(request.settings))
        return self._status(r)

    @unary
    async def UpdateRoster(self, request: pb.UpdateRosterRequest, context: Any) -> pb.RoomStatus:
        if len(request.participants) > 10000:
            raise InvalidArgument("participants", "at most 10000 per call")
        for p in request.participants:
            if len(p.ssrcs) > 16:
                raise InvalidArgument("participants.ssrcs", "at most 16 per participant")
        people = [
            Participant(p.id, p.name, p.avatar_url, tuple(p.ssrcs)) for p in request.participants
        ]
        r = await self.rooms.update_roster(
            request.room, people, replace=request.replace, left=list(request.left)
        )
        return self._status(r)

    @unary
    async def EndRoom(self, request: pb.RoomRequest, context: Any) -> pb.RoomStatus:
        r = await self.rooms.end_room(request.room)
        status = self._status(r)
        status.transcribing = False
        status.captioning = False
        return status

    @unary
    async def GetRoomStatus(self, request: pb.RoomRequest, context: Any) -> pb.RoomStatus:
        return self._status(self.rooms.get(request.room))

    @unary
    async def ListRooms(self, request: pb.ListRoomsRequest, context: Any) -> pb.ListRoomsResponse:
        return pb.ListRoomsResponse(rooms=[self._status(r) for r in self.rooms.rooms.values()])

    @staticmethod
    def _info(m: TranscriptMeta) -> pb.TranscriptInfo:
        return pb.TranscriptInfo(
            id=m.id,
            room=m.room,
            started_at=m.started_at,
            ended_at=m.ended_at,
            entries=m.entries,
            complete=m.complete,
            formats=list(m.formats),
            language=m.language,
        )

    @unary
    async def ListTranscripts(
        self, request: pb.ListTranscriptsRequest, context: Any
    ) -> pb.ListTranscriptsResponse:
        limit = request.limit or 100
        if limit > 1000:
            raise InvalidArgument("limit", f"{limit} is out of range (1..1000)")
        room = request.room.lower() if request.room else None
        metas = await asyncio.to_thread(self.store.list, room, limit)
        return pb.ListTranscriptsResponse(transcripts=[self._info(m) for m in metas])

    @unary
    async def GetTranscript(self, request: pb.GetTranscriptRequest, context: Any) -> pb.Transcript:
        fmt = request.format or "jsonl"
        if fmt not in FORMATS:
            raise InvalidArgument("format", f"{fmt[:40]!r} is not one of {', '.join(FORMATS)}")
        info = await asyncio.to_thread(self.store.info, request.id)
        content = await asyncio.to_thread(self.store.get, request.id, fmt)
        return pb.Transcript(info=self._info(info), format=fmt, content=content)

    @unary
    async def DeleteTranscript(
        self, request: pb.DeleteTranscriptRequest, context: Any
    ) -> pb.DeleteTranscriptResponse:
        deleted = await asyncio.to_thread(self.store.delete, request.id)
        if not deleted:
            raise TranscriptNotFound(f"no transcript {request.id!r}")
        return pb.DeleteTranscriptResponse(deleted=True)

    async def SubscribeCaptions(
        self, request: pb.SubscribeRequest, context: Any
    ) -> AsyncIterator[pb.CaptionEvent]:
        await self._authenticate(context)
        try:
            sub = self.rooms.subscribe(request.room, request.include_interims)
        except Exception as e:
            code, message = _error_status(e)
            await context.abort(code, message)
            return
        try:
            async for cap in sub:
                yield caption_to_proto(cap)
        finally:
            self.rooms.unsubscribe(request.room, sub)


def caption_to_proto(c: Caption) -> pb.CaptionEvent:
    return pb.CaptionEvent(
        room=c.room,
        participant_id=c.participant_id,
        participant_name=c.participant_name,
        avatar_url=c.avatar_url,
        message_id=c.message_id,
        text=c.text,
        is_interim=c.is_interim,
        stability=c.stability,
        language=c.language,
        start_time_ms=c.start_time_ms,
        end_time_ms=c.end_time_ms,
        timestamp_ms=c.timestamp_ms,
        confidence=c.confidence,
    )
