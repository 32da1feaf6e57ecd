"""Captions in the JSON that jitsi-meet's subtitles code reads.

Shape of Jigasi's ``LocalJsonTranscriptHandler`` (jitsi-protocol.md section 3):
``participant`` an object whose ``id`` is the endpoint id (the MUC resource),
one ``message_id`` per utterance through its interims and final, epoch-ms
``timestamp``, ``stability`` (> 0.85 is stable). ``event`` is set as well as
``type``: the videobridge's parser needs the former, jitsi-meet the latter.
"""

from __future__ import annotations

from typing import Any

from sidecar.events import Caption

RESULT = "transcription-result"


def caption_json(c: Caption) -> dict[str, Any]:
    participant: dict[str, Any] = {"id": c.participant_id, "name": c.participant_name}
    if c.avatar_url:
        participant["avatar_url"] = c.avatar_url
    return {
        "type": RESULT,
        "event": RESULT,
        "timestamp": c.timestamp_ms,
        "participant": participant,
        "transcript": [{"text": c.text, "confidence": round(float(c.confidence), 4)}],
        "language": c.language,
        "is_interim": c.is_interim,
        "message_id": c.message_id,
        "stability": round(float(c.stability), 4),
    }
