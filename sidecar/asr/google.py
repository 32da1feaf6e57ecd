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
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
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
    locale_of,
    room_language,
    setting,
)

try:
    import grpc
    from google.api_core import exceptions as gexc
    from google.api_core.client_options import ClientOptions
    from google.cloud import speech_v1
    from google.cloud.speech_v1.services.speech.transports import SpeechGrpcAsyncIOTransport
except ImportError as e:  # pragma: no cover - depends on the install
    raise ProviderConfigError(
        "provider 'google' needs google-cloud-speech: pip install 'jitsi-captions-sidecar[google]'"
    ) from e

log = logging.getLogger(__name__)

SR = 16000
CHUNK_BYTES = 2 * SR // 10  # 100 ms per request: Google's recommended frame size
MAX_RESTARTS = 8


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
    audio: bytearray
    more: asyncio.Event
    closed: bool = False
    task: asyncio.Task[None] | None = None


class GoogleProvider(TurnProvider):
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
        self._client: speech_v1.SpeechAsyncClient | None = None

    async def start(self) -> None:
        self._ensure_client()

    def _ensure_client(self) -> speech_v1.SpeechAsyncClient:
        if self._client is not None:
            return self._client
        o = self.options
        if o.insecure:
            # a channel we build ourselves: the documented way to hand the
            # transport a channel (the client then ignores credentials)
            transport = SpeechGrpcAsyncIOTransport(
                host=o.endpoint, channel=grpc.aio.insecure_channel(o.endpoint)
            )
            self._client = speech_v1.SpeechAsyncClient(
                transport=transport, client_options=ClientOptions(api_endpoint=o.endpoint)
            )
            return self._client
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
            self._client = speech_v1.SpeechAsyncClient(
                credentials=credentials, client_options=client_options
            )
        except (ValueError, OSError, gexc.GoogleAPIError) as e:
            raise ProviderConfigError(f"google: cannot use the credentials: {e}") from e
        return self._client

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.transport.close()

    # -- turns -------------------------------------------------------------
    def _turn_open(self, stream: TurnStream, turn: Turn) -> None:
        client = self._ensure_client()
        call = _Call(bytearray(), asyncio.Event())
        turn.state = call
        call.task = asyncio.get_running_loop().create_task(self._run(client, stream, turn, call))

    def _turn_send(self, stream: TurnStream, turn: Turn, pcm: bytes) -> None:
        call: _Call = turn.state
        call.audio += pcm
        call.more.set()

    def _turn_close(self, stream: TurnStream, turn: Turn) -> None:
        call: _Call = turn.state
        call.closed = True
        call.more.set()

    def _turn_abort(self, stream: TurnStream, turn: Turn) -> None:
        call = turn.state
        if isinstance(call, _Call) and call.task is not None:
            call.task.cancel()

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

    async def _run(
        self, client: speech_v1.SpeechAsyncClient, stream: TurnStream, turn: Turn, call: _Call
    ) -> None:
        start = 0  # byte offset of the audio the current call begins with
        restarts = 0
        try:
            while True:
                resume = await self._one_call(client, stream, turn, call, start)
                if resume is None:
                    stream.turn_done(turn)
                    return
                restarts += 1
                if restarts > MAX_RESTARTS:
                    raise ProviderError(f"google: {restarts} stream restarts in one utterance")
                log.info(
                    "google: stream limit inside utterance %s; resuming at %.2f s",
                    turn.id,
                    resume / 2 / SR,
                )
                start = resume
        except asyncio.CancelledError:
            raise
        except ProviderError as e:
            stream.turn_failed(turn, e)
        except Exception as e:  # a bug here must not hang the utterance
            log.exception("google: utterance %s", turn.id)
            stream.turn_failed(turn, ProviderError(f"google: {e}", status="internal"))

    async def _one_call(
        self,
        client: speech_v1.SpeechAsyncClient,
        stream: TurnStream,
        turn: Turn,
        call: _Call,
        start: int,
    ) -> int | None:
        """One streaming call from byte ``start``; returns where to resume
        after a stream-length limit, or None when the utterance is done."""
        config = self._config(turn)
        over = False

        async def requests() -> AsyncIterator[speech_v1.StreamingRecognizeRequest]:
            yield speech_v1.StreamingRecognizeRequest(streaming_config=config)
            pos = start
            while not over:
                while pos < len(call.audio) and not over:
                    chunk = bytes(call.audio[pos : pos + CHUNK_BYTES])
                    pos += len(chunk)
                    yield speech_v1.StreamingRecognizeRequest(audio_content=chunk)
                if call.closed:
                    return
                call.more.clear()
                await call.more.wait()

        final_end = start  # byte offset just after the last final result
        try:
            responses = await client.streaming_recognize(requests=requests())
            async for resp in responses:
                if resp.error.code:
                    raise _map_status(resp.error.code, resp.error.message)
                interim: list[str] = []
                stability = 0.0
                for result in resp.results:
                    if not result.alternatives:
                        continue
                    alt = result.alternatives[0]
                    language = room_language(result.language_code) if result.language_code else ""
                    if result.is_final:
                        stream.turn_final_part(turn, alt.transcript, alt.confidence, language)
                        # proto-plus gives the Duration as a timedelta
                        end: Any = result.result_end_time
                        offset = int(end.total_seconds() * SR) * 2 if end else len(call.audio)
                        final_end = max(final_end, min(len(call.audio), start + offset))
                    else:
                        if not interim:
                            stability = result.stability
                        interim.append(alt.transcript.strip())
                        if language:
                            turn.detected_language = language
                if interim:
                    stream.turn_interim(turn, " ".join(t for t in interim if t), stability)
        except (gexc.GoogleAPICallError, grpc.aio.AioRpcError) as e:
            if _is_stream_limit(e) or _is_write_race(e):
                return final_end  # resume after the last final result
            if isinstance(e, grpc.aio.AioRpcError):
                raise _map_status(e.code().value[0], e.details() or "") from e
            raise _map_exception(e) from e
        finally:
            over = True
            call.more.set()  # let the request generator see it
        if not call.closed:
            # the service ended the call before the utterance did
            return final_end
        return None


def _is_write_race(e: Exception) -> bool:
    # grpc.aio reports INTERNAL "Internal error from Core" instead of the
    # server's status when the server ends a call while a request is being
    # written (seen against the local server when the limit ends a call
    # during a burst of audio); the call is over either way: resume it
    return "Internal error from Core" in str(e)


def _is_stream_limit(e: Exception) -> bool:
    text = str(e)
    code = getattr(e, "code", None)
    if isinstance(e, gexc.OutOfRange | gexc.Aborted):
        return "duration" in text
    if callable(code):
        with contextlib.suppress(Exception):
            c = code()
            return c in (grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.ABORTED) and (
                "duration" in text
            )
    return False


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
