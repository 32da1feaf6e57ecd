"""A chain of recognisers that is itself a recogniser (for example Azure, then Whisper).

Every utterance goes to the first provider of the chain that is not cooling
down and serves the room's language. The chain keeps the utterance's audio
until its final has come; when the provider fails or times out (its stream
reports ``on_error``), the utterance is re-recognised from that audio by the
next provider, on a stream of its own, while the speaker goes on talking.
Viewers see interims from whichever provider serves the utterance and
exactly one final; the chain reports a failure (``on_error`` and a final
with ``extra["error"]``) only when no provider of the chain could
recognise it. A provider that failed is skipped for ``cooldown_s``, then
tried again.

Metrics: audio seconds each provider served (finals delivered), utterances
moved from one provider to the next, utterances the whole chain lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from prometheus_client import Counter, Gauge

from sidecar.asr.base import Hypothesis, ProviderError, ResultCallback
from sidecar.asr.provider import (
    SR,
    Capabilities,
    ErrorCallback,
    RecognitionStream,
    StreamProvider,
    StreamSettings,
    error_kind,
)

log = logging.getLogger(__name__)

SERVED_SECONDS = Counter(
    "captions_failover_served_audio_seconds_total",
    "Seconds of utterance audio whose final each provider of a chain delivered",
    ["provider"],
)
FAILOVERS = Counter(
    "captions_failover_total",
    "Utterances moved to the next provider of a chain, by the failed provider and error kind",
    ["provider", "kind"],
)
EXHAUSTED = Counter(
    "captions_failover_exhausted_total",
    "Utterances that no provider of a chain could recognise",
    ["chain"],
)
COOLING = Gauge(
    "captions_provider_cooling_down",
    "1 while a provider is skipped after a failure",
    ["provider"],
)


class ChainExhausted(ProviderError):
    """Every provider of the chain failed on the utterance."""

    def __init__(self, message: str, last: ProviderError | None) -> None:
        super().__init__(message, status=error_kind(last) if last else "error")


class FailoverProvider(StreamProvider):
    def __init__(
        self,
        providers: Sequence[StreamProvider],
        *,
        cooldown_s: float = 30.0,
        name: str = "",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not providers:
            raise ValueError("a failover chain needs at least one provider")
        self.providers = list(providers)
        self.name = name or ",".join(p.name for p in self.providers)
        self.cooldown_s = cooldown_s
        self.clock = clock
        self.down_until: dict[str, float] = {}
        caps = [p.capabilities for p in self.providers]
        langs: set[str] = set()
        for c in caps:
            langs.update(c.languages or ())
        self.capabilities = Capabilities(
            streaming=caps[0].streaming,
            interim_results=any(c.interim_results for c in caps),
            languages=None if any(c.languages is None for c in caps) else tuple(sorted(langs)),
            language_detection=any(c.language_detection for c in caps),
            local=all(c.local for c in caps),
        )

    async def start(self) -> None:
        for p in self.providers:
            await p.start()

    async def aclose(self) -> None:
        for p in self.providers:
            with contextlib.suppress(Exception):
                await p.aclose()

    def cooling(self, p: StreamProvider) -> bool:
        until = self.down_until.get(p.name)
        if until is None:
            return False
        if self.clock() >= until:
            del self.down_until[p.name]
            COOLING.labels(p.name).set(0)
            log.info("%s: cool-down over; trying it again", p.name)
            return False
        return True

    def mark_failed(self, p: StreamProvider, err: ProviderError) -> None:
        if p.name not in self.down_until:
            log.warning("%s failed (%s); skipped for %.0f s", p.name, err, self.cooldown_s)
        self.down_until[p.name] = self.clock() + self.cooldown_s
        COOLING.labels(p.name).set(1)

    def open_stream(
        self,
        settings: StreamSettings,
        on_result: ResultCallback,
        on_error: ErrorCallback | None = None,
    ) -> FailoverStream:
        return FailoverStream(self, settings, on_result, on_error)


@dataclass(eq=False)
class _Utt:
    id: str
    chunks: list[np.ndarray]
    length: int
    index: int = -1  # provider serving it
    stream: RecognitionStream | None = None
    replay: bool = False  # its stream is its own (closed after the final)
    tried: set[int] = field(default_factory=set)
    paused: bool = False
    ended: bool = False
    keep: int = 0
    discard: bool = False
    voiced_ms: int | None = None
    interims_sent: int = 0
    last_interim: str = ""
    final: Hypothesis | None = None
    settled: bool = False  # final known (or nothing to deliver)
    last_error: ProviderError | None = None

    def audio(self) -> np.ndarray:
        if len(self.chunks) > 1:
            self.chunks = [np.concatenate(self.chunks)]
        return self.chunks[0] if self.chunks else np.zeros(0, np.float32)


class FailoverStream(RecognitionStream):
    def __init__(
        self,
        chain: FailoverProvider,
        settings: StreamSettings,
        on_result: ResultCallback,
        on_error: ErrorCallback | None,
    ) -> None:
        super().__init__(settings, on_result, on_error)
        self.chain = chain
        self._main: dict[int, RecognitionStream] = {}
        self._utts: dict[str, _Utt] = {}
        self._open: _Utt | None = None
        self._order: deque[_Utt] = deque()
        self._replays: set[RecognitionStream] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self.closed = False

    def _inner_settings(self) -> StreamSettings:
        return dataclasses.replace(self.settings, fallback_final=False, empty_finals=True)

    def _new_stream(self, index: int) -> RecognitionStream:
        p = self.chain.providers[index]
        holder: list[RecognitionStream] = []

        def on_result(h: Hypothesis) -> None:
            self._result(index, holder[0], h)

        def on_error(utt_id: str, err: ProviderError) -> None:
            self._error(index, holder[0], utt_id, err)

        stream = p.open_stream(self._inner_settings(), on_result, on_error)
        holder.append(stream)
        return stream

    def _pick(self, u: _Utt) -> int | None:
        language = self.settings.language
        candidates = [
            i
            for i, p in enumerate(self.chain.providers)
            if i not in u.tried and p.capabilities.supports(language)
        ]
        for i in candidates:
            if not self.chain.cooling(self.chain.providers[i]):
                return i
        # every one left is cooling down: try one anyway rather than lose
        # the speech outright (each provider at most once per utterance)
        return candidates[0] if candidates else None

    # -- the stream protocol -------------------------------------------------
    def begin(self, utt_id: str, audio: np.ndarray) -> None:
        if self.closed:
            return
        if self._open is not None and not self._open.ended:
            self.end(self._open.length)
        u = _Utt(utt_id, [audio] if len(audio) else [], len(audio))
        self._open = u
        self._utts[utt_id] = u
        self._idle.clear()
        index = self._pick(u)
        if index is None:
            self._exhausted(u)
            return
        self._assign(u, index, replay=False)

    def push(self, audio: np.ndarray) -> None:
        u = self._open
        if u is None or u.ended or self.closed:
            return
        if len(audio):
            u.chunks.append(audio)
            u.length += len(audio)
        if u.stream is not None:
            u.stream.push(audio)

    def pause(self) -> None:
        u = self._open
        if u is not None and not u.ended:
            u.paused = True
            if u.stream is not None:
                u.stream.pause()

    def resume(self) -> None:
        u = self._open
        if u is not None and not u.ended:
            u.paused = False
            if u.stream is not None:
                u.stream.resume()

    def end(
        self, keep_samples: int, *, discard: bool = False, voiced_ms: int | None = None
    ) -> None:
        u = self._open
        if u is None or u.ended or self.closed:
            return
        self._open = None
        u.ended = True
        u.keep = keep_samples
        u.discard = discard
        u.voiced_ms = voiced_ms
        self._order.append(u)
        if u.stream is not None and not u.settled:
            u.stream.end(keep_samples, discard=discard, voiced_ms=voiced_ms)
        self._flush()

    def configure(self, settings: StreamSettings) -> None:
        self.settings = settings
        for s in self._main.values():
            s.configure(self._inner_settings())

    async def drain(self) -> None:
        while self._order or (self._open is not None and self._open.ended):
            self._idle.clear()
            await self._idle.wait()

    async def aclose(self) -> None:
        self.closed = True
        for t in list(self._tasks):
            t.cancel()
        streams = [*self._main.values(), *self._replays]
        self._main.clear()
        self._replays.clear()
        for s in streams:
            with contextlib.suppress(Exception):
                await s.aclose()
        self._order.clear()
        self._idle.set()

    # -- internals ---------------------------------------------------------
    def _assign(self, u: _Utt, index: int, *, replay: bool) -> None:
        u.index = index
        u.tried.add(index)
        if replay:
            stream = self._new_stream(index)
            self._replays.add(stream)
        else:
            stream = self._main.get(index) or self._new_stream(index)
            self._main[index] = stream
        u.stream = stream
        u.replay = replay
        stream.begin(u.id, u.audio())
        if u.stream is not stream:
            return  # it failed at once and moved on
        if u.paused:
            stream.pause()
        if u.ended:
            stream.end(u.keep, discard=u.discard, voiced_ms=u.voiced_ms)

    def _result(self, index: int, stream: RecognitionStream, h: Hypothesis) -> None:
        u = self._utts.get(h.utterance_id)
        if u is None or u.stream is not stream or u.settled or self.closed:
            return  # a provider the chain moved away from
        if not h.is_final:
            if h.text == u.last_interim:
                return  # the next provider caught up with what is shown
            u.interims_sent += 1
            u.last_interim = h.text
            self.on_result(h)
            return
        h.extra["provider"] = self.chain.providers[index].name
        u.final = h
        u.settled = True
        SERVED_SECONDS.labels(self.chain.providers[index].name).inc(u.length / SR)
        self._retire(u)
        self._flush()

    def _error(
        self, index: int, stream: RecognitionStream, utt_id: str, err: ProviderError
    ) -> None:
        p = self.chain.providers[index]
        self.chain.mark_failed(p, err)
        if self.closed:
            return
        if utt_id:
            affected = [self._utts[utt_id]] if utt_id in self._utts else []
        else:
            affected = list(self._utts.values())
        for u in affected:
            if u.stream is stream and not u.settled:
                # not from inside the failing stream's own call
                asyncio.get_running_loop().call_soon(self._failover, u, index, err)

    def _failover(self, u: _Utt, failed: int, err: ProviderError) -> None:
        if self.closed or u.settled or u.index != failed:
            return
        u.last_error = err
        name = self.chain.providers[failed].name
        FAILOVERS.labels(name, error_kind(err)).inc()
        old = u.stream
        u.stream = None
        if old is not None and u.replay:
            self._close_later(old)
        index = self._pick(u)
        if index is None:
            self._exhausted(u)
            return
        log.warning(
            "utterance %s of %s: %s failed (%s); re-recognising %.1f s of audio with %s",
            u.id,
            self.settings.speaker,
            name,
            err,
            u.length / SR,
            self.chain.providers[index].name,
        )
        self._assign(u, index, replay=True)

    def _exhausted(self, u: _Utt) -> None:
        EXHAUSTED.labels(self.chain.name).inc()
        last = u.last_error
        err = ChainExhausted(
            f"{self.chain.name}: no recogniser could recognise utterance {u.id}"
            + (f" (last: {last})" if last else ""),
            last,
        )
        log.error("%s", err)
        if self.on_error is not None:
            with contextlib.suppress(Exception):
                self.on_error(u.id, err)
        u.settled = True
        u.stream = None
        if self.settings.fallback_final:
            u.final = Hypothesis(
                u.id,
                u.last_interim,
                is_final=True,
                stability=1.0,
                confidence=0.0,
                language=self.settings.language,
                extra={"error": str(err), "error_kind": err.status},
            )
        self._flush()

    def _retire(self, u: _Utt) -> None:
        if u.replay and u.stream is not None:
            self._close_later(u.stream)

    def _close_later(self, stream: RecognitionStream) -> None:
        self._replays.discard(stream)

        async def close() -> None:
            with contextlib.suppress(Exception):
                await stream.aclose()

        task = asyncio.get_running_loop().create_task(close())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _flush(self) -> None:
        """Finals leave in the order their utterances ended."""
        while self._order and self._order[0].settled:
            u = self._order.popleft()
            self._utts.pop(u.id, None)
            h = u.final
            if h is None:
                continue
            if not self.settings.empty_finals and not h.text and u.interims_sent == 0:
                continue
            self.on_result(h)
        if not self._order and (self._open is None or not self._open.ended):
            self._idle.set()
