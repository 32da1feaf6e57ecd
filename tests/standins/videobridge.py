"""A jitsi-videobridge stand-in: the media export WebSocket, as the bridge speaks it.

Written from jitsi-videobridge's export code and jicoco's mediajson types
(mirrors read Aug 2026; no code taken). Rules, with the file each follows
(jvb = jitsi-videobridge/jvb/src/main, jicoco = jicoco-mediajson/src/main):

Connects (jvb kotlin/org/jitsi/videobridge/export/ExporterWrapper.kt)
  1. Jicofo signals connects by id; ``expire`` stops and removes one, a new id
     creates and starts an exporter, a repeated id may only change its
     exports/requests (anything else is refused). Only mediajson, audio only.
  2. Ping settings come with the connect; present without values means
     10000 ms interval / 3000 ms timeout (createExporter).
Exporter (jvb .../export/Exporter.kt)
  3. The WebSocket upgrade carries the connect's HTTP headers.
  4. On open: a new serializer (sequence numbers and stream state start
     again), pings scheduled at a fixed rate (first after one interval), a
     ``sources`` event only when exports or requests are non-empty, then
     ``info`` {application: "jitsi-videobridge", version}.
  5. Audio is exported only while connected and only for an SSRC that
     resolves to a signalled source name (``wants``); an empty exports list
     means every source.
  6. A ping ``{"event":"ping","id":N}`` (N counts up from 1); a ``pong``
     with the last ping's id cancels the timeout; other ids are logged and
     ignored. No pong within the timeout: close 1000 "Ping timeout" and
     reconnect (handlePingTimeout).
  7. Reconnect after a close or an error unless stopping: attempt 1 at once,
     then base-delay * 2^(attempt-2) capped at max-delay (reference.conf:
     1 s, 30 s); the attempt count resets only when the closed connection had
     been up longer than stable-connection-threshold (30 s).
  8. Incoming text is parsed as a mediajson Event by its ``event`` field
     (media, ping, pong, start, stop, transcription-result, info); anything
     else, or no ``event``, is a parse failure, counted and dropped. A
     ``transcription-result`` is relayed (rule 13); info is logged.
  9. Stop: no more pings or reconnects; ``session-end`` if connected; close
     1001 "closing".
Serializer (jvb .../export/MediaJsonSerializer.kt)
 10. One ``sequenceNumber`` counter for every start and media event of a
     connection, from 1. The first packet of an SSRC sends ``start``
     {tag: source name, mediaFormat {encoding, sampleRate, channels,
     parameters}, customParameters {endpointId}, diarize only when true}.
 11. ``media`` {tag, chunk: extended RTP sequence number, timestamp: RTP
     timestamp extended and offset so that the stream starts at the 48 kHz
     time since the serializer was made, payload: base64 Opus, audioLevel,
     vad}.
Types (jicoco kotlin/org/jitsi/mediajson/MediaJson.kt)
 12. sequenceNumber, chunk and timestamp are JSON strings; ping/pong id,
     audioLevel, sampleRate and channels are numbers; vad a boolean; nulls
     are left out (NON_NULL).
Relay (jvb java/org/jitsi/videobridge/Conference.java, ExporterEventHandlerImpl;
       kotlin/.../message/BridgeChannelMessage.kt EndpointMessage)
 13. A transcription result goes to every local endpoint as
     ``{"colibriClass":"EndpointMessage","to":"","from":"transcriber",
     "msgPayload":{"event":"transcription-result", ...the result}}``.

Not done: RTP, ICE, DTLS (audio is handed in as Opus packets of a named
source), relays between bridges, translated media back from the service.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import numpy as np

from sidecar.audio import encode_opus
from sidecar.sim.conference import frame_level

log = logging.getLogger(__name__)

VERSION = "2.3-standin"
FRAME_TICKS = 960  # 20 ms of Opus at 48 kHz (RFC 7587 clock)
# Jicofo's Opus payload type (jicofo-common reference.conf codec.audio.opus,
# CodecUtil.kt): PT 111, 48000/2, minptime 10, useinbandfec 1 (RED off)
OPUS_FORMAT = {
    "encoding": "opus",
    "sampleRate": 48000,
    "channels": 2,
    "parameters": {"minptime": "10", "useinbandfec": "1"},
}
KNOWN_EVENTS = {"media", "ping", "pong", "start", "stop", "transcription-result", "info"}


@dataclass
class Connect:
    """A colibri2 ``<connect>`` as Jicofo's ColibriV2SessionManager builds it."""

    id: str
    url: str
    type: str = "transcriber"
    protocol: str = "mediajson"
    audio: bool = True
    video: bool = False
    http_headers: dict[str, str] = field(default_factory=dict)
    ping: tuple[int | None, int | None] | None = None  # (interval ms, timeout ms)
    exports: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    expire: bool = False
    create: bool = True


@dataclass
class ExporterConfig:
    """videobridge.exporter (jvb reference.conf)."""

    base_delay: float = 1.0
    max_delay: float = 30.0
    stable_connection_threshold: float = 30.0
    max_reconnect_attempts: int | None = None


@dataclass
class Source:
    """An audio source signalled for an endpoint (``ENDPOINT-a0``)."""

    name: str
    endpoint: str
    ssrc: int
    seq: int = field(default_factory=lambda: random.randrange(1 << 16))
    ts: int = field(default_factory=lambda: random.randrange(1 << 32))
    diarize: bool = False


class _IndexTracker:
    """RtpSequenceIndexTracker / RtpTimestampIndexTracker: unwrap a counter."""

    def __init__(self, bits: int) -> None:
        self.mod = 1 << bits
        self.highest: int | None = None

    def update(self, value: int) -> int:
        if self.highest is None:
            self.highest = value
            return value
        base = self.highest - (self.highest % self.mod)
        cand = base + value
        # pick the candidate closest to the highest index seen
        for c in (cand - self.mod, cand + self.mod):
            if abs(c - self.highest) < abs(cand - self.highest):
                cand = c
        self.highest = max(self.highest, cand)
        return cand


class _SsrcState:
    def __init__(self, initial_ts: int, start_offset: int, tag: str) -> None:
        self.tag = tag
        self.seq = _IndexTracker(16)
        self.tss = _IndexTracker(32)
        self.tss.update(initial_ts)
        self.offset = start_offset - initial_ts

    def timestamp(self, ts: int) -> int:
        return self.offset + self.tss.update(ts)


class Exporter:
    """One export WebSocket (Exporter.kt + MediaJsonSerializer.kt)."""

    def __init__(self, connect: Connect, bridge: BridgeConference, config: ExporterConfig) -> None:
        self.connect = connect
        self.conference = bridge
        self.config = config
        ping = connect.ping
        self.ping_enabled = ping is not None
        self.ping_interval = ((ping[0] if ping and ping[0] else None) or 10000) / 1000
        self.ping_timeout = ((ping[1] if ping and ping[1] else None) or 3000) / 1000
        self.session: aiohttp.ClientSession | None = None
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.shutting_down = False
        self.reconnect_attempts = 0
        self.opened_at = 0.0
        self.next_ping_id = 0
        self.last_ping_id = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._reconnect: asyncio.Task[None] | None = None
        self._ping_task: asyncio.Task[None] | None = None
        self._ping_timeout: asyncio.TimerHandle | None = None
        self._reader: asyncio.Task[None] | None = None
        # serializer state, new per connection
        self.seq = 0
        self.ref = 0.0
        self.ssrcs: dict[int, _SsrcState] = {}
        # what a test looks at
        self.connections = 0
        self.sent: list[dict[str, Any]] = []  # every event sent, parsed back
        self.received: list[str] = []
        self.parse_failures = 0
        self.transcripts = 0
        self.close_codes: list[int | None] = []  # as the socket reports them
        self.closes_sent: list[tuple[int, str]] = []  # close frames the bridge sent
        self.handshake_errors: list[str] = []
        self.pongs = 0
        self.ping_timeouts = 0
        self.connected = asyncio.Event()
        self.closed = asyncio.Event()

    # -- life cycle ------------------------------------------------------
    def start(self) -> None:
        self.shutting_down = False
        self.session = aiohttp.ClientSession()
        self._spawn(self._connect())

    async def stop(self) -> None:
        self.shutting_down = True
        self._stop_ping()
        if self._reconnect is not None:
            self._reconnect.cancel()
        ws = self.ws
        if ws is not None and not ws.closed:
            with contextlib.suppress(Exception):
                await self._send({"event": "session-end"})
            self.closes_sent.append((1001, "closing"))
            with contextlib.suppress(Exception):
                await ws.close(code=1001, message=b"closing")
        if self._reader is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(self._reader, 5)
        for t in list(self._tasks):
            t.cancel()
        if self.session is not None:
            await self.session.close()

    @property
    def is_connected(self) -> bool:
        return self.ws is not None and not self.ws.closed

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return t

    async def _connect(self) -> None:
        assert self.session is not None
        try:
            ws = await self.session.ws_connect(
                self.connect.url, headers=self.connect.http_headers, autoping=True, heartbeat=None
            )
        except Exception as e:  # onWebSocketError
            self.handshake_errors.append(f"{type(e).__name__}: {e}")
            log.info("bridge: export connect to %s failed: %s", self.connect.url, e)
            self._schedule_reconnect()
            return
        if self.shutting_down:
            await ws.close(code=1001, message=b"closing")
            return
        self._on_open(ws)

    def _on_open(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.connections += 1
        self.opened_at = time.monotonic()
        # a new serializer for every connection (initSerializer)
        self.seq = 0
        self.ref = time.monotonic()
        self.ssrcs = {}
        if self._reconnect is not None:
            self._reconnect.cancel()
            self._reconnect = None
        self._start_ping()
        self._reader = self._spawn(self._read(ws))
        if self.connect.exports or self.connect.requests:
            self._send_nowait(
                {
                    "event": "sources",
                    "exports": self.connect.exports,
                    "requests": self.connect.requests,
                }
            )
        self._send_nowait({"event": "info", "application": "jitsi-videobridge", "version": VERSION})
        self.closed.clear()
        self.connected.set()

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        try:
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    self._handle_incoming(msg.data)
        finally:
            self._on_close(ws)

    def _on_close(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        if self.ws is not ws:
            return
        stable = self.opened_at > 0 and (
            time.monotonic() - self.opened_at > self.config.stable_connection_threshold
        )
        if stable:
            self.reconnect_attempts = 0
            self.opened_at = 0
        self.ws = None
        self.close_codes.append(ws.close_code)
        self.connected.clear()
        self.closed.set()
        self._stop_ping()
        log.info("bridge: export socket closed with %s", ws.close_code)
        if not self.shutting_down:
            self._schedule_reconnect()

    def _schedule_reconnect(self) -> None:
        if self.shutting_down:
            return
        self.reconnect_attempts += 1
        n = self.reconnect_attempts
        cap = self.config.max_reconnect_attempts
        if cap is not None and n > cap:
            log.warning("bridge: max reconnection attempts (%d) reached, giving up", cap)
            return
        delay = (
            0.0 if n == 1 else min(self.config.base_delay * 2.0 ** (n - 2), self.config.max_delay)
        )
        if self._reconnect is not None:
            self._reconnect.cancel()

        async def later() -> None:
            await asyncio.sleep(delay)
            if not self.shutting_down:
                await self._connect()

        self._reconnect = self._spawn(later())

    # -- pings -----------------------------------------------------------
    def _start_ping(self) -> None:
        if not self.ping_enabled or self.ping_interval <= 0:
            return
        self._stop_ping()

        async def every() -> None:
            t0 = time.monotonic()
            k = 1
            while True:  # scheduleAtFixedRate(interval, interval)
                await asyncio.sleep(max(0.0, t0 + k * self.ping_interval - time.monotonic()))
                k += 1
                self._send_ping()

        self._ping_task = self._spawn(every())

    def _stop_ping(self) -> None:
        if self._ping_task is not None:
            self._ping_task.cancel()
            self._ping_task = None
        if self._ping_timeout is not None:
            self._ping_timeout.cancel()
            self._ping_timeout = None

    def _send_ping(self) -> None:
        if not self.is_connected or self.shutting_down:
            return
        self.next_ping_id += 1
        self._send_nowait({"event": "ping", "id": self.next_ping_id})
        self.last_ping_id = self.next_ping_id
        loop = asyncio.get_running_loop()
        self._ping_timeout = loop.call_later(self.ping_timeout, self._on_ping_timeout)

    def _on_ping_timeout(self) -> None:
        log.warning("bridge: ping timeout, reconnecting the export socket")
        self.ping_timeouts += 1
        self._stop_ping()
        ws = self.ws
        if ws is not None:
            self.closes_sent.append((1000, "Ping timeout"))
            self._spawn(ws.close(code=1000, message=b"Ping timeout"))
        self._schedule_reconnect()

    # -- incoming ----------------------------------------------------------
    def _handle_incoming(self, text: str) -> None:
        self.received.append(text)
        try:
            event = json.loads(text)
            if not isinstance(event, dict) or event.get("event") not in KNOWN_EVENTS:
                raise ValueError(f"not a mediajson event: {text[:200]}")
            kind = event["event"]
            if kind == "pong":
                pid = event.get("id")
                if not isinstance(pid, int) or isinstance(pid, bool):
                    raise ValueError("pong id is not an integer")
                if pid == self.last_ping_id:
                    self.pongs += 1
                    if self._ping_timeout is not None:
                        self._ping_timeout.cancel()
                        self._ping_timeout = None
                else:
                    log.warning("bridge: pong id=%s, expected %s", pid, self.last_ping_id)
            elif kind == "transcription-result":
                self.transcripts += 1
                self.conference.relay_transcription(event)
            elif kind == "info":
                log.info("bridge: info from the service: %s", text[:200])
        except (ValueError, TypeError) as e:
            log.warning("bridge: failed to parse an incoming message: %s", e)
            self.parse_failures += 1

    # -- outgoing ----------------------------------------------------------
    def wants(self, source: Source) -> bool:
        if not self.is_connected:
            return False
        return not self.connect.exports or source.name in self.connect.exports

    def encode(
        self, source: Source, seq16: int, ts32: int, payload: bytes, level: int, vad: bool
    ) -> None:
        state = self.ssrcs.get(source.ssrc)
        if state is None:
            start_offset = int((time.monotonic() - self.ref) * 48000)
            state = _SsrcState(ts32, start_offset, source.name)
            self.ssrcs[source.ssrc] = state
            self.seq += 1
            start: dict[str, Any] = {
                "tag": state.tag,
                "mediaFormat": OPUS_FORMAT,
                "customParameters": {"endpointId": source.endpoint},
            }
            if source.diarize:
                start["diarize"] = True
            self._send_nowait({"event": "start", "sequenceNumber": str(self.seq), "start": start})
        self.seq += 1
        self._send_nowait(
            {
                "event": "media",
                "sequenceNumber": str(self.seq),
                "media": {
                    "tag": state.tag,
                    "chunk": str(state.seq.update(seq16)),
                    "timestamp": str(state.timestamp(ts32)),
                    "payload": base64.b64encode(payload).decode(),
                    "audioLevel": level,
                    "vad": vad,
                },
            }
        )

    def _send_nowait(self, obj: dict[str, Any]) -> None:
        self._spawn(self._send(obj))

    async def _send(self, obj: dict[str, Any]) -> None:
        ws = self.ws
        if ws is None or ws.closed:
            return
        text = json.dumps(obj, separators=(",", ":"))
        self.sent.append(obj)
        with contextlib.suppress(ConnectionError, RuntimeError):
            await ws.send_str(text)

    def events(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.sent if e.get("event") == kind]


@dataclass
class Endpoint:
    id: str
    sources: list[Source] = field(default_factory=list)
    # what the bridge sent this endpoint over its data channel / bridge socket
    messages: list[dict[str, Any]] = field(default_factory=list)


class BridgeConference:
    """One colibri2 conference on the bridge (Conference.java)."""

    def __init__(self, bridge: Videobridge, meeting_id: str, name: str) -> None:
        self.bridge = bridge
        self.meeting_id = meeting_id
        self.name = name
        self.endpoints: dict[str, Endpoint] = {}
        self.exporters: dict[str, Exporter] = {}
        self.expired_exporters: list[Exporter] = []
        self._players: set[asyncio.Task[None]] = set()

    # -- colibri2 -------------------------------------------------------
    def add_endpoint(self, endpoint_id: str) -> Endpoint:
        return self.endpoints.setdefault(endpoint_id, Endpoint(endpoint_id))

    def set_sources(self, endpoint_id: str, sources: Sequence[tuple[str, int]]) -> None:
        ep = self.add_endpoint(endpoint_id)
        known = {s.name: s for s in ep.sources}
        ep.sources = [known.get(name) or Source(name, endpoint_id, ssrc) for name, ssrc in sources]

    def remove_endpoint(self, endpoint_id: str) -> None:
        self.endpoints.pop(endpoint_id, None)

    async def apply_connects(self, connects: Sequence[Connect]) -> None:
        """ExporterWrapper.applyConnects: validate everything, then apply."""
        for c in connects:
            if c.video:
                raise ValueError("Video")
            if c.protocol != "mediajson":
                raise ValueError(f"Protocol {c.protocol}")
        expire = [c.id for c in connects if c.expire]
        if len(set(expire)) != len(expire):
            raise ValueError("Duplicate expire")
        create, update = [], []
        for c in connects:
            if c.expire:
                continue
            if c.create:
                if c.id in self.exporters and c.id not in expire:
                    raise ValueError(f"Connect with create=true for an already-existing id={c.id}")
                create.append(c)
            else:
                running = self.exporters.get(c.id)
                if running is None:
                    raise ValueError(f"Connect for unknown id={c.id} without create=true")
                old = running.connect
                if (old.url, old.type, old.audio, old.http_headers, old.ping) != (
                    c.url,
                    c.type,
                    c.audio,
                    c.http_headers,
                    c.ping,
                ):
                    raise ValueError(f"Updating connect parameters for id={c.id}")
                update.append(c)
        for cid in expire:
            ex = self.exporters.pop(cid, None)
            if ex is not None:
                await ex.stop()
                self.expired_exporters.append(ex)
        for c in create:
            ex = Exporter(c, self, self.bridge.exporter_config)
            self.exporters[c.id] = ex
            ex.start()
        for c in update:
            self.exporters[c.id].connect = c

    async def expire(self) -> None:
        exporters = list(self.exporters.values())
        self.exporters.clear()
        for ex in exporters:
            await ex.stop()
            self.expired_exporters.append(ex)
        for t in list(self._players):
            t.cancel()

    # -- media ---------------------------------------------------------
    def _source(self, endpoint_id: str) -> Source:
        ep = self.endpoints.get(endpoint_id)
        if ep is None or not ep.sources:
            raise KeyError(f"endpoint {endpoint_id} has signalled no audio source")
        return ep.sources[0]

    def packet(self, endpoint_id: str, payload: bytes, level: int, vad: bool) -> None:
        """One 20 ms Opus packet of an endpoint's first audio source."""
        src = self._source(endpoint_id)
        src.seq = (src.seq + 1) & 0xFFFF
        src.ts = (src.ts + FRAME_TICKS) & 0xFFFFFFFF
        for ex in list(self.exporters.values()):
            if ex.wants(src):
                ex.encode(src, src.seq, src.ts, payload, level, vad)

    async def play(self, tracks: dict[str, np.ndarray], *, tail: float = 1.0) -> None:
        """Each endpoint's 16 kHz speech as 20 ms Opus packets, paced in real
        time, all endpoints in step, as the bridge forwards them."""
        packets: dict[str, list[tuple[bytes, int, bool]]] = {}
        for ep, pcm in tracks.items():
            pcm = np.concatenate([pcm.astype(np.float32), np.zeros(int(tail * 16000), np.float32)])
            opus = await asyncio.to_thread(encode_opus, pcm)
            frames = [pcm[i * 320 : (i + 1) * 320] for i in range(len(opus))]
            packets[ep] = [(p, *frame_level(f)) for p, f in zip(opus, frames, strict=False)]
        n = max(len(p) for p in packets.values())
        t0 = time.monotonic()
        for i in range(n):
            for ep, pk in packets.items():
                if i < len(pk):
                    self.packet(ep, *pk[i])
            await asyncio.sleep(max(0.0, t0 + (i + 1) * 0.02 - time.monotonic()))

    # -- relay -----------------------------------------------------------
    def relay_transcription(self, event: dict[str, Any]) -> None:
        payload = {"event": "transcription-result"} | {
            k: v for k, v in event.items() if k != "event"
        }
        msg = {
            "colibriClass": "EndpointMessage",
            "to": "",
            "from": "transcriber",
            "msgPayload": payload,
        }
        for ep in self.endpoints.values():
            ep.messages.append(json.loads(json.dumps(msg)))

    def captions_at(self, endpoint_id: str) -> list[dict[str, Any]]:
        """The transcription results an endpoint got over the bridge."""
        ep = self.endpoints.get(endpoint_id)
        if ep is None:
            return []
        return [
            m["msgPayload"]
            for m in ep.messages
            if m.get("from") == "transcriber"
            and m["msgPayload"].get("type") == "transcription-result"
        ]

    @property
    def exporter(self) -> Exporter | None:
        """The transcriber connect's exporter, if running."""
        return self.exporters.get("transcriber")


class Videobridge:
    """The bridge: conferences by meeting id."""

    def __init__(self, exporter_config: ExporterConfig | None = None) -> None:
        self.exporter_config = exporter_config or ExporterConfig()
        self.conferences: dict[str, BridgeConference] = {}

    def conference(self, meeting_id: str, name: str) -> BridgeConference:
        conf = self.conferences.get(meeting_id)
        if conf is None:
            conf = self.conferences[meeting_id] = BridgeConference(self, meeting_id, name)
        return conf

    async def close(self) -> None:
        for conf in self.conferences.values():
            await conf.expire()
