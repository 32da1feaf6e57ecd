"""Does batching several speakers' decodes into one call help on this CPU?

    .venv/bin/python bench/batch.py [--speakers 8] [--repeats 3] [--threads 2]

Takes one librivox utterance per speaker (pocketsphinx-testdata) and decodes
them with tiny.en int8 (greedy, no timestamps, as the sidecar does) two ways:
one ``WhisperModel.transcribe`` per speaker, one after the other (today's
scheduler), and one CTranslate2 ``encode`` + ``generate`` over all speakers'
padded mel features in a single batch. Prints process CPU time and wall
time per round, and whether both ways gave the same words.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sidecar.asr.models import resolve_model  # noqa: E402
from sidecar.audio import load_audio  # noqa: E402
from tests.conftest import librivox  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--speakers", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import ctranslate2
    from faster_whisper import WhisperModel
    from faster_whisper.audio import pad_or_trim
    from faster_whisper.tokenizer import Tokenizer

    model = WhisperModel(
        str(resolve_model("tiny.en", Path("~/.cache/jitsi-captions").expanduser())),
        device="cpu",
        compute_type="int8",
        cpu_threads=args.threads,
        local_files_only=True,
    )
    corpus = librivox()
    clips = [load_audio(corpus[i % len(corpus)][0]) for i in range(args.speakers)]
    tok = Tokenizer(model.hf_tokenizer, False, task="transcribe", language="en")
    prompt = [*tok.sot_sequence, tok.no_timestamps]

    def sequential() -> list[str]:
        out = []
        for a in clips:
            segs, _ = model.transcribe(
                a,
                language=None,
                beam_size=1,
                best_of=1,
                temperature=0.0,
                condition_on_previous_text=False,
                without_timestamps=True,
                vad_filter=False,
            )
            out.append(" ".join(s.text.strip() for s in segs).strip())
        return out

    def batched() -> list[str]:
        feats = np.stack([pad_or_trim(model.feature_extractor(a)) for a in clips])
        enc = model.model.encode(ctranslate2.StorageView.from_array(feats.astype(np.float32)))
        res = model.model.generate(
            enc,
            [prompt] * len(clips),
            beam_size=1,
            max_length=224,
            suppress_blank=True,
            suppress_tokens=[-1],
        )
        return [tok.decode([t for t in r.sequences_ids[0] if t < tok.eot]).strip() for r in res]

    for name, fn in (("sequential", sequential), ("batched", batched)):
        fn()  # warm up
        cpu, wall = [], []
        for _ in range(args.repeats):
            c0, t0 = time.process_time(), time.perf_counter()
            words = fn()
            cpu.append(time.process_time() - c0)
            wall.append(time.perf_counter() - t0)
        print(
            f"{name:>10}: {args.speakers} utterances "
            f"({sum(len(a) for a in clips) / 16000:.1f} s of audio), "
            f"CPU {min(cpu):.2f} core-s, wall {min(wall):.2f} s (best of {args.repeats}), "
            f"load {os.getloadavg()[0]:.1f}"
        )
        print(f"{'':>12}{words[0]!r}")
        if name == "sequential":
            ref = words
        else:
            same = sum(a == b for a, b in zip(ref, words, strict=True))
            print(f"{'':>12}same words as sequential: {same} / {len(words)}")


if __name__ == "__main__":
    main()
