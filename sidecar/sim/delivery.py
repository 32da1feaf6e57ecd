"""Delivery patterns: the same audio as different senders hand it over.

A pattern is a schedule of ``(send_at_s, item)`` pairs, where ``send_at_s``
is seconds from the start of the stream and the item is either one 20 ms
Opus packet (the videobridge, RTP) or a block of 16 kHz float32 PCM (Jigasi,
files). A real-time sender cannot send audio before it has happened, so
every item is due no earlier than the end of the audio it holds.

Jigasi's framing (``jigasi_messages``) follows its source
(jitsi/jigasi, ``src/main/java/org/jitsi/jigasi/transcription/``):

- ``PCMAudioSilenceCaptureDevice.java``: the transcriber's audio is 16 kHz
  mono, 16-bit; ``Participant.incrementSentStats`` counts 640 bytes per
  20 ms packet for Whisper;
- ``Participant.java``: ``EXPECTED_AUDIO_LENGTH = 1920`` and
  ``BUFFER_SIZE = EXPECTED_AUDIO_LENGTH * 25`` = 48000 bytes; ``buffer()``
  appends each packet and, once fewer than 1920 bytes are left, sends
  ``buffer.array()`` (the whole 48000-byte array) and clears the buffer. With
  640-byte packets that is after 73 packets (46720 bytes, 1.46 s): every
  message holds 1.46 s of audio followed by 1280 bytes (40 ms) the buffer
  never overwrote, zeros;
- ``WhisperTranscriptionService.disableSilenceFilter`` returns true, so
  silence is sent as well, at the pace the audio comes in;
- ``WhisperWebsocket.buildPayload``: a 60-byte header
  ``participantId|language`` then the audio; ``EOF_MESSAGE`` is one 0x00
  byte; there is one socket per conference (``getConnection`` keeps it in
  the call context), shared by its participants.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

SR = 16000
FRAME = 320  # 20 ms at 16 kHz
# Participant.java: EXPECTED_AUDIO_LENGTH, BUFFER_SIZE
JIGASI_PACKET_BYTES = 640
JIGASI_EXPECTED_AUDIO_LENGTH = 1920
JIGASI_BUFFER_BYTES = JIGASI_EXPECTED_AUDIO_LENGTH * 25


@dataclass(frozen=True, slots=True)
class Item:
    at: float  # seconds from the start of the stream
    pcm: np.ndarray | None = None  # 16 kHz float32
    packet: bytes | None = None  # one 20 ms Opus packet
    index: int = 0  # position in the stream (sequence number of a packet)


def pcm_chunks(pcm: np.ndarray, chunk_s: float) -> list[Item]:
    """PCM in blocks of ``chunk_s`` seconds, each sent as soon as it is complete."""
    n = max(FRAME, int(round(chunk_s * SR)))
    out = []
    for k, i in enumerate(range(0, len(pcm), n)):
        block = pcm[i : i + n].astype(np.float32)
        out.append(Item(at=(i + len(block)) / SR, pcm=block, index=k))
    return out


def jigasi_messages(pcm: np.ndarray) -> list[Item]:
    """PCM as Jigasi's ``Participant.buffer()`` hands it to the Whisper socket.

    Each message is the whole 48000-byte buffer: 73 packets of 20 ms (1.46 s)
    and a 40 ms tail of zeros, sent when the 73rd packet has arrived. The
    stream's last partial buffer is not sent (Jigasi only flushes it when the
    participant leaves; ``flush=True`` does that).
    """
    return list(_jigasi(pcm, flush=False))


def _jigasi(pcm: np.ndarray, flush: bool) -> Iterator[Item]:
    per_packet = JIGASI_PACKET_BYTES // 2
    buf = np.zeros(JIGASI_BUFFER_BYTES // 2, np.float32)
    pos = 0  # samples in the buffer
    k = 0
    for i in range(0, len(pcm), per_packet):
        pkt = pcm[i : i + per_packet]
        if len(pkt) < per_packet:
            pkt = np.concatenate([pkt, np.zeros(per_packet - len(pkt), np.float32)])
        buf[pos : pos + per_packet] = pkt
        pos += per_packet
        if (len(buf) - pos) * 2 < JIGASI_EXPECTED_AUDIO_LENGTH:
            yield Item(at=(i + per_packet) / SR, pcm=buf.copy(), index=k)
            k += 1
            pos = 0
    if flush and pos:
        yield Item(at=len(pcm) / SR, pcm=buf.copy(), index=k)


def jigasi_audio(pcm: np.ndarray) -> np.ndarray:
    """The timeline a receiver of ``jigasi_messages(pcm)`` reconstructs."""
    msgs = jigasi_messages(pcm)
    return np.concatenate([m.pcm for m in msgs if m.pcm is not None]) if msgs else pcm[:0]


def opus_frames(packets: list[bytes]) -> list[Item]:
    """20 ms packets, each sent when its 20 ms have passed (the videobridge)."""
    return [Item(at=(i + 1) * 0.02, packet=p, index=i) for i, p in enumerate(packets)]


def jittered(
    items: list[Item],
    *,
    seed: int = 7,
    every_s: float = 1.3,
    stall_s: tuple[float, float] = (0.2, 0.9),
) -> list[Item]:
    """``items`` behind a link that stalls now and then and releases a burst.

    About every ``every_s`` seconds delivery stops for a random time in
    ``stall_s``; what was held then arrives at once, in order (TCP, or RTP
    after a jitter buffer in the path). Every item still arrives, never
    before its nominal time. The default stalls are shorter than the
    pipeline's tolerance for a sender it knows nothing about yet (silence +
    0.3 s); ``jittered-long`` (0.5 to 2 s) needs what it learns from the
    first ones.
    """
    rng = np.random.default_rng(seed)
    out = []
    blocked_until = 0.0
    next_stall = float(rng.uniform(0.5, every_s))
    for it in items:
        at = it.at
        if at >= next_stall:
            blocked_until = next_stall + float(rng.uniform(*stall_s))
            next_stall = blocked_until + float(rng.uniform(0.5 * every_s, 1.5 * every_s))
        out.append(Item(at=max(at, blocked_until), pcm=it.pcm, packet=it.packet, index=it.index))
    return out


PATTERNS = ("frames-20ms", "chunks-0.2s", "chunks-1s", "jigasi-1.5s", "chunks-2s", "jittered")


def schedule(pattern: str, pcm: np.ndarray, *, seed: int = 7) -> list[Item]:
    """``pcm`` (16 kHz float32) delivered the way ``pattern`` names (see PATTERNS)."""
    from sidecar.audio import encode_opus

    if pattern == "frames-20ms":
        return opus_frames(encode_opus(pcm))
    if pattern == "jittered":
        return jittered(opus_frames(encode_opus(pcm)), seed=seed)
    if pattern == "jittered-long":
        return jittered(opus_frames(encode_opus(pcm)), seed=seed, stall_s=(0.5, 2.0))
    if pattern == "jittered-chunks":
        return jittered(pcm_chunks(pcm, 0.2), seed=seed)
    if pattern == "jigasi-1.5s":
        return jigasi_messages(pcm)
    if pattern.startswith("chunks-") and pattern.endswith("s"):
        return pcm_chunks(pcm, float(pattern[len("chunks-") : -1]))
    raise ValueError(f"unknown delivery pattern {pattern!r}; known: {', '.join(PATTERNS)}")


async def feed(rooms, room: str, pid: str, items: list[Item], *, t0: float | None = None) -> float:  # type: ignore[no-untyped-def]
    """Push ``items`` into ``rooms`` (a RoomManager) at their times, in real time.

    Returns the monotonic time the stream's zero was at.
    """
    import asyncio
    import time

    from sidecar.events import Frame

    start = time.monotonic() if t0 is None else t0
    samples = 0
    for it in items:
        delay = start + it.at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        if it.packet is not None:
            frame = Frame(it.packet, it.index % 65536, it.index * 960, arrival=time.monotonic())
        else:
            assert it.pcm is not None
            frame = Frame(b"", it.index % 65536, samples, pcm=it.pcm, arrival=time.monotonic())
            samples += len(it.pcm)
        rooms.push_frame(room, pid, frame)
    return start
