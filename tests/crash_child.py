"""Child process for the crash test: a room transcribing real speech.

Prints ``FINAL <message_id>`` for every final as it is published (after the
room has written it), then keeps going until it is killed.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import numpy as np

from sidecar.audio import encode_opus, load_audio
from sidecar.config import RoomSettings
from sidecar.engine import Engine
from tests.conftest import librivox, play


async def main(store: Path) -> None:
    engine = Engine(store)
    await engine.start()
    room = "crash@conference.test"
    r = await engine.rooms.start(room, "transcription", RoomSettings())
    await engine.rooms.start(room, "captions")
    print(f"TRANSCRIPT {r.transcript_id}", flush=True)

    def sink(c):  # type: ignore[no-untyped-def]
        if not c.is_interim and c.text:
            print(f"FINAL {c.message_id}", flush=True)

    r.sinks.append(sink)
    gap = np.zeros(12000, np.float32)
    pcm = np.concatenate([x for wav, _ in librivox() for x in (load_audio(wav), gap)])
    packets = encode_opus(pcm)
    await play(engine.rooms, room, {"reader": packets})
    await asyncio.sleep(3600)


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1])))
