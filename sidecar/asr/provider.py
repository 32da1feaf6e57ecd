"""The streaming recogniser interface: what a room asks of any provider.

A provider (Whisper, Azure, Google, a failover chain of them) gives the room
one :class:`RecognitionStream` per speaker. The speaker pipeline drives it
with the utterance boundaries its segmenter found::

    begin(utt_id, audio) -> push(audio)* -> [pause() / resume()]* -> end(keep_samples)

and the stream answers through ``on_result`` with interim hypotheses and
exactly one final per utterance, carrying the utterance id it was given.
Errors come through ``on_error(utt_id, error)`` as a :class:`ProviderError`
subclass; with ``StreamSettings.fallback_final`` (the default) the stream
also closes the utterance with a final holding what viewers already saw,
so a failed provider never leaves an interim on screen. A failover chain
turns that off and re-recognises the utterance elsewhere instead.

Two ways to implement it:

* whole-utterance decoders (Whisper) keep their re-decode policy
  (:class:`sidecar.asr.streaming.DecodingStream`) behind a thin adapter,
  :mod:`sidecar.asr.whisper_provider`;
* push-stream services (Azure, Google) subclass :class:`TurnProvider`: every
  utterance is one recognition turn (a WebSocket turn, a gRPC streaming
  call), so the service's own endpointing never has to agree with ours and
  closing the turn forces its final. :class:`TurnStream` owns what they
  share: one final per utterance in the order utterances ended, the final
  timeout, the concurrency limit, the audio-seconds and error metrics, and
  no audio sent twice across a forced cut.

Providers are built by name from the deployment configuration through
:data:`REGISTRY`; each adapter reads and checks its own settings section
(:func:`build_provider`). Capabilities are data (:class:`Capabilities`)
that the rooms read before they pick a provider for a language.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from prometheus_client import Counter, Gauge, Histogram

from sidecar.asr.base import Hypothesis, ProviderError, ProviderTimeout, ResultCallback

log = logging.getLogger(__name__)

SR = 16000

__all__ = [
    "AUDIO_SECONDS",
    "PROVIDER_ERRORS",
    "REGISTRY",
    "Capabilities",
    "ErrorCallback",
    "ProviderAuthError",
    "ProviderConfigError",
    "ProviderError",
    "ProviderProtocolError",
    "ProviderQuotaError",
    "ProviderTimeout",
    "ProviderUnavailable",
    "RecognitionStream",
    "StreamProvider",
    "StreamSettings",
    "Turn",
    "TurnProvider",
    "TurnStream",
    "build_provider",
    "error_kind",
    "pcm16",
]

# ---------------------------------------------------------------------------
# Errors: every adapter maps its SDK's errors onto these (``raise ... from e``)


class ProviderAuthError(ProviderError):
    """Credentials missing, wrong or expired (HTTP 401/403, UNAUTHENTICATED)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, status="auth", retryable=False)


class ProviderQuotaError(ProviderError):
    """Quota, rate or concurrency limit reached (HTTP 429, RESOURCE_EXHAUSTED)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, status="quota", retryable=True)


class ProviderUnavailable(ProviderError):
    """The service cannot be reached or is down (connection refused, 503)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, status="unavailable", retryable=True)


class ProviderConfigError(ProviderError):
    """A setting is missing or invalid; the message names the setting."""

    def __init__(self, message: str) -> None:
        super().__init__(message, status="config", retryable=False)


class ProviderProtocolError(ProviderError):
    """The service answered something this adapter does not understand."""

    def __init__(self, message: str) -> None:
        super().__init__(message, status="protocol", retryable=True)


ERROR_KINDS = ("timeout", "auth", "quota", "unavailable", "config", "protocol", "internal", "error")


def error_kind(err: BaseException) -> str:
    """A bounded label for metrics and room status."""
    status = getattr(err, "status", "error")
    return status if status in ERROR_KINDS else "error"


# ---------------------------------------------------------------------------
# Metrics (labels: provider names from the registry, kinds from ERROR_KINDS)

AUDIO_SECONDS = Counter(
    "captions_provider_audio_seconds_total",
    "Seconds of audio sent to a recogniser (what cloud providers bill)",
    ["provider"],
)
PROVIDER_ERRORS = Counter(
    "captions_provider_errors_total",
    "Recognition failures by provider and kind (timeout, auth, quota, unavailable, ...)",
    ["provider", "kind"],
)
TURNS_OPEN = Gauge(
    "captions_provider_streams_open",
    "Recognition turns open on a provider (counted against its concurrency limit)",
    ["provider"],
)
PROVIDER_FINAL_SECONDS = Histogram(
    "captions_provider_final_seconds",
    "From the end of an utterance to the provider's final",
    ["provider"],
    buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30),
)


# ---------------------------------------------------------------------------
# Capabilities and per-stream settings


@dataclass(frozen=True, kw_only=True)
class Capabilities:
    """What a provider can do, declared, never probed.

    ``languages``: BCP-47 codes it serves (None: every code of
    :data:`sidecar.config.LANGUAGES`). ``language_detection``: it serves
    rooms whose language is ``auto``. ``max_concurrent_streams``: turns it
    may hold open at once (Azure's default resource limit is 100).
    """

    streaming: bool  # recognises while audio arrives (no re-decodes)
    interim_results: bool
    languages: tuple[str, ...] | None
    language_detection: bool
    local: bool = False
    max_concurrent_streams: int | None = None

    def supports(self, language: str) -> bool:
        if language == "auto":
            return self.language_detection
        if self.languages is None:
            return True
        return language in self.languages or language.split("-", 1)[0] in self.languages


@dataclass(frozen=True, kw_only=True)
class StreamSettings:
    """What a room tells the stream of one speaker."""

    language: str  # BCP-47 code or "auto"
    interim_results: bool = True
    silence_duration_ms: int = 700  # the room's end-of-utterance silence
    # close a failed utterance with a final of what was shown (rooms); a
    # failover chain sets False and re-recognises it instead
    fallback_final: bool = True
    # every utterance gets a final, empty when nothing was recognised; rooms
    # leave it False (an empty final with no interim before it is dropped)
    empty_finals: bool = False
    speaker: str = ""  # for logs only


ErrorCallback = Callable[[str, ProviderError], None]
"""``on_error(utterance_id, error)``; ``utterance_id`` is "" for a stream-wide error."""


class RecognitionStream(ABC):
    """The recognition of one speaker; see the module docstring for the protocol."""

    def __init__(
        self,
        settings: StreamSettings,
        on_result: ResultCallback,
        on_error: ErrorCallback | None,
    ) -> None:
        self.settings = settings
        self.on_result = on_result
        self.on_error = on_error

    @abstractmethod
    def begin(self, utt_id: str, audio: np.ndarray) -> None:
        """An utterance starts with ``audio`` (16 kHz mono float32 pre-roll)."""

    @abstractmethod
    def push(self, audio: np.ndarray) -> None:
        """More audio of the open utterance."""

    def pause(self) -> None:  # noqa: B027 - a hint; push streams need nothing
        """The speaker paused (the utterance may still go on)."""

    def resume(self) -> None:  # noqa: B027
        """Speech resumed after a pause."""

    @abstractmethod
    def end(
        self, keep_samples: int, *, discard: bool = False, voiced_ms: int | None = None
    ) -> None:
        """The utterance ends; its first ``keep_samples`` samples are speech.

        ``discard``: too short to be speech; a final only if interims were
        shown (an empty one, to clear them). ``voiced_ms``: how long the VAD
        was sure of speech in it (Whisper's filters use it; services ignore it).
        """

    @abstractmethod
    def configure(self, settings: StreamSettings) -> None:
        """New room settings (language, interim results) for the next utterance."""

    @abstractmethod
    async def drain(self) -> None:
        """Wait until every ended utterance has had its final (or failed)."""

    @abstractmethod
    async def aclose(self) -> None:
        """Abandon what is open; nothing is delivered afterwards."""


class StreamProvider(ABC):
    """A recogniser the rooms can use: builds one stream per speaker."""

    name: str = "abstract"
    capabilities: Capabilities

    async def start(self) -> None:  # noqa: B027 - optional
        """Connect and check credentials before the first room needs it.

        Raises :class:`ProviderConfigError` / :class:`ProviderAuthError`."""

    @abstractmethod
    def open_stream(
        self,
        settings: StreamSettings,
        on_result: ResultCallback,
        on_error: ErrorCallback | None = None,
    ) -> RecognitionStream:
        """A stream for one speaker."""

    async def aclose(self) -> None:  # noqa: B027 - optional
        """Release connections, models and threads."""


# ---------------------------------------------------------------------------
# Registry: name -> "module:function"; the module is imported only when the
# provider is configured, so a missing SDK fails at start-up with its extra.

REGISTRY: dict[str, str] = {
    "whisper": "sidecar.asr.whisper_provider:build",
    "azure": "sidecar.asr.azure:build",
    "google": "sidecar.asr.google:build",
}

ProviderFactory = Callable[..., StreamProvider]


def build_provider(
    name: str,
    section: Mapping[str, Any] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    **resources: Any,
) -> StreamProvider:
    """Build provider ``name`` from its settings section.

    ``section`` holds the keys of ``[name]`` in the configuration file,
    ``env`` the environment (``CAPTIONS_<NAME>_<KEY>`` variables win over
    the file, as everywhere in the configuration). ``resources``: shared
    parts a local provider needs (the Whisper scheduler and config).
    Raises :class:`ProviderConfigError` naming the bad setting.
    """
    try:
        target = REGISTRY[name]
    except KeyError:
        raise ProviderConfigError(
            f"unknown provider {name!r}; available: {', '.join(sorted(REGISTRY))}"
        ) from None
    module_name, _, func = target.partition(":")
    module = importlib.import_module(module_name)
    factory: ProviderFactory = getattr(module, func)
    return factory(dict(section or {}), env=dict(env or {}), **resources)


def setting(
    provider: str,
    section: Mapping[str, Any],
    env: Mapping[str, str],
    key: str,
    default: Any = None,
    *,
    kind: type = str,
) -> Any:
    """One setting of ``[provider]``: ``CAPTIONS_<PROVIDER>_<KEY>`` wins over the file."""
    var = f"CAPTIONS_{provider.upper()}_{key.upper()}"
    if var in env and env[var].strip():
        raw: Any = env[var].strip()
        source = f"environment variable {var}"
    elif key in section and section[key] is not None:
        raw = section[key]
        source = f"{provider}.{key}"
    else:
        return default
    try:
        if kind is bool:
            if isinstance(raw, bool):
                return raw
            text = str(raw).lower()
            if text in ("true", "1", "yes", "on"):
                return True
            if text in ("false", "0", "no", "off"):
                return False
            raise ValueError(raw)
        if kind is int:
            if isinstance(raw, bool):
                raise ValueError(raw)
            return int(raw)
        if kind is float:
            return float(raw)
        if kind is tuple:
            items = raw.split(",") if isinstance(raw, str) else list(raw)
            return tuple(str(i).strip() for i in items if str(i).strip())
        return str(raw).strip()
    except (TypeError, ValueError):
        raise ProviderConfigError(f"{source}: {raw!r} is not a {kind.__name__}") from None


def check_keys(
    provider: str, section: Mapping[str, Any], env: Mapping[str, str], allowed: tuple[str, ...]
) -> None:
    """Unknown keys in ``[provider]`` or ``CAPTIONS_<PROVIDER>_*`` are errors
    (a typo must not silently fall back to a default)."""
    prefix = f"CAPTIONS_{provider.upper()}_"
    for key in section:
        if key not in allowed:
            raise ProviderConfigError(
                f"{provider}.{key}: unknown key (allowed: {', '.join(allowed)})"
            )
    for var in env:
        if var.startswith(prefix) and var[len(prefix) :].lower() not in allowed:
            names = ", ".join(prefix + k.upper() for k in allowed)
            raise ProviderConfigError(f"environment variable {var}: unknown key (allowed: {names})")


def pcm16(audio: np.ndarray) -> bytes:
    """16 kHz float32 in [-1, 1] -> little-endian 16-bit PCM, what the services take."""
    return (np.clip(audio, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


# ---------------------------------------------------------------------------
# Push-stream providers: one recognition turn per utterance


@dataclass(eq=False)
class Turn:
    """One utterance on a push-stream provider."""

    id: str
    language: str
    interim_results: bool
    sent: int = 0  # samples sent to the service
    skipped: int = 0  # samples at its start the previous turn had sent already
    parts: list[str] = field(default_factory=list)  # texts the service finalised
    confidences: list[float] = field(default_factory=list)
    detected_language: str = ""
    interim: str = ""  # what viewers see now
    interims_sent: int = 0
    ended: bool = False  # end() was called
    discard: bool = False
    done: bool = False  # the service finished the turn (or it failed)
    error: ProviderError | None = None
    delivered: bool = False
    ended_at: float = 0.0
    timer: asyncio.TimerHandle | None = None
    counted: bool = False  # holds a place under the provider's concurrency limit
    state: Any = None  # the adapter's own (SDK objects, tasks)


class TurnProvider(StreamProvider):
    """Base of push-stream adapters. Subclasses implement the four ``_turn_*``
    hooks; the results come back through ``TurnStream.turn_*`` on the loop."""

    final_timeout_s: float = 10.0

    def __init__(self, *, max_concurrent: int | None = None, final_timeout_s: float = 10.0):
        self.max_concurrent = max_concurrent
        self.final_timeout_s = final_timeout_s
        self.open_turns = 0

    def open_stream(
        self,
        settings: StreamSettings,
        on_result: ResultCallback,
        on_error: ErrorCallback | None = None,
    ) -> TurnStream:
        return TurnStream(self, settings, on_result, on_error)

    @abstractmethod
    def _turn_open(self, stream: TurnStream, turn: Turn) -> None:
        """Start a turn (connect, send the configuration). Must not block."""

    @abstractmethod
    def _turn_send(self, stream: TurnStream, turn: Turn, pcm: bytes) -> None:
        """Queue audio of the turn (16-bit PCM). Must not block."""

    @abstractmethod
    def _turn_close(self, stream: TurnStream, turn: Turn) -> None:
        """No more audio: the service should finalise and finish the turn."""

    @abstractmethod
    def _turn_abort(self, stream: TurnStream, turn: Turn) -> None:
        """Drop the turn; nothing more is wanted from it."""


class TurnStream(RecognitionStream):
    """A speaker's stream on a :class:`TurnProvider`; see the module docstring."""

    def __init__(
        self,
        provider: TurnProvider,
        settings: StreamSettings,
        on_result: ResultCallback,
        on_error: ErrorCallback | None,
    ) -> None:
        super().__init__(settings, on_result, on_error)
        self.provider = provider
        self.turn: Turn | None = None
        self._ending: deque[Turn] = deque()  # ended, final not yet delivered
        self._prev_tail = np.zeros(0, np.float32)  # audio past the last keep
        self._tail: list[np.ndarray] = []
        self._idle = asyncio.Event()
        self._idle.set()
        self.closed = False

    @property
    def name(self) -> str:
        return self.provider.name

    # -- driven by the speaker pipeline ------------------------------------
    def begin(self, utt_id: str, audio: np.ndarray) -> None:
        if self.closed:
            return
        if self.turn is not None and not self.turn.ended:
            self.end(self.turn.skipped + self.turn.sent)
        s = self.settings
        interims = s.interim_results and self.provider.capabilities.interim_results
        turn = Turn(utt_id, s.language, interims)
        self.turn = turn
        # after a forced cut the next utterance starts with the audio past the
        # cut, which this stream has already sent with the previous turn:
        # sending it again would recognise those words twice
        carry = self._prev_tail
        self._prev_tail = np.zeros(0, np.float32)
        self._tail = []
        if len(carry) and len(audio) >= len(carry) and np.array_equal(audio[: len(carry)], carry):
            audio = audio[len(carry) :]
            turn.skipped = len(carry)
        p = self.provider
        if p.max_concurrent is not None and p.open_turns >= p.max_concurrent:
            err = ProviderQuotaError(
                f"{p.name}: {p.max_concurrent} concurrent streams in use "
                "(the provider's concurrency limit)"
            )
            turn.done = True  # nothing was opened: nothing to close
            self.turn_failed(turn, err)
            return
        p.open_turns += 1
        turn.counted = True
        TURNS_OPEN.labels(p.name).set(p.open_turns)
        self._idle.clear()
        try:
            p._turn_open(self, turn)
        except ProviderError as e:
            self.turn_failed(turn, e)
            return
        self._send(turn, audio)

    def push(self, audio: np.ndarray) -> None:
        t = self.turn
        if t is None or t.ended or self.closed:
            return
        self._send(t, audio)

    def end(
        self, keep_samples: int, *, discard: bool = False, voiced_ms: int | None = None
    ) -> None:
        t = self.turn
        if t is None or t.ended or self.closed:
            return
        t.ended = True
        t.discard = discard
        t.ended_at = time.monotonic()
        length = t.skipped + t.sent  # the pipeline counts from the turn's first sample
        if 0 <= keep_samples < length and self._tail:
            tail = np.concatenate(self._tail)
            over = length - keep_samples
            self._prev_tail = tail[-over:] if over <= len(tail) else np.zeros(0, np.float32)
        self._tail = []
        if discard and t.interims_sent == 0 and not self.settings.empty_finals:
            self._finish_silently(t)
            return
        self._ending.append(t)
        if t.done:  # failed before it ended
            self._flush()
            return
        if discard:
            # too short to be speech: clear what was shown, the service's
            # opinion is not wanted
            self._abort(t)
            t.done = True
            t.parts = []
            self._flush()
            return
        loop = asyncio.get_running_loop()
        t.timer = loop.call_later(self.provider.final_timeout_s, self._timed_out, t)
        try:
            self.provider._turn_close(self, t)
        except ProviderError as e:
            self.turn_failed(t, e)

    def configure(self, settings: StreamSettings) -> None:
        self.settings = settings

    async def drain(self) -> None:
        while self._ending or (self.turn is not None and self.turn.ended and not self.turn.done):
            self._idle.clear()
            await self._idle.wait()

    async def aclose(self) -> None:
        self.closed = True
        for t in [*self._ending, *([self.turn] if self.turn else [])]:
            if not t.done:
                self._abort(t)
                t.done = True
            if t.timer is not None:
                t.timer.cancel()
        self._ending.clear()
        self._idle.set()

    # -- called by the adapter, on the event loop ----------------------------
    def turn_interim(self, turn: Turn, text: str, stability: float, language: str = "") -> None:
        """The service's current hypothesis of the part not yet finalised."""
        if turn.done or turn.delivered or self.closed or not turn.interim_results:
            return
        if language:
            turn.detected_language = language
        full = " ".join(p for p in [*turn.parts, text.strip()] if p)
        if not full or full == turn.interim:
            return
        turn.interim = full
        turn.interims_sent += 1
        stable_words = sum(len(p.split()) for p in turn.parts)
        words = len(full.split())
        # finalised parts are stable; the service's stability covers the rest
        stab = (stable_words + stability * (words - stable_words)) / words if words else 0.0
        self.on_result(
            Hypothesis(
                turn.id,
                full,
                is_final=False,
                stability=round(min(1.0, max(0.0, stab)), 3),
                confidence=0.0,
                language=self._language(turn),
            )
        )

    def turn_final_part(
        self, turn: Turn, text: str, confidence: float = 0.0, language: str = ""
    ) -> None:
        """A segment the service finalised; the utterance's final joins them."""
        if turn.done or self.closed:
            return
        if language:
            turn.detected_language = language
        if text.strip():
            turn.parts.append(text.strip())
            turn.confidences.append(confidence)

    def turn_done(self, turn: Turn) -> None:
        """The service finished the turn: every final part has arrived."""
        if turn.done:
            return
        turn.done = True
        self._release(turn)
        if turn.ended and not turn.discard:
            PROVIDER_FINAL_SECONDS.labels(self.name).observe(time.monotonic() - turn.ended_at)
        if not turn.ended:
            # the service ended the turn early (its own limit): the rest of
            # the utterance has nowhere to go; the adapter restarts turns
            # it can restart, so this is a failure
            self.turn_failed(turn, ProviderProtocolError(f"{self.name}: turn ended early"))
            return
        self._flush()

    def turn_failed(self, turn: Turn, err: ProviderError) -> None:
        """The turn failed; the utterance gets no text from this provider."""
        if turn.delivered or turn.error is not None or self.closed:
            return
        PROVIDER_ERRORS.labels(self.name, error_kind(err)).inc()
        log.warning(
            "%s: utterance %s of %s failed: %s", self.name, turn.id, self.settings.speaker, err
        )
        turn.error = err
        if not turn.done:
            self._abort(turn)
            turn.done = True
        self._release(turn)
        if self.on_error is not None:
            try:
                self.on_error(turn.id, err)
            except Exception:
                log.exception("%s: error listener failed", self.name)
        if turn.ended:
            self._flush()

    # -- internals ---------------------------------------------------------
    def _send(self, t: Turn, audio: np.ndarray) -> None:
        if not len(audio) or t.done:
            return
        self._tail.append(audio)
        # keep only what a forced cut can give back (the segmenter searches
        # its last 2.5 s for the cut)
        while len(self._tail) > 1 and sum(len(a) for a in self._tail[1:]) > 3 * SR:
            self._tail.pop(0)
        t.sent += len(audio)
        AUDIO_SECONDS.labels(self.name).inc(len(audio) / SR)
        try:
            self.provider._turn_send(self, t, pcm16(audio))
        except ProviderError as e:
            self.turn_failed(t, e)

    def _timed_out(self, t: Turn) -> None:
        t.timer = None
        if not t.done:
            self.turn_failed(
                t,
                ProviderTimeout(
                    f"{self.name}: no final within {self.provider.final_timeout_s:.1f} s "
                    "of the end of the utterance"
                ),
            )

    def _abort(self, t: Turn) -> None:
        with contextlib.suppress(Exception):
            self.provider._turn_abort(self, t)
        self._release(t)

    def _release(self, t: Turn) -> None:
        if t.timer is not None:
            t.timer.cancel()
            t.timer = None
        if t.counted:
            t.counted = False
            p = self.provider
            p.open_turns = max(0, p.open_turns - 1)
            TURNS_OPEN.labels(p.name).set(p.open_turns)

    def _finish_silently(self, t: Turn) -> None:
        self._abort(t)
        t.done = True
        t.delivered = True
        self._wake()

    def _flush(self) -> None:
        """Finals leave in the order their utterances ended."""
        while self._ending and self._ending[0].done:
            t = self._ending.popleft()
            if t.delivered:
                continue
            t.delivered = True
            if t.error is not None and not self.settings.fallback_final:
                continue  # the chain re-recognises it
            text = "" if t.discard else " ".join(t.parts)
            extra: dict[str, object] = {"audio_ms": t.sent * 1000 // SR, "provider": self.name}
            if t.error is not None:
                text = t.interim  # keep what the viewers already saw
                extra["error"] = str(t.error)
                extra["error_kind"] = error_kind(t.error)
            if not text and t.interims_sent == 0 and not self.settings.empty_finals:
                continue
            conf = float(np.mean(t.confidences)) if t.confidences and t.error is None else 0.0
            self.on_result(
                Hypothesis(
                    t.id,
                    text,
                    is_final=True,
                    stability=1.0,
                    confidence=conf,
                    language=self._language(t),
                    extra=extra,
                )
            )
        self._wake()

    def _wake(self) -> None:
        if not self._ending and (self.turn is None or self.turn.done or not self.turn.ended):
            self._idle.set()

    def _language(self, t: Turn) -> str:
        if t.language == "auto" and t.detected_language:
            return t.detected_language
        return t.language


# ---------------------------------------------------------------------------
# Languages: the cloud services want a locale; a room may name a bare tag

_DEFAULT_LOCALES = {
    "ar": "ar-SA", "bg": "bg-BG", "ca": "ca-ES", "cs": "cs-CZ", "da": "da-DK",
    "de": "de-DE", "el": "el-GR", "en": "en-US", "es": "es-ES", "et": "et-EE",
    "fa": "fa-IR", "fi": "fi-FI", "fr": "fr-FR", "he": "he-IL", "hi": "hi-IN",
    "hr": "hr-HR", "hu": "hu-HU", "id": "id-ID", "it": "it-IT", "ja": "ja-JP",
    "ko": "ko-KR", "lt": "lt-LT", "lv": "lv-LV", "nb": "nb-NO", "nl": "nl-NL",
    "pl": "pl-PL", "pt": "pt-BR", "ro": "ro-RO", "ru": "ru-RU", "sk": "sk-SK",
    "sl": "sl-SI", "sv": "sv-SE", "th": "th-TH", "tr": "tr-TR", "uk": "uk-UA",
    "vi": "vi-VN",
}  # fmt: skip


def locale_of(language: str) -> str:
    """The locale a cloud service expects for a room language ("de" -> "de-DE")."""
    return _DEFAULT_LOCALES.get(language, language)


def room_language(locale: str) -> str:
    """A locale a service reported, in the spelling the room uses when it can."""
    from sidecar.config import SettingError, canonical_language

    try:
        return canonical_language(locale)
    except SettingError:
        try:
            return canonical_language(locale.split("-", 1)[0])
        except SettingError:
            return locale
