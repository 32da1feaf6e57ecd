"""The Prosody module's Lua codec against Python's protobuf and the real gateway.

``prosody-module/mod_captions/captions_codec.lib.lua`` encodes the control
API's requests and decodes its responses in pure Lua 5.4. These tests run it
with ``lua5.4`` through ``prosody-module/spec/codec_driver.lua`` and compare:

* the bytes it encodes with ``SerializeToString()`` of the same message;
* what it decodes from Python-serialised messages with the Python message,
  field by field, presence included;
* its behaviour on mutated and random bytes with Python's parser's;
* a whole call made by a real Prosody (``module:require`` + ``net.http``)
  through the real gRPC-Web gateway.

They also run the busted specs and luacheck, so that CI runs them.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import shutil
import struct
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from aiohttp import web
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message
from google.protobuf.unknown_fields import UnknownFieldSet

from sidecar.api.grpcweb import GrpcWebGateway
from sidecar.proto.captions.v1 import captions_pb2 as pb
from sidecar.proto.captions.v1 import captions_pb2_grpc as pb_grpc
from tests.prosody import make_prosody

ROOT = Path(__file__).resolve().parent.parent
MODULE_DIR = ROOT / "prosody-module"
CODEC = MODULE_DIR / "mod_captions" / "captions_codec.lib.lua"
DRIVER = MODULE_DIR / "spec" / "codec_driver.lua"
LUA = shutil.which("lua5.4")

pytestmark = pytest.mark.skipif(
    LUA is None, reason="lua5.4 is not installed (apt-get install lua5.4)"
)

MESSAGES: dict[str, type[Message]] = {
    name: getattr(pb, name)
    for name in (
        "Settings",
        "StartRequest",
        "StopRequest",
        "UpdateSettingsRequest",
        "Participant",
        "UpdateRosterRequest",
        "RoomRequest",
        "RoomStatus",
        "ListRoomsRequest",
        "ListRoomsResponse",
        "CaptionEvent",
    )
}


# -- talking to the driver ---------------------------------------------------------


def to_lua(value: Any) -> str:
    """A Lua expression for a JSON-like Python value (bytes and str as Lua strings)."""
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        if value == -(2**63):
            return "(-9223372036854775807 - 1)"  # no literal for it: integer arithmetic
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "(0/0)"
        if math.isinf(value):
            return "(1/0)" if value > 0 else "(-1/0)"
        return repr(value)  # always has a "." or an exponent: a Lua float
    if isinstance(value, str | bytes):
        raw = value.encode("utf-8") if isinstance(value, str) else value
        return '"' + "".join(f"\\{b:03d}" for b in raw) + '"'
    if isinstance(value, list | tuple):
        return "{" + ", ".join(to_lua(v) for v in value) + "}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"[{to_lua(k)}] = {to_lua(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} as Lua")


def call(*args: Any) -> str:
    """One driver call; nil arguments keep their place."""
    return "{" + ", ".join(to_lua(a) for a in args) + f", n = {len(args)}}}"


def run_driver(calls: list[str]) -> list[dict[str, Any]]:
    assert LUA is not None
    chunk = "return {\n" + ",\n".join(calls) + "\n}\n"
    proc = subprocess.run(
        [LUA, str(DRIVER)],
        input=chunk.encode("utf-8"),
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    lines = proc.stdout.decode("utf-8").splitlines()
    assert len(lines) == len(calls), proc.stdout[-2000:]
    return [json.loads(line) for line in lines]


def lua_encode(name: str, value: dict[str, Any]) -> dict[str, Any]:
    return run_driver([call("encode", name, value)])[0]


# -- the Lua view of a Python message ----------------------------------------------------

_UINT64 = {FieldDescriptor.TYPE_UINT64}


def _scalar_to_lua(field: FieldDescriptor, value: Any) -> Any:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return pb_to_lua(value)
    if field.type == FieldDescriptor.TYPE_ENUM:
        known = field.enum_type.values_by_number.get(value)
        return known.name if known is not None else value
    if field.type in _UINT64 and value >= 2**63:
        return value - 2**64  # the Lua integer with the same 64 bits
    if field.type == FieldDescriptor.TYPE_DOUBLE:
        return _double(value)
    return value


def _double(value: float) -> tuple[str, bytes]:
    """A double compared bit for bit (so -0.0 != 0.0), any NaN as one value.

    The driver's JSON cannot carry a NaN's payload bits, only that it is a NaN.
    """
    if math.isnan(value):
        return ("double", b"nan")
    return ("double", struct.pack("<d", value))


def pb_to_lua(msg: Message) -> dict[str, Any]:
    """What the Lua codec should decode ``msg`` to: presence-aware, defaults filled."""
    out: dict[str, Any] = {}
    for field in msg.DESCRIPTOR.fields:
        value = getattr(msg, field.name)
        if field.is_repeated:
            out[field.name] = [_scalar_to_lua(field, v) for v in value]
        elif field.has_presence and not msg.HasField(field.name):
            continue
        else:
            out[field.name] = _scalar_to_lua(field, value)
    return out


def normalize(got: Any, desc: Descriptor) -> Any:
    """The driver's JSON of a decoded message in the shape of :func:`pb_to_lua`."""
    assert isinstance(got, dict), got
    out: dict[str, Any] = {}
    for key, value in got.items():
        field = desc.fields_by_name.get(key)
        assert field is not None, f"Lua decoded an unknown field {key!r} of {desc.name}"

        def one(v: Any, field: FieldDescriptor = field) -> Any:
            if field.type == FieldDescriptor.TYPE_MESSAGE:
                return normalize({} if v == [] else v, field.message_type)
            if field.type == FieldDescriptor.TYPE_DOUBLE:
                return _double(float(v))
            return v

        if field.is_repeated:
            out[key] = [one(v) for v in ([] if value == {} else value)]
        else:
            out[key] = one(value)
    return out


def lua_decode_all(items: list[tuple[str, bytes]]) -> list[dict[str, Any]]:
    return run_driver([call("decode", name, data.hex()) for name, data in items])


# -- encoding: Lua bytes == Python bytes ---------------------------------------------------

FULL_SETTINGS = {
    "language": "de",
    "transcription_mode": "MODE_AVAILABLE",
    "captions_mode": "MODE_AUTO_ON",
    "trigger": "TRIGGER_AUTOMATIC_2ND_PARTICIPANT",
    "max_speech_caption_ms": 10000,
    "silence_duration_ms": 300,
    "interim_results": True,
    "provider": "azure",
    "translation_languages": ["en", "fr", "pt-BR"],
}

# (id, message, the Lua table, the same for ParseDict when it differs)
ENCODE_CASES: list[tuple[str, str, dict[str, Any], dict[str, Any] | None]] = [
    (
        "start-all-fields",
        "StartRequest",
        {
            "room": "lobby@conference.meet.example.com",
            "settings": FULL_SETTINGS,
            "requested_by": "a1b2c3d4",
            "trigger": "TRIGGER_AUTOMATIC",
            "meeting_id": "3f1c4a6e-8d2b-4f0a-9c1e-5b7d2e9a0c11",
        },
        None,
    ),
    ("start-room-only", "StartRequest", {"room": "r"}, None),
    ("start-empty", "StartRequest", {}, None),
    ("start-empty-settings", "StartRequest", {"room": "r", "settings": {}}, None),
    (
        "start-defaults-spelled-out",
        "StartRequest",
        {"room": "", "requested_by": "", "trigger": "TRIGGER_UNSPECIFIED", "meeting_id": ""},
        None,
    ),
    (
        "start-optional-zeros",
        "StartRequest",
        {
            "room": "r",
            "settings": {
                "language": "",
                "transcription_mode": "MODE_UNSPECIFIED",
                "captions_mode": "MODE_UNSPECIFIED",
                "trigger": "TRIGGER_UNSPECIFIED",
                "max_speech_caption_ms": 0,
                "silence_duration_ms": 0,
                "interim_results": False,
                "provider": "",
                "translation_languages": [],
            },
        },
        None,
    ),
    (
        "start-some-optional",
        "StartRequest",
        {"room": "r", "settings": {"language": "fr", "interim_results": True}},
        None,
    ),
    (
        "start-unicode",
        "StartRequest",
        {"room": "café-räum@conference.example.com", "requested_by": "Zoë 🎙️"},
        None,
    ),
    ("start-cjk", "StartRequest", {"room": "会議室@conference.example.com"}, None),
    (
        "start-enum-number",
        "StartRequest",
        {"trigger": 3},
        {"trigger": "TRIGGER_AUTOMATIC_2ND_PARTICIPANT"},
    ),
    ("start-open-enum", "StartRequest", {"trigger": 7}, None),
    (
        "start-float-integers",
        "StartRequest",
        {"settings": {"max_speech_caption_ms": 9000.0, "silence_duration_ms": 700.0}},
        {"settings": {"max_speech_caption_ms": 9000, "silence_duration_ms": 700}},
    ),
    ("settings-all", "Settings", FULL_SETTINGS, None),
    ("settings-empty", "Settings", {}, None),
    (
        "settings-max",
        "Settings",
        {"max_speech_caption_ms": 4294967295, "silence_duration_ms": 128},
        None,
    ),
    ("settings-languages-only", "Settings", {"translation_languages": ["", "x", "ü"]}, None),
    ("stop", "StopRequest", {"room": "r", "reason": "STOP_REASON_NO_REQUESTERS"}, None),
    ("stop-user", "StopRequest", {"room": "r", "reason": "STOP_REASON_USER"}, None),
    ("stop-unspecified", "StopRequest", {"room": "r", "reason": "STOP_REASON_UNSPECIFIED"}, None),
    (
        "update-settings",
        "UpdateSettingsRequest",
        {"room": "r", "settings": {"captions_mode": "MODE_AUTO_ON", "silence_duration_ms": 700}},
        None,
    ),
    ("update-settings-no-settings", "UpdateSettingsRequest", {"room": "r"}, None),
    (
        "roster-full",
        "UpdateRosterRequest",
        {
            "room": "r@conference.example.com",
            "participants": [
                {
                    "id": "a1b2c3d4",
                    "name": "Zoë Ünïcode",
                    "avatar_url": "https://example.com/a.png?s=64&x=%20",
                    "ssrcs": [0, 1, 127, 128, 16383, 16384, 2147483648, 4294967295],
                },
                {},
                {"id": "e2", "ssrcs": []},
                {"id": "e3", "name": "", "avatar_url": "", "ssrcs": [4294967295]},
            ],
            "replace": True,
            "left": ["x1", "", "会"],
        },
        None,
    ),
    (
        "roster-left-only",
        "UpdateRosterRequest",
        {"room": "r", "replace": False, "left": ["e9"]},
        None,
    ),
    ("roster-empty-lists", "UpdateRosterRequest", {"participants": [], "left": []}, None),
    ("participant", "Participant", {"id": "p", "ssrcs": [3000000000, 5]}, None),
    ("room", "RoomRequest", {"room": "r"}, None),
    ("room-empty", "RoomRequest", {}, None),
    ("list-rooms", "ListRoomsRequest", {}, None),
    (
        "room-status",
        "RoomStatus",
        {
            "room": "r",
            "transcribing": True,
            "captioning": False,
            "effective": FULL_SETTINGS,
            "transcript_id": "t",
            "participants": 4294967295,
            "active_speakers": 1,
            "captions_sent": 2**63 - 1,
            "trigger": "TRIGGER_MANUAL",
        },
        None,
    ),
    (
        "list-rooms-response",
        "ListRoomsResponse",
        {"rooms": [{"room": "a"}, {}, {"room": "c", "effective": {}}]},
        None,
    ),
    (
        "caption-event",
        "CaptionEvent",
        {
            "room": "r",
            "participant_id": "p",
            "text": "hällo",
            "is_interim": True,
            "stability": 0.875,
            "start_time_ms": 1_700_000_000_123,
            "end_time_ms": -1,
            "timestamp_ms": -(2**63),
            "confidence": -0.0,
        },
        None,
    ),
    (
        "caption-event-extremes",
        "CaptionEvent",
        {"stability": 1e308, "confidence": 5e-324, "end_time_ms": 2**63 - 1},
        None,
    ),
]


ENCODE_BY_ID = {c[0]: c[2] for c in ENCODE_CASES}


def _parse_dict(name: str, value: dict[str, Any]) -> Message:
    return json_format.ParseDict(value, MESSAGES[name]())


@pytest.mark.parametrize(
    ("name", "lua_value", "py_value"),
    [pytest.param(c[1], c[2], c[3], id=c[0]) for c in ENCODE_CASES],
)
def test_lua_encoding_matches_python_bytes(
    name: str, lua_value: dict[str, Any], py_value: dict[str, Any] | None
) -> None:
    msg = _parse_dict(name, lua_value if py_value is None else py_value)
    got = lua_encode(name, lua_value)
    assert got["ok"], got
    assert got["value"] == msg.SerializeToString().hex()
    # and what Python reads back is the message meant
    assert MESSAGES[name].FromString(bytes.fromhex(got["value"])) == msg


def test_every_encode_case_runs_in_one_process() -> None:
    """The batch path of the driver, and a guard that the cases cover every message."""
    results = run_driver([call("encode", c[1], c[2]) for c in ENCODE_CASES])
    assert all(r["ok"] for r in results), results
    assert {c[1] for c in ENCODE_CASES} == set(MESSAGES)


def test_random_messages_encode_like_python() -> None:
    rng = random.Random(20240601)
    cases: list[tuple[str, Message]] = []
    for _ in range(150):
        name = rng.choice(
            ["StartRequest", "UpdateSettingsRequest", "UpdateRosterRequest", "Settings"]
        )
        cases.append((name, random_message(MESSAGES[name], rng)))
    results = run_driver([call("encode", name, lua_table_of(msg)) for name, msg in cases])
    for (name, msg), got in zip(cases, results, strict=True):
        assert got["ok"], (name, msg, got)
        assert got["value"] == msg.SerializeToString().hex(), (name, msg)


# Both sides refuse these (Lua raises, Python's ParseDict raises).
REFUSED = [
    (
        "uint32-negative",
        "Settings",
        {"max_speech_caption_ms": -1},
        "Settings.max_speech_caption_ms",
    ),
    ("uint32-too-big", "Participant", {"ssrcs": [4294967296]}, "Participant.ssrcs[1]"),
    ("uint64-negative", "RoomStatus", {"captions_sent": -1}, "RoomStatus.captions_sent"),
    ("unknown-enum-name", "Settings", {"trigger": "TRIGGER_SOMETIMES"}, "Settings.trigger"),
    ("unknown-field", "StartRequest", {"rooom": "r"}, '"rooom"'),
    ("string-for-bool", "Settings", {"interim_results": "yes"}, "Settings.interim_results"),
    ("number-for-string", "RoomRequest", {"room": 5}, "RoomRequest.room"),
    (
        "fraction-for-integer",
        "Settings",
        {"silence_duration_ms": 1.5},
        "Settings.silence_duration_ms",
    ),
]


@pytest.mark.parametrize(
    ("name", "value", "field"), [pytest.param(*c[1:], id=c[0]) for c in REFUSED]
)
def test_lua_refuses_what_python_refuses(name: str, value: dict[str, Any], field: str) -> None:
    with pytest.raises(json_format.ParseError):
        _parse_dict(name, value)
    got = lua_encode(name, value)
    assert not got["ok"]
    assert field in got["error"], got["error"]


def test_invalid_utf8_is_refused_on_both_sides() -> None:
    got = lua_encode("RoomRequest", {"room": b"caf\xe9"})  # type: ignore[dict-item]
    assert not got["ok"] and "RoomRequest.room" in got["error"] and "UTF-8" in got["error"]
    raw = b"\x0a\x04caf\xe9"
    with pytest.raises(DecodeError):
        pb.RoomRequest.FromString(raw)
    dec = lua_decode_all([("RoomRequest", raw)])[0]
    assert not dec["ok"] and "UTF-8" in dec["error"]


# -- decoding: Python bytes -> Lua tables ---------------------------------------------------


def _full_status(**kw: Any) -> pb.RoomStatus:
    base: dict[str, Any] = {
        "room": "lobby@conference.meet.example.com",
        "transcribing": True,
        "captioning": True,
        "effective": pb.Settings(**{**FULL_SETTINGS, "interim_results": False}),
        "transcript_id": "2024-06-01T10-00-00Z-lobby",
        "participants": 12,
        "active_speakers": 3,
        "captions_sent": 2**40 + 5,
        "trigger": pb.TRIGGER_AUTOMATIC,
    }
    base.update(kw)
    return pb.RoomStatus(**base)


def _settings_zeros() -> pb.Settings:
    return pb.Settings(
        language="",
        transcription_mode=pb.MODE_UNSPECIFIED,
        captions_mode=pb.MODE_UNSPECIFIED,
        trigger=pb.TRIGGER_UNSPECIFIED,
        max_speech_caption_ms=0,
        silence_duration_ms=0,
        interim_results=False,
        provider="",
    )


DECODE_CASES: list[tuple[str, Message]] = [
    ("status-full", _full_status()),
    ("status-default", pb.RoomStatus()),
    ("status-empty-effective", pb.RoomStatus(room="r", effective=pb.Settings())),
    ("status-effective-zeros", pb.RoomStatus(room="r", effective=_settings_zeros())),
    (
        "status-effective-partial",
        pb.RoomStatus(room="r", effective=pb.Settings(language="en", max_speech_caption_ms=9000)),
    ),
    ("status-unicode", _full_status(room="café-räum-会議室@conference.example.com")),
    ("status-2^32", pb.RoomStatus(captions_sent=2**32, participants=4294967295)),
    ("status-2^63-1", pb.RoomStatus(captions_sent=2**63 - 1)),
    ("status-2^64-1", pb.RoomStatus(captions_sent=2**64 - 1)),
    ("status-unknown-trigger", pb.RoomStatus(trigger=9)),  # type: ignore[arg-type]
    ("rooms-empty", pb.ListRoomsResponse()),
    (
        "rooms-three",
        pb.ListRoomsResponse(
            rooms=[
                _full_status(),
                pb.RoomStatus(),
                pb.RoomStatus(room="b", effective=pb.Settings()),
            ]
        ),
    ),
    (
        "participant",
        pb.Participant(id="e", name="N", avatar_url="u", ssrcs=[0, 1, 128, 4294967295]),
    ),
    (
        "caption-event",
        pb.CaptionEvent(
            room="r",
            participant_id="p",
            participant_name="Zoë",
            avatar_url="a",
            message_id="m",
            text="hello 🌍",
            is_interim=True,
            stability=0.87,
            language="en",
            start_time_ms=1_700_000_000_000,
            end_time_ms=-1,
            timestamp_ms=-(2**63),
            confidence=float("nan"),
        ),
    ),
    ("caption-event-inf", pb.CaptionEvent(stability=float("inf"), confidence=-0.0)),
    ("start-request", _parse_dict("StartRequest", ENCODE_BY_ID["start-all-fields"])),
    ("roster", _parse_dict("UpdateRosterRequest", ENCODE_BY_ID["roster-full"])),
]


@pytest.mark.parametrize("msg", [pytest.param(m, id=i) for i, m in DECODE_CASES])
def test_lua_decodes_python_messages_field_by_field(msg: Message) -> None:
    name = msg.DESCRIPTOR.name
    got = lua_decode_all([(name, msg.SerializeToString())])[0]
    assert got["ok"], got
    assert normalize(got["value"], msg.DESCRIPTOR) == pb_to_lua(msg)


def _unknown_fields() -> bytes:
    """One unknown field of each wire type (fields 100..104), a group with a nested group."""
    return bytes.fromhex(
        "a006ffffffffffffffffff01"  # 100: varint (10 bytes)
        "a9060102030405060708"  # 101: fixed64
        "b20603616263"  # 102: length-delimited
        "bd0601020304"  # 103: fixed32
        "c3060801120361626313200514c406"  # 104: group { 1: 1, 2: "abc", group 2 { 4: 5 } }
    )


def test_unknown_fields_are_skipped_like_python() -> None:
    unknown = _unknown_fields()
    status = _full_status()
    settings = status.effective.SerializeToString() + unknown
    nested = pb.RoomStatus(room=status.room).SerializeToString()
    nested += b"\x22" + bytes([len(settings)]) + settings
    variants = [
        unknown + status.SerializeToString(),
        status.SerializeToString() + unknown,
        pb.RoomStatus(room="r").SerializeToString()
        + unknown
        + pb.RoomStatus(participants=3).SerializeToString(),
        nested,
    ]
    for data in variants:
        py = pb.RoomStatus.FromString(data)
        # Python kept them (so it did read them as unknown fields)
        assert len(UnknownFieldSet(py)) or len(UnknownFieldSet(py.effective))
        got = lua_decode_all([("RoomStatus", data)])[0]
        assert got["ok"], got
        assert normalize(got["value"], pb.RoomStatus.DESCRIPTOR) == pb_to_lua(py)


def test_unpacked_and_mixed_repeated_uint32_like_python() -> None:
    cases = [
        bytes.fromhex("2001 20ffffffff0f".replace(" ", "")),  # unpacked
        bytes.fromhex("2005 2202 0607 2008".replace(" ", "")),  # mixed
        bytes.fromhex("2200"),  # empty packed
    ]
    results = lua_decode_all([("Participant", c) for c in cases])
    for data, got in zip(cases, results, strict=True):
        assert got["ok"], got
        py = pb.Participant.FromString(data)
        assert normalize(got["value"], pb.Participant.DESCRIPTOR) == pb_to_lua(py)


def test_repeated_occurrences_merge_like_python() -> None:
    data = (
        pb.RoomStatus(room="a", effective=pb.Settings(language="en")).SerializeToString()
        + pb.RoomStatus(room="b", effective=pb.Settings(provider="azure")).SerializeToString()
        + pb.ListRoomsResponse().SerializeToString()
    )
    got = lua_decode_all([("RoomStatus", data)])[0]
    py = pb.RoomStatus.FromString(data)
    assert py.effective.language == "en" and py.effective.provider == "azure"
    assert normalize(got["value"], pb.RoomStatus.DESCRIPTOR) == pb_to_lua(py)


# -- differential fuzzing: the same verdict as Python's parser -----------------------------


def random_message(cls: type[Message], rng: random.Random, depth: int = 0) -> Message:
    msg = cls()
    words = ["", "a", "room@conference.example.com", "Zoë", "会議室", "🎙️", "x" * 200]
    for field in cls.DESCRIPTOR.fields:
        if rng.random() < 0.35:
            continue
        count = rng.choice([0, 1, 2, 5]) if field.is_repeated else 1

        def value(field: FieldDescriptor = field) -> Any:
            t = field.type
            if t == FieldDescriptor.TYPE_STRING:
                return rng.choice(words)
            if t == FieldDescriptor.TYPE_BOOL:
                return rng.random() < 0.5
            if t == FieldDescriptor.TYPE_UINT32:
                return rng.choice([0, 1, 127, 128, 2**31, 2**32 - 1, rng.randrange(2**32)])
            if t == FieldDescriptor.TYPE_UINT64:
                return rng.choice([0, 2**32, 2**63 - 1, 2**64 - 1, rng.randrange(2**64)])
            if t == FieldDescriptor.TYPE_INT64:
                return rng.choice([0, -1, -(2**63), 2**63 - 1, rng.randrange(-(2**63), 2**63)])
            if t == FieldDescriptor.TYPE_DOUBLE:
                return rng.choice([0.0, -0.0, 0.5, 1e-300, float("inf"), rng.uniform(-1e9, 1e9)])
            if t == FieldDescriptor.TYPE_ENUM:
                return rng.choice([v.number for v in field.enum_type.values])
            raise AssertionError(field.type)

        if field.type == FieldDescriptor.TYPE_MESSAGE:
            sub_cls = type(getattr(cls(), field.name).add()) if field.is_repeated else None
            for _ in range(count):
                if field.is_repeated:
                    assert sub_cls is not None
                    getattr(msg, field.name).add().CopyFrom(random_message(sub_cls, rng, depth + 1))
                else:
                    sub = random_message(type(getattr(msg, field.name)), rng, depth + 1)
                    getattr(msg, field.name).CopyFrom(sub)
        elif field.is_repeated:
            getattr(msg, field.name).extend(value() for _ in range(count))
        else:
            setattr(msg, field.name, value())
    return msg


def lua_table_of(msg: Message) -> dict[str, Any]:
    """The Lua table that should encode to ``msg`` (enum names, nested tables)."""
    out: dict[str, Any] = {}
    for field, value in msg.ListFields():

        def one(v: Any, field: FieldDescriptor = field) -> Any:
            if field.type == FieldDescriptor.TYPE_MESSAGE:
                return lua_table_of(v)
            if field.type == FieldDescriptor.TYPE_ENUM:
                return field.enum_type.values_by_number[v].name
            return v

        out[field.name] = [one(v) for v in value] if field.is_repeated else one(value)
    return out


def _mutations(data: bytes, rng: random.Random) -> list[bytes]:
    out = [data]
    if data:
        out.append(data[: rng.randrange(len(data))])  # truncated
        flipped = bytearray(data)
        flipped[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        out.append(bytes(flipped))
        b = bytearray(data)
        b[rng.randrange(len(data))] = rng.randrange(256)
        out.append(bytes(b))
        pos = rng.randrange(len(data) + 1)
        out.append(
            data[:pos] + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 6))) + data[pos:]
        )
    out.append(bytes(rng.randrange(256) for _ in range(rng.randrange(0, 30))))
    return out


def test_differential_fuzz_against_python_parser() -> None:
    rng = random.Random(7)
    names = ["RoomStatus", "ListRoomsResponse", "CaptionEvent", "Participant", "StartRequest"]
    items: list[tuple[str, bytes]] = []
    for _ in range(250):
        name = rng.choice(names)
        msg = random_message(MESSAGES[name], rng)
        items.extend((name, m) for m in _mutations(msg.SerializeToString(), rng))
    results = lua_decode_all(items)
    disagreements = []
    for (name, data), got in zip(items, results, strict=True):
        try:
            py: Message | None = MESSAGES[name].FromString(data)
        except DecodeError:
            py = None
        if py is None:
            if got["ok"]:
                disagreements.append((name, data.hex(), "Python refuses, Lua accepts", got))
        elif not got["ok"]:
            disagreements.append((name, data.hex(), "Python accepts, Lua refuses", got["error"]))
        elif normalize(got["value"], py.DESCRIPTOR) != pb_to_lua(py):
            disagreements.append((name, data.hex(), "different values", got["value"]))
    assert not disagreements, disagreements[:5]


# -- gRPC-Web: requests and responses through the driver ------------------------------------


def test_request_frames_the_encoded_message() -> None:
    value = ENCODE_BY_ID["start-all-fields"]
    got = run_driver(
        [
            call(
                "request",
                "StartTranscription",
                "StartRequest",
                value,
                {"token": "t0k", "timeout": 2.5},
            )
        ]
    )[0]
    assert got["ok"], got
    req = got["value"]
    assert req["path"] == "/captions.v1.Captions/StartTranscription"
    payload = _parse_dict("StartRequest", value).SerializeToString()
    assert bytes.fromhex(req["body"]) == struct.pack(">BI", 0, len(payload)) + payload
    assert req["headers"] == {
        "Content-Type": "application/grpc-web+proto",
        "Accept": "application/grpc-web+proto",
        "X-Grpc-Web": "1",
        "Authorization": "Bearer t0k",
        "Grpc-Timeout": "2500m",
    }


# -- against the real gateway --------------------------------------------------------------

TOKEN = "lua-s3cret"
UNICODE_ERROR = "no such room: «missing» 100% ✓"


class RecordingCaptions(pb_grpc.CaptionsServicer):
    """Answers a few methods and keeps the requests it got."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, Message]] = []

    async def _check(self, name: str, request: Message, context: Any) -> None:
        self.requests.append((name, request))
        if dict(context.invocation_metadata()).get("authorization") != f"Bearer {TOKEN}":
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong token")

    async def StartCaptions(self, request: pb.StartRequest, context: Any) -> pb.RoomStatus:
        await self._check("StartCaptions", request, context)
        return pb.RoomStatus(
            room=request.room,
            captioning=True,
            effective=request.settings,
            participants=2,
            captions_sent=2**40,
            trigger=request.trigger,
        )

    async def UpdateRoster(self, request: pb.UpdateRosterRequest, context: Any) -> pb.RoomStatus:
        await self._check("UpdateRoster", request, context)
        return pb.RoomStatus(room=request.room, participants=len(request.participants))

    async def GetRoomStatus(self, request: pb.RoomRequest, context: Any) -> pb.RoomStatus:
        await self._check("GetRoomStatus", request, context)
        await context.abort(grpc.StatusCode.NOT_FOUND, UNICODE_ERROR)
        raise AssertionError("unreachable")

    async def ListRooms(self, request: pb.ListRoomsRequest, context: Any) -> pb.ListRoomsResponse:
        await self._check("ListRooms", request, context)
        return pb.ListRoomsResponse(rooms=[pb.RoomStatus(room="a"), pb.RoomStatus(room="b")])


async def _gateway(servicer: object) -> tuple[web.AppRunner, int]:
    app = web.Application()
    GrpcWebGateway(servicer, pb.DESCRIPTOR.services_by_name["Captions"]).add_routes(app)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    assert runner.addresses
    return runner, int(runner.addresses[0][1])


@pytest.fixture
async def gateway() -> AsyncIterator[tuple[RecordingCaptions, str]]:
    servicer = RecordingCaptions()
    runner, port = await _gateway(servicer)
    try:
        yield servicer, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


START = {
    "room": "lobby@conference.localhost",
    "settings": {
        "language": "de",
        "captions_mode": "MODE_AUTO_ON",
        "max_speech_caption_ms": 0,
        "interim_results": False,
        "translation_languages": ["en", "fr"],
    },
    "requested_by": "a1b2c3d4",
    "trigger": "TRIGGER_MANUAL",
    "meeting_id": "m-1",
}
ROSTER = {
    "room": "lobby@conference.localhost",
    "participants": [
        {"id": "a1", "name": "Zoë", "avatar_url": "https://x/a.png", "ssrcs": [1, 4294967295]},
        {"id": "b2"},
    ],
    "replace": True,
    "left": ["c3"],
}
CALLS: list[tuple[str, dict[str, Any]]] = [
    ("StartCaptions", START),
    ("UpdateRoster", ROSTER),
    ("GetRoomStatus", {"room": "missing"}),
    ("ListRooms", {}),
]


def _check_call_results(results: dict[str, dict[str, Any]], servicer: RecordingCaptions) -> None:
    """What the gateway got and what the codec made of its answers."""
    got = {name: req for name, req in servicer.requests}
    assert got["StartCaptions"] == _parse_dict("StartRequest", START)
    assert got["StartCaptions"].settings.HasField("interim_results")  # presence crossed the wire
    assert got["UpdateRoster"] == _parse_dict("UpdateRosterRequest", ROSTER)
    assert got["ListRooms"] == pb.ListRoomsRequest()

    start = results["StartCaptions"]
    assert start["ok"] is True and start["status"] == 0 and start["status_name"] == "OK"
    resp = start["response"]
    assert resp["room"] == START["room"] and resp["captioning"] is True
    assert resp["captions_sent"] == 2**40 and resp["participants"] == 2
    assert resp["trigger"] == "TRIGGER_MANUAL"
    eff = resp["effective"]
    assert eff["language"] == "de" and eff["captions_mode"] == "MODE_AUTO_ON"
    assert eff["max_speech_caption_ms"] == 0 and eff["interim_results"] is False
    assert "provider" not in eff and "trigger" not in eff
    assert eff["translation_languages"] == ["en", "fr"]

    roster = results["UpdateRoster"]
    assert roster["ok"] is True and roster["response"]["participants"] == 2

    missing = results["GetRoomStatus"]
    assert missing["ok"] is False
    assert missing["status"] == 5 and missing["status_name"] == "NOT_FOUND"
    assert missing["status_message"] == UNICODE_ERROR
    assert "response" not in missing

    rooms = results["ListRooms"]
    assert rooms["ok"] is True
    assert [r["room"] for r in rooms["response"]["rooms"]] == ["a", "b"]


def _http_post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


async def test_codec_through_the_real_gateway(gateway: tuple[RecordingCaptions, str]) -> None:
    """Requests built by the Lua codec, answered by the gateway, read by the codec."""
    servicer, url = gateway
    reqs = run_driver(
        [call("request", m, None, v, {"token": TOKEN, "timeout": 10}) for m, v in CALLS]
    )
    answers = []
    for got in reqs:
        assert got["ok"], got
        r = got["value"]
        answers.append(
            await asyncio.to_thread(
                _http_post, url + r["path"], bytes.fromhex(r["body"]), r["headers"]
            )
        )
    decoded = run_driver(
        [
            call("decode_response", method, body.hex(), headers, code)
            for (method, _), (code, headers, body) in zip(CALLS, answers, strict=True)
        ]
    )
    results = {}
    for (method, _), got in zip(CALLS, decoded, strict=True):
        assert got["ok"], got
        results[method] = got["value"]
    _check_call_results(results, servicer)

    # a wrong token: the gateway answers trailers-only
    r = run_driver([call("request", "ListRooms", None, {}, {"token": "nope"})])[0]["value"]
    code, headers, body = await asyncio.to_thread(
        _http_post, url + r["path"], bytes.fromhex(r["body"]), r["headers"]
    )
    assert headers["grpc-status"] == "16"
    got = run_driver([call("decode_response", "ListRooms", body.hex(), headers, code)])[0]["value"]
    assert got["status"] == 16 and got["status_message"] == "missing or wrong token"


# -- Prosody: where module:require finds the library ----------------------------------------

PROSODY_LIB = Path("/usr/lib/prosody")


@pytest.mark.skipif(
    not (PROSODY_LIB / "util" / "pluginloader.lua").exists(), reason="prosody is not installed"
)
def test_prosody_pluginloader_finds_the_library_in_this_layout() -> None:
    """module:require("captions_codec") from mod_captions, with plugin_paths = prosody-module.

    moduleapi's api:require calls loader:load_code_ext(module name, lib, "lib.lua", env);
    this runs that very call of Prosody's own util.pluginloader on this directory.
    """
    assert LUA is not None
    script = f"""
        package.path = "{PROSODY_LIB}/?.lua;" .. package.path
        CFG_PLUGINDIR = "{MODULE_DIR}/" .. ";/usr/lib/prosody/modules/"
        local loader = require "util.pluginloader".init()
        local env = setmetatable({{ module = {{}} }}, {{ __index = _G }})
        local f, path = loader:load_code_ext("captions", "captions_codec", "lib.lua", env)
        assert(f, path)
        print(path)
        local codec = f()
        print(codec.encode("RoomRequest", {{ room = "r" }}) == "\\10\\1r")
    """
    proc = subprocess.run(
        [LUA, "-e", script], capture_output=True, text=True, timeout=30, check=False
    )
    assert proc.returncode == 0, proc.stderr
    path, same = proc.stdout.split()
    assert Path(path).resolve() == CODEC.resolve()
    assert same == "true"


PROBE = r"""
-- test probe named like the real module: mod_captions/mod_captions.lua
local http = require "net.http";
local json = require "util.json";
local codec = module:require("captions_codec");
local base = @URL@;
local token = @TOKEN@;
local calls = @CALLS@;

local function run(i)
	local c = calls[i];
	if not c then
		module:log("info", "CODEC-PROBE-DONE");
		return;
	end
	local path, body, headers = codec.request(c[1], nil, c[2], { token = token, timeout = 10 });
	http.request(base .. path, { method = "POST", body = body, headers = headers },
		function (response_body, code, response)
			local ok, r = pcall(codec.decode_response, c[1], response_body,
				response and response.headers, code);
			if not ok then
				r = { lua_error = tostring(r) };
			end
			r.message = nil;
			module:log("info", "CODEC-PROBE %s %s", c[1], json.encode(r));
			run(i + 1);
		end);
end

module:add_timer(0, function () run(1); end);
"""


@pytest.mark.skipif(shutil.which("prosody") is None, reason="prosody is not installed")
async def test_real_prosody_module_require_and_net_http(
    tmp_path: Path, gateway: tuple[RecordingCaptions, str]
) -> None:
    """A module in the mod_captions/ layout loads the codec and calls the gateway via net.http."""
    servicer, url = gateway
    plugins = tmp_path / "plugins"
    (plugins / "mod_captions").mkdir(parents=True)
    shutil.copy(CODEC, plugins / "mod_captions" / CODEC.name)
    calls = "{" + ", ".join(call(m, v) for m, v in CALLS) + "}"
    probe = PROBE.replace("@URL@", to_lua(url)).replace("@TOKEN@", to_lua(TOKEN))
    (plugins / "mod_captions" / "mod_captions.lua").write_text(probe.replace("@CALLS@", calls))

    prosody = make_prosody(tmp_path, extra_modules=["captions"], plugin_paths=[str(plugins)])
    await asyncio.to_thread(prosody.start)
    try:
        deadline = time.monotonic() + 20
        while "CODEC-PROBE-DONE" not in prosody.log():
            if time.monotonic() > deadline or "Failed to load plugin library" in prosody.log():
                raise AssertionError(prosody.log()[-4000:])
            await asyncio.sleep(0.1)
        log = prosody.log()
    finally:
        await asyncio.to_thread(prosody.stop)

    assert "Unable to load module 'captions'" not in log
    results: dict[str, dict[str, Any]] = {}
    for line in log.splitlines():
        if "CODEC-PROBE " in line:
            _, rest = line.split("CODEC-PROBE ", 1)
            method, payload = rest.split(" ", 1)
            results[method] = json.loads(payload)
    assert set(results) == {m for m, _ in CALLS}, log[-4000:]
    for r in results.values():
        assert "lua_error" not in r, r
    # util.json writes empty Lua tables as [] and lists as arrays
    _check_call_results(results, servicer)


# -- busted and luacheck --------------------------------------------------------------------


def _run_tool(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.skipif(
    shutil.which("busted") is None, reason="busted is not installed (apt-get install lua-busted)"
)
def test_busted_specs_pass_under_lua54() -> None:
    # Debian's busted runs `lua` (5.1) unless told which interpreter to use.
    proc = _run_tool(["busted", "--lua=lua5.4", "--output=TAP", "spec"], MODULE_DIR)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert "not ok" not in proc.stdout
    assert "# Success:" in proc.stdout or "ok " in proc.stdout


@pytest.mark.skipif(
    shutil.which("luacheck") is None, reason="luacheck is not installed (apt-get install lua-check)"
)
def test_luacheck_is_clean() -> None:
    proc = _run_tool(["luacheck", "--no-color", "--formatter=plain", "."], MODULE_DIR)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]


def test_codec_file_needs_only_the_lua_standard_library() -> None:
    """Pure Lua: no require of Prosody's util.*, net.* or any C module."""
    code = [line for line in CODEC.read_text().splitlines() if not line.strip().startswith("--")]
    assert not [line for line in code if "require" in line]
