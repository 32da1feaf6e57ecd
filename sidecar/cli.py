"""Command line: ``serve``, ``transcribe FILE...`` and ``demo``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import tempfile
from pathlib import Path

from sidecar import logs
from sidecar.config import ConfigError, RoomSettings, SettingError, load_config

log = logging.getLogger("sidecar")


def _cmd_serve(args: argparse.Namespace) -> int:
    from sidecar.server import serve

    try:
        config = load_config(Path(args.config) if args.config else None)
        config.server.require_token()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logs.setup(config.logging.log_level, config.logging.log_format)
    try:
        asyncio.run(serve(config))
    except ConfigError as e:  # found while starting, e.g. the XMPP server's certificate
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _cmd_transcribe(args: argparse.Namespace) -> int:
    from sidecar.transcribe import transcribe_files

    logs.setup("warning", "text")
    try:
        settings = RoomSettings(language=args.language).validate()
    except SettingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = asyncio.run(
        transcribe_files(
            [Path(f) for f in args.files],
            out_dir=out,
            fmt=args.format,
            settings=settings,
            model=args.model,
            progress=not args.quiet,
        )
    )
    failed = [f for f, p in written.items() if p is None]
    for f, p in written.items():
        if p is not None:
            print(f"{f} -> {p}")
    return 1 if failed else 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from sidecar.demo import run_demo

    logs.setup("warning", "text")
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="captions-demo-"))
    return asyncio.run(run_demo(out, realtime=not args.fast))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="captions-sidecar",
        description="Live captions and transcripts for Jitsi Meet",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the service (control API, ingest, metrics)")
    p.add_argument("--config", help="TOML config file (default: $CAPTIONS_CONFIG)")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("transcribe", help="transcribe audio or video files")
    p.add_argument("files", nargs="+")
    p.add_argument("--format", default="srt", choices=["jsonl", "srt", "vtt", "txt", "md"])
    p.add_argument("--out", default=".", help="directory for the transcripts")
    p.add_argument("--language", default="en-US", help="BCP-47 code or 'auto'")
    p.add_argument("--model", default=None, help="tiny.en, base, or a CTranslate2 model dir")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_transcribe)

    p = sub.add_parser("demo", help="a live multi-speaker demo on local Whisper")
    p.add_argument("--out", help="where to keep the transcript (default: a temp dir)")
    p.add_argument("--fast", action="store_true", help="as fast as possible, not real time")
    p.set_defaults(func=_cmd_demo)

    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
