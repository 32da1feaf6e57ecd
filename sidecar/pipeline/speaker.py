"""One participant's audio: reorder ▸ gate ▸ decode ▸ VAD ▸ segment ▸ recognise.

Runs on the event loop, so every step is cheap or skipped: frames the
sender marks as silent are not decoded and not run through the VAD, which
makes a silent listener cost a few microseconds a frame.

Two clocks, kept apart. The *audio timeline* (samples) is what the segmenter
sees: silence in it ends utterances. It grows with the audio received, with
the stretches an Opus sender skipped (an RTP timestamp jump with no sequence
gap: DTX, a sender's own silence suppression) and with frames lost in
transit. *Delivery* is wall clock: when audio arrives. A pause in delivery is
not silence: Jigasi sends 1.46 s per message, a TCP stall or a jittery link
holds frames and releases them in a burst. Only a sender that has been late
for longer than its usual delivery gap plus the end-of-utterance silence is
taken to have stopped (muted, gone), and only then does its missing audio
count as silence (``idle_check``).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from prometheus_client import Counter

from sidecar.asr.provider import RecognitionStream
from sidecar.audio import DecodeError, OpusDecoder, opus_packet_samples
from sidecar.counters import BatchedCounter, batched
from sidecar.events import Frame, new_message_id
from sidecar.pipeline.jitter import Gap, ReorderBuffer
from sidecar.pipeline.segmenter import (
    Audio,
    End,
    Pause,
    Resume,
    Segmenter,
    SegmenterConfig,
    Start,
)
from sidecar.pipeline.vad import WINDOW, SileroVad

log = logging.getLogger(__name__)

FRAMES_IN = Counter("captions_frames_received_total", "Audio frames received")
FRAMES_DROPPED = Counter(
    "captions_frames_dropped_total",
    "Audio frames dropped, by reason",
    ["reason"],
)
FRAMES_GATED = Counter(
    "captions_frames_gated_total", "Frames not decoded because the sender marked them silent"
)
FRAMES_LOST = Counter("captions_frames_lost_total", "Frames missing from a sequence (loss)")
UTTERANCES = Counter("captions_utterances_total", "Utterances found by the segmenter", ["end"])
_DROP_DUPLICATE = FRAMES_DROPPED.labels("duplicate")
_DROP_LATE = FRAMES_DROPPED.labels("late")
_FRAMES_IN = batched(FRAMES_IN)
_FRAMES_GATED = batched(FRAMES_GATED)
AUDIO_IN = Counter(
    "captions_audio_received_seconds_total",
    "Seconds of participant audio played out of the reorder buffer (gated silence included)",
    ["provider"],
)
_AUDIO_IN: dict[str, BatchedCounter] = {}


def _provider_name(stream: object) -> str:
    """The provider label the recogniser's own metrics use, whatever the stream
    (a provider stream, its Whisper wrapper, or a bare DecodingStream)."""
    for owner in (stream, getattr(stream, "provider", None), getattr(stream, "recognizer", None)):
        name = getattr(owner, "name", None) if owner is not None else None
        if isinstance(name, str) and name:
            return name
    return "none"


def _audio_in(provider: str) -> BatchedCounter:
    c = _AUDIO_IN.get(provider)
    if c is None:
        c = _AUDIO_IN[provider] = batched(AUDIO_IN.labels(provider))
    return c


SR = 16000
TICKS_PER_SAMPLE = 3  # 48 kHz RTP clock / 16 kHz
DEFAULT_FRAME_SAMPLES = 320  # 20 ms
PRE_ROLL_FRAMES = 10  # gated frames kept to decode when speech starts
MAX_OPEN_UTTERANCES = 64
# sum of squares of a 512-sample window below which it is silence (-60 dBFS RMS)
ENERGY_FLOOR = 512 * 1e-6
# Delivery. A sender is late once nothing came for its usual gap between
# arrivals (the longest in the last DELIVERY_MEMORY_S, at least one frame's
# duration, at most MAX_DELIVERY_GAP_S) plus QUIET_SLACK_S; it has stopped
# once it is late by the end-of-utterance silence as well.
QUIET_SLACK_S = 0.3
MAX_DELIVERY_GAP_S = 3.0
DELIVERY_MEMORY_S = 30.0
GAP_NOTED_S = 0.05  # shorter gaps between arrivals are not worth remembering
TS_MOD = 1 << 32
MAX_TS_JUMP = 48000 * 60  # a longer jump of the RTP clock is a restarted sender


@dataclass(frozen=True, kw_only=True)
class GateConfig:
    # RFC 6464 level is -dBov: 0 is loudest, 127 silence. At or above this
    # the frame is silence when the sender gives no voice flag.
    silent_level: float = 80.0
    max_frame_bytes: int = 4000


@dataclass(slots=True)
class UtteranceTimes:
    start_sample: int
    end_sample: int


class SpeakerPipeline:
    def __init__(
        self,
        participant_id: str,
        *,
        vad: SileroVad,
        stream: RecognitionStream,
        segmenter: SegmenterConfig,
        gate: GateConfig | None = None,
        epoch_ms: float | None = None,
        on_utterance_start: Callable[[str], None] | None = None,
    ) -> None:
        self.participant_id = participant_id
        self.vad = vad
        self.vad_state = vad.new_state()
        self.stream = stream
        self.seg = Segmenter(segmenter)
        self.gate = gate or GateConfig()
        self.reorder = ReorderBuffer()
        self.decoder = OpusDecoder()
        self.epoch_ms = time.time() * 1000 if epoch_ms is None else epoch_ms
        self.clock = 0  # samples played out so far
        self._window = np.zeros(0, np.float32)
        self._window_start = 0
        self._gated: deque[Frame] = deque()
        self._frame_samples = DEFAULT_FRAME_SAMPLES
        self._utt_id: str | None = None
        self.times: dict[str, UtteranceTimes] = {}
        self._carry = np.zeros(0, np.float32)  # audio past a forced cut
        self._utt_audio: list[np.ndarray] = []
        self.last_arrival = time.monotonic()
        self.on_utterance_start = on_utterance_start
        self.frames = 0
        self._epoch_given = epoch_ms is not None
        # delivery: recent (arrival, gap before it) and the last frame's length
        self._gaps: deque[tuple[float, float]] = deque(maxlen=32)
        self._last_frame_s = DEFAULT_FRAME_SAMPLES / SR
        self._quiet = False  # idle_check took the sender for stopped
        self._resumed = False  # the frame being played is the first after that
        self._next_ts: int | None = None  # RTP timestamp the next Opus frame should have
        self._last_seq: int | None = None  # sequence of the last Opus frame played
        self._audio_in = _audio_in(_provider_name(stream))

    # -- time --------------------------------------------------------------
    def sample_to_epoch_ms(self, sample: int) -> int:
        return int(self.epoch_ms + sample * 1000 / SR)

    # -- input -------------------------------------------------------------
    def push(self, frame: Frame) -> None:
        """Accept one frame. Never raises for bad input: it is counted and dropped."""
        _FRAMES_IN.inc()
        self.frames += 1
        now = time.monotonic()
        # after idle_check took the sender for stopped, that silence was real:
        # the gap is not a delivery gap, and it has been counted already
        self._resumed = self._quiet
        if not self._quiet and now - self.last_arrival > GAP_NOTED_S:
            self._gaps.append((now, now - self.last_arrival))
        self._quiet = False
        self.last_arrival = now
        if frame.pcm is not None:
            self._last_frame_s = int(np.size(frame.pcm)) / SR  # type: ignore[arg-type]
        else:
            self._last_frame_s = self._frame_samples / SR
        if self.frames == 1 and not self._epoch_given:
            # a frame arrives when its audio has been spoken: the stream began
            # one frame's duration earlier (1.46 s for Jigasi's messages)
            self.epoch_ms -= self._last_frame_s * 1000
        if frame.pcm is None and len(frame.payload) > self.gate.max_frame_bytes:
            FRAMES_DROPPED.labels("oversized").inc()
            return
        if frame.pcm is None and not frame.payload:
            FRAMES_DROPPED.labels("empty").inc()
            return
        dropped = self.reorder.dropped
        dup, late, lost = dropped["duplicate"], dropped["late"], self.reorder.lost
        out = self.reorder.push(frame)
        # counters are touched only when something happened: this runs per frame
        if dropped["duplicate"] != dup:
            _DROP_DUPLICATE.inc(dropped["duplicate"] - dup)
        if dropped["late"] != late:
            _DROP_LATE.inc(dropped["late"] - late)
        if self.reorder.lost != lost:
            FRAMES_LOST.inc(self.reorder.lost - lost)
        for item in out:
            self._play(item)
        self._resumed = False

    def drain(self) -> None:
        """The sender went quiet or left: play out what the reorder buffer holds."""
        for item in self.reorder.drain():
            self._play(item)

    def _play(self, item: Frame | Gap) -> None:
        if isinstance(item, Gap):
            samples = item.frames * self._frame_samples
            if self._next_ts is not None:
                # the lost frames' span is filled here, not again as a jump
                self._next_ts = (self._next_ts + samples * TICKS_PER_SAMPLE) % TS_MOD
            self._last_seq = None  # the next frame's sequence follows the gap
            if not self.seg.in_speech:
                # after a reconnect the idle check has already brought the
                # clock to wall time: do not count the outage twice
                self._advance_idle(self._not_yet_counted(samples))
                return
            self._silence(samples)
            return
        frame = item
        if frame.pcm is not None:
            pcm = np.asarray(frame.pcm, dtype=np.float32).reshape(-1)
            self._audio_in.inc(len(pcm) / SR)
            self._flush_gated(decode=True)
            self._audio(pcm)
            return
        try:
            samples = opus_packet_samples(frame.payload) // TICKS_PER_SAMPLE
        except DecodeError:
            FRAMES_DROPPED.labels("corrupt").inc()
            self._silence(self._frame_samples)
            return
        self._frame_samples = samples
        if self._last_seq is not None and (frame.sequence - self._last_seq) % 65536 != 1:
            self._next_ts = None  # a restarted sender (resync): a new RTP clock
        self._last_seq = frame.sequence % 65536
        self._timestamp(frame.timestamp, samples)
        self._audio_in.inc(samples / SR)
        if self._is_silent(frame):
            _FRAMES_GATED.inc()
            if self.seg.in_speech:
                # the speaker stopped: time passes as silence for the segmenter
                self._silence(samples, known=True)
            else:
                self._gated.append(frame)
                if len(self._gated) > PRE_ROLL_FRAMES:
                    self._gated.popleft()
                    # frames of one stream have the same duration, near enough
                    self._advance_idle(samples)
            return
        self._flush_gated(decode=True)
        self._decode_and_feed(frame, samples)

    def _timestamp(self, ts: int, samples: int) -> None:
        """An RTP timestamp past the expected one, with no frame missing: the
        sender sent nothing for that stretch (DTX, silence suppression, a
        mute on the same stream). That is silence in the audio."""
        expected, self._next_ts = self._next_ts, (ts + samples * TICKS_PER_SAMPLE) % TS_MOD
        if expected is None:
            return
        ahead = (ts - expected) % TS_MOD
        if ahead == 0 or ahead > MAX_TS_JUMP:
            return  # in step, behind (a resend) or a restarted sender
        skipped = ahead // TICKS_PER_SAMPLE
        if self._resumed:
            # idle_check has already counted the time the sender was gone
            skipped = self._not_yet_counted(skipped)
        if not skipped:
            return
        if self.seg.in_speech:
            # enough silence to end the utterance goes through the segmenter
            head = min(skipped, self.seg.config.silence_ms * SR // 1000 + WINDOW)
            self._silence(head, known=True)
            skipped -= head
        if skipped:
            self._flush_gated(decode=False)
            self._advance_idle(skipped)

    def _not_yet_counted(self, samples: int) -> int:
        """Of ``samples`` just missed, those the clock has not yet moved past wall time for."""
        wall = (time.time() * 1000 - self.epoch_ms) * SR / 1000
        return int(min(samples, max(0.0, wall - self.clock)))

    def _samples_of(self, frame: Frame) -> int:
        try:
            return opus_packet_samples(frame.payload) // TICKS_PER_SAMPLE
        except DecodeError:
            return self._frame_samples

    def _is_silent(self, frame: Frame) -> bool:
        if frame.voice is not None:
            return not frame.voice
        if frame.level_dbov is not None:
            return frame.level_dbov >= self.gate.silent_level
        return False

    def _flush_gated(self, decode: bool) -> None:
        while self._gated:
            f = self._gated.popleft()
            if decode:
                self._decode_and_feed(f, self._samples_of(f))
            else:
                self._advance_idle(self._samples_of(f))

    def _decode_and_feed(self, frame: Frame, samples: int) -> None:
        try:
            pcm = self.decoder.decode(frame.payload)
        except DecodeError:
            FRAMES_DROPPED.labels("corrupt").inc()
            self.decoder = OpusDecoder()  # a fresh state after garbage
            pcm = np.zeros(samples, np.float32)
        self._audio(pcm)

    def _advance_idle(self, samples: int) -> None:
        """Silence while no utterance is open: only the clock moves."""
        if len(self._window):
            self._flush_window()
        self.clock += samples
        self._window_start = self.clock

    def _silence(self, samples: int, known: bool = False) -> None:
        if not self.seg.in_speech and known:
            self._advance_idle(samples)
            return
        self._audio(np.zeros(samples, np.float32), known_silent=known)

    # -- windows -> VAD -> segmenter -----------------------------------------
    def _audio(self, pcm: np.ndarray, known_silent: bool = False) -> None:
        buf = np.concatenate([self._window, pcm]) if len(self._window) else pcm
        i = 0
        while len(buf) - i >= WINDOW:
            w = buf[i : i + WINDOW]
            start = self._window_start
            if known_silent or float(np.dot(w, w)) < ENERGY_FLOOR:
                # near-digital silence: the VAD model would say no anyway
                prob = 0.0
            else:
                prob = self.vad.prob(self.vad_state, w)
            self._window_start += WINDOW
            self._segment(w, prob, start)
            i += WINDOW
        self._window = buf[i:].copy()
        self.clock += len(pcm)

    def _flush_window(self) -> None:
        if len(self._window):
            pad = np.zeros(WINDOW - len(self._window), np.float32)
            w = np.concatenate([self._window, pad])
            self._window = np.zeros(0, np.float32)
            start = self._window_start
            self._window_start += WINDOW
            self.clock += len(pad)
            self._segment(w, self.vad.prob(self.vad_state, w), start)

    def _segment(self, window: np.ndarray, prob: float, start: int) -> None:
        for ev in self.seg.feed(window, prob, start):
            self._on_event(ev)

    def _on_event(self, ev: object) -> None:
        if isinstance(ev, Start):
            utt_id = new_message_id()
            self._utt_id = utt_id
            audio = self._carry if ev.continued else ev.audio
            self._carry = np.zeros(0, np.float32)
            self._utt_audio = [audio]
            self.times[utt_id] = UtteranceTimes(ev.start_sample, ev.start_sample + len(audio))
            # utterances that end without a final (noise) leave their entry:
            # keep only the newest, a final is never that far behind
            while len(self.times) > MAX_OPEN_UTTERANCES:
                del self.times[next(iter(self.times))]
            self.stream.begin(utt_id, audio)
            if self.on_utterance_start is not None:
                self.on_utterance_start(utt_id)
        elif isinstance(ev, Audio):
            self._utt_audio.append(ev.audio)
            if self._utt_id is not None:
                self.times[self._utt_id].end_sample += len(ev.audio)
            self.stream.push(ev.audio)
        elif isinstance(ev, Pause):
            self.stream.pause()
        elif isinstance(ev, Resume):
            self.stream.resume()
        elif isinstance(ev, End):
            UTTERANCES.labels(ev.reason).inc()
            if ev.reason == "max_length":
                audio = np.concatenate(self._utt_audio) if self._utt_audio else np.zeros(0)
                self._carry = audio[ev.keep_samples :].astype(np.float32)
            self._utt_audio = []
            if self._utt_id is not None:
                t = self.times[self._utt_id]
                t.end_sample = min(t.end_sample, ev.speech_end_sample)
                if ev.reason == "max_length":
                    t.end_sample = t.start_sample + ev.keep_samples
            self.stream.end(
                ev.keep_samples, discard=ev.reason == "too_short", voiced_ms=ev.voiced_ms
            )
            self._utt_id = None

    # -- lifecycle ---------------------------------------------------------
    def delivery_gap(self, now: float) -> float:
        """The longest gap between arrivals this sender has shown lately (seconds)."""
        while self._gaps and now - self._gaps[0][0] > DELIVERY_MEMORY_S:
            self._gaps.popleft()
        longest = max((g for _, g in self._gaps), default=0.0)
        return min(MAX_DELIVERY_GAP_S, max(self._last_frame_s, longest))

    def quiet_after(self, now: float, silence_ms: int) -> float:
        """Seconds without an arrival after which the sender has stopped."""
        return self.delivery_gap(now) + QUIET_SLACK_S + max(0.1, silence_ms / 1000)

    def idle_check(self, now: float, silence_ms: int) -> None:
        """Called periodically: a sender that stopped sending mid-utterance
        (muted, left) must still get its final.

        A gap in delivery as long as the sender's usual ones is no sign of
        that: the audio of the gap is still to come (see the module doc).
        """
        if now - self.last_arrival < self.quiet_after(now, silence_ms):
            return
        self._quiet = True
        self._resumed = False
        self.drain()
        if self.seg.in_speech:
            self._audio(np.zeros(silence_ms * SR // 1000 + WINDOW, np.float32), known_silent=True)
        # bring the clock up to wall time so later captions keep true times
        wall = (time.time() * 1000 - self.epoch_ms) * SR / 1000
        if wall > self.clock:
            self._flush_window()
            self.clock = int(wall)
            self._window_start = self.clock
        self.last_arrival = now

    def finish(self) -> None:
        """End of the stream: the open utterance gets its final."""
        self.drain()
        self._flush_gated(decode=True)
        self._flush_window()
        for ev in self.seg.flush():
            self._on_event(ev)

    def reconfigure(self, segmenter: SegmenterConfig) -> None:
        self.seg.reconfigure(segmenter)
