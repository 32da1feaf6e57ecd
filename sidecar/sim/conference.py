"""Conference simulator: N participants played to the sidecar as the bridge would.

Used by the tests, the live demo and the benchmarks. Every participant is
either an audio file or espeak-ng speech laid out from a script of turns
(:func:`sidecar.sim.voices.build_conversation`), plus any number of silent
listeners. Their audio goes out as 20 ms Opus frames:

* ``mediajson`` (default): one WebSocket for the whole conference, spoken as
  jitsi-videobridge's media export speaks it (``info``, ``start`` per
  source, ``media`` with base64 Opus and string numbers, a ``ping`` every
  10 s, ``session-end``); captions come back on the same socket as
  ``transcription-result`` messages. ``reconnect_at`` drops the socket in
  the middle and reconnects as the bridge does: ``start`` again for every
  source, ``sequenceNumber`` restarting, ``chunk`` going on.
* ``rtp``: one RTP stream (RFC 3550, PT 111, one SSRC per participant, the
  RFC 6464 audio level in a one-byte header extension) per participant over
  UDP; captions come from the gRPC ``SubscribeCaptions`` stream.

Frames can be lost, delayed (which reorders them) and duplicated from a
seeded RNG, so a run is repeatable. Every caption is recorded with its
arrival time; the report lines the finals up with the true turns (per
speaker, in order) and gives the latency from the true end of speech to the
final, from the true start of speech to the first interim, the utterances
that got no final, and the word error rate where the words are known.
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import contextlib
import heapq
import itertools
import json
import logging
import math
import random
import re
import struct
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import aiohttp
import grpc
import numpy as np

from sidecar.audio import FRAME_MS, SAMPLE_RATE, OpusEncoder, load_audio
from sidecar.proto.captions.v1 import captions_pb2 as pb
from sidecar.proto.captions.v1 import captions_pb2_grpc as pb_grpc
from sidecar.sim.voices import VOICES, build_conversation

log = logging.getLogger(__name__)

__all__ = [
    "ReceivedCaption",
    "SimConfig",
    "SimParticipant",
    "SimReport",
    "UtteranceResult",
    "frame_level",
    "normalise",
    "rtp_packet",
    "run_conference",
    "speech_segments",
    "word_error_rate",
]

FRAME_S = FRAME_MS / 1000
FRAME_SAMPLES = SAMPLE_RATE * FRAME_MS // 1000
RTP_CLOCK_PER_FRAME = 48000 * FRAME_MS // 1000  # Opus RTP clock is always 48 kHz (RFC 7587)
OPUS_PT = 111
AUDIO_LEVEL_EXT_ID = 1
SILENT_LEVEL = 127
# every stream goes on this long after the last speech ends, so that the
# sidecar's segmenter hears the silence that ends the last utterance
TAIL_S = 1.5
# gRPC metadata key of the control API's bearer token
_AUTH = "authorization"

Transport = Literal["mediajson", "rtp"]
CaptionCallback = Callable[["ReceivedCaption"], None]


# -- configuration -----------------------------------------------------------
@dataclass
class SimParticipant:
    """One speaking participant.

    Exactly one of ``audio`` (a file, anything FFmpeg reads) or ``text``
    (espeak-ng speech) is the source. For an espeak source ``text`` is split
    into sentences, one turn each, unless :attr:`SimConfig.script` orders
    the turns. For a file source ``text``, when given, is the reference
    transcript of the whole file: it is used for the speaker's WER, and for
    the utterance's WER when the file holds a single utterance.
    """

    name: str  # display name, as the roster shows it
    text: str | None = None
    audio: str | Path | None = None
    endpoint: str = ""  # 8 hex chars like Jitsi's endpoint ids; random when empty
    voice: str | None = None  # espeak-ng voice; one of voices.VOICES by default
    offset: float = 0.5  # file sources: seconds of silence before the file plays
    ssrc: int = 0  # RTP transport; random when 0

    @property
    def is_file(self) -> bool:
        return self.audio is not None


@dataclass
class SimConfig:
    """What to play, where, and how badly the network behaves."""

    participants: list[SimParticipant]
    url: str = ""  # mediajson: ws://HOST:PORT/mediajson/<meeting id>[?room=...]
    room: str = ""  # added to the URL as ?room= when it has none; needed for gRPC
    token: str = ""  # bearer token of the bridge socket and of the gRPC API
    transport: Transport = "mediajson"
    rtp: str = ""  # rtp: HOST:PORT of the sidecar's RTP listener
    grpc: str = ""  # HOST:PORT of the control API: roster, and captions for rtp
    # explicit turn order for espeak participants: (participant name, text)
    script: list[tuple[str, str]] | None = None
    listeners: int = 0
    realtime: bool = True  # False: as fast as possible
    loss: float = 0.0  # probability that a frame is not sent
    jitter_ms: float = 0.0  # mean extra delay of a frame (exponential), reorders
    duplicate: float = 0.0  # probability that a frame is sent twice
    seed: int = 0
    reconnect_at: float | None = None  # mediajson: seconds into the audio
    ping_interval: float = 10.0  # the bridge pings every 10 s
    pong_timeout: float = 3.0  # a pong later than this counts as missed, as for the bridge
    gap: float = 0.8  # espeak: silence between turns
    overlap: float = 0.0  # espeak: next speaker starts this early
    vad_threshold_dbov: float = 50.0  # frames louder than -50 dBov carry vad=true
    update_roster: bool = True  # with grpc: send names (and SSRCs) via UpdateRoster
    end_session: bool = True  # mediajson: send session-end; rtp: EndRoom
    drain_timeout: float = 20.0  # longest wait for the last finals after the audio
    settle: float = 1.0  # quiet time that tells the last caption has come
    on_caption: CaptionCallback | None = None  # called for each caption as it arrives

    def validate(self) -> None:
        """Raise ValueError for a configuration that cannot run."""
        if self.transport not in ("mediajson", "rtp"):
            raise ValueError(f"transport must be 'mediajson' or 'rtp', not {self.transport!r}")
        if self.transport == "mediajson" and not self.url:
            raise ValueError("mediajson needs url (ws://HOST:PORT/mediajson/<meeting id>)")
        if self.transport == "rtp":
            if not self.rtp or not self.grpc:
                raise ValueError("rtp needs rtp (HOST:PORT) and grpc (HOST:PORT) for captions")
            if not self.room:
                raise ValueError("rtp needs room: captions are subscribed to by room")
            if self.reconnect_at is not None:
                raise ValueError("reconnect_at is a mediajson feature")
        if self.grpc and not self.room:
            raise ValueError("grpc needs room")
        for what, prob in (("loss", self.loss), ("duplicate", self.duplicate)):
            if not 0.0 <= prob < 1.0:
                raise ValueError(f"{what} must be in [0, 1)")
        if self.jitter_ms < 0:
            raise ValueError("jitter_ms must be >= 0")
        if self.listeners < 0:
            raise ValueError("listeners must be >= 0")
        names = [p.name for p in self.participants]
        if len(set(names)) != len(names):
            raise ValueError("participant names must be unique")
        scripted = {who for who, _ in self.script or ()}
        for p in self.participants:
            # a file may carry a reference text; espeak speech needs words
            if p.audio is None and not p.text and p.name not in scripted:
                raise ValueError(f"participant {p.name!r}: give audio or text")
            if p.endpoint and not re.fullmatch(r"[A-Za-z0-9._~\-]{1,64}", p.endpoint):
                raise ValueError(f"participant {p.name!r}: bad endpoint id {p.endpoint!r}")
        if self.script:
            espeak = {p.name for p in self.participants if not p.is_file}
            for who, _ in self.script:
                if who not in espeak:
                    raise ValueError(f"script names {who!r}, not an espeak participant")


# -- results -----------------------------------------------------------------
@dataclass
class ReceivedCaption:
    """One caption as it came back, with when it came."""

    participant_id: str
    participant_name: str
    text: str
    is_interim: bool
    message_id: str
    stability: float
    timestamp_ms: int  # the sidecar's clock when it made the caption
    arrival: float  # time.monotonic() on arrival
    wall: float  # time.time() on arrival
    connection: int = 0  # mediajson: which socket (0, then 1 after a reconnect)
    start_time_ms: int | None = None  # gRPC only: epoch ms of the utterance
    end_time_ms: int | None = None
    t: float | None = None  # arrival in seconds of the conference's audio timeline
    start_t: float | None = None  # gRPC only: the utterance on the audio timeline
    end_t: float | None = None


@dataclass
class UtteranceResult:
    """One true utterance and what the captions made of it."""

    speaker: str  # endpoint id
    name: str  # display name
    index: int  # the speaker's n-th utterance
    start: float  # seconds into the audio
    end: float
    reference: str | None  # None: words unknown (file source)
    hypothesis: str  # its finals joined
    message_ids: list[str] = field(default_factory=list)
    names_seen: list[str] = field(default_factory=list)  # display names on its finals
    final_latency: float | None = None  # true end of speech -> last final, seconds
    first_interim_latency: float | None = None  # true start of speech -> first interim
    wer: float | None = None
    merged: bool = False  # its words came in a final shared with another utterance

    @property
    def missed(self) -> bool:
        return not self.message_ids


@dataclass
class SimReport:
    """Everything a run measured. Latencies in seconds, RTTs in milliseconds."""

    transport: str
    realtime: bool
    duration: float  # seconds of audio played
    elapsed: float  # wall seconds from the first frame to the end
    participants: list[dict[str, Any]]
    utterances: list[UtteranceResult]
    captions: list[ReceivedCaption]
    final_latency_p50: float | None = None
    final_latency_p95: float | None = None
    first_interim_latency_p50: float | None = None
    first_interim_latency_p95: float | None = None
    wer: float | None = None  # all speakers with known words together
    speaker_wer: dict[str, float] = field(default_factory=dict)  # by display name
    missed: int = 0
    merged: int = 0  # utterances served only together with another one, in one final
    merged_final_latency_p95: float | None = None  # theirs (not in final_latency_*)
    stray_finals: int = 0  # finals of a speaker that match none of its utterances
    finals: int = 0  # distinct non-empty finals
    duplicate_finals: int = 0  # a final received again (same message id)
    unmatched_finals: int = 0  # finals of endpoints that did not speak
    misnamed_finals: int = 0  # finals whose display name is not the participant's
    frames_sent: int = 0
    frames_lost: int = 0  # dropped on purpose (loss)
    frames_duplicated: int = 0
    pings: int = 0
    pongs_missed: int = 0
    pong_rtts_ms: list[float] = field(default_factory=list)
    pong_rtt_p50_ms: float | None = None
    pong_rtt_p95_ms: float | None = None
    reconnects: int = 0
    close_codes: list[int | None] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data (``missed`` added to each utterance)."""
        out = asdict(self)
        for row, u in zip(out["utterances"], self.utterances, strict=True):
            row["missed"] = u.missed
        return out

    def to_markdown(self) -> str:
        """A summary table and one row per utterance."""
        speakers = sum(1 for p in self.participants if p["kind"] != "listener")
        listeners = len(self.participants) - speakers
        pace = "real time" if self.realtime else "as fast as possible"
        lines = [
            f"## Conference simulation: {self.transport}, {pace}, "
            f"{speakers} speakers + {listeners} listeners, {self.duration:.1f} s of audio",
            "",
            "| metric | value |",
            "|---|---|",
            f"| utterances | {len(self.utterances)} ({self.missed} missed, {self.merged} merged) |",
            f"| finals | {self.finals} ({self.duplicate_finals} duplicated, "
            f"{self.unmatched_finals} from non-speakers, {self.misnamed_finals} misnamed, "
            f"{self.stray_finals} matching no utterance) |",
            f"| final latency p50 / p95 | {_s(self.final_latency_p50)} / "
            f"{_s(self.final_latency_p95)} |",
            f"| first interim latency p50 / p95 | {_s(self.first_interim_latency_p50)} / "
            f"{_s(self.first_interim_latency_p95)} |",
            f"| WER | {_pct(self.wer)} |",
        ]
        for name, w in sorted(self.speaker_wer.items()):
            lines.append(f"| WER {_cell(name)} | {_pct(w)} |")
        lines += [
            f"| frames sent / lost / duplicated | {self.frames_sent} / {self.frames_lost} / "
            f"{self.frames_duplicated} |",
            f"| pings (missed pongs) | {self.pings} ({self.pongs_missed}) |",
            f"| pong RTT p50 / p95 | {_ms(self.pong_rtt_p50_ms)} / {_ms(self.pong_rtt_p95_ms)} |",
            f"| reconnects | {self.reconnects} |",
            f"| wall time | {self.elapsed:.1f} s |",
        ]
        for e in self.errors:
            lines.append(f"| error | {_cell(e)} |")
        lines += [
            "",
            "| speaker | # | start | end | final latency | first interim | WER | reference "
            "| caption |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for u in self.utterances:
            caption = "**missed**" if u.missed else _cell(u.hypothesis)
            if u.merged:
                caption = f"(merged) {caption}"
            lines.append(
                f"| {_cell(u.name)} | {u.index + 1} | {u.start:.2f} | {u.end:.2f} "
                f"| {_s(u.final_latency)} | {_s(u.first_interim_latency)} | {_pct(u.wer)} "
                f"| {_cell(u.reference or '')} | {caption} |"
            )
        return "\n".join(lines) + "\n"


def _s(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f} s"


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f} ms"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _cell(text: str) -> str:
    # a pipe or a line break would end the markdown table cell
    return text.replace("|", "\\|").replace("\n", " ")


# -- audio analysis ------------------------------------------------------------
def frame_level(pcm: np.ndarray, vad_threshold_dbov: float = 50.0) -> tuple[int, bool]:
    """RFC 6464 level (0 loud .. 127 silent, -dBov) and voice flag of one frame.

    What a browser puts on the frame: RMS relative to full scale, as a
    positive number of dB below it, voice when louder than the threshold.
    """
    if len(pcm) == 0:
        return SILENT_LEVEL, False
    rms = float(np.sqrt(np.mean(np.square(pcm, dtype=np.float64))))
    dbov = SILENT_LEVEL if rms <= 0 else -20.0 * math.log10(rms)
    level = int(min(SILENT_LEVEL, max(0, round(dbov))))
    return level, level < vad_threshold_dbov


def _levels(track: np.ndarray, vad_threshold_dbov: float) -> tuple[list[int], list[bool]]:
    """:func:`frame_level` of every whole frame of ``track``, in one pass."""
    n = len(track) // FRAME_SAMPLES
    frames = track[: n * FRAME_SAMPLES].reshape(n, FRAME_SAMPLES).astype(np.float64)
    rms = np.sqrt(np.mean(np.square(frames), axis=1))
    with np.errstate(divide="ignore"):
        dbov = np.where(rms > 0, -20.0 * np.log10(rms), SILENT_LEVEL)
    levels = np.clip(np.round(dbov), 0, SILENT_LEVEL).astype(int)
    return levels.tolist(), (levels < vad_threshold_dbov).tolist()


def speech_segments(
    pcm: np.ndarray,
    *,
    min_silence: float = 0.7,
    min_speech: float = 0.15,
    floor_dbfs: float = -45.0,
) -> list[tuple[float, float]]:
    """(start, end) seconds of speech in ``pcm`` found by frame energy.

    A frame is speech when it is louder than ``floor_dbfs`` and 10 dB above
    the recording's noise floor, taken as its quietest frames (the 1st
    percentile), so that the hiss of an old recording does not count. A
    higher percentile would land inside the speech of a file that has little
    silence (a clip trimmed to its words) and cut its soft edges. Pauses
    shorter than ``min_silence`` (the sidecar's default end-of-utterance
    silence) do not split an utterance, and bursts shorter than
    ``min_speech`` are clicks, not speech.
    """
    n = len(pcm) // FRAME_SAMPLES
    if n == 0:
        return []
    frames = pcm[: n * FRAME_SAMPLES].reshape(n, FRAME_SAMPLES).astype(np.float64)
    db = 10 * np.log10(np.mean(frames**2, axis=1) + 1e-12)
    threshold = max(floor_dbfs, float(np.percentile(db, 1)) + 10.0)
    voiced = db > threshold
    segments: list[list[int]] = []
    for i in np.flatnonzero(voiced):
        if segments and i - segments[-1][1] <= min_silence / FRAME_S:
            segments[-1][1] = int(i)
        else:
            segments.append([int(i), int(i)])
    return [
        (a * FRAME_S, (b + 1) * FRAME_S) for a, b in segments if (b + 1 - a) * FRAME_S >= min_speech
    ]


_SPOKEN = {"mr": "mister", "mrs": "missus", "dr": "doctor", "ok": "okay"}


def normalise(text: str) -> str:
    """Lower case words without punctuation, hyphenated words split, and the
    titles Whisper abbreviates spelled out ("Mr." is "mister" read aloud)."""
    words = re.findall(r"[a-z0-9']+", text.lower().replace("-", " "))
    return " ".join(_SPOKEN.get(w, w) for w in words)


def word_error_rate(references: Sequence[str], hypotheses: Sequence[str]) -> float | None:
    """Corpus WER of normalised texts; jiwer when installed, else our own.

    None when the references hold no words (nothing to measure against).
    """
    refs = [normalise(r) for r in references]
    hyps = [normalise(h) for h in hypotheses]
    total = sum(len(r.split()) for r in refs)
    if total == 0:
        return None
    try:
        import jiwer  # optional: only the dev extra installs it
    except ImportError:
        errors = sum(_edits(r.split(), h.split()) for r, h in zip(refs, hyps, strict=True))
        return errors / total
    # jiwer refuses empty references; those pairs only add insertions
    keep = [(r, h) for r, h in zip(refs, hyps, strict=True) if r]
    extra = sum(len(h.split()) for r, h in zip(refs, hyps, strict=True) if not r)
    out = jiwer.process_words([r for r, _ in keep], [h or "" for _, h in keep])
    errors = out.substitutions + out.deletions + out.insertions
    return (errors + extra) / total


def _edits(ref: list[str], hyp: list[str]) -> int:
    """Word-level Levenshtein distance."""
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1]


def _percentile(values: Sequence[float | None], q: float) -> float | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.percentile(finite, q)) if finite else None


def _split_sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


# -- preparing the media -------------------------------------------------------
@dataclass
class _Truth:
    speaker: str  # endpoint id
    name: str
    text: str | None
    start: float
    end: float


@dataclass
class _Source:
    """One participant's stream, encoded up front so pacing is cheap."""

    endpoint: str
    name: str
    kind: str  # "espeak", "file", "listener"
    ssrc: int
    b64: list[str]  # base64 Opus (mediajson)
    packets: list[bytes]
    levels: list[int]
    vads: list[bool]
    seq0: int  # first RTP sequence number (mediajson's "chunk")
    ts0: int  # first RTP timestamp

    @property
    def tag(self) -> str:
        # the bridge names audio sources "<endpoint>-a<n>"
        return f"{self.endpoint}-a0"


@dataclass
class _Media:
    sources: list[_Source]
    truths: list[_Truth]
    frames: int
    reference_by_name: dict[str, str]  # whole-speaker references, for speaker WER


def _encode(track: np.ndarray, frames: int) -> list[bytes]:
    # pad so the resampler's delay never leaves the last frame short
    padded = np.concatenate([track, np.zeros(4 * FRAME_SAMPLES, np.float32)])
    packets = OpusEncoder().encode(padded)
    return packets[:frames]


def _prepare(cfg: SimConfig) -> _Media:
    """Tracks, truth, Opus packets and levels of every participant (blocking)."""
    ids = random.Random(f"ids-{cfg.seed}")
    used: set[str] = {p.endpoint for p in cfg.participants if p.endpoint}
    used_ssrc: set[int] = {p.ssrc for p in cfg.participants if p.ssrc}

    def new_endpoint() -> str:
        while True:
            ep = f"{ids.getrandbits(32):08x}"
            if ep not in used:
                used.add(ep)
                return ep

    def new_ssrc() -> int:
        while True:
            s = ids.randrange(1, 1 << 32)
            if s not in used_ssrc:
                used_ssrc.add(s)
                return s

    endpoints = {p.name: p.endpoint or new_endpoint() for p in cfg.participants}
    tracks: dict[str, np.ndarray] = {}
    truths: list[_Truth] = []
    refs: dict[str, str] = {}

    espeak = [p for p in cfg.participants if not p.is_file]
    if espeak:
        if cfg.script:
            script = [(endpoints[who], text) for who, text in cfg.script]
        else:
            # each speaker's sentences in turn: a conversation, not monologues
            queues = [
                [(endpoints[p.name], s) for s in _split_sentences(p.text or "")] for p in espeak
            ]
            script = [t for row in itertools.zip_longest(*queues) for t in row if t is not None]
        voices = {
            endpoints[p.name]: p.voice or VOICES[i % len(VOICES)] for i, p in enumerate(espeak)
        }
        if script:
            conv = build_conversation(script, voices, gap=cfg.gap, overlap=cfg.overlap)
            names = {endpoints[p.name]: p.name for p in espeak}
            tracks.update(conv.tracks)
            for turn in conv.turns:
                truths.append(
                    _Truth(turn.speaker, names[turn.speaker], turn.text, turn.start, turn.end)
                )
            for p in espeak:
                said = [t.text for t in conv.turns if t.speaker == endpoints[p.name]]
                if said:
                    refs[p.name] = " ".join(said)

    for p in cfg.participants:
        if not p.is_file:
            continue
        assert p.audio is not None
        pcm = load_audio(p.audio)
        lead = np.zeros(int(max(0.0, p.offset) * SAMPLE_RATE), np.float32)
        tracks[endpoints[p.name]] = np.concatenate([lead, pcm])
        segs = speech_segments(pcm)
        for a, b in segs:
            # the reference text belongs to an utterance only when there is one
            text = p.text if len(segs) == 1 else None
            truths.append(
                _Truth(
                    endpoints[p.name],
                    p.name,
                    text,
                    a + len(lead) / SAMPLE_RATE,
                    b + len(lead) / SAMPLE_RATE,
                )
            )
        if p.text:
            refs[p.name] = p.text

    speech_end = max((t.end for t in truths), default=0.0)
    longest = max((len(t) for t in tracks.values()), default=0)
    total = max(longest, int((speech_end + TAIL_S) * SAMPLE_RATE), FRAME_SAMPLES)
    frames = -(-total // FRAME_SAMPLES)
    total = frames * FRAME_SAMPLES

    seqs = random.Random(f"seq-{cfg.seed}")
    sources: list[_Source] = []
    # speakers first: a sidecar that caps the speakers per room takes the
    # first streams it sees, and the speakers are the ones that matter
    for p in cfg.participants:
        ep = endpoints[p.name]
        track = np.zeros(total, np.float32)
        src = tracks.get(ep)
        if src is not None:
            track[: min(total, len(src))] = src[:total]
        packets = _encode(track, frames)
        levels, vads = _levels(track, cfg.vad_threshold_dbov)
        sources.append(
            _Source(
                endpoint=ep,
                name=p.name,
                kind="file" if p.is_file else "espeak",
                ssrc=p.ssrc or new_ssrc(),
                b64=[base64.b64encode(pk).decode() for pk in packets],
                packets=packets,
                levels=levels,
                vads=vads,
                seq0=seqs.randrange(0, 30000),
                ts0=seqs.getrandbits(32),
            )
        )
    if cfg.listeners:
        # one near-silent stream (dither around one LSB, what a quiet room
        # with noise suppression sends) shared by every listener
        noise = np.random.default_rng(cfg.seed).normal(0.0, 3e-5, total).astype(np.float32)
        quiet = _encode(noise, frames)
        quiet_b64 = [base64.b64encode(pk).decode() for pk in quiet]
        for k in range(cfg.listeners):
            sources.append(
                _Source(
                    endpoint=new_endpoint(),
                    name=f"Listener {k + 1}",
                    kind="listener",
                    ssrc=new_ssrc(),
                    b64=quiet_b64,
                    packets=quiet,
                    levels=[SILENT_LEVEL] * frames,
                    vads=[False] * frames,
                    seq0=seqs.randrange(0, 30000),
                    ts0=seqs.getrandbits(32),
                )
            )
    for s in sources:
        if len(s.packets) < frames:
            # the track is padded for the encoder's delay, so this is a bug
            raise RuntimeError(f"{s.name}: {len(s.packets)} Opus packets for {frames} frames")
    truths.sort(key=lambda t: (t.start, t.speaker))
    return _Media(sources, truths, frames, refs)


# -- the run -------------------------------------------------------------------
@dataclass
class _Timeline:
    """When each frame tick happened: maps audio time to clocks and back."""

    mono: list[float] = field(default_factory=list)  # time.monotonic() of tick i
    wall0: float | None = None  # time.time() of tick 0

    def at(self, t: float) -> float | None:
        """Monotonic time at which the audio of time ``t`` went out."""
        n = len(self.mono)
        if n == 0:
            return None
        k = max(0, min(n - 1, int(t / FRAME_S)))
        return self.mono[k] + (t - k * FRAME_S)

    def audio_time(self, arrival: float) -> float | None:
        """Audio time that was going out at monotonic time ``arrival``."""
        n = len(self.mono)
        if n == 0:
            return None
        k = bisect.bisect_right(self.mono, arrival) - 1
        if k < 0:
            return arrival - self.mono[0]
        extra = arrival - self.mono[k]
        return k * FRAME_S + (extra if k == n - 1 else min(extra, FRAME_S))


class _Recorder:
    """Captions as they arrive, and what the drain wait needs to know."""

    def __init__(self, on_caption: CaptionCallback | None, timeline: _Timeline) -> None:
        self.captions: list[ReceivedCaption] = []
        self.timeline = timeline
        self.on_caption = on_caption
        self.open_ids: set[str] = set()  # interims seen, final not yet
        self.final_ids: dict[str, set[str]] = {}  # endpoint -> ids of non-empty finals
        self.closed_ids: set[str] = set()  # every id that had its final
        self.last_arrival = time.monotonic()

    def add(self, c: ReceivedCaption) -> None:
        c.t = self.timeline.audio_time(c.arrival)  # for a live display; the report redoes it
        self.captions.append(c)
        self.last_arrival = c.arrival
        if c.is_interim:
            if c.message_id not in self.closed_ids:
                self.open_ids.add(c.message_id)
        else:
            self.open_ids.discard(c.message_id)
            self.closed_ids.add(c.message_id)
            if c.text.strip():
                self.final_ids.setdefault(c.participant_id, set()).add(c.message_id)
        if self.on_caption is not None:
            try:
                self.on_caption(c)
            except Exception:  # a display bug must not end the measurement
                log.exception("sim: on_caption callback failed")


class _Link:
    """What a transport does; the pacer does not care which one it is."""

    reconnects = 0
    close_codes: list[int | None]

    async def open(self) -> None:
        raise NotImplementedError

    async def send(self, src: _Source, i: int) -> None:
        raise NotImplementedError

    async def tick(self) -> None:
        """Called every frame tick and while draining (pings)."""

    async def reconnect(self) -> None:
        raise NotImplementedError

    async def finish(self, end_session: bool) -> None:
        raise NotImplementedError

    def ping_stats(self) -> tuple[int, int, list[float]]:
        return 0, 0, []


class _MediaJsonLink(_Link):
    """One WebSocket per conference, as jitsi-videobridge's exporter speaks it."""

    def __init__(self, cfg: SimConfig, sources: list[_Source], rec: _Recorder) -> None:
        self.cfg = cfg
        self.sources = sources
        self.rec = rec
        self.url = _with_room(cfg.url, cfg.room)
        self.session: aiohttp.ClientSession | None = None
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.reader: asyncio.Task[None] | None = None
        self.msg_seq = 0
        self.connection = -1
        self.close_codes = []
        self.ping_id = 0
        self.ping_sent: dict[int, float] = {}
        self.rtts: list[float] = []
        self.last_ping = time.monotonic()

    async def open(self) -> None:
        self.session = aiohttp.ClientSession()
        try:
            await self._connect()
        except BaseException:
            # finish() is only called for a link that opened
            await self.session.close()
            raise

    async def _connect(self) -> None:
        assert self.session is not None
        self.ws = await self.session.ws_connect(
            self.url,
            headers={"Authorization": f"Bearer {self.cfg.token}"},
            max_msg_size=1 << 22,
            autoping=True,
        )
        self.connection += 1
        self.msg_seq = 0
        self.reader = asyncio.create_task(self._read(self.ws, self.connection))
        await self._send({"event": "info", "application": "jitsi-videobridge", "version": "2.3"})
        for src in self.sources:
            self.msg_seq += 1
            await self._send(
                {
                    "event": "start",
                    "sequenceNumber": str(self.msg_seq),
                    "start": {
                        "tag": src.tag,
                        "mediaFormat": {"encoding": "opus", "sampleRate": 48000, "channels": 2},
                        "customParameters": {"endpointId": src.endpoint},
                    },
                }
            )

    async def _send(self, obj: dict[str, Any]) -> None:
        assert self.ws is not None
        await self.ws.send_str(json.dumps(obj, separators=(",", ":")))

    async def _read(self, ws: aiohttp.ClientWebSocketResponse, connection: int) -> None:
        async for msg in ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            now, wall = time.monotonic(), time.time()
            try:
                data = json.loads(msg.data)
                event = data.get("event") or data.get("type")
                if event == "pong":
                    sent = self.ping_sent.pop(data.get("id"), None)
                    if sent is not None:
                        self.rtts.append((now - sent) * 1000)
                elif event == "transcription-result":
                    self.rec.add(_caption_from_json(data, now, wall, connection))
            except (ValueError, TypeError, KeyError, IndexError, AttributeError):
                log.warning("sim: unreadable message from the sidecar: %.200s", msg.data)

    async def send(self, src: _Source, i: int) -> None:
        assert self.ws is not None
        self.msg_seq += 1
        # built by hand: this runs for every frame of every participant
        chunk = src.seq0 + i  # the extended RTP sequence number: it never wraps
        ts = (src.ts0 + i * RTP_CLOCK_PER_FRAME) & 0xFFFFFFFF
        vad = "true" if src.vads[i] else "false"
        await self.ws.send_str(
            f'{{"event":"media","sequenceNumber":"{self.msg_seq}","media":{{'
            f'"tag":{json.dumps(src.tag)},"chunk":"{chunk}","timestamp":"{ts}",'
            f'"payload":"{src.b64[i]}","audioLevel":{src.levels[i]},"vad":{vad}}}}}'
        )

    async def tick(self) -> None:
        now = time.monotonic()
        if self.ws is None or self.ws.closed:
            return
        if now - self.last_ping >= self.cfg.ping_interval:
            self.last_ping = now
            self.ping_id += 1
            self.ping_sent[self.ping_id] = now
            await self._send({"event": "ping", "id": self.ping_id})

    async def reconnect(self) -> None:
        assert self.ws is not None
        await self.ws.close()
        if self.reader is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.reader, 5)
        self.close_codes.append(self.ws.close_code)
        self.reconnects += 1
        await self._connect()

    async def finish(self, end_session: bool) -> None:
        try:
            if end_session and self.ws is not None and not self.ws.closed:
                await self._send({"event": "session-end"})
                # the sidecar closes the socket once the session is over
                if self.reader is not None:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(asyncio.shield(self.reader), 15)
        finally:
            if self.ws is not None and not self.ws.closed:
                await self.ws.close()
            if self.reader is not None:
                with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                    await asyncio.wait_for(self.reader, 5)
            if self.ws is not None:
                self.close_codes.append(self.ws.close_code)
            if self.session is not None:
                await self.session.close()

    def ping_stats(self) -> tuple[int, int, list[float]]:
        now = time.monotonic()
        late = sum(1 for t in self.ping_sent.values() if now - t > self.cfg.pong_timeout)
        late += sum(1 for r in self.rtts if r > self.cfg.pong_timeout * 1000)
        return self.ping_id, late, list(self.rtts)


class _RtpLink(_Link):
    """One RTP stream per participant over UDP (captions come from gRPC)."""

    def __init__(self, cfg: SimConfig) -> None:
        self.cfg = cfg
        self.close_codes = []
        self.transport: asyncio.DatagramTransport | None = None

    async def open(self) -> None:
        host, port = _host_port(self.cfg.rtp)
        loop = asyncio.get_running_loop()
        self.transport, _ = await loop.create_datagram_endpoint(
            asyncio.DatagramProtocol, remote_addr=(host, port)
        )

    async def send(self, src: _Source, i: int) -> None:
        assert self.transport is not None
        # RFC 3551 4.1: the marker bit opens a talkspurt (and the stream);
        # decided by the frame, so a duplicate or late copy carries it too
        marker = i == 0 or (src.vads[i] and not src.vads[i - 1])
        self.transport.sendto(rtp_packet(src, i, marker=marker))

    async def reconnect(self) -> None:
        raise RuntimeError("RTP has no connection to drop")

    async def finish(self, end_session: bool) -> None:
        if self.transport is not None:
            self.transport.close()


def rtp_packet(src: _Source, i: int, *, marker: bool = False) -> bytes:
    """Frame ``i`` of ``src`` as an RTP packet with the RFC 6464 level.

    Fixed header (RFC 3550 5.1) with the extension bit, then the RFC 8285
    one-byte header extension (profile 0xBEDE, one 32-bit word): element
    id 1, length 1 (coded as 0), the V bit and the level, two padding bytes.
    """
    header = struct.pack(
        "!BBHII",
        0x80 | 0x10,  # V=2, P=0, X=1, CC=0
        (0x80 if marker else 0) | OPUS_PT,
        (src.seq0 + i) & 0xFFFF,
        (src.ts0 + i * RTP_CLOCK_PER_FRAME) & 0xFFFFFFFF,
        src.ssrc,
    )
    level = (0x80 if src.vads[i] else 0) | (src.levels[i] & 0x7F)
    ext = struct.pack("!HHBBBB", 0xBEDE, 1, AUDIO_LEVEL_EXT_ID << 4, level, 0, 0)
    return header + ext + src.packets[i]


class _Api:
    """The sidecar's gRPC control API: roster, start/end, caption stream."""

    def __init__(self, cfg: SimConfig, rec: _Recorder) -> None:
        self.cfg = cfg
        self.rec = rec
        self.channel = grpc.aio.insecure_channel(cfg.grpc)
        self.stub = pb_grpc.CaptionsStub(self.channel)
        self.md = ((_AUTH, f"Bearer {cfg.token}"),)
        self.call: Any = None
        self.reader: asyncio.Task[None] | None = None

    async def update_roster(self, sources: list[_Source], with_ssrcs: bool) -> None:
        people = [
            pb.Participant(id=s.endpoint, name=s.name, ssrcs=[s.ssrc] if with_ssrcs else [])
            for s in sources
        ]
        await self.stub.UpdateRoster(
            pb.UpdateRosterRequest(room=self.cfg.room, participants=people),
            metadata=self.md,
            timeout=10,
        )

    async def start_captions(self) -> None:
        await self.stub.StartCaptions(
            pb.StartRequest(room=self.cfg.room, requested_by="simulator"),
            metadata=self.md,
            timeout=10,
        )

    async def subscribe(self) -> None:
        self.call = self.stub.SubscribeCaptions(
            pb.SubscribeRequest(room=self.cfg.room, include_interims=True), metadata=self.md
        )
        self.reader = asyncio.create_task(self._read())
        # the server registers the subscriber when its handler runs, which a
        # client cannot observe (no message comes before the first caption):
        # give it a moment, or the first interims could go to nobody
        await asyncio.sleep(0.5)
        if self.reader.done():
            self.reader.result()  # raises the refusal (token, limits)

    async def _read(self) -> None:
        async for ev in self.call:
            self.rec.add(
                ReceivedCaption(
                    participant_id=ev.participant_id,
                    participant_name=ev.participant_name,
                    text=ev.text,
                    is_interim=ev.is_interim,
                    message_id=ev.message_id,
                    stability=ev.stability,
                    timestamp_ms=ev.timestamp_ms,
                    arrival=time.monotonic(),
                    wall=time.time(),
                    start_time_ms=ev.start_time_ms,
                    end_time_ms=ev.end_time_ms,
                )
            )

    async def end_room(self) -> None:
        await self.stub.EndRoom(pb.RoomRequest(room=self.cfg.room), metadata=self.md, timeout=60)
        if self.reader is not None:
            # EndRoom publishes the last finals, then closes the stream
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.reader), 10)

    async def close(self) -> None:
        if self.call is not None:
            self.call.cancel()
        if self.reader is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await self.reader
        await self.channel.close()


def _caption_from_json(
    data: dict[str, Any], arrival: float, wall: float, connection: int
) -> ReceivedCaption:
    participant = data["participant"]
    return ReceivedCaption(
        participant_id=str(participant["id"]),
        participant_name=str(participant.get("name", "")),
        text=str(data["transcript"][0]["text"]),
        is_interim=bool(data["is_interim"]),
        message_id=str(data["message_id"]),
        stability=float(data.get("stability", 0.0)),
        timestamp_ms=int(data.get("timestamp", 0)),
        arrival=arrival,
        wall=wall,
        connection=connection,
    )


def _with_room(url: str, room: str) -> str:
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    if room and "room" not in query:
        query["room"] = room
    return urlunsplit(parts._replace(query=urlencode(query)))


def _host_port(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"{addr!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


async def run_conference(config: SimConfig) -> SimReport:
    """Play the conference to the sidecar and measure what comes back.

    Raises ValueError for a bad configuration and the transport's error when
    the sidecar cannot be reached; a connection lost in the middle is
    reported in :attr:`SimReport.errors` with everything measured so far.
    """
    config.validate()
    cfg = replace(config)  # the room may be filled in from the URL; leave the caller's alone
    if not cfg.room and cfg.url:
        cfg.room = dict(parse_qsl(urlsplit(cfg.url).query)).get("room", "")
    media = await asyncio.to_thread(_prepare, cfg)
    timeline = _Timeline()
    rec = _Recorder(cfg.on_caption, timeline)
    errors: list[str] = []
    link: _Link = (
        _RtpLink(cfg) if cfg.transport == "rtp" else _MediaJsonLink(cfg, media.sources, rec)
    )
    api = _Api(cfg, rec) if cfg.grpc else None
    stats = Counter[str]()
    started = time.monotonic()
    opened = False
    try:
        if api is not None:
            if cfg.update_roster:
                await api.update_roster(media.sources, with_ssrcs=cfg.transport == "rtp")
            if cfg.transport == "rtp":
                # no bridge connects to switch the room on: the control API does
                await api.start_captions()
                await api.subscribe()
        await link.open()
        opened = True
        started = time.monotonic()
        try:
            await _pace(cfg, media, link, timeline, stats)
        except Exception as e:
            # the sidecar closed on us (limits, shutdown) or refused the
            # reconnect: what was measured so far is still worth a report
            log.warning("sim: sending stopped: %r", e)
            errors.append(f"sending stopped after {len(timeline.mono)} frames: {e!r}")
        await _drain(cfg, media, link, rec)
        if api is not None and cfg.transport == "rtp" and cfg.end_session:
            try:
                await api.end_room()
            except Exception as e:
                errors.append(f"EndRoom failed: {e!r}")
    finally:
        if opened:
            try:
                await link.finish(cfg.end_session and not errors)
            except Exception as e:
                errors.append(f"ending the session: {e!r}")
        if api is not None:
            await api.close()
    elapsed = time.monotonic() - started

    report = _report(cfg, media, rec.captions, timeline)
    report.elapsed = elapsed
    report.frames_sent = stats["sent"]
    report.frames_lost = stats["lost"]
    report.frames_duplicated = stats["duplicated"]
    report.pings, report.pongs_missed, report.pong_rtts_ms = link.ping_stats()
    report.pong_rtt_p50_ms = _percentile(report.pong_rtts_ms, 50)
    report.pong_rtt_p95_ms = _percentile(report.pong_rtts_ms, 95)
    report.reconnects = link.reconnects
    report.close_codes = list(link.close_codes)
    report.errors = errors
    return report


async def _pace(
    cfg: SimConfig, media: _Media, link: _Link, timeline: _Timeline, stats: Counter[str]
) -> None:
    """Release frame after frame through the impairments, in audio time.

    Every copy of a frame that is not lost gets a due time: its tick plus a
    network delay. A heap sends them in due order, so a delayed frame goes
    out after later ones (reordering). In real time the loop sleeps until
    each due time; as fast as possible it only keeps the order.
    """
    rng = random.Random(cfg.seed)
    heap: list[tuple[float, int, int, int]] = []  # (due, tiebreak, source, frame)
    order = itertools.count()
    jitter = cfg.jitter_ms / 1000
    n = media.frames
    reconnect_frame = (
        None if cfg.reconnect_at is None else max(0, min(n - 1, int(cfg.reconnect_at / FRAME_S)))
    )
    t0 = time.monotonic()
    timeline.wall0 = time.time()
    i = 0
    while i < n or heap:
        next_tick = i * FRAME_S if i < n else math.inf
        next_send = heap[0][0] if heap else math.inf
        if cfg.realtime:
            delay = t0 + min(next_tick, next_send) - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        if next_tick <= next_send:
            timeline.mono.append(time.monotonic())
            if i == reconnect_frame:
                await link.reconnect()
            await link.tick()
            for k in range(len(media.sources)):
                if rng.random() < cfg.loss:
                    stats["lost"] += 1
                    continue
                copies = 2 if rng.random() < cfg.duplicate else 1
                stats["duplicated"] += copies - 1
                for _ in range(copies):
                    # exponential queueing delay with the given mean, capped so
                    # that one unlucky draw cannot hold a frame for seconds
                    d = min(rng.expovariate(1 / jitter), 5 * jitter) if jitter > 0 else 0.0
                    heapq.heappush(heap, (next_tick + d, next(order), k, i))
            i += 1
            if not cfg.realtime:
                await asyncio.sleep(0)  # let the caption readers in
        else:
            _, _, k, j = heapq.heappop(heap)
            await link.send(media.sources[k], j)
            stats["sent"] += 1


async def _drain(cfg: SimConfig, media: _Media, link: _Link, rec: _Recorder) -> None:
    """Wait for the last finals after the audio.

    Done when every speaker has had as many finals as turns, none is
    pending (interims without their final) and nothing came for ``settle``
    seconds; or, when turns were merged or missed, after four times as long
    a quiet with nothing pending; at the latest after ``drain_timeout``.
    Pings go on meanwhile, as the bridge's do.
    """
    expected = Counter(t.speaker for t in media.truths)
    end = time.monotonic()
    deadline = end + cfg.drain_timeout
    while time.monotonic() < deadline:
        quiet = time.monotonic() - max(rec.last_arrival, end)
        complete = all(len(rec.final_ids.get(s, ())) >= n for s, n in expected.items())
        if not rec.open_ids and quiet >= cfg.settle * (1 if complete else 4):
            return
        # a socket that is gone only ends the pings; the finals that came count
        with contextlib.suppress(ConnectionError, RuntimeError, OSError):
            await link.tick()
        await asyncio.sleep(0.05)


# -- the report ----------------------------------------------------------------
def _report(
    cfg: SimConfig, media: _Media, captions: list[ReceivedCaption], timeline: _Timeline
) -> SimReport:
    for c in captions:
        c.t = timeline.audio_time(c.arrival)
        if c.start_time_ms and timeline.wall0 is not None:
            # the sidecar stamps utterances from the first frame's arrival,
            # which is within a network delay of our tick 0
            c.start_t = c.start_time_ms / 1000 - timeline.wall0
            c.end_t = (c.end_time_ms or c.start_time_ms) / 1000 - timeline.wall0

    names = {s.endpoint: s.name for s in media.sources}
    speakers = {t.speaker for t in media.truths}
    first_interim: dict[str, float] = {}
    finals_by_speaker: dict[str, list[ReceivedCaption]] = {}
    seen_final: set[str] = set()
    duplicates = unmatched = misnamed = 0
    for c in captions:
        if c.is_interim:
            first_interim.setdefault(c.message_id, c.arrival)
            continue
        if not c.text.strip():
            continue  # an utterance that came to nothing: no final to match
        if c.message_id in seen_final:
            duplicates += 1
            continue
        seen_final.add(c.message_id)
        if c.participant_id not in speakers:
            unmatched += 1
            continue
        if c.participant_name != names.get(c.participant_id):
            misnamed += 1
        finals_by_speaker.setdefault(c.participant_id, []).append(c)

    rows: list[UtteranceResult] = []
    count = Counter[str]()
    by_speaker: dict[str, list[UtteranceResult]] = {}
    for t in media.truths:
        row = UtteranceResult(
            speaker=t.speaker,
            name=t.name,
            index=count[t.speaker],
            start=round(t.start, 3),
            end=round(t.end, 3),
            reference=t.text,
            hypothesis="",
        )
        count[t.speaker] += 1
        rows.append(row)
        by_speaker.setdefault(t.speaker, []).append(row)

    stray = 0
    for sp, finals in finals_by_speaker.items():
        turns = by_speaker.get(sp, [])
        if turns and all(r.reference for r in turns):
            pairs = _align(turns, finals)
            stray += len(finals) - len({id(f) for _, f, _ in pairs})
        else:  # words unknown: by time alone, one utterance per final
            pairs = [(row, f, f.text.strip()) for row, f in _assign(turns, finals)]
        shared = Counter(id(f) for _, f, _ in pairs)
        for row, f, text in pairs:
            row.message_ids.append(f.message_id)
            row.names_seen.append(f.participant_name)
            row.hypothesis = f"{row.hypothesis} {text}".strip()
            row.merged |= shared[id(f)] > 1
            end = timeline.at(row.end)
            if end is not None:
                row.final_latency = f.arrival - end  # finals come in order: the last one counts
    for row in rows:
        firsts = [first_interim[m] for m in row.message_ids if m in first_interim]
        start = timeline.at(row.start)
        if firsts and start is not None:
            row.first_interim_latency = min(firsts) - start
        if row.reference is not None:
            row.wer = word_error_rate([row.reference], [row.hypothesis])

    speaker_wer: dict[str, float] = {}
    refs: list[str] = []
    hyps: list[str] = []
    endpoint_of = {s.name: s.endpoint for s in media.sources}
    for name, ref in media.reference_by_name.items():
        hyp = " ".join(f.text.strip() for f in finals_by_speaker.get(endpoint_of[name], []))
        w = word_error_rate([ref], [hyp])
        if w is not None:
            speaker_wer[name] = w
            refs.append(ref)
            hyps.append(hyp)

    final_lat = [r.final_latency for r in rows if not r.merged]
    merged_lat = [r.final_latency for r in rows if r.merged]
    first_lat = [r.first_interim_latency for r in rows]
    return SimReport(
        transport=cfg.transport,
        realtime=cfg.realtime,
        duration=media.frames * FRAME_S,
        elapsed=0.0,
        participants=[
            {"endpoint": s.endpoint, "name": s.name, "kind": s.kind, "ssrc": s.ssrc}
            for s in media.sources
        ],
        utterances=rows,
        captions=captions,
        final_latency_p50=_percentile(final_lat, 50),
        final_latency_p95=_percentile(final_lat, 95),
        first_interim_latency_p50=_percentile(first_lat, 50),
        first_interim_latency_p95=_percentile(first_lat, 95),
        wer=word_error_rate(refs, hyps) if refs else None,
        speaker_wer=speaker_wer,
        missed=sum(1 for r in rows if r.missed),
        merged=sum(1 for r in rows if r.merged),
        merged_final_latency_p95=_percentile(merged_lat, 95),
        stray_finals=stray,
        finals=len(seen_final),
        duplicate_finals=duplicates,
        unmatched_finals=unmatched,
        misnamed_finals=misnamed,
    )


def _assign(
    turns: list[UtteranceResult], finals: list[ReceivedCaption]
) -> list[tuple[UtteranceResult, ReceivedCaption]]:
    """Match one speaker's finals (in arrival order) to its turns, in order.

    With the utterance's own times (gRPC), a final goes to the turn it
    overlaps most, never back before the last one matched. Otherwise it goes
    to the current turn unless that one has a final already and is over;
    then to the next turn, if it had begun by the time the final came. A
    final that came while its turn was still being spoken is a piece of a
    long turn that the sidecar cut, so that turn stays open for the rest.
    With known words, a final that shares more of its words with the next
    turn (already begun) than with the current one moves on as well: the
    current turn's final never came, or two turns ran together.
    """
    out: list[tuple[UtteranceResult, ReceivedCaption]] = []
    if not turns:
        return out
    k = 0
    got: dict[int, list[ReceivedCaption]] = {}
    for f in finals:
        t = f.t if f.t is not None else math.inf
        if f.start_t is not None and f.end_t is not None:
            spans = [
                min(f.end_t, turns[j].end) - max(f.start_t, turns[j].start)
                for j in range(k, len(turns))
            ]
            best = max(range(len(spans)), key=spans.__getitem__)
            if spans[best] > 0:
                k += best
                got.setdefault(k, []).append(f)
                out.append((turns[k], f))
                continue
        if k in got:
            was_cut = all(g.t is not None and g.t < turns[k].end for g in got[k])
            if not was_cut and k + 1 < len(turns) and t >= turns[k + 1].start:
                k += 1
        while (
            k + 1 < len(turns)
            and turns[k + 1].start <= t
            and _overlap(f.text, turns[k + 1].reference) > _overlap(f.text, turns[k].reference)
        ):
            k += 1
        got.setdefault(k, []).append(f)
        out.append((turns[k], f))
    return out


# a final this long after an utterance ended is not that utterance's
MAX_FINAL_WAIT_S = 30.0


def _align(
    turns: list[UtteranceResult], finals: list[ReceivedCaption]
) -> list[tuple[UtteranceResult, ReceivedCaption, str]]:
    """Match one speaker's finals (in arrival order) to its utterances by words.

    Every utterance's words are known. Each final is aligned word by word
    (longest common blocks, in order) against the utterances it can be of:
    begun before it arrived, ended less than MAX_FINAL_WAIT_S before, not
    before the last utterance the previous final covered, and, with the
    utterance's own times (gRPC), overlapping them. The final covers every
    utterance that got enough of its words: a third of them, or half of the
    final's. Two utterances covered by one final were merged; the final's
    words are split between them where the alignment puts them. A final
    whose words match nothing goes to the earliest candidate still without
    a final, else the latest begun. Returns (utterance, final, its words
    for that utterance); an utterance no final covers is missed, a final no
    utterance can take is left out.
    """
    import difflib

    out: list[tuple[UtteranceResult, ReceivedCaption, str]] = []
    lo = 0
    served: set[int] = set()
    for f in finals:
        t = f.t if f.t is not None else math.inf
        cand = [
            j
            for j in range(lo, len(turns))
            if turns[j].start <= t + 0.1 and t - turns[j].end <= MAX_FINAL_WAIT_S
        ]
        if f.start_t is not None and f.end_t is not None:
            timed = [
                j
                for j in cand
                if min(f.end_t, turns[j].end) - max(f.start_t, turns[j].start) > -0.3
            ]
            cand = timed or cand
        if not cand:
            continue
        words = normalise(f.text).split()
        ref: list[str] = []
        owner: list[int] = []
        for j in cand:
            rw = normalise(turns[j].reference or "").split()
            ref += rw
            owner += [j] * len(rw)
        sm = difflib.SequenceMatcher(None, words, ref, autojunk=False)
        word_of: list[int | None] = [None] * len(words)
        matched = Counter[int]()
        for a, b, size in sm.get_matching_blocks():
            for i in range(size):
                word_of[a + i] = owner[b + i]
                matched[owner[b + i]] += 1
        covered = [
            j
            for j in cand
            if matched[j]
            >= max(
                1,
                min(
                    math.ceil(len(normalise(turns[j].reference or "").split()) / 3),
                    math.ceil(len(words) / 2),
                ),
            )
        ]
        if not covered:
            begun = [j for j in cand if turns[j].start <= t]
            unserved = [j for j in cand if j not in served and turns[j].end <= t]
            covered = [unserved[0] if unserved else (begun or cand)[-1]]
        if len(covered) == 1:
            parts = {covered[0]: f.text.strip()}
        else:
            split: dict[int, list[str]] = {j: [] for j in covered}
            cur = covered[0]
            for w, owner_j in zip(words, word_of, strict=True):
                if owner_j is not None and owner_j in split:
                    cur = owner_j
                split[cur].append(w)
            parts = {j: " ".join(ws) for j, ws in split.items()}
        for j, text in parts.items():
            out.append((turns[j], f, text))
            served.add(j)
        lo = max(covered)
    return out


def _overlap(text: str, reference: str | None) -> float:
    """Share of the caption's words that are in the reference (0 without one)."""
    if not reference:
        return 0.0
    words = normalise(text).split()
    ref = set(normalise(reference).split())
    return sum(1 for w in words if w in ref) / max(1, len(words))
