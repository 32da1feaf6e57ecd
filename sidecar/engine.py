"""The composition root: store, recognisers, scheduler, VAD, rooms and outputs, built once.

:meth:`Engine.from_config` builds everything a sidecar runs from its
configuration: the room event bus, the outputs (transcript store, local or
in front of a bucket, the archiver, webhooks, signed links, transcript
routes, retention), the recognition scheduler, Whisper and the cloud
recognisers of the ``[azure]`` / ``[google]`` sections, the VAD, and the
room manager wired to all of them. The server
(:class:`sidecar.server.Sidecar`) adds the listeners and the ingest adapters
around it; ``transcribe``, the demo, the tests and the benchmarks use
``Engine(store_dir)``, the same parts without outputs.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sidecar.asr.scheduler import Scheduler
from sidecar.asr.setup import from_config as providers_from_config
from sidecar.asr.whisper import from_config as whisper_from_config
from sidecar.config import EffectiveSettings, SidecarConfig, WhisperConfig
from sidecar.outputs.hub import Outputs
from sidecar.pipeline.speaker import GateConfig
from sidecar.pipeline.vad import SileroVad
from sidecar.room_events import EventBus
from sidecar.rooms import RoomManager
from sidecar.store.base import TranscriptStore
from sidecar.store.local import LocalDirStore


class Engine:
    def __init__(
        self,
        store_dir: Path | None = None,
        *,
        defaults: EffectiveSettings | None = None,
        whisper: WhisperConfig | None = None,
        model: str | None = None,
        providers: Mapping[str, Mapping[str, Any]] | None = None,
        provider_env: Mapping[str, str] | None = None,
        config: SidecarConfig | None = None,
        token: str = "",
    ) -> None:
        """``Engine(store_dir)``: rooms on a local store, no outputs.
        ``Engine(config=..., token=...)``: everything the configuration asks for."""
        self.config = config
        w = config.whisper if config is not None else (whisper or WhisperConfig())
        self.events = EventBus()
        self.outputs: Outputs | None = None
        self.store: TranscriptStore
        if config is not None:
            self.outputs = Outputs(config, token=token, bus=self.events)
            self.store = self.outputs.store
            providers, provider_env = config.providers, config.provider_env
        else:
            if store_dir is None:
                raise ValueError("Engine needs store_dir or config")
            self.store = LocalDirStore(store_dir)
        self.scheduler = Scheduler(w.workers)
        self.whisper = whisper_from_config(w, self.scheduler, model=model)
        # Whisper, and the cloud recognisers of [azure] / [google] sections
        self.providers = providers_from_config(providers or {}, provider_env or {}, self.whisper)
        self.vad = SileroVad()
        if config is not None:
            lim = config.limits
            outputs = self.outputs
            assert outputs is not None
            self.rooms = RoomManager(
                defaults=config.defaults,
                store=self.store,
                providers=self.providers.by_name,
                vad=self.vad,
                max_rooms=lim.max_rooms,
                max_speakers_per_room=lim.max_speakers_per_room,
                max_subscribers_per_room=lim.max_subscribers_per_room,
                gate=GateConfig(max_frame_bytes=lim.max_frame_bytes),
                no_audio_warning_s=config.ingest.no_audio_warning_s,
                events=self.events,
                transcript_link=outputs.link if outputs.signer is not None else None,
            )
        else:
            self.rooms = RoomManager(
                defaults=defaults or EffectiveSettings(),
                store=self.store,
                providers=self.providers.by_name,
                vad=self.vad,
                events=self.events,
            )

    @classmethod
    def from_config(cls, config: SidecarConfig, *, token: str) -> Engine:
        """Everything the deployment configuration asks for."""
        return cls(config=config, token=token)

    async def start(self, preload: bool = True) -> None:
        self.scheduler.start()
        self.rooms.start_background()
        await self.providers.start(preload_whisper=preload)

    async def close(self) -> None:
        await self.rooms.close()
        await self.providers.aclose()
        await self.scheduler.close()
