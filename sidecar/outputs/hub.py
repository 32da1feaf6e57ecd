"""The outputs of the sidecar, built from the configuration and fed by the room events.

:class:`Outputs` owns the transcript store (local, or local in front of an
S3 bucket), the S3 archiver, the webhook sender, the signed links, the
transcript HTTP routes and the retention sweeper. Each of them is a
subscriber of the :class:`~sidecar.room_events.EventBus` the rooms publish
on; nothing here reaches into a room.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from sidecar.config import SidecarConfig
from sidecar.outputs.http import TranscriptRoutes
from sidecar.outputs.links import LinkSigner
from sidecar.outputs.webhooks import WebhookSender
from sidecar.retention import RetentionSweeper, Sweepable
from sidecar.room_events import EventBus, RoomEvent, TranscriptReady
from sidecar.store.base import StoreError, TranscriptStore
from sidecar.store.local import LocalDirStore

__all__ = ["OUTBOX_DIR", "Outputs"]

log = logging.getLogger(__name__)

#: The webhook outbox, inside the store directory (a name no transcript id can have).
OUTBOX_DIR = ".webhooks-outbox"


class Outputs:
    """Store, archiver, webhooks, links, transcript routes and retention for one sidecar."""

    def __init__(self, config: SidecarConfig, *, token: str, bus: EventBus | None = None) -> None:
        self.config = config
        self.bus = bus or EventBus()
        self.local = LocalDirStore(config.store.store_dir)
        self.store: TranscriptStore = self.local
        self.archive = None
        self.archiver = None
        if config.store.storage == "s3":
            from sidecar.store.s3 import ArchivedStore, Archiver, S3Archive

            self.archive = S3Archive.from_config(config.s3)
            self.store = ArchivedStore(self.local, self.archive)
            self.archiver = Archiver(
                self.local, self.archive, retry_s=float(config.s3.upload_retry_s)
            )
        key = config.links.secret()
        self.signer: LinkSigner | None = None
        if key is not None:
            self.signer = LinkSigner(
                key, ttl_s=config.links.ttl_days * 86_400.0, public_url=config.links.public_url
            )
        self.webhooks: WebhookSender | None = None
        if config.webhooks:
            self.webhooks = WebhookSender(config.webhooks, Path(self.local.root) / OUTBOX_DIR)
            self.webhooks.attach(self.bus)
        self.routes = TranscriptRoutes(self.store, token=token, signer=self.signer, bus=self.bus)
        stores: dict[str, Sweepable] = {"local": self.local}
        if self.archive is not None:
            stores["s3"] = self.archive
        self.retention = RetentionSweeper(stores, config.retention)
        self.bus.add_listener("archiver", self._on_event)

    def link(self, transcript_id: str) -> str:
        """The signed link to a transcript's page, or "" when links are off."""
        if self.signer is None or not transcript_id:
            return ""
        return self.signer.url(transcript_id)

    def _on_event(self, event: RoomEvent) -> None:
        if isinstance(event, TranscriptReady) and self.archiver is not None:
            self.archiver.notify()

    async def start(self) -> None:
        """Check the bucket (a clear error, serving goes on), then start every output.

        Sessions finished but not uploaded (a crash, a failed upload) are
        uploaded by the archiver's first round.
        """
        if self.archive is not None:
            try:
                await asyncio.to_thread(self.archive.check)
            except StoreError as e:
                if getattr(e, "code", "") in ("AccessDenied", "403"):
                    # put-only credentials cannot look at the bucket; uploads will tell
                    log.info("%s (fine for upload-only credentials)", e)
                else:
                    log.error("%s; transcripts stay in %s until it works", e, self.local.root)
        if self.archiver is not None:
            self.archiver.start()
        if self.webhooks is not None:
            await self.webhooks.start()
        if self.config.retention.days > 0 or self.config.retention.rooms:
            self.retention.start()

    async def close(self) -> None:
        """Stop; undelivered webhooks stay in the outbox, unuploaded sessions on disk."""
        await self.routes.close()
        if self.archiver is not None:
            with contextlib.suppress(Exception):
                # one last round for what the shutdown itself finished
                await asyncio.wait_for(asyncio.to_thread(self.archiver.upload_pending), 10)
            await self.archiver.close()
        if self.webhooks is not None:
            await self.webhooks.close(drain_s=2.0)
        await self.retention.close()
