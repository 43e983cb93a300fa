"""The `tocsin` command line (CONTRACT §2). Exit codes: 0 ok, 1 user error, 2 usage."""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from pathlib import Path

from store import DatabaseUnusable, StoreUnavailable, examine

from . import config as cfg
from . import logs
from .app import Daemon, StartupError, build_integrations, load_config


def _fail(message: str) -> int:
    print(f"tocsin: {message}", file=sys.stderr)
    return 1


def cmd_serve(args) -> int:
    try:
        config = load_config(args.config)
    except cfg.ConfigError as exc:
        return _fail("invalid configuration:\n" + "\n".join(exc.problems))
    problems = cfg.serving_problems(config)
    if problems:
        return _fail("invalid configuration:\n" + "\n".join(problems))
    logs.setup(config.daemon.log_level, config.daemon.log_format)
    daemon = Daemon(config)
    try:
        asyncio.run(daemon.serve_forever())
    except (StartupError, DatabaseUnusable) as exc:
        return _fail(str(exc))
    except StoreUnavailable as exc:  # the first writes at start (notification recovery) failed
        return _fail(f"cannot start: {exc}")
    except OSError as exc:
        return _fail(f"cannot start: {exc}")
    if not daemon.store.closed_cleanly:
        # The database could not be closed without a crash (see Store.close): leave it to
        # SQLite's recovery at the next start rather than to the interpreter's teardown.
        logging.shutdown()
        sys.stderr.flush()
        os._exit(1)
    return 0


def cmd_check(args) -> int:
    try:
        config = load_config(args.config)
    except cfg.ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 1
    problems = cfg.serving_problems(config)
    try:
        version = examine(config.daemon.database)
    except DatabaseUnusable as exc:
        problems.append(str(exc))
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        return 1
    state = "not created yet" if version is None else f"schema version {version}"
    print(f"{config.path}: ok, {len(config.integrations)} integration(s); database {config.daemon.database}: {state}")
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


def _slug(name: str) -> str:
    import re

    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:48] or "integration"


def cmd_new_integration(args) -> int:
    """Append an integration to config.toml, comments and layout kept (tomlkit)."""
    import os
    import secrets
    import tempfile

    import tomlkit

    from grouping.kinds import KINDS

    path = Path(args.config)
    if args.kind not in KINDS:
        return _fail(f"unknown kind '{args.kind}' (known: {', '.join(sorted(KINDS))})")
    try:
        config = load_config(path)
        doc = tomlkit.parse(path.read_text(encoding="utf-8"))
    except cfg.ConfigError as exc:
        return _fail("invalid configuration:\n" + "\n".join(exc.problems))
    taken = {i.id for i in config.integrations}
    iid = args.id or _slug(args.name)
    if args.id and iid in taken:
        return _fail(f"integration id '{iid}' is already used")
    base, n = iid, 2
    while iid in taken:
        iid, n = f"{base}-{n}", n + 1
    token = secrets.token_hex(16)  # 128 random bits
    table = tomlkit.table()
    table.add("id", iid)
    table.add("name", args.name)
    table.add("kind", args.kind)
    table.add("token", token)
    if "integrations" not in doc:
        doc.add("integrations", tomlkit.aot())
    doc["integrations"].append(table)
    text = tomlkit.dumps(doc)
    # Written beside the original and renamed over it: a reader never sees half a file,
    # and the result is validated before it replaces anything.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".config-", suffix=".toml")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, path.stat().st_mode & 0o777)
        new = load_config(tmp)
        os.replace(tmp, path)
    except (cfg.ConfigError, OSError) as exc:
        Path(tmp).unlink(missing_ok=True)
        problems = exc.problems if isinstance(exc, cfg.ConfigError) else [str(exc)]
        return _fail("could not write the new integration:\n" + "\n".join(problems))
    kind = KINDS[args.kind]
    print(f"integration '{iid}' ({kind.title}) added to {path}")
    print(f"url:   {new.daemon.public_url}/integrations/v1/{args.kind}/{token}/")
    if new.smtp is not None:
        print(f"email: {token}@{new.smtp.domain}")
    print("reload the daemon (systemctl reload tocsin, or SIGHUP) to start receiving")
    return 0


async def _with_store(config: cfg.Config, work):
    from store import Store

    store = Store(config.daemon.database)
    await store.open()
    try:
        return await work(store)
    finally:
        await store.close()


def _config_or_fail(args):
    try:
        return load_config(args.config), None
    except cfg.ConfigError as exc:
        return None, _fail("invalid configuration:\n" + "\n".join(exc.problems))


def cmd_groups(args) -> int:
    from handlers.api import iso

    config, err = _config_or_fail(args)
    if config is None:
        return err

    async def work(store):
        return await store.list_groups(state=args.state, integration_id=args.integration, limit=args.limit)

    count, groups = asyncio.run(_with_store(config, work))
    if args.json:
        print(json.dumps([{**g.__dict__, "created_at": iso(g.created_at)} for g in groups], indent=2))
        return 0
    print(f"{'ID':<14} {'STATE':<13} {'INTEGRATION':<16} {'ALERTS':>6}  {'CREATED (UTC)':<20} TITLE")
    for g in groups:
        created = (iso(g.created_at) or "")[:19].replace("T", " ")
        print(f"{g.id:<14} {g.state:<13} {g.integration_id[:16]:<16} {g.alerts_count:>6}  {created:<20} {g.title or ''}")
    print(f"{len(groups)} of {count} group(s)")
    return 0


def cmd_action(args) -> int:
    from grouping.limits import parse_duration
    from store import InvalidTransition, NotFound

    config, err = _config_or_fail(args)
    if config is None:
        return err
    delay = None
    if args.command == "silence":
        try:
            delay = -1 if args.duration in (None, "forever") else int(parse_duration(args.duration))
        except ValueError as exc:
            return _fail(str(exc))

    async def work(store):
        return await store.act(args.id, args.command, delay=delay)

    try:
        g = asyncio.run(_with_store(config, work))
    except (InvalidTransition, NotFound) as exc:
        return _fail(str(exc))
    print(f"{g.id}: {g.state}")
    return 0


def cmd_demo(args) -> int:
    """Send the kind's example payload through the real pipeline; demo alerts are never grouped."""
    from grouping.pipeline import Pipeline

    config, err = _config_or_fail(args)
    if config is None:
        return err
    integrations = {i.id: i for i in build_integrations(config)}
    integration = integrations.get(args.integration)
    if integration is None:
        return _fail(f"no integration '{args.integration}' in {config.path}")

    async def work(store):
        pipeline = Pipeline(integrations.values(), store, render_budget=config.daemon.render_budget)
        return await pipeline.ingest(integration, integration.kind.example_payload_copy(), source="demo",
                                     grouped=False)

    accepted = asyncio.run(_with_store(config, work))
    for a in accepted:
        print(json.dumps({"alert_id": a.alert_id, "alert_group_id": a.alert_group_id,
                          "grouping_key": a.grouping_key}))
    return 0


def cmd_backup(args) -> int:
    """An online, consistent copy of the database (SQLite's backup API)."""
    import sqlite3

    config, err = _config_or_fail(args)
    if config is None:
        return err
    source_path = config.daemon.database
    if not source_path.exists():
        return _fail(f"no database at {source_path}")
    target = Path(args.file)
    if target.exists() and not args.force:
        return _fail(f"{target} exists (use --force to overwrite)")
    tmp = target.with_name(target.name + ".partial")
    tmp.unlink(missing_ok=True)
    try:
        src = sqlite3.connect(f"file:{source_path}?mode=ro", uri=True, timeout=30)
        dst = sqlite3.connect(tmp)
        with dst:
            src.backup(dst, pages=1024)
        (ok,) = dst.execute("PRAGMA integrity_check").fetchone()
        dst.close()
        src.close()
        if ok != "ok":
            return _fail(f"backup failed its integrity check: {ok}")
        tmp.replace(target)
    except (sqlite3.Error, OSError) as exc:
        tmp.unlink(missing_ok=True)
        return _fail(f"backup failed: {exc}")
    print(f"backup of {source_path} written to {target}")
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

    n = with_config(sub.add_parser("new-integration", help="add an integration with a fresh token"))
    n.add_argument("--kind", required=True)
    n.add_argument("--name", required=True)
    n.add_argument("--id", help="slug (default: from the name)")
    n.set_defaults(func=cmd_new_integration)

    g = with_config(sub.add_parser("groups", help="list alert groups, newest first"))
    g.add_argument("--state", choices=("new", "acknowledged", "resolved", "silenced"))
    g.add_argument("--integration", help="integration id")
    g.add_argument("--limit", type=int, default=50)
    g.add_argument("--json", action="store_true")
    g.set_defaults(func=cmd_groups)

    for action in ("ack", "acknowledge", "unack", "unacknowledge", "resolve", "unresolve", "silence", "unsilence"):
        a = with_config(sub.add_parser(action, help=f"{action} an alert group"))
        a.add_argument("id", help="alert group id")
        if action == "silence":
            a.add_argument("--for", dest="duration", help="e.g. 30m, 2h (default: forever)")
        a.set_defaults(func=cmd_action)

    d = with_config(sub.add_parser("demo", help="send the kind's example payload (never grouped)"))
    d.add_argument("--integration", required=True)
    d.set_defaults(func=cmd_demo)

    b = with_config(sub.add_parser("backup", help="write an online, consistent copy of the database"))
    b.add_argument("file")
    b.add_argument("--force", action="store_true")
    b.set_defaults(func=cmd_backup)

    args = parser.parse_args(argv)
    args.command = {"ack": "acknowledge", "unack": "unacknowledge"}.get(args.command, args.command)
    try:
        return args.func(args)
    except DatabaseUnusable as exc:  # any command that opens the database: one line, no traceback
        return _fail(str(exc))
