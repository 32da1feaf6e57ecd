"""The streaming recogniser interface: a contract every provider passes, the
real Google and Azure SDKs against local stand-ins of their services, the
failover chain, and the registry's start-up errors.

No network beyond loopback: Google's client talks gRPC to
:mod:`tests.fakes.google_speech`, Azure's SDK WebSocket to
:mod:`tests.fakes.azure_speech`. Both "recognise" codebook audio
(:mod:`tests.fakes.codebook`), so each test knows exactly what a service
heard.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from prometheus_client import REGISTRY

from sidecar.asr.base import Hypothesis, ProviderError
from sidecar.asr.failover import ChainExhausted, FailoverProvider
from sidecar.asr.provider import (
    ProviderAuthError,
    ProviderConfigError,
    ProviderQuotaError,
    ProviderTimeout,
    ProviderUnavailable,
    RecognitionStream,
    StreamProvider,
    StreamSettings,
    build_provider,
)
from sidecar.asr.whisper_provider import WhisperProvider
from tests.fakes import codebook
from tests.fakes.recognizers import CodebookRecognizer
from tests.fakes.scripted import ScriptedProvider

# the [azure] and [google] extras (installed by `make install`)
pytest.importorskip("azure.cognitiveservices.speech")
pytest.importorskip("google.cloud.speech_v1")

from sidecar.asr.azure import AzureOptions, AzureProvider  # noqa: E402
from sidecar.asr.google import GoogleOptions, GoogleProvider  # noqa: E402
from tests.fakes.azure_speech import FakeAzureSpeech  # noqa: E402
from tests.fakes.google_speech import FakeGoogleSpeech  # noqa: E402

SR = 16000
WAIT = 20.0  # generous: the SDKs run on their own threads


@dataclass
class Sink:
    results: list[Hypothesis] = field(default_factory=list)
    errors: list[tuple[str, ProviderError]] = field(default_factory=list)

    def on_result(self, h: Hypothesis) -> None:
        self.results.append(h)

    def on_error(self, utt_id: str, err: ProviderError) -> None:
        self.errors.append((utt_id, err))

    def finals(self) -> list[Hypothesis]:
        return [h for h in self.results if h.is_final]

    def final_of(self, utt_id: str) -> list[Hypothesis]:
        return [h for h in self.finals() if h.utterance_id == utt_id]


def open_stream(
    provider: StreamProvider, sink: Sink, language: str = "en-US", **kw: Any
) -> RecognitionStream:
    settings = StreamSettings(language=language, silence_duration_ms=500, speaker="alice", **kw)
    return provider.open_stream(settings, sink.on_result, sink.on_error)


async def say(
    stream: RecognitionStream,
    utt_id: str,
    audio: np.ndarray,
    *,
    end: bool = True,
    frame_s: float = 0.004,
) -> None:
    """One utterance in 20 ms frames, one every ``frame_s`` (0.02: real time)."""
    stream.begin(utt_id, audio[:320])
    for i in range(320, len(audio), 320):
        stream.push(audio[i : i + 320])
        await asyncio.sleep(frame_s)
    if end:
        stream.end(len(audio))


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# -- provider fixtures ---------------------------------------------------------


@contextlib.asynccontextmanager
async def google_provider(**fake_settings: Any) -> AsyncIterator[tuple[GoogleProvider, Any]]:
    fake = FakeGoogleSpeech()
    for k, v in fake_settings.items():
        setattr(fake, k, v)
    await fake.start()
    provider = GoogleProvider(GoogleOptions(endpoint=fake.endpoint, insecure=True))
    await provider.start()
    try:
        yield provider, fake
    finally:
        await provider.aclose()
        await fake.stop()


@contextlib.asynccontextmanager
async def azure_provider(
    options: dict[str, Any] | None = None, **fake_settings: Any
) -> AsyncIterator[tuple[AzureProvider, Any]]:
    fake = FakeAzureSpeech()
    for k, v in fake_settings.items():
        setattr(fake, k, v)
    await fake.start()
    opts = {"key": "KEY", "host": fake.host, **(options or {})}
    provider = AzureProvider(AzureOptions(**opts))
    await provider.start()
    try:
        yield provider, fake
    finally:
        await provider.aclose()
        await fake.stop()


@contextlib.asynccontextmanager
async def make(kind: str) -> AsyncIterator[tuple[StreamProvider, Any]]:
    if kind == "google":
        async with google_provider() as pf:
            yield pf
    elif kind == "azure":
        async with azure_provider() as pf:
            yield pf
    elif kind == "whisper":
        yield WhisperProvider(CodebookRecognizer()), None
    elif kind == "scripted":
        yield ScriptedProvider(), None
    elif kind == "chain":
        yield FailoverProvider([ScriptedProvider("a"), ScriptedProvider("b")]), None
    else:
        raise AssertionError(kind)


ADAPTERS = ["scripted", "whisper", "google", "azure", "chain"]

SENTENCES = {
    "u1": "hello world this is a test",
    "u2": "we are speaking about the weather",
    "u3": "please send notes about the budget plan",
}


# -- the contract ---------------------------------------------------------------


@pytest.mark.parametrize("kind", ADAPTERS)
async def test_contract_one_final_per_utterance_in_order_with_ids(kind: str) -> None:
    async with make(kind) as (provider, _):
        sink = Sink()
        stream = open_stream(provider, sink)
        for utt_id, text in SENTENCES.items():
            await say(
                stream, utt_id, np.concatenate([codebook.encode(text), codebook.silence(300)])
            )
        await asyncio.wait_for(stream.drain(), WAIT)
        await asyncio.sleep(0.2)  # anything late would show up here
        finals = sink.finals()
        assert [h.utterance_id for h in finals] == list(SENTENCES)
        for h in finals:
            words = h.text.lower().replace(".", "").split()
            assert words == SENTENCES[h.utterance_id].split(), h
        # interims belong to an utterance that exists and come before its final
        for i, h in enumerate(sink.results):
            assert h.utterance_id in SENTENCES
            if not h.is_final:
                assert all(f.utterance_id != h.utterance_id for f in sink.results[:i] if f.is_final)
        assert any(not h.is_final for h in sink.results), "no interim at all"
        assert sink.errors == []
        await stream.aclose()


@pytest.mark.parametrize("kind", ADAPTERS)
async def test_contract_nothing_after_end_of_stream(kind: str) -> None:
    async with make(kind) as (provider, _):
        sink = Sink()
        stream = open_stream(provider, sink)
        await say(stream, "u1", codebook.encode("hello world this is a test"))
        await stream.aclose()  # the speaker left before the final came
        n = len(sink.results)
        await asyncio.sleep(1.0)
        assert len(sink.results) == n
        # and a closed stream takes no more audio
        stream.begin("u2", codebook.encode("good idea"))
        stream.end(SR)
        await asyncio.sleep(0.3)
        assert all(h.utterance_id != "u2" for h in sink.results)


@pytest.mark.parametrize("kind", ADAPTERS)
async def test_contract_discarded_noise_gets_no_final(kind: str) -> None:
    async with make(kind) as (provider, _):
        sink = Sink()
        stream = open_stream(provider, sink)
        stream.begin("noise", codebook.silence(200))
        stream.end(0, discard=True)
        await say(stream, "u1", codebook.encode("good idea everyone"))
        await asyncio.wait_for(stream.drain(), WAIT)
        assert [h.utterance_id for h in sink.finals()] == ["u1"]
        await stream.aclose()


@pytest.mark.parametrize("kind", ADAPTERS)
async def test_contract_empty_finals_when_asked(kind: str) -> None:
    """A chain needs to know an utterance is over even when nothing was heard."""
    async with make(kind) as (provider, _):
        sink = Sink()
        stream = open_stream(provider, sink, empty_finals=True)
        await say(stream, "quiet", codebook.silence(600))
        await say(stream, "u1", codebook.encode("good idea everyone"))
        await asyncio.wait_for(stream.drain(), WAIT)
        finals = sink.finals()
        assert [h.utterance_id for h in finals] == ["quiet", "u1"]
        assert finals[0].text == ""
        await stream.aclose()


# -- errors are mapped, clear, and stay in their stream ---------------------------


async def _error_case(provider: StreamProvider) -> tuple[Sink, RecognitionStream]:
    sink = Sink()
    stream = open_stream(provider, sink)
    await say(stream, "u1", codebook.encode("hello world this is a test"))
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stream.drain(), WAIT)
    return sink, stream


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        ("UNAUTHENTICATED", ProviderAuthError),
        ("PERMISSION_DENIED", ProviderAuthError),
        ("RESOURCE_EXHAUSTED", ProviderQuotaError),
        ("UNAVAILABLE", ProviderUnavailable),
    ],
)
async def test_google_errors_are_mapped(status: str, expected: type) -> None:
    import grpc

    async with google_provider(
        fail_with=getattr(grpc.StatusCode, status), fail_message="Request had invalid credentials."
    ) as (provider, _):
        before = metric(
            "captions_provider_errors_total", provider="google", kind=expected("x").status
        )
        sink, stream = await _error_case(provider)
        assert len(sink.errors) == 1
        utt, err = sink.errors[0]
        assert utt == "u1" and isinstance(err, expected), err
        assert "google" in str(err) and "invalid credentials" in str(err)
        # nothing was shown, so there is nothing to clear
        assert sink.final_of("u1") == []
        assert (
            metric("captions_provider_errors_total", provider="google", kind=err.status)
            == before + 1
        )
        await stream.aclose()


@pytest.mark.parametrize(
    ("status", "expected"), [(401, ProviderAuthError), (429, ProviderQuotaError)]
)
async def test_azure_errors_are_mapped(status: int, expected: type) -> None:
    async with azure_provider(reject_status=status) as (provider, _):
        sink, stream = await _error_case(provider)
        assert len(sink.errors) == 1, sink.errors
        utt, err = sink.errors[0]
        assert utt == "u1" and isinstance(err, expected), err
        assert str(status) in str(err) or "auth" in str(err).lower(), err
        await stream.aclose()


async def test_azure_wrong_key_is_an_auth_error() -> None:
    async with azure_provider(key="RIGHT") as (provider, fake):
        sink, stream = await _error_case(provider)
        assert isinstance(sink.errors[0][1], ProviderAuthError)
        assert fake.connections == []  # refused at the upgrade
        await stream.aclose()


async def test_azure_token_authentication() -> None:
    async with azure_provider({"key": None, "token": "TOKEN123"}) as (provider, fake):
        sink, stream = await _error_case(provider)
        assert [h.text for h in sink.finals()] == ["Hello world this is a test."]
        headers = fake.connections[0].headers
        assert headers["authorization"] == "Bearer TOKEN123"
        assert "ocp-apim-subscription-key" not in headers
        await stream.aclose()


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


async def test_unreachable_endpoints_are_unavailable_errors() -> None:
    port = _closed_port()
    azure = AzureProvider(AzureOptions(key="KEY", host=f"ws://127.0.0.1:{port}"))
    sink, stream = await _error_case(azure)
    assert isinstance(sink.errors[0][1], ProviderUnavailable), sink.errors
    await stream.aclose()
    await azure.aclose()

    google = GoogleProvider(GoogleOptions(endpoint=f"127.0.0.1:{port}", insecure=True))
    sink, stream = await _error_case(google)
    assert isinstance(sink.errors[0][1], ProviderUnavailable), sink.errors
    await stream.aclose()
    await google.aclose()


async def test_a_hanging_service_times_out() -> None:
    async with google_provider(hang_after_close=True) as (provider, _):
        provider.final_timeout_s = 0.5
        sink, stream = await _error_case(provider)
        assert isinstance(sink.errors[0][1], ProviderTimeout)
        (final,) = sink.final_of("u1")
        # viewers keep what they saw
        assert final.text == SENTENCES["u1"]
        assert final.extra["error_kind"] == "timeout"
        await stream.aclose()


async def test_one_bad_stream_leaves_the_others_alone() -> None:
    """The concurrency limit refuses a second stream with a clear quota error;
    the first goes on and gets its caption."""
    async with google_provider() as (provider, _):
        provider.max_concurrent = 1
        a, b = Sink(), Sink()
        sa, sb = open_stream(provider, a), open_stream(provider, b)
        audio = codebook.encode("hello world this is a test")
        sa.begin("a1", audio[:320])
        sb.begin("b1", audio[:320])
        for i in range(320, len(audio), 320):
            sa.push(audio[i : i + 320])
            sb.push(audio[i : i + 320])
            await asyncio.sleep(0.004)
        sa.end(len(audio))
        sb.end(len(audio))
        await asyncio.wait_for(asyncio.gather(sa.drain(), sb.drain()), WAIT)
        assert [h.text for h in a.finals()] == ["hello world this is a test"]
        assert a.errors == []
        assert isinstance(b.errors[0][1], ProviderQuotaError)
        assert "concurrent" in str(b.errors[0][1])
        assert provider.open_turns == 0  # every place under the limit given back
        await sa.aclose()
        await sb.aclose()


# -- Google: what the service receives -------------------------------------------


async def test_google_config_audio_and_interims_on_the_wire() -> None:
    async with google_provider(expect_language="de-DE") as (provider, fake):
        sink = Sink()
        stream = open_stream(provider, sink, language="de")  # a bare room language
        audio = codebook.encode("good idea everyone")
        await say(stream, "u1", audio)
        await asyncio.wait_for(stream.drain(), WAIT)
        (call,) = fake.calls
        cfg = call.config
        assert cfg.config.language_code == "de-DE"
        assert cfg.config.sample_rate_hertz == 16000
        assert cfg.interim_results is True
        # every sample arrived, once, as 16-bit PCM
        expected = (np.clip(audio, -1, 1) * 32767.0).astype("<i2").tobytes()
        assert bytes(call.audio) == expected
        assert call.half_closed
        interims = [h for h in sink.results if not h.is_final]
        assert interims and all(0.0 <= h.stability <= 1.0 for h in interims)
        # the stable head of Google's results is reflected in the stability
        assert max(h.stability for h in interims) >= 0.6
        (final,) = sink.finals()
        assert final.text == "good idea everyone" and final.language == "de"
        assert final.confidence == pytest.approx(0.92)
        await stream.aclose()


async def test_google_without_interim_results_asks_for_none() -> None:
    async with google_provider() as (provider, fake):
        sink = Sink()
        stream = open_stream(provider, sink, interim_results=False)
        await say(stream, "u1", codebook.encode("good idea everyone"))
        await asyncio.wait_for(stream.drain(), WAIT)
        assert fake.calls[0].config.interim_results is False
        assert [h.is_final for h in sink.results] == [True]
        await stream.aclose()


async def test_google_stream_limit_restarts_without_losing_or_repeating_audio() -> None:
    text = "please send notes about the budget plan next week project review"
    async with google_provider(max_stream_samples=SR * 1) as (provider, fake):
        sink = Sink()
        stream = open_stream(provider, sink)
        await say(stream, "u1", codebook.encode(text))
        await asyncio.wait_for(stream.drain(), WAIT)
        assert len(fake.calls) >= 3, "the limit never struck"
        assert [c.status for c in fake.calls[:-1]] == ["OUT_OF_RANGE"] * (len(fake.calls) - 1)
        # every call but the first resumes exactly after the last final result
        # of the one before: what was finalised is not sent again, what was
        # not is sent again (the service never finalised it)
        finalised = [w for c in fake.calls for w in c.finalised]
        assert finalised == text.split()
        pcm = (np.clip(codebook.encode(text), -1, 1) * 32767.0).astype("<i2").tobytes()
        offset = 0
        for c in fake.calls:
            assert bytes(c.audio) == pcm[offset : offset + len(c.audio)]
            ends = dict(codebook.word_ends(bytes(c.audio)))
            if c.finalised:
                offset += 2 * ends[c.finalised[-1]]
        (final,) = sink.finals()
        assert final.text == text and final.utterance_id == "u1"
        assert sink.errors == []
        await stream.aclose()


async def test_google_new_stream_for_each_utterance() -> None:
    """The limit can never strike across utterances: each has its own call."""
    async with google_provider() as (provider, fake):
        sink = Sink()
        stream = open_stream(provider, sink)
        for utt_id, text in SENTENCES.items():
            await say(stream, utt_id, codebook.encode(text))
        await asyncio.wait_for(stream.drain(), WAIT)
        assert [c.words for c in fake.calls] == [t.split() for t in SENTENCES.values()]
        await stream.aclose()


# -- Azure: what the SDK sends and how the answers come back -----------------------


async def test_azure_speech_protocol_on_the_wire() -> None:
    async with azure_provider() as (provider, fake):
        sink = Sink()
        stream = open_stream(provider, sink, language="fr")
        audio = np.concatenate(
            [codebook.encode("budget plan"), codebook.silence(700), codebook.encode("next week")]
        )
        await say(stream, "u1", audio)
        await asyncio.wait_for(stream.drain(), WAIT)
        (conn,) = fake.connections
        assert conn.path.startswith("/speech/recognition/conversation/cognitiveservices/v1?")
        assert "language=fr-FR" in conn.path
        assert conn.headers["ocp-apim-subscription-key"] == "KEY"
        cfg = conn.of("speech.config")[0].body
        src = cfg["context"]["audio"]["source"]
        assert (src["samplerate"], src["bitspersample"], src["channelcount"]) == (
            "16000",
            "16",
            "1",
        )
        ctx = conn.of("speech.context")[0]
        pd = ctx.body["phraseDetection"]
        assert pd["language"] == "fr-FR"
        # segmentation silence from the room's silence_duration_ms
        assert pd[pd["mode"]]["segmentation"]["segmentationSilenceTimeoutMs"] == 500
        # the stable-partial threshold
        assert ctx.body["phraseOutput"]["interimResults"]["stableThreshold"] == 3
        audio_msgs = conn.of("audio")
        rid = ctx.headers["x-requestid"]
        assert all(m.headers["x-requestid"] == rid for m in audio_msgs[:3])
        assert audio_msgs[0].headers["content-type"] == "audio/x-wav"
        riff = conn.wav_header
        assert riff[:4] == b"RIFF" and riff[8:12] == b"WAVE"
        channels, rate = struct.unpack("<HI", riff[22:28])
        assert (channels, rate) == (1, 16000)
        assert any(m.body == b"" for m in audio_msgs), "no end-of-audio message"
        # two phrases (the service segmented at the silence), one final
        assert conn.phrases == ["Budget plan.", "Next week."]
        (final,) = sink.finals()
        assert final.text == "Budget plan. Next week."
        assert final.language == "fr"
        assert any(not h.is_final for h in sink.results)
        # every sample arrived once
        assert " ".join(conn.words) == "budget plan next week"
        await stream.aclose()


async def test_azure_sdk_recovers_from_one_dropped_connection() -> None:
    """The SDK reconnects by itself and sends the utterance's audio again:
    still one final, complete, no error."""
    async with azure_provider(close_after_words=3, close_times=1) as (provider, fake):
        sink = Sink()
        stream = open_stream(provider, sink)
        await say(stream, "u1", codebook.encode(SENTENCES["u3"]))
        await asyncio.wait_for(stream.drain(), WAIT)
        assert len(fake.connections) == 2
        (final,) = sink.finals()
        assert final.text.lower().rstrip(".").split() == SENTENCES["u3"].split()
        assert sink.errors == []
        await stream.aclose()


async def test_azure_language_identification_for_auto_rooms() -> None:
    langs = ("en-US", "de-DE", "fr-FR")
    async with azure_provider({"auto_languages": langs}, detected_language="de-DE") as (
        provider,
        fake,
    ):
        assert provider.capabilities.language_detection
        sink = Sink()
        stream = open_stream(provider, sink, language="auto")
        await say(stream, "u1", codebook.encode("good idea everyone"))
        await asyncio.wait_for(stream.drain(), WAIT)
        (conn,) = fake.connections
        ctx = conn.of("speech.context")[0].body
        assert ctx["languageId"]["languages"] == list(langs)
        assert ctx["languageId"]["mode"] == "DetectContinuous"
        (final,) = sink.finals()
        assert final.language == "de-DE"
        await stream.aclose()


def test_azure_at_most_ten_candidate_languages() -> None:
    many = ",".join(["en-US", "de-DE", "fr-FR", "es-ES", "it-IT", "ja-JP"] * 2)
    with pytest.raises(ProviderConfigError, match="at most 10"):
        build_provider(
            "azure",
            {"key": "k", "region": "westeurope"},
            env={"CAPTIONS_AZURE_AUTO_LANGUAGES": many},
        )


# -- failover --------------------------------------------------------------------


async def _speak_all(stream: RecognitionStream, items: dict[str, str]) -> None:
    for utt_id, text in items.items():
        await say(stream, utt_id, codebook.encode(text))
    await asyncio.wait_for(stream.drain(), WAIT)


@pytest.mark.parametrize("fault", ["mid", "hang", "error"])
async def test_failover_to_the_next_recogniser(fault: str) -> None:
    a = ScriptedProvider("a", faults={1: fault}, final_timeout_s=0.5)
    b = ScriptedProvider("b")
    chain = FailoverProvider([a, b], cooldown_s=0.0)
    sink = Sink()
    stream = open_stream(chain, sink)
    before_b = metric("captions_failover_served_audio_seconds_total", provider="b")
    await _speak_all(stream, SENTENCES)
    finals = sink.finals()
    assert [(h.utterance_id, h.text) for h in finals] == list(SENTENCES.items())
    assert [h.extra["provider"] for h in finals] == ["a", "b", "a"]
    assert sink.errors == []  # the chain coped: no failure reaches the room
    # b heard the whole of u2, once
    assert b.received == [("u2", SENTENCES["u2"].split())]
    served = metric("captions_failover_served_audio_seconds_total", provider="b") - before_b
    assert served == pytest.approx(len(codebook.encode(SENTENCES["u2"])) / SR, rel=0.01)
    await stream.aclose()


async def test_failover_cool_down_then_retry() -> None:
    now = [0.0]
    a = ScriptedProvider("a", faults={0: "error"})
    b = ScriptedProvider("b")
    chain = FailoverProvider([a, b], cooldown_s=30.0, clock=lambda: now[0])
    sink = Sink()
    stream = open_stream(chain, sink)
    await _speak_all(stream, {"u1": "hello world"})
    await _speak_all(stream, {"u2": "good idea"})  # a cools down: straight to b
    now[0] = 31.0
    await _speak_all(stream, {"u3": "coffee meeting"})  # a is tried again
    assert [h.extra["provider"] for h in sink.finals()] == ["b", "b", "a"]
    assert a.opened == ["u1", "u3"]
    await stream.aclose()


async def test_failover_tries_a_cooling_member_rather_than_lose_the_caption() -> None:
    now = [0.0]
    a = ScriptedProvider("a", faults={1: "error"})
    b = ScriptedProvider("b")
    chain = FailoverProvider([a, b], cooldown_s=30.0, clock=lambda: now[0])
    chain.mark_failed(b, ProviderError("b: earlier failure"))
    sink = Sink()
    stream = open_stream(chain, sink)
    await _speak_all(stream, {"u1": "hello world", "u2": "good idea"})
    assert [(h.text, h.extra["provider"]) for h in sink.finals()] == [
        ("hello world", "a"),
        ("good idea", "b"),
    ]
    assert sink.errors == []
    await stream.aclose()


async def test_failover_whole_chain_fails_once_with_a_clear_error() -> None:
    a = ScriptedProvider("a", faults={"*": "mid"})
    b = ScriptedProvider("b", faults={"*": "auth"})
    chain = FailoverProvider([a, b], cooldown_s=0.0)
    sink = Sink()
    stream = open_stream(chain, sink)
    before = metric("captions_failover_exhausted_total", chain="a,b")
    await _speak_all(stream, {"u1": "hello world this is a test"})
    (final,) = sink.finals()
    assert len(sink.errors) == 1
    utt, err = sink.errors[0]
    assert utt == "u1" and isinstance(err, ChainExhausted)
    assert "invalid credentials" in str(err)  # the last provider's reason
    assert final.extra["error"] and final.text == "hello"  # what viewers saw stays
    assert metric("captions_failover_exhausted_total", chain="a,b") == before + 1
    await stream.aclose()


async def test_failover_from_google_mid_utterance_to_whisper() -> None:
    """The real Google client loses its stream mid-utterance; the Whisper
    adapter (its re-decode policy on a codebook recogniser) finishes the
    caption from the buffered audio, with the right speaker's id, once."""
    async with google_provider(fail_after_words=2) as (google, fake):
        whisper = WhisperProvider(CodebookRecognizer())
        chain = FailoverProvider([google, whisper], cooldown_s=60.0)
        sink = Sink()
        stream = open_stream(chain, sink)
        await _speak_all(stream, {"u1": SENTENCES["u1"]})
        (final,) = sink.finals()
        assert final.utterance_id == "u1"
        assert final.text == SENTENCES["u1"]
        assert final.extra["provider"] == "whisper"
        assert sink.errors == []
        assert fake.calls[0].status == "UNAVAILABLE"
        await stream.aclose()


async def test_failover_from_azure_dropped_connection_to_google() -> None:
    async with (
        azure_provider(close_after_words=3) as (azure, _),
        google_provider() as (google, gfake),
    ):
        chain = FailoverProvider([azure, google], cooldown_s=60.0)
        sink = Sink()
        stream = open_stream(chain, sink)
        await _speak_all(stream, {"u1": SENTENCES["u3"], "u2": SENTENCES["u2"]})
        finals = sink.finals()
        assert [(h.utterance_id, h.text) for h in finals] == [
            ("u1", SENTENCES["u3"]),
            ("u2", SENTENCES["u2"]),
        ]
        assert [h.extra["provider"] for h in finals] == ["google", "google"]
        # Google heard each utterance whole, once
        assert [c.words for c in gfake.calls] == [SENTENCES["u3"].split(), SENTENCES["u2"].split()]
        await stream.aclose()


async def test_failover_respects_a_concurrency_limit() -> None:
    a = ScriptedProvider("a", max_concurrent=1, latency_s=0.3)
    b = ScriptedProvider("b")
    chain = FailoverProvider([a, b], cooldown_s=0.0)
    s1, s2 = Sink(), Sink()
    st1, st2 = open_stream(chain, s1), open_stream(chain, s2)
    audio = codebook.encode("hello world")
    st1.begin("x1", audio)
    st2.begin("y1", audio)  # a is full: b serves it
    st1.end(len(audio))
    st2.end(len(audio))
    await asyncio.wait_for(asyncio.gather(st1.drain(), st2.drain()), WAIT)
    assert [h.extra["provider"] for h in s1.finals()] == ["a"]
    assert [h.extra["provider"] for h in s2.finals()] == ["b"]
    assert a.open_turns == 0
    await st1.aclose()
    await st2.aclose()


async def test_audio_seconds_are_counted_per_provider() -> None:
    async with google_provider() as (provider, _):
        before = metric("captions_provider_audio_seconds_total", provider="google")
        sink = Sink()
        stream = open_stream(provider, sink)
        audio = codebook.encode(SENTENCES["u1"])
        await say(stream, "u1", audio)
        await asyncio.wait_for(stream.drain(), WAIT)
        sent = metric("captions_provider_audio_seconds_total", provider="google") - before
        assert sent == pytest.approx(len(audio) / SR, rel=0.01)
        await stream.aclose()


async def test_forced_cut_sends_the_carried_audio_once() -> None:
    """At a forced cut the next utterance begins with audio the service already
    heard with the previous one: it must not be recognised twice."""
    async with google_provider() as (provider, fake):
        sink = Sink()
        stream = open_stream(provider, sink)
        audio = codebook.encode("hello world this is a test of the captions")
        cut = len(codebook.encode("hello world this is a"))
        stream.begin("u1", audio[:320])
        for i in range(320, len(audio), 320):
            stream.push(audio[i : i + 320])
            await asyncio.sleep(0.003)
        stream.end(cut)  # the segmenter cut here; the rest carries over
        stream.begin("u2", audio[cut:])  # exactly what the pipeline passes
        more = codebook.encode("sidecar release")
        stream.push(more)
        # cut again, inside the second utterance: its count includes the carry
        u2 = np.concatenate([audio[cut:], more])
        cut2 = len(u2) - len(codebook.encode("release"))
        stream.end(cut2)
        stream.begin("u3", u2[cut2:])
        stream.end(len(u2) - cut2)
        await asyncio.wait_for(stream.drain(), WAIT)
        heard = " ".join(w for c in fake.calls for w in c.words)
        assert heard == "hello world this is a test of the captions sidecar release"
        text = " ".join(h.text for h in sink.finals())
        assert text == "hello world this is a test of the captions sidecar release"
        await stream.aclose()


# -- registry and start-up errors ---------------------------------------------------


def test_registry_builds_each_cloud_provider_from_its_section() -> None:
    azure = build_provider(
        "azure", {"key": "k", "region": "westeurope", "stable_partial_threshold": 5}
    )
    assert isinstance(azure, AzureProvider)
    assert azure.options.stable_partial_threshold == 5
    assert azure.capabilities.max_concurrent_streams == 100
    google = build_provider(
        "google",
        {"insecure": True, "endpoint": "127.0.0.1:1"},
        env={"CAPTIONS_GOOGLE_MODEL": "latest_short"},
    )
    assert isinstance(google, GoogleProvider)
    assert google.options.model == "latest_short"  # the environment wins


@pytest.mark.parametrize(
    ("name", "section", "env", "message"),
    [
        ("azure", {}, {}, "CAPTIONS_AZURE_KEY"),
        ("azure", {"key": "k"}, {}, "CAPTIONS_AZURE_REGION"),
        ("azure", {"key": "k", "region": "x", "host": "ws://h"}, {}, "only one of"),
        ("google", {}, {}, "CAPTIONS_GOOGLE_CREDENTIALS_FILE"),
        ("google", {"credentials_file": "/nonexistent/key.json"}, {}, "does not exist"),
        (
            "google",
            {"insecure": True},
            {"CAPTIONS_GOOGLE_FINAL_TIMEOUT_S": "soon"},
            "CAPTIONS_GOOGLE_FINAL_TIMEOUT_S",
        ),
        ("nuance", {}, {}, "unknown provider"),
    ],
)
def test_missing_or_bad_settings_fail_at_start_up(
    name: str, section: dict[str, Any], env: dict[str, str], message: str
) -> None:
    with pytest.raises(ProviderConfigError, match=message):
        build_provider(name, section, env=env)


def test_capabilities_are_data() -> None:
    whisper = WhisperProvider(CodebookRecognizer())
    assert whisper.capabilities.supports("auto") and not whisper.capabilities.streaming
    google = GoogleProvider(GoogleOptions(insecure=True))
    assert google.capabilities.streaming and not google.capabilities.supports("auto")
    chain = FailoverProvider([google, whisper])
    assert chain.capabilities.supports("auto")  # whisper detects languages


# -- the real Whisper through its stream adapter (loads tiny.en) ---------------------


@pytest.mark.slow
async def test_contract_real_whisper_adapter() -> None:
    """The same contract on the real model: real speech, one final per
    utterance with its id, interims first, nothing after the stream closes."""
    from sidecar.asr.scheduler import Scheduler
    from sidecar.asr.whisper import from_config
    from sidecar.audio import load_audio
    from sidecar.config import WhisperConfig
    from tests.conftest import librivox, normalise

    corpus = librivox()[:2]
    scheduler = Scheduler(2)
    scheduler.start()
    provider = WhisperProvider(from_config(WhisperConfig(workers=2), scheduler))
    await provider.start()
    try:
        sink = Sink()
        stream = open_stream(provider, sink)
        ids = []
        for i, (wav, _) in enumerate(corpus):
            ids.append(f"r{i}")
            await say(stream, f"r{i}", load_audio(wav), frame_s=0.02)
        await asyncio.wait_for(stream.drain(), 300)
        finals = sink.finals()
        assert [h.utterance_id for h in finals] == ids
        for h, (_, ref) in zip(finals, corpus, strict=True):
            hyp, want = normalise(h.text).split(), normalise(ref).split()
            assert len(set(hyp) & set(want)) >= len(want) // 2, (h.text, ref)
        assert any(not h.is_final for h in sink.results)
        await say(stream, "late", load_audio(corpus[0][0]))
        await stream.aclose()
        n = len(sink.results)
        await asyncio.sleep(1.0)
        assert len(sink.results) == n
        assert all(h.utterance_id != "late" or not h.is_final for h in sink.results)
    finally:
        await provider.aclose()
        await scheduler.close()


def test_unknown_keys_are_errors() -> None:
    with pytest.raises(ProviderConfigError, match=r"azure\.regoin: unknown key"):
        build_provider("azure", {"key": "k", "regoin": "westeurope"})
    with pytest.raises(ProviderConfigError, match="CAPTIONS_GOOGLE_MODLE"):
        build_provider("google", {"insecure": True}, env={"CAPTIONS_GOOGLE_MODLE": "x"})


def test_deployment_providers_and_fallback_chains() -> None:
    from sidecar.asr.setup import build_providers

    sections = {"azure": {"key": "k", "region": "westeurope", "fallback": ["whisper"]}}
    got = build_providers(sections, env={}, recognizer=CodebookRecognizer())
    assert sorted(got.members) == ["azure", "whisper"]  # google is not configured
    chain = got.by_name["azure"]
    assert isinstance(chain, FailoverProvider)
    assert [p.name for p in chain.providers] == ["azure", "whisper"]
    assert isinstance(got.by_name["whisper"], WhisperProvider)
    with pytest.raises(ProviderConfigError, match="azure.fallback: 'google'"):
        build_providers(
            {"azure": {"key": "k", "region": "x", "fallback": ["google"]}},
            env={},
            recognizer=CodebookRecognizer(),
        )
