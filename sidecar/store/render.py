"""Pure functions that turn transcript entries into JSONL, SRT, WebVTT, text and Markdown.

Cue times are offsets from an origin: the ``origin`` argument when given (the
store passes the session start) or else the first entry's start. Entries that
begin before the origin are clamped to zero, and unparseable times fall back
to the previous cue's time, so a damaged entry never breaks a rendering.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime

from sidecar.events import TranscriptEntry
from sidecar.store.base import validate_format

__all__ = [
    "ENTRY_KEYS",
    "entry_from_dict",
    "entry_to_dict",
    "entry_to_json_line",
    "format_iso",
    "parse_iso",
    "render",
    "speaker_label",
    "to_jsonl",
    "to_md",
    "to_srt",
    "to_txt",
    "to_vtt",
]

#: The keys of one JSONL line, in the order they are written (Stream format).
ENTRY_KEYS: tuple[str, ...] = (
    "type",
    "start_time",
    "stop_time",
    "speaker_id",
    "speaker_name",
    "text",
    "message_id",
    "language",
)


# --- times -------------------------------------------------------------------------------


def parse_iso(value: str) -> datetime | None:
    """Parse an ISO-8601 time (``Z`` suffix allowed) to an aware UTC datetime, or None."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        # The store only writes UTC; a naive time can only mean UTC too.
        return parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def format_iso(moment: datetime) -> str:
    """``2026-11-21T10:00:00.120Z``: UTC, millisecond precision, trailing Z."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _ms_between(origin: datetime, moment: datetime) -> int:
    delta = moment - origin
    # Integer arithmetic: float seconds would round 0.001 s steps unpredictably.
    return delta.days * 86_400_000 + delta.seconds * 1000 + delta.microseconds // 1000


def _clock(ms: int, sep: str) -> str:
    """``HH:MM:SS<sep>mmm``; hours grow past two digits rather than wrap."""
    seconds, millis = divmod(max(ms, 0), 1000)
    minutes, seconds = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours:02d}:{minutes:02d}:{seconds:02d}{sep}{millis:03d}"


def _clock_seconds(ms: int) -> str:
    return _clock(ms, ".")[:-4]


class _Cue:
    """One entry with its offsets already worked out."""

    __slots__ = ("end_ms", "entry", "name", "start_ms", "text")

    def __init__(self, entry: TranscriptEntry, start_ms: int, end_ms: int) -> None:
        self.entry = entry
        self.start_ms = start_ms
        self.end_ms = end_ms
        self.name = speaker_label(entry)
        self.text = _one_line(entry.text)


def _cues(entries: Iterable[TranscriptEntry], origin: datetime | None) -> list[_Cue]:
    items = list(entries)
    if origin is None:
        # the earliest start, not the first line: lines are in the order finals came
        starts = [t for t in (parse_iso(e.start_time) for e in items) if t]
        origin = min(starts) if starts else None
    elif origin.tzinfo is None:
        origin = origin.replace(tzinfo=UTC)
    cues: list[_Cue] = []
    previous = 0
    for entry in items:
        start = parse_iso(entry.start_time)
        stop = parse_iso(entry.stop_time)
        start_ms = _ms_between(origin, start) if origin and start else previous
        start_ms = max(start_ms, 0)
        end_ms = _ms_between(origin, stop) if origin and stop else start_ms
        end_ms = max(end_ms, start_ms)
        cues.append(_Cue(entry, start_ms, end_ms))
        previous = start_ms
    # the JSONL is in the order finals were made; a long utterance that began
    # first can finish after a short one. Players want cues by start time.
    cues.sort(key=lambda c: c.start_ms)
    return cues


# --- text helpers ------------------------------------------------------------------------


def speaker_label(entry: TranscriptEntry) -> str:
    """The name shown for an entry: speaker_name, else speaker_id, else ``Unknown``."""
    for candidate in (entry.speaker_name, entry.speaker_id):
        label = _one_line(candidate) if isinstance(candidate, str) else ""
        if label:
            return label
    return "Unknown"


def _one_line(text: str) -> str:
    # A blank line ends an SRT/VTT cue early, so entries are flattened to one line.
    return " ".join(str(text).split())


def _vtt_escape(text: str) -> str:
    # Escaping ">" also rules out "-->", which WebVTT forbids inside cue text.
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


_MD_SPECIAL = str.maketrans({c: "\\" + c for c in "\\`*_[]<>"})


def _md_escape(text: str) -> str:
    return text.translate(_MD_SPECIAL)


# --- JSONL -------------------------------------------------------------------------------


def entry_to_dict(entry: TranscriptEntry) -> dict[str, object]:
    """The Stream-format object for one entry: the fixed keys, then ``extra`` merged in.

    Extra keys never override the fixed ones, so a stray ``extra["text"]`` cannot
    change what was said.
    """
    line: dict[str, object] = {
        "type": entry.type or "speech",
        "start_time": entry.start_time,
        "stop_time": entry.stop_time,
        "speaker_id": entry.speaker_id,
        "speaker_name": entry.speaker_name,
        "text": entry.text,
        "message_id": entry.message_id,
        "language": entry.language,
    }
    for key, value in entry.extra.items():
        if key not in line:
            line[str(key)] = value
    return line


def entry_to_json_line(entry: TranscriptEntry) -> bytes:
    """One UTF-8 JSONL line, newline included, for ``entry``."""
    obj = entry_to_dict(entry)
    # default=str: an odd value in ``extra`` must not make an append fail.
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), default=str)
    try:
        return (text + "\n").encode("utf-8")
    except UnicodeEncodeError:
        # Lone surrogates cannot be UTF-8; \u escapes keep the line valid JSON.
        text = json.dumps(obj, ensure_ascii=True, separators=(",", ":"), default=str)
        return (text + "\n").encode("ascii")


def entry_from_dict(obj: Mapping[str, object]) -> TranscriptEntry:
    """Rebuild an entry from a JSONL object; unknown keys go to ``extra``."""

    def text(key: str, default: str = "") -> str:
        value = obj.get(key)
        return default if value is None else str(value)

    return TranscriptEntry(
        start_time=text("start_time"),
        stop_time=text("stop_time"),
        speaker_id=text("speaker_id"),
        speaker_name=text("speaker_name"),
        text=text("text"),
        message_id=text("message_id"),
        language=text("language"),
        type=text("type", "speech") or "speech",
        extra={str(k): v for k, v in obj.items() if k not in ENTRY_KEYS},
    )


def to_jsonl(entries: Iterable[TranscriptEntry]) -> str:
    """Entries as JSONL text (one object per line, each line newline-terminated)."""
    return "".join(entry_to_json_line(e).decode("utf-8") for e in entries)


# --- renderings --------------------------------------------------------------------------


def to_srt(entries: Iterable[TranscriptEntry], *, origin: datetime | None = None) -> str:
    """SubRip: numbered cues, ``HH:MM:SS,mmm --> HH:MM:SS,mmm``, text as ``Name: text``."""
    blocks = [
        f"{n}\n{_clock(c.start_ms, ',')} --> {_clock(c.end_ms, ',')}\n{c.name}: {c.text}\n"
        for n, c in enumerate(_cues(entries, origin), start=1)
    ]
    return "\n".join(blocks)


def to_vtt(entries: Iterable[TranscriptEntry], *, origin: datetime | None = None) -> str:
    """WebVTT with one ``<v Name>text`` voice span per cue."""
    parts = ["WEBVTT\n"]
    for c in _cues(entries, origin):
        parts.append(
            f"\n{_clock(c.start_ms, '.')} --> {_clock(c.end_ms, '.')}\n"
            f"<v {_vtt_escape(c.name)}>{_vtt_escape(c.text)}\n"
        )
    return "".join(parts)


def to_txt(entries: Iterable[TranscriptEntry], *, origin: datetime | None = None) -> str:
    """Plain text, one ``[HH:MM:SS] Name: text`` line per entry."""
    return "".join(
        f"[{_clock_seconds(c.start_ms)}] {c.name}: {c.text}\n" for c in _cues(entries, origin)
    )


def to_md(
    entries: Iterable[TranscriptEntry],
    *,
    title: str,
    meta: Mapping[str, object],
    origin: datetime | None = None,
) -> str:
    """Markdown: a title, a metadata list, then ``**Name** (HH:MM:SS): text`` paragraphs.

    ``meta`` may hold ``room``, ``started_at``, ``ended_at``, ``language``,
    ``complete`` and ``speakers`` (a list; derived from the entries when
    absent). Missing keys are left out of the list.
    """
    cues = _cues(entries, origin)
    lines = [f"# {_md_escape(_one_line(title)) or 'Transcript'}", ""]

    def item(label: str, value: object) -> None:
        if value not in (None, ""):
            lines.append(f"- **{label}:** {_md_escape(_one_line(str(value)))}")

    item("Room", meta.get("room"))
    item("Start", meta.get("started_at"))
    if "ended_at" in meta:
        item("End", meta.get("ended_at") or "in progress")
    item("Language", meta.get("language"))
    speakers = meta.get("speakers")
    if not isinstance(speakers, Sequence) or isinstance(speakers, str):
        # dict.fromkeys keeps first-appearance order while dropping repeats.
        speakers = list(dict.fromkeys(c.name for c in cues))
    item("Speakers", ", ".join(str(s) for s in speakers) or "none")
    if meta.get("complete") is False and meta.get("ended_at"):
        item("Status", "incomplete (recording was interrupted)")
    lines.append("")

    if not cues:
        lines.append("_No speech was transcribed._")
        lines.append("")
    for c in cues:
        lines.append(
            f"**{_md_escape(c.name)}** ({_clock_seconds(c.start_ms)}): {_md_escape(c.text)}"
        )
        lines.append("")
    return "\n".join(lines)


def render(
    fmt: str,
    entries: Iterable[TranscriptEntry],
    *,
    title: str = "Transcript",
    meta: Mapping[str, object] | None = None,
    origin: datetime | None = None,
) -> str:
    """Render ``entries`` in ``fmt`` (one of ``FORMATS``).

    ``title`` and ``meta`` are used by Markdown only; ``origin`` by the timed
    formats.

    Raises:
        UnknownFormat: if ``fmt`` is not one of ``FORMATS``.
    """
    validate_format(fmt)
    if fmt == "jsonl":
        return to_jsonl(entries)
    if fmt == "srt":
        return to_srt(entries, origin=origin)
    if fmt == "vtt":
        return to_vtt(entries, origin=origin)
    if fmt == "txt":
        return to_txt(entries, origin=origin)
    return to_md(entries, title=title, meta=meta or {}, origin=origin)
