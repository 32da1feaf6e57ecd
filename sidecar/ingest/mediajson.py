"""The videobridge's media export (``mediajson`` over a WebSocket).

Jicofo tells jitsi-videobridge to open a WebSocket to
``jicofo.transcription.url-template`` (here ``ws://HOST:PORT/mediajson/{{MEETING_ID}}``)
with the headers of ``jicofo.transcription.http-headers``. One socket per
conference carries every audio source: ``start`` names a source (its tag,
e.g. ``abcd1234-a0``, and the endpoint id), ``media`` carries base64 Opus
with the RTP sequence number (``chunk``) and timestamp as strings, the
sender's ``vad`` flag and ``audioLevel``; the bridge pings every 10 s and
reconnects when no pong comes within 3 s. Captions may go back on the same
socket as ``transcription-result`` messages, which the bridge relays to the
participants as endpoint messages from "transcriber" (jvb ``Conference``,
``ExporterEventHandlerImpl.handleTranscriptionResult``): this is the room's
``videobridge`` carrier, used only when the transcriber occupant is not in
the room (see :mod:`sidecar.rooms`); otherwise the socket carries no
captions, or every caption would be shown twice.

Forward compatibility: the event set grew three times in 2026, so an event
this sidecar does not know is counted (``outcome="unknown_event"``) and
ignored, never answered with a close (the bridge would reconnect in a loop).
The fields follow jicoco ``MediaJson.kt`` and jvb ``MediaJsonSerializer.kt``:
``sequenceNumber``, ``chunk``, ``timestamp`` and ``stop.mediaInfo``'s numbers
are strings; ``ping.id``, ``audioLevel``, ``vad``, ``start.timestamp``,
``stop.timestamp``, ``sampleRate`` and ``channels`` are JSON numbers (or
booleans); ``mediaFormat.parameters`` is a map of strings (the payload type's
fmtp, e.g. ``useinbandfec``), ``start.diarize`` is ``true`` or absent;
``sources`` (sent only when non-empty) lists the source names the bridge
exports and the ones it asks back (translated audio, which this sidecar
does not make).

Jicofo appends a room's metadata ``transcription.urlParams`` to the URL
(``ColibriV2SessionManager.buildTranscriberSpec``, form-encoded) and sends
``transcription.httpHeaders`` as headers on the upgrade (merged over
``jicofo.transcription.http-headers``, ``TranscriptionConfig.
processTranscriptionMetadata``). Honoured here: ``room`` (the internal room
JID, e.g. ``[tenant]room@conference.example.org``: the socket belongs to that
room at once, no meeting-id mapping needed), ``language`` (or ``lang``: the
room's language for this session) and the ``Authorization: Bearer`` header.

After a reconnect the bridge sends ``start`` again for each source; ``chunk``
is the extended RTP sequence number, so the speaker's stream goes on where it
was (a gap is filled as lost frames): the same room, the same transcript.
Only the newest socket of a room answers, so a reconnect never doubles a
caption.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import json
import logging
import re
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any, TypeGuard

from aiohttp import WSCloseCode, WSMsgType, web
from prometheus_client import Counter, Gauge

from sidecar.config import RoomSettings, SettingError
from sidecar.counters import batched
from sidecar.errors import ServiceError
from sidecar.events import Caption, Frame
from sidecar.ingest.common import CloseConnection, TokenBucket
from sidecar.jitsi import caption_json
from sidecar.rooms import Carrier, Room, RoomManager, canonical_room, valid_participant

log = logging.getLogger(__name__)

_loads: Callable[[str], Any]
try:  # a media message per participant every 20 ms: parse them fast
    from orjson import loads as _loads
except ImportError:  # pragma: no cover - orjson is a dependency
    _loads = json.loads

MESSAGES = Counter(
    "captions_mediajson_messages_total",
    "mediajson messages from the videobridge, by outcome",
    ["outcome"],
)
CONNECTIONS = Gauge("captions_mediajson_connections", "Open videobridge export sockets")
CLOSES = Counter("captions_mediajson_closes_total", "Export sockets closed, by reason", ["reason"])
REPLIES = Counter("captions_mediajson_replies_total", "Captions sent back to the videobridge")
# bound once: media messages come 50 times a second per participant
_M_MEDIA = batched(MESSAGES.labels("media"))
_M_MEDIA_DROPPED = batched(MESSAGES.labels("media_dropped"))

_MEETING_RE = re.compile(r"^[A-Za-z0-9._\-]{1,128}$")
_KNOWN = {
    "info",
    "sources",
    "start",
    "media",
    "ping",
    "pong",
    "stop",
    "session-end",
    "transcription-result",
}
_NUMBER = (int, float)
# events counted under their own name; anything else is "unknown_event"
_COUNTED = {"info", "pong", "transcription-result"}
BACKLOG_MAX_AGE = 30.0  # seconds a final waits for a reconnecting bridge
CLOSE_POLICY = 1008
CLOSE_INVALID = 1007
CLOSE_UNSUPPORTED = 1003


class _Connection:
    def __init__(self, endpoint: MediaJsonEndpoint, ws: web.WebSocketResponse, room: str) -> None:
        self.endpoint = endpoint
        self.ws = ws
        self.room = room
        self.sources: dict[str, str | None] = {}  # tag -> endpoint id (None: not Opus)
        # tag -> factor from the source's clock to the 48 kHz ticks of a Frame
        self.clock: dict[str, float] = {}
        self.formats: dict[str, dict[str, Any]] = {}  # tag -> mediaFormat, as sent
        self.exports: list[str] = []  # from "sources": what the bridge exports
        self.language: str | None = None  # from the URL's language parameter
        self.warned: set[str] = set()
        self.bucket = TokenBucket(endpoint.max_messages_per_second)
        self.send_queue: asyncio.Queue[str] = asyncio.Queue(maxsize=1000)
        self.sender: asyncio.Task[None] | None = None
        self.ended = False
        self.meeting_id = ""
        # the room was named after the meeting id because no start call had
        # mapped it yet (a bridge reconnecting to a restarted sidecar)
        self.provisional = False
        self.next_check = 0.0

    def warn_once(self, key: str, message: str, *args: object) -> None:
        # one line per problem per socket: a newer bridge must not flood the log
        if key not in self.warned and len(self.warned) < 32:
            self.warned.add(key)
            log.warning("mediajson: room %s: " + message, self.room, *args)

    def send(self, c: Caption) -> None:
        try:
            self.send_queue.put_nowait(json.dumps(caption_json(c), ensure_ascii=False))
        except asyncio.QueueFull:
            MESSAGES.labels("reply_dropped").inc()

    async def send_loop(self) -> None:
        while True:
            text = await self.send_queue.get()
            try:
                await self.ws.send_str(text)
                REPLIES.inc()
            except (ConnectionError, RuntimeError):
                return


class MediaJsonEndpoint:
    """aiohttp WebSocket handler for the videobridge's media export."""

    def __init__(
        self,
        rooms: RoomManager,
        *,
        token: str,
        max_message_bytes: int = 65536,
        max_messages_per_second: int = 5000,
        auto_start: bool = True,
        mapping_wait: float = 2.0,
    ) -> None:
        self.rooms = rooms
        self._token = token.encode()
        self.max_message_bytes = max_message_bytes
        self.max_messages_per_second = max_messages_per_second
        self.auto_start = auto_start
        self.mapping_wait = mapping_wait
        self.latest: dict[str, _Connection] = {}
        self._open: set[_Connection] = set()
        # finals made while a room's bridge was reconnecting, sent on its return
        self._backlog: dict[str, deque[tuple[float, Caption]]] = {}
        self.closing = False
        self._tasks: set[asyncio.Task[None]] = set()
        rooms.on_change.append(self._room_changed)
        self._carriers: dict[str, Carrier] = {}

    def _room_changed(self, room: Room, what: str) -> None:
        # finals kept for a reconnecting bridge never outlive their meeting
        if what == "end" or not room.active:
            self._backlog.pop(room.name, None)
            self._carriers.pop(room.name, None)

    def add_routes(self, app: web.Application, path: str) -> None:
        app.router.add_get(path + "/{meeting_id}", self.handle)

    async def close(self) -> None:
        self.closing = True
        for conn in list(self._open):
            with contextlib.suppress(Exception):
                await conn.ws.close(code=WSCloseCode.GOING_AWAY, message=b"sidecar shutting down")

    def _authorised(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        presented = header[7:].strip() if header[:7].lower() == "bearer " else ""
        if not header:
            # Jicofo before jicofo.transcription.http-headers (December 2025)
            # cannot send a header: the token may ride in the url-template
            presented = request.query.get("token", "")
        return bool(presented) and hmac.compare_digest(presented.encode(), self._token)

    async def _room_for(self, request: web.Request, meeting_id: str) -> tuple[str, bool]:
        """The room for a meeting, and whether that is only a stand-in."""
        explicit = request.query.get("room")
        if explicit:
            return canonical_room(explicit), False
        # the Prosody module tells us the meeting id with its start call; the
        # bridge may be quicker, so give it a moment
        deadline = time.monotonic() + self.mapping_wait
        while True:
            name = self.rooms.room_for_meeting(meeting_id)
            if name is not None:
                return name, False
            if time.monotonic() >= deadline:
                return canonical_room(meeting_id), True
            await asyncio.sleep(0.05)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if not self._authorised(request):
            CLOSES.labels("unauthorised").inc()
            return web.Response(status=401, text="missing or wrong bearer token\n")
        meeting_id = request.match_info["meeting_id"]
        if not _MEETING_RE.match(meeting_id):
            return web.Response(status=400, text="bad meeting id\n")
        try:
            room, provisional = await self._room_for(request, meeting_id)
        except ServiceError as e:
            return web.Response(status=400, text=f"{e}\n")
        if self.closing:
            return web.Response(status=503, text="the sidecar is shutting down\n")
        # heartbeat: a half-open bridge socket is noticed within a minute
        ws = web.WebSocketResponse(
            max_msg_size=self.max_message_bytes, autoping=True, heartbeat=30.0
        )
        await ws.prepare(request)
        conn = _Connection(self, ws, room)
        conn.meeting_id = meeting_id
        conn.provisional = provisional
        settings = self._url_settings(conn, request)
        if self.auto_start:
            # each kind on its own: a room with captions disabled still gets
            # its transcript, and the other way round
            started, refusals = 0, []
            for kind in ("transcription", "captions"):
                try:
                    await self.rooms.start(
                        room,
                        kind,
                        settings,
                        requested_by="videobridge",
                        # a stand-in must not claim the meeting: its real
                        # room's start call is what maps it
                        meeting_id="" if provisional else meeting_id,
                    )
                    started += 1
                except ServiceError as e:
                    refusals.append(str(e))
            if not started:
                log.warning("mediajson: room %s refused: %s", room, "; ".join(refusals))
                CLOSES.labels("refused").inc()
                await ws.close(code=CLOSE_POLICY, message=refusals[0][:120].encode())
                return ws
        try:
            r = self.rooms.get(room)
        except ServiceError:
            CLOSES.labels("no_room").inc()
            await ws.close(code=CLOSE_POLICY, message=b"room is not transcribing")
            return ws
        self.latest[room] = conn
        self._open.add(conn)
        self._attach(r)
        r.ingest_connections += 1
        CONNECTIONS.inc()
        conn.sender = asyncio.create_task(conn.send_loop())
        now = time.monotonic()
        for made, c in self._backlog.pop(room, ()):
            if now - made < BACKLOG_MAX_AGE:
                conn.send(c)
        log.info("mediajson: videobridge connected for room %s (meeting %s)", room, meeting_id)
        reason = "closed"
        try:
            reason = await self._receive(conn)
        finally:
            CLOSES.labels(reason).inc()
            CONNECTIONS.dec()
            r.ingest_connections -= 1
            self._open.discard(conn)
            if self.latest.get(room) is conn:
                del self.latest[room]
            if conn.sender is not None:
                # let queued captions go out before the socket is gone
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._flush(conn), 1.0)
                conn.sender.cancel()
            if not ws.closed:
                await ws.close()
        return ws

    @staticmethod
    def _url_settings(conn: _Connection, request: web.Request) -> RoomSettings | None:
        """The room settings the URL's parameters (metadata urlParams) give."""
        lang = request.query.get("language") or request.query.get("lang")
        if not lang:
            return None
        try:
            settings = RoomSettings(language=lang).validate()
        except SettingError as e:
            MESSAGES.labels("bad_url_parameter").inc()
            conn.warn_once("language", "ignoring the URL's language: %s", e.message)
            return None
        conn.language = settings.language
        return settings

    async def _remapped(self, conn: _Connection) -> bool:
        """The meeting's real room became known: send the bridge there.

        Closing with 1012 makes the bridge reconnect at once; the new socket
        finds the mapping. The stand-in room, which has no names and no MUC,
        is ended.
        """
        now = time.monotonic()
        if now < conn.next_check:
            return False
        conn.next_check = now + 1.0
        name = self.rooms.room_for_meeting(conn.meeting_id)
        if name is None or name == conn.room:
            return False
        log.info(
            "mediajson: meeting %s belongs to room %s; moving the bridge there",
            conn.meeting_id,
            name,
        )
        stand_in = conn.room
        await conn.ws.close(code=1012, message=b"the meeting's room is known now; reconnect")
        task = asyncio.create_task(self._end_stand_in(stand_in))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _end_stand_in(self, name: str) -> None:
        r = self.rooms.rooms.get(name)
        if r is not None and r.source == "videobridge":
            with contextlib.suppress(ServiceError):
                await self.rooms.end_room(name)

    def _attach(self, r: Room) -> None:
        """The room's ``videobridge`` carrier: a caption the room sends this
        way goes to its newest socket only, so a reconnecting bridge never
        gets (and relays) a caption twice. Finals made while the bridge is
        away wait for its return; only captions that took this carrier do,
        so a reconnect never replays what went out through the MUC."""
        if r.carriers.get("videobridge") is self._carriers.get(r.name) is not None:
            return
        name = r.name

        def send(c: Caption) -> None:
            conn = self.latest.get(name)
            if conn is not None:
                conn.send(c)
            elif not c.is_interim:
                self._backlog.setdefault(name, deque(maxlen=100)).append((time.monotonic(), c))

        carrier = Carrier("videobridge", ready=lambda: True, send=send)
        self._carriers[name] = carrier
        r.carriers["videobridge"] = carrier

    @staticmethod
    async def _flush(conn: _Connection) -> None:
        while not conn.send_queue.empty() and not conn.ws.closed:  # noqa: ASYNC110
            await asyncio.sleep(0.01)

    async def _receive(self, conn: _Connection) -> str:
        ws = conn.ws
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                if not conn.bucket.take():
                    MESSAGES.labels("rate_limited").inc()
                    await ws.close(code=CLOSE_POLICY, message=b"message rate limit exceeded")
                    return "rate_limited"
                try:
                    # media (nearly every message) is handled without a coroutine
                    pending = self._message(conn, msg.data)
                    if pending is not None:
                        await pending
                except CloseConnection as e:
                    MESSAGES.labels(e.outcome).inc()
                    await ws.close(code=e.code, message=e.reason[:120].encode())
                    return e.outcome
                except Exception:
                    # a bug must cost this connection at most, never the sidecar
                    log.exception("mediajson: failed on a message in room %s", conn.room)
                    MESSAGES.labels("internal").inc()
                if conn.ended:
                    await ws.close(code=WSCloseCode.OK, message=b"session ended")
                    return "session_end"
                if conn.provisional and await self._remapped(conn):
                    return "remapped"
            elif msg.type == WSMsgType.BINARY:
                MESSAGES.labels("binary").inc()
                await ws.close(code=CLOSE_UNSUPPORTED, message=b"mediajson is JSON text frames")
                return "binary"
            elif msg.type == WSMsgType.ERROR:
                exc = ws.exception()
                too_big = "too big" in str(exc).lower() or ws.close_code == 1009
                MESSAGES.labels("too_big" if too_big else "ws_error").inc()
                return "too_big" if too_big else "ws_error"
        return "closed"

    def _message(self, conn: _Connection, data: str) -> Coroutine[Any, Any, None] | None:
        """Handle one message; returns a coroutine when the event needs awaiting."""
        try:
            msg = _loads(data)
        except ValueError:
            raise CloseConnection(CLOSE_INVALID, "invalid JSON", "bad_json") from None
        if not isinstance(msg, dict) or not isinstance(msg.get("event"), str):
            raise CloseConnection(
                CLOSE_INVALID, "a message must be an object with an 'event'", "malformed"
            )
        event = msg["event"]
        if event not in _KNOWN:
            # a newer bridge: count it (bounded label) and go on
            MESSAGES.labels("unknown_event").inc()
            conn.warn_once(
                "event:" + event[:40], "ignoring the unknown event %r (a newer bridge?)", event[:40]
            )
            return None
        if event == "media":
            self._media(conn, msg.get("media"))
            return None
        if event == "start":
            self._start(conn, msg.get("start"))
            return None
        return self._other(conn, event, msg)

    async def _other(self, conn: _Connection, event: str, msg: dict[str, Any]) -> None:
        if event == "ping":
            MESSAGES.labels("ping").inc()
            await conn.ws.send_str(json.dumps({"event": "pong", "id": msg.get("id")}))
        elif event == "stop":
            MESSAGES.labels("stop").inc()
            body = msg.get("stop")
            tag = body.get("tag") if isinstance(body, dict) else None
            pid = conn.sources.pop(tag, None) if isinstance(tag, str) else None
            if pid is not None and pid not in conn.sources.values():
                # its last final may take a while: keep answering pings meanwhile
                task = asyncio.create_task(self.rooms.finish_speaker(conn.room, pid))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        elif event == "sources":
            self._sources(conn, msg)
        elif event == "session-end":
            MESSAGES.labels("session_end").inc()
            conn.ended = True
            self._backlog.pop(conn.room, None)
            for kind in ("captions", "transcription"):
                with contextlib.suppress(ServiceError):
                    await self.rooms.stop(conn.room, kind, force=True)
        else:
            if event == "info":
                log.info(
                    "mediajson: %s %s%s in room %s",
                    str(msg.get("application"))[:64],
                    str(msg.get("version"))[:64],
                    f" (region {str(msg['region'])[:64]})" if "region" in msg else "",
                    conn.room,
                )
            MESSAGES.labels(event.replace("-", "_") if event in _COUNTED else "other").inc()

    @staticmethod
    def _sources(conn: _Connection, msg: dict[str, Any]) -> None:
        """``{"exports": [names], "requests": [names]}`` (jicoco ``SourcesEvent``)."""
        exports, requests = msg.get("exports"), msg.get("requests")
        if not _strings(exports) or not _strings(requests):
            MESSAGES.labels("bad_sources").inc()
            conn.warn_once("sources", "a sources event without lists of source names; ignored")
            return
        MESSAGES.labels("sources").inc()
        conn.exports = list(exports[:1000])
        log.info(
            "mediajson: room %s: the bridge exports %d source(s)%s",
            conn.room,
            len(exports),
            f" and asks for {len(requests)} back" if requests else "",
        )
        if requests:
            conn.warn_once(
                "requests",
                "the bridge asks for %d source(s) back (translated audio); this sidecar "
                "sends captions only",
                len(requests),
            )

    def _start(self, conn: _Connection, body: Any) -> None:
        if not isinstance(body, dict) or not isinstance(body.get("tag"), str):
            raise CloseConnection(CLOSE_INVALID, "start without a tag", "malformed")
        tag = body["tag"]
        if len(tag) > 128:
            raise CloseConnection(
                CLOSE_INVALID, "source tag longer than 128 characters", "malformed"
            )
        fmt = body.get("mediaFormat")
        fmt = fmt if isinstance(fmt, dict) else {}
        params = body.get("customParameters") or {}
        endpoint = params.get("endpointId") if isinstance(params, dict) else None
        if not isinstance(endpoint, str) or not endpoint:
            # source names are "<endpoint>-a<n>"
            endpoint = tag.rsplit("-", 1)[0]
        if not valid_participant(endpoint):
            MESSAGES.labels("bad_endpoint").inc()
            conn.sources[tag] = None
            return
        encoding = str(fmt.get("encoding", "opus")).lower()
        if encoding != "opus":
            MESSAGES.labels("unsupported_encoding").inc()
            conn.warn_once(
                "enc:" + encoding[:20], "source %s is %r, not Opus; ignored", tag, encoding
            )
            conn.sources[tag] = None
            return
        if len(conn.sources) >= 4 * self.rooms.max_speakers and tag not in conn.sources:
            raise CloseConnection(CLOSE_POLICY, "too many sources", "too_many_sources")
        # sampleRate is the RTP clock (48000 for Opus, RFC 7587); a Frame's
        # timestamp is in 48 kHz ticks
        rate = fmt.get("sampleRate", 48000)
        if type(rate) not in _NUMBER or not 8000 <= rate <= 192000:
            MESSAGES.labels("bad_media_format").inc()
            conn.warn_once(
                "rate", "source %s: sampleRate %r is not a clock rate; 48000 assumed", tag, rate
            )
            rate = 48000
        if rate != 48000:
            conn.clock[tag] = 48000 / rate
        else:
            conn.clock.pop(tag, None)
        parameters = fmt.get("parameters")
        if parameters is not None and not (
            isinstance(parameters, dict) and all(isinstance(v, str) for v in parameters.values())
        ):
            MESSAGES.labels("bad_media_format").inc()
            conn.warn_once(
                "params", "source %s: mediaFormat.parameters is not a map of strings", tag
            )
            parameters = None
        conn.formats[tag] = {
            "encoding": encoding,
            "sampleRate": rate,
            "channels": fmt.get("channels"),
            "parameters": dict(parameters or {}),
        }
        if body.get("diarize") is True:
            # each endpoint's audio is its own stream here: one speaker per
            # stream, named after the endpoint; nothing to separate further
            MESSAGES.labels("start_diarize").inc()
            conn.warn_once(
                "diarize",
                "diarization asked for (source %s): each endpoint is captioned as one speaker",
                tag,
            )
        if conn.exports and tag not in conn.exports:
            MESSAGES.labels("unannounced_source").inc()
        conn.sources[tag] = endpoint
        # every source sends 50 packets a second: the limit grows with the meeting
        conn.bucket.rate = max(self.max_messages_per_second, 75 * len(conn.sources))
        MESSAGES.labels("start").inc()

    def _media(self, conn: _Connection, body: Any) -> None:
        if not isinstance(body, dict):
            raise CloseConnection(CLOSE_INVALID, "media without a body", "malformed")
        tag = body.get("tag")
        if tag not in conn.sources:
            MESSAGES.labels("unknown_source").inc()
            return
        endpoint = conn.sources[tag]
        if endpoint is None:
            MESSAGES.labels("ignored_source").inc()
            return
        try:
            chunk = int(body.get("chunk", 0))
            ts = int(body.get("timestamp", 0))
            if conn.clock and tag in conn.clock:
                ts = int(ts * conn.clock[tag])
            payload = base64.b64decode(body.get("payload", ""), validate=True)
        except (ValueError, TypeError, binascii.Error):
            MESSAGES.labels("bad_media").inc()
            return
        vad = body.get("vad")
        level = body.get("audioLevel")
        frame = Frame(
            payload,
            chunk & 0xFFFF,
            ts,
            vad if vad is True or vad is False else None,
            float(level) if type(level) in _NUMBER else None,  # type: ignore[arg-type]
        )
        ok = self.rooms.push_frame(conn.room, endpoint, frame)
        (_M_MEDIA if ok else _M_MEDIA_DROPPED).inc()


def _strings(value: object) -> TypeGuard[list[str]]:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)
