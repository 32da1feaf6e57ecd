"""The interim policy of a stream: interims decode only new audio, never
queue behind each other, keep to their share of the speaker's time, and are
spaced out when the scheduler is backlogged; finals overtake waiting interims.

The recogniser is scripted (it answers after a set delay, or when released),
so the counts below do not depend on the speed of the machine: a delay is a
lower bound on how long a decode took, and the policy only ever waits longer.
"""

from __future__ import annotations

import asyncio

import numpy as np

from sidecar.asr.base import Capabilities, Hypothesis, Recognizer, Request
from sidecar.asr.filters import DecodeResult
from sidecar.asr.scheduler import Scheduler
from sidecar.asr.streaming import DecodingStream, StreamOptions

SR = 16000
FRAME = np.full(SR // 50, 0.1, np.float32)  # 20 ms


class Scripted(Recognizer):
    name = "scripted"
    capabilities = Capabilities(streaming=False, interim_results=True, languages=None, local=True)

    def __init__(self, delay: float = 0.0, scheduler: object | None = None) -> None:
        super().__init__()
        self.delay = delay
        self.calls: list[tuple[str, int]] = []  # kind, samples
        self.in_flight = 0
        self.most_in_flight = 0
        self.release = asyncio.Event()
        self.release.set()
        if scheduler is not None:
            self.scheduler = scheduler

    async def _recognize_impl(self, req: Request) -> DecodeResult:
        self.calls.append((req.kind, len(req.audio)))
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await self.release.wait()
            await asyncio.sleep(self.delay)
        finally:
            self.in_flight -= 1
        return DecodeResult("hello there", avg_logprob=-0.1)


def interims(rec: Scripted) -> list[int]:
    return [n for kind, n in rec.calls if kind == "interim"]


async def settle_tasks() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def test_an_interim_never_decodes_the_same_audio_twice() -> None:
    rec = Scripted()
    out: list[Hypothesis] = []
    st = DecodingStream(rec, language="en", on_result=out.append)
    st.begin("u1", np.zeros(0, np.float32))
    for _ in range(30):  # 600 ms of speech
        st.push(FRAME)
    await asyncio.sleep(0.05)
    assert len(interims(rec)) == 1
    for _ in range(5):  # a pause and a resume bring no new audio
        st.pause()
        st.resume()
        await asyncio.sleep(0.01)
    st.push(np.zeros(0, np.float32))
    await asyncio.sleep(0.05)
    lengths = interims(rec)
    assert len(lengths) == len(set(lengths)) == 1
    await st.aclose()


async def test_interims_of_one_speaker_never_queue_behind_each_other() -> None:
    rec = Scripted()
    rec.release.clear()  # a loaded machine: nothing comes back yet
    st = DecodingStream(rec, language="en", on_result=lambda h: None)
    st.begin("u1", np.zeros(0, np.float32))
    for _ in range(250):  # 5 s of audio while the first interim is out
        st.push(FRAME)
        await asyncio.sleep(0)
    assert len(interims(rec)) == 1
    rec.release.set()  # the next one decodes everything new at once
    await asyncio.sleep(0.05)
    assert interims(rec) == [20 * 320, 250 * 320]
    assert rec.most_in_flight == 1
    await st.aclose()


async def test_a_slow_interim_spaces_out_the_next_one() -> None:
    """Interims ran back to back before (every 400 ms of new audio however
    long a decode took): a decode of 0.3 s now holds the next one back until
    0.6 s of new audio (interim_duty 0.5)."""
    rec = Scripted(delay=0.3)
    st = DecodingStream(rec, language="en", on_result=lambda h: None)
    st.begin("u1", np.zeros(0, np.float32))
    for _ in range(20):
        st.push(FRAME)
    await asyncio.sleep(0.5)  # the first interim (400 ms of audio) is done
    assert interims(rec) == [20 * 320]
    for _ in range(25):  # 500 ms of new audio: enough before, not now
        st.push(FRAME)
    await settle_tasks()
    assert interims(rec) == [20 * 320]
    for _ in range(10):  # 700 ms of new audio in all
        st.push(FRAME)
    await settle_tasks()
    assert interims(rec) == [20 * 320, 55 * 320]
    await st.aclose()


async def test_the_fixed_policy_decodes_every_step() -> None:
    rec = Scripted(delay=0.3)
    st = DecodingStream(
        rec, language="en", on_result=lambda h: None, options=StreamOptions(interim_duty=0.0)
    )
    st.begin("u1", np.zeros(0, np.float32))
    for _ in range(20):
        st.push(FRAME)
    await asyncio.sleep(0.5)
    for _ in range(25):
        st.push(FRAME)
    await settle_tasks()
    assert interims(rec) == [20 * 320, 45 * 320]
    await st.aclose()


class Spacing:
    interim_spacing = 1.0


async def test_a_backlogged_scheduler_spaces_out_interims() -> None:
    load = Spacing()
    rec = Scripted(scheduler=load)
    st = DecodingStream(
        rec, language="en", on_result=lambda h: None, options=StreamOptions(interim_duty=0.0)
    )
    st.begin("u1", np.zeros(0, np.float32))

    async def feed(frames: int) -> None:
        for _ in range(frames):
            st.push(FRAME)
            await asyncio.sleep(0)
        await asyncio.sleep(0.02)

    await feed(100)  # 2 s, no load: an interim every 400 ms
    idle = len(interims(rec))
    assert idle >= 4
    load.interim_spacing = 3.0
    await feed(100)  # 2 s under load: every 1.2 s
    loaded = len(interims(rec)) - idle
    assert 1 <= loaded <= 2
    load.interim_spacing = 1.0
    await feed(100)  # load gone: back to every 400 ms
    assert len(interims(rec)) - idle - loaded >= 4
    await st.aclose()


async def test_a_final_overtakes_the_interims_waiting_for_a_worker() -> None:
    """Through the real scheduler: one worker busy, eight speakers' interims
    queued, then one speaker ends its utterance: its final runs next."""
    sched = Scheduler(1, interim_max_wait=30.0)
    order: list[str] = []
    blocker = asyncio.Event()

    class Threaded(Recognizer):
        name = "threaded"
        capabilities = Capabilities(
            streaming=False, interim_results=True, languages=None, local=True
        )
        scheduler = sched

        async def _recognize_impl(self, req: Request) -> DecodeResult:
            def run() -> DecodeResult:
                order.append(req.kind)
                return DecodeResult("hello there", avg_logprob=-0.1)

            if req.kind == "final":
                return await sched.submit_final(run)  # type: ignore[no-any-return]
            return await sched.submit_interim(req.key, run)  # type: ignore[no-any-return]

    rec = Threaded()
    loop = asyncio.get_running_loop()
    started = asyncio.Event()

    def hold() -> None:
        loop.call_soon_threadsafe(started.set)
        asyncio.run_coroutine_threadsafe(blocker.wait(), loop).result(10)

    busy = sched.submit_final(hold)
    await asyncio.wait_for(started.wait(), 10)
    out: list[Hypothesis] = []
    streams = [DecodingStream(rec, language="en", on_result=out.append) for _ in range(8)]
    for i, st in enumerate(streams):
        st.begin(f"u{i}", np.zeros(0, np.float32))
        for _ in range(30):
            st.push(FRAME)
    await settle_tasks()
    assert sched.backlog == (0, 8)
    streams[0].end(30 * 320, voiced_ms=600)
    await settle_tasks()
    blocker.set()
    await asyncio.wait_for(busy, 10)
    await asyncio.wait_for(streams[0].drain(), 10)
    assert order[0] == "final"
    assert [h.is_final for h in out if h.utterance_id == "u0"] == [True]
    for st in streams:
        await st.aclose()
    await sched.close()
