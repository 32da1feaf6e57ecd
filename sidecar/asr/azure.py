"""Azure AI Speech through ``azure-cognitiveservices-speech`` (continuous recognition).

Install with ``pip install 'jitsi-captions-sidecar[azure]'``.

Each utterance of a speaker is one continuous-recognition session fed by a
push stream: ``recognizing`` events become interims, ``recognized`` ones the
parts of the utterance's final; closing the push stream when the utterance
ends makes the service finalise at once (its ``turn.end``), so the final
never waits for the service's own end-of-speech detection. The service
still segments long utterances at the room's silence
(``Speech_SegmentationSilenceTimeoutMs`` from ``silence_duration_ms``); the
parts are joined. Partial results are held back until stable
(``SpeechServiceResponse_StablePartialResultThreshold``), so interims do not
flicker. Rooms set to ``auto`` use continuous language identification over
up to 10 candidate languages.

Settings, section ``[azure]`` (or ``CAPTIONS_AZURE_<KEY>``), one of:
``key`` + ``region``; ``key`` + ``endpoint``; ``key`` + ``host``;
``token`` + ``region`` (or ``host``). Also ``auto_languages`` (up to 10),
``stable_partial_threshold`` (default 3), ``max_concurrent_streams``
(default 100, Azure's default per resource), ``final_timeout_s``.

The SDK calls back on its own threads; every event is handed to the event
loop with ``call_soon_threadsafe``. SDK calls that may block (stopping a
session) run in worker threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sidecar.asr.base import ProviderError, ProviderTimeout
from sidecar.asr.provider import (
    Capabilities,
    ProviderAuthError,
    ProviderConfigError,
    ProviderQuotaError,
    ProviderUnavailable,
    Turn,
    TurnProvider,
    TurnStream,
    check_keys,
    locale_of,
    room_language,
    setting,
)

try:
    import azure.cognitiveservices.speech as speechsdk
except ImportError as e:  # pragma: no cover - depends on the install
    raise ProviderConfigError(
        "provider 'azure' needs azure-cognitiveservices-speech: "
        "pip install 'jitsi-captions-sidecar[azure]'"
    ) from e

log = logging.getLogger(__name__)

SR = 16000
MAX_AUTO_LANGUAGES = 10  # continuous language identification takes up to 10
SETTINGS = (
    "key", "region", "endpoint", "host", "token", "auto_languages",
    "stable_partial_threshold", "max_concurrent_streams", "final_timeout_s", "fallback",
)  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class AzureOptions:
    key: str | None = None
    region: str | None = None
    endpoint: str | None = None
    host: str | None = None
    token: str | None = None
    auto_languages: tuple[str, ...] = ()
    stable_partial_threshold: int = 3
    max_concurrent_streams: int = 100
    final_timeout_s: float = 10.0

    @classmethod
    def from_settings(cls, section: Mapping[str, Any], env: Mapping[str, str]) -> AzureOptions:
        check_keys("azure", section, env, SETTINGS)

        def get(key: str, default: Any = None, kind: type = str) -> Any:
            return setting("azure", section, env, key, default, kind=kind)

        auto = get("auto_languages", (), tuple)
        if len(auto) > MAX_AUTO_LANGUAGES:
            raise ProviderConfigError(
                f"azure.auto_languages: at most {MAX_AUTO_LANGUAGES} for continuous "
                f"language identification, got {len(auto)}"
            )
        opts = cls(
            key=get("key"),
            region=get("region"),
            endpoint=get("endpoint"),
            host=get("host"),
            token=get("token"),
            auto_languages=tuple(locale_of(a) for a in auto),
            stable_partial_threshold=get("stable_partial_threshold", 3, int),
            max_concurrent_streams=get("max_concurrent_streams", 100, int),
            final_timeout_s=get("final_timeout_s", 10.0, float),
        )
        opts.check()
        return opts

    def check(self) -> None:
        if not self.key and not self.token:
            raise ProviderConfigError(
                "azure: no credentials; set azure.key (CAPTIONS_AZURE_KEY) or "
                "azure.token (CAPTIONS_AZURE_TOKEN)"
            )
        if not (self.region or self.endpoint or self.host):
            raise ProviderConfigError(
                "azure: no service location; set azure.region (CAPTIONS_AZURE_REGION), "
                "azure.endpoint (CAPTIONS_AZURE_ENDPOINT) or azure.host (CAPTIONS_AZURE_HOST)"
            )
        if sum(bool(x) for x in (self.region, self.endpoint, self.host)) > 1:
            raise ProviderConfigError(
                "azure: set only one of azure.region, azure.endpoint and azure.host"
            )
        if self.max_concurrent_streams < 1:
            raise ProviderConfigError("azure.max_concurrent_streams: at least 1")


@dataclass(eq=False)
class _Session:
    push: Any
    recognizer: Any
    last_interim: str = ""


class AzureProvider(TurnProvider):
    name = "azure"

    def __init__(self, options: AzureOptions) -> None:
        super().__init__(
            max_concurrent=options.max_concurrent_streams,
            final_timeout_s=options.final_timeout_s,
        )
        self.options = options
        self.capabilities = Capabilities(
            streaming=True,
            interim_results=True,
            languages=None,
            language_detection=bool(options.auto_languages),
            max_concurrent_streams=options.max_concurrent_streams,
        )
        self._stopping: list[threading.Event] = []

    async def start(self) -> None:
        self._speech_config("en-US", 700)  # the SDK checks the settings here

    def _speech_config(self, language: str, silence_ms: int) -> Any:
        o = self.options
        try:
            if o.endpoint:
                cfg = speechsdk.SpeechConfig(subscription=o.key, endpoint=o.endpoint)
            elif o.host:
                cfg = speechsdk.SpeechConfig(subscription=o.key, host=o.host)
            elif o.key:
                cfg = speechsdk.SpeechConfig(subscription=o.key, region=o.region)
            else:
                cfg = speechsdk.SpeechConfig(auth_token=o.token, region=o.region)
            if o.token and (o.endpoint or o.host):
                cfg.authorization_token = o.token
        except (ValueError, RuntimeError) as e:
            raise ProviderConfigError(f"azure: the SDK refuses the settings: {e}") from e
        if language != "auto":
            cfg.speech_recognition_language = locale_of(language)
        cfg.set_property(
            speechsdk.PropertyId.Speech_SegmentationSilenceTimeoutMs, str(int(silence_ms))
        )
        if o.stable_partial_threshold > 0:
            cfg.set_property(
                speechsdk.PropertyId.SpeechServiceResponse_StablePartialResultThreshold,
                str(o.stable_partial_threshold),
            )
        if language == "auto":
            cfg.set_property(
                speechsdk.PropertyId.SpeechServiceConnection_LanguageIdMode, "Continuous"
            )
        return cfg

    # -- turns -------------------------------------------------------------
    def _turn_open(self, stream: TurnStream, turn: Turn) -> None:
        loop = asyncio.get_running_loop()
        cfg = self._speech_config(turn.language, stream.settings.silence_duration_ms)
        fmt = speechsdk.audio.AudioStreamFormat(
            samples_per_second=SR, bits_per_sample=16, channels=1
        )
        push = speechsdk.audio.PushAudioInputStream(stream_format=fmt)
        audio = speechsdk.audio.AudioConfig(stream=push)
        kwargs: dict[str, Any] = {"speech_config": cfg, "audio_config": audio}
        if turn.language == "auto":
            kwargs["auto_detect_source_language_config"] = (
                speechsdk.languageconfig.AutoDetectSourceLanguageConfig(
                    languages=list(self.options.auto_languages[:MAX_AUTO_LANGUAGES])
                )
            )
        try:
            rec = speechsdk.SpeechRecognizer(**kwargs)
        except (ValueError, RuntimeError) as e:
            raise ProviderConfigError(f"azure: cannot create a recogniser: {e}") from e
        session = _Session(push, rec)
        turn.state = session

        def on_loop(fn: Any, *args: Any) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed
                loop.call_soon_threadsafe(fn, *args)

        rec.recognizing.connect(lambda e: on_loop(self._recognizing, stream, turn, e.result))
        rec.recognized.connect(lambda e: on_loop(self._recognized, stream, turn, e.result))
        rec.canceled.connect(lambda e: on_loop(self._canceled, stream, turn, _cancel_info(e)))
        rec.session_stopped.connect(lambda e: on_loop(self._stopped, stream, turn))
        rec.start_continuous_recognition_async()

    def _turn_send(self, stream: TurnStream, turn: Turn, pcm: bytes) -> None:
        session: _Session = turn.state
        session.push.write(pcm)

    def _turn_close(self, stream: TurnStream, turn: Turn) -> None:
        session: _Session = turn.state
        session.push.close()  # the end of the audio: the service finalises

    def _turn_abort(self, stream: TurnStream, turn: Turn) -> None:
        self._dispose(turn)

    def _dispose(self, turn: Turn) -> None:
        session = turn.state
        if not isinstance(session, _Session):
            return
        turn.state = None

        def stop() -> None:
            with contextlib.suppress(Exception):
                session.push.close()
            for signal in ("recognizing", "recognized", "canceled", "session_stopped"):
                with contextlib.suppress(Exception):
                    getattr(session.recognizer, signal).disconnect_all()
            with contextlib.suppress(Exception):
                session.recognizer.stop_continuous_recognition_async().get()

        # stopping a session whose connection failed can block for seconds
        # inside the SDK: a daemon thread, so neither the loop nor shutdown waits
        done = threading.Event()

        def run() -> None:
            try:
                stop()
            finally:
                done.set()

        threading.Thread(target=run, name="azure-stop", daemon=True).start()
        self._stopping.append(done)
        self._stopping = [d for d in self._stopping if not d.is_set()]

    async def aclose(self) -> None:
        # give sessions being stopped a moment, not the SDK's full timeouts
        deadline = asyncio.get_running_loop().time() + 2.0
        while any(not d.is_set() for d in self._stopping):
            if asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.05)

    # -- SDK events, on the loop -------------------------------------------
    def _language(self, turn: Turn, result: Any) -> str:
        if turn.language != "auto":
            return ""
        with contextlib.suppress(Exception):
            lang = speechsdk.AutoDetectSourceLanguageResult(result).language
            if lang:
                return room_language(lang)
        return ""

    def _recognizing(self, stream: TurnStream, turn: Turn, result: Any) -> None:
        session = turn.state
        text = result.text or ""
        if not isinstance(session, _Session) or not text:
            return
        # words agreeing with the previous partial are stable
        prev = session.last_interim.split()
        words = text.split()
        same = 0
        while same < min(len(prev), len(words)) and prev[same] == words[same]:
            same += 1
        session.last_interim = text
        stability = same / len(words) if words else 0.0
        stream.turn_interim(turn, text, stability, self._language(turn, result))

    def _recognized(self, stream: TurnStream, turn: Turn, result: Any) -> None:
        if result.reason != speechsdk.ResultReason.RecognizedSpeech:
            return  # NoMatch: silence or noise
        session = turn.state
        if isinstance(session, _Session):
            session.last_interim = ""
        stream.turn_final_part(turn, result.text or "", 0.0, self._language(turn, result))

    def _canceled(self, stream: TurnStream, turn: Turn, info: tuple[Any, Any, str]) -> None:
        reason, code, details = info
        if reason == speechsdk.CancellationReason.EndOfStream:
            self._finished(stream, turn)
            return
        stream.turn_failed(turn, _map_error(code, details))
        self._dispose(turn)

    def _stopped(self, stream: TurnStream, turn: Turn) -> None:
        self._finished(stream, turn)

    def _finished(self, stream: TurnStream, turn: Turn) -> None:
        if turn.ended and not turn.done:
            stream.turn_done(turn)
            self._dispose(turn)


def _cancel_info(evt: Any) -> tuple[Any, Any, str]:
    d = evt.cancellation_details
    return d.reason, d.code, d.error_details or ""


def _map_error(code: Any, details: str) -> ProviderError:
    C = speechsdk.CancellationErrorCode
    msg = f"azure: {details or code}"
    if code in (C.AuthenticationFailure, C.Forbidden):
        return ProviderAuthError(msg)
    if code == C.TooManyRequests:
        return ProviderQuotaError(msg)
    if code in (C.ConnectionFailure, C.ServiceUnavailable):
        return ProviderUnavailable(msg)
    if code == C.ServiceTimeout:
        return ProviderTimeout(msg)
    if code == C.BadRequest:
        return ProviderError(msg, status="config")
    return ProviderError(msg, status="error", retryable=True)


def build(section: Mapping[str, Any], *, env: Mapping[str, str], **_: Any) -> AzureProvider:
    return AzureProvider(AzureOptions.from_settings(section, env))
