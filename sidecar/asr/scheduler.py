"""One scheduler for all recognition work of the sidecar.

A bounded pool of worker threads (the engines release the GIL). Finals go
before interims; a stream has at most one interim waiting (a newer request
replaces it, since only the newest audio matters); interims that waited too
long are dropped. Under overload the backlog therefore cannot grow beyond
one interim per stream, and latency stays bounded: finals are never dropped.

Under load interims are also asked for less often: :attr:`Scheduler.interim_spacing`
is a factor (1 when workers are free, up to ``MAX_SPACING``) by which the
streams stretch the audio they gather between two interims. It widens each
time an interim is picked while the backlog fills every worker, or one is
superseded or dropped as stale, and narrows back when an interim is picked
with a worker to spare. Counts, not clocks, drive it, so it behaves the same
on a fast and a slow machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

QUEUE_WAIT = Histogram(
    "captions_scheduler_wait_seconds",
    "Time a recognition job waited for a worker",
    ["kind"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10),
)
JOBS = Counter(
    "captions_scheduler_jobs_total",
    "Recognition jobs by kind and outcome",
    ["kind", "outcome"],  # outcome: done, superseded, stale, cancelled, error
)
QUEUED = Gauge("captions_scheduler_queued", "Jobs waiting for a worker", ["kind"])
BUSY = Gauge("captions_scheduler_busy_workers", "Workers running a job")
WORKERS = Gauge("captions_scheduler_workers", "Recognition workers (the most jobs run at once)")
BUSY_SECONDS = Counter(
    "captions_scheduler_busy_seconds_total", "Worker time spent running jobs (capacity used)"
)
SPACING = Gauge(
    "captions_scheduler_interim_spacing",
    "Factor by which streams stretch the audio between interims (1: no load)",
)
MAX_SPACING = 6.0
WIDEN = 1.5
NARROW = 0.8
for _kind in ("final", "interim"):
    for _outcome in ("done", "superseded", "stale", "cancelled", "error"):
        JOBS.labels(_kind, _outcome)  # export zeros: dropped-interim rates work from the start


class Superseded(Exception):
    """The job was replaced by a newer one or dropped before it ran."""


@dataclass(eq=False)
class _Job:
    kind: str
    fn: Callable[[], Any]
    future: asyncio.Future[Any]
    enqueued: float = field(default_factory=time.monotonic)
    key: Hashable | None = None


class Scheduler:
    adaptive = True  # False: a fixed interim interval (bench/cost.py --policy fixed)

    def __init__(self, workers: int, *, interim_max_wait: float = 1.0) -> None:
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self.workers = workers
        WORKERS.set(workers)
        self.interim_max_wait = interim_max_wait
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="recognise")
        self._finals: deque[_Job] = deque()
        self._interims: OrderedDict[Hashable, _Job] = OrderedDict()
        self._wake: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._seq = itertools.count()
        self._closed = False
        self._running: set[_Job] = set()
        self.interim_spacing = 1.0
        SPACING.set(1.0)

    def start(self) -> None:
        if self._tasks:
            return
        self._wake = asyncio.Event()
        self._tasks = [
            asyncio.create_task(self._worker(), name=f"scheduler-{i}") for i in range(self.workers)
        ]

    async def close(self) -> None:
        self._closed = True
        in_flight = list(self._running)  # the workers forget them when cancelled
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks = []
        for job in [*self._finals, *self._interims.values(), *in_flight]:
            if not job.future.done():
                job.future.cancel()
        self._finals.clear()
        self._interims.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _loop_future(self) -> asyncio.Future[Any]:
        if not self._tasks:
            self.start()
        return asyncio.get_running_loop().create_future()

    def submit_final(self, fn: Callable[[], Any]) -> asyncio.Future[Any]:
        """Queue a job that must run; finals run in the order submitted."""
        job = _Job("final", fn, self._loop_future())
        self._finals.append(job)
        QUEUED.labels("final").set(len(self._finals))
        self._notify()
        return job.future

    def submit_interim(self, key: Hashable, fn: Callable[[], Any]) -> asyncio.Future[Any]:
        """Queue an interim for ``key``; a pending one for the same key fails
        with :class:`Superseded`."""
        old = self._interims.pop(key, None)
        if old is not None and not old.future.done():
            old.future.set_exception(Superseded())
            JOBS.labels("interim", "superseded").inc()
            self._widen()
        job = _Job("interim", fn, self._loop_future(), key=key)
        self._interims[key] = job
        QUEUED.labels("interim").set(len(self._interims))
        self._notify()
        return job.future

    def cancel(self, future: asyncio.Future[Any]) -> None:
        """Withdraw a job that has not started (e.g. speech resumed)."""
        for job in list(self._finals):
            if job.future is future:
                self._finals.remove(job)
                JOBS.labels(job.kind, "cancelled").inc()
        for key, job in list(self._interims.items()):
            if job.future is future:
                del self._interims[key]
                JOBS.labels(job.kind, "cancelled").inc()
        if not future.done():
            future.cancel()

    @property
    def backlog(self) -> tuple[int, int]:
        return len(self._finals), len(self._interims)

    def _widen(self) -> None:
        if self.adaptive:
            self.interim_spacing = min(MAX_SPACING, self.interim_spacing * WIDEN)
            SPACING.set(self.interim_spacing)

    def _narrow(self) -> None:
        if self.interim_spacing > 1.0:
            self.interim_spacing = max(1.0, self.interim_spacing * NARROW)
            SPACING.set(self.interim_spacing)

    def _notify(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _next(self) -> _Job | None:
        while self._finals:
            job = self._finals.popleft()
            if not job.future.done():
                return job
        now = time.monotonic()
        while self._interims:
            _, job = self._interims.popitem(last=False)
            if job.future.done():
                continue
            if now - job.enqueued > self.interim_max_wait:
                job.future.set_exception(Superseded())
                JOBS.labels("interim", "stale").inc()
                self._widen()
                continue
            # the picking worker is free; the others run ``_running``
            waiting = len(self._interims) + len(self._running)
            if waiting >= self.workers:
                self._widen()  # every worker stays busy after this one
            else:
                self._narrow()  # a worker is left to spare
            return job
        return None

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wake is not None
        while not self._closed:
            job = self._next()
            QUEUED.labels("final").set(len(self._finals))
            QUEUED.labels("interim").set(len(self._interims))
            if job is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            QUEUE_WAIT.labels(job.kind).observe(time.monotonic() - job.enqueued)
            BUSY.inc()
            t_run = time.monotonic()
            self._running.add(job)
            try:
                result = await loop.run_in_executor(self._pool, job.fn)
            except Exception as e:  # the job's own failure goes to its caller
                JOBS.labels(job.kind, "error").inc()
                if not job.future.done():
                    job.future.set_exception(e)
            else:
                JOBS.labels(job.kind, "done").inc()
                if not job.future.done():
                    job.future.set_result(result)
            finally:
                self._running.discard(job)
                BUSY.dec()
                BUSY_SECONDS.inc(time.monotonic() - t_run)
