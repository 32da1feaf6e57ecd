"""Tests of the audio helpers: Opus packet durations, Opus round trips, files to PCM."""

from __future__ import annotations

import contextlib
import wave
from pathlib import Path

import numpy as np
import pytest

from sidecar.audio import (
    SAMPLE_RATE,
    DecodeError,
    OpusDecoder,
    OpusEncoder,
    load_audio,
    opus_packet_samples,
)


def tone(freq: float = 440.0, seconds: float = 1.0, rate: int = SAMPLE_RATE) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def dominant_hz(pcm: np.ndarray, rate: int = SAMPLE_RATE) -> float:
    spectrum = np.abs(np.fft.rfft(pcm * np.hanning(len(pcm))))
    return float(np.fft.rfftfreq(len(pcm), 1 / rate)[np.argmax(spectrum)])


def toc(config: int, code: int, stereo: bool = False) -> int:
    return (config << 3) | (int(stereo) << 2) | code


# ---------------------------------------------------------------- packet durations


@pytest.mark.parametrize("channels", [1, 2])
def test_encoder_packets_are_20_ms(channels: int) -> None:
    packets = OpusEncoder(channels=channels).encode(tone(seconds=0.5))
    assert len(packets) >= 20
    assert {opus_packet_samples(p) for p in packets} == {960}


@pytest.mark.parametrize(
    ("config", "samples"),
    [
        (0, 480),  # SILK narrowband 10 ms
        (1, 960),  # 20 ms
        (2, 1920),  # 40 ms
        (3, 2880),  # 60 ms
        (11, 2880),  # SILK wideband 60 ms
        (12, 480),  # hybrid 10 ms
        (15, 960),  # hybrid fullband 20 ms
        (16, 120),  # CELT 2.5 ms
        (17, 240),  # CELT 5 ms
        (18, 480),  # CELT 10 ms
        (31, 960),  # CELT fullband 20 ms
    ],
)
def test_code_0_packet_is_one_frame(config: int, samples: int) -> None:
    assert opus_packet_samples(bytes([toc(config, 0), 0xAA, 0xBB])) == samples
    assert opus_packet_samples(bytes([toc(config, 0, stereo=True)])) == samples


@pytest.mark.parametrize("code", [1, 2])
@pytest.mark.parametrize(("config", "per_frame"), [(0, 480), (1, 960), (2, 1920), (3, 2880)])
def test_code_1_and_2_packets_are_two_frames(code: int, config: int, per_frame: int) -> None:
    assert opus_packet_samples(bytes([toc(config, code), 0x10, 0, 0])) == 2 * per_frame


@pytest.mark.parametrize(
    ("config", "count_byte", "samples"),
    [
        (1, 1, 960),
        (1, 3, 2880),
        (1, 6, 5760),  # 6 x 20 ms = 120 ms, the most allowed
        (1, 0x80 | 3, 2880),  # VBR flag set: the count is the low 6 bits
        (1, 0x40 | 0x80 | 4, 3840),  # padding and VBR flags
        (0, 12, 5760),  # 12 x 10 ms
        (16, 48, 5760),  # 48 x 2.5 ms
        (3, 2, 5760),  # 2 x 60 ms
    ],
)
def test_code_3_packet_reads_the_frame_count(config: int, count_byte: int, samples: int) -> None:
    assert opus_packet_samples(bytes([toc(config, 3), count_byte, 0, 0])) == samples


@pytest.mark.parametrize(
    "packet",
    [
        b"",
        bytes([toc(1, 3)]),  # code 3 without its frame count byte
        bytes([toc(1, 3), 0]),  # zero frames
        bytes([toc(1, 3), 0xC0]),  # flags only, zero frames
        bytes([toc(1, 3), 7]),  # 140 ms
        bytes([toc(3, 3), 3]),  # 180 ms
        bytes([toc(16, 3), 49]),  # 122.5 ms
    ],
)
def test_impossible_packets_raise_decode_error(packet: bytes) -> None:
    with pytest.raises(DecodeError):
        opus_packet_samples(packet)


# ---------------------------------------------------------------- Opus round trip


@pytest.mark.parametrize("channels", [1, 2])
def test_opus_round_trip_keeps_duration_and_pitch(channels: int) -> None:
    pcm = tone(440.0, seconds=1.0)
    enc = OpusEncoder(channels=channels)
    dec = OpusDecoder()
    out = np.concatenate([dec.decode(p) for p in enc.encode(pcm)])
    assert out.dtype == np.float32
    assert out.ndim == 1
    assert abs(len(out) - len(pcm)) <= 30 * SAMPLE_RATE // 1000
    assert abs(dominant_hz(out) - 440.0) < 5.0


def rms(pcm: np.ndarray) -> float:
    return float(np.sqrt(np.mean(pcm**2)))


def round_trip(pcm: np.ndarray, channels: int) -> np.ndarray:
    dec = OpusDecoder()
    return np.concatenate([dec.decode(p) for p in OpusEncoder(channels=channels).encode(pcm)])


def test_stereo_coded_packets_keep_their_level() -> None:
    pcm = 0.9 / 0.5 * tone(seconds=1.0)
    out = round_trip(pcm, channels=2)
    steady = out[len(out) // 4 :]
    assert rms(steady) == pytest.approx(rms(pcm), rel=0.1)
    assert np.max(np.abs(out)) <= 1.0


def test_mono_coded_packets_keep_their_level() -> None:
    pcm = 0.9 / 0.5 * tone(seconds=1.0)
    packets = OpusEncoder(channels=1).encode(pcm)
    assert not packets[5][0] & 0x04  # mono-coded
    dec = OpusDecoder()
    out = np.concatenate([dec.decode(p) for p in packets])
    steady = out[len(out) // 4 :]
    assert np.max(np.abs(out)) <= 1.0
    assert rms(steady) == pytest.approx(rms(pcm), rel=0.1)


def test_encoder_keeps_partial_frames_for_the_next_call() -> None:
    pcm = tone(440.0, seconds=1.0)
    enc = OpusEncoder()
    packets = []
    for i in range(0, len(pcm), 100):  # 6.25 ms chunks
        packets += enc.encode(pcm[i : i + 100])
    whole = OpusEncoder().encode(pcm)
    assert abs(len(packets) - len(whole)) <= 1
    assert len(packets) >= 48


def test_decoder_output_per_packet_is_20_ms_at_16_khz() -> None:
    packets = OpusEncoder().encode(tone(seconds=0.5))
    dec = OpusDecoder()
    lengths = [len(dec.decode(p)) for p in packets]
    # after the resampler's start-up, every 20 ms packet gives 320 samples
    assert lengths[2:] == [320] * len(lengths[2:])


@pytest.mark.parametrize(
    "garbage",
    [
        bytes([toc(31, 3), 0xFF, 0xFF]),  # 63 frames: far over 120 ms
        bytes([toc(1, 3), 0]),  # zero frames
        bytes([toc(1, 3)]),  # missing frame count
        bytes([toc(1, 2), 0xFF]),  # code 2 whose first frame is longer than the packet
    ],
)
def test_decoding_garbage_raises_decode_error(garbage: bytes) -> None:
    with pytest.raises(DecodeError):
        OpusDecoder().decode(garbage)


def test_decoder_recovers_for_good_packets_after_garbage() -> None:
    packets = OpusEncoder().encode(tone(seconds=0.3))
    dec = OpusDecoder()
    dec.decode(packets[0])
    with pytest.raises(DecodeError):
        dec.decode(bytes([toc(31, 3), 0xFF, 0xFF]))
    assert len(dec.decode(packets[1])) > 0


def test_empty_packet_does_not_break_the_decoder() -> None:
    packets = OpusEncoder().encode(tone(seconds=0.3))
    dec = OpusDecoder()
    dec.decode(packets[0])
    with contextlib.suppress(DecodeError):  # rejecting it is fine; breaking the stream is not
        dec.decode(b"")
    assert len(dec.decode(packets[1])) > 0


# ---------------------------------------------------------------- files


def write_wav(path: Path, pcm: np.ndarray, rate: int, channels: int = 1) -> None:
    data = (np.clip(pcm, -1, 1) * 32767).astype("<i2")
    if channels > 1:
        data = np.repeat(data[:, None], channels, axis=1)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(data.tobytes())


@pytest.mark.parametrize(("rate", "channels"), [(16000, 1), (44100, 2), (8000, 1), (48000, 2)])
def test_load_audio_gives_16_khz_mono_float32(tmp_path: Path, rate: int, channels: int) -> None:
    path = tmp_path / "speech.wav"
    write_wav(path, tone(440.0, seconds=1.5, rate=rate), rate, channels)
    pcm = load_audio(path)
    assert pcm.dtype == np.float32
    assert pcm.ndim == 1
    assert abs(len(pcm) - int(1.5 * SAMPLE_RATE)) <= 10 * SAMPLE_RATE // 1000
    assert abs(dominant_hz(pcm) - 440.0) < 5.0
    assert 0.3 < float(np.max(np.abs(pcm))) <= 1.0


def test_load_audio_accepts_str_paths(tmp_path: Path) -> None:
    path = tmp_path / "a.wav"
    write_wav(path, tone(seconds=0.25), SAMPLE_RATE)
    assert len(load_audio(str(path))) == SAMPLE_RATE // 4


def test_load_audio_of_an_exact_16_khz_file_is_sample_exact(tmp_path: Path) -> None:
    path = tmp_path / "exact.wav"
    pcm = tone(seconds=0.5)
    write_wav(path, pcm, SAMPLE_RATE)
    out = load_audio(path)
    assert len(out) == len(pcm)
    assert np.max(np.abs(out - pcm)) < 1e-3


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("notes.txt", b"hello, this is not audio\n" * 20),
        ("fake.wav", b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk" + bytes(range(256))),
        ("zeros.bin", bytes(1000)),
    ],
)
def test_load_audio_of_a_non_audio_file_raises_decode_error(
    tmp_path: Path, name: str, content: bytes
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DecodeError):
        load_audio(path)


def test_load_audio_of_a_missing_file_raises_decode_error(tmp_path: Path) -> None:
    with pytest.raises(DecodeError):
        load_audio(tmp_path / "missing.wav")
