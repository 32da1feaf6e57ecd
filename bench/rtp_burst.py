"""How much of an RTP burst the sidecar sees: packets sent, counted, dropped by the kernel.

A separate process sends ``--rate`` packets a second for ``--seconds`` to the
plain RTP listener (valid RTP with Opus payload type 111, SSRCs of a room
whose captions are off, so each packet goes through parsing and routing and
is counted as ``rejected``). Prints one JSON line: sent, counted by the
sidecar, dropped by the kernel (``/proc/net/udp``), and the rest (lost
elsewhere, e.g. in the sender's own buffer).

    .venv/bin/python bench/rtp_burst.py --rate 50000 --seconds 1
    .venv/bin/python bench/rtp_burst.py --rate 50000 --seconds 1 --old

``--old`` reads as before issue 12: one datagram per wake-up of the event
loop and 1 MB asked with SO_RCVBUF (capped by net.core.rmem_max).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import socket
import struct
import tempfile
import time
from pathlib import Path


def send(port: int, rate: int, seconds: float, ssrcs: int) -> int:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    payload = b"\xf8\xff\xfe" + bytes(60)  # an Opus TOC byte and a small frame
    n = int(rate * seconds)
    t0 = time.perf_counter()
    sent = 0
    for i in range(n):
        ssrc = 0x1000 + i % ssrcs
        head = struct.pack("!BBHII", 0x80, 111, i & 0xFFFF, i * 960 & 0xFFFFFFFF, ssrc)
        try:
            sock.sendto(head + payload, ("127.0.0.1", port))
            sent += 1
        except OSError:
            pass
        if i % 100 == 0:  # pace: rate packets per second
            ahead = t0 + i / rate - time.perf_counter()
            if ahead > 0:
                time.sleep(ahead)
    sock.close()
    return sent


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", type=int, default=50_000)
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--ssrcs", type=int, default=50)
    ap.add_argument("--old", action="store_true", help="the reading before issue 12")
    args = ap.parse_args()

    from sidecar.engine import Engine
    from sidecar.ingest import rtp
    from sidecar.rooms import Participant

    if args.old:
        rtp.READ_BATCH = 1
        rtp.RECV_BUFFER_BYTES = 1 << 20
        rtp._raise_receive_buffer = lambda sock, size: (  # type: ignore[assignment]
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size),
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 2,
        )[1]
    engine = Engine(Path(tempfile.mkdtemp()))
    await engine.start(preload=False)
    people = [Participant(f"p{i}", ssrcs=(0x1000 + i,)) for i in range(args.ssrcs)]
    await engine.rooms.update_roster("burst@conference.x", people)
    ingest = rtp.RtpIngest(engine.rooms)
    port = await ingest.start("127.0.0.1", 0)

    def counted() -> float:
        return sum(c._value.get() for c in ingest._count.values())

    before, drops0 = counted(), ingest.kernel_drops()
    loop = asyncio.get_running_loop()
    with multiprocessing.Pool(1) as pool:
        sent = await loop.run_in_executor(
            None, pool.apply, send, (port, args.rate, args.seconds, args.ssrcs)
        )
    last, still = -1.0, 0
    while still < 10:  # until the loop has read what is queued
        await asyncio.sleep(0.1)
        now = counted()
        still = still + 1 if now == last else 0
        last = now
    got = counted() - before
    dropped = ingest.kernel_drops() - drops0
    print(
        json.dumps(
            {
                "mode": "old" if args.old else "new",
                "rate": args.rate,
                "sent": sent,
                "counted": int(got),
                "kernel_drops": int(dropped),
                "lost": f"{100 * (1 - got / max(sent, 1)):.1f} %",
                "receive_buffer_kb": ingest.receive_buffer_bytes // 1024,
            }
        )
    )
    ingest.close()
    await engine.close()


if __name__ == "__main__":
    asyncio.run(main())
