"""The conference simulator against a real sidecar, and its measuring parts.

The slow tests play espeak-ng speakers (and silent listeners) to a real
:class:`Sidecar` on 127.0.0.1: over the videobridge's mediajson socket with
loss and jitter, across a reconnect, and as plain RTP with captions from
the gRPC stream. The others check the pieces that turn captions into
numbers (levels, RTP packets, speech detection, matching, WER, the CLI)
without a model.
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
import wave
from pathlib import Path

import numpy as np
import pytest

from sidecar.audio import SAMPLE_RATE
from sidecar.config import load_config
from sidecar.ingest.rtp import parse_rtp
from sidecar.server import Sidecar
from sidecar.sim.__main__ import build_parser, config_from_args
from sidecar.sim.__main__ import main as cli_main
from sidecar.sim.conference import (
    ReceivedCaption,
    SimConfig,
    SimParticipant,
    SimReport,
    UtteranceResult,
    _assign,
    _edits,
    _Media,
    _report,
    _Source,
    _Timeline,
    _Truth,
    frame_level,
    rtp_packet,
    run_conference,
    speech_segments,
    word_error_rate,
)
from sidecar.sim.voices import VOICES, synthesize

TOKEN = "sim-secret"
ROOM = "standup@conference.example.org"
ALICE = "Alice Liddell"
BOB = "Bob"
# espeak-ng lays these out at about 0.5-3.2 s, 4.0-6.7 s, 7.5-10.2 s, 11.0-13.5 s
SCRIPT = [
    (ALICE, "The quarterly budget review is on Monday morning."),
    (BOB, "I will bring the sales report from last week."),
    (ALICE, "Thank you both, we will meet in the large room."),
    (BOB, "Should we invite the marketing team as well?"),
]


def make_sidecar(tmp_path: Path, *, rtp: bool = False) -> Sidecar:
    env = {
        "CAPTIONS_SERVER_TOKEN": TOKEN,
        "CAPTIONS_SERVER_GRPC_LISTEN": "127.0.0.1:0",
        "CAPTIONS_SERVER_HTTP_LISTEN": "127.0.0.1:0",
        "CAPTIONS_STORE_STORE_DIR": str(tmp_path / "store"),
    }
    if rtp:
        env["CAPTIONS_INGEST_RTP_LISTEN"] = "127.0.0.1:0"
    return Sidecar(load_config(None, env=env))


def mediajson(sidecar: Sidecar, meeting: str, **kw: object) -> SimConfig:
    """Alice (a fixed endpoint id) and Bob (a random one) over the bridge socket."""
    cfg = SimConfig(
        participants=[SimParticipant(ALICE, endpoint="a1b2c3d4"), SimParticipant(BOB)],
        url=f"ws://127.0.0.1:{sidecar.ports.http}/mediajson/{meeting}",
        room=ROOM,
        token=TOKEN,
        grpc=f"127.0.0.1:{sidecar.ports.grpc}",  # the simulator sends the roster itself
    )
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def assert_every_turn_captioned_once(report: SimReport) -> None:
    endpoint = {p["name"]: p["endpoint"] for p in report.participants}
    for u in report.utterances:
        assert not u.missed, f"no final for {u.name}: {u.reference!r}"
        # one final each: nothing lost, nothing doubled, nothing split
        assert len(u.message_ids) == 1, (u.reference, u.hypothesis)
        assert u.names_seen == [u.name]
        assert u.speaker == endpoint[u.name]
        assert u.wer is not None and u.wer < 0.6, (u.reference, u.hypothesis)
    assert report.missed == 0
    assert report.duplicate_finals == 0
    assert report.unmatched_finals == 0
    assert report.misnamed_finals == 0
    finals = [c for c in report.captions if not c.is_interim and c.text.strip()]
    assert len({c.message_id for c in finals}) == len(finals) == len(report.utterances)
    for c in finals:
        assert endpoint[c.participant_name] == c.participant_id


@pytest.mark.slow
async def test_two_speakers_ten_listeners_over_a_lossy_jittery_bridge(tmp_path):
    sidecar = make_sidecar(tmp_path)
    await sidecar.start()
    live: list[ReceivedCaption] = []
    try:
        cfg = mediajson(
            sidecar,
            "meeting-lossy",
            script=SCRIPT,
            listeners=10,
            loss=0.02,
            jitter_ms=20.0,
            ping_interval=3.0,
            seed=7,
            on_caption=live.append,
        )
        report = await run_conference(cfg)
    finally:
        await sidecar.stop()
    print(report.to_markdown())

    assert report.errors == []
    assert len(report.participants) == 12
    assert sum(p["kind"] == "listener" for p in report.participants) == 10
    assert len(report.utterances) == 4
    assert [u.name for u in report.utterances] == [who for who, _ in SCRIPT]
    assert_every_turn_captioned_once(report)
    # the network was bad: about 2% of 12 x ~740 frames never went out
    assert 0.01 < report.frames_lost / (report.frames_sent + report.frames_lost) < 0.03
    # latencies measured against the true speech times: finite and plausible
    for u in report.utterances:
        assert u.final_latency is not None and 0.0 < u.final_latency < 10.0
        # a loaded sidecar may skip an utterance's interims (finals go first)
        if u.first_interim_latency is not None:
            assert 0.0 < u.first_interim_latency < 10.0
    for v in (
        report.final_latency_p50,
        report.final_latency_p95,
        report.first_interim_latency_p50,
        report.first_interim_latency_p95,
    ):
        assert v is not None and math.isfinite(v)
    assert report.wer is not None and report.wer < 0.35
    assert set(report.speaker_wer) == {ALICE, BOB}
    # pings answered, round trips recorded; the session ended cleanly
    assert report.pings >= 3 and len(report.pong_rtts_ms) >= 3
    assert report.pongs_missed == 0
    assert report.close_codes == [1000]
    # every caption reached the live callback, stamped on the audio timeline
    assert live == report.captions
    assert all(c.t is not None and c.arrival > 0 and c.wall > 1.7e9 for c in live)
    md = report.to_markdown()
    assert "| final latency p50 / p95 |" in md
    assert f"| {ALICE} | 2 |" in md and f"| {BOB} | 1 |" in md
    json.dumps(report.to_dict())


@pytest.mark.slow
async def test_reconnect_in_the_middle_loses_and_doubles_no_final(tmp_path):
    sidecar = make_sidecar(tmp_path)
    await sidecar.start()
    try:
        # drop the socket in the middle of Bob's turn (about 4.0-6.7 s)
        cfg = mediajson(sidecar, "meeting-reconnect", script=SCRIPT[:3], reconnect_at=5.0)
        report = await run_conference(cfg)
    finally:
        await sidecar.stop()
    print(report.to_markdown())

    assert report.errors == []
    assert report.reconnects == 1
    assert len(report.utterances) == 3
    assert_every_turn_captioned_once(report)
    # captions came over both sockets: the conference went on across the cut
    assert {c.connection for c in report.captions} == {0, 1}
    assert report.close_codes[-1] == 1000


@pytest.mark.slow
async def test_rtp_participants_captioned_through_the_grpc_stream(tmp_path):
    # Bob comes from a file: his utterance is found by its energy
    bob_text = SCRIPT[1][1]
    wav = tmp_path / "bob.wav"
    pcm = await asyncio.to_thread(synthesize, bob_text, VOICES[1])
    with wave.open(str(wav), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes((np.clip(pcm * 0.8, -1, 1) * 32767).astype("<i2").tobytes())
    sidecar = make_sidecar(tmp_path, rtp=True)
    await sidecar.start()
    assert sidecar.ports.rtp
    try:
        cfg = SimConfig(
            participants=[
                SimParticipant(ALICE),
                SimParticipant(BOB, audio=wav, text=bob_text, offset=4.0),
            ],
            transport="rtp",
            rtp=f"127.0.0.1:{sidecar.ports.rtp}",
            grpc=f"127.0.0.1:{sidecar.ports.grpc}",
            room="rtp-call@conference.example.org",
            token=TOKEN,
            script=SCRIPT[:1],
            listeners=3,
            loss=0.02,
            jitter_ms=20.0,
            duplicate=0.01,
            seed=3,
        )
        report = await run_conference(cfg)
    finally:
        await sidecar.stop()
    print(report.to_markdown())

    assert report.errors == []
    assert report.frames_duplicated > 0
    assert [p["kind"] for p in report.participants] == ["espeak", "file"] + ["listener"] * 3
    assert [(u.name, u.reference) for u in report.utterances] == [
        (ALICE, SCRIPT[0][1]),
        (BOB, bob_text),
    ]
    # the file's speech found where it was put: 4 s in, as long as the clip
    assert report.utterances[1].start == pytest.approx(4.0, abs=0.05)
    assert report.utterances[1].end == pytest.approx(4.0 + len(pcm) / SAMPLE_RATE, abs=0.1)
    assert_every_turn_captioned_once(report)
    for u in report.utterances:
        assert u.final_latency is not None and 0.0 < u.final_latency < 10.0
    # gRPC events carry the utterance's own times: close to the truth
    finals = [c for c in report.captions if not c.is_interim and c.text.strip()]
    for c, u in zip(finals, report.utterances, strict=True):
        assert c.start_t is not None and abs(c.start_t - u.start) < 0.6
        assert c.end_t is not None and abs(c.end_t - u.end) < 0.6


@pytest.mark.slow
async def test_cli_plays_a_conference_and_writes_json(tmp_path, capsys):
    sidecar = make_sidecar(tmp_path)
    await sidecar.start()
    out = tmp_path / "report.json"
    argv = [
        "--url",
        f"ws://127.0.0.1:{sidecar.ports.http}/mediajson/meeting-cli",
        "--room",
        "cli@conference.example.org",
        "--token",
        TOKEN,
        "--grpc",
        f"127.0.0.1:{sidecar.ports.grpc}",
        "--speaker",
        "carol=The printer on the third floor is broken.",
        "--listeners",
        "2",
        "--fast",
        "--json",
        str(out),
    ]
    try:
        # the CLI runs its own event loop; the sidecar stays on this one
        rc = await asyncio.to_thread(cli_main, argv)
    finally:
        await sidecar.stop()
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "carol: " in printed  # the live caption line
    assert "## Conference simulation: mediajson, as fast as possible" in printed
    data = json.loads(out.read_text())
    assert len(data["utterances"]) == 1 and data["missed"] == 0
    assert data["utterances"][0]["names_seen"] == ["carol"]


# -- the measuring parts, without a model ----------------------------------------
def test_frame_level_is_minus_dbov_with_a_voice_flag():
    assert frame_level(np.zeros(320, np.float32)) == (127, False)
    t = np.arange(320) / SAMPLE_RATE
    loud = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)  # RMS 0.354: 9 dBov
    assert frame_level(loud) == (9, True)
    assert frame_level(loud * 10**-2.5) == (59, False)  # 50 dB quieter: below the flag


def test_rtp_packet_reads_back_with_level_and_voice_flag():
    src = _Source(
        endpoint="a1b2c3d4",
        name="A",
        kind="espeak",
        ssrc=0xDEADBEEF,
        b64=[],
        packets=[b"\xfc\x01\x02", b"\xfc\x03"],
        levels=[127, 23],
        vads=[False, True],
        seq0=65535,
        ts0=0xFFFFFF00,
    )
    first = parse_rtp(rtp_packet(src, 0, marker=True))
    second = parse_rtp(rtp_packet(src, 1))
    assert (first.payload_type, first.marker, first.ssrc) == (111, True, 0xDEADBEEF)
    assert (first.voice, first.level_dbov, first.payload) == (False, 127.0, b"\xfc\x01\x02")
    # sequence and timestamp wrap as RTP's do
    assert (second.sequence, second.timestamp) == (0, (0xFFFFFF00 + 960) & 0xFFFFFFFF)
    assert (second.voice, second.level_dbov, second.marker) == (True, 23.0, False)


def test_speech_segments_find_utterances_in_a_noisy_file():
    rng = np.random.default_rng(1)
    pcm = rng.normal(0, 0.001, SAMPLE_RATE * 6).astype(np.float32)  # hiss at -60 dBFS

    def burst(a: float, b: float) -> None:
        n = int((b - a) * SAMPLE_RATE)
        pcm[int(a * SAMPLE_RATE) : int(a * SAMPLE_RATE) + n] += 0.2 * np.sin(
            np.arange(n) * 0.1
        ).astype(np.float32)

    burst(0.5, 1.5)
    burst(1.8, 2.4)  # a 0.3 s pause does not end the utterance
    burst(4.0, 5.0)
    burst(5.8, 5.82)  # a click is not speech
    segs = speech_segments(pcm)
    assert len(segs) == 2
    assert segs[0] == pytest.approx((0.5, 2.4), abs=0.03)
    assert segs[1] == pytest.approx((4.0, 5.0), abs=0.03)


@pytest.mark.parametrize("with_jiwer", [True, False])
def test_word_error_rate_normalises_with_or_without_jiwer(with_jiwer, monkeypatch):
    if not with_jiwer:
        monkeypatch.setitem(sys.modules, "jiwer", None)  # import jiwer -> ImportError
    assert word_error_rate(["Hello, there!"], ["hello there"]) == 0.0
    assert word_error_rate(["mister Well-Known"], ["Mr. well known"]) == 0.0
    assert word_error_rate(["a b c d"], ["a x c"]) == pytest.approx(0.5)
    assert word_error_rate(["a b", "c d e f"], ["a b", ""]) == pytest.approx(4 / 6)
    assert word_error_rate([""], ["anything"]) is None
    assert _edits(["a", "b", "c", "d"], ["a", "x", "c"]) == 2


def _turn(name: str, i: int, start: float, end: float, ref: str | None) -> UtteranceResult:
    return UtteranceResult("ep", name, i, start, end, ref, "")


def _final(text: str, t: float) -> ReceivedCaption:
    return ReceivedCaption("ep", "A", text, False, f"id-{t}", 1.0, 0, 0.0, 0.0, t=t)


def test_finals_match_turns_in_order_with_splits_and_misses():
    turns = [
        _turn("A", 0, 0.5, 12.0, None),  # long: the sidecar cuts it
        _turn("A", 1, 13.0, 15.0, None),
        _turn("A", 2, 16.0, 18.0, None),
    ]
    # a piece of turn 0 while it is still spoken, its rest, then turn 2's
    # final after turn 1's never came... which by time alone goes to turn 1
    got = _assign(turns, [_final("x", 10.0), _final("y", 13.2), _final("z", 19.0)])
    assert [(r.index, f.text) for r, f in got] == [(0, "x"), (0, "y"), (1, "z")]
    # with the words known the missed turn is told apart
    turns[1].reference, turns[2].reference = "good morning", "see you soon"
    got = _assign(turns, [_final("x", 10.0), _final("y", 13.2), _final("see you soon", 19.0)])
    assert [r.index for r, _ in got] == [0, 0, 2]


def _scored(truths: list[tuple[str, float, float]], finals: list[tuple[str, float]]) -> SimReport:
    """The simulator's report for one speaker's utterances and the finals it got."""
    import types

    media = _Media(
        sources=[types.SimpleNamespace(endpoint="ep", name="A", kind="espeak", ssrc=1)],  # type: ignore[list-item]
        truths=[_Truth("ep", "A", text, start, end) for text, start, end in truths],
        frames=1000,
        reference_by_name={"A": " ".join(t for t, _, _ in truths)},
    )
    timeline = _Timeline(mono=[i * 0.02 for i in range(1000)], wall0=0.0)  # audio time == clock
    caps = [
        ReceivedCaption("ep", "A", text, False, f"id-{t}", 1.0, 0, t, t, t=t) for text, t in finals
    ]
    cfg = types.SimpleNamespace(transport="mediajson", realtime=True)
    return _report(cfg, media, caps, timeline)  # type: ignore[arg-type]


def test_two_utterances_in_one_final_are_merged_not_credited_to_a_missed_one():
    """A reply gets no caption; the next two utterances come as one final.
    That final belongs to those two (merged), not to the reply, whose words
    it happens to share: the reply is missed, and its 'latency' is not one."""
    report = _scored(
        [
            ("the budget after lunch is fine", 0.5, 2.0),  # no caption
            ("yes", 3.0, 3.3),
            ("the budget after lunch then", 3.6, 5.0),
            ("okay", 7.0, 7.3),
        ],
        [("Yes, the budget after lunch then.", 6.2), ("Okay.", 8.3)],
    )
    rows = report.utterances
    assert [r.missed for r in rows] == [True, False, False, False]
    assert [r.merged for r in rows] == [False, True, True, False]
    assert (report.missed, report.merged, report.stray_finals) == (1, 2, 0)
    assert rows[1].hypothesis == "yes" and rows[2].hypothesis == "the budget after lunch then"
    assert rows[2].wer == 0.0
    # the served-alone utterance's latency is the p95; the merged ones are apart
    assert report.final_latency_p95 == pytest.approx(1.0)
    assert [r.final_latency for r in rows[1:3]] == pytest.approx([2.9, 1.2])
    assert report.merged_final_latency_p95 is not None and report.merged_final_latency_p95 > 2.5


def test_a_cut_utterance_keeps_both_pieces_and_a_stray_final_is_counted():
    report = _scored(
        [("one two three four five six seven eight nine ten", 0.5, 9.0), ("right", 12.0, 12.4)],
        [("One two three four five", 6.0), ("six seven eight nine ten", 9.8), ("right", 13.0)],
    )
    assert [r.hypothesis for r in report.utterances] == [
        "One two three four five six seven eight nine ten",
        "right",
    ]
    assert (report.missed, report.merged) == (0, 0)
    assert report.utterances[0].final_latency == pytest.approx(0.8)


def test_cli_arguments_make_a_config(tmp_path):
    wav = tmp_path / "bob.wav"
    wav.write_bytes(b"RIFF")  # only its existence matters here
    args = build_parser().parse_args(
        [
            "--url",
            "ws://127.0.0.1:8088/mediajson/m1",
            "--room",
            "r1",
            "--token",
            "T",
            "--speaker",
            "alice=Hello there. How are you?",
            "--speaker",
            f"bob={wav}",
            "--ref",
            "bob=Fine thanks.",
            "--listeners",
            "50",
            "--fast",
            "--loss",
            "0.02",
            "--jitter-ms",
            "30",
        ]
    )
    cfg = config_from_args(args)
    cfg.validate()
    alice, bob = cfg.participants
    assert (alice.name, alice.text, alice.is_file) == ("alice", "Hello there. How are you?", False)
    assert (bob.name, bob.audio, bob.text) == ("bob", wav, "Fine thanks.")
    assert (cfg.listeners, cfg.realtime, cfg.loss, cfg.jitter_ms) == (50, False, 0.02, 30.0)
    assert cfg.transport == "mediajson"
    rtp = config_from_args(
        build_parser().parse_args(
            ["--rtp", "127.0.0.1:40000", "--grpc", "127.0.0.1:50051", "--room", "r"]
            + ["--turn", "a=One.", "--turn", "b=Two."]
        )
    )
    rtp.validate()
    assert rtp.transport == "rtp" and rtp.script == [("a", "One."), ("b", "Two.")]
    with pytest.raises(ValueError):
        SimConfig(participants=[], transport="rtp", rtp="h:1", room="r").validate()
