"""Latency of the cloud recogniser paths through local stand-ins of the services.

    .venv/bin/python bench/providers.py [--out docs/benchmarks.md] [--utterances 20]

The real Azure SDK and the real Google client talk to the loopback servers
of ``tests/fakes`` (which answer at once), one speaker in real time (20 ms
frames). What is measured is therefore what the sidecar and the SDK add on
top of the provider's own recognition time:

- end of the utterance (the stream's ``end()``) -> final delivered;
- the service's last answer of the utterance leaving the server (Google:
  the final result; Azure: ``turn.end``, which closes the turn) -> final
  delivered to the room;
- the service's interim leaving the server -> interim delivered.

Through the real services, add their recognition time and the network.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sidecar.asr.base import Hypothesis  # noqa: E402
from sidecar.asr.provider import StreamSettings  # noqa: E402
from tests.fakes import codebook  # noqa: E402

TEXTS = [
    "hello world this is a test of the captions sidecar",
    "we are speaking about the weather tomorrow morning",
    "please send notes about the budget plan next week",
    "good idea thanks everyone first item of the agenda",
]


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.array(xs), q)) if xs else float("nan")


async def run_provider(kind: str, n: int) -> dict[str, Any]:
    delivered: list[tuple[Hypothesis, float]] = []

    def on_result(h: Hypothesis) -> None:
        delivered.append((h, time.monotonic()))

    if kind == "google":
        from sidecar.asr.google import GoogleOptions, GoogleProvider
        from tests.fakes.google_speech import FakeGoogleSpeech

        gfake = FakeGoogleSpeech()
        await gfake.start()
        provider: Any = GoogleProvider(GoogleOptions(endpoint=gfake.endpoint, insecure=True))
        fake: Any = gfake
    else:
        from sidecar.asr.azure import AzureOptions, AzureProvider
        from tests.fakes.azure_speech import FakeAzureSpeech

        afake = FakeAzureSpeech()
        await afake.start()
        provider = AzureProvider(AzureOptions(key="KEY", host=afake.host))
        fake = afake
    await provider.start()
    stream = provider.open_stream(StreamSettings(language="en-US"), on_result)
    ended: dict[str, float] = {}
    for i in range(n):
        uid = f"u{i}"
        audio = codebook.encode(TEXTS[i % len(TEXTS)])
        t0 = time.monotonic()
        stream.begin(uid, audio[:320])
        for k, j in enumerate(range(320, len(audio), 320)):
            stream.push(audio[j : j + 320])
            await asyncio.sleep(max(0.0, t0 + (k + 1) * 0.02 - time.monotonic()))
        stream.end(len(audio))
        ended[uid] = time.monotonic()
        await asyncio.wait_for(stream.drain(), 30)
        await asyncio.sleep(0.3)
    await stream.aclose()
    await provider.aclose()
    await fake.stop()

    finals = {h.utterance_id: t for h, t in delivered if h.is_final}
    end_to_final = [finals[u] - ended[u] for u in ended if u in finals]
    # the service's answers, in the order of the utterances
    if kind == "google":
        last = [c.sent[-1][1] for c in fake.calls if c.sent]
        interims_sent = [t for c in fake.calls for what, t in c.sent if what.startswith("interim:")]
    else:
        # one connection per utterance; its first turn.end closes the utterance
        last = [
            next(t for path, _, t in c.sent if path == "turn.end")
            for c in fake.connections
            if any(path == "turn.end" for path, _, _ in c.sent)
        ]
        interims_sent = [
            t for c in fake.connections for path, _, t in c.sent if path == "speech.hypothesis"
        ]
    answer_to_final = [finals[f"u{i}"] - t for i, t in enumerate(last) if f"u{i}" in finals]
    interims_got = [t for h, t in delivered if not h.is_final]
    # pair each interim delivered with the latest interim sent before it
    interim_lag = []
    sent_sorted = sorted(interims_sent)
    for t in interims_got:
        before = [s for s in sent_sorted if s <= t]
        if before:
            interim_lag.append(t - before[-1])
    return {
        "n": n,
        "finals": len(finals),
        "end_to_final": end_to_final,
        "answer_to_final": answer_to_final,
        "interim_lag": interim_lag,
    }


def ms(x: float) -> str:
    return f"{x * 1000:.1f} ms"


async def main(out: Path | None, n: int) -> None:
    rows = []
    for kind, label in (("azure", "Azure (azure-cognitiveservices-speech"), ("google", "Google")):
        r = await run_provider(kind, n)
        if kind == "azure":
            import azure.cognitiveservices.speech as speechsdk

            label += f" {speechsdk.__version__}, WebSocket)"
        else:
            from google.cloud import speech_v1

            label = f"Google (google-cloud-speech {speech_v1.__version__}, gRPC)"
        rows.append(
            f"| {label} | {r['finals']} / {r['n']} "
            f"| {ms(pct(r['end_to_final'], 50))} / {ms(pct(r['end_to_final'], 95))} "
            f"| {ms(pct(r['answer_to_final'], 50))} / {ms(pct(r['answer_to_final'], 95))} "
            f"| {ms(pct(r['interim_lag'], 50))} / {ms(pct(r['interim_lag'], 95))} |"
        )
    lines = [
        f"## Cloud recognisers through local services — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "",
        f"Machine: {os.cpu_count()} cores, Python {platform.python_version()}; other jobs were "
        "running (figures are noisy). The real SDKs against the loopback stand-ins in "
        "`tests/fakes/` (they answer at once), one speaker in real time, "
        f"{n} utterances of about 2.5 s each. Command: `bench/providers.py`.",
        "",
        "| path | finals | end of utterance → final, p50 / p95 | service's last answer → "
        "final delivered, p50 / p95 | service's interim → interim delivered, p50 / p95 |",
        "| --- | --- | --- | --- | --- |",
        *rows,
        "",
        "The middle column is what the sidecar and the SDK add to the provider's own "
        "latency. Azure's final is released when the service's `turn.end` closes the "
        "turn (the SDK's end-of-stream), Google's when the call completes after its "
        "final result. Whisper figures: see the sections below (unchanged by this path).",
    ]
    text = "\n".join(lines)
    print(text)
    if out is not None:
        from bench.run import write_report

        write_report(out, text)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--utterances", type=int, default=20)
    args = ap.parse_args()
    asyncio.run(main(args.out, args.utterances))
