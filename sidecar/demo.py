"""The live demo: a short meeting of three synthetic voices, captioned live.

Audio goes in as 20 ms Opus frames per participant in real time, as a
videobridge would send it; captions are shown as a participant sees them
(interims updating in place, then the final), and the transcript files are
listed at the end.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

from sidecar.audio import OpusEncoder
from sidecar.config import RoomSettings
from sidecar.engine import Engine
from sidecar.events import Caption, Frame
from sidecar.rooms import Participant
from sidecar.sim.voices import build_conversation

SCRIPT = [
    ("alice", "Good morning everyone. Let's start with the release plan for next week."),
    ("bob", "The build is green and the installer works on a fresh server."),
    ("carol", "I still need to check the captions on the mobile app."),
    ("alice", "Great. Please send me the results by Thursday."),
    ("bob", "Will do. Thanks everyone."),
]
NAMES = {"alice": "Alice", "bob": "Bob", "carol": "Carol"}


class TerminalView:
    """Finals scroll up; each speaker's interim is redrawn in place below."""

    def __init__(self, stream=sys.stdout) -> None:  # type: ignore[no-untyped-def]
        self.out = stream
        self.tty = stream.isatty()
        self.interims: dict[str, str] = {}
        self.drawn = 0
        self.t0 = time.monotonic()

    def _clear(self) -> None:
        if self.tty and self.drawn:
            self.out.write(f"\x1b[{self.drawn}F\x1b[J")
            self.drawn = 0

    def _draw(self) -> None:
        if not self.tty:
            return
        for name, text in self.interims.items():
            self.out.write(f"\x1b[2m  {name}: {text} …\x1b[0m\n")
        self.drawn = len(self.interims)

    def show(self, cap: Caption) -> None:
        t = time.monotonic() - self.t0
        self._clear()
        if cap.is_interim:
            self.interims[cap.participant_name] = cap.text
        else:
            self.interims.pop(cap.participant_name, None)
            if cap.text:
                self.out.write(f"[{t:5.1f}s] {cap.participant_name}: {cap.text}\n")
        self._draw()
        self.out.flush()


async def run_demo(out_dir: Path, *, realtime: bool = True) -> int:
    print("Synthesising a short meeting (espeak-ng, three voices)…", flush=True)
    conv = await asyncio.to_thread(build_conversation, SCRIPT, gap=0.9)
    engine = Engine(out_dir)
    print("Loading local Whisper (tiny.en, no network)…", flush=True)
    await engine.start()
    room = "demo@conference.localhost"
    await engine.rooms.update_roster(room, [Participant(k, v) for k, v in NAMES.items()])
    view = TerminalView()
    r = await engine.rooms.start(room, "transcription", RoomSettings(), requested_by="demo")
    await engine.rooms.start(room, "captions")
    r.sinks.append(view.show)
    print(
        f"Meeting of {conv.duration:.0f} s starts; captions appear as they are spoken:\n",
        flush=True,
    )
    encoders = {s: OpusEncoder() for s in conv.tracks}
    packets = {s: encoders[s].encode(track) for s, track in conv.tracks.items()}
    n = min(len(p) for p in packets.values())
    t0 = time.monotonic()
    view.t0 = t0
    for i in range(n):
        for s, pk in packets.items():
            engine.rooms.push_frame(room, s, Frame(pk[i], i % 65536, i * 960))
        if realtime:
            await asyncio.sleep(max(0.0, t0 + (i + 1) * 0.02 - time.monotonic()))
        elif i % 50 == 0:
            await asyncio.sleep(0)
    tid = r.transcript_id
    await engine.rooms.end_room(room)
    await engine.close()
    folder = engine.store.root / tid
    print("\nTranscript saved:")
    for f in sorted(folder.iterdir()):
        print(f"  {f}")
    return 0
