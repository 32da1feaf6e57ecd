"""What recognition costs per speaker-hour, and the latency it buys.

    .venv/bin/python bench/cost.py [--speakers 1] [--rounds 2] [--policy adaptive|fixed]

Plays librivox speech (pocketsphinx-testdata) as 20 ms Opus frames in real
time into an in-process engine (the same run as ``bench/run.py``'s latency
bench: 1.5 s between utterances) and reports the process CPU time it took,
as core-seconds per speaker-hour of the run and per hour of speech, beside
first-interim and final latency. CPU time, not wall time: the figure holds on
a machine shared with other work; the latencies do not (load is printed).

``--policy fixed`` restores the interim policy before issue 8 (an interim
every 400 ms of new audio, back to back, whatever the load), so both can be
measured by the same code on the same machine.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from tempfile import TemporaryDirectory

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.run import bench_latency, speaker_track  # noqa: E402
from sidecar.asr import scheduler as scheduler_mod  # noqa: E402
from sidecar.asr import streaming  # noqa: E402
from tests.conftest import librivox  # noqa: E402


def use_fixed_policy() -> None:
    """The interim policy of before issue 8, on today's code."""
    fields = {f.name for f in dataclasses.fields(streaming.StreamOptions)}
    if "interim_duty" in fields:
        streaming.StreamOptions.__dataclass_fields__["interim_duty"].default = 0.0
        streaming.StreamOptions.__init__.__kwdefaults__["interim_duty"] = 0.0
    if hasattr(scheduler_mod.Scheduler, "adaptive"):
        scheduler_mod.Scheduler.adaptive = False


def speech_seconds(rounds: int) -> float:
    """Seconds of speech (first to last loud sample) in one speaker's track."""
    librivox()
    _, truth = speaker_track(0.5, list(range(5)) * rounds)
    return sum(e - s for s, e in truth)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--speakers", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2, help="passes over the 5 utterances")
    ap.add_argument("--policy", choices=("adaptive", "fixed"), default="adaptive")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.policy == "fixed":
        use_fixed_policy()
    load0 = os.getloadavg()[0]
    c0 = time.process_time()
    with TemporaryDirectory() as tmp:
        r = await bench_latency(Path(tmp), args.speakers, args.rounds)
    load1 = os.getloadavg()[0]
    duration = r["duration_s"]
    speech = speech_seconds(args.rounds)
    per_speaker_cpu = r["cpu_s"] / args.speakers
    out = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "policy": args.policy,
        "speakers": args.speakers,
        "utterances": r["utterances"],
        "missed": r["missed"],
        "cpu_s": round(r["cpu_s"], 1),
        "run_s": round(duration, 1),
        "core_pct": round(100 * r["cpu_s"] / duration, 1),
        "core_s_per_speaker_hour": round(per_speaker_cpu / duration * 3600),
        "core_s_per_speech_hour": round(per_speaker_cpu / speech * 3600),
        "interims": r.get("interims", 0),
        "first_p50": round(r["first_p50"], 2),
        "first_p95": round(r["first_p95"], 2),
        "final_p50": round(r["final_p50"], 2),
        "final_p95": round(r["final_p95"], 2),
        "load": f"{load0:.1f} -> {load1:.1f}",
        "process_cpu_total_s": round(time.process_time() - c0, 1),
    }
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:>26}: {v}")


if __name__ == "__main__":
    asyncio.run(main())
