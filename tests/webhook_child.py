"""Child process for the webhook crash test.

Publishes ``N`` room events to a webhook endpoint that is down, waits until
they are all in the outbox, prints ``QUEUED <ids...>`` and sleeps until it is
killed.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from sidecar.config import WebhookEndpoint
from sidecar.outputs.webhooks import WebhookSender
from sidecar.room_events import EventBus, SessionStarted

SECRET = "crash-test-secret-0123456789"


async def main(outbox: Path, url: str, n: int) -> None:
    bus = EventBus()
    ep = WebhookEndpoint(
        "crash",
        url,
        SECRET,
        frozenset({"transcription.started"}),
        timeout_s=1.0,
        backoff_initial_s=0.05,
        backoff_max_s=0.2,
    )
    sender = WebhookSender([ep], outbox)
    sender.attach(bus)
    await sender.start()
    events = [SessionStarted(room=f"r{i}@conference.test", kind="transcription") for i in range(n)]
    for e in events:
        bus.publish(e)
    await sender.flushed()
    print("QUEUED " + " ".join(e.id for e in events), flush=True)
    await asyncio.sleep(3600)


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])))
