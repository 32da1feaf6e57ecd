"""``transcribe FILE...``: files through the same streaming pipeline as live rooms."""

from __future__ import annotations

import asyncio
import logging
import tempfile
from pathlib import Path

import numpy as np

from sidecar.audio import SAMPLE_RATE, DecodeError, iter_pcm_frames, load_audio
from sidecar.config import RoomSettings
from sidecar.engine import Engine
from sidecar.events import Frame

log = logging.getLogger(__name__)


async def transcribe_pcm(
    engine: Engine, room: str, pcm: np.ndarray, settings: RoomSettings, on_progress=None
) -> str:  # type: ignore[no-untyped-def]
    """Feeds PCM as fast as the pipeline takes it; returns the transcript id."""
    settings = settings.merged(RoomSettings(interim_results=False))
    r = await engine.rooms.start(room, "transcription", settings, live=False, requested_by="cli")
    tid = r.transcript_id
    step = SAMPLE_RATE // 50
    for i, chunk in enumerate(iter_pcm_frames(pcm)):
        engine.rooms.push_frame(r.name, "speaker", Frame(b"", i, i * step, pcm=chunk))
        if i % 50 == 49:
            # let finished utterances reach the recogniser while we read on;
            # stay at most ~2 minutes of audio ahead so memory stays flat
            await asyncio.sleep(0)
            finals, _ = engine.scheduler.backlog
            while finals > 8:
                await asyncio.sleep(0.05)
                finals, _ = engine.scheduler.backlog
            if on_progress:
                on_progress(50 * step)
    await engine.rooms.end_room(r.name)
    return tid


async def transcribe_files(
    files: list[Path],
    *,
    out_dir: Path,
    fmt: str,
    settings: RoomSettings,
    model: str | None = None,
    progress: bool = True,
) -> dict[Path, Path | None]:
    from tqdm import tqdm

    results: dict[Path, Path | None] = {}
    with tempfile.TemporaryDirectory(prefix="captions-") as tmp:
        engine = Engine(Path(tmp), model=model)
        await engine.start()
        try:
            for f in files:
                try:
                    pcm = await asyncio.to_thread(load_audio, f)
                except (DecodeError, OSError) as e:
                    log.error("%s", e)
                    print(f"error: {e}")
                    results[f] = None
                    continue
                bar = tqdm(
                    total=round(len(pcm) / SAMPLE_RATE, 1),
                    unit="s audio",
                    desc=f.name,
                    disable=not progress,
                    leave=True,
                )
                tid = await transcribe_pcm(
                    engine,
                    f"file-{len(results)}",
                    pcm,
                    settings,
                    on_progress=lambda n, b=bar: b.update(round(n / SAMPLE_RATE, 2)),
                )
                bar.close()
                data = await asyncio.to_thread(engine.store.get, tid, fmt)
                target = out_dir / f"{f.stem}.{fmt}"
                target.write_bytes(data)
                results[f] = target
        finally:
            await engine.close()
    return results
