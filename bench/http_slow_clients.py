"""Clients that hold the HTTP listener: half-sent headers and bodies, unauthenticated posts.

Starts a real sidecar with its default timeouts, opens ``--sockets``
connections that send part of their request headers and as many that send
headers with the token and then part of a body, and measures when the
sidecar closes them; then ``--posts`` unauthenticated gRPC-Web posts that
send 4 MB bodies, and the sidecar's RSS growth and their status. Prints one
JSON line.

    .venv/bin/python bench/http_slow_clients.py --sockets 300 --posts 40
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

from tests.test_api import TOKEN, running_sidecar

PATH = "/captions.v1.Captions/GetRoomStatus"


def rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def held(port: int, data: bytes, t0: float) -> float:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    try:
        async with asyncio.timeout(120):
            await reader.read(-1)
    except TimeoutError:
        pass
    writer.close()
    return time.monotonic() - t0


async def post(port: int, size: int) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = (
        f"POST {PATH} HTTP/1.1\r\nHost: x\r\nContent-Type: application/grpc-web+proto\r\n"
        f"Content-Length: {size}\r\n\r\n"
    ).encode()
    writer.write(head)
    # the body goes out while the answer is awaited, as a client streams it
    sender = asyncio.ensure_future(_send_body(writer, size))
    try:
        answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
        answer = b""
    await asyncio.gather(sender, return_exceptions=True)
    writer.close()
    return answer


async def _send_body(writer: asyncio.StreamWriter, size: int) -> None:
    chunk = b"\0" * 65536
    for _ in range(size // len(chunk)):
        writer.write(chunk)
        await writer.drain()


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sockets", type=int, default=300)
    ap.add_argument("--posts", type=int, default=40)
    args = ap.parse_args()
    async with running_sidecar(Path(tempfile.mkdtemp()), preload=False) as sc:
        port = sc.ports.http
        t0 = time.monotonic()
        partial_head = f"POST {PATH} HTTP/1.1\r\nHost: x\r\n".encode()
        partial_body = (
            f"POST {PATH} HTTP/1.1\r\nHost: x\r\nContent-Type: application/grpc-web+proto\r\n"
            f"Authorization: Bearer {TOKEN}\r\nContent-Length: 1000\r\n\r\n\0\0\0"
        ).encode()
        heads = [held(port, partial_head, t0) for _ in range(args.sockets)]
        bodies = [held(port, partial_body, t0) for _ in range(args.sockets)]
        times = await asyncio.gather(*heads, *bodies)
        rss0 = rss_mb()
        answers = await asyncio.gather(*(post(port, 4 * 1024 * 1024) for _ in range(args.posts)))
        statuses = sorted(
            {
                a.split(b"grpc-status: ")[1][:2].strip().decode()
                for a in answers
                if b"grpc-status: " in a
            }
        )
        print(
            json.dumps(
                {
                    "partial_header_sockets": args.sockets,
                    "closed_after_s_max": round(max(times[: args.sockets]), 1),
                    "partial_body_sockets": args.sockets,
                    "body_closed_after_s_max": round(max(times[args.sockets :]), 1),
                    "unauthenticated_4mb_posts": args.posts,
                    "grpc_status_of_posts": statuses,
                    "rss_growth_mb": round(rss_mb() - rss0, 1),
                }
            )
        )


if __name__ == "__main__":
    asyncio.run(main())
