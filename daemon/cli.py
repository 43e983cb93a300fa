"""The `tocsin` command line (CONTRACT §2). Exit codes: 0 ok, 1 user error, 2 usage."""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path

from . import config as cfg
from .app import Daemon, build_integrations, load_config


def _fail(message: str) -> int:
    print(f"tocsin: {message}", file=sys.stderr)
    return 1


def setup_logging(level: str = "INFO", fmt: str = "logfmt") -> None:
    if fmt == "json":
        pattern = '{"ts":"%(asctime)s","level":"%(levelname)s","logger":"%(name)s","msg":%(message)r}'
    else:
        pattern = "ts=%(asctime)s level=%(levelname)s logger=%(name)s msg=%(message)r"
    logging.basicConfig(level=level, format=pattern, stream=sys.stdout, force=True)


def cmd_serve(args) -> int:
    try:
        config = load_config(args.config)
    except cfg.ConfigError as exc:
        return _fail("invalid configuration:\n" + "\n".join(exc.problems))
    setup_logging(config.daemon.log_level, config.daemon.log_format)
    daemon = Daemon(config)
    try:
        asyncio.run(daemon.serve_forever())
    except OSError as exc:
        return _fail(f"cannot start: {exc}")
    return 0


def cmd_check(args) -> int:
    try:
        config = load_config(args.config)
    except cfg.ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 1
    print(f"{config.path}: ok, {len(config.integrations)} integration(s)")
    return 0


def _read_payload(args):
    if args.email:
        from handlers.mail import parse_message

        try:
            return parse_message(Path(args.email).read_bytes())
        except OSError as exc:
            raise ValueError(f"cannot read {args.email}: {exc}") from None
    if not args.file:
        raise ValueError("give a payload FILE, '-' for stdin, or --email FILE.eml")
    try:
        text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read {args.file}: {exc}") from None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ValueError(f"{args.file}: not JSON: {exc}") from None


def cmd_render(args) -> int:
    from grouping.pipeline import payloads_of
    from handlers.api import render_standalone

    try:
        config = cfg.load(args.config)
        integrations = {i.id: i for i in build_integrations(config)}
    except cfg.ConfigError as exc:
        return _fail("invalid configuration:\n" + "\n".join(exc.problems))
    integration = integrations.get(args.integration)
    if integration is None:
        return _fail(f"no integration '{args.integration}' in {config.path}"
                     f" (have: {', '.join(integrations) or 'none'})")
    try:
        payload = _read_payload(args)
    except ValueError as exc:
        return _fail(str(exc))
    results = [render_standalone(integration, body, config.daemon.render_budget)
               for body in payloads_of(integration.kind, payload)]
    if args.email:
        for r in results:
            r["payload"] = payload
    print(json.dumps(results[0] if len(results) == 1 else results, indent=2, ensure_ascii=False))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tocsin", description="Alert-ingestion daemon (webhooks and email).")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p):
        p.add_argument("-c", "--config", default="config.toml", help="config file (default: config.toml)")
        return p

    with_config(sub.add_parser("serve", help="run the daemon in the foreground")).set_defaults(func=cmd_serve)
    with_config(sub.add_parser("check", help="validate the config and compile every template")).set_defaults(
        func=cmd_check)
    r = with_config(sub.add_parser("render", help="show what the pipeline decides for a payload"))
    r.add_argument("--integration", required=True, help="integration id")
    r.add_argument("--email", metavar="FILE.eml", help="parse an email into the payload first")
    r.add_argument("file", nargs="?", help="payload JSON file, or - for stdin")
    r.set_defaults(func=cmd_render)

    args = parser.parse_args(argv)
    return args.func(args)
