"""A whole-utterance recogniser (the ``Recognizer`` interface Whisper implements)
that decodes codebook audio, so the Whisper stream adapter and its re-decode
policy can be tested without loading a model."""

from __future__ import annotations

import asyncio

from sidecar.asr.base import Capabilities, ProviderError, Recognizer, Request
from sidecar.asr.filters import DecodeResult
from tests.fakes import codebook


class CodebookRecognizer(Recognizer):
    name = "whisper"
    capabilities = Capabilities(streaming=False, interim_results=True, languages=None, local=True)

    def __init__(self, *, fail: str = "", delay_s: float = 0.0, timeout: float = 30.0) -> None:
        super().__init__(timeout=timeout, retries=0)
        self.fail = fail  # "final": finals fail; "all": every decode fails
        self.delay_s = delay_s
        self.decodes: list[tuple[str, list[str]]] = []

    async def _recognize_impl(self, req: Request) -> DecodeResult:
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        words = codebook.decode_float(req.audio)
        self.decodes.append((req.kind, words))
        if self.fail == "all" or (self.fail == "final" and req.kind == "final"):
            raise ProviderError("whisper: decoder failed", status="internal")
        return DecodeResult(" ".join(words), avg_logprob=-0.1, no_speech_prob=0.01)
