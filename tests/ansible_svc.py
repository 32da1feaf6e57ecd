"""Stands in for systemd when the Ansible role's test runs it: ``svc.py --root R ACTION SERVICE``.

The role, with ``jitsi_captions_service_manager: command``, runs
``CMD restart prosody`` where it would restart a systemd unit. This runs the
services the test can run here (Prosody, the sidecar) as background processes
described in ``R/svc.json`` ({"name": {"argv": [...], "port": N, "log": path}}),
with a pidfile each under ``R/run/svc``; the others (jicofo, prometheus,
grafana-server: not installed here) are only recorded. Every call is appended
to ``R/var/log/svc.log`` as "ACTION SERVICE", which the test reads to see what
the role restarted. ``status`` exits 0 when running and 3 when not, as
``systemctl is-active`` does.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def running(pidfile: Path) -> int | None:
    try:
        pid = int(pidfile.read_text())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    try:  # a zombie is not running
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:
        return None
    return None if state == "Z" else pid


def stop(pidfile: Path) -> None:
    pid = running(pidfile)
    if pid is None:
        return
    os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + 90
    while running(pidfile) is not None:
        if time.monotonic() > deadline:
            os.killpg(pid, signal.SIGKILL)
            break
        time.sleep(0.1)
    pidfile.unlink(missing_ok=True)


def start(spec: dict, pidfile: Path) -> None:  # type: ignore[type-arg]
    if running(pidfile) is not None:
        return
    log = open(spec["log"], "ab")  # noqa: SIM115 - the child keeps it
    proc = subprocess.Popen(
        spec["argv"],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        start_new_session=True,
        env={**os.environ, **spec.get("env", {})},
    )
    pidfile.write_text(str(proc.pid))
    port = spec.get("port")
    deadline = time.monotonic() + 120
    while port:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if proc.poll() is not None:
                sys.exit(f"{spec['argv'][0]} exited with {proc.returncode}; see {spec['log']}")
            if time.monotonic() > deadline:
                sys.exit(f"{spec['argv'][0]} did not open port {port}")
            time.sleep(0.1)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("action", choices=["start", "stop", "restart", "status"])
    ap.add_argument("service")
    args = ap.parse_args()
    specs = json.loads((args.root / "svc.json").read_text())
    (args.root / "run" / "svc").mkdir(parents=True, exist_ok=True)
    pidfile = args.root / "run" / "svc" / f"{args.service}.pid"
    with open(args.root / "var" / "log" / "svc.log", "a") as f:
        f.write(f"{args.action} {args.service}\n")
    spec = specs.get(args.service)
    if spec is None:  # not runnable here: recorded only
        return 0
    if args.action == "status":
        return 0 if running(pidfile) is not None else 3
    if args.action in ("stop", "restart"):
        stop(pidfile)
    if args.action in ("start", "restart"):
        start(spec, pidfile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
