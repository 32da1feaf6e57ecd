"""Process-wide metrics that belong to no single module.

- ``captions_build_info``: constant 1, labelled with the sidecar's version and
  the versions of the parts that change its behaviour (Python, faster-whisper,
  gRPC), the usual ``*_build_info`` join target for dashboards.
- Gauges computed at scrape time from the live :class:`~sidecar.rooms.RoomManager`
  objects (no call site has to keep them right):
  ``captions_subscribers`` (caption listeners: open SubscribeCaptions streams),
  ``captions_rooms_without_audio`` (rooms with captions or transcription on
  that received no audio frame for :data:`NO_AUDIO_AFTER_S` seconds: the
  bridge export or Jigasi stopped sending, or everyone is muted).
"""

from __future__ import annotations

import platform
import time
import weakref
from collections.abc import Iterator
from importlib import metadata
from typing import TYPE_CHECKING

from prometheus_client import REGISTRY, Gauge
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from sidecar.rooms import RoomManager

NO_AUDIO_AFTER_S = 60.0


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown"


BUILD_INFO = Gauge(
    "captions_build_info",
    "Always 1; the labels say which build of the sidecar is running",
    ["version", "python", "faster_whisper", "grpc"],
)
BUILD_INFO.labels(
    _version("jitsi-captions-sidecar"),
    platform.python_version(),
    _version("faster-whisper"),
    _version("grpcio"),
).set(1)

_MANAGERS: weakref.WeakSet[RoomManager] = weakref.WeakSet()


def track_rooms(rooms: RoomManager) -> None:
    """Include ``rooms`` in the scrape-time room gauges (held weakly)."""
    _MANAGERS.add(rooms)


def rooms_without_audio(rooms: RoomManager, now: float | None = None) -> int:
    """Active rooms whose newest audio frame is older than :data:`NO_AUDIO_AFTER_S`."""
    now = time.monotonic() if now is None else now
    n = 0
    for r in list(rooms.rooms.values()):
        if not r.active or not r.live:
            continue
        last = max((sp.last_arrival for sp in r.speakers.values()), default=r.last_audio)
        if now - max(last, r.last_audio) >= NO_AUDIO_AFTER_S:
            n += 1
    return n


class _RoomsCollector(Collector):
    def collect(self) -> Iterator[GaugeMetricFamily]:
        managers = list(_MANAGERS)
        subs = GaugeMetricFamily(
            "captions_subscribers", "Open caption subscriptions (SubscribeCaptions streams)"
        )
        subs.add_metric([], sum(len(r.subscribers) for m in managers for r in m.rooms.values()))
        yield subs
        quiet = GaugeMetricFamily(
            "captions_rooms_without_audio",
            f"Rooms with captions or transcription on and no audio for {NO_AUDIO_AFTER_S:.0f} s",
        )
        quiet.add_metric([], sum(rooms_without_audio(m) for m in managers))
        yield quiet


REGISTRY.register(_RoomsCollector())
