"""Local Whisper through faster-whisper (CTranslate2), CPU or CUDA.

English rooms use the English model (``tiny.en`` by default); other
languages and ``auto`` use the multilingual one (``base`` by default). Each
model is loaded once, on first use, and shared by all rooms; decodes run on
the sidecar's one :class:`~sidecar.asr.scheduler.Scheduler`.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sidecar.asr.base import Capabilities, ProviderError, Recognizer, Request, register
from sidecar.asr.filters import DecodeResult
from sidecar.asr.models import resolve_model
from sidecar.asr.scheduler import Scheduler
from sidecar.config import WhisperConfig, is_english, whisper_language

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class WhisperOptions:
    model: str = "tiny.en"
    multilingual_model: str = "base"
    device: str = "cpu"  # cpu | cuda | auto
    compute_type: str = "int8"
    cpu_threads: int = 0  # 0: all cores
    workers: int = 2
    beam_size: int = 1
    cache_dir: Path = Path("~/.cache/jitsi-captions").expanduser()


class WhisperRecognizer(Recognizer):
    name = "whisper"
    capabilities = Capabilities(streaming=False, interim_results=True, languages=None, local=True)

    def __init__(self, options: WhisperOptions, scheduler: Scheduler, **kw: Any) -> None:
        super().__init__(**kw)
        self.options = options
        self.scheduler = scheduler
        self._models: dict[str, Any] = {}
        self._multilingual: dict[str, bool] = {}
        self._lock = threading.Lock()

    def _model(self, which: str) -> Any:
        """Loads on first use (in a worker thread, never on the event loop)."""
        with self._lock:
            if which in self._models:
                return self._models[which]
            from faster_whisper import WhisperModel

            spec = self.options.model if which == "en" else self.options.multilingual_model
            path = resolve_model(spec, self.options.cache_dir)
            threads = self.options.cpu_threads or (os.cpu_count() or 1)
            log.info("loading whisper model %s from %s on %s", spec, path, self.options.device)
            try:
                model = WhisperModel(
                    str(path),
                    device=self.options.device,
                    compute_type=self.options.compute_type,
                    cpu_threads=threads,
                    num_workers=self.options.workers,
                    local_files_only=True,
                )
            except (RuntimeError, ValueError) as e:
                raise ProviderError(f"cannot load whisper model {spec}: {e}", "config") from e
            self._models[which] = model
            self._multilingual[which] = bool(model.model.is_multilingual)
            return model

    def preload(self, english: bool = True) -> None:
        self._model("en" if english else "multi")

    def _which(self, language: str) -> str:
        return "en" if is_english(language) else "multi"

    def _decode(self, req: Request, final: bool) -> DecodeResult:
        which = self._which(req.language)
        model = self._model(which)
        lang = whisper_language(req.language)
        if not self._multilingual[which]:
            lang = None  # an English-only model takes no language token
        beam = self.options.beam_size
        segments, info = model.transcribe(
            req.audio,
            language=lang,
            task="transcribe",
            beam_size=beam,
            best_of=1,
            temperature=(0.0, 0.2, 0.4) if final else 0.0,
            condition_on_previous_text=False,
            without_timestamps=True,
            vad_filter=False,
            initial_prompt=req.prompt or None,
            word_timestamps=False,
        )
        segs = list(segments)
        if not segs:
            return DecodeResult("", language=info.language or "", language_prob=1.0)
        text = " ".join(s.text.strip() for s in segs).strip()
        n = sum(max(1, len(s.tokens)) for s in segs)
        logprob = sum(s.avg_logprob * max(1, len(s.tokens)) for s in segs) / n
        return DecodeResult(
            text=text,
            avg_logprob=logprob,
            no_speech_prob=max(s.no_speech_prob for s in segs),
            compression_ratio=max(s.compression_ratio for s in segs),
            language=info.language or "",
            language_prob=float(info.language_probability or 0.0),
        )

    async def _recognize_impl(self, req: Request) -> DecodeResult:
        if req.kind == "final":
            fut = self.scheduler.submit_final(lambda: self._decode(req, True))
        else:
            fut = self.scheduler.submit_interim(req.key, lambda: self._decode(req, False))
        return await fut


def from_config(
    config: WhisperConfig, scheduler: Scheduler, *, model: str | None = None
) -> WhisperRecognizer:
    """The recogniser of a deployment's ``[whisper]`` section."""
    return WhisperRecognizer(
        WhisperOptions(
            model=model or config.whisper_model,
            multilingual_model=config.whisper_model_multilingual,
            device=config.device,
            compute_type=config.compute_type,
            cpu_threads=config.cpu_threads,
            workers=config.workers,
            beam_size=config.beam_size,
            cache_dir=config.model_cache_dir,
        ),
        scheduler,
        # a local decode cannot hang like a network call; a timeout would
        # only count queueing under load and resubmit the same work
        timeout=600.0,
        retries=0,
    )


def _factory(**kw: Any) -> Recognizer:
    return WhisperRecognizer(**kw)


register("whisper", _factory)
