"""A local stand-in for Google Cloud Speech-to-Text v1 ``StreamingRecognize``.

A real gRPC server (grpc.aio, loopback, plaintext) serving the method
``/google.cloud.speech.v1.Speech/StreamingRecognize`` with the request and
response messages that ``google-cloud-speech`` itself ships
(``google.cloud.speech_v1.types``), so the real client library talks to it
unchanged. What it follows, from Google's own material:

* the first request carries ``streaming_config`` only, every later one
  ``audio_content`` only; otherwise INVALID_ARGUMENT (the v1 API reference
  of ``StreamingRecognizeRequest``, ``google/cloud/speech/v1/cloud_speech.proto``
  in googleapis/googleapis);
* interim results (``is_final`` false, with ``stability``) only when
  ``interim_results`` is set; a final result (``is_final``, ``result_end_time``
  relative to the start of the stream) when the client half-closes;
* the stream-length limit ends the call with OUT_OF_RANGE "Exceeded maximum
  allowed stream duration of 305 seconds." (the wording reported in
  GoogleCloudPlatform/dotnet-docs-samples#882 and in Google's
  "endless streaming" samples); the limit here is settable so tests need
  not stream five minutes;
* errors as gRPC status codes: UNAUTHENTICATED, RESOURCE_EXHAUSTED,
  UNAVAILABLE.

It "recognises" the codebook words of :mod:`tests.fakes.codebook` and
records every configuration and all the audio it received, per call.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field

import grpc
from google.cloud.speech_v1 import types
from google.protobuf import duration_pb2

from tests.fakes import codebook

METHOD = "/google.cloud.speech.v1.Speech/StreamingRecognize"
STREAM_LIMIT_MESSAGE = "Exceeded maximum allowed stream duration of 305 seconds."


@dataclass
class Call:
    config: types.StreamingRecognitionConfig | None = None
    audio: bytearray = field(default_factory=bytearray)
    metadata: dict[str, str] = field(default_factory=dict)
    half_closed: bool = False
    status: str = "OK"
    finalised: list[str] = field(default_factory=list)  # words sent in final results
    sent: list[tuple[str, float]] = field(default_factory=list)  # (text, monotonic) answers

    @property
    def words(self) -> list[str]:
        return codebook.decode_pcm16(bytes(self.audio))


class FakeGoogleSpeech:
    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.port = 0
        self._server: grpc.aio.Server | None = None
        # behaviour, settable by a test
        self.expect_language: str | None = None
        self.max_stream_samples: int | None = None  # the stream-length limit
        self.fail_with: grpc.StatusCode | None = None  # every call fails at once
        self.fail_message = ""
        self.fail_after_words: int | None = None  # then UNAVAILABLE mid-stream
        self.hang_after_close = False  # never answer the half-close
        self.final_delay_s = 0.0
        self.detected_language = ""  # language_code of results ("" = the config's)
        self.result_gap = True  # finalise at each long silence (several results)

    async def start(self) -> int:
        server = grpc.aio.server()
        handler = grpc.method_handlers_generic_handler(
            "google.cloud.speech.v1.Speech",
            {
                "StreamingRecognize": grpc.stream_stream_rpc_method_handler(
                    self._streaming_recognize,
                    request_deserializer=types.StreamingRecognizeRequest.deserialize,
                    response_serializer=types.StreamingRecognizeResponse.serialize,
                )
            },
        )
        server.add_generic_rpc_handlers((handler,))
        self.port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        self._server = server
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(0)

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    # -- the method ------------------------------------------------------------
    async def _streaming_recognize(self, requests, context):  # type: ignore[no-untyped-def]
        call = Call(metadata={k: v for k, v in context.invocation_metadata() if isinstance(v, str)})
        self.calls.append(call)
        if self.fail_with is not None:
            await context.abort(self.fail_with, self.fail_message or self.fail_with.name)
        first = True
        finalised_words = 0  # words already sent as final results
        finalised_end = 0  # sample where the last final result ended
        sent_interim = ""
        async for req in requests:
            if first:
                first = False
                if "streaming_config" not in req or "audio_content" in req:
                    await context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        "the first request must carry streaming_config only",
                    )
                cfg = req.streaming_config
                call.config = cfg
                rc = cfg.config
                if rc.encoding != types.RecognitionConfig.AudioEncoding.LINEAR16:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "encoding: LINEAR16")
                if rc.sample_rate_hertz != 16000:
                    await context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT, "sample_rate_hertz: 16000 expected"
                    )
                if self.expect_language and rc.language_code != self.expect_language:
                    await context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"language_code {rc.language_code!r}, expected {self.expect_language!r}",
                    )
                continue
            if "streaming_config" in req:
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT, "streaming_config only in the first request"
                )
            call.audio += req.audio_content
            ends = codebook.word_ends(bytes(call.audio))
            complete = [(w, e) for w, e in ends if e < len(call.audio) // 2]
            limit = self.max_stream_samples
            if limit is not None and len(call.audio) // 2 > limit:
                # the limit: finalise what is complete, then end the call
                done = [(w, e) for w, e in complete if e <= limit]
                if len(done) > finalised_words:
                    yield self._final(call, done[finalised_words:], done[-1][1])
                call.status = "OUT_OF_RANGE"
                await context.abort(grpc.StatusCode.OUT_OF_RANGE, STREAM_LIMIT_MESSAGE)
            if self.fail_after_words is not None and len(complete) >= self.fail_after_words:
                call.status = "UNAVAILABLE"
                await context.abort(grpc.StatusCode.UNAVAILABLE, "The service is unavailable.")
            if self.result_gap and complete:
                # a silence of 600 ms or more after a word ends a result
                last_end = complete[-1][1]
                tail = len(call.audio) // 2 - last_end
                if tail >= 16000 * 600 // 1000 and len(complete) > finalised_words:
                    yield self._final(call, complete[finalised_words:], last_end)
                    finalised_words = len(complete)
                    finalised_end = last_end
                    sent_interim = ""
                    continue
            pending = [w for w, _ in complete[finalised_words:]]
            text = " ".join(pending)
            if call.config is not None and call.config.interim_results and text != sent_interim:
                sent_interim = text
                yield self._interim(call, pending)
        call.half_closed = True
        if self.hang_after_close:
            await asyncio.sleep(3600)
        if self.final_delay_s:
            await asyncio.sleep(self.final_delay_s)
        ends = codebook.word_ends(bytes(call.audio))
        rest = ends[finalised_words:]
        if rest:
            yield self._final(call, rest, len(call.audio) // 2)
        del finalised_end

    def _language(self, call: Call) -> str:
        if self.detected_language:
            return self.detected_language
        return call.config.config.language_code.lower() if call.config else ""

    def _interim(self, call: Call, words: list[str]) -> types.StreamingRecognizeResponse:
        # two results as the service sends them: a stable head, an unstable tail
        call.sent.append(("interim:" + " ".join(words), time.monotonic()))
        head, tail = words[:-1], words[-1:]
        results = []
        if head:
            results.append(
                types.StreamingRecognitionResult(
                    alternatives=[types.SpeechRecognitionAlternative(transcript=" ".join(head))],
                    stability=0.9,
                    language_code=self._language(call),
                )
            )
        results.append(
            types.StreamingRecognitionResult(
                alternatives=[types.SpeechRecognitionAlternative(transcript=" ".join(tail))],
                stability=0.01,
                language_code=self._language(call),
            )
        )
        return types.StreamingRecognizeResponse(results=results)

    def _final(
        self, call: Call, words: list[tuple[str, int]], end_sample: int
    ) -> types.StreamingRecognizeResponse:
        call.finalised.extend(w for w, _ in words)
        call.sent.append(("final:" + " ".join(w for w, _ in words), time.monotonic()))
        end = duration_pb2.Duration(seconds=end_sample // 16000, nanos=(end_sample % 16000) * 62500)
        return types.StreamingRecognizeResponse(
            results=[
                types.StreamingRecognitionResult(
                    alternatives=[
                        types.SpeechRecognitionAlternative(
                            transcript=" ".join(w for w, _ in words), confidence=0.92
                        )
                    ],
                    is_final=True,
                    result_end_time=end,
                    language_code=self._language(call),
                )
            ]
        )


@contextlib.asynccontextmanager
async def running():  # type: ignore[no-untyped-def]
    fake = FakeGoogleSpeech()
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()
