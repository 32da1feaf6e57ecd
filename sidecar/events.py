"""Value types shared by the ingest, the pipeline, the rooms and the outputs."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field


@dataclass(slots=True)
class Frame:
    """One unit of audio from an ingest adapter, for one participant.

    ``payload`` is an Opus packet when ``pcm`` is None; adapters that already
    have PCM (skynet, files) set ``pcm`` to 16 kHz mono float32 samples
    instead. ``sequence`` wraps at 2**16 like RTP; ``timestamp`` is in 48 kHz
    ticks for Opus (RTP clock) and 16 kHz samples for PCM.
    """

    payload: bytes
    sequence: int
    timestamp: int
    voice: bool | None = None  # sender's voice-activity flag, when known
    level_dbov: float | None = None  # RFC 6464 level (0 loud .. 127 silent), when known
    pcm: object | None = None  # numpy float32 array at 16 kHz when not Opus
    arrival: float = 0.0  # monotonic seconds


@dataclass(slots=True)
class Caption:
    """An interim or final caption for one utterance of one participant."""

    room: str
    participant_id: str
    participant_name: str
    message_id: str
    text: str
    is_interim: bool
    stability: float
    language: str
    start_time_ms: int  # epoch milliseconds, start of speech
    end_time_ms: int  # epoch milliseconds, end of speech (or of audio so far)
    timestamp_ms: int  # when the caption was made
    avatar_url: str = ""
    confidence: float = 0.0


def new_message_id() -> str:
    return str(uuid.uuid4())


@dataclass(slots=True)
class TranscriptEntry:
    """One finished utterance as stored in the JSONL transcript (Stream format)."""

    start_time: str  # ISO-8601 UTC with milliseconds, e.g. 2026-11-21T10:00:00.120Z
    stop_time: str
    speaker_id: str
    speaker_name: str
    text: str
    message_id: str = ""
    language: str = ""
    type: str = "speech"
    extra: dict[str, object] = field(default_factory=dict)
