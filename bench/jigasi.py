"""A Jigasi-style feeder for any skynet-compatible streaming-whisper URL.

    # against a running service (the sidecar, or skynet itself):
    .venv/bin/python bench/jigasi.py --url ws://HOST:PORT/streaming-whisper/ws \\
        [--token T] [--chunk jigasi|0.2|1|2|jittered] [--speakers 1] [--rounds 2]
    # or let it start a sidecar of its own and measure every delivery pattern:
    .venv/bin/python bench/jigasi.py --spawn --all [--out docs/benchmarks.md]

What it does follows Jigasi's source (jitsi/jigasi,
``src/main/java/org/jitsi/jigasi/transcription/``; see also
``sidecar/sim/delivery.py``):

- ``WhisperWebsocket.getConnection`` (``WhisperTranscriptionService``) keeps one
  socket per conference in the call context, at ``<websocket_url>/<connectionId>``
  where ``connectionId`` is a random UUID; all participants share it
  (``--socket-per-participant`` opens one each instead);
- ``WhisperWebsocket.connect`` sends the JWT as ``Authorization: Bearer``;
  ``--token`` does the same with any token;
- ``buildPayload``: a 60-byte header ``participantId|language`` (NUL-padded),
  then the PCM; ``EOF_MESSAGE`` is one 0x00 byte, sent when the last
  participant has left;
- ``Participant.buffer``: 48000-byte messages, each 1.46 s of 16 kHz 16-bit
  audio and 40 ms of zeros, sent as the audio comes in (real time).

Each speaker reads the librivox utterances of pocketsphinx-testdata (1 s of
silence between them); replies are skynet's JSON (``id``, ``participant_id``,
``ts``, ``text``, ``type``). Reported: finals against utterances, WER, and each
utterance's final latency (the reply's arrival after the true end of speech).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import jiwer
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.delivery import track  # noqa: E402
from sidecar.sim.delivery import jigasi_messages, jittered, pcm_chunks  # noqa: E402
from tests.conftest import normalise  # noqa: E402

SR = 16000
HEADER = 60
EOF = b"\x00"
CHUNKS = ("jigasi", "0.2", "1", "2", "jittered")


def header(pid: str, language: str = "en") -> bytes:
    raw = f"{pid}|{language}".encode()
    if len(raw) > HEADER:
        raise ValueError(f"participant id too long for the 60-byte header: {pid!r}")
    return raw.ljust(HEADER, b"\x00")


def messages(pcm: np.ndarray, chunk: str) -> list[tuple[float, bytes]]:
    """(send at, PCM bytes) for one participant."""
    if chunk == "jigasi":
        items = jigasi_messages(pcm)
    elif chunk == "jittered":
        items = jittered(pcm_chunks(pcm, 0.2))
    else:
        items = pcm_chunks(pcm, float(chunk))
    out = []
    for it in items:
        assert it.pcm is not None
        pcm16 = (np.clip(it.pcm, -1, 1) * 32767).astype("<i2").tobytes()
        out.append((it.at, pcm16))
    return out


async def run(
    url: str,
    token: str | None,
    chunk: str,
    speakers: int,
    rounds: int,
    socket_per_participant: bool = False,
) -> dict[str, object]:
    pcm, truth = track(rounds)
    # speaker s starts 1.7 s after speaker s-1 (as bench/run.py staggers them)
    pids = [f"speaker{s}" for s in range(speakers)]
    offsets = {pid: 1.7 * s for s, pid in enumerate(pids)}
    plan: list[tuple[float, str, bytes]] = []
    for pid in pids:
        for at, data in messages(pcm, chunk):
            plan.append((at + offsets[pid], pid, header(pid) + data))
    plan.sort(key=lambda x: x[0])
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    replies: list[tuple[float, dict[str, object]]] = []
    base = url.rstrip("/")
    async with aiohttp.ClientSession() as http:
        groups = [[p] for p in pids] if socket_per_participant else [pids]
        sockets = {}
        for g in groups:
            ws = await http.ws_connect(f"{base}/{uuid.uuid4()}", headers=headers, max_msg_size=0)
            for pid in g:
                sockets[pid] = ws

        async def read(ws: aiohttp.ClientWebSocketResponse) -> None:
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    replies.append((time.monotonic(), json.loads(msg.data)))

        readers = [
            asyncio.create_task(read(ws)) for ws in {id(w): w for w in sockets.values()}.values()
        ]
        t0 = time.monotonic()
        for at, pid, data in plan:
            delay = t0 + at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await sockets[pid].send_bytes(data)
        for ws in {id(w): w for w in sockets.values()}.values():
            await ws.send_bytes(EOF)
        await asyncio.wait(readers, timeout=60)
    finals: dict[str, list[tuple[float, str]]] = {pid: [] for pid in pids}
    for at, r in replies:
        if r.get("type") == "final" and str(r.get("text", "")).strip():
            finals.setdefault(str(r.get("participant_id")), []).append((at, str(r["text"])))
    ref = normalise(" ".join(t for _, _, t in truth))
    lat: list[float] = []
    wers = []
    count = 0
    for pid in pids:
        got = finals.get(pid, [])
        count += len(got)
        wers.append(jiwer.wer(ref, normalise(" ".join(t for _, t in got))))
        arrivals = [a for a, _ in got]
        for _, end, _ in truth:
            after = [a for a in arrivals if a > t0 + offsets[pid] + end - 0.2]
            if after:
                lat.append(after[0] - (t0 + offsets[pid] + end))
                arrivals.remove(after[0])
    return {
        "chunk": chunk,
        "speakers": speakers,
        "utterances": len(truth) * speakers,
        "finals": count,
        "wer": float(np.mean(wers)),
        "final_p50": float(np.percentile(lat, 50)) if lat else None,
        "final_p95": float(np.percentile(lat, 95)) if lat else None,
    }


async def simulator_row(proc: object, tmp: Path, rounds: int) -> dict[str, object]:
    from bench.conference import reader_track
    from sidecar.sim.conference import SimConfig, SimParticipant, run_conference
    from tests.conftest import librivox

    order = list(range(5)) * rounds
    ref = " ".join(librivox()[k][1] for k in order)
    people = [SimParticipant(name="Reader", audio=reader_track(tmp, "reader", order), text=ref)]
    cfg = SimConfig(
        participants=people,
        url=f"ws://127.0.0.1:{proc.http}/mediajson/{uuid.uuid4()}",  # type: ignore[attr-defined]
        room="jigasi-bench@conference.bench",
        token=proc.token,  # type: ignore[attr-defined]
        realtime=True,
    )
    report = await run_conference(cfg)
    return {
        "chunk": "frames",
        "speakers": 1,
        "utterances": len(report.utterances),
        "finals": report.finals,
        "wer": report.wer or 0.0,
        "final_p50": report.final_latency_p50,
        "final_p95": report.final_latency_p95,
    }


def _s(v: object) -> str:
    return "—" if v is None else f"{float(v):.2f} s"  # type: ignore[arg-type]


def row_md(r: dict[str, object]) -> str:
    names = {
        "jigasi": "Jigasi's 48000-byte messages (1.46 s)",
        "jittered": "0.2 s chunks, stalls of 0.2-0.9 s",
        "frames": "20 ms Opus frames over mediajson (the simulator)",
    }
    name = names.get(str(r["chunk"]), f"{r['chunk']} s chunks")
    return (
        f"| {name} | {r['speakers']} | {r['finals']} / {r['utterances']} "
        f"| {100 * float(r['wer']):.1f} % | {_s(r['final_p50'])} | {_s(r['final_p95'])} |"  # type: ignore[arg-type]
    )


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--url", help="ws://host:port/streaming-whisper/ws (connectionId is appended)")
    ap.add_argument("--token", default=os.environ.get("SKYNET_TOKEN"))
    ap.add_argument("--chunk", default="jigasi", choices=CHUNKS)
    ap.add_argument("--all", action="store_true", help="every chunking in turn")
    ap.add_argument("--speakers", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--socket-per-participant", action="store_true")
    ap.add_argument("--spawn", action="store_true", help="start a sidecar of our own")
    ap.add_argument("--out", type=Path, help="append the table to this markdown file")
    args = ap.parse_args()
    proc = None
    url, token = args.url, args.token
    tmp = tempfile.TemporaryDirectory()
    if args.spawn:
        from bench.conference import SidecarProcess

        proc = SidecarProcess(Path(tmp.name))
        url, token = f"ws://127.0.0.1:{proc.http}/streaming-whisper/ws", proc.token
    if not url:
        ap.error("--url or --spawn")
    try:
        rows = []
        if proc is not None and args.all:
            # the same speech as 20 ms Opus frames over mediajson, by the simulator
            rows.append(await simulator_row(proc, Path(tmp.name), args.rounds))
            print(row_md(rows[-1]), f"(load {os.getloadavg()[0]:.2f})", flush=True)
        for chunk in CHUNKS if args.all else (args.chunk,):
            r = await run(
                url, token, chunk, args.speakers, args.rounds, args.socket_per_participant
            )
            rows.append(r)
            print(row_md(r), f"(load {os.getloadavg()[0]:.2f})", flush=True)
    finally:
        if proc is not None:
            proc.stop()
        tmp.cleanup()
    table = [
        "| delivery (Jigasi-style feeder) | speakers | finals / utterances | WER "
        "| final p50 | final p95 |",
        "|---|---|---|---|---|---|",
    ] + [row_md(r) for r in rows]
    text = "\n".join(table)
    print(text)
    if args.out:
        stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        with args.out.open("a") as f:
            f.write(
                f"\n### Jigasi-style feeder ({stamp}, load {os.getloadavg()[0]:.2f})\n\n"
                f"`.venv/bin/python bench/jigasi.py --spawn --all`\n\n{text}\n"
            )


if __name__ == "__main__":
    asyncio.run(main())
