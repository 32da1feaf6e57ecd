"""Retention: transcripts older than their room's retention period are deleted, on every store.

A session's age counts from its end (``ended_at``; sessions still open are
never touched). The period is ``[retention] days`` (default 14) unless
``[retention] rooms`` names the room (``"ROOM=DAYS"``); 0 keeps for ever.
The sweeper runs every ``sweep_interval_s`` over the local directory and,
when configured, the bucket (which then needs ``s3:DeleteObject``), logs one
line per deleted transcript and counts them in
``captions_retention_deleted_total{store}``.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Protocol

from prometheus_client import Counter

from sidecar.config import RetentionConfig
from sidecar.store.base import StoreError, TranscriptMeta
from sidecar.store.render import parse_iso

__all__ = ["RetentionSweeper", "Sweepable"]

log = logging.getLogger(__name__)

DELETED = Counter(
    "captions_retention_deleted_total", "Transcripts deleted by the retention sweeper", ["store"]
)
SWEEP_ERRORS = Counter(
    "captions_retention_errors_total", "Retention sweeps of a store that failed", ["store"]
)

_DAY = 86_400.0


class Sweepable(Protocol):
    def list(self, room: str | None = None, limit: int = 100) -> builtins.list[TranscriptMeta]: ...

    def delete(self, id: str) -> bool: ...


class RetentionSweeper:
    """Deletes expired transcripts from each named store (``{"local": ..., "s3": ...}``)."""

    def __init__(
        self,
        stores: dict[str, Sweepable],
        policy: RetentionConfig,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.stores = stores
        self.policy = policy
        self.clock = clock
        self._task: asyncio.Task[None] | None = None

    def expired(self, meta: TranscriptMeta, now: float) -> float | None:
        """The age in days of ``meta`` if it is past its retention, else None."""
        days = self.policy.days_for(meta.room)
        if days <= 0 or not meta.ended_at:
            return None
        ended = parse_iso(meta.ended_at)
        if ended is None:
            return None
        age = (now - ended.timestamp()) / _DAY
        return age if age > days else None

    def sweep(self) -> builtins.list[tuple[str, str]]:
        """One pass; returns ``(store name, transcript id)`` for everything deleted."""
        now = self.clock()
        deleted: builtins.list[tuple[str, str]] = []
        for name, store in self.stores.items():
            try:
                metas = store.list(limit=10_000_000)
            except StoreError as e:
                SWEEP_ERRORS.labels(name).inc()
                log.error("retention: cannot list the %s store: %s", name, e)
                continue
            for meta in metas:
                age = self.expired(meta, now)
                if age is None:
                    continue
                try:
                    gone = store.delete(meta.id)
                except StoreError as e:
                    SWEEP_ERRORS.labels(name).inc()
                    log.error("retention: cannot delete %s from the %s store: %s", meta.id, name, e)
                    continue
                if gone:
                    DELETED.labels(name).inc()
                    deleted.append((name, meta.id))
                    log.info(
                        "retention: deleted transcript %s of room %s from the %s store "
                        "(ended %s, %.1f days ago; retention %d days)",
                        meta.id,
                        meta.room,
                        name,
                        meta.ended_at,
                        age,
                        self.policy.days_for(meta.room),
                    )
        return deleted

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="retention")

    async def _run(self) -> None:
        # not at the very start: recovery and the first uploads go first
        await asyncio.sleep(min(60.0, float(self.policy.sweep_interval_s)))
        while True:
            try:
                await asyncio.to_thread(self.sweep)
            except Exception:
                log.exception("retention sweep failed")
            await asyncio.sleep(float(self.policy.sweep_interval_s))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
