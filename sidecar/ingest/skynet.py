"""Jigasi's Whisper transcription service: skynet's streaming-whisper WebSocket.

Jigasi (``WhisperTranscriptionService``) opens one WebSocket per conference
to ``ws://HOST<skynet_path>/<connectionId>``, where ``connectionId`` is a
random UUID that stays the same when Jigasi reconnects; here it names the
room. Credentials come as ``Authorization: Bearer <token>`` or as the
``auth_token`` query parameter (what Jigasi itself sends).

Every binary message is one chunk of one participant's audio: a 60-byte
header holding ``participantId|language`` in UTF-8, NUL-padded, then raw PCM
(16 kHz, signed 16-bit little-endian, mono). A message of a single 0x00 byte
ends the stream: Jigasi sends it when the last participant has left, then
disconnects. Results go back as JSON text messages::

    {"id": "<uuid>", "participant_id": "...", "ts": <epoch ms>, "text": "...",
     "type": "interim" | "final", "variance": <float>}

Jigasi parses ``id`` with ``UUID.fromString`` and ``ts`` with ``getLong``
(an invalid value makes it drop the message) and passes ``variance``
straight on as the result's *stability*; skynet sends 1.0 for finals and
0.5 for interims. So ``variance`` here is the caption's stability: 1.0 for a
final, the stable fraction of the words (0..1) for an interim, always a
JSON float. ``ts`` is when the utterance's speech started, the same for its
interims and its final, which is what Jigasi reads it as.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import math
import re
import time
import uuid
from pathlib import Path

import numpy as np
from aiohttp import WSCloseCode, WSMsgType, web
from aiohttp.http_websocket import WebSocketError
from prometheus_client import Counter, Gauge

from sidecar.config import RoomSettings, SettingError, canonical_language
from sidecar.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ServiceError,
    Unavailable,
)
from sidecar.events import Caption, Frame
from sidecar.ingest.common import CloseConnection, TokenBucket
from sidecar.rooms import Room, RoomManager, Subscriber, canonical_room, valid_participant

__all__ = [
    "CONNECTIONS",
    "CONNECTIONS_OPEN",
    "END_OF_STREAM",
    "HEADER_BYTES",
    "MESSAGES",
    "REPLIES",
    "SkynetEndpoint",
    "caption_reply",
]

log = logging.getLogger(__name__)
_KID_RE = re.compile(r"^[A-Za-z0-9._/-]{1,256}$")

HEADER_BYTES = 60
END_OF_STREAM = b"\x00"
SAMPLE_RATE = 16000
REQUESTED_BY = "jigasi"

# Speakers one connection keeps state for; beyond the room's own limit they
# could not be captioned anyway, and the bound keeps a hostile client from
# growing our dictionaries without end.
MAX_PARTICIPANTS_PER_CONNECTION = 256
# Captions waiting to be written to one slow socket; interims are dropped
# first (rooms.Subscriber does that), finals only when the queue is all finals.
REPLY_QUEUE = 256
# How long the end of a stream may take to finish utterances and send their
# finals before the socket is closed anyway.
FINISH_TIMEOUT_S = 30.0
FLUSH_TIMEOUT_S = 2.0
HEARTBEAT_S = 30.0
CLOSE_REASON_BYTES = 120  # a close frame's reason must fit in 123 bytes

MESSAGE_OUTCOMES = (
    "audio",  # a chunk fed to the room
    "rejected",  # a chunk the room refused (inactive, too many speakers): see frames_dropped
    "odd_length",  # PCM with an odd byte count: dropped
    "empty",  # a header without audio: dropped
    "short",  # shorter than the header and not the end byte: dropped
    "bad_participant",  # participant id is not [A-Za-z0-9._~-]{1,64}: dropped
    "end",  # the end-of-stream byte
    "bad_header",  # header is not UTF-8: closed 1007
    "too_big",  # over max_message_bytes: closed 1009
    "rate_limited",  # over max_messages_per_second: closed 1008
    "text",  # a text message from the client: closed 1003
    "error",  # a protocol error or a bug: closed
)
MESSAGES = Counter(
    "captions_skynet_messages_total",
    "Messages received on the Jigasi (skynet) WebSocket, by outcome",
    ["outcome"],
)
CONNECTION_OUTCOMES = (
    "accepted",
    "unauthorized",
    "bad_request",
    "refused",  # the room could not be started (disabled, full)
    "error",
)
CONNECTIONS = Counter(
    "captions_skynet_connections_total",
    "Connection attempts on the Jigasi (skynet) WebSocket, by outcome",
    ["outcome"],
)
CONNECTIONS_OPEN = Gauge("captions_skynet_connections_open", "Open Jigasi (skynet) WebSockets")
REPLIES = Counter("captions_skynet_replies_total", "Results sent back to Jigasi, by type", ["type"])
for _outcome in MESSAGE_OUTCOMES:
    MESSAGES.labels(_outcome)  # export zeros, so rate() works from the first event
for _outcome in CONNECTION_OUTCOMES:
    CONNECTIONS.labels(_outcome)
for _type in ("interim", "final"):
    REPLIES.labels(_type)

# Jigasi needs a UUID as the id; our message ids are UUIDs already, other
# providers' may not be, so those map onto a stable UUID of their own.
_ID_NAMESPACE = uuid.UUID("5b0c2d1e-8f7a-4c3e-9a61-2f4d8e7b1c90")


def _reply_id(message_id: str) -> str:
    try:
        return str(uuid.UUID(message_id))
    except ValueError:
        return str(uuid.uuid5(_ID_NAMESPACE, message_id))


def _stability(value: float) -> float:
    value = float(value)
    if math.isnan(value):
        return 0.0  # NaN is not JSON and means "nothing known"
    return min(1.0, max(0.0, value))


def caption_reply(caption: Caption) -> str:
    """The JSON text message skynet sends for ``caption`` (see the module docstring)."""
    final = not caption.is_interim
    return json.dumps(
        {
            "id": _reply_id(caption.message_id),
            "participant_id": caption.participant_id,
            "ts": int(caption.start_time_ms),
            "text": caption.text,
            "type": "final" if final else "interim",
            # always a Python float, so it is written "1.0" or "0.5", never as
            # an integer: Jigasi reads it as a double
            "variance": 1.0 if final else _stability(caption.stability),
        },
        ensure_ascii=False,
        separators=(",", ":"),
    )


class _Speaker:
    """Where one participant's audio stands: the next frame's sequence and time."""

    __slots__ = ("samples", "sequence")

    def __init__(self) -> None:
        self.sequence = 0
        self.samples = 0


class _Connection:
    """One Jigasi socket: its room, its participants, its reply queue."""

    def __init__(self, endpoint: SkynetEndpoint, ws: web.WebSocketResponse, room: str) -> None:
        self.endpoint = endpoint
        self.ws = ws
        self.room = room
        self.bucket = TokenBucket(endpoint.max_messages_per_second)
        self.speakers: dict[str, _Speaker] = {}
        # participants whose audio a room took: only their captions go back
        self.participants: set[str] = set()
        self.replies = Subscriber(include_interims=True, maxsize=REPLY_QUEUE)
        self.writer: asyncio.Task[None] | None = None
        self.attached: Room | None = None
        self.language_set = False
        self.language_warned = False
        self.warned: set[str] = set()

    # -- captions out -------------------------------------------------------
    def sink(self, caption: Caption) -> None:
        """Called by the room for every published caption (on the event loop)."""
        if caption.participant_id in self.participants and caption.text:
            # Jigasi ignores empty results; not sending them saves the socket
            self.replies.offer(caption)

    def attach(self) -> None:
        """Keep our sink on the room object that is live now.

        The room may not exist yet (no auto start) or may have been ended and
        started again by the control API, which makes a new :class:`Room`;
        checking identity per message is cheap and follows both.
        """
        current = self.endpoint.rooms.rooms.get(self.room)
        if current is self.attached:
            return
        self.detach()
        if current is not None:
            current.sinks.append(self.sink)
            self.attached = current

    def detach(self) -> None:
        if self.attached is not None:
            with contextlib.suppress(ValueError):
                self.attached.sinks.remove(self.sink)
            self.attached = None

    async def write_replies(self) -> None:
        async for caption in self.replies:
            if self.ws.closed:
                return
            try:
                await self.ws.send_str(caption_reply(caption))
            except (ConnectionError, RuntimeError):
                return  # the peer is gone; the receive loop sees that too
            REPLIES.labels("interim" if caption.is_interim else "final").inc()

    async def flush_replies(self) -> None:
        """Send what is queued, then stop the writer."""
        self.replies.close()
        writer = self.writer
        if writer is None:
            return
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(writer), FLUSH_TIMEOUT_S)
        if not writer.done():
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await writer

    # -- audio in -----------------------------------------------------------
    def warn_once(self, key: str, message: str, *args: object) -> None:
        # one line per problem per connection: a misbehaving client must not
        # turn into a log flood
        if key not in self.warned and len(self.warned) < 32:
            self.warned.add(key)
            log.warning("skynet: room %s: " + message, self.room, *args)

    async def on_audio(self, data: bytes) -> None:
        """Feed one audio message; raises :class:`CloseConnection` when the socket must go."""
        if len(data) < HEADER_BYTES:
            MESSAGES.labels("short").inc()
            self.warn_once("short", "dropped a %d-byte message (no 60-byte header)", len(data))
            return
        raw = data[:HEADER_BYTES].rstrip(b"\x00")
        try:
            header = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            # a character cut by the 60-byte field is dropped; anything else is not UTF-8
            if e.end != len(raw) or e.reason != "unexpected end of data":
                raise CloseConnection(1007, "the header is not UTF-8", "bad_header") from None
            header = raw[: e.start].decode("utf-8")
        pid, _, language = header.partition("|")
        pid = pid.strip()
        if not valid_participant(pid):
            MESSAGES.labels("bad_participant").inc()
            self.warn_once("participant", "dropped audio of participant id %r", pid[:64])
            return
        language = language.strip()
        # Jigasi writes Java's null as "null" when a participant has no language
        if language and language.lower() != "null" and not self.language_set:
            await self.set_language(language)
        pcm_bytes = data[HEADER_BYTES:]
        if not pcm_bytes:
            MESSAGES.labels("empty").inc()
            return
        if len(pcm_bytes) % 2:
            MESSAGES.labels("odd_length").inc()
            self.warn_once("odd", "dropped PCM with an odd byte count (%d)", len(pcm_bytes))
            return
        speaker = self.speakers.get(pid)
        if speaker is None:
            if len(self.speakers) >= MAX_PARTICIPANTS_PER_CONNECTION:
                MESSAGES.labels("rejected").inc()
                self.warn_once("many", "more than %d participants", MAX_PARTICIPANTS_PER_CONNECTION)
                return
            speaker = self.speakers[pid] = _Speaker()
        pcm = np.frombuffer(pcm_bytes, dtype="<i2").astype(np.float32) * np.float32(1 / 32768)
        frame = Frame(
            payload=b"",
            sequence=speaker.sequence,
            timestamp=speaker.samples,
            pcm=pcm,
            arrival=time.monotonic(),
        )
        # the room's reorder buffer wants consecutive sequence numbers, which
        # a WebSocket (ordered, lossless) gives us for free
        speaker.sequence = (speaker.sequence + 1) & 0xFFFF
        speaker.samples += len(pcm)
        self.attach()
        if self.endpoint.rooms.push_frame(self.room, pid, frame):
            self.participants.add(pid)
            MESSAGES.labels("audio").inc()
        else:
            MESSAGES.labels("rejected").inc()

    async def set_language(self, language: str) -> None:
        """The first valid language in a header becomes the room's language."""
        try:
            code = canonical_language(language)
        except SettingError:
            if not self.language_warned:
                self.language_warned = True
                log.warning(
                    "skynet: room %s: Jigasi asked for language %r, which is not supported; "
                    "keeping the room's language",
                    self.room,
                    language[:40],
                )
            return
        self.language_set = True
        try:
            await self.endpoint.rooms.update_settings(self.room, RoomSettings(language=code))
        except ServiceError as e:
            log.warning("skynet: room %s: could not set language %s: %s", self.room, code, e)
            return
        log.info("skynet: room %s: language %s (from Jigasi)", self.room, code)

    # -- the end ------------------------------------------------------------
    async def finish(self) -> None:
        """End of stream: every open utterance gets its final, then the room stops."""
        rooms = self.endpoint.rooms
        for pid in list(self.participants):
            # finish_speaker drains the stream, so the finals are published
            # while captions are still on and go back to Jigasi as well
            await rooms.finish_speaker(self.room, pid)
        room = rooms.rooms.get(self.room)
        if room is not None and room.pending:
            # finals are written to the transcript, then published, by tasks
            await asyncio.wait(set(room.pending), timeout=FINISH_TIMEOUT_S)
        if not self.endpoint.auto_start or self.endpoint.others_in_room(self):
            # whoever started the room stops it; another Jigasi socket on the
            # same room (a reconnect racing the old one) still needs it
            return
        # captions first: switching transcription off last closes the
        # transcript after anything still in flight was written to it
        for kind in ("captions", "transcription"):
            try:
                await rooms.stop(self.room, kind, reason="source_ended", force=True)
            except NotFound:
                return  # the room was ended meanwhile: nothing left to stop
            except ServiceError as e:
                log.warning("skynet: room %s: could not stop %s: %s", self.room, kind, e)


class SkynetEndpoint:
    """aiohttp WebSocket endpoint that speaks skynet's streaming-whisper protocol.

    ``token`` is the secret Jigasi must present (bearer header or
    ``auth_token`` query parameter). With ``auto_start`` a connection
    switches captions and transcription on in its room, and the end-of-stream
    byte switches them off again, which saves the transcript.
    """

    def __init__(
        self,
        rooms: RoomManager,
        *,
        token: str,
        max_message_bytes: int = 65536,
        max_messages_per_second: int = 5000,
        auto_start: bool = True,
        jwt_keys_dir: Path | None = None,
        jwt_audience: str = "jitsi",
    ) -> None:
        if not token:
            # an empty secret would let an empty bearer header in
            raise ValueError("the skynet endpoint needs a non-empty token")
        if max_message_bytes <= HEADER_BYTES or max_messages_per_second < 1:
            raise ValueError("max_message_bytes must exceed 60 and max_messages_per_second be >= 1")
        self.rooms = rooms
        self._token = token.encode("utf-8")
        self.max_message_bytes = max_message_bytes
        self.max_messages_per_second = max_messages_per_second
        self.auto_start = auto_start
        self.jwt_keys_dir = jwt_keys_dir
        self.jwt_audience = jwt_audience
        self._open: set[_Connection] = set()
        self.closing = False  # shutting down: no new sessions
        # ends of streams still saving transcripts; close() waits for them
        self._finishing: set[asyncio.Task[None]] = set()

    def add_routes(self, app: web.Application, path: str) -> None:
        """Serve the endpoint at ``GET <path>/{meeting_id}``."""
        app.router.add_get(path.rstrip("/") + "/{meeting_id}", self.handle)

    @property
    def open_connections(self) -> int:
        return len(self._open)

    def others_in_room(self, conn: _Connection) -> bool:
        return any(c is not conn and c.room == conn.room for c in self._open)

    async def close(self) -> None:
        """Close every open socket (1001) and wait for ends of streams in progress."""
        for conn in list(self._open):
            with contextlib.suppress(Exception):
                await conn.ws.close(
                    code=WSCloseCode.GOING_AWAY, message=b"captions sidecar shutting down"
                )
        if self._finishing:
            await asyncio.wait(set(self._finishing), timeout=FINISH_TIMEOUT_S)

    # -- the HTTP part ------------------------------------------------------
    def _authorized(self, request: web.Request) -> bool:
        presented: list[str] = []
        scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            presented.append(credentials.strip())
        query = request.query.get("auth_token")
        if query:
            presented.append(query)
        ok = False
        for candidate in presented:
            # compare every candidate, so timing does not tell which one was tried
            ok |= hmac.compare_digest(candidate.encode("utf-8"), self._token)
        if not ok and self.jwt_keys_dir is not None:
            ok = any(self._valid_jwt(c) for c in presented)
        return ok

    def _valid_jwt(self, token: str) -> bool:
        """Jigasi signs a short-lived RS256 JWT (ASAP) with a ``kid``; its
        public key is ``<jwt_keys_dir>/<sha256 hex of kid>.pem`` (the layout of
        Jitsi's ASAP key servers) or ``<kid>.pem``."""
        import jwt

        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except jwt.PyJWTError:
            return False
        if not isinstance(kid, str) or not _KID_RE.match(kid):
            return False
        assert self.jwt_keys_dir is not None
        names = [hashlib.sha256(kid.encode()).hexdigest()]
        if "/" not in kid and ".." not in kid:
            names.append(kid)  # a plain kid may name its file; a path may not
        for name in names:
            path = self.jwt_keys_dir / f"{name}.pem"
            if not path.is_file():
                continue
            try:
                jwt.decode(
                    token,
                    path.read_bytes(),
                    algorithms=["RS256"],
                    audience=self.jwt_audience,
                    options={"require": ["exp"]},
                )
            except jwt.PyJWTError as e:
                log.warning("skynet: JWT of kid %r refused: %s", kid, e)
                return False
            return True
        log.warning("skynet: no public key for JWT kid %r", kid)
        return False

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """The aiohttp handler; never raises (a failure costs this socket only)."""
        try:
            return await self._handle(request)
        except Exception:
            log.exception("skynet: handler failed")
            CONNECTIONS.labels("error").inc()
            return web.Response(status=500, text="internal error\n")

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if not self._authorized(request):
            CONNECTIONS.labels("unauthorized").inc()
            return web.Response(
                status=401,
                text="missing or wrong token (Authorization: Bearer <token> or ?auth_token=)\n",
                headers={"WWW-Authenticate": 'Bearer realm="captions"'},
            )
        meeting_id = request.match_info.get("meeting_id", "")
        try:
            room = canonical_room(meeting_id)
        except InvalidArgument as e:
            CONNECTIONS.labels("bad_request").inc()
            return web.Response(status=400, text=f"bad meeting id: {e}\n")
        ws = web.WebSocketResponse(
            max_msg_size=self.max_message_bytes, autoping=True, heartbeat=HEARTBEAT_S
        )
        if not ws.can_prepare(request).ok:
            CONNECTIONS.labels("bad_request").inc()
            return web.Response(status=400, text="expected a WebSocket upgrade\n")
        if self.closing:
            return web.Response(status=503, text="the sidecar is shutting down\n")
        if self.auto_start:
            # before the upgrade, so a refusal is an HTTP status Jigasi logs
            refusal = await self._start_room(room)
            if refusal is not None:
                CONNECTIONS.labels("refused").inc()
                return refusal
        await ws.prepare(request)
        CONNECTIONS.labels("accepted").inc()
        conn = _Connection(self, ws, room)
        self._open.add(conn)
        session = self.rooms.open_session(room, REQUESTED_BY) if room in self.rooms.rooms else None
        CONNECTIONS_OPEN.inc()
        log.info("skynet: Jigasi connected for room %s", room)
        try:
            conn.attach()
            conn.writer = asyncio.create_task(conn.write_replies(), name=f"skynet-{room}")
            await self._serve(conn)
        except Exception:
            log.exception("skynet: room %s: connection failed", room)
            MESSAGES.labels("error").inc()
            with contextlib.suppress(Exception):
                await ws.close(code=WSCloseCode.INTERNAL_ERROR, message=b"internal error")
        finally:
            conn.detach()
            with contextlib.suppress(Exception):
                await conn.flush_replies()
            self._open.discard(conn)
            if session is not None:
                session.close()
            CONNECTIONS_OPEN.dec()
            if not ws.closed:
                with contextlib.suppress(Exception):
                    await ws.close()
            log.info("skynet: room %s: Jigasi disconnected (%s)", room, ws.close_code)
        return ws

    async def _start_room(self, room: str) -> web.Response | None:
        existing = self.rooms.rooms.get(room)
        # start() replaces the room's start parameters: a room someone already
        # started (the control API, a previous socket) keeps its own
        settings = existing.start_settings if existing is not None else RoomSettings()
        try:
            for kind in ("transcription", "captions"):
                if existing is not None and (
                    existing.transcribing if kind == "transcription" else existing.captioning
                ):
                    continue
                try:
                    await self.rooms.start(room, kind, settings, requested_by=REQUESTED_BY)
                except Unavailable:
                    if kind == "captions":
                        raise
                    # the transcript cannot be written: captions need no disk
        except InvalidArgument as e:
            return web.Response(status=400, text=f"{e}\n")
        except FailedPrecondition as e:
            return web.Response(status=403, text=f"{e}\n")
        except ResourceExhausted as e:
            return web.Response(status=503, text=f"{e}\n", headers={"Retry-After": "10"})
        except ServiceError as e:
            return web.Response(status=500, text=f"{e}\n")
        return None

    # -- the WebSocket part -------------------------------------------------
    async def _serve(self, conn: _Connection) -> None:
        ws = conn.ws
        while True:
            msg = await ws.receive()
            if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                return  # a plain disconnect keeps the room: Jigasi may come back
            if msg.type == WSMsgType.ERROR:
                self._count_error(ws)
                return  # aiohttp has closed the socket with the matching code
            try:
                if not conn.bucket.take():
                    raise CloseConnection(1008, "message rate limit exceeded", "rate_limited")
                if msg.type == WSMsgType.TEXT:
                    raise CloseConnection(1003, "only binary audio messages are accepted", "text")
                if msg.type != WSMsgType.BINARY:
                    continue  # ping/pong are answered by aiohttp
                data: bytes = msg.data
                if data == END_OF_STREAM:
                    MESSAGES.labels("end").inc()
                    await self._end_of_stream(conn)
                    return
                await conn.on_audio(data)
            except CloseConnection as c:
                MESSAGES.labels(c.outcome).inc()
                log.info("skynet: room %s: closing (%d %s)", conn.room, c.code, c.reason)
                await ws.close(code=c.code, message=c.reason.encode()[:CLOSE_REASON_BYTES])
                return

    async def _end_of_stream(self, conn: _Connection) -> None:
        log.info("skynet: room %s: end of stream", conn.room)
        # shielded: Jigasi hangs up right after the end byte and a shutdown may
        # cancel us, but the transcript must still be finished and saved
        task = asyncio.create_task(conn.finish(), name=f"skynet-finish-{conn.room}")
        self._finishing.add(task)
        task.add_done_callback(self._finishing.discard)
        try:
            await asyncio.wait_for(asyncio.shield(task), FINISH_TIMEOUT_S * 2)
        except TimeoutError:
            log.warning("skynet: room %s: end of stream still finishing", conn.room)
        except Exception:
            log.exception("skynet: room %s: end of stream failed", conn.room)
        await conn.flush_replies()
        await conn.ws.close(code=WSCloseCode.OK, message=b"end of stream")

    @staticmethod
    def _count_error(ws: web.WebSocketResponse) -> None:
        exc = ws.exception()
        code = exc.code if isinstance(exc, WebSocketError) else ws.close_code
        MESSAGES.labels("too_big" if code == WSCloseCode.MESSAGE_TOO_BIG else "error").inc()
