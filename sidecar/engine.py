"""An in-process engine (store, scheduler, Whisper, VAD, rooms) without listeners.

Used by ``transcribe``, the demo, the tests and the benchmarks; the server
builds the same parts around its listeners.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from sidecar.asr.scheduler import Scheduler
from sidecar.asr.whisper import WhisperOptions, WhisperRecognizer
from sidecar.config import EffectiveSettings, WhisperConfig
from sidecar.pipeline.vad import SileroVad
from sidecar.rooms import RoomManager
from sidecar.store.local import LocalDirStore


class Engine:
    def __init__(
        self,
        store_dir: Path,
        *,
        defaults: EffectiveSettings | None = None,
        whisper: WhisperConfig | None = None,
        model: str | None = None,
    ) -> None:
        w = whisper or WhisperConfig()
        self.store = LocalDirStore(store_dir)
        self.scheduler = Scheduler(w.workers)
        self.whisper = WhisperRecognizer(
            WhisperOptions(
                model=model or w.whisper_model,
                multilingual_model=w.whisper_model_multilingual,
                device=w.device,
                compute_type=w.compute_type,
                cpu_threads=w.cpu_threads,
                workers=w.workers,
                beam_size=w.beam_size,
                cache_dir=w.model_cache_dir,
            ),
            self.scheduler,
            timeout=600.0,
            retries=0,
        )
        self.vad = SileroVad()
        self.rooms = RoomManager(
            defaults=defaults or EffectiveSettings(),
            store=self.store,
            recognizers={"whisper": self.whisper},
            vad=self.vad,
        )

    async def start(self, preload: bool = True) -> None:
        self.scheduler.start()
        self.rooms.start_background()
        if preload:
            await asyncio.to_thread(self.whisper.preload)

    async def close(self) -> None:
        await self.rooms.close()
        await self.scheduler.close()
