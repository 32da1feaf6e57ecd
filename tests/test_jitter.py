"""Tests of the reorder buffer: order, duplicates, late frames, gaps, wrap and restarts."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.events import Frame
from sidecar.pipeline.jitter import MAX_GAP_FRAMES, SEQ_MOD, Gap, ReorderBuffer


def frame(seq: int) -> Frame:
    return Frame(payload=bytes([seq & 0xFF]), sequence=seq % SEQ_MOD, timestamp=seq * 960)


def show(items: list[Frame | Gap]) -> list[int | str]:
    """Played-out frames as their sequence numbers, gaps as 'gap:N'."""
    return [f"gap:{i.frames}" if isinstance(i, Gap) else i.sequence for i in items]


def push_all(buf: ReorderBuffer, seqs: list[int]) -> list[int | str]:
    out: list[Frame | Gap] = []
    for s in seqs:
        out += buf.push(frame(s))
    return show(out)


def test_in_order_frames_pass_straight_through() -> None:
    buf = ReorderBuffer(depth=3)
    for s in range(10):
        assert show(buf.push(frame(s))) == [s]
        assert buf.held == 0
    assert buf.dropped == {"duplicate": 0, "late": 0}
    assert buf.lost == 0


def test_played_out_frame_is_the_pushed_object() -> None:
    buf = ReorderBuffer()
    f = frame(7)
    assert buf.push(f) == [f]


def test_reordering_within_depth_is_repaired_without_loss() -> None:
    buf = ReorderBuffer(depth=3)
    assert show(buf.push(frame(0))) == [0]
    # 1 is late: 2 and 3 wait for it instead of being played early
    assert show(buf.push(frame(2))) == []
    assert show(buf.push(frame(3))) == []
    assert buf.held == 2
    assert show(buf.push(frame(1))) == [1, 2, 3]
    assert show(buf.push(frame(4))) == [4]
    assert buf.lost == 0
    assert buf.dropped == {"duplicate": 0, "late": 0}


def test_duplicate_of_a_played_frame_is_dropped_as_duplicate() -> None:
    buf = ReorderBuffer(depth=3)
    assert push_all(buf, [0, 1, 2]) == [0, 1, 2]
    assert show(buf.push(frame(1))) == []
    assert show(buf.push(frame(2))) == []
    assert buf.dropped == {"duplicate": 2, "late": 0}
    assert show(buf.push(frame(3))) == [3]


def test_duplicate_of_a_held_frame_is_dropped_as_duplicate() -> None:
    buf = ReorderBuffer(depth=3)
    assert push_all(buf, [0, 2, 2]) == [0]
    assert buf.held == 1
    assert buf.dropped == {"duplicate": 1, "late": 0}
    # the held copy is played once
    assert push_all(buf, [1]) == [1, 2]


def test_frame_arriving_after_its_slot_was_played_as_gap_is_late() -> None:
    buf = ReorderBuffer(depth=2)
    assert push_all(buf, [0, 2, 3]) == [0]
    # a third frame waiting: frame 1 has had its chance
    assert push_all(buf, [4]) == ["gap:1", 2, 3, 4]
    assert push_all(buf, [1]) == []
    assert buf.dropped == {"duplicate": 0, "late": 1}
    assert buf.lost == 1


def test_gap_reports_the_number_of_missing_frames() -> None:
    buf = ReorderBuffer(depth=3)
    assert push_all(buf, [10, 15, 16, 17]) == [10]
    assert push_all(buf, [18]) == ["gap:4", 15, 16, 17, 18]
    assert buf.lost == 4


def test_several_gaps_are_each_reported() -> None:
    buf = ReorderBuffer(depth=1)
    out = push_all(buf, [0, 2, 3, 6, 7, 8])
    assert out == [0, "gap:1", 2, 3, "gap:2", 6, 7, 8]
    assert buf.lost == 3


def test_long_gap_is_capped_but_counted_in_full() -> None:
    buf = ReorderBuffer(depth=3)
    push_all(buf, [0])
    out = push_all(buf, [500]) + show(buf.drain())
    assert out == [f"gap:{MAX_GAP_FRAMES}", 500]
    assert buf.lost == 499


def test_sequence_wraps_around_at_16_bits() -> None:
    buf = ReorderBuffer(depth=3)
    seqs = [65533, 65534, 65535, 0, 1, 2]
    assert push_all(buf, seqs) == seqs
    assert buf.lost == 0
    assert buf.dropped == {"duplicate": 0, "late": 0}


def test_reordering_across_the_wrap_is_repaired() -> None:
    buf = ReorderBuffer(depth=3)
    assert push_all(buf, [65534, 0, 65535, 1]) == [65534, 65535, 0, 1]
    assert buf.lost == 0


def test_gap_across_the_wrap_has_the_right_size() -> None:
    buf = ReorderBuffer(depth=2)
    assert push_all(buf, [65535, 2, 3, 4]) == [65535, "gap:2", 2, 3, 4]
    assert buf.lost == 2


def test_late_frame_across_the_wrap_is_late_not_a_new_stream() -> None:
    buf = ReorderBuffer(depth=1)
    assert push_all(buf, [65534, 0, 1]) == [65534, "gap:1", 0, 1]
    assert push_all(buf, [65535]) == []
    assert buf.dropped["late"] == 1
    assert push_all(buf, [2]) == [2]


def test_sender_restart_resyncs_without_a_giant_gap() -> None:
    buf = ReorderBuffer(depth=3)
    assert push_all(buf, [100, 101, 102]) == [100, 101, 102]
    out = push_all(buf, [40000, 40001, 40002])
    assert out == [40000, 40001, 40002]
    assert buf.lost == 0
    assert buf.dropped == {"duplicate": 0, "late": 0}


def test_sender_restart_to_a_lower_sequence_resyncs() -> None:
    buf = ReorderBuffer(depth=3)
    assert push_all(buf, [20000, 20001]) == [20000, 20001]
    assert push_all(buf, [5, 6, 7]) == [5, 6, 7]
    assert buf.dropped == {"duplicate": 0, "late": 0}
    assert buf.lost == 0


def test_sender_restart_plays_out_what_was_held_first() -> None:
    buf = ReorderBuffer(depth=3)
    assert push_all(buf, [0, 2, 3]) == [0]
    out = push_all(buf, [30000])
    assert out == ["gap:1", 2, 3, 30000]
    assert buf.held == 0
    assert push_all(buf, [30001]) == [30001]


def test_drain_plays_out_held_frames_in_order() -> None:
    buf = ReorderBuffer(depth=5)
    assert push_all(buf, [0, 4, 2, 3]) == [0]
    assert buf.held == 3
    assert show(buf.drain()) == ["gap:1", 2, 3, 4]
    assert buf.held == 0
    assert buf.drain() == []
    # the stream goes on after the drain
    assert push_all(buf, [5, 6]) == [5, 6]


def test_drain_of_an_empty_buffer_is_empty() -> None:
    assert ReorderBuffer().drain() == []


@st.composite
def jittered(draw: st.DrawFn) -> tuple[int, int, list[int]]:
    """(depth, first sequence, arrival order): every frame is delayed by at most
    depth + 1 slots, so no more than ``depth`` later frames overtake it."""
    depth = draw(st.integers(min_value=1, max_value=6))
    start = draw(st.integers(min_value=0, max_value=SEQ_MOD - 1))
    n = draw(st.integers(min_value=1, max_value=60))
    delays = draw(st.lists(st.integers(0, depth + 1), min_size=n, max_size=n))
    delays[0] = 0  # the first frame of the stream arrives first: it anchors the sequence
    order = sorted(range(n), key=lambda i: (i + delays[i], i))
    return depth, start, [start + i for i in order]


@settings(max_examples=300, deadline=None)
@given(jittered())
def test_any_reordering_within_depth_comes_out_in_order_with_nothing_lost(
    case: tuple[int, int, list[int]],
) -> None:
    depth, start, arrivals = case
    buf = ReorderBuffer(depth=depth)
    out: list[Frame | Gap] = []
    for s in arrivals:
        out += buf.push(frame(s))
    out += buf.drain()
    expected = [(start + i) % SEQ_MOD for i in range(len(arrivals))]
    assert show(out) == expected
    assert buf.lost == 0
    assert buf.dropped == {"duplicate": 0, "late": 0}


@settings(max_examples=200, deadline=None)
@given(
    st.integers(min_value=1, max_value=6),
    st.lists(st.integers(min_value=0, max_value=80), min_size=1, max_size=120),
)
def test_output_is_always_increasing_and_accounts_for_every_frame(
    depth: int, offsets: list[int]
) -> None:
    """Whatever arrives (duplicates, loss, disorder): frames come out strictly
    in order, each at most once, and every pushed frame is played, dropped or
    held."""
    buf = ReorderBuffer(depth=depth)
    out: list[Frame | Gap] = []
    for o in offsets:
        out += buf.push(frame(1000 + o))
    held = buf.held
    out += buf.drain()
    played = [i.sequence for i in out if isinstance(i, Frame)]
    assert played == sorted(set(played))
    assert len(played) + sum(buf.dropped.values()) == len(offsets)
    assert held <= depth
    if played:
        gaps = sum(i.frames for i in out if isinstance(i, Gap))
        # every slot between the first and last played frame is a frame or a gap
        assert len(played) + gaps == played[-1] - played[0] + 1
