"""SIGKILL in the middle of a session loses no final that was shown."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar.store.local import LocalDirStore

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def test_sigkill_mid_session_keeps_every_emitted_final(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.crash_child", str(tmp_path)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    emitted: list[str] = []
    tid = ""
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("TRANSCRIPT "):
                tid = line.split()[1]
            elif line.startswith("FINAL "):
                emitted.append(line.split()[1])
                if len(emitted) == 3:
                    os.kill(proc.pid, signal.SIGKILL)  # mid-session, mid-speech
                    break
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert tid and len(emitted) == 3

    store = LocalDirStore(tmp_path)
    lines = store.get(tid, "jsonl").decode().splitlines()
    ids = [json.loads(x)["message_id"] for x in lines]
    for mid in emitted:
        assert mid in ids

    # the next start finishes the cut-off session: rendered, marked incomplete
    recovered = store.recover()
    assert [m.id for m in recovered] == [tid]
    assert not recovered[0].complete
    srt = store.get(tid, "srt").decode()
    assert srt.count(" --> ") == len(lines)
