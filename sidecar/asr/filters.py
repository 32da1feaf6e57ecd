"""Guards against Whisper's hallucinations on silence, noise and cut audio."""

from __future__ import annotations

import re
from dataclasses import dataclass

# Phrases Whisper produces from near-silence (learned from subtitled videos).
# Dropped only when the audio gives little support (short or quiet).
_PHANTOMS = {
    "you",
    "thank you",
    "thanks",
    "thank you very much",
    "thanks for watching",
    "thank you for watching",
    "thank you so much for watching",
    "please subscribe",
    "subscribe to my channel",
    "bye",
    "bye bye",
    "okay",
    "oh",
    "hmm",
    "so",
    "the end",
    "subtitles by the amaraorg community",
    "transcription by castingwords",
    "i'm sorry",
}
_NON_SPEECH = re.compile(r"^[\s\W]*(\[[^\]]*\]|\([^)]*\)|♪+|\*[^*]*\*)?[\s\W]*$")
_WORDS = re.compile(r"[\w']+")


@dataclass(slots=True)
class DecodeResult:
    text: str
    avg_logprob: float = 0.0
    no_speech_prob: float = 0.0
    compression_ratio: float = 1.0
    language: str = ""
    language_prob: float = 1.0


@dataclass(frozen=True, slots=True)
class FilterConfig:
    no_speech_threshold: float = 0.6
    logprob_threshold: float = -1.0
    compression_ratio_threshold: float = 2.4
    min_logprob: float = -1.6  # below this, drop whatever the no-speech probability
    # The VAD was sure of speech for this long: a phantom phrase ("okay",
    # "thanks", "bye") is then a real short reply, dropped only when Whisper
    # itself doubts it (no_speech_threshold and logprob_threshold).
    reply_voiced_ms: int = 192


def collapse_repeats(text: str, max_repeats: int = 2) -> str:
    """Cuts loops such as 'the the the the' or 'I know. I know. I know.'."""
    words = text.split()
    for size in range(1, 7):
        i = 0
        out: list[str] = []
        while i < len(words):
            gram = words[i : i + size]
            j = i + size
            reps = 1
            while words[j : j + size] == gram and len(gram) == size:
                reps += 1
                j += size
            if reps > max_repeats:
                out.extend(gram * max_repeats)
                i = j
            else:
                out.append(words[i])
                i += 1
        words = out
    return " ".join(words)


def clean(
    result: DecodeResult,
    *,
    speech_ms: int,
    cfg: FilterConfig | None = None,
    voiced_ms: int | None = None,
) -> str:
    """The text to show, or "" when the decode is judged not to be speech.

    ``voiced_ms``: how long the VAD was sure it heard speech in the audio, when
    known (finals). Whisper's no-speech probability on a lone word is often
    0.2-0.4 although the word is right; the VAD's verdict weighs more there.
    """
    cfg = cfg or FilterConfig()
    text = result.text.strip()
    if not text or _NON_SPEECH.match(text):
        return ""
    if (
        result.no_speech_prob > cfg.no_speech_threshold
        and result.avg_logprob < cfg.logprob_threshold
    ):
        return ""
    if result.avg_logprob < cfg.min_logprob:
        return ""
    text = collapse_repeats(text)
    if result.compression_ratio > cfg.compression_ratio_threshold and len(text.split()) > 8:
        # a loop the collapse did not catch: keep only the first clause
        text = re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0]
    # "Thank you. Thank you." is the same phantom as "Thank you."
    key = " ".join(_WORDS.findall(collapse_repeats(text.lower(), 1).replace(".", "")))
    key = collapse_repeats(key, 1)
    if key in _PHANTOMS:
        if voiced_ms is not None and voiced_ms >= cfg.reply_voiced_ms:
            # someone said it: keep it unless Whisper doubts it was speech
            if (
                result.no_speech_prob > cfg.no_speech_threshold
                or result.avg_logprob < cfg.logprob_threshold
            ):
                return ""
        # a real "thank you" decodes confidently; the phantom one does not
        elif speech_ms < 300 or result.no_speech_prob > 0.2 or result.avg_logprob < -0.7:
            return ""
    return text
