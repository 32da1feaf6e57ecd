"""A local stand-in for the Azure Speech service's WebSocket speech protocol.

The real ``azure-cognitiveservices-speech`` SDK connects to it when its
``host`` is ``ws://127.0.0.1:PORT`` (``SpeechConfig(host=...)``: the SDK then
keeps its own path, ``/speech/recognition/conversation/cognitiveservices/v1``
or ``/speech/universal/v2`` for continuous language identification, and
sends the key as ``Ocp-Apim-Subscription-Key``).

The message formats follow Microsoft's protocol documentation
("Speech WebSocket protocol", MicrosoftDocs/azure-docs,
``articles/cognitive-services/Speech/API-Reference-REST/websocketprotocol.md``)
and the message types of the JavaScript SDK
(microsoft/cognitive-services-speech-sdk-js,
``src/common.speech/ServiceMessages/SimpleSpeechPhrase.ts``,
``SpeechHypothesis.ts``):

* client text messages are ``Header: value`` lines, a blank line, a JSON
  body (``speech.config``, ``speech.context``, ``telemetry``); binary
  ``audio`` messages start with a 2-byte big-endian header length, then the
  headers, then the audio; the first audio chunk of a turn is a RIFF/WAV
  header; an audio message with an empty body ends the audio;
* the service answers on the turn's ``X-RequestId`` with ``turn.start``
  (``{"context": {"serviceTag": ...}}``), ``speech.startDetected``
  (``{"Offset": ticks}``), ``speech.hypothesis`` (``Text``, ``Offset``,
  ``Duration``), ``speech.phrase`` (``RecognitionStatus``, ``DisplayText``,
  ``Offset``, ``Duration``, and ``PrimaryLanguage`` ``{Language,
  Confidence}`` with language identification), ``speech.endDetected`` and
  ``turn.end``; offsets and durations in 100-ns ticks;
* a phrase ends at a silence of the segmentation timeout the client asked
  for (the SDK's ``Speech_SegmentationSilenceTimeoutMs``);
* authentication and quota failures are HTTP answers to the upgrade (401,
  429), as the service gives them.

What it "recognises" are the codebook words of :mod:`tests.fakes.codebook`.
Everything the SDK sends is recorded (:class:`Connection`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any

from websockets.asyncio.server import ServerConnection, serve
from websockets.http11 import Request, Response

from tests.fakes import codebook

TICKS_PER_SAMPLE = 10_000_000 // 16000  # 625


@dataclass
class Message:
    path: str
    headers: dict[str, str]
    body: Any  # parsed JSON for text messages, bytes for audio


@dataclass
class Connection:
    path: str
    headers: dict[str, str]
    messages: list[Message] = field(default_factory=list)
    audio: bytearray = field(default_factory=bytearray)  # without the WAV header
    wav_header: bytes = b""
    phrases: list[str] = field(default_factory=list)
    turns: int = 0
    sent: list[tuple[str, str, float]] = field(default_factory=list)  # (path, text, monotonic)

    def of(self, path: str) -> list[Message]:
        return [m for m in self.messages if m.path == path]

    @property
    def words(self) -> list[str]:
        return codebook.decode_pcm16(bytes(self.audio))


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def parse_text(data: str) -> tuple[dict[str, str], str]:
    head, _, body = data.partition("\r\n\r\n")
    headers = {}
    for line in head.split("\r\n"):
        k, sep, v = line.partition(":")
        if sep:
            headers[k.strip().lower()] = v.strip()
    return headers, body


def parse_binary(data: bytes) -> tuple[dict[str, str], bytes]:
    (n,) = struct.unpack(">H", data[:2])
    headers, _ = parse_text(data[2 : 2 + n].decode() + "\r\n\r\n")
    return headers, data[2 + n :]


@dataclass
class _TurnState:
    request_id: str
    audio: bytearray = field(default_factory=bytearray)
    done_words: int = 0  # words already in a phrase
    in_phrase: bool = False
    phrase_start: int = 0
    hypothesis: str = ""


class FakeAzureSpeech:
    def __init__(self) -> None:
        self.connections: list[Connection] = []
        self.port = 0
        self._server: Any = None
        # behaviour, settable by a test
        self.reject_status: int | None = None  # answer the upgrade with this
        self.key: str | None = None  # expected subscription key (401 otherwise)
        self.close_after_words: int | None = None  # drop the connection mid-turn
        self.close_times = 1_000_000  # how many connections it drops so
        self.hang_after_end = False  # never answer the end of the audio
        self.phrase_delay_s = 0.0
        self.detected_language = "de-DE"  # PrimaryLanguage with language id
        self._by_socket: dict[int, Connection] = {}

    async def start(self) -> int:
        self._server = await serve(
            self._handler,
            "127.0.0.1",
            0,
            process_request=self._process_request,
            subprotocols=["USP"],  # type: ignore[list-item]
            max_size=None,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    @property
    def host(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def _process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        if self.reject_status is not None:
            status = HTTPStatus(self.reject_status)
            return conn.respond(status, f"{status.phrase}\n")
        if self.key is not None:
            got = request.headers.get("Ocp-Apim-Subscription-Key")
            if got != self.key:
                return conn.respond(HTTPStatus.UNAUTHORIZED, "Unauthorized\n")
        return None

    async def _send(
        self,
        ws: ServerConnection,
        path: str,
        request_id: str,
        body: dict[str, Any] | None,
    ) -> None:
        conn = self._by_socket.get(id(ws))
        headers = [f"X-RequestId:{request_id}", f"Path:{path}", f"X-Timestamp:{_now()}"]
        if body is not None:
            headers.insert(1, "Content-Type:application/json; charset=utf-8")
        text = "\r\n".join(headers) + "\r\n\r\n" + (json.dumps(body) if body is not None else "")
        await ws.send(text)
        if conn is not None:
            said = (body or {}).get("Text") or (body or {}).get("DisplayText") or ""
            conn.sent.append((path, said, time.monotonic()))

    async def _handler(self, ws: ServerConnection) -> None:
        req = ws.request
        assert req is not None
        conn = Connection(req.path, {k.lower(): v for k, v in req.headers.raw_items()})
        self.connections.append(conn)
        self._by_socket[id(ws)] = conn
        try:
            with contextlib.suppress(Exception):
                await self._serve(ws, conn)
        finally:
            self._by_socket.pop(id(ws), None)

    async def _serve(self, ws: ServerConnection, conn: Connection) -> None:
        turn: _TurnState | None = None
        async for data in ws:
            if isinstance(data, str):
                headers, body = parse_text(data)
                parsed: Any = json.loads(body) if body.strip() else None
                conn.messages.append(Message(headers.get("path", ""), headers, parsed))
                if headers.get("path") == "speech.context":
                    # a request begins: the service answers it with turn.start
                    turn = _TurnState(headers.get("x-requestid", ""))
                    conn.turns += 1
                    await self._send(
                        ws,
                        "turn.start",
                        turn.request_id,
                        {"context": {"serviceTag": uuid.uuid4().hex}},
                    )
                continue
            headers, audio = parse_binary(data)
            conn.messages.append(Message(headers.get("path", ""), headers, bytes(audio)))
            rid = headers.get("x-requestid", "")
            if turn is None or turn.request_id != rid:
                turn = _TurnState(rid)
                conn.turns += 1
                await self._send(
                    ws, "turn.start", rid, {"context": {"serviceTag": uuid.uuid4().hex}}
                )
            if not audio:
                # an empty audio message: the end of the audio; finalise, end the turn
                await self._end_turn(ws, conn, turn)
                turn = None
                continue
            if audio[:4] == b"RIFF" and len(audio) >= 44:
                conn.wav_header = bytes(audio[:44])
                audio = audio[44:]
                if not audio:
                    continue
            conn.audio += audio
            turn.audio += audio
            await self._progress(ws, conn, turn)

    async def _progress(self, ws: ServerConnection, conn: Connection, turn: _TurnState) -> None:
        rid = turn.request_id
        n_samples = len(turn.audio) // 2
        complete = [(w, e) for w, e in codebook.word_ends(bytes(turn.audio)) if e < n_samples]
        if (
            self.close_after_words is not None
            and len(complete) >= self.close_after_words
            and self.close_times > 0
        ):
            self.close_times -= 1
            await ws.close(1011, "Internal service error")
            return
        new = complete[turn.done_words :]
        if not new:
            return
        if not turn.in_phrase:
            turn.in_phrase = True
            turn.phrase_start = max(0, new[0][1] - 16000 * codebook.WORD_MS // 1000)
            await self._send(
                ws, "speech.startDetected", rid, {"Offset": turn.phrase_start * TICKS_PER_SAMPLE}
            )
        silence = n_samples - new[-1][1]
        if silence * 1000 // 16000 >= self._segmentation_ms(conn):
            # a silence of the segmentation timeout ends the phrase
            await self._phrase(ws, conn, rid, [w for w, _ in new], turn.phrase_start, new[-1][1])
            turn.done_words = len(complete)
            turn.in_phrase = False
            turn.hypothesis = ""
            return
        text = " ".join(w for w, _ in new)
        if text != turn.hypothesis:
            turn.hypothesis = text
            body: dict[str, Any] = {
                "Text": text,
                "Offset": turn.phrase_start * TICKS_PER_SAMPLE,
                "Duration": (new[-1][1] - turn.phrase_start) * TICKS_PER_SAMPLE,
            }
            if self._language_id(conn):
                body["PrimaryLanguage"] = {"Language": self.detected_language}
            await self._send(ws, "speech.hypothesis", rid, body)

    async def _end_turn(self, ws: ServerConnection, conn: Connection, turn: _TurnState) -> None:
        rid = turn.request_id
        if self.hang_after_end:
            await asyncio.sleep(3600)
        if self.phrase_delay_s:
            await asyncio.sleep(self.phrase_delay_s)
        ends = codebook.word_ends(bytes(turn.audio))[turn.done_words :]
        end = len(turn.audio) // 2
        if ends:
            start = max(0, ends[0][1] - 16000 * codebook.WORD_MS // 1000)
            await self._send(ws, "speech.endDetected", rid, {"Offset": end * TICKS_PER_SAMPLE})
            await self._phrase(ws, conn, rid, [w for w, _ in ends], start, ends[-1][1])
        else:
            await self._send(ws, "speech.endDetected", rid, {"Offset": end * TICKS_PER_SAMPLE})
        await self._send(ws, "turn.end", rid, None)

    async def _phrase(
        self,
        ws: ServerConnection,
        conn: Connection,
        request_id: str,
        words: list[str],
        start: int,
        end: int,
    ) -> None:
        text = " ".join(words)
        display = (text[:1].upper() + text[1:] + ".") if text else ""
        conn.phrases.append(display)
        body: dict[str, Any] = {
            "RecognitionStatus": "Success",
            "DisplayText": display,
            "Offset": start * TICKS_PER_SAMPLE,
            "Duration": (end - start) * TICKS_PER_SAMPLE,
        }
        if self._language_id(conn):
            body["PrimaryLanguage"] = {"Language": self.detected_language, "Confidence": "High"}
        await self._send(ws, "speech.phrase", request_id, body)

    @staticmethod
    def context(conn: Connection) -> dict[str, Any]:
        ctx = conn.of("speech.context")
        return ctx[-1].body if ctx and isinstance(ctx[-1].body, dict) else {}

    def _segmentation_ms(self, conn: Connection) -> int:
        # what SDK 1.53 sends: phraseDetection.<MODE>.segmentation
        pd = self.context(conn).get("phraseDetection") or {}
        seg = (pd.get(pd.get("mode", "CONVERSATION")) or {}).get("segmentation") or {}
        value = seg.get("segmentationSilenceTimeoutMs")
        return int(value) if value else 500

    def _language_id(self, conn: Connection) -> bool:
        return bool(self.context(conn).get("languageId"))


@contextlib.asynccontextmanager
async def running():  # type: ignore[no-untyped-def]
    fake = FakeAzureSpeech()
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()
