"""The command line: ``transcribe`` on audio and video files, errors, ``serve`` config errors."""

from __future__ import annotations

import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av
import jiwer
import numpy as np
import pytest

from sidecar.audio import load_audio
from tests.conftest import librivox, normalise

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def make_video(path: Path, pcm: np.ndarray) -> None:
    """An MP4 with a moving picture and the speech as AAC, like a recorded meeting."""
    with av.open(str(path), "w") as out:
        v = out.add_stream("mpeg4", rate=10)
        v.width, v.height, v.pix_fmt = 64, 48, "yuv420p"
        a = out.add_stream("aac", rate=16000)
        a.layout = "mono"
        for i in range(int(len(pcm) / 16000 * 10)):
            img = np.full((48, 64, 3), (i * 7) % 255, np.uint8)
            for p in v.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(p)
        step = 1024
        for i in range(0, len(pcm), step):
            chunk = pcm[i : i + step]
            frame = av.AudioFrame.from_ndarray(chunk.reshape(1, -1), format="flt", layout="mono")
            frame.sample_rate = 16000
            frame.pts = i
            frame.time_base = Fraction(1, 16000)
            for p in a.encode(frame):
                out.mux(p)
        for p in [*v.encode(None), *a.encode(None)]:
            out.mux(p)


@pytest.mark.slow
def test_transcribe_audio_and_video_files(tmp_path):
    (wav, ref) = librivox()[0]
    video = tmp_path / "meeting.mp4"
    make_video(video, load_audio(wav))
    out = tmp_path / "subs"
    res = run("transcribe", str(wav), str(video), "--format", "srt", "--out", str(out), "--quiet")
    assert res.returncode == 0, res.stderr
    for name in (Path(wav).stem, "meeting"):
        srt = (out / f"{name}.srt").read_text()
        assert srt.startswith("1\n00:00:")
        assert " --> " in srt
        text = " ".join(
            line.split(": ", 1)[1]
            for line in srt.splitlines()
            if ": " in line and "-->" not in line
        )
        assert jiwer.wer(normalise(ref), normalise(text)) < 0.25, text


def test_transcribe_reports_unreadable_files_and_goes_on(tmp_path):
    junk = tmp_path / "junk.mp3"
    junk.write_bytes(b"this is not audio" * 100)
    res = run("transcribe", str(junk), "--out", str(tmp_path), "--quiet", "--format", "txt")
    assert res.returncode == 1
    assert "junk.mp3" in res.stdout + res.stderr
    res = run("transcribe", str(junk), "--language", "xx-YY")
    assert res.returncode == 2 and "language" in res.stderr


def test_serve_without_a_token_says_what_to_set(tmp_path):
    res = run("serve", env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert res.returncode == 2
    assert "server.token" in res.stderr and "CAPTIONS_SERVER_TOKEN" in res.stderr
