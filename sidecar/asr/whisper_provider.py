"""Whisper as a streaming provider: the stream adapter for whole-utterance decoders.

Whisper decodes a whole piece of audio at a time. Its re-decode policy
(:class:`sidecar.asr.streaming.DecodingStream`: interims by re-decoding the
growing utterance, a speculative final at pauses, the hallucination filters
of :mod:`sidecar.asr.filters`) stays as it is; this module only wraps it in
the :class:`~sidecar.asr.provider.RecognitionStream` protocol:

* a failed decode, which ``DecodingStream`` closes with a final carrying
  ``extra["error"]``, becomes ``on_error`` (and, without a fallback final,
  no final at all, so that a failover chain re-recognises the utterance);
* with ``empty_finals`` every utterance gets a final, also the ones
  ``DecodingStream`` drops as noise (a chain must know the utterance is over).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from sidecar.asr.base import Hypothesis, ProviderError, ResultCallback
from sidecar.asr.provider import (
    AUDIO_SECONDS,
    PROVIDER_ERRORS,
    SR,
    Capabilities,
    ErrorCallback,
    ProviderConfigError,
    RecognitionStream,
    StreamProvider,
    StreamSettings,
)
from sidecar.asr.streaming import DecodingStream, StreamOptions
from sidecar.asr.whisper import WhisperRecognizer


class WhisperProvider(StreamProvider):
    name = "whisper"
    capabilities = Capabilities(
        streaming=False,
        interim_results=True,
        languages=None,
        language_detection=True,
        local=True,
    )

    def __init__(self, recognizer: Any) -> None:
        # any sidecar.asr.base.Recognizer (the tests use scripted ones)
        self.recognizer = recognizer
        self.name = getattr(recognizer, "name", "whisper")

    async def start(self) -> None:
        preload = getattr(self.recognizer, "preload", None)
        if preload is not None:
            await asyncio.to_thread(preload)

    def open_stream(
        self,
        settings: StreamSettings,
        on_result: ResultCallback,
        on_error: ErrorCallback | None = None,
    ) -> WhisperStream:
        return WhisperStream(self, settings, on_result, on_error)

    async def aclose(self) -> None:
        await self.recognizer.aclose()


class WhisperStream(RecognitionStream):
    def __init__(
        self,
        provider: WhisperProvider,
        settings: StreamSettings,
        on_result: ResultCallback,
        on_error: ErrorCallback | None,
    ) -> None:
        super().__init__(settings, on_result, on_error)
        self.provider = provider
        self.inner = DecodingStream(
            provider.recognizer,
            language=settings.language,
            on_result=self._result,
            options=StreamOptions(interim_results=settings.interim_results),
        )
        self._open: str | None = None
        self._ended: dict[str, bool] = {}  # ended utterances -> final seen
        self._tasks: set[asyncio.Task[None]] = set()
        self.closed = False

    def begin(self, utt_id: str, audio: np.ndarray) -> None:
        if self.closed:
            return
        if self._open is not None:
            self.end(10**12)  # DecodingStream ends it the same way
        self._open = utt_id
        self._count(audio)
        self.inner.begin(utt_id, audio)

    def push(self, audio: np.ndarray) -> None:
        if self.closed:
            return
        if self._open is not None:
            self._count(audio)
        self.inner.push(audio)

    def pause(self) -> None:
        self.inner.pause()

    def resume(self) -> None:
        self.inner.resume()

    def end(
        self, keep_samples: int, *, discard: bool = False, voiced_ms: int | None = None
    ) -> None:
        if self.closed:
            return
        utt = self._open
        self._open = None
        self.inner.end(keep_samples, discard=discard, voiced_ms=voiced_ms)
        if utt is None:
            return
        self._ended[utt] = False
        if self.settings.empty_finals:
            # DecodingStream sends no final for noise: find out when it is done
            task = asyncio.create_task(self._settle(utt))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def configure(self, settings: StreamSettings) -> None:
        self.settings = settings
        self.inner.set_language(settings.language)
        self.inner.options = dataclasses.replace(
            self.inner.options, interim_results=settings.interim_results
        )

    async def drain(self) -> None:
        await self.inner.drain()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def aclose(self) -> None:
        self.closed = True
        for t in list(self._tasks):
            t.cancel()
        await self.inner.aclose()

    # -- internals ---------------------------------------------------------
    def _count(self, audio: np.ndarray) -> None:
        if len(audio):
            AUDIO_SECONDS.labels(self.provider.name).inc(len(audio) / SR)

    async def _settle(self, utt: str) -> None:
        await self.inner.drain()
        if self._ended.pop(utt, True) is False and not self.inner.closed:
            self.on_result(
                Hypothesis(
                    utt,
                    "",
                    is_final=True,
                    stability=1.0,
                    confidence=0.0,
                    language=self.settings.language,
                    extra={"provider": self.provider.name},
                )
            )

    def _result(self, h: Hypothesis) -> None:
        if self.closed:
            return
        if h.is_final:
            if h.utterance_id in self._ended:
                self._ended[h.utterance_id] = True
            error = h.extra.get("error")
            if error:
                err = ProviderError(f"{self.provider.name}: {error}", status="error")
                if error == "cancelled":
                    err.status = "internal"
                elif "within" in str(error):
                    err.status = "timeout"
                PROVIDER_ERRORS.labels(self.provider.name, err.status).inc()
                if self.on_error is not None:
                    with contextlib.suppress(Exception):
                        self.on_error(h.utterance_id, err)
                if not self.settings.fallback_final:
                    return
            h.extra.setdefault("provider", self.provider.name)
        self.on_result(h)


def build(
    section: Mapping[str, Any],
    *,
    env: Mapping[str, str],
    recognizer: WhisperRecognizer | None = None,
    **_: Any,
) -> WhisperProvider:
    """The Whisper provider around the deployment's recogniser (``[whisper]``
    is read by :mod:`sidecar.config`; the server builds the recogniser)."""
    if recognizer is None:
        raise ProviderConfigError("whisper: the provider needs the sidecar's Whisper recogniser")
    return WhisperProvider(recognizer)
