"""Plain RTP ingest: Opus in RTP over UDP, for SIP gateways and other sources.

Each datagram is one RTP packet (RFC 3550) carrying Opus (RFC 7587, 48 kHz
clock). The SSRC names the speaker: :attr:`RoomManager.ssrcs` maps it to a
room and an endpoint id, filled from roster updates. An RFC 6464 audio level
in an RFC 8285 header extension is passed on as the frame's voice flag and
level, which lets the speaker pipeline skip decoding silent frames.

RTCP that shares the port (RFC 5761) is recognised and ignored: the
pipeline's own reorder buffer does what receiver reports would tell us.

Every datagram is counted exactly once in ``captions_rtp_packets_total``
under one ``outcome`` (:data:`OUTCOMES`). Nothing a sender puts on the wire
can make :meth:`RtpIngest.datagram_received` raise, and drops are logged at
most once a minute per SSRC and reason, so a broken or hostile sender cannot
flood the log.

The listener has no authentication: anyone who can reach the port and guess
an SSRC can speak for that participant, so bind it to a private interface.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
import sys
import time
from dataclasses import dataclass
from typing import Any, cast

from prometheus_client import Counter, Gauge

from sidecar.events import Frame
from sidecar.rooms import RoomManager

log = logging.getLogger(__name__)

__all__ = [
    "OUTCOMES",
    "RTP_PACKETS",
    "RtpError",
    "RtpIngest",
    "RtpPacket",
    "is_rtcp",
    "parse_rtp",
]

OUTCOMES: tuple[str, ...] = (
    "accepted",
    "bad_version",
    "short",
    "oversized",
    "bad_padding",
    "bad_extension",
    "unknown_payload_type",
    "unknown_ssrc",
    "rejected",
    "rtcp",
)
"""Every value of the ``outcome`` label; each datagram counts under exactly one."""

RTP_PACKETS = Counter(
    "captions_rtp_packets_total",
    "Datagrams received on the plain RTP listener, by outcome",
    ["outcome"],
)
for _outcome in OUTCOMES:
    # export every outcome at 0 so dashboards and alerts see the series from the start
    RTP_PACKETS.labels(_outcome)

KERNEL_DROPS = Gauge(
    "captions_rtp_socket_drops",
    "Datagrams the kernel dropped on the RTP socket before the sidecar read them "
    "(receive buffer full), from /proc/net/udp; grows only",
)
RECEIVE_BUFFER = Gauge(
    "captions_rtp_receive_buffer_bytes", "The RTP socket's receive buffer as the kernel set it"
)

RTP_VERSION = 2
FIXED_HEADER = 12  # RFC 3550 5.1: V/P/X/CC, M/PT, sequence, timestamp, SSRC
_FIXED = struct.Struct("!BBHII")
_EXT_HEADER = struct.Struct("!HH")  # RFC 3550 5.3.1: defined by profile, length in words
ONE_BYTE_PROFILE = 0xBEDE  # RFC 8285 4.2
TWO_BYTE_PROFILE = 0x1000  # RFC 8285 4.3: 0x100 in the top 12 bits, 4 "appbits" below
TWO_BYTE_MASK = 0xFFF0
ONE_BYTE_STOP_ID = 15  # RFC 8285 4.2: reserved; parsing stops there
# RFC 5761 4: a second octet of 192..223 is RTCP (types 200..204 plus the
# feedback and XR types 205..207 that gateways send); RTP avoids PT 64..95.
RTCP_SECOND_OCTET = range(192, 224)
UDP_MAX_PAYLOAD = 65_535  # larger datagrams cannot exist; reading more would waste memory
# a burst of 50 000 small packets a second needs room for a stalled loop's
# worth: the kernel counts about 1 KB per queued datagram (skb overhead)
RECV_BUFFER_BYTES = 32 << 20
READ_BATCH = 256  # datagrams read per wake-up of the event loop

LOG_INTERVAL_S = 60.0
_LOG_KEYS_MAX = 1024  # distinct (SSRC, reason) pairs remembered for rate limiting
_LOG_LINES_PER_INTERVAL = 60  # overall cap, for a sender that invents a new SSRC per packet


class RtpError(ValueError):
    """A datagram that is not a usable RTP packet.

    ``outcome`` is its label in :data:`RTP_PACKETS`; ``ssrc`` is set when the
    fixed header was long enough to read it.
    """

    def __init__(self, outcome: str, detail: str, ssrc: int | None = None) -> None:
        super().__init__(detail)
        self.outcome = outcome
        self.detail = detail
        self.ssrc = ssrc


@dataclass(frozen=True, slots=True)
class RtpPacket:
    """The parts of an RTP packet that the sidecar uses."""

    payload_type: int
    marker: bool
    sequence: int
    timestamp: int
    ssrc: int
    csrcs: tuple[int, ...]
    payload: bytes  # padding already removed
    voice: bool | None  # RFC 6464 V bit, None without the extension element
    level_dbov: float | None  # RFC 6464 level, 0 (loud) .. 127 (silence), -dBov


def is_rtcp(data: bytes) -> bool:
    """True for an RTCP packet multiplexed onto the RTP port (RFC 5761 4).

    Only the version and the second octet are looked at: RTCP's packet type
    occupies the octet that holds RTP's marker bit and payload type.
    """
    return len(data) >= 2 and data[0] >> 6 == RTP_VERSION and data[1] in RTCP_SECOND_OCTET


def parse_rtp(data: bytes, *, audio_level_ext_id: int = 1) -> RtpPacket:
    """Parse one RTP packet per RFC 3550 5.1, with its header extension (5.3.1).

    The audio level (RFC 6464) is read from the RFC 8285 element
    ``audio_level_ext_id`` in either the one-byte or the two-byte form; other
    elements and other extension profiles are skipped, as RFC 3550 tells
    receivers to do with extensions they do not know. Raises
    :class:`RtpError` with outcome ``bad_version``, ``short``,
    ``bad_extension`` or ``bad_padding``.
    """
    n = len(data)
    if n == 0:
        raise RtpError("short", "empty datagram")
    version = data[0] >> 6
    if version != RTP_VERSION:
        raise RtpError("bad_version", f"RTP version {version}, expected {RTP_VERSION}")
    if n < FIXED_HEADER:
        raise RtpError("short", f"{n} bytes, shorter than the {FIXED_HEADER}-byte fixed header")
    b0, b1, sequence, timestamp, ssrc = _FIXED.unpack_from(data)
    padding = bool(b0 & 0x20)
    extension = bool(b0 & 0x10)
    csrc_count = b0 & 0x0F
    header_end = FIXED_HEADER + 4 * csrc_count
    if n < header_end:
        raise RtpError("short", f"{n} bytes, shorter than the {csrc_count} CSRCs announced", ssrc)
    csrcs = struct.unpack_from(f"!{csrc_count}I", data, FIXED_HEADER) if csrc_count else ()

    voice: bool | None = None
    level: float | None = None
    if extension:
        if n < header_end + _EXT_HEADER.size:
            raise RtpError("bad_extension", "extension bit set but no extension header", ssrc)
        profile, words = _EXT_HEADER.unpack_from(data, header_end)
        ext_start = header_end + _EXT_HEADER.size
        header_end = ext_start + 4 * words
        if n < header_end:
            raise RtpError(
                "bad_extension",
                f"header extension of {4 * words} bytes runs past the end of the packet",
                ssrc,
            )
        element = _find_element(data, ext_start, header_end, profile, audio_level_ext_id, ssrc)
        if element is not None:
            # RFC 6464 3: V (voice activity) in the top bit, level in -dBov below it
            voice = bool(element & 0x80)
            level = float(element & 0x7F)

    payload_end = n
    if padding:
        # RFC 3550 5.1: the last octet counts the padding octets, itself included
        count = data[-1] if n > header_end else 0
        if count == 0 or count > n - header_end:
            raise RtpError(
                "bad_padding",
                f"padding count {count} does not fit the {n - header_end} bytes after the header",
                ssrc,
            )
        payload_end = n - count

    return RtpPacket(
        payload_type=b1 & 0x7F,
        marker=bool(b1 & 0x80),
        sequence=sequence,
        timestamp=timestamp,
        ssrc=ssrc,
        csrcs=tuple(csrcs),
        payload=bytes(data[header_end:payload_end]),
        voice=voice,
        level_dbov=level,
    )


def _find_element(
    data: bytes, start: int, end: int, profile: int, wanted: int, ssrc: int
) -> int | None:
    """First data byte of RFC 8285 element ``wanted``, or None.

    Walks the whole block even after a match so that a malformed element
    anywhere is reported: a sender that gets the framing wrong is likely to
    have the rest of the packet wrong too.
    """
    found: int | None = None
    i = start
    if profile == ONE_BYTE_PROFILE:
        while i < end:
            ident, size = data[i] >> 4, (data[i] & 0x0F) + 1
            if ident == 0:
                i += 1  # RFC 8285 4.1: a padding byte has no length field
                continue
            if ident == ONE_BYTE_STOP_ID:
                break  # RFC 8285 4.2: ignore this element's length and everything after
            if i + 1 + size > end:
                raise RtpError("bad_extension", f"one-byte element {ident} overruns", ssrc)
            if ident == wanted and found is None:
                found = data[i + 1]
            i += 1 + size
    elif profile & TWO_BYTE_MASK == TWO_BYTE_PROFILE:
        while i < end:
            ident = data[i]
            if ident == 0:
                i += 1
                continue
            if i + 2 > end:
                raise RtpError("bad_extension", f"two-byte element {ident} has no length", ssrc)
            size = data[i + 1]
            if i + 2 + size > end:
                raise RtpError("bad_extension", f"two-byte element {ident} overruns", ssrc)
            # a zero-length element is allowed in this form but carries no level
            if ident == wanted and found is None and size >= 1:
                found = data[i + 2]
            i += 2 + size
    return found


def _raise_receive_buffer(sock: socket.socket, size: int) -> int:
    """Ask for a ``size`` receive buffer; returns what the kernel gave.

    ``SO_RCVBUFFORCE`` passes ``net.core.rmem_max`` (about 208 KB by default)
    with CAP_NET_ADMIN; without it ``SO_RCVBUF`` is capped there, and a
    warning says how to raise the cap.
    """
    # Python's socket module lacks the constant; Linux's value is 33
    force = getattr(socket, "SO_RCVBUFFORCE", 33 if sys.platform == "linux" else None)
    done = False
    if force is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, size)
            done = True
        except OSError:
            pass
    if not done:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
    # Linux reports twice the value set (its bookkeeping overhead included)
    got = int(sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)) // 2
    if got < size // 2:
        log.warning(
            "rtp: the receive buffer is %d KB, not the %d KB asked for: a burst of "
            "packets is lost while the event loop is busy (raise net.core.rmem_max, "
            "e.g. sysctl -w net.core.rmem_max=%d, or run with CAP_NET_ADMIN)",
            got // 1024,
            size // 1024,
            size,
        )
    return got


def socket_drops(inode: int) -> int | None:
    """The kernel's drop count of the UDP socket with ``inode`` (Linux ``/proc/net/udp*``)."""
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            with open(table, encoding="ascii") as f:
                next(f, None)  # the column names
                for line in f:
                    cols = line.split()
                    # sl local rem st tx:rx tr:tm retrnsmt uid timeout inode ref pointer drops
                    if len(cols) >= 13 and cols[9] == str(inode):
                        return int(cols[12])
        except (OSError, ValueError):
            continue
    return None


class _LogLimiter:
    """At most one line per key per interval, and a cap on all lines together."""

    def __init__(self, interval: float = LOG_INTERVAL_S) -> None:
        self.interval = interval
        self._last: dict[tuple[int | None, str], float] = {}
        self._window_start = 0.0
        self._lines = 0
        self._suppressed = 0

    def allow(self, key: tuple[int | None, str], now: float) -> bool:
        if now - self._window_start >= self.interval:
            if self._suppressed:
                log.warning(
                    "rtp: %d more dropped packets were not logged in the last minute",
                    self._suppressed,
                )
            self._window_start, self._lines, self._suppressed = now, 0, 0
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            return False
        if self._lines >= _LOG_LINES_PER_INTERVAL:
            self._suppressed += 1
            return False
        if last is None and len(self._last) >= _LOG_KEYS_MAX:
            # forget expired keys; if every key is still fresh, stay quiet
            # rather than let a spoofing sender grow this table without bound
            self._last = {k: t for k, t in self._last.items() if now - t < self.interval}
            if len(self._last) >= _LOG_KEYS_MAX:
                self._suppressed += 1
                return False
        self._last[key] = now
        self._lines += 1
        return True


class RtpIngest(asyncio.DatagramProtocol):
    """UDP listener that feeds Opus RTP packets to :class:`RoomManager`.

    ``opus_payload_types`` are the payload types accepted as Opus (dynamic,
    so they depend on the sender's SDP; 111 is what browsers and Jitsi use).
    ``audio_level_ext_id`` is the RFC 8285 id of the RFC 6464 element (1 in
    Jitsi). Set ``voice_flag=False`` for senders that signal ``vad=off``
    (RFC 6464 4), whose V bit means nothing; only the level is passed on.
    ``max_packet_bytes`` bounds a datagram, header included.
    """

    def __init__(
        self,
        rooms: RoomManager,
        *,
        opus_payload_types: frozenset[int] = frozenset({111}),
        audio_level_ext_id: int = 1,
        max_packet_bytes: int = 1500,
        voice_flag: bool = True,
    ) -> None:
        if not opus_payload_types or any(not 0 <= pt <= 127 for pt in opus_payload_types):
            raise ValueError("opus_payload_types: one or more payload types in 0..127")
        if not 1 <= audio_level_ext_id <= 255:
            raise ValueError("audio_level_ext_id: an RFC 8285 element id in 1..255")
        if not FIXED_HEADER < max_packet_bytes <= UDP_MAX_PAYLOAD:
            raise ValueError(f"max_packet_bytes: {FIXED_HEADER + 1}..{UDP_MAX_PAYLOAD}")
        self.rooms = rooms
        self.opus_payload_types = frozenset(opus_payload_types)
        self.audio_level_ext_id = audio_level_ext_id
        self.max_packet_bytes = max_packet_bytes
        self.voice_flag = voice_flag
        self.transport: asyncio.DatagramTransport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._limiter = _LogLimiter()
        # bound children, so the hot path skips the label lookup
        self._count = {o: RTP_PACKETS.labels(o) for o in OUTCOMES}
        self._sock: socket.socket | None = None
        self._inode: int | None = None
        self._draining = False
        # one more byte than a datagram can hold, so an oversized one shows
        self._buf = bytearray(UDP_MAX_PAYLOAD + 1)
        self.receive_buffer_bytes = 0

    # -- lifecycle ---------------------------------------------------------
    async def start(self, host: str, port: int) -> int:
        """Bind ``host:port`` (port 0: any free port); returns the bound port."""
        if self.transport is not None:
            raise RuntimeError("RtpIngest is already listening")
        loop = asyncio.get_running_loop()
        self._loop = loop
        family, kind, proto, _, addr = socket.getaddrinfo(
            host, port, type=socket.SOCK_DGRAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            self.receive_buffer_bytes = _raise_receive_buffer(sock, RECV_BUFFER_BYTES)
            sock.bind(addr)
            await loop.create_datagram_endpoint(lambda: self, sock=sock)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._inode = os.fstat(sock.fileno()).st_ino
        RECEIVE_BUFFER.set(self.receive_buffer_bytes)
        KERNEL_DROPS.set_function(self.kernel_drops)
        bound = int(sock.getsockname()[1])
        log.info(
            "rtp: listening on %s:%d/udp (receive buffer %d KB)",
            host,
            bound,
            self.receive_buffer_bytes // 1024,
        )
        return bound

    def kernel_drops(self) -> float:
        """Datagrams the kernel dropped on this socket (0 when not listening)."""
        if self._inode is None:
            return 0.0
        return float(socket_drops(self._inode) or 0)

    def close(self) -> None:
        """Stop listening. Idempotent."""
        transport, self.transport = self.transport, None
        self._sock = None
        if transport is not None:
            transport.close()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # the selector loop's datagram transport does not subclass DatagramTransport
        self.transport = cast(asyncio.DatagramTransport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if exc is not None:
            log.warning("rtp: listener closed: %s", exc)

    def error_received(self, exc: Exception) -> None:
        # ICMP errors for an earlier send; we never send, so only log them
        if self._limiter.allow((None, "socket_error"), time.monotonic()):
            log.warning("rtp: socket error: %s", exc)

    # -- packets -----------------------------------------------------------
    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self._one(data, addr)
        # asyncio reads one datagram per wake-up; at 50 000 a second the
        # wake-ups alone lose the race with the kernel's buffer, so read on
        # while datagrams are queued (up to READ_BATCH, then let others run)
        sock = self._sock
        if sock is None or self._draining:
            return
        self._draining = True
        buf = self._buf
        try:
            for _ in range(READ_BATCH - 1):
                try:
                    n, addr = sock.recvfrom_into(buf)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as exc:
                    self.error_received(exc)
                    break
                self._one(bytes(buf[:n]), addr)
        finally:
            self._draining = False

    def _one(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        try:
            outcome = self._handle(data, addr)
        except Exception:
            # a bug here must not stop the listener or reach asyncio's handler
            # once per packet; the packet is lost and counted as rejected
            outcome = "rejected"
            if self._limiter.allow((None, "internal"), time.monotonic()):
                log.exception("rtp: packet from %s failed", addr)
        self._count[outcome].inc()

    def _handle(self, data: bytes, addr: tuple[str | Any, int]) -> str:
        if len(data) > self.max_packet_bytes:
            self._drop(None, "oversized", f"{len(data)} bytes > {self.max_packet_bytes}", addr)
            return "oversized"
        if is_rtcp(data):
            return "rtcp"
        try:
            pkt = parse_rtp(data, audio_level_ext_id=self.audio_level_ext_id)
        except RtpError as e:
            self._drop(e.ssrc, e.outcome, e.detail, addr)
            return e.outcome
        if pkt.payload_type not in self.opus_payload_types:
            self._drop(
                pkt.ssrc,
                "unknown_payload_type",
                f"payload type {pkt.payload_type} is not Opus "
                f"(accepted: {sorted(self.opus_payload_types)})",
                addr,
            )
            return "unknown_payload_type"
        target = self.rooms.ssrcs.get(pkt.ssrc)
        if target is None:
            self._drop(pkt.ssrc, "unknown_ssrc", "no roster entry has this SSRC", addr)
            return "unknown_ssrc"
        room, endpoint = target
        loop = self._loop or asyncio.get_running_loop()
        frame = Frame(
            pkt.payload,
            pkt.sequence,
            pkt.timestamp,
            voice=pkt.voice if self.voice_flag else None,
            level_dbov=pkt.level_dbov,
            arrival=loop.time(),
        )
        if not self.rooms.push_frame(room, endpoint, frame):
            # push_frame counted the reason (room not on, roster, limits)
            # routine while captions are off in the room: not worth a warning
            self._drop(
                pkt.ssrc,
                "rejected",
                f"room {room} / {endpoint} refused the frame",
                addr,
                level=logging.INFO,
            )
            return "rejected"
        return "accepted"

    def _drop(
        self,
        ssrc: int | None,
        outcome: str,
        detail: str,
        addr: object,
        *,
        level: int = logging.WARNING,
    ) -> None:
        if self._limiter.allow((ssrc, outcome), time.monotonic()):
            who = f"SSRC {ssrc:#010x}" if ssrc is not None else "packet"
            log.log(
                level,
                "rtp: %s from %s dropped (%s): %s; further drops like it are not "
                "logged for a minute",
                who,
                addr,
                outcome,
                detail,
            )
