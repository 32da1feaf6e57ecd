"""``python -m sidecar.sim``: play a conference to a sidecar and print the report.

Examples::

    python -m sidecar.sim --url ws://127.0.0.1:8088/mediajson/m1 --room standup \\
        --token T --grpc 127.0.0.1:50051 \\
        --speaker alice="Hello there. How was the weekend?" \\
        --speaker bob=path/to.wav --listeners 50 --loss 0.02 --jitter-ms 30

    python -m sidecar.sim --rtp 127.0.0.1:40000 --grpc 127.0.0.1:50051 --room standup \\
        --token T --speaker alice="Hello there." --fast --json out.json

A ``--speaker`` value that names an existing file is played from the file;
anything else is spoken by espeak-ng, one turn per sentence, the speakers
taking turns. ``--turn NAME=TEXT`` (repeated) gives the turns in an explicit
order instead.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from pathlib import Path

import aiohttp
import grpc

from sidecar.sim.conference import ReceivedCaption, SimConfig, SimParticipant, run_conference


def _pair(value: str) -> tuple[str, str]:
    name, sep, rest = value.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {value!r}")
    return name.strip(), rest


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m sidecar.sim",
        description="Conference simulator: participants played to the captions sidecar "
        "as jitsi-videobridge would, with the captions measured against the truth.",
    )
    target = ap.add_argument_group("where")
    target.add_argument("--url", help="mediajson URL: ws://HOST:PORT/mediajson/<meeting id>")
    target.add_argument("--room", default="", help="room name (added to the URL as ?room=)")
    target.add_argument(
        "--token",
        default=os.environ.get("CAPTIONS_SERVER_TOKEN", ""),
        help="bearer token (default: $CAPTIONS_SERVER_TOKEN)",
    )
    target.add_argument(
        "--rtp", metavar="HOST:PORT", help="send plain RTP here instead of mediajson"
    )
    target.add_argument(
        "--grpc",
        metavar="HOST:PORT",
        help="control API: roster names (and SSRCs); captions for --rtp",
    )
    who = ap.add_argument_group("who")
    who.add_argument(
        "--speaker",
        action="append",
        default=[],
        type=_pair,
        metavar="NAME=TEXT|FILE",
        help="a speaking participant (repeatable)",
    )
    who.add_argument(
        "--turn",
        action="append",
        default=[],
        type=_pair,
        metavar="NAME=TEXT",
        help="one espeak turn, in order (repeatable; creates the speaker if needed)",
    )
    who.add_argument(
        "--ref",
        action="append",
        default=[],
        type=_pair,
        metavar="NAME=TEXT",
        help="reference transcript of a file speaker, for the WER",
    )
    who.add_argument("--voice", action="append", default=[], type=_pair, metavar="NAME=VOICE")
    who.add_argument("--listeners", type=int, default=0, help="silent participants")
    how = ap.add_argument_group("how")
    how.add_argument("--fast", action="store_true", help="as fast as possible, not real time")
    how.add_argument("--loss", type=float, default=0.0, help="probability a frame is lost")
    how.add_argument("--jitter-ms", type=float, default=0.0, help="mean extra delay (reorders)")
    how.add_argument("--duplicate", type=float, default=0.0, help="probability of a duplicate")
    how.add_argument("--seed", type=int, default=0)
    how.add_argument("--reconnect-at", type=float, help="mediajson: reconnect after S seconds")
    how.add_argument("--ping-interval", type=float, default=10.0)
    how.add_argument("--gap", type=float, default=0.8, help="espeak: silence between turns")
    how.add_argument("--overlap", type=float, default=0.0, help="espeak: overlap of turns")
    how.add_argument("--drain-timeout", type=float, default=20.0)
    how.add_argument("--no-roster", action="store_true", help="do not send UpdateRoster")
    how.add_argument(
        "--no-session-end", action="store_true", help="leave the session open at the end"
    )
    out = ap.add_argument_group("output")
    out.add_argument("--json", type=Path, help="write the full report as JSON here")
    out.add_argument("--interims", action="store_true", help="show interim captions live")
    out.add_argument("--quiet", action="store_true", help="no live captions")
    out.add_argument("-v", "--verbose", action="store_true")
    return ap


def config_from_args(args: argparse.Namespace) -> SimConfig:
    """Turn the command line into a :class:`SimConfig` (ValueError if it cannot)."""
    people: dict[str, SimParticipant] = {}
    for name, value in args.speaker:
        if name in people:
            raise ValueError(f"--speaker {name} given twice")
        if value and Path(value).is_file():
            people[name] = SimParticipant(name, audio=Path(value))
        else:
            people[name] = SimParticipant(name, text=value)
    for name, _ in args.turn:
        people.setdefault(name, SimParticipant(name))
    for name, text in args.ref:
        if name not in people or not people[name].is_file:
            raise ValueError(f"--ref {name}: no file speaker of that name")
        people[name].text = text
    for name, voice in args.voice:
        if name not in people:
            raise ValueError(f"--voice {name}: no speaker of that name")
        people[name].voice = voice
    if not people and not args.listeners:
        raise ValueError("nobody to play: give --speaker, --turn or --listeners")

    def show(c: ReceivedCaption) -> None:
        if c.is_interim and not args.interims:
            return
        mark = "…" if c.is_interim else " "
        at = f"{c.t:7.2f}s" if c.t is not None else "      ?"
        print(f"[{at}]{mark}{c.participant_name}: {c.text}", flush=True)

    return SimConfig(
        participants=list(people.values()),
        url=args.url or "",
        room=args.room,
        token=args.token,
        transport="rtp" if args.rtp else "mediajson",
        rtp=args.rtp or "",
        grpc=args.grpc or "",
        script=list(args.turn) or None,
        listeners=args.listeners,
        realtime=not args.fast,
        loss=args.loss,
        jitter_ms=args.jitter_ms,
        duplicate=args.duplicate,
        seed=args.seed,
        reconnect_at=args.reconnect_at,
        ping_interval=args.ping_interval,
        gap=args.gap,
        overlap=args.overlap,
        drain_timeout=args.drain_timeout,
        update_roster=not args.no_roster,
        end_session=not args.no_session_end,
        on_caption=None if args.quiet else show,
    )


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        cfg = config_from_args(args)
        cfg.validate()
    except ValueError as e:
        ap.error(str(e))
    try:
        report = asyncio.run(run_conference(cfg))
    except KeyboardInterrupt:
        return 130
    except (OSError, aiohttp.ClientError, grpc.aio.AioRpcError) as e:
        # refused, unreachable, wrong token: one line, not a traceback
        print(f"error: the sidecar did not take the conference: {e}", file=sys.stderr)
        return 1
    print()
    print(report.to_markdown())
    if args.json is not None:
        args.json.write_text(json.dumps(report.to_dict(), indent=2, ensure_ascii=False) + "\n")
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
