"""Durable transcript storage: one JSONL file per session, plus SRT/VTT/TXT/MD renderings.

Use :class:`LocalDirStore` for a directory on disk; other backends implement
:class:`TranscriptStore`.
"""

from sidecar.store.base import (
    FORMATS,
    InvalidTranscriptId,
    StoreError,
    TranscriptMeta,
    TranscriptNotFound,
    TranscriptStore,
    TranscriptWriter,
    UnknownFormat,
    validate_format,
    validate_transcript_id,
)
from sidecar.store.local import LocalDirStore, LocalTranscriptWriter
from sidecar.store.render import render, to_md, to_srt, to_txt, to_vtt

__all__ = [
    "FORMATS",
    "InvalidTranscriptId",
    "LocalDirStore",
    "LocalTranscriptWriter",
    "StoreError",
    "TranscriptMeta",
    "TranscriptNotFound",
    "TranscriptStore",
    "TranscriptWriter",
    "UnknownFormat",
    "render",
    "to_md",
    "to_srt",
    "to_txt",
    "to_vtt",
    "validate_format",
    "validate_transcript_id",
]
