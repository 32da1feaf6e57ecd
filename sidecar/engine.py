"""An in-process engine (store, scheduler, recognisers, VAD, rooms) without listeners.

Used by ``transcribe``, the demo, the tests and the benchmarks; the server
builds the same parts around its listeners.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sidecar.asr.scheduler import Scheduler
from sidecar.asr.setup import from_config as providers_from_config
from sidecar.asr.whisper import from_config as whisper_from_config
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
        providers: Mapping[str, Mapping[str, Any]] | None = None,
        provider_env: Mapping[str, str] | None = None,
    ) -> None:
        w = whisper or WhisperConfig()
        self.store = LocalDirStore(store_dir)
        self.scheduler = Scheduler(w.workers)
        self.whisper = whisper_from_config(w, self.scheduler, model=model)
        # Whisper, and the cloud recognisers of [azure] / [google] sections
        self.providers = providers_from_config(providers or {}, provider_env or {}, self.whisper)
        self.vad = SileroVad()
        self.rooms = RoomManager(
            defaults=defaults or EffectiveSettings(),
            store=self.store,
            providers=self.providers.by_name,
            vad=self.vad,
        )

    async def start(self, preload: bool = True) -> None:
        self.scheduler.start()
        self.rooms.start_background()
        await self.providers.start(preload_whisper=preload)

    async def close(self) -> None:
        await self.rooms.close()
        await self.providers.aclose()
        await self.scheduler.close()
