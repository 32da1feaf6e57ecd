"""Real speech through the streaming pipeline, against offline decoding.

The librivox utterances of pocketsphinx-testdata go in as 20 ms Opus frames
in real-time order and pace, one participant. What comes out must be as
accurate as decoding each whole file offline with the same model (word
error rate at most 2 points worse), and interim captions must never rewrite
the words they already showed as stable.
"""

from __future__ import annotations

import asyncio

import jiwer
import numpy as np
import pytest

from sidecar.audio import encode_opus, load_audio
from sidecar.config import RoomSettings
from sidecar.engine import Engine
from tests.conftest import collect, librivox, normalise, play

pytestmark = pytest.mark.slow


def _offline(engine: Engine, wavs: list) -> list[str]:
    model = engine.whisper._model("en")
    out = []
    for wav in wavs:
        segs, _ = model.transcribe(
            str(wav),
            language=None,
            beam_size=engine.whisper.options.beam_size,
            condition_on_previous_text=False,
            vad_filter=False,
        )
        out.append(" ".join(s.text.strip() for s in segs))
    return out


async def test_streaming_wer_close_to_offline_and_interims_stable(tmp_path):
    corpus = librivox()
    engine = Engine(tmp_path)
    await engine.start()
    room = "wer@conference.test"
    await engine.rooms.start(room, "transcription", RoomSettings())
    await engine.rooms.start(room, "captions")
    got = await collect(engine, room)

    gap = np.zeros(16000, np.float32)  # 1 s between utterances
    pcm = np.concatenate([x for wav, _ in corpus for x in (load_audio(wav), gap)])
    packets = encode_opus(pcm)
    await play(engine.rooms, room, {"reader": packets})
    await asyncio.sleep(1.5)
    r = engine.rooms.get(room)
    tid = r.transcript_id
    await engine.rooms.end_room(room)

    finals = [c for _, c in got if not c.is_interim and c.text]
    hyp = normalise(" ".join(c.text for c in finals))
    ref = normalise(" ".join(t for _, t in corpus))
    offline = normalise(" ".join(_offline(engine, [w for w, _ in corpus])))
    wer_stream = jiwer.wer(ref, hyp)
    wer_offline = jiwer.wer(ref, offline)
    print(f"\nstreaming WER {wer_stream:.3f}  offline WER {wer_offline:.3f}")
    print("streaming:", hyp)
    print("offline:  ", offline)
    assert wer_stream <= wer_offline + 0.02

    # one final per utterance, each with a message id its interims shared
    assert len(finals) == len(corpus)
    interims = [c for _, c in got if c.is_interim]
    assert interims, "no interim captions were produced"
    final_ids = {c.message_id for c in finals}
    assert {c.message_id for c in interims} <= final_ids

    # the stable prefix of an interim is never rewritten by a later interim
    by_id: dict[str, list] = {}
    for c in interims:
        by_id.setdefault(c.message_id, []).append(c)
    for seq in by_id.values():
        for k, c in enumerate(seq):
            words = c.text.split()
            stable = words[: round(c.stability * len(words))]
            for later in seq[k + 1 :]:
                assert later.text.split()[: len(stable)] == stable, (c.text, later.text)

    # every final is in the transcript on disk, in order
    lines = engine.store.get(tid, "jsonl").decode().splitlines()
    assert len(lines) == len(finals)
    await engine.close()
