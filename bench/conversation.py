"""Conversational speech: streaming captions against offline decoding, short replies.

    .venv/bin/python bench/conversation.py [--narrow-band] [--gap 0.25] [--json out.json]

SYNTHETIC. No real multi-speaker conversational recordings with reference
transcripts could be had from the package registries this project may use
(Debian ships pocketsphinx-testdata, read speech; nothing conversational
turned up on PyPI under a usable licence), so this is the closest stand-in:
a two-person telephone call voiced by two espeak-ng voices, with quick
turn-taking (``--gap``), replies of one or two words, turns that overlap,
and with ``--narrow-band`` each track band-passed to 300-3400 Hz (the
telephone band, what an 8 kHz call keeps). espeak-ng is far cleaner than
real speech: figures from it are a floor, not a forecast.

Each speaker's track goes in as 20 ms Opus frames in real time, as the
videobridge would deliver it, into an in-process engine (one room). Scored
with the simulator's alignment (``sidecar.sim.conference._align``): each
reply missed or merged is counted, streaming WER is set against decoding
each speaker's whole track offline with the same model and beam.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path
from tempfile import TemporaryDirectory

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sidecar.audio import OpusDecoder, OpusEncoder  # noqa: E402
from sidecar.config import RoomSettings  # noqa: E402
from sidecar.engine import Engine  # noqa: E402
from sidecar.sim.conference import (  # noqa: E402
    ReceivedCaption,
    UtteranceResult,
    _align,
    word_error_rate,
)
from sidecar.sim.voices import build_conversation  # noqa: E402
from tests.conftest import play  # noqa: E402

SR = 16000

CALL = [
    ("caller", "Hi, I am calling about the delivery I ordered last week."),
    ("agent", "Sure."),
    ("agent", "Can you give me the order number please?"),
    ("caller", "Yes, it is four seven two nine."),
    ("agent", "Thanks."),
    ("agent", "I can see it here, it left the warehouse on Tuesday."),
    ("caller", "Okay."),
    ("caller", "So when will it arrive?"),
    ("agent", "It should be with you by Friday afternoon."),
    ("caller", "Friday?"),
    ("agent", "Yes."),
    ("caller", "That is too late, I need it for the weekend trip."),
    ("agent", "I understand."),
    ("agent", "I could send it by express courier instead."),
    ("caller", "How much would that cost?"),
    ("agent", "Twelve dollars."),
    ("caller", "Fine."),
    ("caller", "Please do that."),
    ("agent", "Done, it will arrive tomorrow morning."),
    ("caller", "Great, thank you very much."),
    ("agent", "You are welcome."),
    ("caller", "Bye."),
]


def narrow_band(pcm: np.ndarray, lo: float = 300.0, hi: float = 3400.0) -> np.ndarray:
    """The telephone band: what survives an 8 kHz narrow-band call."""
    spec = np.fft.rfft(pcm)
    freqs = np.fft.rfftfreq(len(pcm), 1 / SR)
    spec[(freqs < lo) | (freqs > hi)] = 0
    return np.fft.irfft(spec, len(pcm)).astype(np.float32)


def offline(engine: Engine, pcm: np.ndarray) -> str:
    model = engine.whisper._model("en")
    segs, _ = model.transcribe(
        pcm,
        language="en",
        beam_size=engine.whisper.options.beam_size,
        condition_on_previous_text=False,
        vad_filter=False,
    )
    return " ".join(s.text.strip() for s in segs)


def _through_opus(packets: list[bytes]) -> np.ndarray:
    dec = OpusDecoder()
    return np.concatenate([dec.decode(p) for p in packets])


async def run(gap: float, overlap: float, band: bool) -> dict[str, object]:
    conv = await asyncio.to_thread(
        build_conversation,
        CALL,
        {"caller": "en-us+m3", "agent": "en-us+f3"},
        gap=gap,
        overlap=overlap,
    )
    tracks = {s: (narrow_band(t) if band else t) for s, t in conv.tracks.items()}
    packets = {s: OpusEncoder().encode(t) for s, t in tracks.items()}
    with TemporaryDirectory() as tmp:
        engine = Engine(Path(tmp))
        await engine.start()
        room = "call@conference.bench"
        r = await engine.rooms.start(room, "captions", RoomSettings())
        got: list[tuple[float, object]] = []
        r.sinks.append(lambda c: got.append((time.monotonic(), c)))
        t0 = time.monotonic()
        await play(engine.rooms, room, packets)
        await asyncio.sleep(3)
        await engine.rooms.end_room(room)
        offline_text = {s: await asyncio.to_thread(offline, engine, t) for s, t in tracks.items()}
        # the same audio the streaming path decoded: after Opus at 32 kb/s
        received = {s: _through_opus(p) for s, p in packets.items()}
        offline_opus = {s: await asyncio.to_thread(offline, engine, t) for s, t in received.items()}
        await engine.close()

    rows: dict[str, list[UtteranceResult]] = {}
    for k, turn in enumerate(conv.turns):
        rows.setdefault(turn.speaker, []).append(
            UtteranceResult(turn.speaker, turn.speaker, k, turn.start, turn.end, turn.text, "")
        )
    first: dict[str, float] = {}
    finals: dict[str, list[ReceivedCaption]] = {}
    for at, c in got:
        if c.is_interim:  # type: ignore[attr-defined]
            first.setdefault(c.message_id, at)  # type: ignore[attr-defined]
            continue
        if not c.text.strip():  # type: ignore[attr-defined]
            continue
        finals.setdefault(c.participant_id, []).append(  # type: ignore[attr-defined]
            ReceivedCaption(
                c.participant_id,  # type: ignore[attr-defined]
                c.participant_id,  # type: ignore[attr-defined]
                c.text,  # type: ignore[attr-defined]
                False,
                c.message_id,  # type: ignore[attr-defined]
                1.0,
                0,
                at,
                0.0,
                t=at - t0,
            )
        )
    lat, first_lat, missed_short, missed, merged = [], [], [], 0, 0
    for s, turns in rows.items():
        pairs = _align(turns, finals.get(s, []))
        shared = Counter(id(f) for _, f, _ in pairs)
        for row, f, text in pairs:
            row.message_ids.append(f.message_id)
            row.hypothesis = f"{row.hypothesis} {text}".strip()
            row.final_latency = f.arrival - (t0 + row.end)
            row.merged |= shared[id(f)] > 1
        for row in turns:
            if row.missed:
                missed += 1
                if len((row.reference or "").split()) <= 2:
                    missed_short.append(row.reference)
            elif row.merged:
                merged += 1
            elif row.final_latency is not None:
                lat.append(row.final_latency)
            fi = [first[m] for m in row.message_ids if m in first]
            if fi:
                first_lat.append(min(fi) - (t0 + row.start))
    per_turn = [
        {
            "speaker": r.speaker,
            "start": round(r.start, 2),
            "end": round(r.end, 2),
            "reference": r.reference,
            "caption": r.hypothesis,
            "state": "missed" if r.missed else "merged" if r.merged else "served",
            "final_latency": None if r.final_latency is None else round(r.final_latency, 2),
        }
        for r in sorted((r for rs in rows.values() for r in rs), key=lambda r: r.start)
    ]
    refs = {s: " ".join(t.text for t in conv.turns if t.speaker == s) for s in rows}
    hyps = {s: " ".join(f.text for f in finals.get(s, [])) for s in rows}
    stream_wer = word_error_rate(list(refs.values()), list(hyps.values()))
    offline_wer = word_error_rate(list(refs.values()), [offline_text[s] for s in refs])
    offline_opus_wer = word_error_rate(list(refs.values()), [offline_opus[s] for s in refs])
    short = [t for t in conv.turns if len(t.text.split()) <= 2]
    return {
        "synthetic": True,
        "narrow_band": band,
        "gap_s": gap,
        "turns": len(conv.turns),
        "short_replies": len(short),
        "short_replies_missed": missed_short,
        "missed": missed,
        "merged": merged,
        "streaming_wer": stream_wer,
        "offline_wer": offline_wer,
        "offline_opus_wer": offline_opus_wer,
        "final_p50": float(np.percentile(lat, 50)) if lat else None,
        "final_p95": float(np.percentile(lat, 95)) if lat else None,
        "first_interim_p95": float(np.percentile(first_lat, 95)) if first_lat else None,
        "captions": {s: [f.text for f in finals.get(s, [])] for s in rows},
        "turns_detail": per_turn,
        "offline": offline_text,
        "load": os.getloadavg()[0],
    }


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--narrow-band", action="store_true")
    ap.add_argument("--gap", type=float, default=0.25)
    ap.add_argument("--overlap", type=float, default=0.0)
    ap.add_argument(
        "--context", type=int, default=None, help="context_words of the streams (default: theirs)"
    )
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.context is not None:
        import functools

        import sidecar.rooms
        from sidecar.asr.streaming import StreamOptions

        sidecar.rooms.StreamOptions = functools.partial(  # type: ignore[misc]
            StreamOptions, context_words=args.context
        )
    res = await run(args.gap, args.overlap, args.narrow_band)
    res["context_words"] = args.context
    for k, v in res.items():
        print(f"{k}: {v}")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    asyncio.run(main())
