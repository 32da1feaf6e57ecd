"""Plain RTP ingest over real UDP sockets on 127.0.0.1.

Real speech goes in as Opus RTP with an RFC 6464 audio level, one SSRC per
room, and must come out as captions of the right participant in the right
room. Malformed datagrams of every kind are counted under their outcome and
never stop the listener.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import struct
import time
from collections.abc import Callable, Iterable

import jiwer
import numpy as np
import pytest
from prometheus_client import REGISTRY

from sidecar.audio import OpusEncoder, load_audio
from sidecar.engine import Engine
from sidecar.events import Frame
from sidecar.ingest.rtp import OUTCOMES, RtpError, RtpIngest, is_rtcp, parse_rtp
from sidecar.rooms import Participant
from tests.conftest import collect, librivox, normalise

OPUS_PT = 111
LEVEL_ID = 1  # Jitsi's id for urn:ietf:params:rtp-hdrext:ssrc-audio-level


# -- building packets --------------------------------------------------------
def rtp(
    seq: int,
    ts: int,
    ssrc: int,
    payload: bytes,
    *,
    pt: int = OPUS_PT,
    marker: bool = False,
    version: int = 2,
    csrcs: Iterable[int] = (),
    ext: tuple[int, bytes] | None = None,
    padding: int = 0,
) -> bytes:
    """An RTP packet (RFC 3550 5.1); ``ext`` is (profile, body), padded to words."""
    csrcs = tuple(csrcs)
    b0 = version << 6 | (0x20 if padding else 0) | (0x10 if ext else 0) | len(csrcs)
    out = struct.pack("!BBHII", b0, marker << 7 | pt, seq & 0xFFFF, ts & 0xFFFFFFFF, ssrc)
    out += struct.pack(f"!{len(csrcs)}I", *csrcs)
    if ext is not None:
        profile, body = ext
        body += bytes(-len(body) % 4)
        out += struct.pack("!HH", profile, len(body) // 4) + body
    out += payload
    if padding:
        out += bytes(padding - 1) + bytes([padding])
    return out


def level_one_byte(voice: bool, level: int, ext_id: int = LEVEL_ID) -> tuple[int, bytes]:
    """RFC 6464 element in the RFC 8285 one-byte form (len field 0 = one data byte)."""
    return 0xBEDE, bytes([ext_id << 4, voice << 7 | level])


def level_two_byte(voice: bool, level: int, ext_id: int = LEVEL_ID) -> tuple[int, bytes]:
    return 0x1000, bytes([ext_id, 1, voice << 7 | level])


def outcome(name: str) -> float:
    return REGISTRY.get_sample_value("captions_rtp_packets_total", {"outcome": name}) or 0.0


def counts() -> dict[str, float]:
    return {o: outcome(o) for o in OUTCOMES}


async def wait_for(pred: Callable[[], bool], limit_s: float = 5.0) -> None:
    """Poll until the listener has counted what the test sent."""
    deadline = time.monotonic() + limit_s
    while not pred():
        assert time.monotonic() < deadline, "timed out waiting for packets"
        await asyncio.sleep(0.01)


def voice_flags(pcm: np.ndarray, frame: int = 320, hangover: int = 15) -> list[tuple[bool, int]]:
    """(voice, -dBov level) per 20 ms frame, as a sender's simple VAD would set them.

    An energy threshold with a hangover, so quiet word endings and short
    pauses inside a sentence stay marked as voice.
    """
    out: list[tuple[bool, int]] = []
    hold = 0
    for i in range(0, len(pcm), frame):
        chunk = pcm[i : i + frame]
        rms = float(np.sqrt(np.mean(chunk.astype(np.float64) ** 2))) if len(chunk) else 0.0
        dbov = -20 * np.log10(max(rms, 1e-7))
        level = int(min(127, max(0, round(dbov))))
        hold = hangover if dbov < 45 else max(0, hold - 1)
        out.append((hold > 0, level))
    return out


# -- parsing, without sockets ---------------------------------------------------
def test_parse_full_header():
    data = rtp(
        65535,
        2**32 - 960,
        0xCAFEBABE,
        b"\x78opus",
        marker=True,
        csrcs=(1, 2),
        ext=(0xBEDE, bytes([0x00, 0x21, 9, 9, LEVEL_ID << 4, 0x80 | 33])),
        padding=7,
    )
    p = parse_rtp(data)
    assert (p.payload_type, p.marker, p.sequence, p.timestamp, p.ssrc) == (
        OPUS_PT,
        True,
        65535,
        2**32 - 960,
        0xCAFEBABE,
    )
    assert p.csrcs == (1, 2)
    assert p.payload == b"\x78opus"  # padding stripped
    assert (p.voice, p.level_dbov) == (True, 33.0)


def test_parse_extension_forms():
    plain = parse_rtp(rtp(1, 2, 3, b"x"))
    assert (plain.voice, plain.level_dbov) == (None, None)
    two = parse_rtp(rtp(1, 2, 3, b"x", ext=(0x1003, bytes([0, 7, 0]) + level_two_byte(0, 127)[1])))
    assert (two.voice, two.level_dbov) == (False, 127.0)
    # RFC 8285 4.2: ID 15 ends parsing, even with an overrunning length after it
    stop = parse_rtp(rtp(1, 2, 3, b"x", ext=(0xBEDE, bytes([0xFF, LEVEL_ID << 4, 0x85]))))
    assert stop.voice is None
    # an unknown profile is skipped as a whole (RFC 3550 5.3.1)
    other = parse_rtp(rtp(1, 2, 3, b"x", ext=(0xABCD, bytes([0x10, 0x85, 0xFF, 0xFF]))))
    assert other.voice is None and other.payload == b"x"
    # a configured id other than the default
    five = parse_rtp(
        rtp(1, 2, 3, b"x", ext=level_one_byte(True, 5, ext_id=5)), audio_level_ext_id=5
    )
    assert (five.voice, five.level_dbov) == (True, 5.0)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", "short"),
        (rtp(1, 2, 3, b"x", version=1), "bad_version"),
        (rtp(1, 2, 3, b"x")[:5], "short"),
        (bytes([0x8F]) + rtp(1, 2, 3, b"abcdefgh")[1:], "short"),  # 15 CSRCs announced
        (rtp(1, 2, 3, b"abc", padding=4)[:-1] + b"\x09", "bad_padding"),  # past the header
        (rtp(1, 2, 3, b"abc", padding=1)[:-1] + b"\x00", "bad_padding"),  # count 0
        (bytes([0xA0]) + bytes(11), "bad_padding"),  # padding bit, nothing after the header
        (rtp(1, 2, 3, b"", ext=level_one_byte(True, 3))[:15], "bad_extension"),
        (
            rtp(1, 2, 3, b"", ext=(0xBEDE, b""))[:12] + struct.pack("!HH", 0xBEDE, 10) + bytes(4),
            "bad_extension",
        ),
        (bytes([0x90]) + rtp(1, 2, 3, b"")[1:12] + b"\xbe", "bad_extension"),
        (rtp(1, 2, 3, b"x", ext=(0xBEDE, bytes([0x13, 1, 2, 3]))), "bad_extension"),
        (rtp(1, 2, 3, b"x", ext=(0x1000, bytes([1, 9, 0, 0]))), "bad_extension"),
    ],
)
def test_parse_rejects(data: bytes, expected: str):
    with pytest.raises(RtpError) as e:
        parse_rtp(data)
    assert e.value.outcome == expected


def test_rtcp_is_recognised():
    sr = struct.pack("!BBHI", 0x80, 200, 6, 0x1234) + bytes(20)
    assert is_rtcp(sr)
    assert is_rtcp(struct.pack("!BBH", 0x81, 205, 2) + bytes(8))  # transport feedback
    assert not is_rtcp(rtp(1, 2, 3, b"x"))
    assert not is_rtcp(rtp(1, 2, 3, b"x", marker=True))  # 0x80 | 111 = 239


def test_parse_never_raises_anything_else():
    rng = random.Random(3)
    base = rtp(100, 4800, 77, b"\x78" * 40, csrcs=(5,), ext=level_one_byte(True, 20), padding=3)
    for _ in range(5000):
        data = bytearray(base[: rng.randrange(len(base) + 1)])
        for _ in range(rng.randrange(4)):
            if data:
                data[rng.randrange(len(data))] = rng.randrange(256)
        try:
            parse_rtp(bytes(data))
        except RtpError as e:
            assert e.outcome in OUTCOMES


# -- the listener ----------------------------------------------------------------
async def test_bad_input_counted_and_listener_survives(tmp_path, caplog):
    engine = Engine(tmp_path)
    await engine.start(preload=False)
    room, idle_room = "rtp-bad@conference.test", "rtp-idle@conference.test"
    good_ssrc, idle_ssrc = 0x0BADF00D, 0x1D1E
    await engine.rooms.update_roster(room, [Participant("gw", "Gateway", ssrcs=(good_ssrc,))])
    await engine.rooms.update_roster(idle_room, [Participant("idle", ssrcs=(idle_ssrc,))])
    await engine.rooms.start(room, "captions")  # idle_room stays off: frames are refused

    pushed: list[tuple[str, str, Frame]] = []
    real_push = engine.rooms.push_frame

    def spy(r: str, p: str, f: Frame) -> bool:
        pushed.append((r, p, f))
        return real_push(r, p, f)

    engine.rooms.push_frame = spy  # type: ignore[method-assign]
    ingest = RtpIngest(engine.rooms)
    port = await ingest.start("127.0.0.1", 0)
    assert port > 0
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silence = OpusEncoder().encode(np.zeros(320 * 3, np.float32))[0]
    ok = level_one_byte(False, 127)
    bad = {
        "bad_version": [rtp(1, 0, good_ssrc, silence, version=1, ext=ok)],
        "short": [
            b"\x80\x6f\x00\x01\x00",  # 5 bytes
            bytes([0x8F]) + rtp(2, 0, good_ssrc, silence)[1:20],  # CSRCs past the end
        ],
        "bad_padding": [rtp(3, 0, good_ssrc, silence, ext=ok, padding=2)[:-1] + b"\xff"],
        "bad_extension": [
            rtp(4, 0, good_ssrc, b"", ext=ok)[:12] + struct.pack("!HH", 0xBEDE, 3) + b"\x10"
        ],
        "unknown_payload_type": [rtp(5, 0, good_ssrc, silence, pt=0, ext=ok)],
        "unknown_ssrc": [rtp(6, 0, 0x7777, silence, ext=ok)],
        "oversized": [rtp(7, 0, good_ssrc, bytes(64_000), ext=ok)],
        "rtcp": [
            struct.pack("!BBHI", 0x80, 201, 1, good_ssrc),
            struct.pack("!BBHI", 0x80, 203, 1, 9),
        ],
        "rejected": [rtp(8, 0, idle_ssrc, silence, ext=ok)],
    }
    before = counts()
    try:
        # every kind straight into the protocol first: none raises
        for items in bad.values():
            for data in items:
                ingest.datagram_received(data, ("127.0.0.1", 9))
        for name, items in bad.items():
            assert outcome(name) - before[name] == len(items), name
        # then over the socket, with a good packet last
        for items in bad.values():
            for data in items:
                sock.sendto(data, ("127.0.0.1", port))
        good = rtp(
            40000,
            123 * 960,
            good_ssrc,
            silence,
            csrcs=(42,),
            ext=level_one_byte(False, 99),
            padding=4,
        )
        sock.sendto(good, ("127.0.0.1", port))
        await wait_for(lambda: outcome("accepted") - before["accepted"] >= 1)
        for name, items in bad.items():
            assert outcome(name) - before[name] == 2 * len(items), name
        assert outcome("accepted") - before["accepted"] == 1

        # what reached the room: the valid packet, decoded field by field
        r, p, f = pushed[-1]
        assert (r, p) == (room, "gw")
        assert (f.payload, f.sequence, f.timestamp) == (silence, 40000, 123 * 960)
        assert (f.voice, f.level_dbov) == (False, 99.0)
        assert 0 < f.arrival <= asyncio.get_running_loop().time()
        assert {x[1] for x in pushed} == {"gw", "idle"}  # nothing malformed got through

        # the two-byte extension form over the wire
        two = rtp(40001, 124 * 960, good_ssrc, silence, ext=level_two_byte(True, 12))
        sock.sendto(two, ("127.0.0.1", port))
        await wait_for(lambda: outcome("accepted") - before["accepted"] >= 2)
        assert (pushed[-1][2].voice, pushed[-1][2].level_dbov) == (True, 12.0)

        # no log flood: a stream from one unknown SSRC logs once
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="sidecar.ingest.rtp"):
            for i in range(50):
                ingest.datagram_received(rtp(i, 0, 0x5151, silence), ("127.0.0.1", 9))
        assert len([m for m in caplog.messages if "0x00005151" in m]) == 1

        # random garbage: each datagram counted once, the listener keeps going,
        # and a new SSRC per packet cannot flood the log either
        rng = random.Random(5)
        total = sum(counts().values())
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="sidecar.ingest.rtp"):
            for i in range(500):
                sock.sendto(rng.randbytes(rng.randrange(0, 200)), ("127.0.0.1", port))
                if i % 50 == 0:
                    await asyncio.sleep(0)  # let the loop read; a burst could overflow the socket
            await wait_for(lambda: sum(counts().values()) - total >= 500)
        assert sum(counts().values()) - total == 500
        assert len(caplog.records) <= 60
        assert ingest.transport is not None
        sock.sendto(rtp(40002, 125 * 960, good_ssrc, silence, ext=ok), ("127.0.0.1", port))
        await wait_for(lambda: outcome("accepted") - before["accepted"] >= 3)
    finally:
        sock.close()
        ingest.close()
        await engine.close()


async def test_constructor_and_start_checks(tmp_path):
    engine = Engine(tmp_path)
    with pytest.raises(ValueError):
        RtpIngest(engine.rooms, opus_payload_types=frozenset({200}))
    with pytest.raises(ValueError):
        RtpIngest(engine.rooms, audio_level_ext_id=0)
    with pytest.raises(ValueError):
        RtpIngest(engine.rooms, max_packet_bytes=12)
    ingest = RtpIngest(engine.rooms, opus_payload_types=frozenset({96, 111}))
    await ingest.start("127.0.0.1", 0)
    with pytest.raises(RuntimeError):
        await ingest.start("127.0.0.1", 0)
    ingest.close()
    ingest.close()  # idempotent
    await engine.close()


# -- real speech -------------------------------------------------------------------
@pytest.mark.slow
async def test_real_speech_two_rooms_over_rtp(tmp_path):
    corpus = librivox()
    speakers = {
        # participant: (room, SSRC, utterance); different rooms, overlapping in time
        "alice": ("north@conference.test", 0xA11CE000, corpus[0]),
        "bob": ("south@conference.test", 0x0000B0B0, corpus[3]),
    }
    engine = Engine(tmp_path)
    await engine.start()
    ingest = RtpIngest(engine.rooms)
    port = await ingest.start("127.0.0.1", 0)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        got = {}
        streams: dict[str, list[bytes]] = {}
        rng = random.Random(11)
        for who, (room, ssrc, (wav, _)) in speakers.items():
            await engine.rooms.update_roster(room, [Participant(who, who.title(), ssrcs=(ssrc,))])
            await engine.rooms.start(room, "captions")
            got[who] = await collect(engine, room)
            lead, tail = np.zeros(8000, np.float32), np.zeros(16000, np.float32)
            pcm = np.concatenate([lead, load_audio(wav), tail])
            flags = voice_flags(pcm)
            # random initial sequence and timestamp, as RFC 3550 asks; the
            # sequence wraps within the stream
            seq0, ts0 = rng.randrange(65536 - 100, 65536), rng.randrange(2**32)
            streams[who] = [
                rtp(
                    seq0 + i,
                    ts0 + i * 960,
                    ssrc,
                    pkt,
                    marker=i == 0,
                    ext=level_one_byte(*flags[min(i, len(flags) - 1)]),
                )
                for i, pkt in enumerate(OpusEncoder().encode(pcm))
            ]
        before = outcome("accepted")
        gated_before = REGISTRY.get_sample_value("captions_frames_gated_total") or 0.0
        n = max(len(s) for s in streams.values())
        t0 = time.monotonic()
        for i in range(n):
            for s in streams.values():
                if i < len(s):
                    sock.sendto(s[i], ("127.0.0.1", port))
            await asyncio.sleep(max(0.0, t0 + (i + 1) * 0.02 - time.monotonic()))
        sent = sum(len(s) for s in streams.values())
        await wait_for(lambda: outcome("accepted") - before >= sent)
        assert outcome("accepted") - before == sent
        # the V bit reached the speaker pipeline: the silent lead-in was not decoded
        gated = (REGISTRY.get_sample_value("captions_frames_gated_total") or 0.0) - gated_before
        assert gated >= 20
        for room, _, _ in speakers.values():
            await engine.rooms.end_room(room)
    finally:
        sock.close()
        ingest.close()
        await engine.close()

    for who, (room, _, (_, ref)) in speakers.items():
        finals = [c for _, c in got[who] if not c.is_interim and c.text]
        assert finals, f"no final caption in {room}"
        for c in finals:
            print(f"{room} {c.participant_name}: {c.text}")
        # every caption of the room is this room's one speaker
        assert {(c.room, c.participant_id, c.participant_name) for _, c in got[who]} == {
            (room, who, who.title())
        }
        wer = jiwer.wer(normalise(ref), normalise(" ".join(c.text for c in finals)))
        print(f"{who}: WER {wer:.3f}")
        assert wer < 0.25
