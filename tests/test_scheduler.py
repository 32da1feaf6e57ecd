"""Tests of the recognition scheduler: priorities, superseding, staleness,
cancellation, bounded backlog, errors and shutdown."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from sidecar.asr.scheduler import Scheduler, Superseded

TIMEOUT = 5.0


class Gate:
    """A job that blocks its worker until released."""

    def __init__(self, value: Any = "slow") -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.value = value

    def __call__(self) -> Any:
        self.started.set()
        if not self.release.wait(TIMEOUT):
            raise RuntimeError("gate never released")
        return self.value

    async def wait_started(self) -> None:
        deadline = time.monotonic() + TIMEOUT
        while not self.started.is_set():
            assert time.monotonic() < deadline, "job never started"
            await asyncio.sleep(0.002)


@pytest.fixture
def gates() -> Iterator[list[Gate]]:
    made: list[Gate] = []
    yield made
    for g in made:  # never leave a worker thread blocked
        g.release.set()


@pytest.fixture
def gate(gates: list[Gate]) -> Callable[[], Gate]:
    def make() -> Gate:
        g = Gate()
        gates.append(g)
        return g

    return make


@pytest.fixture
async def sched(gates: list[Gate]) -> AsyncIterator[Scheduler]:
    s = Scheduler(1, interim_max_wait=TIMEOUT)
    yield s
    for g in gates:
        g.release.set()
    await s.close()


def recorder(log: list[str], name: str, value: Any = None) -> Callable[[], Any]:
    def fn() -> Any:
        log.append(name)
        return name if value is None else value

    return fn


async def settle(*futs: asyncio.Future[Any]) -> list[Any]:
    return await asyncio.wait_for(asyncio.gather(*futs, return_exceptions=True), TIMEOUT)


def test_needs_at_least_one_worker() -> None:
    with pytest.raises(ValueError):
        Scheduler(0)


async def test_final_result_reaches_the_caller(sched: Scheduler) -> None:
    assert await asyncio.wait_for(sched.submit_final(lambda: 42), TIMEOUT) == 42
    assert await asyncio.wait_for(sched.submit_interim("k", lambda: "hi"), TIMEOUT) == "hi"
    assert sched.backlog == (0, 0)


async def test_finals_run_before_queued_interims(
    sched: Scheduler, gate: Callable[[], Gate]
) -> None:
    g = gate()
    busy = sched.submit_final(g)
    await g.wait_started()
    log: list[str] = []
    futs = [
        sched.submit_interim("a", recorder(log, "interim-a")),
        sched.submit_final(recorder(log, "final-1")),
        sched.submit_interim("b", recorder(log, "interim-b")),
        sched.submit_final(recorder(log, "final-2")),
    ]
    assert sched.backlog == (2, 2)
    g.release.set()
    results = await settle(busy, *futs)
    assert results == ["slow", "interim-a", "final-1", "interim-b", "final-2"]
    assert log == ["final-1", "final-2", "interim-a", "interim-b"]


async def test_newer_interim_for_the_same_key_supersedes_the_queued_one(
    sched: Scheduler, gate: Callable[[], Gate]
) -> None:
    g = gate()
    sched.submit_final(g)
    await g.wait_started()
    log: list[str] = []
    old = sched.submit_interim("alice", recorder(log, "old"))
    other = sched.submit_interim("bob", recorder(log, "bob"))
    new = sched.submit_interim("alice", recorder(log, "new"))
    assert old.done()  # the caller learns at once
    with pytest.raises(Superseded):
        await old
    assert sched.backlog == (0, 2)
    g.release.set()
    assert await settle(new, other) == ["new", "bob"]
    assert "old" not in log


async def test_interims_that_waited_too_long_are_dropped(gate: Callable[[], Gate]) -> None:
    sched = Scheduler(1, interim_max_wait=0.05)
    try:
        g = gate()
        busy = sched.submit_final(g)
        await g.wait_started()
        log: list[str] = []
        stale = sched.submit_interim("k", recorder(log, "stale"))
        final = sched.submit_final(recorder(log, "final"))
        await asyncio.sleep(0.15)
        g.release.set()
        results = await settle(busy, stale, final)
        assert isinstance(results[1], Superseded)
        assert results[2] == "final"  # finals are never dropped, however long they wait
        assert log == ["final"]
        # a fresh interim still runs
        fresh = await asyncio.wait_for(sched.submit_interim("k", lambda: "fresh"), TIMEOUT)
        assert fresh == "fresh"
    finally:
        await sched.close()


async def test_cancel_withdraws_a_queued_job(sched: Scheduler, gate: Callable[[], Gate]) -> None:
    g = gate()
    busy = sched.submit_final(g)
    await g.wait_started()
    log: list[str] = []
    final = sched.submit_final(recorder(log, "final"))
    interim = sched.submit_interim("k", recorder(log, "interim"))
    kept = sched.submit_final(recorder(log, "kept"))
    sched.cancel(final)
    sched.cancel(interim)
    assert final.cancelled() and interim.cancelled()
    assert sched.backlog == (1, 0)
    sched.cancel(final)  # twice is harmless
    g.release.set()
    assert await settle(busy, kept) == ["slow", "kept"]
    assert log == ["kept"]


async def test_cancel_of_a_finished_job_changes_nothing(sched: Scheduler) -> None:
    fut = sched.submit_final(lambda: "done")
    assert await asyncio.wait_for(fut, TIMEOUT) == "done"
    sched.cancel(fut)
    assert fut.result() == "done"


async def test_backlog_stays_bounded_under_a_flood_of_interims(
    gate: Callable[[], Gate],
) -> None:
    sched = Scheduler(2, interim_max_wait=TIMEOUT)
    try:
        slow = [gate(), gate()]
        busy = [sched.submit_final(g) for g in slow]
        for g in slow:  # both workers are busy at once
            await g.wait_started()
        log: list[str] = []
        futs: dict[str, list[asyncio.Future[Any]]] = {}
        for i in range(1000):
            key = f"speaker-{i % 5}"
            futs.setdefault(key, []).append(sched.submit_interim(key, recorder(log, str(i))))
            finals, interims = sched.backlog
            assert finals == 0 and interims <= 5
        assert sched.backlog == (0, 5)
        superseded = [f for fs in futs.values() for f in fs[:-1]]
        assert all(f.done() and isinstance(f.exception(), Superseded) for f in superseded)
        for g in slow:
            g.release.set()
        await settle(*busy)
        newest = await settle(*(fs[-1] for fs in futs.values()))
        assert newest == ["995", "996", "997", "998", "999"]
        assert sorted(log) == ["995", "996", "997", "998", "999"]
        assert sched.backlog == (0, 0)
    finally:
        await sched.close()


async def test_failing_job_raises_for_its_caller_and_the_scheduler_goes_on(
    sched: Scheduler,
) -> None:
    def boom() -> None:
        raise ValueError("decoder exploded")

    with pytest.raises(ValueError, match="decoder exploded"):
        await asyncio.wait_for(sched.submit_final(boom), TIMEOUT)
    with pytest.raises(ValueError, match="decoder exploded"):
        await asyncio.wait_for(sched.submit_interim("k", boom), TIMEOUT)
    assert await asyncio.wait_for(sched.submit_final(lambda: "ok"), TIMEOUT) == "ok"
    assert await asyncio.wait_for(sched.submit_interim("k", lambda: "ok2"), TIMEOUT) == "ok2"


async def test_close_cancels_pending_futures(gate: Callable[[], Gate]) -> None:
    sched = Scheduler(1)
    g = gate()
    sched.submit_final(g)
    await g.wait_started()
    log: list[str] = []
    final = sched.submit_final(recorder(log, "final"))
    interim = sched.submit_interim("k", recorder(log, "interim"))
    await asyncio.wait_for(sched.close(), TIMEOUT)
    assert final.cancelled()
    assert interim.cancelled()
    assert sched.backlog == (0, 0)
    g.release.set()
    await asyncio.sleep(0.05)
    assert log == []


async def test_close_resolves_the_future_of_the_job_in_flight(
    gate: Callable[[], Gate],
) -> None:
    sched = Scheduler(1)
    g = gate()
    running = sched.submit_final(g)
    await g.wait_started()
    await asyncio.wait_for(sched.close(), TIMEOUT)
    g.release.set()
    await asyncio.wait({running}, timeout=0.5)
    assert running.done()


async def test_interim_spacing_widens_under_backlog_and_narrows_back(
    gate: Callable[[], Gate],
) -> None:
    """With every worker busy and interims of many speakers waiting, the
    streams are asked for fewer interims; once a worker is to spare again,
    the spacing comes back to 1 (an interim per step)."""
    sched = Scheduler(1, interim_max_wait=TIMEOUT)
    try:
        assert sched.interim_spacing == 1.0
        g = gate()
        busy = sched.submit_final(g)
        await g.wait_started()
        log: list[str] = []
        futs = [sched.submit_interim(k, recorder(log, k)) for k in "abcdef"]
        g.release.set()
        await settle(busy, *futs)
        widest = sched.interim_spacing
        assert widest > 1.5  # picked while the others still waited
        for i in range(20):  # one speaker at a time: a worker to spare
            assert await settle(sched.submit_interim("a", lambda i=i: i)) == [i]
        assert sched.interim_spacing == 1.0
    finally:
        await sched.close()


async def test_fixed_policy_keeps_the_spacing_at_one(gate: Callable[[], Gate]) -> None:
    sched = Scheduler(1, interim_max_wait=TIMEOUT)
    sched.adaptive = False
    try:
        g = gate()
        busy = sched.submit_final(g)
        await g.wait_started()
        futs = [sched.submit_interim(k, lambda: None) for k in "abcdef"]
        g.release.set()
        await settle(busy, *futs)
        assert sched.interim_spacing == 1.0
    finally:
        await sched.close()
