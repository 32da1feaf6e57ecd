"""Rooms nobody asked for: a flood of videobridge sockets to distinct meeting ids.

Starts a real sidecar (default limits: 200 rooms), opens ``--sockets``
mediajson sockets with the ingest token, each to its own meeting id, then
starts a real meeting through the control API, closes the sockets without
``session-end`` and measures how long their rooms hold on. Also holds
``--subscriptions`` SubscribeCaptions to unknown rooms and starts meetings
meanwhile. Prints one JSON line.

    .venv/bin/python bench/ingest_flood.py --sockets 1000 --subscriptions 300
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

import aiohttp
import grpc

from sidecar.proto.captions.v1 import captions_pb2 as pb
from sidecar.proto.captions.v1 import captions_pb2_grpc as pb_grpc
from tests.test_api import TOKEN, running_sidecar


async def bridge(session: aiohttp.ClientSession, base: str, meeting: str) -> object:
    try:
        ws = await session.ws_connect(
            f"{base}/mediajson/{meeting}", headers={"Authorization": f"Bearer {TOKEN}"}
        )
        await ws.send_str(json.dumps({"event": "ping", "id": 1}))
        msg = await asyncio.wait_for(ws.receive(), 60)
    except (aiohttp.ClientError, TimeoutError):
        return None
    if msg.type == aiohttp.WSMsgType.TEXT:
        return ws
    await ws.close()
    return None


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sockets", type=int, default=1000)
    ap.add_argument("--subscriptions", type=int, default=300)
    args = ap.parse_args()
    out: dict[str, object] = {"sockets": args.sockets, "subscriptions": args.subscriptions}
    async with running_sidecar(Path(tempfile.mkdtemp()), preload=False) as sc:
        rooms = sc.rooms
        out["max_rooms"], out["reserved_for_api"] = rooms.max_rooms, rooms.reserved_rooms
        base = f"http://127.0.0.1:{sc.ports.http}"
        md = (("authorization", f"Bearer {TOKEN}"),)
        conn = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=conn) as session:
            t0 = time.monotonic()
            socks = await asyncio.gather(
                *(bridge(session, base, f"flood{i}") for i in range(args.sockets))
            )
            held = [ws for ws in socks if ws is not None]
            out["flood_seconds"] = round(time.monotonic() - t0, 1)
            out["sockets_accepted"] = len(held)
            out["rooms_on_after_flood"] = sum(1 for r in rooms.rooms.values() if r.active)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{sc.ports.grpc}") as ch:
                stub = pb_grpc.CaptionsStub(ch)
                started = 0
                for i in range(5):
                    try:
                        await stub.StartTranscription(
                            pb.StartRequest(room=f"real{i}@conference.x"), metadata=md, timeout=20
                        )
                        started += 1
                    except grpc.aio.AioRpcError:
                        pass
                out["real_meetings_started_during_flood"] = f"{started} of 5"
                t1 = time.monotonic()
                await asyncio.gather(*(ws.close() for ws in held))  # type: ignore[attr-defined]
                while any(r.provisional for r in rooms.rooms.values()):  # noqa: ASYNC110
                    await asyncio.sleep(0.1)
                out["seconds_until_flood_rooms_gone"] = round(time.monotonic() - t1, 1)
                calls = [
                    stub.SubscribeCaptions(pb.SubscribeRequest(room=f"nobody{i}"), metadata=md)
                    for i in range(args.subscriptions)
                ]
                while sum(len(r.subscribers) for r in rooms.rooms.values()) < args.subscriptions:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
                ok = 0
                for i in range(20):
                    try:
                        await stub.StartCaptions(
                            pb.StartRequest(room=f"later{i}@conference.x"), metadata=md, timeout=20
                        )
                        ok += 1
                    except grpc.aio.AioRpcError:
                        pass
                out["meetings_started_while_subscriptions_held"] = f"{ok} of 20"
                for c in calls:
                    c.cancel()
    print(json.dumps(out))


if __name__ == "__main__":
    asyncio.run(main())
