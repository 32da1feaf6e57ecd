"""Tests of stable interim captions: committed words never change."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.asr.stable import StablePrefix


def test_first_hypothesis_is_shown_unstable() -> None:
    sp = StablePrefix()
    text, stability = sp.update("hello world")
    assert text == "hello world"
    assert stability == 0.0
    assert sp.committed == []


def test_words_two_decodes_agree_on_become_stable_except_the_last() -> None:
    sp = StablePrefix()
    sp.update("hello world")
    text, stability = sp.update("hello world how")
    assert text == "hello world how"
    assert sp.committed == ["hello", "world"]
    assert stability == 2 / 3


def test_last_word_is_not_committed_even_when_repeated() -> None:
    sp = StablePrefix()
    sp.update("hello")
    _, stability = sp.update("hello")
    assert sp.committed == []
    assert stability == 0.0


def test_agreement_ignores_case_and_punctuation() -> None:
    sp = StablePrefix()
    sp.update("Hello, world")
    sp.update("hello world again")
    assert sp.committed == ["hello", "world"]


def test_committed_words_survive_a_changed_decode() -> None:
    sp = StablePrefix()
    sp.update("the cat sat")
    sp.update("the cat sat on")  # the cat sat: committed
    text, _ = sp.update("a cat sat on the mat")
    assert text.startswith("the cat sat")
    assert sp.text.split() == sp.committed


def test_shorter_decode_keeps_the_committed_words() -> None:
    sp = StablePrefix()
    sp.update("one two three four")
    sp.update("one two three four five")
    text, stability = sp.update("one")
    assert text == "one two three four"
    assert stability == 1.0


def test_inserted_word_does_not_duplicate_the_next_word() -> None:
    sp = StablePrefix()
    outs = [
        sp.update(h)[0] for h in ["And Mr.", "And Mr. Dashwood.", "And Mr. John Dashwood had then"]
    ]
    assert outs[-1].startswith("And Mr.")
    for out in outs:
        words = [w.strip(".").lower() for w in out.split()]
        assert all(a != b for a, b in zip(words, words[1:], strict=False)), out
    assert "Dashwood Dashwood" not in outs[-1]
    assert outs[-1].endswith("had then")


def test_word_inserted_into_the_committed_part_is_not_shown_twice() -> None:
    sp = StablePrefix()
    sp.update("And Mr. Dashwood")
    sp.update("And Mr. Dashwood had")
    assert sp.committed == ["And", "Mr.", "Dashwood"]
    text, _ = sp.update("And Mr. John Dashwood had then")
    assert text == "And Mr. Dashwood had then"
    assert text.lower().count("dashwood") == 1


def test_dropped_word_in_the_committed_part_does_not_repeat_the_tail() -> None:
    sp = StablePrefix()
    sp.update("we went to the old mill")
    sp.update("we went to the old mill today")
    text, _ = sp.update("we went to old mill today and")
    assert text == "we went to the old mill today and"


_VOCAB = ["the", "a", "cat", "sat", "on", "mat", "The", "cat.", "mat,"]

hypotheses = st.lists(
    st.lists(st.sampled_from(_VOCAB), max_size=12).map(" ".join), min_size=1, max_size=15
)


@settings(max_examples=300, deadline=None)
@given(hypotheses)
def test_committed_words_are_never_rewritten(hyps: list[str]) -> None:
    sp = StablePrefix()
    committed: list[list[str]] = []
    for h in hyps:
        text, stability = sp.update(h)
        out = text.split()
        assert 0.0 <= stability <= 1.0
        # every earlier step's committed words still open the caption
        for prev in committed:
            assert out[: len(prev)] == prev
        committed.append(list(sp.committed))
        assert out[: len(sp.committed)] == sp.committed
        assert stability == (len(sp.committed) / len(out) if out else 0.0)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(_VOCAB), min_size=1, max_size=20), st.data())
def test_growing_transcript_converges_to_the_decoded_words(
    words: list[str], data: st.DataObject
) -> None:
    """Decodes of a growing utterance that agree with each other: the caption
    is exactly the latest decode, and all but its last word end up stable."""
    sp = StablePrefix()
    cuts = sorted(data.draw(st.lists(st.integers(1, len(words)), max_size=6)))
    text = ""
    for n in [*cuts, len(words), len(words)]:
        text, stability = sp.update(" ".join(words[:n]))
        assert text == " ".join(words[:n])
        assert 0.0 <= stability <= 1.0
    assert sp.committed == words[:-1]
