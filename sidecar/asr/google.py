"""Google Cloud Speech-to-Text (v1 ``StreamingRecognize``) through ``google-cloud-speech``.

Install with ``pip install 'jitsi-captions-sidecar[google]'``.

Each utterance is one streaming call: the first request carries the
configuration (LINEAR16, 16 kHz, the room's language, interim results), the
following ones the audio; half-closing the call when the utterance ends
makes the service finalise it at once. The utterance's final joins the
call's final results; interims are the finalised part plus the current
results, whose ``stability`` the caption's stability reflects.

Stream-length limit: the service ends a call that has carried too much audio
(OUT_OF_RANGE "Exceeded maximum allowed stream duration of 305 seconds.",
v2: ABORTED "Max duration of 5 minutes reached for stream."). A call never
spans two utterances, so a new one starts at every utterance boundary; if
the limit still strikes inside an utterance, a new call resumes with the
audio after the last final result (its ``result_end_time``), so nothing is
lost and nothing recognised twice.

Settings, section ``[google]`` (or ``CAPTIONS_GOOGLE_<KEY>``):

``credentials_file``  service-account JSON key (else ``api_key``, else
                      ``application_default = true`` for the environment's
                      Application Default Credentials)
``api_key``           an API key instead of a service account
``endpoint``          ``speech.googleapis.com`` (``eu-speech.googleapis.com``, ...)
``insecure``          plaintext gRPC to ``endpoint`` with no credentials: only
                      for local stand-ins of the service (the tests)
``model``             ``latest_long`` by default
``auto_languages``    rooms set to ``auto``: the first is the language, up to
                      three more are alternatives the service may detect
``max_concurrent_streams``, ``final_timeout_s``
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
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
    import grpc
    from google.api_core import exceptions as gexc
    from google.api_core.client_options import ClientOptions
    from google.cloud import speech_v1
    from google.cloud.speech_v1.services.speech.transports import SpeechGrpcTransport
except ImportError as e:  # pragma: no cover - depends on the install
    raise ProviderConfigError(
        "provider 'google' needs google-cloud-speech: pip install 'jitsi-captions-sidecar[google]'"
    ) from e

log = logging.getLogger(__name__)

SR = 16000
CHUNK_BYTES = 2 * SR // 10  # 100 ms per request: Google's recommended frame size
MAX_RESTARTS = 8
SETTINGS = (
    "endpoint", "credentials_file", "api_key", "application_default", "insecure", "model",
    "punctuation", "auto_languages", "max_concurrent_streams", "final_timeout_s", "fallback",
)  # fmt: skip
CALL_TIMEOUT_S = 600.0  # a call carries one utterance (at most max_speech_caption_ms)


@dataclass(frozen=True, kw_only=True)
class GoogleOptions:
    endpoint: str = "speech.googleapis.com"
    credentials_file: Path | None = None
    api_key: str | None = None
    application_default: bool = False
    insecure: bool = False
    model: str = "latest_long"
    punctuation: bool = True
    auto_languages: tuple[str, ...] = ()
    max_concurrent_streams: int | None = None
    final_timeout_s: float = 10.0

    @classmethod
    def from_settings(cls, section: Mapping[str, Any], env: Mapping[str, str]) -> GoogleOptions:
        check_keys("google", section, env, SETTINGS)

        def get(key: str, default: Any = None, kind: type = str) -> Any:
            return setting("google", section, env, key, default, kind=kind)

        creds = get("credentials_file")
        auto = get("auto_languages", (), tuple)
        if len(auto) > 4:
            raise ProviderConfigError(
                f"google.auto_languages: at most 4 (a language and 3 alternatives), got {len(auto)}"
            )
        opts = cls(
            endpoint=get("endpoint", cls.endpoint),
            credentials_file=Path(creds).expanduser() if creds else None,
            api_key=get("api_key"),
            application_default=get("application_default", False, bool),
            insecure=get("insecure", False, bool),
            model=get("model", cls.model),
            punctuation=get("punctuation", True, bool),
            auto_languages=tuple(locale_of(a) for a in auto),
            max_concurrent_streams=get("max_concurrent_streams", None, int),
            final_timeout_s=get("final_timeout_s", 10.0, float),
        )
        opts.check()
        return opts

    def check(self) -> None:
        if self.insecure:
            return
        if self.credentials_file is None and not self.api_key and not self.application_default:
            raise ProviderConfigError(
                "google: no credentials; set google.credentials_file "
                "(CAPTIONS_GOOGLE_CREDENTIALS_FILE) to a service-account key, "
                "google.api_key (CAPTIONS_GOOGLE_API_KEY), or "
                "google.application_default = true"
            )
        if self.credentials_file is not None and not self.credentials_file.is_file():
            raise ProviderConfigError(
                f"google.credentials_file: {self.credentials_file} does not exist"
            )


@dataclass(eq=False)
class _Call:
    """One utterance: its audio (kept for restarts) and the worker's state."""

    audio: bytearray = field(default_factory=bytearray)
    cond: threading.Condition = field(default_factory=threading.Condition)
    closed: bool = False  # no more audio will come
    aborted: bool = False
    responses: Any = None  # the current call's response iterator (to cancel it)
    future: Any = None


class GoogleProvider(TurnProvider):
    """Each utterance runs its streaming call in a worker thread of the
    provider's own pool, on the library's synchronous client: its request
    thread stops quietly when the server ends a call, so the server's status
    (UNAUTHENTICATED, RESOURCE_EXHAUSTED, OUT_OF_RANGE...) always reaches us.
    (grpc.aio replaces that status with INTERNAL "Internal error from Core"
    when a request is being written as the server ends the call.)"""

    name = "google"

    def __init__(self, options: GoogleOptions) -> None:
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
        self._client: speech_v1.SpeechClient | None = None
        self._lock = threading.Lock()
        workers = min(options.max_concurrent_streams or 256, 1024)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="google-speech")

    async def start(self) -> None:
        await asyncio.to_thread(self._ensure_client)

    def _ensure_client(self) -> speech_v1.SpeechClient:
        with self._lock:
            if self._client is None:
                self._client = self._make_client()
            return self._client

    def _make_client(self) -> speech_v1.SpeechClient:
        o = self.options
        if o.insecure:
            # a channel we build ourselves: the documented way to hand the
            # transport a channel (the client then ignores credentials)
            transport = SpeechGrpcTransport(
                host=o.endpoint, channel=grpc.insecure_channel(o.endpoint)
            )
            return speech_v1.SpeechClient(
                transport=transport, client_options=ClientOptions(api_endpoint=o.endpoint)
            )
        credentials = None
        client_options = ClientOptions(api_endpoint=o.endpoint)
        try:
            if o.credentials_file is not None:
                from google.oauth2 import service_account

                credentials = service_account.Credentials.from_service_account_file(
                    str(o.credentials_file)
                )
            elif o.api_key:
                client_options = ClientOptions(api_endpoint=o.endpoint, api_key=o.api_key)
            return speech_v1.SpeechClient(credentials=credentials, client_options=client_options)
        except (ValueError, OSError, gexc.GoogleAPIError) as e:
            raise ProviderConfigError(f"google: cannot use the credentials: {e}") from e

    async def aclose(self) -> None:
        client, self._client = self._client, None
        self._pool.shutdown(wait=False, cancel_futures=True)
        if client is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(client.transport.close)

    # -- turns (on the loop) -----------------------------------------------
    def _turn_open(self, stream: TurnStream, turn: Turn) -> None:
        loop = asyncio.get_running_loop()
        call = _Call()
        turn.state = call
        config = self._config(turn)

        def post(fn: Any, *args: Any) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone
                loop.call_soon_threadsafe(fn, *args)

        call.future = self._pool.submit(self._run, stream, turn, call, config, post)

    def _turn_send(self, stream: TurnStream, turn: Turn, pcm: bytes) -> None:
        call: _Call = turn.state
        with call.cond:
            call.audio += pcm
            call.cond.notify_all()

    def _turn_close(self, stream: TurnStream, turn: Turn) -> None:
        call: _Call = turn.state
        with call.cond:
            call.closed = True
            call.cond.notify_all()

    def _turn_abort(self, stream: TurnStream, turn: Turn) -> None:
        call = turn.state
        if not isinstance(call, _Call):
            return
        with call.cond:
            call.aborted = True
            call.closed = True
            call.cond.notify_all()
        if call.future is not None:
            call.future.cancel()
        with contextlib.suppress(Exception):
            if call.responses is not None:
                call.responses.cancel()

    def _config(self, turn: Turn) -> speech_v1.StreamingRecognitionConfig:
        o = self.options
        if turn.language == "auto" and o.auto_languages:
            language, alternatives = o.auto_languages[0], list(o.auto_languages[1:4])
        else:
            language, alternatives = locale_of(turn.language), []
        return speech_v1.StreamingRecognitionConfig(
            config=speech_v1.RecognitionConfig(
                encoding=speech_v1.RecognitionConfig.AudioEncoding.LINEAR16,
                sample_rate_hertz=SR,
                audio_channel_count=1,
                language_code=language,
                alternative_language_codes=alternatives,
                enable_automatic_punctuation=o.punctuation,
                model=o.model,
            ),
            interim_results=turn.interim_results,
        )

    # -- the worker thread ---------------------------------------------------
    def _run(
        self,
        stream: TurnStream,
        turn: Turn,
        call: _Call,
        config: speech_v1.StreamingRecognitionConfig,
        post: Any,
    ) -> None:
        start = 0  # byte offset of the audio the current call begins with
        restarts = 0
        try:
            client = self._ensure_client()
            while not call.aborted:
                resume = self._one_call(client, stream, turn, call, config, start, post)
                if resume is None:
                    post(stream.turn_done, turn)
                    return
                restarts += 1
                if restarts > MAX_RESTARTS:
                    raise ProviderError(f"google: {restarts} stream restarts in one utterance")
                log.info(
                    "google: stream ended inside utterance %s; resuming at %.2f s",
                    turn.id,
                    resume / 2 / SR,
                )
                start = resume
        except ProviderError as e:
            if not call.aborted:
                post(stream.turn_failed, turn, e)
        except Exception as e:  # a bug here must not hang the utterance
            if not call.aborted:
                log.exception("google: utterance %s", turn.id)
                post(stream.turn_failed, turn, ProviderError(f"google: {e}", status="internal"))

    def _one_call(
        self,
        client: speech_v1.SpeechClient,
        stream: TurnStream,
        turn: Turn,
        call: _Call,
        config: speech_v1.StreamingRecognitionConfig,
        start: int,
        post: Any,
    ) -> int | None:
        """One streaming call from byte ``start``; returns where to resume
        after the stream-length limit, or None when the utterance is done."""
        over = threading.Event()

        def requests() -> Iterator[speech_v1.StreamingRecognizeRequest]:
            pos = start
            while not over.is_set():
                with call.cond:
                    chunk = bytes(call.audio[pos : pos + CHUNK_BYTES])
                    if not chunk:
                        if call.closed:
                            return
                        call.cond.wait(0.5)
                        continue
                pos += len(chunk)
                yield speech_v1.StreamingRecognizeRequest(audio_content=chunk)

        final_end = start  # byte offset just after the last final result
        try:
            # no retry: the library's default retries UNAVAILABLE for up to
            # 5000 s with the request iterator it has already consumed
            # (SpeechHelpers.streaming_recognize sends ``config`` first; the
            # stubs only know the generated signature)
            recognize: Any = client.streaming_recognize
            responses = recognize(config, requests(), retry=None, timeout=CALL_TIMEOUT_S)
            call.responses = responses
            for resp in responses:
                if call.aborted:
                    return None
                if resp.error.code:
                    raise _map_status(resp.error.code, resp.error.message)
                interim: list[str] = []
                stability = 0.0
                language = ""
                for result in resp.results:
                    if not result.alternatives:
                        continue
                    alt = result.alternatives[0]
                    if result.language_code:
                        language = room_language(result.language_code)
                    if result.is_final:
                        post(stream.turn_final_part, turn, alt.transcript, alt.confidence, language)
                        # proto-plus gives the Duration as a timedelta
                        end: Any = result.result_end_time
                        offset = int(end.total_seconds() * SR) * 2 if end else len(call.audio)
                        final_end = max(final_end, min(len(call.audio), start + offset))
                    else:
                        if not interim:
                            stability = result.stability
                        interim.append(alt.transcript.strip())
                if interim:
                    text = " ".join(t for t in interim if t)
                    post(stream.turn_interim, turn, text, stability, language)
        except gexc.GoogleAPICallError as e:
            if call.aborted:
                return None
            if _is_stream_limit(e):
                return final_end  # resume after the last final result
            raise _map_exception(e) from e
        except grpc.RpcError as e:
            if call.aborted:
                return None
            raise ProviderError(f"google: {e}", status="error", retryable=True) from e
        finally:
            over.set()
        if not call.closed:
            # the service ended the call before the utterance did
            return final_end
        return None


def _is_stream_limit(e: Exception) -> bool:
    # v1: OUT_OF_RANGE "Exceeded maximum allowed stream duration of 305 seconds."
    # v2: ABORTED "Max duration of 5 minutes reached for stream."
    return isinstance(e, gexc.OutOfRange | gexc.Aborted) and "duration" in str(e)


def _map_exception(e: gexc.GoogleAPICallError) -> ProviderError:
    msg = f"google: {e.message or e}"
    if isinstance(e, gexc.Unauthenticated | gexc.PermissionDenied):
        return ProviderAuthError(msg)
    if isinstance(e, gexc.ResourceExhausted | gexc.TooManyRequests):
        return ProviderQuotaError(msg)
    if isinstance(e, gexc.ServiceUnavailable):
        return ProviderUnavailable(msg)
    if isinstance(e, gexc.DeadlineExceeded):
        return ProviderTimeout(msg)
    if isinstance(e, gexc.InvalidArgument):
        return ProviderError(msg, status="config")
    return ProviderError(msg, status="error", retryable=True)


_CODES = {
    16: ProviderAuthError,  # UNAUTHENTICATED
    7: ProviderAuthError,  # PERMISSION_DENIED
    8: ProviderQuotaError,  # RESOURCE_EXHAUSTED
    14: ProviderUnavailable,  # UNAVAILABLE
    4: ProviderTimeout,  # DEADLINE_EXCEEDED
}


def _map_status(code: int, message: str) -> ProviderError:
    cls = _CODES.get(code)
    if cls is not None:
        return cls(f"google: {message}")
    return ProviderError(f"google: status {code}: {message}", status="error", retryable=True)


def build(section: Mapping[str, Any], *, env: Mapping[str, str], **_: Any) -> GoogleProvider:
    return GoogleProvider(GoogleOptions.from_settings(section, env))
