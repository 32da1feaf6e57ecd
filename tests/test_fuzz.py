"""Property-based fuzzing of every parser that reads bytes from outside.

Each test feeds one parser inputs built by hypothesis, seeded with real
traffic shapes (the videobridge's mediajson messages as the simulator sends
them from MediaJson.kt's fields, RTP with RFC 8285 audio-level extensions
and real Opus, Jigasi's 60-byte skynet header, gRPC-Web frames of real
requests, signed Jigasi ASAP JWTs, the example config file), and checks the
one property that matters: the parser either accepts the input or refuses
it with its documented error, never anything else, and never logs an error
(the ingest paths catch unexpected exceptions and log them; a logged error
is a crash found).

``make test`` runs ``FUZZ_EXAMPLES`` (default 60) inputs per parser;
``make fuzz`` runs many more and writes the figures (inputs, documented
refusals, crashes) to ``FUZZ_REPORT``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import struct
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sidecar.api import grpcweb
from sidecar.config import ConfigError, SettingError, load_config, settings_from_proto
from sidecar.engine import Engine
from sidecar.errors import ServiceError
from sidecar.ingest.common import CloseConnection
from sidecar.ingest.mediajson import MediaJsonEndpoint
from sidecar.ingest.mediajson import _Connection as MjConnection
from sidecar.ingest.rtp import RtpError, RtpIngest, parse_rtp
from sidecar.ingest.skynet import HEADER_BYTES, SkynetEndpoint
from sidecar.ingest.skynet import _Connection as SkyConnection
from sidecar.proto.captions.v1 import captions_pb2 as pb
from sidecar.rooms import Participant

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "60"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    derandomize=os.environ.get("FUZZ_RANDOM") is None,  # CI: the same inputs every run
)
ROOM = "fuzz@conference.example.com"

# inputs and outcomes per parser, for docs/reliability.md (make fuzz)
STATS: dict[str, Counter[str]] = {}


def tally(parser: str, outcome: str) -> None:
    STATS.setdefault(parser, Counter())[outcome] += 1
    STATS[parser]["inputs"] += 1


def _rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


@pytest.fixture(scope="module", autouse=True)
def report() -> Iterator[None]:
    t0, rss0 = time.monotonic(), _rss_mb()
    yield
    out = os.environ.get("FUZZ_REPORT")
    if out:
        old = json.loads(Path(out).read_text()) if Path(out).is_file() else {}
        old.update({k: dict(v) for k, v in STATS.items()})
        old["_run"] = {
            "examples_per_parser": EXAMPLES,
            "seconds": round(time.monotonic() - t0, 1),
            "rss_mb_first_test": round(rss0, 1),
            "rss_mb_end": round(_rss_mb(), 1),
        }
        Path(out).write_text(json.dumps(old, indent=2, sort_keys=True) + "\n")


class ErrorLog(logging.Handler):
    """Every ERROR a sidecar logger writes: an exception some handler swallowed."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def errors() -> Iterator[ErrorLog]:
    handler = ErrorLog()
    logger = logging.getLogger("sidecar")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


def no_new_errors(errors: ErrorLog, before: int) -> None:
    new = errors.records[before:]
    assert not new, [r.getMessage() + (r.exc_text or "") for r in new]


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    lp = asyncio.new_event_loop()
    try:
        yield lp
    finally:
        lp.close()


@pytest.fixture(scope="module")
def engine(
    loop: asyncio.AbstractEventLoop, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Engine]:
    """A real room with captions on: fuzzed audio goes through the real pipeline."""
    eng = Engine(tmp_path_factory.mktemp("fuzz-store"))

    async def up() -> None:
        await eng.start(preload=False)
        await eng.rooms.start(ROOM, "captions", requested_by="prosody")

    loop.run_until_complete(up())
    try:
        yield eng
    finally:
        loop.run_until_complete(eng.close())


# -- real traffic to seed from ------------------------------------------------------


def _opus_frames() -> list[bytes]:
    from sidecar.audio import encode_opus

    t = np.arange(16000, dtype=np.float32) / 16000
    tone = 0.3 * np.sin(2 * np.pi * 220 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
    return encode_opus(tone.astype(np.float32))[:8]


OPUS = _opus_frames()


def rtp_packet(
    seq: int, ssrc: int, payload: bytes, *, level: int | None = 30, pt: int = 111
) -> bytes:
    """RTP as a SIP gateway sends it: RFC 8285 one-byte audio level (RFC 6464), id 1."""
    ext = b""
    b0 = 0x80
    if level is not None:
        b0 |= 0x10
        body = bytes([0x10, 0x80 | level, 0, 0])  # id 1, len 0 (1 byte), voice, padding
        ext = struct.pack("!HH", 0xBEDE, len(body) // 4) + body
    head = struct.pack("!BBHII", b0, pt, seq & 0xFFFF, seq * 960 & 0xFFFFFFFF, ssrc)
    return head + ext + payload


def media_msg(tag: str, chunk: int, payload: bytes) -> str:
    """A media message as the simulator writes it (MediaJson.kt's fields, strings for numbers)."""
    return json.dumps(
        {
            "event": "media",
            "sequenceNumber": str(chunk),
            "media": {
                "tag": tag,
                "chunk": str(chunk),
                "timestamp": str(chunk * 960),
                "payload": base64.b64encode(payload).decode(),
                "audioLevel": 0.25,
                "vad": True,
            },
        }
    )


START = json.dumps(
    {
        "event": "start",
        "sequenceNumber": "1",
        "start": {
            "tag": "ab12cd34-a0",
            "mediaFormat": {"encoding": "opus", "sampleRate": 48000, "channels": 2},
            "customParameters": {"endpointId": "ab12cd34"},
        },
    }
)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True)
    | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=12), inner),
    max_leaves=20,
)


def _mediajson_messages() -> st.SearchStrategy[str]:
    field = st.one_of(
        json_values,
        st.sampled_from(["ab12cd34-a0", "ab12cd34", "opus", "PCMU", "", "-a0"]),
    )
    media = st.fixed_dictionaries(
        {},
        optional={
            "tag": st.sampled_from(["ab12cd34-a0", "zz-a1"]) | field,
            "chunk": st.integers(-(2**40), 2**40).map(str) | field,
            "timestamp": st.integers(-(2**40), 2**40).map(str) | field,
            "payload": st.sampled_from(OPUS).map(lambda b: base64.b64encode(b).decode())
            | st.binary(max_size=300).map(lambda b: base64.b64encode(b).decode())
            | field,
            "audioLevel": st.floats() | field,
            "vad": st.booleans() | field,
        },
    )
    start = st.fixed_dictionaries(
        {},
        optional={
            "tag": st.text(max_size=140) | field,
            "mediaFormat": st.fixed_dictionaries(
                {}, optional={"encoding": field, "sampleRate": field, "channels": field}
            )
            | field,
            "customParameters": st.fixed_dictionaries({}, optional={"endpointId": field}) | field,
        },
    )
    event = st.sampled_from(
        ["media", "start", "stop", "ping", "pong", "info", "sources", "transcription-result"]
    ) | st.text(max_size=20)
    structured = st.builds(
        lambda e, m, s, extra: json.dumps({"event": e, "media": m, "start": s, "stop": s, **extra}),
        event,
        media,
        start,
        st.dictionaries(st.text(max_size=10), json_values, max_size=3),
    )
    return structured | json_values.map(json.dumps) | st.text(max_size=200)


# -- mediajson ----------------------------------------------------------------------


class _Ws:
    closed = False

    async def send_str(self, text: str) -> None:
        pass


@FUZZ
@given(msgs=st.lists(_mediajson_messages(), min_size=1, max_size=8))
@example(msgs=[START] + [media_msg("ab12cd34-a0", i, p) for i, p in enumerate(OPUS)])
@example(msgs=[START, '{"event":"ping","id":7}', '{"event":"stop","stop":{"tag":"ab12cd34-a0"}}'])
# found by make fuzz: an unhashable tag was a logged traceback per message
@example(msgs=['{"event": "media", "media": {"tag": []}, "start": {}, "stop": {}}'])
def test_mediajson_messages(
    msgs: list[str], engine: Engine, loop: asyncio.AbstractEventLoop, errors: ErrorLog
) -> None:
    endpoint = MediaJsonEndpoint(engine.rooms, token="t")
    conn = MjConnection(endpoint, _Ws(), ROOM)  # type: ignore[arg-type]
    before = len(errors.records)

    async def feed() -> None:
        for data in msgs:
            try:
                pending = endpoint._message(conn, data)
                if pending is not None:
                    await pending
                tally("mediajson", "handled")
            except CloseConnection as e:
                tally("mediajson", f"closed:{e.outcome}")
                return
        await asyncio.sleep(0)  # let the pipeline's tasks run

    loop.run_until_complete(feed())
    engine.rooms.rooms[ROOM.lower()].roster_known = False
    no_new_errors(errors, before)


# -- RTP --------------------------------------------------------------------------


def _rtp_packets() -> st.SearchStrategy[bytes]:
    real = st.builds(
        rtp_packet,
        st.integers(0, 2**32),
        st.sampled_from([0x5151, 0x6161, 1]),
        st.sampled_from(OPUS) | st.binary(max_size=200),
        level=st.none() | st.integers(0, 127),
        pt=st.sampled_from([111, 0, 96, 200]) | st.integers(0, 127),
    )

    def mutate(data: bytes, pos: int, value: int) -> bytes:
        if not data:
            return data
        i = pos % len(data)
        return data[:i] + bytes([value]) + data[i + 1 :]

    mutated = st.builds(mutate, real, st.integers(0, 10_000), st.integers(0, 255))
    truncated = st.builds(lambda d, n: d[: n % (len(d) + 1)], real, st.integers(0, 400))
    return real | mutated | truncated | st.binary(max_size=300)


@FUZZ
@given(packets=st.lists(_rtp_packets(), min_size=1, max_size=10))
@example(packets=[rtp_packet(i, 0x5151, p) for i, p in enumerate(OPUS)])
def test_rtp_packets(
    packets: list[bytes], engine: Engine, loop: asyncio.AbstractEventLoop, errors: ErrorLog
) -> None:
    rooms = engine.rooms
    if 0x5151 not in rooms.ssrcs:
        loop.run_until_complete(
            rooms.update_roster(ROOM, [Participant("rtp-alice", ssrcs=(0x5151,))])
        )
    ingest = RtpIngest(rooms)
    before = len(errors.records)

    async def feed() -> None:  # on the loop, as asyncio calls it
        for data in packets:
            try:
                pkt = parse_rtp(data)
                assert 0 <= pkt.ssrc < 2**32 and len(pkt.payload) <= len(data)
                tally("rtp_parse", "parsed")
            except RtpError as e:
                tally("rtp_parse", f"refused:{e.outcome}")
            ingest.datagram_received(data, ("127.0.0.1", 9))  # must never raise
        await asyncio.sleep(0)

    loop.run_until_complete(feed())
    rooms.rooms[ROOM.lower()].roster_known = False
    no_new_errors(errors, before)


# -- skynet (Jigasi) ------------------------------------------------------------------


def _skynet_messages() -> st.SearchStrategy[bytes]:
    pid = st.sampled_from(["ab12cd34", "e5f6a7b8", "null", ""]) | st.text(max_size=30)
    lang = st.sampled_from(["en-US", "de-DE", "null", "auto", ""]) | st.text(max_size=40)
    header = st.builds(
        lambda p, lg: f"{p}|{lg}".encode()[:HEADER_BYTES].ljust(HEADER_BYTES, b"\0"), pid, lang
    )
    raw_header = st.binary(min_size=HEADER_BYTES, max_size=HEADER_BYTES)
    pcm = st.binary(max_size=3300) | st.just(bytes(3200))
    return st.builds(lambda h, p: h + p, header | raw_header, pcm) | st.binary(max_size=100)


@FUZZ
@given(msgs=st.lists(_skynet_messages(), min_size=1, max_size=6))
@example(msgs=[b"ab12cd34|en-US".ljust(HEADER_BYTES, b"\0") + bytes(3200)])
def test_skynet_audio(
    msgs: list[bytes], engine: Engine, loop: asyncio.AbstractEventLoop, errors: ErrorLog
) -> None:
    endpoint = SkynetEndpoint(engine.rooms, token="t")
    conn = SkyConnection(endpoint, _Ws(), "jigasi-fuzz")  # type: ignore[arg-type]
    before = len(errors.records)

    async def feed() -> None:
        for data in msgs:
            try:
                await conn.on_audio(data)
                tally("skynet", "handled")
            except CloseConnection as e:
                tally("skynet", f"closed:{e.outcome}")
                return

    loop.run_until_complete(feed())
    no_new_errors(errors, before)


# -- Jigasi's ASAP JWT ----------------------------------------------------------------


@pytest.fixture(scope="module")
def jwt_setup(tmp_path_factory: pytest.TempPathFactory, engine: Engine) -> tuple[Any, Any]:
    import hashlib

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    keys = tmp_path_factory.mktemp("jwt-keys")
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (keys / f"{hashlib.sha256(b'jitsi/jigasi').hexdigest()}.pem").write_bytes(pem)
    endpoint = SkynetEndpoint(engine.rooms, token="t", jwt_keys_dir=keys, jwt_audience="jitsi")
    return endpoint, key


def _b64(obj: Any) -> str:
    raw = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


@FUZZ
@given(
    header=st.fixed_dictionaries(
        {},
        optional={
            "alg": st.sampled_from(["RS256", "HS256", "none", "ES256"]) | json_values,
            "kid": st.sampled_from(["jitsi/jigasi", "../etc/passwd", "x" * 300]) | json_values,
            "typ": json_values,
        },
    ),
    claims=st.dictionaries(
        st.sampled_from(["exp", "aud", "iss", "sub", "nbf", "iat"]), json_values, max_size=6
    ),
    # most tokens start from what Jigasi sends, so the accepting path is fuzzed too
    base=st.sampled_from([True, True, False]),
    exp_in=st.integers(-400, 4000),
    sig=st.binary(max_size=300),
    sign=st.booleans(),
    raw=st.none() | st.text(max_size=300),
)
@example(
    header={"kid": "jitsi/jigasi", "alg": 1.0},
    claims={},
    base=False,
    exp_in=0,
    sig=b"",
    sign=True,
    raw=None,
)
@example(header={}, claims={}, base=True, exp_in=300, sig=b"", sign=True, raw=None)
def test_jigasi_jwts(
    header: dict[str, Any],
    claims: dict[str, Any],
    base: bool,
    exp_in: int,
    sig: bytes,
    sign: bool,
    raw: str | None,
    jwt_setup: tuple[Any, Any],
    errors: ErrorLog,
) -> None:
    import jwt

    endpoint, key = jwt_setup
    if base:
        real = {"exp": int(time.time()) + exp_in, "aud": "jitsi", "iss": "jigasi"}
        claims = real | dict(list(claims.items())[: len(claims) // 2])
        header = {"kid": "jitsi/jigasi"} | header
    if raw is not None:
        token = raw
    elif sign:
        try:
            token = jwt.encode(claims, key, algorithm="RS256", headers=header)
        except Exception:  # PyJWT refuses to sign some headers (e.g. "alg": 1.0)
            token = f"{_b64(header)}.{_b64(claims)}.{_b64(sig)}"
    else:
        token = f"{_b64(header)}.{_b64(claims)}.{_b64(sig)}"
    before = len(errors.records)
    ok = endpoint._valid_jwt(token)
    tally("jigasi_jwt", "accepted" if ok else "refused")
    if ok:  # only a token we signed, for our audience, with a future expiry
        decoded = jwt.decode(token, key.public_key(), algorithms=["RS256"], audience="jitsi")
        assert decoded["exp"] > time.time() - 60
    no_new_errors(errors, before)


def test_a_real_jigasi_jwt_is_accepted(jwt_setup: tuple[Any, Any]) -> None:
    """The seed of the JWT fuzzer, checked: what Jigasi sends passes."""
    import jwt

    endpoint, key = jwt_setup
    token = jwt.encode(
        {"exp": int(time.time()) + 300, "aud": "jitsi", "iss": "jigasi", "sub": "jigasi"},
        key,
        algorithm="RS256",
        headers={"kid": "jitsi/jigasi"},
    )
    assert endpoint._valid_jwt(token)


# -- gRPC-Web framing and protobuf bodies -------------------------------------------


REAL_REQUEST = pb.StartRequest(
    room=ROOM,
    settings=pb.Settings(language="en-US", interim_results=True),
    requested_by="ab12cd34",
    meeting_id="7d3c1a2e-meeting",
).SerializeToString()


def _grpcweb_bodies() -> st.SearchStrategy[bytes]:
    frame = st.builds(
        lambda flag, payload: bytes([flag]) + struct.pack(">I", len(payload)) + payload,
        st.sampled_from([0, 0x80, 1, 0x81]) | st.integers(0, 255),
        st.just(REAL_REQUEST) | st.binary(max_size=200),
    )
    lying = st.builds(
        lambda flag, n, payload: bytes([flag]) + struct.pack(">I", n) + payload,
        st.integers(0, 255),
        st.integers(0, 2**32 - 1),
        st.binary(max_size=50),
    )
    return st.lists(frame | lying, max_size=4).map(b"".join) | st.binary(max_size=200)


@FUZZ
@given(body=_grpcweb_bodies(), text=st.booleans(), split=st.integers(0, 300))
@example(body=grpcweb.encode_frame(REAL_REQUEST), text=False, split=3)
@example(body=grpcweb.encode_frame(REAL_REQUEST), text=True, split=7)
def test_grpcweb_framing(body: bytes, text: bool, split: int) -> None:
    data = base64.b64encode(body) if text else body
    try:
        if text:
            dec = grpcweb.Base64StreamDecoder()
            data = dec.feed(data[:split]) + dec.feed(data[split:])
            dec.finish()
        frames = grpcweb.parse_frames(data, max_payload=4 * 1024 * 1024)
        # the incremental decoder agrees with the one-shot parser, split anywhere
        inc = grpcweb.FrameDecoder(4 * 1024 * 1024)
        got = inc.feed(data[:split]) + inc.feed(data[split:])
        inc.finish()
        assert got == frames
        tally("grpcweb_framing", "parsed")
    except ValueError as e:  # FrameTooLargeError is one
        tally("grpcweb_framing", f"refused:{type(e).__name__}")


def _start_requests() -> st.SearchStrategy[bytes]:
    """StartRequests with plausible and implausible settings, as the module sends them."""
    opt = st.none() | st.text(max_size=20)
    lang = st.sampled_from(["en-US", "de", "auto", "pt_br", "EN-us", ""]) | opt
    settings_ = st.builds(
        lambda lg, prov, tl, sil, ms, tm, im: pb.Settings(
            **{
                k: v
                for k, v in {
                    "language": lg,
                    "provider": prov,
                    "silence_duration_ms": sil,
                    "max_speech_caption_ms": ms,
                    "transcription_mode": tm,
                    "interim_results": im,
                }.items()
                if v is not None
            },
            translation_languages=tl,
        ),
        lang,
        st.sampled_from(["whisper", "WHISPER ", "azure", "x"]) | opt,
        st.lists(lang.filter(lambda x: x is not None), max_size=12),
        st.none() | st.integers(0, 2**32 - 1),
        st.none() | st.integers(0, 2**32 - 1),
        st.none() | st.integers(0, 6),
        st.none() | st.booleans(),
    )
    req = st.builds(
        lambda room, s, who, mid: pb.StartRequest(
            room=room, settings=s, requested_by=who, meeting_id=mid
        ).SerializeToString(),
        st.sampled_from([ROOM, ""]) | st.text(max_size=30),
        settings_,
        st.text(max_size=20),
        st.text(max_size=20),
    )

    def mutate(data: bytes, pos: int, value: int) -> bytes:
        i = pos % (len(data) + 1)
        return data[:i] + bytes([value]) + data[i + 1 :]

    return req | st.builds(mutate, req, st.integers(0, 500), st.integers(0, 255))


@FUZZ
@given(payload=st.binary(max_size=300) | _start_requests())
@example(payload=REAL_REQUEST)
def test_protobuf_request_bodies(payload: bytes) -> None:
    """What the gateway and the servicer do with a body: decode, then validate settings."""
    from google.protobuf.message import DecodeError

    try:
        req = pb.StartRequest.FromString(payload)
    except DecodeError:
        tally("protobuf", "refused:decode")
        return
    try:
        settings_from_proto(req.settings)
        tally("protobuf", "valid")
    except SettingError:
        tally("protobuf", "refused:setting")


@FUZZ
@given(
    payload=st.binary(max_size=400),
    timeout=st.text(max_size=12),
    message=st.text(max_size=3000),
)
@example(payload=b"", timeout="", message=" ")  # found by make fuzz: edge spaces were lost
def test_grpcweb_trailers_timeouts_and_messages(payload: bytes, timeout: str, message: str) -> None:
    trailers = grpcweb.parse_trailers(payload)
    assert all(k == k.lower() for k in trailers)
    with contextlib.suppress(ValueError):
        assert grpcweb.parse_grpc_timeout(timeout) >= 0
    # any status message, once encoded, fits a header and decodes to its prefix
    encoded = grpcweb.encode_trailers(grpc.StatusCode.INVALID_ARGUMENT, message)
    assert len(encoded) < 4096
    back = grpcweb.parse_trailers(encoded)["grpc-message"]
    decoded = grpcweb.decode_grpc_message(back)
    clipped = grpcweb.clip_grpc_message(message)
    assert decoded == clipped
    tally("grpcweb_trailers", "ok")


# -- the config file and the environment -------------------------------------------

EXAMPLE_CONFIG = Path(__file__).resolve().parents[1] / "docs" / "config.example.toml"
ENV_KEYS = [
    "CAPTIONS_SERVER_TOKEN",
    "CAPTIONS_SERVER_GRPC_LISTEN",
    "CAPTIONS_SERVER_HTTP_LISTEN",
    "CAPTIONS_STORE_STORE_DIR",
    "CAPTIONS_WHISPER_WORKERS",
    "CAPTIONS_WHISPER_WHISPER_MODEL",
    "CAPTIONS_DEFAULTS_LANGUAGE",
    "CAPTIONS_DEFAULTS_SILENCE_DURATION_MS",
    "CAPTIONS_DEFAULTS_TRANSLATION_LANGUAGES",
    "CAPTIONS_DEFAULTS_INTERIM_RESULTS",
    "CAPTIONS_LIMITS_MAX_ROOMS",
    "CAPTIONS_INGEST_RTP_LISTEN",
    "CAPTIONS_INGEST_MEDIAJSON_PATH",
    "CAPTIONS_XMPP_ENABLED",
    "CAPTIONS_XMPP_PORT",
    "CAPTIONS_NOSUCH_KEY",
]
toml_scalar = (
    st.integers(-(2**65), 2**65)
    | st.booleans()
    | st.text(max_size=30)
    | st.floats(allow_nan=False)
    | st.lists(st.text(max_size=8), max_size=3)
)


def _toml(doc: dict[str, dict[str, Any]]) -> str:
    lines = []
    for section, keys in doc.items():
        lines.append(f"[{json.dumps(section)}]")
        for key, value in keys.items():
            lines.append(f"{json.dumps(key)} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v) if v == v and abs(v) != float("inf") else "0.0"
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(v) if isinstance(v, str) else str(v)


SECTIONS = ["server", "store", "whisper", "defaults", "limits", "ingest", "xmpp", "nope"]
KEYS = ["token", "grpc_listen", "workers", "language", "max_rooms", "rtp_listen", "port", "x"]


@FUZZ
@given(
    env=st.dictionaries(st.sampled_from(ENV_KEYS), st.text(max_size=40), max_size=6),
    doc=st.dictionaries(
        st.sampled_from(SECTIONS),
        st.dictionaries(st.sampled_from(KEYS), toml_scalar, max_size=4),
        max_size=4,
    ),
    garbage=st.none() | st.text(max_size=200),
)
@example(env={}, doc={}, garbage=EXAMPLE_CONFIG.read_text(encoding="utf-8"))
@example(
    env={"CAPTIONS_LIMITS_MAX_ROOMS": "10", "CAPTIONS_SERVER_TOKEN": "t"}, doc={}, garbage=None
)
def test_config_file_and_environment(
    env: dict[str, str], doc: dict[str, dict[str, Any]], garbage: str | None, tmp_path: Path
) -> None:
    path = tmp_path / "sidecar.toml"
    path.write_text(garbage if garbage is not None else _toml(doc), encoding="utf-8")
    env = {k: v.replace("\0", "") for k, v in env.items()}
    try:
        load_config(path, env={"CAPTIONS_STORE_STORE_DIR": str(tmp_path / "s")} | env)
        tally("config", "loaded")
    except ConfigError as e:
        assert str(e) and len(str(e)) < 2000
        tally("config", "refused")


def test_the_example_config_is_the_config_fuzzers_seed() -> None:
    """The seed is a config that loads: the fuzzer starts from something valid."""
    cfg = load_config(EXAMPLE_CONFIG, env={})
    assert cfg.limits.max_rooms > 0


# -- room-level inputs of the control API ------------------------------------------


@FUZZ
@given(
    room=st.text(max_size=300) | st.sampled_from([ROOM, "Room@conference.x", "a\u202eb"]),
    pid=st.text(max_size=80),
    ssrcs=st.lists(st.integers(0, 2**32 - 1), max_size=20),
)
def test_room_and_roster_inputs(
    room: str,
    pid: str,
    ssrcs: list[int],
    engine: Engine,
    loop: asyncio.AbstractEventLoop,
    errors: ErrorLog,
) -> None:
    rooms = engine.rooms
    before = len(errors.records)
    name = f"{room}-x" if room.lower() == ROOM.lower() else room

    async def go() -> None:
        try:
            await rooms.update_roster(name, [Participant(pid, ssrcs=tuple(ssrcs))])
            tally("roster", "applied")
            await rooms.end_room(name)
        except ServiceError as e:
            assert len(str(e)) < 1200
            tally("roster", f"refused:{e.code}")

    loop.run_until_complete(go())
    no_new_errors(errors, before)
