#!/usr/bin/env python3
"""Writes the Grafana dashboards and the Prometheus alert rules of this folder.

    python dashboards/generate.py           # rewrite the files
    python dashboards/generate.py --check   # exit 1 if a committed file differs

Every PromQL expression lives here, once. The dashboards are provisioned
JSON (stable ``uid``, a ``datasource`` variable instead of ``__inputs``, a
description on every panel, keys sorted); the rules file is plain Prometheus
rule YAML. ``tests/test_observability.py`` runs every expression against a
real Prometheus that scrapes a real sidecar and a real Prosody.

Selectors: sidecar series are filtered by the ``job`` and ``instance``
variables (``label_values(captions_build_info, ...)``), Prosody's by
``prosody_instance``; ``$__rate_interval`` is Grafana's.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEL = 'job=~"$job",instance=~"$instance"'
PSEL = 'instance=~"$prosody_instance"'
RI = "$__rate_interval"
DS = {"type": "prometheus", "uid": "${datasource}"}

# Alert thresholds. Jitsi's own streaming Whisper service gave finals 11 s
# after speech at the median; ours are meant to be an order of magnitude
# better, so p90 over this for 10 minutes means something is wrong.
FINAL_LATENCY_TARGET_S = 2.5
RECOGNISER_ERROR_RATIO = 0.05


@dataclass
class Target:
    expr: str
    legend: str = ""


@dataclass
class Panel:
    title: str
    description: str
    targets: list[Target]
    kind: str = "timeseries"  # or "stat"
    unit: str = "short"
    width: int = 12
    height: int = 8
    extra: dict[str, object] = field(default_factory=dict)


def q(quantile: float, metric: str, by: str = "") -> Target:
    """A histogram quantile over all series of the selection."""
    group = f"le, {by}" if by else "le"
    labels = " ".join(f"{{{{{b.strip()}}}}}" for b in by.split(",")) if by else ""
    legend = f"p{round(quantile * 100)} {labels}".strip()
    return Target(
        f"histogram_quantile({quantile}, sum by ({group}) (rate({metric}_bucket{{{SEL}}}[{RI}])))",
        legend,
    )


def stat(title: str, description: str, expr: str, unit: str = "short") -> Panel:
    return Panel(title, description, [Target(expr)], kind="stat", unit=unit, width=4, height=4)


OVERVIEW: list[Panel] = [
    stat(
        "Sidecars up",
        "Sidecars Prometheus scraped successfully on their last try (up).",
        f"sum(up{{{SEL}}})",
    ),
    stat(
        "Active rooms",
        "Rooms with captions or transcription on (captions_rooms_active).",
        f"sum(captions_rooms_active{{{SEL}}})",
    ),
    stat(
        "Speakers",
        "Speaker pipelines alive: participants whose audio is being followed.",
        f"sum(captions_speaker_pipelines{{{SEL}}})",
    ),
    stat(
        "Caption subscribers",
        "Open SubscribeCaptions streams (listeners of the control API).",
        f"sum(captions_subscribers{{{SEL}}})",
    ),
    stat(
        "Rooms without audio",
        "Rooms with captions or transcription on that got no audio for a minute: the "
        "videobridge export or Jigasi stopped sending, or everyone is muted.",
        f"sum(captions_rooms_without_audio{{{SEL}}})",
    ),
    stat(
        "Transcript write errors (1h)",
        "Finals that could not be written to a transcript in the last hour. Anything above "
        "zero means lost transcript lines: check the store's disk.",
        f"sum(increase(captions_transcript_write_errors_total{{{SEL}}}[1h]))",
    ),
    Panel(
        "Final caption latency",
        "From the end of speech to the final caption being published, percentiles over all "
        f"rooms. The alert fires when p90 stays above {FINAL_LATENCY_TARGET_S} s.",
        [
            q(0.5, "captions_final_latency_seconds"),
            q(0.9, "captions_final_latency_seconds"),
            q(0.99, "captions_final_latency_seconds"),
        ],
        unit="s",
    ),
    Panel(
        "First interim latency",
        "From the start of speech to the first interim caption of the utterance.",
        [
            q(0.5, "captions_first_interim_latency_seconds"),
            q(0.9, "captions_first_interim_latency_seconds"),
        ],
        unit="s",
    ),
    Panel(
        "Captions published",
        "Interim and final captions published per second, all rooms.",
        [Target(f"sum by (kind) (rate(captions_captions_total{{{SEL}}}[{RI}]))", "{{kind}}")],
        unit="ops",
    ),
    Panel(
        "Provider mix",
        "Seconds of audio recognised per second, by provider and kind (interims decode the "
        "same audio again), and participant audio received by the provider of its room.",
        [
            Target(
                "sum by (provider, kind) "
                f"(rate(captions_recognised_audio_seconds_total{{{SEL}}}[{RI}]))",
                "recognised {{provider}} {{kind}}",
            ),
            Target(
                f"sum by (provider) (rate(captions_audio_received_seconds_total{{{SEL}}}[{RI}]))",
                "received {{provider}}",
            ),
        ],
    ),
    Panel(
        "Errors",
        "Failed recogniser decodes by provider and error, transcript lines not written, and "
        "control API calls that did not end OK (by transport and status).",
        [
            Target(
                f"sum by (provider, error) (rate(captions_recogniser_errors_total{{{SEL}}}[{RI}]))",
                "recogniser {{provider}} {{error}}",
            ),
            Target(
                f"sum(rate(captions_transcript_write_errors_total{{{SEL}}}[{RI}]))",
                "transcript writes",
            ),
            Target(
                "sum by (transport, code) "
                f'(rate(captions_api_requests_total{{{SEL},code!="OK"}}[{RI}]))',
                "API {{transport}} {{code}}",
            ),
        ],
        unit="ops",
    ),
    Panel(
        "Control API calls",
        "Calls answered per second on native gRPC and gRPC-Web (what Prosody uses), by "
        "method and final status.",
        [
            Target(
                "sum by (transport, method, code) "
                f"(rate(captions_api_requests_total{{{SEL}}}[{RI}]))",
                "{{transport}} {{method}} {{code}}",
            )
        ],
        unit="ops",
    ),
    Panel(
        "Connections",
        "The transcriber's XMPP session (1 = online) and the rooms it is in; open videobridge "
        "export sockets and Jigasi (skynet) sockets.",
        [
            Target(f"sum(captions_xmpp_connected{{{SEL}}})", "XMPP online"),
            Target(f"sum(captions_xmpp_rooms_joined{{{SEL}}})", "rooms joined"),
            Target(f"sum(captions_mediajson_connections{{{SEL}}})", "videobridge sockets"),
            Target(f"sum(captions_skynet_connections_open{{{SEL}}})", "Jigasi sockets"),
        ],
    ),
    Panel(
        "Frames dropped",
        "Audio frames dropped per second, by reason (duplicate, late, oversized, corrupt, "
        "inactive room, unknown participant...).",
        [
            Target(
                f"sum by (reason) (rate(captions_frames_dropped_total{{{SEL}}}[{RI}]))",
                "{{reason}}",
            ),
            Target(f"sum(rate(captions_frames_lost_total{{{SEL}}}[{RI}]))", "lost in transit"),
        ],
        unit="ops",
    ),
    Panel(
        "Transcript writes",
        "Bytes appended to transcripts per second, and the p99 time of one append with its "
        "fsync (slow disks show here first).",
        [
            Target(
                f"sum(rate(captions_transcript_written_bytes_total{{{SEL}}}[{RI}]))",
                "bytes/s",
            ),
            q(0.99, "captions_transcript_write_seconds"),
        ],
    ),
    Panel(
        "Dial IQs (Prosody)",
        "Transcription dial IQs that mod_captions answered, by outcome, from Prosody's own "
        'OpenMetrics endpoint (statistics = "internal", mod_http_openmetrics).',
        [
            Target(
                "sum by (outcome) "
                f"(increase(prosody_mod_captions__dial_iqs_total{{{PSEL}}}[{RI}]))",
                "{{outcome}}",
            )
        ],
    ),
    Panel(
        "Prosody's calls to the sidecar",
        "Calls mod_captions made to the sidecar per second, by method and gRPC status, and "
        "the rooms it keeps on the sidecar.",
        [
            Target(
                "sum by (method, code) "
                f"(rate(prosody_mod_captions__sidecar_calls_total{{{PSEL}}}[{RI}]))",
                "{{method}} {{code}}",
            ),
            Target(f"sum(prosody_mod_captions__rooms_engaged{{{PSEL}}})", "rooms engaged"),
        ],
    ),
]

CAPACITY: list[Panel] = [
    stat(
        "Workers",
        "Recognition workers of the selected sidecars (whisper.workers).",
        f"sum(captions_scheduler_workers{{{SEL}}})",
    ),
    stat(
        "Worker use",
        "Share of worker time spent decoding over the rate interval.",
        f"sum(rate(captions_scheduler_busy_seconds_total{{{SEL}}}[{RI}])) / "
        f"sum(captions_scheduler_workers{{{SEL}}})",
        unit="percentunit",
    ),
    stat(
        "Speaker headroom",
        "About how many more speakers these sidecars can take before their workers are 80 % "
        "busy, from the worker time today's speakers cost. Meaningful only while people speak.",
        f"clamp_min(sum(captions_speaker_pipelines{{{SEL}}}) * (0.8 * "
        f"sum(captions_scheduler_workers{{{SEL}}}) / clamp_min(sum(rate("
        f"captions_scheduler_busy_seconds_total{{{SEL}}}[{RI}])), 0.001) - 1), 0)",
    ),
    stat(
        "Speakers",
        "Speaker pipelines alive now.",
        f"sum(captions_speaker_pipelines{{{SEL}}})",
    ),
    Panel(
        "CPU",
        "CPU used by each sidecar process, in cores (process_cpu_seconds_total).",
        [
            Target(
                f"sum by (instance) (rate(process_cpu_seconds_total{{{SEL}}}[{RI}]))",
                "{{instance}}",
            )
        ],
    ),
    Panel(
        "Memory",
        "Resident memory of each sidecar process (the Whisper model is most of it).",
        [Target(f"sum by (instance) (process_resident_memory_bytes{{{SEL}}})", "{{instance}}")],
        unit="bytes",
    ),
    Panel(
        "Recogniser queue",
        "Jobs waiting for a worker, by kind, and workers busy. Finals always run; interims "
        "are dropped when they wait too long.",
        [
            Target(f"sum by (kind) (captions_scheduler_queued{{{SEL}}})", "queued {{kind}}"),
            Target(f"sum(captions_scheduler_busy_workers{{{SEL}}})", "busy workers"),
        ],
    ),
    Panel(
        "Queue wait",
        "p90 time a recognition job waited for a worker, by kind.",
        [q(0.9, "captions_scheduler_wait_seconds", "kind")],
        unit="s",
    ),
    Panel(
        "Real-time factor",
        "Decode time over audio duration per decode (below 1 is faster than real time), "
        "median and p90 by provider.",
        [
            q(0.5, "captions_recogniser_real_time_factor", "provider"),
            q(0.9, "captions_recogniser_real_time_factor", "provider"),
        ],
    ),
    Panel(
        "Decode time",
        "p90 time of one recogniser decode by provider and kind, queueing included.",
        [q(0.9, "captions_recogniser_seconds", "provider, kind")],
        unit="s",
    ),
    Panel(
        "Dropped interims",
        "Interim decodes not run per second: superseded by a newer one of the same speaker, "
        "or stale after waiting too long. Rising means the workers are full; finals still run.",
        [
            Target(
                "sum by (outcome) (rate(captions_scheduler_jobs_total"
                f'{{{SEL},kind="interim",outcome=~"superseded|stale"}}[{RI}]))',
                "{{outcome}}",
            ),
            Target(
                f"sum(rate(captions_subscriber_dropped_total{{{SEL}}}[{RI}]))",
                "not delivered to slow subscribers",
            ),
        ],
        unit="ops",
    ),
    Panel(
        "Recognition work per audio second",
        "Audio seconds recognised per second of audio received, by provider: above 1 because "
        "interims decode the same audio again; the workers' real load.",
        [
            Target(
                "sum by (provider) "
                f"(rate(captions_recognised_audio_seconds_total{{{SEL}}}[{RI}])) / "
                "sum by (provider) "
                f"(rate(captions_audio_received_seconds_total{{{SEL}}}[{RI}]))",
                "{{provider}}",
            )
        ],
    ),
]


def _variables(prosody: bool) -> list[dict[str, object]]:
    def query_var(name: str, label: str, query: str) -> dict[str, object]:
        return {
            "allValue": ".*",
            "current": {},
            "datasource": DS,
            "definition": query,
            "hide": 0,
            "includeAll": True,
            "label": label,
            "multi": True,
            "name": name,
            "options": [],
            "query": {"qryType": 1, "query": query, "refId": f"{name}-query"},
            "refresh": 2,
            "regex": "",
            "sort": 1,
            "type": "query",
        }

    out: list[dict[str, object]] = [
        {
            "current": {},
            "hide": 0,
            "includeAll": False,
            "label": "Data source",
            "multi": False,
            "name": "datasource",
            "options": [],
            "query": "prometheus",
            "refresh": 1,
            "regex": "",
            "type": "datasource",
        },
        query_var("job", "Job", "label_values(captions_build_info, job)"),
        query_var(
            "instance", "Sidecar", 'label_values(captions_build_info{job=~"$job"}, instance)'
        ),
    ]
    if prosody:
        out.append(
            query_var(
                "prosody_instance",
                "Prosody",
                "label_values(prosody_mod_captions__rooms_engaged, instance)",
            )
        )
    return out


def _panel(p: Panel, pid: int, x: int, y: int) -> dict[str, object]:
    targets = [
        {
            "datasource": DS,
            "expr": t.expr,
            "legendFormat": t.legend or "__auto",
            "refId": chr(65 + i),
        }
        for i, t in enumerate(p.targets)
    ]
    out: dict[str, object] = {
        "datasource": DS,
        "description": p.description,
        "fieldConfig": {"defaults": {"unit": p.unit}, "overrides": []},
        "gridPos": {"h": p.height, "w": p.width, "x": x, "y": y},
        "id": pid,
        "targets": targets,
        "title": p.title,
        "type": p.kind,
    }
    if p.kind == "stat":
        out["options"] = {
            "colorMode": "value",
            "graphMode": "area",
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
        }
    else:
        out["options"] = {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        }
    out.update(p.extra)
    return out


def dashboard(uid: str, title: str, description: str, panels: list[Panel]) -> dict[str, object]:
    laid: list[dict[str, object]] = []
    x = y = row_h = 0
    for i, p in enumerate(panels, start=1):
        if x + p.width > 24:
            x, y, row_h = 0, y + row_h, 0
        laid.append(_panel(p, i, x, y))
        x += p.width
        row_h = max(row_h, p.height)
    return {
        "annotations": {"list": []},
        "description": description,
        "editable": False,
        "graphTooltip": 1,
        "links": [],
        "panels": laid,
        "refresh": "30s",
        "schemaVersion": 39,
        "tags": ["jitsi", "captions"],
        "templating": {
            "list": _variables(prosody=any("prosody_" in t.expr for p in panels for t in p.targets))
        },
        "time": {"from": "now-6h", "to": "now"},
        "timezone": "",
        "title": title,
        "uid": uid,
        "version": 1,
    }


DASHBOARDS = {
    "captions-overview.json": dashboard(
        "jitsi-captions-overview",
        "Jitsi captions: overview",
        "Latency, rooms, speakers, errors and the provider mix of the captions sidecars, "
        "and mod_captions' dial outcomes from Prosody.",
        OVERVIEW,
    ),
    "captions-capacity.json": dashboard(
        "jitsi-captions-capacity",
        "Jitsi captions: capacity",
        "CPU, recogniser queue, real-time factor, dropped interims and how many more speakers "
        "the selected sidecars can take.",
        CAPACITY,
    ),
}


@dataclass
class Alert:
    name: str
    expr: str
    for_: str
    severity: str
    summary: str
    description: str


ALERTS: list[Alert] = [
    Alert(
        "CaptionsSidecarDown",
        'up{job="captions-sidecar"} == 0',
        "2m",
        "critical",
        "Captions sidecar {{ $labels.instance }} is down",
        "Prometheus cannot scrape the sidecar: no captions and no transcripts for the rooms "
        "it serves. Check `systemctl status captions-sidecar` and its journal.",
    ),
    Alert(
        "CaptionsFinalLatencyHigh",
        "histogram_quantile(0.9, sum by (instance, le) "
        '(rate(captions_final_latency_seconds_bucket{job="captions-sidecar"}[5m]))) '
        f"> {FINAL_LATENCY_TARGET_S}",
        "10m",
        "warning",
        "Final captions on {{ $labels.instance }} come late",
        f"p90 from end of speech to final caption is over {FINAL_LATENCY_TARGET_S} s "
        "(now {{ $value | humanizeDuration }}): the recogniser workers are full (see the "
        "capacity dashboard) or the provider is slow.",
    ),
    Alert(
        "CaptionsRecogniserErrors",
        "sum by (instance, provider) "
        '(rate(captions_recogniser_errors_total{job="captions-sidecar"}[5m])) / '
        "(sum by (instance, provider) "
        '(rate(captions_recogniser_seconds_count{job="captions-sidecar"}[5m])) + '
        "sum by (instance, provider) "
        '(rate(captions_recogniser_errors_total{job="captions-sidecar"}[5m]))) '
        f"> {RECOGNISER_ERROR_RATIO}",
        "5m",
        "warning",
        "Recogniser {{ $labels.provider }} fails on {{ $labels.instance }}",
        f"More than {RECOGNISER_ERROR_RATIO:.0%} of decodes fail "
        "(now {{ $value | humanizePercentage }}): captions have gaps.",
    ),
    Alert(
        "CaptionsTranscriptWritesFailing",
        'increase(captions_transcript_write_errors_total{job="captions-sidecar"}[5m]) > 0',
        "0m",
        "critical",
        "Transcripts on {{ $labels.instance }} are not being written",
        "Finals could not be appended to their transcript (disk full, read-only, "
        "permissions): those lines are lost from the saved transcript.",
    ),
    Alert(
        "CaptionsRoomWithoutAudio",
        'captions_rooms_without_audio{job="captions-sidecar"} > 0',
        "5m",
        "warning",
        "{{ $value }} transcribing room(s) on {{ $labels.instance }} get no audio",
        "Captions or transcription are on but no audio has arrived for over a minute: the "
        "videobridge export (Jicofo's transcription url-template) or Jigasi is not sending, "
        "or everyone is muted.",
    ),
]


def _yaml_str(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)  # a JSON string is a YAML double-quoted scalar


def rules_yaml() -> str:
    lines = [
        "# Prometheus alert rules for the Jitsi captions sidecar.",
        "# Written by dashboards/generate.py; edit that, then run `make dashboards`.",
        "groups:",
        "  - name: jitsi-captions",
        "    rules:",
    ]
    for a in ALERTS:
        lines += [
            f"      - alert: {a.name}",
            f"        expr: {_yaml_str(a.expr)}",
            f"        for: {a.for_}",
            "        labels:",
            f"          severity: {a.severity}",
            "        annotations:",
            f"          summary: {_yaml_str(a.summary)}",
            f"          description: {_yaml_str(a.description)}",
        ]
    return "\n".join(lines) + "\n"


def outputs() -> dict[str, str]:
    out = {
        name: json.dumps(d, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
        for name, d in DASHBOARDS.items()
    }
    out["captions-alerts.rules.yml"] = rules_yaml()
    return out


def all_panel_targets() -> list[tuple[str, str, str]]:
    """(dashboard file, panel title, expr) for every target of every panel."""
    return [
        (name, p["title"], t["expr"])  # type: ignore[index]
        for name, d in DASHBOARDS.items()
        for p in d["panels"]  # type: ignore[attr-defined]
        for t in p["targets"]
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="fail if a written file would change")
    ap.add_argument("--out", type=Path, default=HERE)
    args = ap.parse_args(argv)
    stale = []
    for name, text in outputs().items():
        path = args.out / name
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    if stale:
        print(f"out of date (run `make dashboards`): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
