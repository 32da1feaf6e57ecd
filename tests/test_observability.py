"""Dashboards and alert rules against a real Prometheus, sidecar and Prosody.

The fast tests check the committed files: they are what
``dashboards/generate.py`` writes, they follow the provisioning habits
(stable uid, a datasource variable, a description on every panel, sorted
keys) and ``promtool check rules`` / ``promtool test rules`` accept the alert
rules and see each alert fire on the series it is about.

The slow test starts Debian's Prometheus scraping a running sidecar (fed by
the conference simulator over the videobridge socket, with mod_captions'
dials coming through a real Prosody 0.12 whose OpenMetrics endpoint is
scraped too) and runs every PromQL expression of every panel, variable and
alert: each must parse, each panel must return a number, and every metric
named must be one the sidecar (or, for ``prosody_*``, Prosody) exports.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import math
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
DASH = ROOT / "dashboards"
RULES = DASH / "captions-alerts.rules.yml"


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("dash_generate", DASH / "generate.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    return path


# -- the committed files ---------------------------------------------------------


def test_committed_files_are_what_the_generator_writes(tmp_path: Path) -> None:
    gen = generator()
    assert gen.main(["--check"]) == 0, "run `make dashboards` and commit the result"
    # and --check does notice a difference
    gen.main(["--out", str(tmp_path)])
    (tmp_path / "captions-overview.json").write_text("{}\n")
    assert gen.main(["--check", "--out", str(tmp_path)]) == 1


def test_dashboards_follow_the_provisioning_habits() -> None:
    uids = set()
    for name in ("captions-overview.json", "captions-capacity.json"):
        text = (DASH / name).read_text()
        d = json.loads(text)
        assert text == json.dumps(d, indent=2, sort_keys=True, ensure_ascii=False) + "\n", name
        assert "__inputs" not in d and d["uid"].startswith("jitsi-captions-"), name
        uids.add(d["uid"])
        variables = {v["name"]: v for v in d["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource"
        assert variables["datasource"]["query"] == "prometheus"
        assert d["panels"], name
        ids = [p["id"] for p in d["panels"]]
        assert len(set(ids)) == len(ids)
        for p in d["panels"]:
            assert p["description"].strip(), (name, p["title"])
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert p["targets"] and all(t["expr"] for t in p["targets"])
            assert all(t["datasource"]["uid"] == "${datasource}" for t in p["targets"])
    assert len(uids) == 2


def test_promtool_accepts_the_rules_and_each_alert_fires() -> None:
    tool = promtool()
    out = subprocess.run(
        [tool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 5 rules found" in out.stdout
    # promtool's unit tests: synthetic series in, the alerts that must fire out
    out = subprocess.run(
        [tool, "test", "rules", str(DASH / "captions-alerts.test.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr


# -- against a running Prometheus ------------------------------------------------------

METRIC_RE = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{")
SUFFIXES = ("_bucket", "_count", "_sum", "_total", "_created")


def substitute(expr: str) -> str:
    return (
        expr.replace("$__rate_interval", "1m")
        .replace("$prosody_instance", ".*")
        .replace("$instance", ".*")
        .replace("$job", "captions-sidecar")
    )


def exported_names(text: str) -> set[str]:
    names = set()
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line)
            if name:
                names.add(name.group(0))
    return names


def get_json(url: str) -> dict:  # type: ignore[type-arg]
    with urllib.request.urlopen(url, timeout=30) as resp:
        return json.loads(resp.read())  # type: ignore[no-any-return]


def query(base: str, expr: str) -> dict:  # type: ignore[type-arg]
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        return get_json(url)
    except urllib.error.HTTPError as e:  # 400 for a parse error: the body says why
        return json.loads(e.read())  # type: ignore[no-any-return]


def start_prometheus(tmp_path: Path, sidecar_port: int, prosody_port: int) -> tuple[Any, str]:
    """Debian's Prometheus scraping the sidecar and Prosody every second, with the rules."""
    prom_bin = shutil.which("prometheus")
    assert prom_bin is not None
    from tests.prosody import free_port

    port = free_port()
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"rule_files: ['{RULES}']\n"
        "scrape_configs:\n"
        "  - job_name: captions-sidecar\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{sidecar_port}']}}]\n"
        "  - job_name: prosody\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{prosody_port}']}}]\n"
    )
    log = tmp_path / "prometheus.log"
    proc = subprocess.Popen(
        [
            prom_bin,
            f"--config.file={cfg}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=log.open("wb"),
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{base}/-/ready", timeout=2).close()
            return proc, base
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise AssertionError("prometheus did not get ready:\n" + log.read_text()) from None
            time.sleep(0.2)


def check_everything(base: str, sidecar_url: str, prosody_url: str) -> None:
    """Every panel, variable and alert of the generator against Prometheus."""
    gen = generator()
    sidecar_names = exported_names(fetch_text(sidecar_url))
    prosody_names = exported_names(fetch_text(prosody_url))

    def known(name: str) -> bool:
        if name == "up":
            return True
        pool = prosody_names if name.startswith("prosody_") else sidecar_names
        return name in pool or any(name + s in pool for s in SUFFIXES)

    # every panel target parses and names only exported metrics; every panel
    # returns at least one number
    empty = []
    for dash_name, d_json in gen.DASHBOARDS.items():
        for p in d_json["panels"]:
            values = []
            for t in p["targets"]:
                for name in METRIC_RE.findall(t["expr"]):
                    assert known(name), f"{dash_name} / {p['title']}: {name} is not exported"
                got = query(base, substitute(t["expr"]))
                assert got["status"] == "success", (dash_name, p["title"], t["expr"], got)
                values += [float(r["value"][1]) for r in got["data"]["result"]]
            if not any(math.isfinite(v) for v in values):
                empty.append(f"{dash_name} / {p['title']}: {values}")
        # the variables' label_values() name exported metrics that have series
        for v in d_json["templating"]["list"]:
            if v["type"] == "query":
                for name in re.findall(r"label_values\((\w+)", v["definition"]):
                    assert known(name), (dash_name, v["name"], name)
                    got = query(base, f"count({name})")
                    assert got["data"]["result"], (dash_name, v["name"])
    counts = {
        e: query(base, e)["data"]["result"]
        for e in (
            "sum by (kind) (captions_captions_total)",
            "captions_first_interim_latency_seconds_count",
            "sum by (kind, outcome) (captions_scheduler_jobs_total)",
        )
    }
    assert not empty, "panels without data:\n" + "\n".join(empty) + f"\n{counts}"

    # every alert parses, runs, is loaded by Prometheus and evaluates cleanly
    for alert in gen.ALERTS:
        for name in METRIC_RE.findall(alert.expr):
            assert known(name), f"{alert.name}: {name} is not exported"
        got = query(base, alert.expr)
        assert got["status"] == "success", (alert.name, got)
    rules = get_json(f"{base}/api/v1/rules")["data"]["groups"][0]["rules"]
    assert {r["name"] for r in rules} == {a.name for a in gen.ALERTS}
    assert all(r["health"] == "ok" for r in rules), rules

    # a few facts the dashboards show, as Prometheus sees them
    up = query(base, 'up{job="captions-sidecar"}')["data"]["result"]
    assert up and up[0]["value"][1] == "1"
    dials = query(base, "sum by (outcome) (prosody_mod_captions__dial_iqs_total)")
    outcomes = {r["metric"]["outcome"] for r in dials["data"]["result"]}
    assert {"accepted", "forbidden"} <= outcomes, outcomes
    calls = query(base, 'sum by (transport) (captions_api_requests_total{code="OK"})')
    assert {r["metric"]["transport"] for r in calls["data"]["result"]} == {"grpc", "grpc-web"}
    audio = query(base, "sum(captions_recognised_audio_seconds_total)")["data"]["result"]
    assert audio and float(audio[0]["value"][1]) > 5, audio


@pytest.mark.slow
async def test_every_panel_and_alert_runs_against_a_real_prometheus(tmp_path: Path) -> None:
    if shutil.which("prometheus") is None:
        pytest.skip("prometheus is not installed (apt-get install prometheus)")
    from sidecar.audio import SAMPLE_RATE, load_audio
    from sidecar.sim.conference import SimConfig, SimParticipant, run_conference
    from tests.conftest import librivox
    from tests.prosody import free_port
    from tests.test_prosody_module import moderated_room

    openmetrics_port = free_port()
    async with prosody_deployment(tmp_path, openmetrics_port) as d:
        sidecar = d.sidecar
        assert sidecar is not None
        prom, base = await asyncio.to_thread(
            start_prometheus, tmp_path, sidecar.ports.http, openmetrics_port
        )
        try:
            # Prosody: a refused dial (not a moderator) and an accepted one
            focus, alice, bob = await moderated_room(d)
            bob.set_property("requestingTranscription", "true")
            assert (await bob.dial()).get("type") == "error"
            alice.set_property("requestingTranscription", "true")
            assert (await alice.dial()).get("type") == "result"
            # the simulator: two speakers of real speech (long enough for interims)
            # and two listeners over the videobridge socket, with loss and
            # duplicates, the roster over native gRPC
            from prometheus_client import REGISTRY

            def finals_published() -> float:
                return (
                    REGISTRY.get_sample_value("captions_captions_total", {"kind": "final"}) or 0.0
                )

            finals_before = finals_published()
            (wav_a, ref_a), (wav_b, ref_b) = librivox()[:2]
            after_a = 1.0 + len(load_audio(wav_a)) / SAMPLE_RATE
            report = await run_conference(
                SimConfig(
                    participants=[
                        SimParticipant("Alice Liddell", text=ref_a, audio=wav_a),
                        SimParticipant("Bob", text=ref_b, audio=wav_b, offset=after_a),
                    ],
                    url=f"ws://127.0.0.1:{sidecar.ports.http}/mediajson/meeting-prom",
                    room="prom@conference.localhost",
                    token=TOKEN,
                    grpc=f"127.0.0.1:{sidecar.ports.grpc}",
                    listeners=2,
                    loss=0.01,
                    duplicate=0.02,
                    seed=3,
                )
            )
            assert report.errors == []
            # (accuracy is test_simulator's business: here the metrics must move).
            # The transcriber occupant is in the room, so the captions took the
            # MUC, not the bridge socket the simulator listens on (one carrier)
            assert finals_published() > finals_before, report.to_markdown()
            await asyncio.sleep(4)  # a few more scrapes and rule evaluations
            await asyncio.to_thread(
                check_everything,
                base,
                f"http://127.0.0.1:{sidecar.ports.http}/metrics",
                f"http://127.0.0.1:{openmetrics_port}/metrics",
            )
        finally:
            prom.terminate()
            await asyncio.to_thread(prom.wait, 20)


def fetch_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as resp:
        return resp.read().decode()  # type: ignore[no-any-return]


TOKEN = "tok-5bd1c07e-never-in-a-log"


def prosody_deployment(tmp_path: Path, openmetrics_port: int):  # type: ignore[no-untyped-def]
    """mod_captions in Prosody with statistics and its OpenMetrics endpoint on,
    a sidecar whose transcriber logs into it (tests/test_prosody_module's)."""
    import contextlib

    from tests.prosody import DOMAIN, HIDDEN, free_port, make_prosody
    from tests.test_prosody_module import AUTH, PLUGINS, Deployment
    from tests.test_prosody_module import TOKEN as MODULE_TOKEN

    assert MODULE_TOKEN == TOKEN

    @contextlib.asynccontextmanager
    async def run():  # type: ignore[no-untyped-def]
        http_port = free_port()
        token_file = tmp_path / "captions-token"
        token_file.write_text(TOKEN + "\n")
        opts = {
            "captions_sidecar_url": f'"http://127.0.0.1:{http_port}"',
            "captions_token_file": f'"{token_file}"',
            "captions_exclude_domains": f'{{ "{AUTH}" }}',
        }
        prosody = make_prosody(
            tmp_path,
            plugin_paths=[PLUGINS],
            extra_modules=["captions"],
            extra_hosts=[AUTH],
            global_modules=["http_openmetrics"],
            global_options='statistics = "internal"',
            http_port=openmetrics_port,
            muc_options="".join(f"  {k} = {v}\n" for k, v in opts.items()),
        )
        prosody.start()
        prosody.register("transcriber", HIDDEN, "tsecret")
        prosody.register("focus", AUTH, "fsecret")
        for user in ("alice", "bob"):
            prosody.register(user, DOMAIN, f"{user}-pw")
        d = Deployment(tmp_path, prosody, http_port)
        try:
            await d.start_sidecar(preload=True)
            yield d
        finally:
            for c in d.clients:
                c.disconnect()
            if d.sidecar is not None:
                await d.sidecar.stop(grace=0.5)
            prosody.stop()

    return run()
