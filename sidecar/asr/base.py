"""The recogniser interface and the base class every provider builds on.

A provider adapter implements ``_recognize_impl`` (one decode of a piece of
audio). The public :meth:`Recognizer.recognize` owns what all providers
share: the timeout, retries of transient errors, metrics and the mapping of
errors to :class:`ProviderTimeout` / :class:`ProviderError`. Streams
(:mod:`sidecar.asr.streaming`) turn decodes into interims and finals.
"""

from __future__ import annotations

import asyncio
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from prometheus_client import Counter, Histogram

from sidecar.asr.filters import DecodeResult

log = logging.getLogger(__name__)

RECOGNISE_SECONDS = Histogram(
    "captions_recogniser_seconds",
    "Time of one recogniser decode, queueing included",
    ["provider", "kind"],
    buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30),
)
RECOGNISE_ERRORS = Counter(
    "captions_recogniser_errors_total",
    "Failed recogniser decodes",
    ["provider", "error"],  # error: timeout, provider, internal
)
RECOGNISED_AUDIO = Counter(
    "captions_recognised_audio_seconds_total",
    "Seconds of audio in successful recogniser decodes (interims decode the same audio again)",
    ["provider", "kind"],
)
REAL_TIME_FACTOR = Histogram(
    "captions_recogniser_real_time_factor",
    "Decode time over the audio's duration, per decode (below 1: faster than real time)",
    ["provider", "kind"],
    buckets=(0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 5),
)


class ProviderError(Exception):
    """The provider failed; ``status`` is a short, bounded reason."""

    def __init__(self, message: str, status: str = "error", retryable: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.retryable = retryable


class ProviderTimeout(ProviderError):
    def __init__(self, message: str) -> None:
        super().__init__(message, status="timeout", retryable=True)


@dataclass(frozen=True, slots=True)
class Capabilities:
    streaming: bool
    interim_results: bool
    languages: tuple[str, ...] | None  # None: any language of sidecar.config.LANGUAGES
    local: bool


@dataclass(slots=True)
class Request:
    audio: np.ndarray
    language: str  # BCP-47 code or "auto"
    kind: str  # "interim" | "final"
    key: object = None  # coalescing key for interims (the stream)
    prompt: str = ""


@dataclass(slots=True)
class Hypothesis:
    utterance_id: str
    text: str
    is_final: bool
    stability: float
    confidence: float
    language: str
    extra: dict[str, object] = field(default_factory=dict)


ResultCallback = Callable[[Hypothesis], None]


class Recognizer(ABC):
    name: str = "abstract"
    capabilities: Capabilities

    def __init__(self, *, timeout: float = 30.0, retries: int = 1) -> None:
        self.timeout = timeout
        self.retries = retries
        for error in ("timeout", "provider", "internal"):
            RECOGNISE_ERRORS.labels(self.name, error)  # export zeros for rate() and alerts

    async def recognize(self, req: Request) -> DecodeResult:
        """One decode. Raises ProviderTimeout / ProviderError, or
        ``scheduler.Superseded`` when a newer interim replaced this one."""
        from sidecar.asr.scheduler import Superseded

        attempt = 0
        while True:
            t0 = time.monotonic()
            try:
                result = await asyncio.wait_for(self._recognize_impl(req), self.timeout)
            except Superseded:
                raise
            except TimeoutError as e:
                RECOGNISE_ERRORS.labels(self.name, "timeout").inc()
                err: ProviderError = ProviderTimeout(
                    f"{self.name}: no result within {self.timeout:.0f} s"
                )
                err.__cause__ = e
            except ProviderError as e:
                RECOGNISE_ERRORS.labels(self.name, "provider").inc()
                err = e
            except Exception as e:
                RECOGNISE_ERRORS.labels(self.name, "internal").inc()
                log.exception("%s: decode failed", self.name)
                raise ProviderError(f"{self.name}: {e}", status="internal") from e
            else:
                took, audio_s = time.monotonic() - t0, len(req.audio) / 16000
                RECOGNISE_SECONDS.labels(self.name, req.kind).observe(took)
                RECOGNISED_AUDIO.labels(self.name, req.kind).inc(audio_s)
                if audio_s > 0:
                    REAL_TIME_FACTOR.labels(self.name, req.kind).observe(took / audio_s)
                return result
            # interims are not worth a retry: the next one comes soon
            if req.kind == "final" and err.retryable and attempt < self.retries:
                attempt += 1
                log.warning("%s: %s; retrying (%d/%d)", self.name, err, attempt, self.retries)
                continue
            raise err

    @abstractmethod
    async def _recognize_impl(self, req: Request) -> DecodeResult:
        """Decode ``req.audio`` (16 kHz mono float32)."""

    def supports(self, language: str) -> bool:
        langs = self.capabilities.languages
        return langs is None or language in langs

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release models, sockets and threads."""


RecognizerFactory = Callable[..., Recognizer]
_REGISTRY: dict[str, RecognizerFactory] = {}


def register(name: str, factory: RecognizerFactory) -> None:
    _REGISTRY[name] = factory


def create(name: str, **kwargs: object) -> Recognizer:
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ProviderError(
            f"unknown provider {name!r}; available: {sorted(_REGISTRY)}", status="config"
        ) from None
    return factory(**kwargs)
