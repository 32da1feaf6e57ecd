"""Child process for the sidecar crash test: a real Sidecar whose webhook endpoint is down.

Switches a room on and off (events for the webhook), waits until they are in
the outbox, prints ``QUEUED <event ids...>`` and sleeps until it is killed.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from sidecar.config import load_config
from sidecar.room_events import RoomEvent
from sidecar.server import Sidecar


async def main(config: Path) -> None:
    sidecar = Sidecar(load_config(config, env={}))
    seen: list[RoomEvent] = []
    sidecar.events.add_listener("test", seen.append)
    await sidecar.start(preload=False)
    room = "crashy@conference.example.org"
    await sidecar.rooms.start(room, "transcription", requested_by="prosody")
    await sidecar.rooms.start(room, "captions", requested_by="prosody")
    await sidecar.rooms.end_room(room)
    assert sidecar.outputs.webhooks is not None
    await sidecar.outputs.webhooks.flushed()
    wanted = [e.id for e in seen if not e.type.startswith("caption.")]
    print("QUEUED " + " ".join(wanted), flush=True)
    await asyncio.sleep(3600)


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1])))
