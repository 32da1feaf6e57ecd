"""The live demo: a short meeting of three synthetic voices, captioned live.

It starts the sidecar (local Whisper, nothing configured) and the conference
simulator, which plays the meeting as jitsi-videobridge does: one mediajson
WebSocket, 20 ms Opus frames per participant in real time, with the sender's
voice flag and audio level. Captions come back on that socket and are shown
as a participant sees them: interims updating in place, then the final.
The transcript files are listed at the end.
"""

from __future__ import annotations

import secrets
import sys
import time
import uuid
from pathlib import Path

from sidecar.config import load_config
from sidecar.server import Sidecar
from sidecar.sim.conference import ReceivedCaption, SimConfig, SimParticipant, run_conference

SCRIPT = [
    ("Alice", "Good morning everyone. Let's start with the release plan for next week."),
    ("Bob", "The build is green and the installer works on a fresh server."),
    ("Carol", "I still need to check the captions on the mobile app."),
    ("Alice", "Great. Please send me the results by Thursday."),
    ("Bob", "Will do. Thanks everyone."),
]


class TerminalView:
    """Finals scroll up; each speaker's interim is redrawn in place below them."""

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

    def show(self, name: str, text: str, interim: bool) -> None:
        t = time.monotonic() - self.t0
        self._clear()
        if interim:
            self.interims[name] = text
        else:
            self.interims.pop(name, None)
            if text:
                self.out.write(f"[{t:5.1f}s] {name}: {text}\n")
        self._draw()
        self.out.flush()


async def run_demo(out_dir: Path, *, realtime: bool = True) -> int:
    token = secrets.token_urlsafe(16)
    config = load_config(
        None,
        env={
            "CAPTIONS_SERVER_TOKEN": token,
            "CAPTIONS_SERVER_GRPC_LISTEN": "127.0.0.1:0",
            "CAPTIONS_SERVER_HTTP_LISTEN": "127.0.0.1:0",
            "CAPTIONS_STORE_STORE_DIR": str(out_dir),
        },
    )
    print("Starting the captions sidecar on local Whisper (tiny.en, no network)…", flush=True)
    sidecar = Sidecar(config)
    await sidecar.start()
    room = "demo@conference.localhost"
    meeting = str(uuid.uuid4())
    view = TerminalView()
    sim = SimConfig(
        participants=[SimParticipant(name=n) for n in ("Alice", "Bob", "Carol")],
        script=SCRIPT,
        url=f"ws://127.0.0.1:{sidecar.ports.http}/mediajson/{meeting}",
        room=room,
        token=token,
        grpc=f"127.0.0.1:{sidecar.ports.grpc}",
        realtime=realtime,
        listeners=5,
        gap=0.9,
        on_caption=lambda c: view.show(c.participant_name, c.text, c.is_interim),
    )
    print(
        "Playing a three-person meeting as the videobridge would (plus 5 silent listeners);\n"
        "captions appear as they are spoken:\n",
        flush=True,
    )
    view.t0 = time.monotonic()
    try:
        report = await run_conference(sim)
    finally:
        await sidecar.stop()
    print(
        f"\n{report.finals} captions for {len(report.utterances)} utterances; final caption "
        f"{_fmt(report.final_latency_p50)} after the end of speech (median), first interim "
        f"{_fmt(report.first_interim_latency_p50)} after its start."
    )
    metas = sidecar.store.list(room)
    if metas:
        folder = sidecar.outputs.local.root / metas[0].id
        print("Transcript saved:")
        for f in sorted(folder.iterdir()):
            print(f"  {f}")
    return 0 if report.finals else 1


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f} s"


__all__ = ["ReceivedCaption", "run_demo"]
