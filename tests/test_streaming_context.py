"""The previous final is the next utterance's context, however slow the machine.

A recogniser that answers by script and takes its time on the first final
plays a loaded machine: the second utterance's speculative decode starts
before the first final is known. The second final must still be decoded
with the first one's words as its prompt (otherwise what a caption says
would depend on how busy the CPU was), and finals leave in order.
"""

from __future__ import annotations

import asyncio

import numpy as np

from sidecar.asr.base import Capabilities, Hypothesis, Recognizer, Request
from sidecar.asr.filters import DecodeResult
from sidecar.asr.streaming import DecodingStream, StreamOptions

SR = 16000


class Scripted(Recognizer):
    name = "scripted"
    capabilities = Capabilities(streaming=False, interim_results=True, languages=None, local=True)

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, float, str]] = []  # kind, audio seconds, prompt
        self.first_final = asyncio.Event()

    async def _recognize_impl(self, req: Request) -> DecodeResult:
        secs = len(req.audio) / SR
        self.calls.append((req.kind, secs, req.prompt))
        if req.kind == "final" and secs < 2.5:  # the first utterance: slow
            await self.first_final.wait()
            return DecodeResult("the budget review", avg_logprob=-0.1)
        return DecodeResult("is on monday", avg_logprob=-0.1)


async def test_a_final_waits_for_its_context_and_finals_stay_in_order() -> None:
    rec = Scripted()
    out: list[Hypothesis] = []
    st = DecodingStream(
        rec,
        language="en",
        on_result=out.append,
        options=StreamOptions(interim_results=False, context_words=40),
    )
    a = np.full(2 * SR, 0.1, np.float32)
    st.begin("u1", a)
    st.pause()  # prefinal of u1 starts (and hangs: the machine is slow)
    st.end(len(a), voiced_ms=1500)
    b = np.full(3 * SR, 0.1, np.float32)
    st.begin("u2", b)
    st.pause()  # prefinal of u2 starts without u1's words
    st.end(len(b), voiced_ms=2500)
    await asyncio.sleep(0.05)
    assert [h.utterance_id for h in out] == []
    rec.first_final.set()
    await asyncio.wait_for(st.drain(), 5)
    assert [(h.utterance_id, h.text) for h in out] == [
        ("u1", "the budget review"),
        ("u2", "is on monday"),
    ]
    u2_finals = [prompt for kind, secs, prompt in rec.calls if kind == "final" and secs >= 2.5]
    # the speculative one had no context; the one that counted had u1's words
    assert u2_finals[0] == "" and u2_finals[-1] == "the budget review"
    await st.aclose()
