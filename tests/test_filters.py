"""Tests of the hallucination filters applied to Whisper decodes."""

from __future__ import annotations

import pytest

from sidecar.asr.filters import DecodeResult, FilterConfig, clean, collapse_repeats


def confident(text: str, compression_ratio: float = 1.0) -> DecodeResult:
    return DecodeResult(
        text, avg_logprob=-0.2, no_speech_prob=0.02, compression_ratio=compression_ratio
    )


@pytest.mark.parametrize(
    "text",
    [
        "[BLANK_AUDIO]",
        " [BLANK_AUDIO] ",
        "(music)",
        "(Music playing)",
        "♪",
        "♪♪",
        " ♪ ",
        "*sigh*",
        "[Applause]",
        "...",
        "",
        "   ",
    ],
)
def test_non_speech_markers_are_dropped(text: str) -> None:
    assert clean(confident(text), speech_ms=2000) == ""


def test_high_no_speech_with_low_logprob_is_dropped() -> None:
    r = DecodeResult("The weather is nice today.", avg_logprob=-1.2, no_speech_prob=0.8)
    assert clean(r, speech_ms=2000) == ""


def test_high_no_speech_alone_keeps_confident_text() -> None:
    r = DecodeResult("The weather is nice today.", avg_logprob=-0.3, no_speech_prob=0.8)
    assert clean(r, speech_ms=2000) == "The weather is nice today."


def test_very_low_logprob_is_dropped_whatever_the_no_speech_probability() -> None:
    r = DecodeResult("Some garbled words here.", avg_logprob=-1.8, no_speech_prob=0.0)
    assert clean(r, speech_ms=2000) == ""


def test_thresholds_come_from_the_config() -> None:
    r = DecodeResult("Some words here.", avg_logprob=-1.8, no_speech_prob=0.0)
    assert clean(r, speech_ms=2000, cfg=FilterConfig(min_logprob=-2.0)) == "Some words here."


def test_confident_real_text_is_kept_stripped() -> None:
    r = confident("  We will meet again on Tuesday at ten.  ")
    assert clean(r, speech_ms=2500) == "We will meet again on Tuesday at ten."


def test_text_with_a_bracketed_aside_is_kept() -> None:
    r = confident("I said (quietly) that we should go.")
    assert clean(r, speech_ms=2500) == "I said (quietly) that we should go."


@pytest.mark.parametrize(
    ("speech_ms", "no_speech", "logprob"),
    [
        (200, 0.02, -0.2),  # too short to be a real "thank you"
        (1200, 0.4, -0.2),  # the model itself doubts there is speech
        (1200, 0.02, -0.9),  # decoded without confidence
    ],
)
def test_phantom_thank_you_is_dropped_when_unsupported(
    speech_ms: int, no_speech: float, logprob: float
) -> None:
    r = DecodeResult("Thank you.", avg_logprob=logprob, no_speech_prob=no_speech)
    assert clean(r, speech_ms=speech_ms) == ""


def test_confident_thank_you_is_kept() -> None:
    r = DecodeResult("Thank you.", avg_logprob=-0.3, no_speech_prob=0.05)
    assert clean(r, speech_ms=900) == "Thank you."


@pytest.mark.parametrize(
    "text", ["Thanks for watching!", "Please subscribe.", "you", "Bye-bye.", "Okay."]
)
def test_other_phantom_phrases_are_dropped_on_short_audio(text: str) -> None:
    assert clean(confident(text), speech_ms=150) == ""


@pytest.mark.parametrize(
    ("text", "logprob", "no_speech"),
    # what tiny.en gives for a lone espeak-ng reply: right, but doubtful
    [("Thanks.", -0.42, 0.32), ("Okay.", -0.63, 0.28), ("Bye!", -0.28, 0.21)],
)
def test_a_short_reply_the_vad_heard_keeps_its_caption(
    text: str, logprob: float, no_speech: float
) -> None:
    r = DecodeResult(text, avg_logprob=logprob, no_speech_prob=no_speech)
    assert clean(r, speech_ms=500, voiced_ms=320) == text
    # without the VAD's word (interims) or with little voiced audio: the old guard
    assert clean(r, speech_ms=500) == ""
    assert clean(r, speech_ms=500, voiced_ms=96) == ""


def test_a_phantom_on_voiced_audio_is_still_dropped_when_whisper_doubts_it() -> None:
    assert clean(DecodeResult("Thank you.", -1.3, 0.3), speech_ms=900, voiced_ms=600) == ""
    assert clean(DecodeResult("Thank you.", -0.3, 0.8), speech_ms=900, voiced_ms=600) == ""


def test_phantom_phrase_inside_a_real_sentence_is_kept() -> None:
    r = DecodeResult("Thank you for the report, Anna.", avg_logprob=-0.9, no_speech_prob=0.3)
    assert clean(r, speech_ms=300) == "Thank you for the report, Anna."


def test_repeated_words_are_collapsed_in_the_caption() -> None:
    r = confident("I think the the the the answer is yes")
    assert clean(r, speech_ms=3000) == "I think the the answer is yes"


def test_high_compression_loop_keeps_the_first_sentence() -> None:
    text = "We can start now. " + " ".join(f"word{i}" for i in range(12))
    r = confident(text, compression_ratio=3.0)
    assert clean(r, speech_ms=5000) == "We can start now."


def test_collapse_repeats_word_loop() -> None:
    assert collapse_repeats("the the the the") == "the the"
    assert collapse_repeats("the the the the", max_repeats=1) == "the"


def test_collapse_repeats_sentence_loop() -> None:
    assert collapse_repeats("I know. I know. I know. I know.") == "I know. I know."
    text = "Let me check that. Let me check that. Let me check that. Okay then."
    assert collapse_repeats(text) == "Let me check that. Let me check that. Okay then."


def test_collapse_repeats_leaves_normal_text_and_a_single_repeat() -> None:
    for text in [
        "",
        "that that is is that that is not is not",
        "we had had enough",
        "no no",
        "one two three four five six seven",
    ]:
        assert collapse_repeats(text) == text


def test_looped_phantom_is_dropped_when_unsupported() -> None:
    r = DecodeResult("Thank you. Thank you. Thank you.", avg_logprob=-0.9, no_speech_prob=0.4)
    assert clean(r, speech_ms=200) == ""
