"""Reordering and loss handling for one stream of sequence-numbered frames.

Frames arrive over UDP or a WebSocket relay: duplicated, reordered, late or
missing. The buffer holds a few frames to put them back in order, drops the
duplicates and the ones that come after their slot was played out, and
reports gaps so that the timeline (and so caption times) stays right.
"""

from __future__ import annotations

from dataclasses import dataclass

from sidecar.events import Frame

SEQ_MOD = 1 << 16
# A jump this far (in frames) is a restarted sender, not loss: resync.
RESYNC_DISTANCE = 1000
# Never report more than this many lost frames at once (2 s): longer gaps
# are a sender that stopped (muted), not loss worth filling.
MAX_GAP_FRAMES = 100


@dataclass(slots=True)
class Gap:
    """``frames`` consecutive frames were lost before the next frame."""

    frames: int


class ReorderBuffer:
    """Puts frames back in sequence order with a bounded wait.

    ``push`` returns what can be played out now: frames in order, with
    :class:`Gap` markers where frames are missing. ``drain`` plays out
    everything held (the sender went quiet). Drop reasons are counted in
    ``dropped`` for the caller to export.
    """

    def __init__(self, depth: int = 3) -> None:
        self.depth = depth
        self._held: dict[int, Frame] = {}
        self._next: int | None = None  # unwrapped sequence of the next frame to play
        self._highest: int | None = None
        self.dropped: dict[str, int] = {"duplicate": 0, "late": 0}
        self.lost = 0
        self._played: set[int] = set()  # recent sequences, to tell duplicates from late frames

    def _unwrap(self, seq: int) -> int:
        seq %= SEQ_MOD
        if self._highest is None:
            return seq
        base = self._highest - (self._highest % SEQ_MOD)
        cand = base + seq
        # choose the candidate closest to the highest seen
        if cand - self._highest > SEQ_MOD // 2:
            cand -= SEQ_MOD
        elif self._highest - cand > SEQ_MOD // 2:
            cand += SEQ_MOD
        return cand

    def push(self, frame: Frame) -> list[Frame | Gap]:
        seq = self._unwrap(frame.sequence)
        if self._next is not None and abs(seq - self._next) > RESYNC_DISTANCE:
            out = self.drain()
            self._held.clear()
            self._played.clear()
            self._next = None
            self._highest = None
            seq = frame.sequence % SEQ_MOD
            self._held[seq] = frame
            self._next = seq
            self._highest = seq
            return out + self._release(force=False)
        if self._next is None:
            self._next = seq
        if seq == self._next and not self._held:
            # the common case, a frame in order with nothing waiting
            self._played.add(seq)
            self._played.discard(seq - 64)
            if len(self._played) > 128:  # lost frames leave holes the discard misses
                self._played = {x for x in self._played if x > seq - 64}
            self._next = seq + 1
            if self._highest is None or seq > self._highest:
                self._highest = seq
            return [frame]
        if seq < self._next:
            self.dropped["duplicate" if seq in self._played else "late"] += 1
            return []
        if seq in self._held:
            self.dropped["duplicate"] += 1
            return []
        self._held[seq] = frame
        if self._highest is None or seq > self._highest:
            self._highest = seq
        return self._release(force=False)

    def _release(self, force: bool) -> list[Frame | Gap]:
        out: list[Frame | Gap] = []
        assert self._next is not None or not self._held
        while self._held:
            assert self._next is not None
            if self._next in self._held:
                out.append(self._held.pop(self._next))
                self._played.add(self._next)
                self._played.discard(self._next - 64)
                self._next += 1
                continue
            if not force and len(self._held) <= self.depth:
                break
            # the missing frame has had its chance: play out the gap
            first = min(self._held)
            missing = first - self._next
            self.lost += missing
            out.append(Gap(min(missing, MAX_GAP_FRAMES)))
            self._next = first
        return out

    def drain(self) -> list[Frame | Gap]:
        """Everything held, in order (the sender paused or left)."""
        if not self._held:
            return []
        return self._release(force=True)

    @property
    def held(self) -> int:
        return len(self._held)
