"""Typed room events and the bus that carries them to the outputs.

The rooms publish what happens to them as one of a few frozen dataclasses
(:class:`SessionStarted`, :class:`SessionStopped`, :class:`RoomEnded`,
:class:`TranscriptReady`, :class:`SessionFailed`, :class:`CaptionPublished`);
every output (the MUC transcriber, the gRPC subscription, the webhook sender,
the storage archiver, the transcript page) is one subscriber of an
:class:`EventBus`.

Slow subscribers. :meth:`EventBus.publish` never blocks and never waits for
a subscriber. Each subscriber has a bounded queue; when it is full:

1. a new *interim* caption is dropped (the next interim or the final
   replaces it anyway);
2. anything else first evicts the oldest queued interim, then the oldest
   queued final caption;
3. a queue holding nothing but lifecycle events cannot make room without
   losing one, which no output may do silently: the subscriber is cut off
   (:attr:`Subscription.lagged` is set, its iterator raises
   :class:`SubscriberLagged` once it has drained what it has), counted, and
   logged. A consumer that must never miss one (webhooks) reads quickly into
   its own durable outbox, so this only happens to a consumer that stopped.

Every drop is counted in ``captions_room_event_drops_total{subscriber,what}``
under the subscriber's name, which comes from code (a bounded set), never
from a room or a user.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import ClassVar

from prometheus_client import Counter

from sidecar.events import Caption
from sidecar.store.base import TranscriptMeta

__all__ = [
    "EVENT_TYPES",
    "CaptionPublished",
    "EventBus",
    "RoomEnded",
    "RoomEvent",
    "SessionFailed",
    "SessionStarted",
    "SessionStopped",
    "SubscriberLagged",
    "Subscription",
    "TranscriptReady",
]

log = logging.getLogger(__name__)

EVENT_DROPS = Counter(
    "captions_room_event_drops_total",
    "Room events a slow subscriber did not get",
    ["subscriber", "what"],
)

#: The kinds of session a room has: a transcript, and live captions.
KINDS = ("transcription", "captions")


def _now_ms() -> int:
    return int(time.time() * 1000)


def _new_id() -> str:
    return str(uuid.uuid4())


@dataclass(frozen=True, kw_only=True)
class RoomEvent:
    """What every event carries: the room, when, and a unique id.

    ``id`` is the idempotency key webhooks send; ``at_ms`` is epoch
    milliseconds. :attr:`type` is the stable name used in webhook bodies
    and in endpoint filters.
    """

    room: str
    at_ms: int = field(default_factory=_now_ms)
    id: str = field(default_factory=_new_id)

    type: ClassVar[str] = "room.event"

    @property
    def lifecycle(self) -> bool:
        """True for everything but captions (lifecycle events are never dropped silently)."""
        return True

    @property
    def interim(self) -> bool:
        return False

    def data(self) -> dict[str, object]:
        """The event's own fields, JSON-ready (webhook ``data``)."""
        return {}


@dataclass(frozen=True, kw_only=True)
class SessionStarted(RoomEvent):
    """Transcription or captions were switched on in a room."""

    kind: str  # "transcription" or "captions"
    transcript_id: str = ""
    trigger: str = "manual"
    requested_by: str = ""
    meeting_id: str = ""

    @property
    def type(self) -> str:  # type: ignore[override]
        return f"{self.kind}.started"

    def data(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "transcript_id": self.transcript_id,
            "trigger": self.trigger,
            "requested_by": self.requested_by,
            "meeting_id": self.meeting_id,
        }


@dataclass(frozen=True, kw_only=True)
class SessionStopped(RoomEvent):
    """Transcription or captions were switched off, and why.

    ``reason`` is one of ``user`` (a stop call), ``source_ended`` (the
    videobridge or Jigasi closed the session), ``idle`` (no audio source for
    too long), ``room_ended``, ``shutdown``, or what the caller passed.
    """

    kind: str
    reason: str = "user"
    transcript_id: str = ""

    @property
    def type(self) -> str:  # type: ignore[override]
        return f"{self.kind}.stopped"

    def data(self) -> dict[str, object]:
        return {"kind": self.kind, "reason": self.reason, "transcript_id": self.transcript_id}


@dataclass(frozen=True, kw_only=True)
class RoomEnded(RoomEvent):
    """The room is gone from this sidecar (everything off, subscribers closed)."""

    type: ClassVar[str] = "room.ended"


@dataclass(frozen=True, kw_only=True)
class TranscriptReady(RoomEvent):
    """A transcript was closed and its files written (``meta.formats``)."""

    meta: TranscriptMeta
    url: str = ""  # the signed link, when links are configured

    type: ClassVar[str] = "transcription.ready"

    def data(self) -> dict[str, object]:
        out: dict[str, object] = {"transcript": self.meta.to_dict()}
        if self.url:
            out["url"] = self.url
        return out


@dataclass(frozen=True, kw_only=True)
class SessionFailed(RoomEvent):
    """Transcription or captions could not go on (or could not start).

    ``cause`` is a short machine-readable reason (``store_write``,
    ``recognizer``, ``xmpp``...) and ``message`` the human one.
    """

    kind: str
    cause: str
    message: str = ""
    transcript_id: str = ""

    @property
    def type(self) -> str:  # type: ignore[override]
        return f"{self.kind}.failed"

    def data(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "cause": self.cause,
            "message": self.message,
            "transcript_id": self.transcript_id,
        }


@dataclass(frozen=True, kw_only=True)
class CaptionPublished(RoomEvent):
    """One interim or final caption, as the gRPC subscription and the MUC get it."""

    caption: Caption
    transcript_id: str = ""

    @property
    def type(self) -> str:  # type: ignore[override]
        return "caption.interim" if self.caption.is_interim else "caption.final"

    @property
    def lifecycle(self) -> bool:
        return False

    @property
    def interim(self) -> bool:
        return self.caption.is_interim

    def data(self) -> dict[str, object]:
        c = self.caption
        return {
            "transcript_id": self.transcript_id,
            "message_id": c.message_id,
            "participant": {"id": c.participant_id, "name": c.participant_name},
            "text": c.text,
            "is_interim": c.is_interim,
            "stability": c.stability,
            "language": c.language,
            "start_time_ms": c.start_time_ms,
            "end_time_ms": c.end_time_ms,
            "confidence": c.confidence,
        }


#: Every event type name an endpoint may ask for.
EVENT_TYPES: tuple[str, ...] = (
    "transcription.started",
    "transcription.stopped",
    "transcription.ready",
    "transcription.failed",
    "captions.started",
    "captions.stopped",
    "captions.failed",
    "caption.final",
    "caption.interim",
    "room.ended",
)


class SubscriberLagged(Exception):
    """The subscriber fell so far behind that a lifecycle event would have been lost."""


EventFilter = Callable[[RoomEvent], bool]


class Subscription:
    """One subscriber's bounded queue; iterate it with ``async for``.

    Made by :meth:`EventBus.subscribe`; close it (or leave its ``with``
    block) to unsubscribe.
    """

    def __init__(
        self,
        bus: EventBus,
        name: str,
        maxsize: int,
        accept: EventFilter | None,
        include_interims: bool,
    ) -> None:
        if maxsize < 1:
            raise ValueError("maxsize must be at least 1")
        self.bus = bus
        self.name = name
        self.maxsize = maxsize
        self.accept = accept
        self.include_interims = include_interims
        self._queue: collections.deque[RoomEvent] = collections.deque()
        self._wakeup = asyncio.Event()
        self.closed = False
        self.lagged = False
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._queue)

    def offer(self, event: RoomEvent) -> bool:
        """Queue ``event`` under the slow-subscriber policy; False when it was not queued."""
        if self.closed:
            return False
        if event.interim and not self.include_interims:
            return False
        if self.accept is not None and not self.accept(event):
            return False
        if len(self._queue) >= self.maxsize and not self._make_room(event):
            return False
        self._queue.append(event)
        self._wakeup.set()
        return True

    def _make_room(self, event: RoomEvent) -> bool:
        if event.interim:
            self._drop("interim")
            return False
        for want in ("interim", "final"):
            for i, queued in enumerate(self._queue):
                if not queued.lifecycle and (queued.interim == (want == "interim")):
                    del self._queue[i]
                    self._drop(want)
                    return True
        # only lifecycle events queued: cut the subscriber off rather than lose one
        self._drop("lifecycle")
        log.error(
            "event subscriber %s holds %d unread lifecycle events; cutting it off",
            self.name,
            len(self._queue),
        )
        self.lagged = True
        self.close()
        return False

    def _drop(self, what: str) -> None:
        self.dropped += 1
        EVENT_DROPS.labels(self.name, what).inc()

    def get_nowait(self) -> RoomEvent | None:
        """The next queued event, or None."""
        return self._queue.popleft() if self._queue else None

    async def get(self) -> RoomEvent:
        """The next event; raises StopAsyncIteration once closed and drained."""
        while not self._queue:
            if self.closed:
                if self.lagged:
                    raise SubscriberLagged(f"subscriber {self.name} fell behind and was cut off")
                raise StopAsyncIteration
            self._wakeup.clear()
            await self._wakeup.wait()
        return self._queue.popleft()

    def close(self) -> None:
        """Unsubscribe; what is already queued can still be read."""
        if not self.closed:
            self.closed = True
            self.bus._discard(self)
        self._wakeup.set()

    def __aiter__(self) -> AsyncIterator[RoomEvent]:
        return self

    async def __anext__(self) -> RoomEvent:
        return await self.get()

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EventBus:
    """Fan-out of room events to subscribers; publishing never blocks."""

    def __init__(self) -> None:
        self._subs: list[Subscription] = []
        self._sync: list[tuple[str, Callable[[RoomEvent], None]]] = []

    def subscribe(
        self,
        name: str,
        *,
        maxsize: int = 1024,
        accept: EventFilter | None = None,
        include_interims: bool = True,
        rooms: Iterable[str] | None = None,
    ) -> Subscription:
        """A new queue for events from now on.

        ``name`` labels the drop metric (use a fixed word per output, never
        a room or user). ``rooms`` limits it to those rooms; ``accept`` is
        any further filter.
        """
        wanted = frozenset(r.lower() for r in rooms) if rooms is not None else None
        if wanted is not None:
            inner = accept

            def accept_rooms(e: RoomEvent) -> bool:
                return e.room in wanted and (inner is None or inner(e))

            accept = accept_rooms
        sub = Subscription(self, name, maxsize, accept, include_interims)
        self._subs.append(sub)
        return sub

    def add_listener(self, name: str, fn: Callable[[RoomEvent], None]) -> None:
        """Call ``fn`` synchronously for every event (for cheap, non-blocking work only)."""
        self._sync.append((name, fn))

    def remove_listener(self, fn: Callable[[RoomEvent], None]) -> None:
        self._sync = [(n, f) for n, f in self._sync if f is not fn]

    def _discard(self, sub: Subscription) -> None:
        if sub in self._subs:
            self._subs.remove(sub)

    @property
    def subscribers(self) -> int:
        return len(self._subs) + len(self._sync)

    def publish(self, event: RoomEvent) -> None:
        """Hand ``event`` to every subscriber; a failing listener is logged, not raised."""
        for name, fn in list(self._sync):
            try:
                fn(event)
            except Exception:
                log.exception("room event listener %s failed on %s", name, event.type)
        for sub in list(self._subs):
            sub.offer(event)
