"""Streaming recognition for one speaker on top of whole-utterance decodes.

The speaker pipeline tells the stream where utterances begin, pause and end;
the stream turns that into interim hypotheses (re-decodes of the growing
utterance, merged by :class:`~sidecar.asr.stable.StablePrefix` so the start
never flickers) and exactly one final per utterance. The final decode is
started speculatively when the speaker pauses; if the pause turns out to be
the end, the final is ready almost as soon as the silence is confirmed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

import numpy as np

from sidecar.asr.base import Hypothesis, ProviderError, Recognizer, Request, ResultCallback
from sidecar.asr.filters import DecodeResult, clean
from sidecar.asr.scheduler import Superseded
from sidecar.asr.stable import StablePrefix

log = logging.getLogger(__name__)

SR = 16000
# a pause's decode may hold this much audio past the kept part and still be
# used as the final (the silence between the speech end and the pause)
PREFINAL_SLACK = SR * 400 // 1000


@dataclass(frozen=True, kw_only=True)
class StreamOptions:
    interim_results: bool = True
    first_interim_ms: int = 400  # speech needed before the first interim
    interim_step_ms: int = 400  # new audio needed between interims
    # an interim's decode may take at most this share of the speaker's time:
    # after one that took d seconds the next waits for d / interim_duty
    # seconds of new audio (counted from the audio the last one decoded).
    # Before, interims ran back to back (1.3 cores for one speaker); 0: off
    interim_duty: float = 0.5
    # words of this speaker's previous finals given to the recogniser as the
    # prompt (context across utterances); 0: none. Off by default: with
    # tiny.en it gained 4-5 WER points on narrow-band conversation but lost
    # 3 on read speech (docs/benchmarks.md, issue 8)
    context_words: int = 0


class _Utterance:
    def __init__(self, utt_id: str, audio: np.ndarray) -> None:
        self.id = utt_id
        self.chunks: list[np.ndarray] = [audio] if len(audio) else []
        self.length = len(audio)
        self.onset = len(audio)  # samples of pre-roll before speech was detected
        self.stable = StablePrefix()
        self.last_interim_len = 0
        self.last_interim_took = 0.0  # seconds the last interim decode took
        self.interim_task: asyncio.Task[None] | None = None
        self.last_interim_text = ""
        self.interims_sent = 0
        self.prefinal: asyncio.Task[DecodeResult] | None = None
        self.prefinal_len = 0
        self.prefinal_prompt = ""
        self.paused = False
        self.done = False
        self.voiced_ms: int | None = None

    def push(self, audio: np.ndarray) -> None:
        if len(audio):
            self.chunks.append(audio)
            self.length += len(audio)

    def snapshot(self, n: int | None = None) -> np.ndarray:
        if len(self.chunks) > 1:
            self.chunks = [np.concatenate(self.chunks)]
        if not self.chunks:
            return np.zeros(0, np.float32)
        a = self.chunks[0]
        return a if n is None else a[:n]


class DecodingStream:
    """Audio in, interims and one final per utterance out (via ``on_result``)."""

    def __init__(
        self,
        recognizer: Recognizer,
        *,
        language: str,
        on_result: ResultCallback,
        options: StreamOptions | None = None,
    ) -> None:
        self.recognizer = recognizer
        self.language = language
        self.on_result = on_result
        self.options = options or StreamOptions()
        self._utt: _Utterance | None = None
        self._tasks: set[asyncio.Task[object]] = set()
        self._final_chain: asyncio.Task[None] | None = None
        self.closed = False
        self._context: list[str] = []  # words of the previous finals, newest last

    # -- driven by the speaker pipeline ------------------------------------
    def begin(self, utt_id: str, audio: np.ndarray) -> None:
        if self._utt is not None and not self._utt.done:
            self.end(self._utt.length)
        self._utt = _Utterance(utt_id, audio)

    def push(self, audio: np.ndarray) -> None:
        u = self._utt
        if u is None or u.done:
            return
        u.push(audio)
        if u.paused:
            return
        self._maybe_interim(u)

    def pause(self) -> None:
        u = self._utt
        if u is None or u.done or u.paused:
            return
        u.paused = True
        if u.prefinal is None:
            u.prefinal_len = u.length
            u.prefinal_prompt = self._prompt()
            u.prefinal = self._spawn(
                self._decode(u, "final", u.snapshot(u.length), u.prefinal_prompt)
            )

    def resume(self) -> None:
        u = self._utt
        if u is None or u.done:
            return
        u.paused = False
        if u.prefinal is not None:
            u.prefinal.cancel()
            u.prefinal = None
        self._maybe_interim(u)

    def end(
        self, keep_samples: int, *, discard: bool = False, voiced_ms: int | None = None
    ) -> None:
        """Finish the current utterance; its final comes through on_result.

        ``discard``: too short to be speech; no final unless interims were
        shown (then an empty final clears them). ``voiced_ms``: how long the
        VAD was sure of speech in it (see :func:`~sidecar.asr.filters.clean`).
        """
        u = self._utt
        if u is None or u.done:
            return
        u.done = True
        u.voiced_ms = voiced_ms
        if u.interim_task is not None:
            u.interim_task.cancel()
        if discard and u.prefinal is not None:
            u.prefinal.cancel()  # its decode would be thrown away
        if discard and u.interims_sent == 0:
            return
        keep = max(0, min(keep_samples, u.length))
        prev = self._final_chain
        self._final_chain = self._spawn(self._finish(u, keep, discard, prev))

    def set_language(self, language: str) -> None:
        self.language = language

    async def drain(self) -> None:
        """Wait until every final that was started has been delivered."""
        while self._final_chain is not None and not self._final_chain.done():
            await asyncio.wait({self._final_chain})

    async def aclose(self) -> None:
        self.closed = True
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    # -- internals ---------------------------------------------------------
    def _spawn(self, coro):  # type: ignore[no-untyped-def]
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _prompt(self) -> str:
        n = self.options.context_words
        return " ".join(self._context[-n:]) if n else ""

    async def _decode(
        self, u: _Utterance, kind: str, audio: np.ndarray, prompt: str | None = None
    ) -> DecodeResult:
        if prompt is None:
            prompt = self._prompt()
        return await self.recognizer.recognize(
            Request(audio=audio, language=self.language, kind=kind, key=self, prompt=prompt)
        )

    def _maybe_interim(self, u: _Utterance) -> None:
        o = self.options
        if not o.interim_results or u.interim_task is not None:
            return
        if u.length - u.onset < o.first_interim_ms * SR // 1000:
            return
        if u.length - u.last_interim_len < self._interim_gap(u):
            return
        u.interim_task = self._spawn(self._interim(u))

    def _interim_gap(self, u: _Utterance) -> int:
        """Samples of new audio the next interim of ``u`` waits for."""
        o = self.options
        step = o.interim_step_ms * SR // 1000
        if u.last_interim_len == 0:
            return step  # the first interim: as early as the step allows
        # under load the scheduler asks every stream for fewer interims
        sched = getattr(self.recognizer, "scheduler", None)
        spacing = float(getattr(sched, "interim_spacing", 1.0))
        gap = step * max(1.0, spacing)
        if o.interim_duty > 0:
            gap = max(gap, u.last_interim_took / o.interim_duty * SR)
        return int(gap)

    async def _interim(self, u: _Utterance) -> None:
        n = u.length
        u.last_interim_len = n
        t0 = asyncio.get_running_loop().time()
        try:
            result = await self._decode(u, "interim", u.snapshot(n))
            u.last_interim_took = asyncio.get_running_loop().time() - t0
        except (Superseded, asyncio.CancelledError):
            return
        except ProviderError as e:
            log.debug("interim failed: %s", e)
            return
        finally:
            u.interim_task = None
        if u.done or self.closed:
            return
        text = clean(result, speech_ms=(n - u.onset) * 1000 // SR)
        if text:
            merged, stability = u.stable.update(text)
            if merged != u.last_interim_text:
                u.last_interim_text = merged
                u.interims_sent += 1
                self.on_result(
                    Hypothesis(
                        u.id,
                        merged,
                        is_final=False,
                        stability=stability,
                        confidence=_confidence(result),
                        language=self._reported_language(result),
                    )
                )
        if not u.paused:
            self._maybe_interim(u)

    async def _finish(
        self,
        u: _Utterance,
        keep: int,
        discard: bool,
        prev: asyncio.Task[None] | None,
    ) -> None:
        result: DecodeResult | None = None
        error = ""
        if self.options.context_words and prev is not None and not prev.done():
            # the previous final is this one's context: decoding without it
            # would make the words depend on how fast the machine was
            with contextlib.suppress(Exception):
                await asyncio.shield(prev)
        if not discard:
            try:
                # the speculative decode stands for the final only when it
                # covered the kept audio and little more (after a forced cut
                # it would hold words that belong to the next utterance) and
                # was given the context the final has
                slack = u.prefinal_len - keep
                if (
                    u.prefinal is not None
                    and 0 <= slack <= PREFINAL_SLACK
                    and u.prefinal_prompt == self._prompt()
                ):
                    result = await u.prefinal
                else:
                    if u.prefinal is not None:
                        u.prefinal.cancel()
                    result = await self._decode(u, "final", u.snapshot(keep))
            except asyncio.CancelledError:
                if self.closed:
                    raise
                error = "cancelled"
            except (ProviderError, Superseded) as e:
                error = str(e) or type(e).__name__
                log.warning("final for utterance %s failed: %s", u.id, error)
        if prev is not None and not prev.done():
            # finals of one speaker leave in the order their utterances ended
            with contextlib.suppress(Exception):
                await asyncio.shield(prev)
        if result is not None:
            speech_ms = max(0, keep - u.onset) * 1000 // SR + 200
            text = clean(result, speech_ms=speech_ms, voiced_ms=u.voiced_ms)
            confidence = _confidence(result)
            language = self._reported_language(result)
        elif discard:
            # too short to be speech: an empty final clears what was shown
            text = ""
            confidence = 0.0
            language = self.language
        else:
            # the provider failed: keep what the viewers already saw
            text = u.last_interim_text
            confidence = 0.0
            language = self.language
        if text and self.options.context_words:
            self._context = (self._context + text.split())[-self.options.context_words :]
        if not text and u.interims_sent == 0:
            return
        extra: dict[str, object] = {"audio_ms": keep * 1000 // SR}
        if error:
            extra["error"] = error
        self.on_result(
            Hypothesis(
                u.id,
                text,
                is_final=True,
                stability=1.0,
                confidence=confidence,
                language=language,
                extra=extra,
            )
        )

    def _reported_language(self, result: DecodeResult) -> str:
        if self.language == "auto" and result.language:
            return result.language
        return self.language


def _confidence(result: DecodeResult) -> float:
    return float(np.clip(np.exp(result.avg_logprob), 0.0, 1.0))
