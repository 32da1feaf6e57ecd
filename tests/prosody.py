"""A real Prosody (Debian's 0.12) with its own config in a temp dir, for tests.

``PROSODY_BIN`` / ``PROSODYCTL_BIN`` name another Prosody to run (``make
test-prosody13`` sets them to the one ``scripts/prosody13.sh`` unpacks).

Virtual hosts as in a Jitsi install: ``localhost`` for users,
``recorder.localhost`` as the hidden domain of the transcriber, and the MUC
component ``conference.localhost`` with public real JIDs.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

DOMAIN = "localhost"
HIDDEN = "recorder.localhost"
MUC = "conference.localhost"

PROSODY_BIN = os.environ.get("PROSODY_BIN") or "prosody"
PROSODYCTL_BIN = os.environ.get("PROSODYCTL_BIN") or "prosodyctl"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Prosody:
    root: Path
    port: int
    config: Path
    proc: subprocess.Popen[bytes] | None = None
    extra_modules: list[str] = field(default_factory=list)
    plugin_paths: list[str] = field(default_factory=list)
    muc_options: str = ""
    # more virtual hosts (e.g. Jitsi's auth domain for the focus) and lines for
    # the global section (before the first VirtualHost)
    extra_hosts: list[str] = field(default_factory=list)
    global_options: str = ""
    global_modules: list[str] = field(default_factory=list)
    # STARTTLS required on c2s (mod_tls on), with the certificates of
    # self_signed() in certs/; off: plain TCP as before
    tls: bool = False
    # lines inside the main VirtualHost (DOMAIN) section, e.g. its own
    # modules_enabled; more Component sections, appended after the MUC
    main_host_options: str = ""
    components: str = ""
    # an HTTP listener on 127.0.0.1 (mod_http_openmetrics...); 0: none
    http_port: int = 0

    def write_config(self) -> None:
        plugins = ", ".join(f'"{p}"' for p in self.plugin_paths)
        muc_modules = ", ".join(f'"{m}"' for m in self.extra_modules)
        hosts = "".join(f'VirtualHost "{h}"\n' for h in self.extra_hosts)
        global_modules = "".join(f'; "{m}"' for m in self.global_modules)
        if self.tls:
            global_modules += '; "tls"'
        disabled = '"s2s"' if self.tls else '"s2s"; "tls"'
        require = "true" if self.tls else "false"
        http = (
            f'http_ports = {{ {self.http_port} }}\nhttp_interfaces = {{ "127.0.0.1" }}'
            if self.http_port
            else "http_ports = { }"
        )
        self.config.write_text(
            f"""
run_as_root = true
pidfile = "{self.root}/prosody.pid"
data_path = "{self.root}/data"
log = {{ {{ levels = {{ min = "debug" }}, to = "file", filename = "{self.root}/prosody.log" }} }}
c2s_ports = {{ {self.port} }}
c2s_interfaces = {{ "127.0.0.1" }}
s2s_ports = {{ }}
component_ports = {{ }}
{http}
https_ports = {{ }}
certificates = "{self.root}/certs"
c2s_require_encryption = {require}
allow_unencrypted_plain_auth = true
authentication = "internal_plain"
modules_enabled = {{ "roster"; "saslauth"; "disco"; "ping"; "posix"{global_modules} }}
modules_disabled = {{ {disabled} }}
plugin_paths = {{ {plugins} }}
{self.global_options}
VirtualHost "{DOMAIN}"
{self.main_host_options}
VirtualHost "{HIDDEN}"
{hosts}Component "{MUC}" "muc"
  modules_enabled = {{ {muc_modules} }}
  muc_room_default_public_jids = true
  muc_room_locking = false
{self.muc_options}
{self.components}
"""
        )

    def self_signed(self, host: str) -> Path:
        """A self-signed certificate for ``host`` in certs/, as a stock install
        has; returns the certificate's path. Call before start()."""
        certs = self.root / "certs"
        certs.mkdir(exist_ok=True)
        crt, key = certs / f"{host}.crt", certs / f"{host}.key"
        subprocess.run(
            [
                "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                "-keyout", str(key), "-out", str(crt), "-subj", f"/CN={host}",
                "-addext", f"subjectAltName=DNS:{host}",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )  # fmt: skip
        return crt

    def register(self, user: str, host: str, password: str) -> None:
        subprocess.run(
            [PROSODYCTL_BIN, "--config", str(self.config), "register", user, host, password],
            check=True,
            capture_output=True,
            timeout=30,
        )

    def start(self) -> None:
        (self.root / "data").mkdir(exist_ok=True)
        (self.root / "certs").mkdir(exist_ok=True)
        self.write_config()
        self.proc = subprocess.Popen(
            [PROSODY_BIN, "--config", str(self.config), "-F"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"prosody exited:\n{self.log()[-3000:]}") from None
                time.sleep(0.1)
        raise RuntimeError("prosody did not open its port")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def shell(self, command: str) -> str:
        """Run one admin-shell command (needs "admin_shell" in global_modules);
        a command starting with ">" is Lua run inside Prosody."""
        out = subprocess.run(
            [PROSODYCTL_BIN, "--config", str(self.config), "shell", command],
            check=True,
            capture_output=True,
            text=True,
            timeout=30,
        )
        return out.stdout

    def log(self) -> str:
        p = self.root / "prosody.log"
        return p.read_text(errors="replace") if p.exists() else ""


def make_prosody(tmp_path: Path, **kw: object) -> Prosody:
    if shutil.which(PROSODY_BIN) is None:
        if PROSODY_BIN != "prosody":  # asked for by name: not there is an error
            raise RuntimeError(f"PROSODY_BIN={PROSODY_BIN} is not an executable")
        pytest.skip("prosody is not installed (apt-get install prosody)")
    root = tmp_path / "prosody"
    root.mkdir()
    return Prosody(root=root, port=free_port(), config=root / "prosody.cfg.lua", **kw)  # type: ignore[arg-type]
