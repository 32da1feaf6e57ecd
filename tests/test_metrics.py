"""The sidecar's /metrics as Prometheus scrapes it, from a running Sidecar.

Control API calls are counted the same way on both transports (native gRPC
through the server interceptor, gRPC-Web through the gateway); every metric
the sidecar exports follows Prometheus naming conventions and carries no
unbounded label; the scrape-time room gauges follow what happens to rooms.
None of these tests loads the Whisper model.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import grpc
import grpc.aio
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from sidecar import metrics as sidecar_metrics
from sidecar.audio import encode_opus
from sidecar.events import Frame, TranscriptEntry
from sidecar.proto.captions.v1 import captions_pb2 as pb
from sidecar.server import Sidecar
from sidecar.store.local import LocalDirStore
from tests.test_api import BEARER, ApiError, native_api, running_sidecar, web_api

ROOM = "metrics@conference.meet.test"
# labels whose values must come from a small fixed set, never from ids
UNBOUNDED_LABELS = {"room", "participant", "participant_id", "meeting", "meeting_id", "user", "id"}


@pytest.fixture
async def sidecar(tmp_path: Path) -> AsyncIterator[Sidecar]:
    async with running_sidecar(tmp_path, preload=False) as sc:
        yield sc


async def scrape_text(sc: Sidecar) -> str:
    url = f"http://127.0.0.1:{sc.ports.http}/metrics"
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        assert resp.status == 200
        return await resp.text()


async def scrape(sc: Sidecar) -> list[Sample]:
    text = await scrape_text(sc)
    return [s for fam in text_string_to_metric_families(text) for s in fam.samples]


def value(samples: list[Sample], name: str, **labels: str) -> float | None:
    for s in samples:
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    return None


async def test_native_grpc_calls_are_counted_like_grpc_web(sidecar: Sidecar) -> None:
    """Both transports land in one metric, told apart by ``transport``."""
    base = f"http://127.0.0.1:{sidecar.ports.http}"
    # the registry is the process's: other tests' calls are counted in it too
    before = {
        (s.labels["transport"], s.labels["code"]): s.value
        for s in await scrape(sidecar)
        if s.name == "captions_api_requests_total" and s.labels.get("method") == "StopCaptions"
    }
    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.ports.grpc}") as channel,
        aiohttp.ClientSession() as session,
    ):
        for api in (native_api(channel), web_api(session, base)):
            await api("StartCaptions", pb.StartRequest(room=ROOM))
            await api("GetRoomStatus", pb.RoomRequest(room=ROOM))
            err = await api.error("GetRoomStatus", pb.RoomRequest(room=ROOM), auth="Bearer wrong")
            assert err.code == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(ApiError):
                await api("StopCaptions", pb.StopRequest(room="nobody@conference.meet.test"))
            await api("StopCaptions", pb.StopRequest(room=ROOM))
    samples = await scrape(sidecar)
    for transport in ("grpc", "grpc-web"):
        assert value(
            samples,
            "captions_api_requests_total",
            transport=transport,
            method="StartCaptions",
            code="OK",
        ), transport
        assert value(
            samples,
            "captions_api_requests_total",
            transport=transport,
            method="GetRoomStatus",
            code="UNAUTHENTICATED",
        ), transport
        stop_codes = {
            s.labels["code"]
            for s in samples
            if s.name == "captions_api_requests_total"
            and s.labels["transport"] == transport
            and s.labels["method"] == "StopCaptions"
            and s.value > before.get((transport, s.labels["code"]), 0.0)
        }
        assert "OK" in stop_codes and len(stop_codes) == 2, (transport, stop_codes)
        timed = value(
            samples,
            "captions_api_request_duration_seconds_count",
            transport=transport,
            method="GetRoomStatus",
        )
        assert timed is not None and timed >= 2, (transport, timed)


async def test_native_subscription_is_counted_when_it_ends(sidecar: Sidecar) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.ports.grpc}") as channel:
        api = native_api(channel)
        await api("StartCaptions", pb.StartRequest(room=ROOM))
        stream = api.subscribe(pb.SubscribeRequest(room=ROOM))
        reader = asyncio.create_task(anext(stream, None))
        deadline = time.monotonic() + 20
        while value(await scrape(sidecar), "captions_subscribers") != 1:
            assert time.monotonic() < deadline, "the subscription never showed"
            await asyncio.sleep(0.05)
        await api("EndRoom", pb.RoomRequest(room=ROOM))
        assert await asyncio.wait_for(reader, 20) is None
        await stream.aclose()
    deadline = time.monotonic() + 20
    while True:
        samples = await scrape(sidecar)
        got = value(
            samples,
            "captions_api_requests_total",
            transport="grpc",
            method="SubscribeCaptions",
            code="OK",
        )
        if got and value(samples, "captions_subscribers") == 0:
            break
        assert time.monotonic() < deadline, got
        await asyncio.sleep(0.05)


async def test_unknown_native_method_is_counted(sidecar: Sidecar) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.ports.grpc}") as channel:
        call = channel.unary_unary("/captions.v1.Captions/NoSuchMethod")
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await call(b"", metadata=(("authorization", BEARER),), timeout=20)
        assert exc.value.code() == grpc.StatusCode.UNIMPLEMENTED
    samples = await scrape(sidecar)
    assert value(samples, "captions_api_requests_total", transport="grpc", method="unknown"), (
        "an unknown method must be counted under method=unknown"
    )


async def test_every_exported_metric_follows_the_conventions(sidecar: Sidecar) -> None:
    samples = await scrape(sidecar)
    families = list(text_string_to_metric_families(await scrape_text(sidecar)))
    ours = [f for f in families if f.name.startswith("captions_")]
    assert len(ours) > 30, [f.name for f in ours]
    for fam in ours:
        assert re.fullmatch(r"captions_[a-z0-9_]+", fam.name), fam.name
        assert fam.documentation, f"{fam.name} has no help text"
        if fam.type == "counter":
            # the parser strips _total from a counter's family name; the samples keep it
            assert all(s.name.endswith(("_total", "_created")) for s in fam.samples), fam.name
        if fam.type == "histogram":
            assert fam.name.endswith(("_seconds", "_factor")), fam.name
        if fam.type == "gauge":
            assert not fam.name.endswith("_total"), fam.name
        for s in fam.samples:
            assert not UNBOUNDED_LABELS & s.labels.keys(), (s.name, s.labels)
    info = [s for s in samples if s.name == "captions_build_info"]
    assert len(info) == 1 and info[0].value == 1
    assert info[0].labels["version"] == "0.1.0", info[0].labels
    assert {"python", "faster_whisper", "grpc"} <= info[0].labels.keys()


async def test_a_transcribing_room_without_audio_is_counted(
    sidecar: Sidecar, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sidecar_metrics, "NO_AUDIO_AFTER_S", 0.5)
    base = f"http://127.0.0.1:{sidecar.ports.http}"
    async with aiohttp.ClientSession() as session:
        api = web_api(session, base)
        await api("StartTranscription", pb.StartRequest(room=ROOM))
        assert value(await scrape(sidecar), "captions_rooms_without_audio") == 0
        await asyncio.sleep(0.7)
        assert value(await scrape(sidecar), "captions_rooms_without_audio") == 1
        # one 20 ms frame of silence is audio arriving: the room is fed again
        packet = encode_opus(np.zeros(320, np.float32))[0]
        assert sidecar.rooms.push_frame(ROOM, "a1b2c3d4", Frame(packet, 0, 0, voice=False))
        assert value(await scrape(sidecar), "captions_rooms_without_audio") == 0
        await api("StopTranscription", pb.StopRequest(room=ROOM))
        await asyncio.sleep(0.7)
        assert value(await scrape(sidecar), "captions_rooms_without_audio") == 0


def test_transcript_writes_are_counted_in_bytes_and_timed(tmp_path: Path) -> None:
    from prometheus_client import REGISTRY

    def get(name: str) -> float:
        return REGISTRY.get_sample_value(name) or 0.0

    bytes_before = get("captions_transcript_written_bytes_total")
    count_before = get("captions_transcript_write_seconds_count")
    store = LocalDirStore(tmp_path)
    writer = store.open("bytes@conference.meet.test", language="en")
    for i in range(3):
        writer.append(
            TranscriptEntry(
                start_time="2026-01-01T00:00:00.000Z",
                stop_time="2026-01-01T00:00:01.000Z",
                speaker_id="p1",
                speaker_name="P",
                text=f"line {i}",
                message_id=f"m{i}",
                language="en",
            )
        )
    writer.close()
    size = (tmp_path / writer.id / "transcript.jsonl").stat().st_size
    assert get("captions_transcript_written_bytes_total") - bytes_before == size
    assert get("captions_transcript_write_seconds_count") - count_before == 3
