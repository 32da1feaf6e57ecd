"""The same speech delivered in different patterns, in process: finals, WER, latency.

    .venv/bin/python bench/delivery.py [--patterns frames-20ms,chunks-1s,...]
        [--rounds 2] [--parallel] [--json out.json]

Each pattern (see ``sidecar.sim.delivery``) feeds the librivox utterances of
pocketsphinx-testdata (1 s of silence between them) into its own room, in
real time, as one participant. A correct pipeline gives every pattern one
final per utterance and the same words; only the latency may differ (a
sender that holds 2 s of audio before sending it cannot be captioned sooner).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import jiwer
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sidecar.audio import load_audio  # noqa: E402
from sidecar.config import RoomSettings  # noqa: E402
from sidecar.engine import Engine  # noqa: E402
from sidecar.sim.delivery import PATTERNS, feed, schedule  # noqa: E402
from tests.conftest import librivox, normalise  # noqa: E402

SR = 16000


def track(rounds: int, gap_s: float = 1.0) -> tuple[np.ndarray, list[tuple[float, float, str]]]:
    """The corpus ``rounds`` times; returns PCM and (speech start, speech end, text)."""
    parts = [np.zeros(SR // 2, np.float32)]
    t = 0.5
    truth = []
    for _ in range(rounds):
        for wav, text in librivox():
            a = load_audio(wav)
            idx = np.flatnonzero(np.abs(a) > 0.02)
            s0, s1 = (idx[0], idx[-1]) if len(idx) else (0, len(a))
            truth.append((t + s0 / SR, t + s1 / SR, text))
            parts += [a, np.zeros(int(gap_s * SR), np.float32)]
            t += len(a) / SR + gap_s
    parts.append(np.zeros(2 * SR, np.float32))
    return np.concatenate(parts), truth


async def run_pattern(
    engine: Engine, pattern: str, pcm: np.ndarray, truth: list[tuple[float, float, str]]
) -> dict[str, object]:
    room = f"{pattern.replace('.', '_')}@conference.bench"
    r = await engine.rooms.start(room, "captions", RoomSettings())
    loop = asyncio.get_running_loop()
    finals: list[tuple[float, str]] = []
    r.sinks.append(
        lambda c: finals.append((time.monotonic(), c.text)) if not c.is_interim and c.text else None
    )
    items = schedule(pattern, pcm)
    t0 = await feed(engine.rooms, room, "reader", items)
    await asyncio.sleep(3.0)
    await engine.rooms.end_room(room)
    del loop
    hyp = normalise(" ".join(t for _, t in finals))
    ref = normalise(" ".join(t for _, _, t in truth))
    lat = []
    arrivals = [a for a, _ in finals]
    for _, end, _ in truth:
        after = [a for a in arrivals if a > t0 + end - 0.2]
        if after:
            lat.append(after[0] - (t0 + end))
            arrivals.remove(after[0])
    return {
        "pattern": pattern,
        "messages": len(items),
        "utterances": len(truth),
        "finals": len(finals),
        "wer": jiwer.wer(ref, hyp),
        "final_p50": float(np.percentile(lat, 50)) if lat else None,
        "final_p95": float(np.percentile(lat, 95)) if lat else None,
        "texts": [t for _, t in finals],
    }


def _s(v: object) -> str:
    return "—" if v is None else f"{float(v):.2f} s"  # type: ignore[arg-type]


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--patterns", default=",".join(PATTERNS))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--parallel", action="store_true", help="all patterns at once (faster)")
    ap.add_argument("--context", type=int, default=None, help="context_words of the streams")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.context is not None:
        import functools

        import sidecar.rooms
        from sidecar.asr.streaming import StreamOptions

        sidecar.rooms.StreamOptions = functools.partial(  # type: ignore[misc]
            StreamOptions, context_words=args.context
        )
    pcm, truth = track(args.rounds)
    with TemporaryDirectory() as tmp:
        engine = Engine(Path(tmp))
        await engine.start()
        pats = args.patterns.split(",")
        if args.parallel:
            rows = await asyncio.gather(*(run_pattern(engine, p, pcm, truth) for p in pats))
        else:
            rows = [await run_pattern(engine, p, pcm, truth) for p in pats]
        await engine.close()
    load = os.getloadavg()[0]
    print(f"{len(truth)} utterances, load {load:.2f}")
    print("| delivery | messages | finals | WER | final p50 | final p95 |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        p50, p95 = (_s(row["final_p50"]), _s(row["final_p95"]))
        print(
            f"| {row['pattern']} | {row['messages']} | {row['finals']} / {row['utterances']} "
            f"| {100 * float(row['wer']):.1f} % | {p50} | {p95} |"  # type: ignore[arg-type]
        )
    if args.json:
        args.json.write_text(json.dumps({"load": load, "rows": rows}, indent=1))


if __name__ == "__main__":
    asyncio.run(main())
