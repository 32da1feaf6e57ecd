"""Benchmarks of the sidecar core on this machine; writes docs/benchmarks.md.

    .venv/bin/python bench/run.py [--out docs/benchmarks.md] [--quick]

Measures, with the real model and real speech (pocketsphinx-testdata):
- real-time factor of one stream (file fed as fast as possible, finals only);
- end-of-speech-to-final and start-of-speech-to-first-interim latency with
  1 and 4 simultaneous speakers fed in real time as 20 ms Opus frames;
- CPU cost of 50 silent participants (sender's VAD flag off, and without
  any flag so that every frame is decoded and VAD-checked);
- resident memory.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import resource
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from tempfile import TemporaryDirectory

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sidecar.audio import OpusEncoder, encode_opus, load_audio  # noqa: E402
from sidecar.config import RoomSettings  # noqa: E402
from sidecar.engine import Engine  # noqa: E402
from sidecar.events import Frame  # noqa: E402
from tests.conftest import librivox  # noqa: E402

SR = 16000


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


async def bench_rtf(tmp: Path) -> dict[str, float]:
    engine = Engine(tmp / "rtf")
    await engine.start()
    pcm = np.concatenate(
        [x for w, _ in librivox() for x in (load_audio(w), np.zeros(SR, np.float32))]
    )
    from sidecar.transcribe import transcribe_pcm

    t0 = time.perf_counter()
    c0 = time.process_time()
    await transcribe_pcm(engine, "rtf", pcm, RoomSettings())
    wall = time.perf_counter() - t0
    cpu = time.process_time() - c0
    await engine.close()
    audio = len(pcm) / SR
    return {"audio_s": audio, "wall_s": wall, "rtf": wall / audio, "cpu_per_audio_s": cpu / audio}


def speaker_track(offset: float, order: list[int]) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """Librivox utterances with 1.5 s gaps; returns the track and true (start, end)."""
    corpus = librivox()
    parts = [np.zeros(int(offset * SR), np.float32)]
    truth = []
    t = offset
    for k in order:
        a = load_audio(corpus[k][0])
        idx = np.flatnonzero(np.abs(a) > 0.02)
        s0, s1 = (idx[0], idx[-1]) if len(idx) else (0, len(a))
        truth.append((t + s0 / SR, t + s1 / SR))
        parts += [a, np.zeros(int(1.5 * SR), np.float32)]
        t += len(a) / SR + 1.5
    return np.concatenate(parts + [np.zeros(2 * SR, np.float32)]), truth


async def bench_latency(tmp: Path, speakers: int, rounds: int) -> dict[str, float]:
    engine = Engine(tmp / f"lat{speakers}")
    await engine.start()
    room = f"lat{speakers}@conference.bench"
    r = await engine.rooms.start(room, "captions", RoomSettings())
    loop = asyncio.get_running_loop()
    firsts: dict[str, float] = {}
    interims = [0]
    finals: dict[str, tuple[str, float]] = {}
    starts: dict[str, float] = {}

    def sink(c):  # type: ignore[no-untyped-def]
        now = loop.time()
        if c.is_interim:
            interims[0] += 1
            firsts.setdefault(c.message_id, now)
        elif c.text:
            finals[c.message_id] = (c.participant_id, now)
        starts.setdefault(c.message_id, 0)

    r.sinks.append(sink)
    rng = np.random.default_rng(1)
    tracks = {}
    truth = {}
    for s in range(speakers):
        order = list(rng.permutation(5))[:5] * rounds
        tr, tt = speaker_track(0.5 + 1.7 * s, order)
        tracks[f"s{s}"] = tr
        truth[f"s{s}"] = tt
    packets = {s: OpusEncoder().encode(t) for s, t in tracks.items()}
    n = max(len(p) for p in packets.values())
    c0 = time.process_time()
    t0 = loop.time()
    for i in range(n):
        for s, pk in packets.items():
            if i < len(pk):
                engine.rooms.push_frame(room, s, Frame(pk[i], i % 65536, i * 960))
        await asyncio.sleep(max(0.0, t0 + (i + 1) * 0.02 - loop.time()))
    await asyncio.sleep(3)
    cpu = time.process_time() - c0
    duration = n * 0.02
    await engine.rooms.end_room(room)
    await engine.close()

    # match each true utterance to the final of that speaker that arrived
    # first after it ended (finals of one speaker arrive in order)
    lat_final: list[float] = []
    lat_first: list[float] = []
    by_speaker: dict[str, list[float]] = {}
    for pid, at in finals.values():
        by_speaker.setdefault(pid, []).append(at)
    first_by_speaker: dict[str, list[float]] = {}
    for mid, at in firsts.items():
        if mid in finals:
            first_by_speaker.setdefault(finals[mid][0], []).append(at)
    missed = 0
    for s, tt in truth.items():
        arrivals = sorted(by_speaker.get(s, []))
        fa = sorted(first_by_speaker.get(s, []))
        for start, end in tt:
            after = [a for a in arrivals if a > t0 + end - 0.2]
            if not after:
                missed += 1
                continue
            lat_final.append(after[0] - (t0 + end))
            arrivals.remove(after[0])
            fi = [a for a in fa if a > t0 + start]
            if fi:
                lat_first.append(fi[0] - (t0 + start))
                fa.remove(fi[0])
    return {
        "utterances": sum(len(t) for t in truth.values()),
        "missed": missed,
        "final_p50": pct(lat_final, 50),
        "final_p95": pct(lat_final, 95),
        "first_p50": pct(lat_first, 50),
        "first_p95": pct(lat_first, 95),
        "cpu_pct": 100 * cpu / duration,
        "cpu_s": cpu,
        "duration_s": duration,
        "interims": interims[0],
        "rss_mb": rss_mb(),
    }


async def bench_silent(tmp: Path, listeners: int, seconds: float, flag: bool) -> dict[str, float]:
    engine = Engine(tmp / f"silent{flag}")
    await engine.start(preload=False)
    room = "quiet@conference.bench"
    await engine.rooms.start(room, "captions", RoomSettings())
    quiet = encode_opus(np.random.default_rng(0).normal(0, 0.001, SR).astype(np.float32))
    loop = asyncio.get_running_loop()
    n = int(seconds / 0.02)

    async def run(count: int) -> float:
        c0 = time.process_time()
        t0 = loop.time()
        for i in range(n):
            p = quiet[i % len(quiet)]
            for k in range(count):
                engine.rooms.push_frame(
                    room,
                    f"l{k}",
                    Frame(p, i % 65536, i * 960, voice=False if flag else None, level_dbov=None),
                )
            await asyncio.sleep(max(0.0, t0 + (i + 1) * 0.02 - loop.time()))
        return time.process_time() - c0

    base = await run(0)
    cost = await run(listeners)
    await engine.rooms.end_room(room)
    await engine.close()
    return {
        "listeners": listeners,
        "cpu_pct_of_core": 100 * (cost - base) / seconds,
        "per_listener_pct": 100 * (cost - base) / seconds / listeners,
    }


async def main(out: Path, quick: bool) -> None:
    with TemporaryDirectory() as d:
        tmp = Path(d)
        mem0 = rss_mb()
        rtf = await bench_rtf(tmp)
        mem_model = rss_mb()
        one = await bench_latency(tmp, 1, 1 if quick else 2)
        four = await bench_latency(tmp, 4, 1)
        silent_flag = await bench_silent(tmp, 50, 10 if quick else 20, True)
        silent_noflag = await bench_silent(tmp, 50, 10 if quick else 20, False)
    lines = [
        f"## Sidecar core — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "",
        f"Machine: {os.cpu_count()} cores ({cpu_model()}), "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, "
        f"Python {platform.python_version()}, no GPU. Model: tiny.en int8 (CTranslate2), "
        "beam 1, 2 workers. Command: `make bench` (`bench/run.py`).",
        "",
        "| what | figure |",
        "| --- | --- |",
        f"| real-time factor, one stream, file fed as fast as possible ({rtf['audio_s']:.0f} s "
        f"of speech) | {rtf['rtf']:.3f} (CPU {rtf['cpu_per_audio_s']:.2f} core-s per audio s) |",
        f"| 1 speaker: end of speech → final, p50 / p95 ({one['utterances']} utterances, "
        f"{one['missed']} missed) | {one['final_p50']:.2f} s / {one['final_p95']:.2f} s |",
        f"| 1 speaker: start of speech → first interim, p50 / p95 | {one['first_p50']:.2f} s / "
        f"{one['first_p95']:.2f} s |",
        f"| 1 speaker: process CPU | {one['cpu_pct']:.0f} % of one core |",
        f"| 4 speakers: end of speech → final, p50 / p95 ({four['utterances']} utterances, "
        f"{four['missed']} missed) | {four['final_p50']:.2f} s / {four['final_p95']:.2f} s |",
        f"| 4 speakers: start of speech → first interim, p50 / p95 | {four['first_p50']:.2f} s / "
        f"{four['first_p95']:.2f} s |",
        f"| 4 speakers: process CPU | {four['cpu_pct']:.0f} % of one core |",
        f"| 50 silent participants, sender VAD flag off (gated, not decoded) | "
        f"{silent_flag['cpu_pct_of_core']:.1f} % of one core "
        f"({silent_flag['per_listener_pct']:.3f} % each) |",
        f"| 50 silent participants, no flag (decoded + Silero VAD) | "
        f"{silent_noflag['cpu_pct_of_core']:.1f} % of one core "
        f"({silent_noflag['per_listener_pct']:.3f} % each) |",
        f"| memory: RSS at start / with tiny.en loaded / after 4 speakers / peak | "
        f"{mem0:.0f} / {mem_model:.0f} / {four['rss_mb']:.0f} / {peak_mb():.0f} MB |",
        "",
        "The silence duration (700 ms by default) is part of the end-of-speech → final "
        "latency: a final cannot come before the segmenter has heard that much silence.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    write_report(out, text)


def write_report(out: Path, text: str) -> None:
    header = "# Benchmarks\n\nNewest first. Each section names its machine, date and command.\n\n"
    old = out.read_text() if out.exists() else ""
    body = old[len(header) :] if old.startswith(header) else old
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(header + text + "\n" + body)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING)
    asyncio.run(main(args.out, args.quick))
