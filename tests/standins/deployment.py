"""A Jitsi-like deployment for tests: real Prosody + mod_captions + stand-ins.

:func:`jitsi_deployment` starts what :func:`tests.test_prosody_module.deployment`
starts (Prosody 0.12 with mod_captions, accounts, the real sidecar with its
transcriber occupant) plus what a stock Jitsi install adds around it:

- ``metadata.localhost``: the room-metadata component
  (``mod_test_room_metadata``), announced on ``localhost`` by
  ``mod_test_features_identity``;
- ``mod_test_meeting_id`` on the MUC (``room._data.meetingId``, the
  ``muc#roominfo_meetingId`` field Jicofo reads);
- ``mod_test_token_features`` on ``localhost`` (``tokens``: user -> JWT
  context features);
- the Jicofo stand-in (``tests/standins/jicofo.py``) logged in as
  focus@auth.localhost, with the videobridge stand-in
  (``tests/standins/videobridge.py``) whose export goes to the sidecar's
  ``/mediajson/{{MEETING_ID}}`` with the sidecar token as Jicofo's
  ``http-headers``.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from tests.jitsi_clients import JitsiClient
from tests.prosody import DOMAIN, HIDDEN, MUC, free_port, make_prosody
from tests.standins.jicofo import Jicofo, JicofoConfig, TranscriptionConfig
from tests.standins.videobridge import ExporterConfig, Videobridge
from tests.test_prosody_module import AUTH, PLUGINS, TOKEN, Deployment, _tail

STANDINS = str(Path(__file__).resolve().parent)
METADATA = f"metadata.{DOMAIN}"


@dataclass
class JitsiDeployment(Deployment):
    jicofo: Jicofo | None = None

    async def participant(
        self, user: str, endpoint: str, name: str, room: str, **kw: str
    ) -> JitsiClient:
        return await self.client(user, endpoint, name, room=room, **kw)


def _lua(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, dict):
        return "{ " + "; ".join(f"[{_lua(k)}] = {_lua(v)}" for k, v in value.items()) + " }"
    raise TypeError(value)


@contextlib.asynccontextmanager
async def jitsi_deployment(
    tmp_path: Path,
    *,
    options: dict[str, str] | None = None,
    preload: bool = True,
    users: tuple[str, ...] = ("alice", "bob", "carol"),
    tokens: dict[str, dict[str, object]] | None = None,
    url_template: str | None = "",
    exporter: ExporterConfig | None = None,
) -> AsyncIterator[JitsiDeployment]:
    """Everything of a Jitsi deployment that the captions path touches.

    ``options``: mod_captions options (Lua literals) over the test defaults;
    ``url_template``: Jicofo's transcription url-template ("" = the sidecar's
    mediajson endpoint, None = not configured).
    """
    http_port = free_port()
    token_file = tmp_path / "captions-token"
    token_file.write_text(TOKEN + "\n")
    opts = {
        "captions_sidecar_url": f'"http://127.0.0.1:{http_port}"',
        "captions_token_file": f'"{token_file}"',
        "captions_request_timeout": "5",
        "captions_retries": "2",
        "captions_retry_backoff": "0.2",
        "captions_health_check_interval": "2",
        "captions_exclude_domains": f'{{ "{AUTH}" }}',
    } | (options or {})
    host_lines = '  modules_enabled = { "test_features_identity"; "test_token_features" }\n'
    host_lines += f"  test_token_features = {_lua(tokens or {})}\n"
    components = (
        f'Component "{METADATA}" "test_room_metadata"\n'
        f'  muc_component = "{MUC}"\n'
        f'  muc_mapper_domain_base = "{DOMAIN}"\n'
        f'  admins = {{ "focus@{AUTH}" }}\n'
    )
    prosody = make_prosody(
        tmp_path,
        plugin_paths=[PLUGINS, STANDINS],
        extra_modules=["captions", "test_meeting_id"],
        extra_hosts=[AUTH],
        global_options='statistics = "internal"',
        muc_options="".join(f"  {k} = {v}\n" for k, v in opts.items()),
        main_host_options=host_lines,
        components=components,
    )
    prosody.start()
    deadline = time.monotonic() + 15
    while f"Captions for {MUC} through" not in prosody.log():
        if time.monotonic() > deadline or "Error initializing module" in prosody.log():
            prosody.stop()
            raise AssertionError("a module did not load:\n" + prosody.log()[-6000:])
        await asyncio.sleep(0.05)
    prosody.register("transcriber", HIDDEN, "tsecret")
    prosody.register("focus", AUTH, "fsecret")
    for user in users:
        prosody.register(user, DOMAIN, f"{user}-pw")
    d = JitsiDeployment(tmp_path, prosody, http_port)
    template = (
        f"ws://127.0.0.1:{http_port}/mediajson/{{{{MEETING_ID}}}}"
        if url_template == ""
        else url_template
    )
    config = JicofoConfig(
        domain=DOMAIN,
        jid=f"focus@{AUTH}",
        transcription=TranscriptionConfig(
            url_template=template, http_headers={"Authorization": f"Bearer {TOKEN}"}
        ),
        trusted_domains=(AUTH, HIDDEN),
    )
    jicofo = Jicofo(prosody.port, Videobridge(exporter), config)
    try:
        await d.start_sidecar(preload=preload)
        await jicofo.start()
        d.jicofo = jicofo
        yield d
        log = prosody.log()
        assert TOKEN not in log, "the sidecar token must never be logged"
        assert not re.search(r":captions\s+error|Traceback", log), _tail(log)
        assert not re.search(r"metadata\.localhost:test_room_metadata\s+error", log), log[-4000:]
    finally:
        for c in d.clients:
            c.disconnect()
        await jicofo.stop()
        if d.sidecar is not None:
            await d.sidecar.stop(grace=0.5)
        prosody.stop()
