"""docker-jitsi-meet files: what can be checked without Docker on this machine.

No container runtime runs here (no Docker daemon, no podman or buildah), so
the image is not built and the compose stack is not started. What is checked:
the .env settings parse as Compose reads an env file; the Prosody lines that
docker-jitsi-meet's template makes of XMPP_MUC_MODULES and
XMPP_MUC_CONFIGURATION (prosody/rootfs/defaults/conf.d/jitsi-meet.cfg.lua:
the conference component's list joins XMPP_MUC_MODULES split on commas, its
options join XMPP_MUC_CONFIGURATION split on commas, one per line) load in a
real Prosody (Debian's 0.12; docker-jitsi-meet runs 13) that then runs
mod_captions with the token read from the environment; custom-jicofo.conf
parses as HOCON with the token substituted; the compose override names
services, the network and mount points the stock docker-compose.yml has; the
Dockerfile copies only what exists.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from dotenv import dotenv_values

from tests.prosody import MUC, make_prosody

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
TOKEN = "tok-docker-7a1c55e0"

# From docker-jitsi-meet's docker-compose.yml: the services the override
# extends, the network every service joins, and the folder Prosody's
# plugin_paths lists first (conf.d/jitsi-meet.cfg.lua).
STOCK_SERVICES = {"web", "prosody", "jicofo", "jvb"}
STOCK_NETWORK = "meet.jitsi"
CUSTOM_PLUGINS = "/prosody-plugins-custom"


def env_settings() -> dict[str, str | None]:
    return dotenv_values(DOCKER / "env.captions")


def test_env_settings_parse_and_switch_docker_jitsi_meet_on() -> None:
    env = env_settings()
    assert env["ENABLE_TRANSCRIPTIONS"] == "1"
    assert env["JIGASI_TRANSCRIBER_USER"] == "transcriber"
    assert env["XMPP_MUC_MODULES"] == "captions"
    conf = env["XMPP_MUC_CONFIGURATION"] or ""
    # single quotes: taken literally, the quotes inside kept for Lua
    assert conf.startswith('captions_sidecar_url = "http://captions.meet.jitsi:8088"')
    assert "ENV_CAPTIONS_TOKEN" in conf and "${" not in conf
    assert "transcriber@hidden.meet.jitsi" in conf


def render_conference(env: dict[str, str | None]) -> str:
    """The template's two expressions for the conference component, joined as it joins them."""
    modules = [m for m in (env["XMPP_MUC_MODULES"] or "").split(",") if m]
    options = [o for o in (env["XMPP_MUC_CONFIGURATION"] or "").split(",") if o]
    return (
        "  modules_enabled = { "
        + "".join(f'"{m}"; ' for m in modules)
        + "}\n"
        + "".join(f"  {o}\n" for o in options)
    )


def test_the_prosody_lines_load_in_prosody_and_run_the_module(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rendered = render_conference(env_settings())
    lua = tmp_path / "component.lua"
    lua.write_text(f'Component "{MUC}" "muc"\n' + rendered.replace("ENV_CAPTIONS_TOKEN", '"x"'))
    subprocess.run(["luac", "-p", str(lua)], check=True, timeout=30)
    # the docker names mean nothing here: point the URL at a closed port on
    # loopback and check the module starts with the token from the environment
    local = rendered.replace("captions.meet.jitsi", "127.0.0.1").replace(
        "hidden.meet.jitsi", "h.localhost"
    )
    modules_line, options = local.split("\n", 1)
    monkeypatch.setenv("CAPTIONS_TOKEN", TOKEN)
    prosody = make_prosody(
        tmp_path,
        plugin_paths=[str(ROOT / "prosody-module")],
        extra_modules=re.findall(r'"([a-z_]+)"', modules_line),
        muc_options=options,
    )
    prosody.start()
    try:
        deadline = time.monotonic() + 20
        while f"Captions for {MUC} through" not in prosody.log():
            assert "Error initializing module 'captions'" not in prosody.log(), prosody.log()[
                -3000:
            ]
            assert time.monotonic() < deadline, prosody.log()[-3000:]
            time.sleep(0.05)
        assert TOKEN not in prosody.log()
        assert "no token" not in prosody.log().lower()
    finally:
        prosody.stop()


def test_custom_jicofo_conf_parses_with_the_token_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from pyhocon import ConfigFactory  # type: ignore[import-untyped]

    monkeypatch.setenv("CAPTIONS_TOKEN", TOKEN)
    conf = ConfigFactory.parse_file(str(DOCKER / "custom-jicofo.conf"))
    assert conf["jicofo.transcription.url-template"] == (
        "ws://captions.meet.jitsi:8088/mediajson/{{MEETING_ID}}"
    )
    assert conf["jicofo.transcription.http-headers.Authorization"] == f"Bearer {TOKEN}"
    if shutil.which("hocon"):  # ruby-hocon, what jicofo's packaging uses
        out = subprocess.run(
            [
                "hocon",
                "-f",
                str(DOCKER / "custom-jicofo.conf"),
                "get",
                "jicofo.transcription.url-template",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0 and "/mediajson/" in out.stdout, out.stdout + out.stderr


def test_the_compose_override_extends_the_stock_services() -> None:
    override = yaml.safe_load((DOCKER / "captions.override.yml").read_text())
    services = override["services"]
    assert set(services) - {"captions"} <= STOCK_SERVICES
    captions = services["captions"]
    assert STOCK_NETWORK in captions["networks"]
    assert "captions.meet.jitsi" in captions["networks"][STOCK_NETWORK]["aliases"]
    env = dict(e.split("=", 1) for e in captions["environment"] if "=" in e)
    assert env["CAPTIONS_XMPP_JID"].endswith("@${XMPP_HIDDEN_DOMAIN:-hidden.meet.jitsi}")
    assert env["CAPTIONS_SERVER_TOKEN"].startswith("${CAPTIONS_TOKEN")
    mounts = services["prosody"]["volumes"]
    assert any(m.split(":")[1] == f"{CUSTOM_PLUGINS}/mod_captions" for m in mounts)
    assert (ROOT / "prosody-module/mod_captions/mod_captions.lua").is_file()
    assert "CAPTIONS_TOKEN" in services["prosody"]["environment"]
    assert "CAPTIONS_TOKEN" in services["jicofo"]["environment"]


def test_the_dockerfile_copies_what_exists_and_pins_what_the_makefile_pins() -> None:
    text = (DOCKER / "Dockerfile").read_text()
    for line in text.splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (ROOT / src).exists(), src
    silero = re.search(r"SILERO_VAD := (\S+)", (ROOT / "Makefile").read_text())
    assert silero and silero.group(1) in text
    assert 'ENTRYPOINT ["captions-sidecar", "serve"]' in text
    assert "captions-sidecar" in (ROOT / "pyproject.toml").read_text()
