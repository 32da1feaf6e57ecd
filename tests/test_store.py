"""Behaviour of the transcript store: durability, renderings, safety of ids, recovery."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from sidecar.events import TranscriptEntry
from sidecar.store import (
    FORMATS,
    InvalidTranscriptId,
    LocalDirStore,
    StoreError,
    TranscriptNotFound,
    UnknownFormat,
    render,
    to_md,
    to_srt,
    to_txt,
    to_vtt,
    validate_transcript_id,
)

REPO = Path(__file__).resolve().parents[1]
T0 = datetime(2026, 11, 21, 10, 0, 0, tzinfo=UTC)
ROOM = "weekly-sync@conference.meet.example"
STREAM_KEYS = [
    "type",
    "start_time",
    "stop_time",
    "speaker_id",
    "speaker_name",
    "text",
    "message_id",
    "language",
]


def iso(seconds: float) -> str:
    moment = T0 + timedelta(seconds=seconds)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def entry(
    start: float, stop: float, name: str, text: str, speaker: str = "", **extra: object
) -> TranscriptEntry:
    return TranscriptEntry(
        start_time=iso(start),
        stop_time=iso(stop),
        speaker_id=speaker or name.lower() or "anon",
        speaker_name=name,
        text=text,
        message_id=f"m-{start}",
        language="en",
        extra=dict(extra),
    )


# Three speakers; Carol has no display name, so her id must be shown.
MEETING = [
    entry(1.5, 3.25, "Alice", "Good morning everyone."),
    entry(4.0, 6.5, "Bob", "Morning! Shall we start?"),
    entry(3723.004, 3725.5, "", "Yes, <b>fish</b> & chips > salad.", speaker="carol-42"),
]


@pytest.fixture
def store(tmp_path: Path) -> LocalDirStore:
    return LocalDirStore(tmp_path / "transcripts")


def jsonl_objects(data: bytes) -> list[dict[str, object]]:
    return [json.loads(line) for line in data.decode("utf-8").splitlines()]


def make_crashed_session(root: Path, tid: str, lines: list[bytes], room: str = ROOM) -> Path:
    """Lay out a session as a process killed mid-meeting leaves it (no writer, open meta)."""
    directory = root / tid
    directory.mkdir(parents=True)
    meta = {
        "id": tid,
        "room": room,
        "started_at": iso(0),
        "ended_at": "",
        "language": "en",
        "entries": 0,
        "complete": False,
        "formats": ["jsonl"],
    }
    (directory / "meta.json").write_text(json.dumps(meta))
    (directory / "transcript.jsonl").write_bytes(b"".join(lines))
    return directory


def line_for(e: TranscriptEntry) -> bytes:
    obj = {
        "type": "speech",
        "start_time": e.start_time,
        "stop_time": e.stop_time,
        "speaker_id": e.speaker_id,
        "speaker_name": e.speaker_name,
        "text": e.text,
        "message_id": e.message_id,
        "language": e.language,
    }
    return (json.dumps(obj) + "\n").encode()


# --- JSONL and ids ------------------------------------------------------------------------


def test_entries_round_trip_to_jsonl_with_exact_keys(store: LocalDirStore) -> None:
    writer = store.open(ROOM, language="en", started_at=T0)
    writer.append(entry(1, 2, "Alice", 'héllo "quoted"\nnext', confidence=0.9))
    # extra keys are merged, but may not override the fixed ones
    second = entry(3, 4, "Bob", "second", words=[1, 2])
    second.extra["text"] = "forged"
    writer.append(second)
    meta = writer.close()

    lines = jsonl_objects(store.get(meta.id))
    assert [list(o) for o in lines] == [STREAM_KEYS + ["confidence"], STREAM_KEYS + ["words"]]
    assert lines[0]["text"] == 'héllo "quoted"\nnext'
    assert lines[0]["start_time"] == "2026-11-21T10:00:01.000Z"
    assert lines[0]["type"] == "speech" and lines[0]["confidence"] == 0.9
    assert lines[1]["text"] == "second" and lines[1]["words"] == [1, 2]
    assert meta.entries == 2 and meta.complete and meta.ended_at
    assert meta.formats == list(FORMATS)
    assert store.info(meta.id) == meta


def test_append_is_one_write_and_one_fsync(
    store: LocalDirStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = store.open(ROOM, language="en")
    calls: list[str] = []
    real_write, real_fsync = os.write, os.fsync

    def write(fd: int, data: bytes) -> int:
        calls.append("write")
        return real_write(fd, data)

    def fsync(fd: int) -> None:
        calls.append("fsync")
        real_fsync(fd)

    monkeypatch.setattr(os, "write", write)
    monkeypatch.setattr(os, "fsync", fsync)
    writer.append(entry(1, 2, "Alice", "x" * 100_000))
    monkeypatch.undo()
    assert calls == ["write", "fsync"]
    writer.close()


def test_a_failed_append_leaves_the_file_valid(
    store: LocalDirStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = store.open(ROOM, language="en")
    writer.append(MEETING[0])
    real_write = os.write

    def disk_full(fd: int, data: bytes) -> int:
        return real_write(fd, data[: len(data) // 2])  # the disk took half the line

    monkeypatch.setattr(os, "write", disk_full)
    with pytest.raises(StoreError, match="short write"):
        writer.append(MEETING[1])
    monkeypatch.undo()
    writer.append(MEETING[2])
    writer.close()
    names = [o["speaker_name"] for o in jsonl_objects(store.get(writer.id))]
    assert names == ["Alice", ""]
    assert store.info(writer.id).entries == 2


def test_ids_are_made_by_the_store(store: LocalDirStore) -> None:
    a = store.open("Réunion Équipe!!@conference.x", language="fr", started_at=T0)
    b = store.open("x" * 80 + "@conference.x", language="en", started_at=T0)
    c = store.open("", language="en")
    assert re.fullmatch(r"20261121T100000Z-reunion-equipe-[0-9a-f]{8}", a.id)
    assert re.fullmatch(r"20261121T100000Z-x{40}-[0-9a-f]{8}", b.id)
    assert re.fullmatch(r"\d{8}T\d{6}Z-room-[0-9a-f]{8}", c.id)
    for w in (a, b, c):
        assert validate_transcript_id(w.id) == w.id
        assert (store.root / w.id / "transcript.jsonl").is_file()
        w.close()
    assert a.meta.room == "Réunion Équipe!!@conference.x"
    assert a.meta.started_at == "2026-11-21T10:00:00.000Z"


# --- renderings ---------------------------------------------------------------------------


def srt_cues(text: str) -> list[tuple[int, str, str, str]]:
    cues = []
    for block in text.strip().split("\n\n"):
        number, times, body = block.split("\n")
        start, end = times.split(" --> ")
        cues.append((int(number), start, end, body))
    return cues


def test_renderings_of_a_three_speaker_meeting(store: LocalDirStore) -> None:
    writer = store.open(ROOM, language="en", started_at=T0)
    for e in MEETING:
        writer.append(e)
    tid = writer.close().id

    srt = store.get(tid, "srt").decode()
    assert srt_cues(srt) == [
        (1, "00:00:01,500", "00:00:03,250", "Alice: Good morning everyone."),
        (2, "00:00:04,000", "00:00:06,500", "Bob: Morning! Shall we start?"),
        (3, "01:02:03,004", "01:02:05,500", "carol-42: Yes, <b>fish</b> & chips > salad."),
    ]

    vtt = store.get(tid, "vtt").decode()
    assert vtt.startswith("WEBVTT\n\n")
    cues = re.findall(r"(\d\d:\d\d:\d\d\.\d{3}) --> (\d\d:\d\d:\d\d\.\d{3})\n(.*)\n", vtt)
    assert cues == [
        ("00:00:01.500", "00:00:03.250", "<v Alice>Good morning everyone."),
        ("00:00:04.000", "00:00:06.500", "<v Bob>Morning! Shall we start?"),
        (
            "01:02:03.004",
            "01:02:05.500",
            "<v carol-42>Yes, &lt;b&gt;fish&lt;/b&gt; &amp; chips &gt; salad.",
        ),
    ]

    assert store.get(tid, "txt").decode().splitlines() == [
        "[00:00:01] Alice: Good morning everyone.",
        "[00:00:04] Bob: Morning! Shall we start?",
        "[01:02:03] carol-42: Yes, <b>fish</b> & chips > salad.",
    ]

    md = store.get(tid, "md").decode()
    assert md.startswith("# Transcript: weekly-sync@conference.meet.example\n")
    assert "- **Room:** weekly-sync@conference.meet.example" in md
    assert "- **Start:** 2026-11-21T10:00:00.000Z" in md
    assert "- **Speakers:** Alice, Bob, carol-42" in md
    paragraphs = re.findall(r"^\*\*(.+?)\*\* \((\d\d:\d\d:\d\d)\): (.*)$", md, re.M)
    assert [(n, t) for n, t, _ in paragraphs] == [
        ("Alice", "00:00:01"),
        ("Bob", "00:00:04"),
        ("carol-42", "01:02:03"),
    ]


def test_render_without_origin_counts_from_first_entry() -> None:
    later = [entry(10, 12, "Alice", "one"), entry(15.25, 16, "Bob", "two")]
    assert srt_cues(to_srt(later))[1][1:3] == ("00:00:05,250", "00:00:06,000")
    assert to_txt(later).splitlines()[0] == "[00:00:00] Alice: one"
    # an explicit origin wins; a cue starting before it is clamped, not negative
    assert "00:00:00.000 --> 00:00:02.000" in to_vtt(later, origin=T0 + timedelta(seconds=10))
    assert "00:00:00,000 --> 00:00:01,000" in to_srt(later, origin=T0 + timedelta(seconds=11))


def test_empty_transcripts_render_validly(store: LocalDirStore) -> None:
    assert to_srt([]) == ""
    assert to_vtt([]) == "WEBVTT\n"
    assert to_txt([]) == ""
    md = to_md([], title="Empty", meta={"room": "r"})
    assert md.startswith("# Empty\n") and "No speech" in md
    assert render("jsonl", []) == ""

    tid = store.open(ROOM, language="en").close().id
    for fmt in FORMATS:
        store.get(tid, fmt)  # must not raise
    assert store.get(tid, "vtt") == b"WEBVTT\n"


def test_multiline_text_cannot_break_a_cue() -> None:
    srt = to_srt([entry(0, 1, "A", "first\n\n2\n00:00:00,000 --> 00:00:01,000")])
    assert len(srt_cues(srt)) == 1


# --- errors and path safety ---------------------------------------------------------------

BAD_IDS = [
    "../x",
    "a/b",
    "/etc/passwd",
    "..",
    "a..b",
    "",
    "abc\x00def",
    "x" * 200,
    ".hidden",
    "-dash",
    "abc\n",
    "a\\b",
]


@pytest.mark.parametrize("bad", BAD_IDS)
def test_path_traversal_ids_are_refused(tmp_path: Path, bad: str) -> None:
    root = tmp_path / "store"
    store = LocalDirStore(root)
    outside = tmp_path / "x"
    outside.mkdir()
    (outside / "transcript.jsonl").write_text("precious")
    before = sorted(p.name for p in tmp_path.rglob("*"))

    with pytest.raises(InvalidTranscriptId) as info:
        store.delete(bad)
    assert isinstance(info.value, ValueError)
    with pytest.raises(InvalidTranscriptId):
        store.get(bad)
    with pytest.raises(InvalidTranscriptId):
        store.get(bad, "srt")
    with pytest.raises(InvalidTranscriptId):
        store.info(bad)

    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    assert (outside / "transcript.jsonl").read_text() == "precious"


def test_symlink_out_of_the_store_is_refused(tmp_path: Path) -> None:
    store = LocalDirStore(tmp_path / "store")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "transcript.jsonl").write_text("precious\n")
    (store.root / "evil").symlink_to(outside)
    with pytest.raises(InvalidTranscriptId):
        store.delete("evil")
    with pytest.raises(InvalidTranscriptId):
        store.get("evil")
    assert (outside / "transcript.jsonl").read_text() == "precious\n"
    assert store.list() == []


def test_errors_name_the_bad_value(store: LocalDirStore) -> None:
    with pytest.raises(InvalidTranscriptId, match=r"'\.\./x'.*A-Za-z0-9"):
        validate_transcript_id("../x")
    with pytest.raises(InvalidTranscriptId):
        validate_transcript_id(42)  # type: ignore[arg-type]
    tid = store.open(ROOM, language="en").close().id
    with pytest.raises(UnknownFormat, match=r"'pdf'.*jsonl, srt, vtt, txt, md"):
        store.get(tid, "pdf")
    with pytest.raises(TranscriptNotFound) as missing:
        store.get("20990101T000000Z-nope-00000000")
    assert isinstance(missing.value, KeyError)
    assert "20990101T000000Z-nope-00000000" in str(missing.value)
    with pytest.raises(TranscriptNotFound):
        store.info("nope")
    assert store.delete("nope") is False


# --- reading, listing, deleting -----------------------------------------------------------


def test_list_filters_by_room_and_orders_newest_first(store: LocalDirStore) -> None:
    ids = {}
    for minutes, room in [(0, "a@conf"), (30, "b@conf"), (60, "a@conf"), (10, "a@conf")]:
        w = store.open(room, language="en", started_at=T0 + timedelta(minutes=minutes))
        ids[minutes] = w.close().id
    assert [m.id for m in store.list()] == [ids[60], ids[30], ids[10], ids[0]]
    assert [m.id for m in store.list(room="a@conf")] == [ids[60], ids[10], ids[0]]
    assert [m.id for m in store.list(limit=2)] == [ids[60], ids[30]]
    assert store.list(room="nobody@conf") == []
    assert store.list(limit=0) == []


def test_reading_while_a_writer_is_open(store: LocalDirStore) -> None:
    writer = store.open(ROOM, language="en", started_at=T0)
    writer.append(MEETING[0])
    writer.append(MEETING[1])

    info = store.info(writer.id)
    assert info.ended_at == "" and info.entries == 2 and not info.complete
    assert [m.id for m in store.list()] == [writer.id]
    assert len(jsonl_objects(store.get(writer.id))) == 2
    # renderings do not exist yet, so they are made on the fly
    assert not (store.root / writer.id / "transcript.srt").exists()
    assert len(srt_cues(store.get(writer.id, "srt").decode())) == 2
    assert "in progress" in store.get(writer.id, "md").decode()

    writer.append(MEETING[2])
    meta = writer.close()
    assert meta.entries == 3 and meta.complete
    assert len(srt_cues(store.get(writer.id, "srt").decode())) == 3
    assert writer.close() is meta  # closing twice is harmless
    with pytest.raises(StoreError):
        writer.append(MEETING[0])


def test_delete_while_open_and_after_close(store: LocalDirStore) -> None:
    writer = store.open(ROOM, language="en")
    writer.append(MEETING[0])
    assert store.delete(writer.id) is True
    assert not (store.root / writer.id).exists()
    writer.append(MEETING[1])  # goes nowhere, but must not fail or resurrect the session
    writer.close()
    assert not (store.root / writer.id).exists()
    assert store.list() == []
    assert list(store.root.iterdir()) == []

    tid = store.open(ROOM, language="en").close().id
    assert store.delete(tid) is True
    assert store.delete(tid) is False
    with pytest.raises(TranscriptNotFound):
        store.get(tid)


def test_leaving_a_with_block_by_exception_marks_incomplete(store: LocalDirStore) -> None:
    with pytest.raises(RuntimeError), store.open(ROOM, language="en") as writer:
        writer.append(MEETING[0])
        raise RuntimeError("pipeline died")
    assert writer.closed
    assert store.info(writer.id).complete is False
    assert store.info(writer.id).entries == 1


# --- damage and recovery ------------------------------------------------------------------


def test_truncated_last_line_is_skipped(
    store: LocalDirStore, caplog: pytest.LogCaptureFixture
) -> None:
    tid = "20261121T100000Z-weekly-sync-0badc0de"
    torn = line_for(MEETING[2])[:40]
    make_crashed_session(store.root, tid, [line_for(MEETING[0]), line_for(MEETING[1]), torn])

    data = store.get(tid)
    assert [o["speaker_name"] for o in jsonl_objects(data)] == ["Alice", "Bob"]
    assert len(srt_cues(store.get(tid, "srt").decode())) == 2
    assert store.info(tid).entries == 2
    assert "truncated last line" in caplog.text


def test_recover_finishes_a_crashed_session(store: LocalDirStore) -> None:
    tid = "20261121T100000Z-weekly-sync-0badc0de"
    torn = line_for(MEETING[2])[:-10]
    make_crashed_session(store.root, tid, [line_for(MEETING[0]), line_for(MEETING[1]), torn])
    live = store.open("other@conf", language="en")
    live.append(MEETING[0])

    recovered = store.recover()
    assert [m.id for m in recovered] == [tid]  # the live writer is left alone
    meta = store.info(tid)
    assert meta.complete is False
    assert meta.ended_at == MEETING[1].stop_time
    assert meta.entries == 2
    assert meta.formats == list(FORMATS)
    assert (store.root / tid / "transcript.vtt").read_text().count("<v ") == 2
    assert "incomplete" in store.get(tid, "md").decode()
    assert store.recover() == []

    live.append(MEETING[1])
    assert live.close().complete is True
    assert store.info(live.id).entries == 2


def test_corrupt_meta_json_never_crashes(store: LocalDirStore) -> None:
    tid = "20261121T100000Z-weekly-sync-00c0ffee"
    directory = make_crashed_session(store.root, tid, [line_for(MEETING[0])])
    (directory / "meta.json").write_bytes(b'{"id": "x", "room": ')

    meta = store.info(tid)
    assert meta.complete is False
    assert meta.started_at == "2026-11-21T10:00:00.000Z"  # from the id
    assert meta.entries == 1 and meta.language == "en"
    assert [m.id for m in store.list()] == [tid]
    assert b"Alice" in store.get(tid, "txt")

    (directory / "meta.json").write_text('{"entries": "lots", "ended_at": 5}')
    assert store.info(tid).entries == 1
    (directory / "meta.json").unlink()
    assert store.info(tid).entries == 1

    [fixed] = store.recover()
    assert fixed.id == tid and fixed.complete is False and fixed.entries == 1
    assert json.loads((directory / "meta.json").read_text())["ended_at"] == MEETING[0].stop_time


# --- the crash test -----------------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from sidecar.events import TranscriptEntry
    from sidecar.store import LocalDirStore

    writer = LocalDirStore(Path(sys.argv[1])).open("crash@conf", language="en")
    print(writer.id, flush=True)
    for i in range(int(sys.argv[2])):
        writer.append(TranscriptEntry(
            start_time="2026-11-21T10:00:00.000Z", stop_time="2026-11-21T10:00:01.000Z",
            speaker_id="p1", speaker_name="Ann", text=f"utterance {i}", message_id=f"m{i}",
        ))
        print(f"ack {i}", flush=True)
    """
)


def test_sigkill_after_append_loses_nothing_acknowledged(tmp_path: Path) -> None:
    root, total, kill_after = tmp_path / "store", 100_000, 40
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(root), str(total)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=env,
    )
    assert child.stdout is not None
    try:
        tid = child.stdout.readline().strip()
        acked: list[str] = []
        while len(acked) < kill_after:
            line = child.stdout.readline()
            assert line.startswith("ack "), f"child stopped early: {line!r}"
            acked.append(f"utterance {line.split()[1]}")
            if len(acked) == kill_after // 2:
                # the child's writer is alive, so recovery must leave its session alone
                assert LocalDirStore(root).recover() == []
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait(timeout=10)
    assert child.returncode == -signal.SIGKILL

    store = LocalDirStore(root)
    stored = [o["text"] for o in jsonl_objects(store.get(tid))]
    assert stored[: len(acked)] == acked  # every acknowledged entry, in order
    assert stored == [f"utterance {i}" for i in range(len(stored))]
    assert store.info(tid).ended_at == ""

    [meta] = store.recover()
    assert meta.id == tid and meta.complete is False and meta.entries == len(stored)
    assert len(srt_cues(store.get(tid, "srt").decode())) == len(stored)
