"""The Ansible role, run for real with ansible-playbook against this machine.

The target is a stock Debian/Ubuntu Jitsi Meet layout under a temporary root
(``tests/fixtures/jitsi-debian``: Prosody's <domain>.cfg.lua with the stock
conference component and module list, jicofo.conf, config.js, and Debian's
own prometheus.yml), with Debian's Prosody 0.12 running from it. systemd
cannot run here: the role's ``jitsi_captions_service_manager: command`` hands
every restart to ``tests/ansible_svc.py``, which runs Prosody and the sidecar
as background processes and records the rest (Jicofo, Prometheus and Grafana
are not installed here). The sidecar goes into a fresh virtualenv from a wheel
of this checkout; its dependencies come from the project's virtualenv through
``jitsi_captions_venv_extra_site_dirs`` (no network here).

Checked: nothing stock is lost (the module lists before and after, read by
Lua the way Prosody reads them, and every stock line still there), Prosody's
config check passes and Prosody runs mod_captions, the sidecar answers its
health check, the role's own dial through Prosody gets its answer, Jicofo's
and config.js' blocks parse, secrets stay out of the output; a second run
changes nothing and restarts nothing; ``--check --diff`` shows a change
without making it; ansible-lint passes.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path

import pytest

from tests.prosody import free_port

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "jitsi-debian"
ANSIBLE = ROOT / "ansible"
DOMAIN = "meet.test"
FOCUS_PASSWORD = "Fq3kzX9pLw2v"  # the fixture jicofo.conf's
BIN = Path(sys.executable).parent

# Jitsi's own Prosody plugins that the stock config names and Prosody lacks
JITSI_PLUGINS = [
    "muc_meeting_id", "muc_domain_mapper", "polls", "muc_rate_limit", "speakerstats",
    "conference_duration", "end_conference", "muc_lobby_rooms", "muc_breakout_rooms",
    "av_moderation", "limits_exception", "client_proxy", "speakerstats_component",
    "conference_duration_component", "av_moderation_component",
]  # fmt: skip

# Reads a Prosody config the way Prosody's configmanager does (sections opened
# by VirtualHost/Component, options assigned to the current one) and prints
# "section<TAB>option<TAB>value", DECL lines per section and DUP lines for an
# option set twice in one section (Prosody keeps the last one).
LUA_READER = r"""
local sections, order, cur = {}, {}, "*"
local function sec(name)
  if not sections[name] then sections[name] = {}; order[#order + 1] = name end
  return sections[name]
end
sec("*")
local env = setmetatable({}, {
  __index = function(_, k)
    if k == "VirtualHost" or k == "Component" then
      return function(name)
        print("DECL\t" .. name); cur = name; sec(name)
        return function() return function() end end
      end
    elseif k == "Include" then
      return function() end
    end
  end,
  __newindex = function(_, k, v)
    local s = sec(cur)
    if s[k] ~= nil then print("DUP\t" .. cur .. "\t" .. k) end
    s[k] = v
  end,
})
assert(loadfile(arg[1], "t", env))()
for _, name in ipairs(order) do
  for k, v in pairs(sections[name]) do
    if type(v) == "table" then
      local items = {}
      for _, x in ipairs(v) do if type(x) == "string" then items[#items + 1] = x end end
      print(name .. "\t" .. k .. "\t" .. table.concat(items, ","))
    else
      print(name .. "\t" .. k .. "\t" .. tostring(v))
    end
  end
end
"""


def read_prosody_config(path: Path, tmp: Path) -> tuple[dict[str, dict[str, str]], list[str]]:
    reader = tmp / "reader.lua"
    reader.write_text(LUA_READER)
    out = subprocess.run(
        ["lua5.4", str(reader), str(path)], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    sections: dict[str, dict[str, str]] = {}
    notes: list[str] = []
    for line in out.splitlines():
        parts = line.split("\t")
        if parts[0] in ("DECL", "DUP"):
            notes.append(line)
        else:
            sections.setdefault(parts[0], {})[parts[1]] = parts[2]
    return sections, notes


def need(*programs: str) -> None:
    for p in programs:
        if shutil.which(p) is None and not (BIN / p).exists():
            pytest.skip(f"{p} is not installed (scripts/bootstrap.sh installs it)")


class Target:
    """The temporary root laid out as a stock Jitsi Meet host."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.root = tmp / "root"
        self.c2s = free_port()
        self.http = free_port()
        self.sidecar_http = free_port()
        self.sidecar_grpc = free_port()
        r = self.root
        self.domain_cfg = r / "etc/prosody/conf.avail" / f"{DOMAIN}.cfg.lua"
        self.main_cfg = r / "etc/prosody/prosody.cfg.lua"
        self.jicofo = r / "etc/jitsi/jicofo/jicofo.conf"
        self.meet = r / "etc/jitsi/meet" / f"{DOMAIN}-config.js"
        self.prometheus = r / "etc/prometheus/prometheus.yml"
        self.svc_log = r / "var/log/svc.log"

    def fill(self, text: str) -> str:
        return (
            text.replace("@ROOT@", str(self.root))
            .replace("@C2S_PORT@", str(self.c2s))
            .replace("@HTTP_PORT@", str(self.http))
        )

    @property
    def deps(self) -> Path:
        return self.tmp / "deps"

    def link_dependencies(self) -> None:
        """The project's dependencies, without the project: what a wheelhouse would hold."""
        self.deps.mkdir()
        for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
            if "jitsi_captions_sidecar" not in entry.name and not entry.name.endswith(".pth"):
                (self.deps / entry.name).symlink_to(entry)

    def prepare(self) -> None:
        self.link_dependencies()
        r = self.root
        for d in (
            "etc/prosody/conf.avail", "etc/prosody/conf.d", "etc/prosody/certs",
            "etc/jitsi/jicofo", "etc/jitsi/meet", "etc/prometheus", "etc/grafana/provisioning",
            "etc/systemd/system", "var/lib/prosody", "var/log/prosody", "run/prosody",
            "usr/share/jitsi-meet/prosody-plugins", "opt", "usr/local/lib",
        ):  # fmt: skip
            (r / d).mkdir(parents=True, exist_ok=True)
        self.domain_cfg.write_text(self.fill((FIXTURES / "prosody-domain.cfg.lua").read_text()))
        (r / "etc/prosody/conf.d" / f"{DOMAIN}.cfg.lua").symlink_to(self.domain_cfg)
        self.main_cfg.write_text(self.fill((FIXTURES / "prosody.cfg.lua").read_text()))
        shutil.copy(FIXTURES / "jicofo.conf", self.jicofo)
        shutil.copy(FIXTURES / "meet-config.js", self.meet)
        # Debian's own prometheus.yml (the prometheus package's sample config)
        stock = Path("/etc/prometheus/prometheus.yml")
        if stock.is_file():
            shutil.copy(stock, self.prometheus)
        else:
            pytest.skip("prometheus is not installed (apt-get install prometheus)")
        for name in JITSI_PLUGINS:
            (r / "usr/share/jitsi-meet/prosody-plugins" / f"mod_{name}.lua").write_text(
                f'module:log("debug", "stand-in for Jitsi\'s mod_{name} (not installed here)");\n'
            )
        (r / "var/log/svc.log").touch()
        venv = r / "opt/jitsi-captions/venv"
        (r / "svc.json").write_text(
            json.dumps(
                {
                    "prosody": {
                        "argv": ["prosody", "--config", str(self.main_cfg), "-F"],
                        "port": self.c2s,
                        "log": str(r / "var/log/prosody/stdout.log"),
                    },
                    "captions-sidecar": {
                        "argv": [
                            str(venv / "bin/captions-sidecar"),
                            "serve",
                            "--config",
                            str(r / "etc/jitsi-captions/sidecar.toml"),
                        ],
                        "port": self.sidecar_http,
                        "log": str(r / "var/log/captions-sidecar.log"),
                        "env": {"HF_HUB_OFFLINE": "1"},
                    },
                }
            )
        )

    def prosodyctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["prosodyctl", "--config", str(self.main_cfg), *args],
            capture_output=True,
            text=True,
            timeout=60,
        )

    def svc(self, action: str, service: str) -> None:
        subprocess.run(
            [
                sys.executable,
                str(ROOT / "tests/ansible_svc.py"),
                "--root",
                str(self.root),
                action,
                service,
            ],
            check=True,
            timeout=180,
        )

    def variables(self, wheelhouse: Path) -> dict[str, object]:
        r = self.root
        return {
            "jitsi_captions_domain": DOMAIN,
            "jitsi_captions_prosody_config_dir": str(r / "etc/prosody"),
            "jitsi_captions_prosody_data_dir": str(r / "var/lib/prosody"),
            "jitsi_captions_jitsi_plugins_dir": str(r / "usr/share/jitsi-meet/prosody-plugins"),
            "jitsi_captions_jicofo_config": str(self.jicofo),
            "jitsi_captions_meet_config": str(self.meet),
            "jitsi_captions_install_dir": str(r / "opt/jitsi-captions"),
            "jitsi_captions_config_dir": str(r / "etc/jitsi-captions"),
            "jitsi_captions_store_dir": str(r / "var/lib/jitsi-captions/transcripts"),
            "jitsi_captions_plugin_dir": str(r / "usr/local/lib/jitsi-captions/prosody-module"),
            "jitsi_captions_systemd_dir": str(r / "etc/systemd/system"),
            "jitsi_captions_prometheus_config_dir": str(r / "etc/prometheus"),
            "jitsi_captions_grafana_provisioning_dir": str(r / "etc/grafana/provisioning"),
            "jitsi_captions_grafana_dashboards_dir": str(r / "var/lib/grafana/dashboards/captions"),
            "jitsi_captions_prosodyctl": f"prosodyctl --config {self.main_cfg}",
            "jitsi_captions_python": sys.executable,
            "jitsi_captions_wheelhouse": str(wheelhouse),
            "jitsi_captions_pip_extra_args": "--no-deps",
            "jitsi_captions_venv_extra_site_dirs": [str(self.deps)],
            "jitsi_captions_manage_user": False,
            "jitsi_captions_user": "root",
            "jitsi_captions_group": "root",
            "jitsi_captions_service_manager": "command",
            "jitsi_captions_service_command": (
                f"{sys.executable} {ROOT / 'tests/ansible_svc.py'} --root {r}"
            ),
            "jitsi_captions_http_listen": f"127.0.0.1:{self.sidecar_http}",
            "jitsi_captions_grpc_listen": f"127.0.0.1:{self.sidecar_grpc}",
            "jitsi_captions_xmpp_port": self.c2s,
            "jitsi_captions_xmpp_starttls": False,
            "jitsi_captions_prosody_http_port": self.http,
            "jitsi_captions_js_check": "node --check %s",
            "jitsi_captions_retention_days": 30,
        }


def playbook(vars_file: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """One ansible-playbook run; its whole output is kept next to vars_file (run-N.log)."""
    env = {
        # not the checkout's PYTHONPATH: the role's virtualenv must find its own sidecar
        **{k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        "ANSIBLE_CONFIG": str(ANSIBLE / "ansible.cfg"),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_FORCE_COLOR": "0",
        "ANSIBLE_LOCAL_TEMP": str(vars_file.parent / "ansible-tmp"),
        "ANSIBLE_REMOTE_TEMP": str(vars_file.parent / "ansible-tmp"),
        "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
    }
    out = subprocess.run(
        [
            str(BIN / "ansible-playbook"),
            "-i", "localhost,", "-c", "local",
            "-e", "ansible_python_interpreter=" + sys.executable,
            "-e", f"@{vars_file}",
            str(ANSIBLE / "tests/localhost.yml"),
            *extra,
        ],
        capture_output=True, text=True, timeout=900, env=env, cwd=str(ANSIBLE),
    )  # fmt: skip
    n = len(list(vars_file.parent.glob("run-*.log"))) + 1
    (vars_file.parent / f"run-{n}.log").write_text(out.stdout + out.stderr)
    return out


def recap(out: str) -> dict[str, int]:
    m = re.search(r"localhost\s*:\s*(.*)", out.split("PLAY RECAP")[-1])
    assert m, out[-3000:]
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(1))}


# the lists the role adds to (checked separately above)
EDITED = {
    (f"conference.{DOMAIN}", "modules_enabled"),
    ("*", "plugin_paths"),
    (DOMAIN, "modules_enabled"),
}


def conference_modules(sections: dict[str, dict[str, str]]) -> list[str]:
    return sections[f"conference.{DOMAIN}"]["modules_enabled"].split(",")


@pytest.mark.ansible
@pytest.mark.slow
def test_the_role_installs_onto_a_stock_jitsi_and_a_second_run_changes_nothing(
    tmp_path: Path,
) -> None:
    need("ansible-playbook", "prosody", "prosodyctl", "luac", "lua5.4", "promtool", "node", "hocon")
    t = Target(tmp_path)
    t.prepare()
    stock_text = t.domain_cfg.read_text()
    stock, _ = read_prosody_config(t.domain_cfg, tmp_path)
    stock_jicofo = t.jicofo.read_text()
    stock_meet = t.meet.read_text()

    # a wheel of this checkout: what the operator's wheelhouse holds
    wheelhouse = tmp_path / "wheelhouse"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(wheelhouse), str(ROOT)],
        check=True, capture_output=True, timeout=300, cwd=str(tmp_path),
    )  # fmt: skip
    # the stock host: Prosody running, Jicofo's account registered as its postinst does
    stock_check = t.prosodyctl("check", "config")
    reg = t.prosodyctl("register", "focus", f"auth.{DOMAIN}", FOCUS_PASSWORD)
    assert reg.returncode == 0, reg.stdout + reg.stderr
    t.svc("start", "prosody")
    vars_file = tmp_path / "vars.json"
    vars_file.write_text(json.dumps(t.variables(wheelhouse)))
    try:
        t0 = time.monotonic()
        first = playbook(vars_file)
        first_s = time.monotonic() - t0
        assert first.returncode == 0, first.stdout[-6000:] + first.stderr[-3000:]
        assert recap(first.stdout)["failed"] == 0
        assert "dial answered in captions-check-" in first.stdout, first.stdout[-4000:]

        # -- Prosody's config: nothing stock lost, one component, one list ------
        after, notes = read_prosody_config(t.domain_cfg, tmp_path)
        assert not [n for n in notes if n.startswith("DUP")], notes
        assert notes.count(f"DECL\tconference.{DOMAIN}") == 1
        mods = conference_modules(after)
        assert mods[: len(conference_modules(stock))] == conference_modules(stock)
        assert set(mods) - set(conference_modules(stock)) == {"captions", "muc_password_whitelist"}
        for name, options in stock.items():  # every other stock option and list as it was
            for key, value in options.items():
                if (name, key) in EDITED:
                    continue
                assert after[name][key] == value, (name, key)
        assert after[DOMAIN]["modules_enabled"].split(",")[:-1] == stock[DOMAIN][
            "modules_enabled"
        ].split(",")
        assert after["*"]["plugin_paths"].split(",")[0] == stock["*"]["plugin_paths"]
        hidden = f"recorder.{DOMAIN}"
        assert after[hidden]["authentication"] == "internal_hashed"
        assert after[DOMAIN]["muc_lobby_whitelist"] == hidden
        assert after[DOMAIN]["visitors_ignore_list"] == hidden
        conf = after[f"conference.{DOMAIN}"]
        assert conf["muc_password_whitelist"] == f"focus@auth.{DOMAIN},transcriber@{hidden}"
        assert conf["captions_sidecar_url"] == f"http://127.0.0.1:{t.sidecar_http}"
        # every stock line is still there, in order; only plugin_paths was rewritten
        new_lines = t.domain_cfg.read_text().splitlines()
        diff = difflib.ndiff(stock_text.splitlines(), new_lines)
        missing = [line[2:] for line in diff if line.startswith("- ")]
        assert [m.split("=")[0].strip() for m in missing] == ["plugin_paths"], missing
        # Prosody's own check finds nothing the stock file did not already draw
        # (the stock template's obsolete cross_domain_bosh)
        check = t.prosodyctl("check", "config")
        assert set(check.stdout.splitlines()) == set(stock_check.stdout.splitlines()), check.stdout
        assert "cross_domain_bosh" in stock_check.stdout
        subprocess.run(["luac", "-p", str(t.domain_cfg)], check=True, timeout=30)

        # -- Prosody runs the module; the sidecar is healthy -------------------
        plog = (t.root / "var/log/prosody/prosody.log").read_text()
        assert f"Captions for conference.{DOMAIN} through" in plog, plog[-3000:]
        with urllib.request.urlopen(f"http://127.0.0.1:{t.sidecar_http}/healthz", timeout=10) as r:
            assert json.loads(r.read())["status"] == "ok"
        with urllib.request.urlopen(f"http://127.0.0.1:{t.http}/metrics", timeout=10) as r:
            assert "prosody_mod_captions__dial_iqs_total" in r.read().decode()

        # -- Jicofo, config.js, Prometheus, Grafana, the unit ------------------
        token = (t.root / "etc/jitsi-captions/token").read_text().strip()
        assert len(token) >= 32
        assert (t.root / "etc/jitsi-captions/token").stat().st_mode & 0o777 == 0o640
        jicofo = t.jicofo.read_text()
        assert jicofo.startswith(stock_jicofo.rstrip("\n"))
        from pyhocon import ConfigFactory  # type: ignore[import-untyped]

        hocon = ConfigFactory.parse_string(jicofo)
        assert hocon["jicofo.xmpp.trusted-domains"] == [hidden]  # already trusted: not twice
        assert hocon["jicofo.xmpp.client.password"] == FOCUS_PASSWORD
        assert hocon["jicofo.transcription.url-template"] == (
            f"ws://127.0.0.1:{t.sidecar_http}/mediajson/{{{{MEETING_ID}}}}"
        )
        assert hocon["jicofo.transcription.http-headers.Authorization"] == f"Bearer {token}"
        meet = t.meet.read_text()
        assert meet.startswith(stock_meet.rstrip("\n"))
        shown = subprocess.run(
            ["node", "-e", "eval(require('fs').readFileSync(process.argv[1], 'utf8'));"
             "console.log(JSON.stringify({h: config.hiddenDomain, t: config.transcription,"
             " b: config.toolbarButtons, m: config.hosts.muc}))", str(t.meet)],
            capture_output=True, text=True, check=True, timeout=30,
        )  # fmt: skip
        js = json.loads(shown.stdout)
        assert (
            js["h"] == hidden and js["t"]["enabled"] is True and js["m"] == f"conference.{DOMAIN}"
        )
        assert js["b"].count("closedcaptions") == 1 and "camera" in js["b"]
        prom = subprocess.run(
            ["promtool", "check", "config", str(t.prometheus)], capture_output=True, text=True
        )
        assert prom.returncode == 0, prom.stdout + prom.stderr
        assert "job_name: captions-sidecar" in t.prometheus.read_text()
        assert (t.root / "var/lib/grafana/dashboards/captions/captions-overview.json").is_file()
        unit = (t.root / "etc/systemd/system/captions-sidecar.service").read_text()
        for hardening in ("NoNewPrivileges=true", "ProtectSystem=strict", "User=root"):
            assert hardening in unit
        if shutil.which("systemd-analyze"):
            ana = subprocess.run(["systemd-analyze", "verify", "--man=no", str(
                t.root / "etc/systemd/system/captions-sidecar.service")],
                capture_output=True, text=True)  # fmt: skip
            assert "Unknown" not in ana.stderr, ana.stderr

        # -- secrets never in the output ----------------------------------------
        xmpp_pw = (t.root / "etc/jitsi-captions/xmpp-password").read_text().strip()
        for secret in (token, xmpp_pw, FOCUS_PASSWORD):
            assert secret not in first.stdout + first.stderr

        # -- what the first run restarted: each service once --------------------
        restarts = [ln for ln in t.svc_log.read_text().splitlines() if ln.startswith("restart")]
        for service in ("prosody", "jicofo", "captions-sidecar", "prometheus", "grafana-server"):
            assert restarts.count(f"restart {service}") == 1, restarts

        # -- second run: no change, no restart ------------------------------------
        before = t.svc_log.read_text()
        t0 = time.monotonic()
        second = playbook(vars_file)
        second_s = time.monotonic() - t0
        assert second.returncode == 0, second.stdout[-6000:]
        assert recap(second.stdout)["changed"] == 0, changed_tasks(second.stdout)
        assert (t.root / "etc/jitsi-captions/token").read_text().strip() == token
        assert [
            ln
            for ln in t.svc_log.read_text()[len(before) :].splitlines()
            if ln.startswith("restart")
        ] == []

        # -- --check --diff: shows a change, makes none ------------------------------
        text = t.domain_cfg.read_text()
        dry = playbook(vars_file, "--check", "--diff", "-e", "jitsi_captions_language=de-DE")
        assert dry.returncode == 0, dry.stdout[-6000:]
        assert '+    captions_language = "de-DE"' in dry.stdout, dry.stdout[-4000:]
        assert recap(dry.stdout)["changed"] >= 1
        assert t.domain_cfg.read_text() == text
        print(f"\nfirst run {first_s:.0f} s, second run {second_s:.0f} s")
    finally:
        for service in ("captions-sidecar", "prosody"):
            t.svc("stop", service)


def changed_tasks(out: str) -> list[str]:
    tasks, current = [], ""
    for line in out.splitlines():
        if line.startswith("TASK ["):
            current = line
        elif line.startswith("changed:"):
            tasks.append(current)
    return tasks


@pytest.mark.ansible
def test_ansible_lint_passes() -> None:
    need("ansible-lint")
    out = subprocess.run(
        [str(BIN / "ansible-lint"), "--offline", "--nocolor", "playbook.yml", "roles"],
        capture_output=True, text=True, timeout=600, cwd=str(ANSIBLE),
        env={**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
             "ANSIBLE_CONFIG": str(ANSIBLE / "ansible.cfg")},
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]


def test_every_variable_is_documented() -> None:
    """Each admin toggle: in defaults/main.yml, meta/argument_specs.yml and the README."""
    import yaml

    role = ANSIBLE / "roles/jitsi_captions"
    defaults = yaml.safe_load((role / "defaults/main.yml").read_text())
    specs = yaml.safe_load((role / "meta/argument_specs.yml").read_text())
    options = specs["argument_specs"]["main"]["options"]
    readme = (role / "README.md").read_text()
    assert set(defaults) == set(options)
    for name, value in defaults.items():
        assert name.startswith("jitsi_captions_"), name
        assert f"| `{name}` |" in readme, name
        assert options[name]["description"].strip(), name
        if "default" in options[name]:
            assert options[name]["default"] == value, name
    for toggle in ("provider", "languages", "transcription_mode", "captions_mode", "trigger",
                   "silence_duration_ms", "max_speech_caption_ms", "storage", "retention_days",
                   "interim_results", "grpc_listen", "http_listen", "token"):  # fmt: skip
        assert f"jitsi_captions_{toggle}" in defaults, toggle


def render_prosody_edit(tmp: Path, text: str) -> str:
    """The role's Prosody edit (templates/prosody-domain.cfg.lua.j2) applied to text."""
    src, out = tmp / "in.cfg.lua", tmp / "out.cfg.lua"
    src.write_text(text)
    play = tmp / "render.yml"
    role = ANSIBLE / "roles/jitsi_captions"
    play.write_text(
        "- hosts: localhost\n  gather_facts: false\n"
        f"  vars_files: ['{role}/defaults/main.yml']\n"
        "  vars: {jitsi_captions__text: "
        f"\"{{{{ lookup('file', '{src}') }}}}\\n\"}}\n"
        "  tasks:\n    - ansible.builtin.template:\n"
        f"        src: {role}/templates/prosody-domain.cfg.lua.j2\n"
        f"        dest: {out}\n        mode: '0644'\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run(
        [str(BIN / "ansible-playbook"), "-i", "localhost,", "-c", "local",
         "-e", "ansible_python_interpreter=" + sys.executable,
         "-e", "jitsi_captions_domain=meet.test", str(play)],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:]
    return out.read_text()


def test_a_newer_stock_config_keeps_its_hidden_domain_and_whitelists(tmp_path: Path) -> None:
    """Where the stock file already has the hidden VirtualHost and a lobby
    whitelist, the edit adds no second host and puts the domain in the list once."""
    need("ansible-playbook", "lua5.4")
    stock = (FIXTURES / "prosody-domain.cfg.lua").read_text().replace("@ROOT@", "")
    stock = stock.replace(
        '    -- muc_lobby_whitelist = { "recorder.meet.test" }',
        '    muc_lobby_whitelist = { "jibri.meet.test" }',
    ) + ('\nVirtualHost "recorder.meet.test"\n    modules_enabled = {\n        "smacks";\n    }\n'
         '    authentication = "internal_hashed"\n')  # fmt: skip
    once = render_prosody_edit(tmp_path, stock)
    twice = render_prosody_edit(tmp_path, once)
    assert twice == once
    (tmp_path / "once.cfg.lua").write_text(once)
    sections, notes = read_prosody_config(tmp_path / "once.cfg.lua", tmp_path)
    assert notes.count("DECL\trecorder.meet.test") == 1
    assert not [n for n in notes if n.startswith("DUP")], notes
    assert sections["recorder.meet.test"]["modules_enabled"] == "smacks"
    assert sections["meet.test"]["muc_lobby_whitelist"] == "recorder.meet.test,jibri.meet.test"
    assert "captions" in sections["conference.meet.test"]["modules_enabled"].split(",")
