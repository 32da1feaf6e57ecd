"""End-to-end benchmarks through the videobridge path, driven by the simulator.

    .venv/bin/python bench/conference.py [--out docs/benchmarks.md] [--quick]

The sidecar runs as its own process (``python -m sidecar serve``) so that its
CPU time and memory are read from /proc without the simulator's share; the
simulator plays real speech (pocketsphinx-testdata's librivox utterances, each
speaker reading them in a different order with 1.5 s pauses) as 20 ms Opus
frames over one mediajson WebSocket, in real time, and measures each
utterance's latency against the true end (and start) of its speech.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
import wave
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.run import cpu_model, write_report  # noqa: E402
from sidecar.audio import load_audio  # noqa: E402
from sidecar.sim.conference import SimConfig, SimParticipant, run_conference  # noqa: E402
from tests.conftest import librivox  # noqa: E402

SR = 16000
TICK = os.sysconf("SC_CLK_TCK")
SILENCE_MS = 700


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class SidecarProcess:
    def __init__(self, store: Path) -> None:
        self.token = secrets.token_urlsafe(12)
        self.grpc = free_port()
        self.http = free_port()
        env = dict(os.environ)
        env.update(
            CAPTIONS_SERVER_TOKEN=self.token,
            CAPTIONS_SERVER_GRPC_LISTEN=f"127.0.0.1:{self.grpc}",
            CAPTIONS_SERVER_HTTP_LISTEN=f"127.0.0.1:{self.http}",
            CAPTIONS_STORE_STORE_DIR=str(store),
            CAPTIONS_LOGGING_LOG_LEVEL="warning",
            CAPTIONS_INGEST_MAX_MESSAGES_PER_SECOND="1000000",
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sidecar", "serve"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if "ready" not in line:
            raise RuntimeError(f"sidecar did not start: {line!r}")

    def cpu_s(self) -> float:
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def reader_track(tmp: Path, name: str, order: list[int]) -> Path:
    corpus = librivox()
    parts = []
    for k in order:
        parts += [load_audio(corpus[k][0]), np.zeros(int(1.5 * SR), np.float32)]
    pcm = np.concatenate(parts)
    path = tmp / f"{name}.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SR)
        w.writeframes((np.clip(pcm, -1, 1) * 32767).astype(np.int16).tobytes())
    return path


@dataclass
class Row:
    label: str
    speakers: int
    listeners: int
    utterances: int
    missed: int
    final_p50: float | None
    final_p95: float | None
    first_p50: float | None
    first_p95: float | None
    wer: float | None
    cpu_pct: float
    rss_mb: float


async def scenario(
    tmp: Path, sidecar: SidecarProcess, speakers: int, listeners: int, rounds: int, idle_cpu: float
) -> Row:
    rng = np.random.default_rng(speakers)
    people = []
    for s in range(speakers):
        order = [int(k) for k in rng.permutation(5)] * rounds
        path = reader_track(tmp, f"reader{speakers}_{s}", order)
        reference = " ".join(librivox()[k][1] for k in order)
        # staggered starts so that speech overlaps between speakers
        people.append(
            SimParticipant(name=f"Reader {s + 1}", audio=path, text=reference, offset=0.5 + 1.3 * s)
        )
    room = f"bench{speakers}x{listeners}@conference.bench"
    cfg = SimConfig(
        participants=people,
        url=f"ws://127.0.0.1:{sidecar.http}/mediajson/{uuid.uuid4()}",
        room=room,
        token=sidecar.token,
        listeners=listeners,
        realtime=True,
    )
    c0, t0 = sidecar.cpu_s(), time.monotonic()
    report = await run_conference(cfg)
    cpu = sidecar.cpu_s() - c0
    wall = time.monotonic() - t0
    return Row(
        label=f"{speakers} speaker(s)" + (f" + {listeners} listeners" if listeners else ""),
        speakers=speakers,
        listeners=listeners,
        utterances=len(report.utterances),
        missed=report.missed,
        final_p50=report.final_latency_p50,
        final_p95=report.final_latency_p95,
        first_p50=report.first_interim_latency_p50,
        first_p95=report.first_interim_latency_p95,
        wer=report.wer,
        cpu_pct=100 * cpu / wall,
        rss_mb=sidecar.rss_mb(),
    )


async def listeners_only(sidecar: SidecarProcess, listeners: int, seconds: float) -> float:
    """Sidecar CPU (% of one core) for silent listeners alone."""
    import aiohttp

    from sidecar.audio import OpusEncoder

    quiet = OpusEncoder().encode(np.random.default_rng(0).normal(0, 3e-4, SR).astype(np.float32))
    import base64
    import json

    url = f"http://127.0.0.1:{sidecar.http}/mediajson/{uuid.uuid4()}?room=quiet@conference.bench"
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(url, headers={"Authorization": f"Bearer {sidecar.token}"})
        for k in range(listeners):
            await ws.send_str(
                json.dumps(
                    {
                        "event": "start",
                        "sequenceNumber": str(k),
                        "start": {
                            "tag": f"l{k:07d}-a0",
                            "mediaFormat": {"encoding": "opus", "sampleRate": 48000, "channels": 2},
                            "customParameters": {"endpointId": f"l{k:07d}"},
                        },
                    }
                )
            )
        payloads = [base64.b64encode(p).decode() for p in quiet]
        n = int(seconds / 0.02)
        c0 = sidecar.cpu_s()
        t0 = time.monotonic()
        sent = 0
        for i in range(n):
            payload = payloads[i % len(payloads)]
            for k in range(listeners):
                await ws.send_str(
                    f'{{"event":"media","sequenceNumber":"{i}","media":{{"tag":"l{k:07d}-a0",'
                    f'"chunk":"{i}","timestamp":"{i * 960}","payload":"{payload}",'
                    f'"audioLevel":127,"vad":false}}}}'
                )
                sent += 1
            await asyncio.sleep(max(0.0, t0 + (i + 1) * 0.02 - time.monotonic()))
        await asyncio.sleep(0.5)  # let the sidecar take in what is queued
        cpu = sidecar.cpu_s() - c0
        await ws.close()
    # the sender may fall behind real time with hundreds of listeners: count
    # the CPU per second of audio actually delivered, not per wall second
    audio_s = sent / listeners * 0.02
    return 100 * cpu / audio_s


def _s(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f} s"


async def main(out: Path, quick: bool) -> None:
    rows: list[Row] = []
    listener_rows: list[tuple[int, float]] = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        sidecar = SidecarProcess(tmp / "store")
        try:
            await asyncio.sleep(2)
            c0 = sidecar.cpu_s()
            await asyncio.sleep(5)
            idle = 100 * (sidecar.cpu_s() - c0) / 5
            base_rss = sidecar.rss_mb()
            for n in (1, 4, 8):
                rows.append(await scenario(tmp, sidecar, n, 0, 1 if (quick or n > 1) else 2, idle))
            rows.append(await scenario(tmp, sidecar, 2, 50, 1, idle))
            for count in (50, 200) if quick else (50, 100, 200, 400):
                listener_rows.append(
                    (count, await listeners_only(sidecar, count, 10 if quick else 20))
                )
        finally:
            sidecar.stop()
    silence_s = SILENCE_MS / 1000
    lines = [
        f"## Videobridge path, end to end — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "",
        f"Machine: {os.cpu_count()} cores ({cpu_model()}), Python {platform.python_version()}, "
        "no GPU. Sidecar as its own process (`python -m sidecar serve`, defaults: tiny.en int8, "
        f"2 workers, silence {SILENCE_MS} ms); the conference simulator plays librivox speech "
        "as 20 ms Opus frames over one mediajson WebSocket in real time. "
        "Command: `make bench` (`bench/conference.py`).",
        "",
        "| scenario | utterances (missed) | final p50 / p95 | first interim p50 / p95 | WER "
        "| sidecar CPU | RSS |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        wer = "n/a" if r.wer is None else f"{100 * r.wer:.1f} %"
        lines.append(
            f"| {r.label} | {r.utterances} ({r.missed}) | {_s(r.final_p50)} / {_s(r.final_p95)} "
            f"| {_s(r.first_p50)} / {_s(r.first_p95)} | {wer} | {r.cpu_pct:.0f} % of a core "
            f"| {r.rss_mb:.0f} MB |"
        )
    lines += [
        "",
        f"Idle sidecar: {idle:.1f} % of a core, {base_rss:.0f} MB RSS with tiny.en loaded.",
        "",
        "| silent listeners only (vad false, level 127) | sidecar CPU per second of audio |",
        "| --- | --- |",
    ]
    for count, pct in listener_rows:
        lines.append(f"| {count} | {pct:.1f} % of one core ({pct / count:.3f} % each) |")
    per = [r for r in rows if r.listeners == 0]
    if per:
        speaker_cpu = [(r.cpu_pct - idle) / r.speakers for r in per]
        lines += [
            "",
            f"CPU per active speaker: {min(speaker_cpu):.0f}–{max(speaker_cpu):.0f} % of a core "
            "(recognition included). Memory per speaker is small next to the model: RSS goes "
            f"from {base_rss:.0f} MB idle to {per[-1].rss_mb:.0f} MB with {per[-1].speakers} "
            "speakers.",
            "",
            "Targets (tiny.en, 2 cores): final p95 ≤ silence + 0.6 s = "
            f"{silence_s + 0.6:.1f} s with 1 speaker → {_s(per[0].final_p95)}; ≤ silence + 1.5 s "
            f"= {silence_s + 1.5:.1f} s with 4 → "
            f"{_s(next((r.final_p95 for r in per if r.speakers == 4), None))}; first interim "
            f"p50 ≤ 1.2 s → {_s(per[0].first_p50)} (1 speaker); 200 silent listeners under "
            f"15 % of one core → "
            f"{next((f'{p:.1f} %' for c, p in listener_rows if c == 200), 'n/a')}.",
        ]
    lines += [
        "",
        "Where the time goes (tiny.en on 2 cores): every decode runs Whisper's encoder on a "
        "30 s window, about 0.45–0.6 s of CPU on both cores whatever the utterance length. "
        "A final is the speech end + the silence the segmenter waits for (700 ms) + what is "
        "left of a decode that starts speculatively after 192 ms of silence; so with one "
        "speaker the final lands ~0.1–0.3 s after the silence is confirmed. The first interim "
        "needs 64 ms of VAD onset, 400 ms of speech and one decode. With 4 or more speakers "
        "two workers are shared: finals go first, interims wait or are coalesced (only the "
        "newest per speaker is kept, stale ones are dropped), which is why first-interim "
        "latency grows with the number of simultaneous speakers while final latency and the "
        "backlog stay bounded. A GPU or a larger machine (more workers) removes the wait.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    write_report(out, text)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    asyncio.run(main(args.out, args.quick))
