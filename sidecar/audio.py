"""Audio helpers: Opus packets in and out, files to PCM, sample clocks.

Everything inside the sidecar runs on 16 kHz mono float32 samples in -1..1.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np

SAMPLE_RATE = 16000
OPUS_RATE = 48000
FRAME_MS = 20


class DecodeError(Exception):
    """A packet that the decoder rejects (corrupt or not Opus)."""


# Frame sizes in 48 kHz samples for the 32 Opus configurations (RFC 6716, 3.1):
# SILK-only 0..11 (10/20/40/60 ms), hybrid 12..15 (10/20 ms), CELT 16..31
# (2.5/5/10/20 ms).
_CONFIG_SAMPLES = [480, 960, 1920, 2880] * 3 + [480, 960] * 2 + [120, 240, 480, 960] * 4


def opus_packet_samples(packet: bytes) -> int:
    """Duration of an Opus packet in 48 kHz samples, read from its TOC byte.

    Lets the gate account for the time of packets it never decodes. Raises
    DecodeError for packets whose header is impossible.
    """
    if not packet:
        raise DecodeError("empty Opus packet")
    toc = packet[0]
    per_frame = _CONFIG_SAMPLES[toc >> 3]
    code = toc & 0x3
    if code == 0:
        frames = 1
    elif code in (1, 2):
        frames = 2
    else:
        if len(packet) < 2:
            raise DecodeError("Opus code-3 packet without a frame count byte")
        frames = packet[1] & 0x3F
        if frames == 0:
            raise DecodeError("Opus code-3 packet with zero frames")
    total = per_frame * frames
    if total > 5760:  # 120 ms is the most a packet may hold
        raise DecodeError(f"Opus packet of {total / 48:.1f} ms exceeds 120 ms")
    return total


class OpusDecoder:
    """Stateful Opus decoder for one stream, output resampled to 16 kHz mono.

    Channels are averaged here rather than by the resampler, whose -3 dB
    downmix gain would make mono-coded packets (what browsers send, decoded
    onto both channels) 3 dB too loud and clip.
    """

    def __init__(self) -> None:
        self._ctx = av.CodecContext.create("libopus", "r")
        self._ctx.sample_rate = OPUS_RATE
        self._ctx.layout = "stereo"  # type: ignore[attr-defined]
        self._resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)

    @staticmethod
    def _mono(frame: av.AudioFrame) -> np.ndarray:
        arr = frame.to_ndarray()
        channels = len(frame.layout.channels)
        if frame.format.is_planar:
            mono = arr.reshape(channels, -1).mean(axis=0)
        else:
            mono = arr.reshape(-1, channels).mean(axis=1)
        if arr.dtype == np.int16:
            mono = mono / 32768.0
        return mono.astype(np.float32)

    def decode(self, packet: bytes) -> np.ndarray:
        if not packet:
            # FFmpeg reads an empty packet as the end of the stream
            raise DecodeError("empty Opus packet")
        out: list[np.ndarray] = []
        try:
            for frame in self._ctx.decode(av.Packet(packet)):
                mono = av.AudioFrame.from_ndarray(
                    self._mono(frame).reshape(1, -1), format="flt", layout="mono"
                )
                mono.sample_rate = frame.sample_rate
                out.extend(f.to_ndarray().reshape(-1) for f in self._resampler.resample(mono))
        except (av.error.FFmpegError, ValueError) as e:
            raise DecodeError(f"Opus decode failed: {e}") from e
        if not out:
            return np.zeros(0, dtype=np.float32)
        return np.concatenate(out).astype(np.float32, copy=False)


class OpusEncoder:
    """Encodes 16 kHz mono PCM into 20 ms Opus packets as a browser would send.

    Used by the conference simulator, the tests and the benchmarks.
    """

    def __init__(self, bitrate: int = 32000, channels: int = 2) -> None:
        self._ctx = av.CodecContext.create("libopus", "w")
        self._ctx.sample_rate = OPUS_RATE
        self._ctx.layout = "stereo" if channels == 2 else "mono"  # type: ignore[attr-defined]
        self._ctx.format = "s16"  # type: ignore[attr-defined]
        self._ctx.bit_rate = bitrate
        self._ctx.options = {"frame_duration": str(FRAME_MS), "application": "voip"}
        self._ctx.open()
        self._channels = channels
        self._pts = 0
        # resample in mono, then copy to both channels: no upmix gain
        self._up = av.AudioResampler(format="s16", layout="mono", rate=OPUS_RATE)
        self._pending = np.zeros(0, dtype=np.int16)

    def encode(self, pcm16k: np.ndarray) -> list[bytes]:
        """Encode samples; returns whole 20 ms packets (the rest is kept)."""
        mono = np.clip(pcm16k, -1.0, 1.0)
        frame = av.AudioFrame.from_ndarray(
            (mono * 32767).astype(np.int16).reshape(1, -1), format="s16", layout="mono"
        )
        frame.sample_rate = SAMPLE_RATE
        up = [f.to_ndarray().reshape(-1) for f in self._up.resample(frame)]
        if up:
            mono16 = np.concatenate(up)
            if self._channels == 2:
                mono16 = np.repeat(mono16, 2)  # interleaved L R
            self._pending = np.concatenate([self._pending, mono16])
        step = OPUS_RATE * FRAME_MS // 1000 * self._channels
        packets: list[bytes] = []
        while len(self._pending) >= step:
            chunk, self._pending = self._pending[:step], self._pending[step:]
            f = av.AudioFrame.from_ndarray(
                chunk.reshape(1, -1),
                format="s16",
                layout="stereo" if self._channels == 2 else "mono",
            )
            f.sample_rate = OPUS_RATE
            f.pts = self._pts
            self._pts += step // self._channels
            packets.extend(bytes(p) for p in self._ctx.encode(f))
        return packets


def encode_opus(pcm16k: np.ndarray) -> list[bytes]:
    """Whole signal to 20 ms Opus packets, padded with silence to a full frame."""
    enc = OpusEncoder()
    pad = (-len(pcm16k)) % (SAMPLE_RATE * FRAME_MS // 1000)
    packets = enc.encode(np.concatenate([pcm16k, np.zeros(pad + 320 * 3, np.float32)]))
    return packets


def load_audio(path: str | Path) -> np.ndarray:
    """Any audio or video file FFmpeg can read, as 16 kHz mono float32."""
    resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
    chunks: list[np.ndarray] = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise DecodeError(f"{path}: no audio stream")
            stream = container.streams.audio[0]
            for frame in container.decode(stream):
                chunks.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(frame))
            chunks.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(None))
    except av.error.FFmpegError as e:
        raise DecodeError(f"{path}: cannot read audio: {e}") from e
    if not chunks:
        return np.zeros(0, dtype=np.float32)
    return np.concatenate(chunks).astype(np.float32, copy=False)


def iter_pcm_frames(pcm: np.ndarray, frame_ms: int = FRAME_MS) -> Iterator[np.ndarray]:
    step = SAMPLE_RATE * frame_ms // 1000
    for i in range(0, len(pcm), step):
        chunk = pcm[i : i + step]
        if len(chunk) < step:
            chunk = np.concatenate([chunk, np.zeros(step - len(chunk), np.float32)])
        yield chunk
