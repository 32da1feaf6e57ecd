"""A scripted recogniser: the provider protocol without a model or a network.

It is a real :class:`~sidecar.asr.provider.TurnProvider`, so it runs the
same stream machinery as the cloud adapters (one final per utterance, final
timeout, concurrency limit, metrics). What it "hears":

* ``texts``: the n-th utterance of each speaker gets ``texts[n]`` (for room
  tests that feed real speech through the real VAD and segmenter);
* otherwise the codebook words in the audio (:mod:`tests.fakes.codebook`),
  so a test can check exactly which audio arrived.

``faults`` maps an utterance number (0-based, per speaker) to what goes wrong: ``"error"``,
``"auth"``, ``"quota"``, ``"unavailable"`` right away, ``"mid"`` after the
first interim, ``"hang"`` (no final: the stream's final timeout fires);
``"*"`` applies to every utterance (a provider that is down).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from sidecar.asr.base import ProviderError
from sidecar.asr.provider import (
    Capabilities,
    ProviderAuthError,
    ProviderQuotaError,
    ProviderUnavailable,
    Turn,
    TurnProvider,
    TurnStream,
)
from tests.fakes import codebook


@dataclass
class _State:
    audio: bytearray = field(default_factory=bytearray)
    fault: str = ""
    number: int = 0
    words_seen: int = 0
    handle: asyncio.TimerHandle | None = None


class ScriptedProvider(TurnProvider):
    def __init__(
        self,
        name: str = "scripted",
        *,
        texts: list[str] | None = None,
        faults: dict[int | str, str] | None = None,
        latency_s: float = 0.0,
        final_timeout_s: float = 2.0,
        max_concurrent: int | None = None,
        languages: tuple[str, ...] | None = None,
        language_detection: bool = True,
        detected_language: str = "",
    ) -> None:
        super().__init__(max_concurrent=max_concurrent, final_timeout_s=final_timeout_s)
        self.name = name
        self.capabilities = Capabilities(
            streaming=True,
            interim_results=True,
            languages=languages,
            language_detection=language_detection,
            local=True,
            max_concurrent_streams=max_concurrent,
        )
        self.texts = texts
        self.faults = dict(faults or {})
        self.latency_s = latency_s
        self.detected_language = detected_language
        self.turns = 0
        self.received: list[tuple[str, list[str]]] = []  # (utterance id, words heard)
        self.opened: list[str] = []
        self._counts: dict[object, int] = {}

    def _turn_open(self, stream: TurnStream, turn: Turn) -> None:
        # counted per speaker, so a chain's replay stream for the same
        # speaker continues the count
        key: object = stream.settings.speaker or id(stream)
        n = self._counts.get(key, 0)
        self._counts[key] = n + 1
        self.turns += 1
        self.opened.append(turn.id)
        fault = self.faults.get("*") or self.faults.get(n, "")
        turn.state = _State(fault=fault, number=n)
        if fault in ("error", "auth", "quota", "unavailable"):
            err = _error(self.name, fault)
            asyncio.get_running_loop().call_soon(stream.turn_failed, turn, err)

    def _turn_send(self, stream: TurnStream, turn: Turn, pcm: bytes) -> None:
        st: _State = turn.state
        st.audio += pcm
        if self.texts is not None:
            return
        words = codebook.decode_pcm16(bytes(st.audio))
        if len(words) > st.words_seen:
            st.words_seen = len(words)
            stream.turn_interim(turn, " ".join(words), 0.5, self.detected_language)
            if st.fault == "mid":
                stream.turn_failed(turn, ProviderError(f"{self.name}: failed mid-utterance"))

    def _turn_close(self, stream: TurnStream, turn: Turn) -> None:
        st: _State = turn.state
        if st.fault == "mid" and self.texts is not None:
            stream.turn_failed(turn, ProviderError(f"{self.name}: failed mid-utterance"))
            return
        if st.fault == "hang":
            return
        loop = asyncio.get_running_loop()
        st.handle = loop.call_later(self.latency_s, self._finish, stream, turn)

    def _finish(self, stream: TurnStream, turn: Turn) -> None:
        st: _State = turn.state
        if self.texts is not None:
            text = self.texts[st.number] if st.number < len(self.texts) else ""
            words = text.split()
        else:
            words = codebook.decode_pcm16(bytes(st.audio))
            text = " ".join(words)
        self.received.append((turn.id, words))
        stream.turn_final_part(turn, text, 0.9, self.detected_language)
        stream.turn_done(turn)

    def _turn_abort(self, stream: TurnStream, turn: Turn) -> None:
        st = turn.state
        if isinstance(st, _State) and st.handle is not None:
            st.handle.cancel()


def _error(name: str, kind: str) -> ProviderError:
    if kind == "auth":
        return ProviderAuthError(f"{name}: invalid credentials")
    if kind == "quota":
        return ProviderQuotaError(f"{name}: quota exceeded")
    if kind == "unavailable":
        return ProviderUnavailable(f"{name}: connection refused")
    return ProviderError(f"{name}: internal error", status="error")
