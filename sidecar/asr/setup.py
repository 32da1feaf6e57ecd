"""The recognisers of a deployment, built once at start-up from the configuration.

``whisper`` is always there (the sidecar's own model). A cloud provider is
configured by its section (``[azure]``, ``[google]``) or by its
``CAPTIONS_<NAME>_*`` variables; its ``fallback`` list makes the name a
failover chain: a room set to ``azure`` with ``[azure] fallback =
["whisper"]`` is served by Azure, then Whisper when Azure fails. Rooms pick
a name with the ``provider`` setting (deployment default or per room).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sidecar.asr.failover import FailoverProvider
from sidecar.asr.provider import (
    REGISTRY,
    ProviderConfigError,
    StreamProvider,
    build_provider,
    setting,
)

log = logging.getLogger(__name__)


@dataclass
class Providers:
    """What rooms may name (``by_name``), and every provider to start and close."""

    by_name: dict[str, StreamProvider] = field(default_factory=dict)
    members: dict[str, StreamProvider] = field(default_factory=dict)

    async def start(self, *, preload_whisper: bool = True) -> None:
        """Connect / check credentials; Whisper's start loads its model."""
        for name, p in self.members.items():
            if name == "whisper" and not preload_whisper:
                continue
            await p.start()

    async def aclose(self) -> None:
        for p in self.members.values():
            with contextlib.suppress(Exception):
                await p.aclose()


def configured(
    name: str, sections: Mapping[str, Mapping[str, Any]], env: Mapping[str, str]
) -> bool:
    prefix = f"CAPTIONS_{name.upper()}_"
    return name in sections or any(k.startswith(prefix) for k in env)


def from_config(
    sections: Mapping[str, Mapping[str, Any]],
    env: Mapping[str, str],
    recognizer: Any,
) -> Providers:
    """The deployment's providers; a bad setting is a :class:`ConfigError`
    naming it, as for every other part of the configuration."""
    from sidecar.config import ConfigError

    try:
        return build_providers(sections, env=env, recognizer=recognizer)
    except ProviderConfigError as e:
        raise ConfigError("configuration", "", str(e)) from e


def build_providers(
    sections: Mapping[str, Mapping[str, Any]],
    *,
    env: Mapping[str, str],
    cooldown_s: float = 30.0,
    **resources: Any,
) -> Providers:
    """Build Whisper and every configured cloud provider; wrap the ones with a
    ``fallback`` in chains. Raises :class:`ProviderConfigError` naming the
    setting at fault (start-up fails, as for any bad configuration)."""
    out = Providers()
    for name in REGISTRY:
        if name == "whisper" or configured(name, sections, env):
            section = dict(sections.get(name, {}))
            section.pop("fallback", None)
            out.members[name] = build_provider(name, section, env=env, **resources)
    for name, provider in out.members.items():
        raw = dict(sections.get(name, {}))
        fallback = setting(name, raw, env, "fallback", (), kind=tuple) if name != "whisper" else ()
        chain = [provider]
        for other in fallback:
            if other == name or other not in out.members:
                raise ProviderConfigError(
                    f"{name}.fallback: {other!r} is not a configured provider other than "
                    f"{name!r} (configured: {', '.join(sorted(out.members))})"
                )
            chain.append(out.members[other])
        if len(chain) > 1:
            out.by_name[name] = FailoverProvider(chain, cooldown_s=cooldown_s, name=name)
            log.info("provider %s: failover chain %s", name, ", ".join(p.name for p in chain))
        else:
            out.by_name[name] = provider
    return out
