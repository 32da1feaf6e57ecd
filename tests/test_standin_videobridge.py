"""The videobridge stand-in against a minimal WebSocket service: what the
bridge sends (field types of jicoco MediaJson.kt), pings and their timeout,
reconnects with back-off, and the relay of answers to every endpoint."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from aiohttp import WSMsgType, web

from sidecar.audio import encode_opus
from tests.jitsi_clients import wait_for
from tests.standins.videobridge import Connect, ExporterConfig, Videobridge


class Service:
    """Accepts the export socket, records what comes, answers as told."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.attempts: list[float] = []
        self.refuse = 0  # answer this many upgrades with 401
        self.pong = True
        self.sockets: list[web.WebSocketResponse] = []

    async def handler(self, request: web.Request) -> web.StreamResponse:
        self.attempts.append(time.monotonic())
        self.headers.append(dict(request.headers))
        if self.refuse > 0:
            self.refuse -= 1
            return web.Response(status=401)
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.sockets.append(ws)
        async for msg in ws:
            if msg.type != WSMsgType.TEXT:
                continue
            data = json.loads(msg.data)
            self.messages.append(data)
            if data.get("event") == "ping" and self.pong:
                await ws.send_str(json.dumps({"event": "pong", "id": data["id"]}))
        return ws


@contextlib.asynccontextmanager
async def service() -> AsyncIterator[tuple[Service, str]]:
    svc = Service()
    app = web.Application()
    app.router.add_get("/mediajson/{mid}", svc.handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield svc, f"ws://127.0.0.1:{port}/mediajson/m1"
    finally:
        await runner.cleanup()


async def test_events_and_field_types_as_mediajson_kt():
    async with service() as (svc, url):
        bridge = Videobridge()
        conf = bridge.conference("m1", "r@conference.localhost")
        conf.set_sources("ep1", [("ep1-a0", 1234)])
        conf.add_endpoint("ep2")
        await conf.apply_connects(
            [
                Connect(
                    id="transcriber",
                    url=url + "?room=r",
                    http_headers={"Authorization": "Bearer x"},
                )
            ]
        )
        ex = conf.exporter
        assert ex is not None
        await wait_for(lambda: ex.is_connected, 10)
        packets = encode_opus(np.zeros(16000 // 5, np.float32))
        for p in packets:
            conf.packet("ep1", p, 127, False)
        await wait_for(lambda: len(svc.messages) >= 2 + len(packets), 10)
        assert svc.headers[0]["Authorization"] == "Bearer x"
        info, start, *media = svc.messages
        assert info == {
            "event": "info",
            "application": "jitsi-videobridge",
            "version": info["version"],
        }
        assert "sources" not in {m["event"] for m in svc.messages}  # no exports/requests
        assert start["event"] == "start" and start["sequenceNumber"] == "1"
        assert start["start"]["tag"] == "ep1-a0"
        assert start["start"]["customParameters"] == {"endpointId": "ep1"}
        fmt = start["start"]["mediaFormat"]
        assert (fmt["encoding"], fmt["sampleRate"], fmt["channels"]) == ("opus", 48000, 2)
        assert "diarize" not in start["start"]
        chunks = [int(m["media"]["chunk"]) for m in media]
        stamps = [int(m["media"]["timestamp"]) for m in media]
        for i, m in enumerate(media):
            assert m["event"] == "media" and m["sequenceNumber"] == str(i + 2)
            body = m["media"]
            assert isinstance(body["chunk"], str) and isinstance(body["timestamp"], str)
            assert type(body["audioLevel"]) is int and type(body["vad"]) is bool
        assert chunks == list(range(chunks[0], chunks[0] + len(media)))
        assert all(b - a == 960 for a, b in zip(stamps, stamps[1:], strict=False))
        # an answer is relayed to every endpoint as an EndpointMessage from "transcriber"
        result = {"event": "transcription-result", "type": "transcription-result", "x": 1}
        await svc.sockets[0].send_str(json.dumps(result))
        # one without "event" does not parse on the bridge: counted, not relayed
        await svc.sockets[0].send_str(json.dumps({"type": "transcription-result"}))
        await wait_for(lambda: ex.parse_failures == 1 and ex.transcripts == 1, 10)
        for ep in ("ep1", "ep2"):
            assert conf.endpoints[ep].messages == [
                {
                    "colibriClass": "EndpointMessage",
                    "to": "",
                    "from": "transcriber",
                    "msgPayload": result,
                }
            ]
        await bridge.close()
        await wait_for(lambda: svc.messages[-1] == {"event": "session-end"}, 10)
        assert ex.closes_sent == [(1001, "closing")]


async def test_pings_timeout_and_reconnect_with_back_off():
    async with service() as (svc, url):
        bridge = Videobridge(ExporterConfig(base_delay=0.3, max_delay=1.2))
        conf = bridge.conference("m1", "r")
        await conf.apply_connects([Connect(id="transcriber", url=url, ping=(300, 200))])
        ex = conf.exporter
        assert ex is not None
        await wait_for(lambda: ex.pongs >= 2, 15, "pings answered")
        pings = [m["id"] for m in svc.messages if m["event"] == "ping"]
        assert pings[:2] == [1, 2] and all(type(i) is int for i in pings)
        assert ex.ping_timeouts == 0 and ex.connections == 1
        # no pong: closed with 1000 "Ping timeout", reconnected at once (attempt 1)
        svc.pong = False
        await wait_for(lambda: ex.ping_timeouts >= 1 and ex.connections >= 2, 15, "reconnected")
        assert (1000, "Ping timeout") in ex.closes_sent
        # after a reconnect the serializer starts again: info first, sequence numbers anew
        await conf.expire()
        # refused upgrades: the start, then reconnect attempts at once, after base,
        # 2 base, 4 base (capped at max)
        svc.refuse = 4
        svc.attempts.clear()
        conf2 = bridge.conference("m2", "r2")
        await conf2.apply_connects([Connect(id="transcriber", url=url)])
        ex2 = conf2.exporter
        assert ex2 is not None
        await wait_for(lambda: ex2.is_connected, 30, "connected after the refusals")
        assert len(ex2.handshake_errors) == 4 and len(svc.attempts) == 5
        gaps = [b - a for a, b in zip(svc.attempts, svc.attempts[1:], strict=False)]
        for gap, least in zip(gaps, (0.0, 0.3, 0.6, 1.2), strict=True):
            assert gap >= least * 0.9, gaps
        await bridge.close()
