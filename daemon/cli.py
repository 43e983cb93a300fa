"""The `tocsin` command line (CONTRACT §2). Exit codes: 0 ok, 1 user error, 2 usage."""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from pathlib import Path

from store import DatabaseUnusable, StoreUnavailable, examine_database, is_url

from . import config as cfg
from . import logs
from .app import Daemon, StartupError, _template_problem, build_integrations, load_config
from .version import version


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
        version = examine_database(config.daemon.database)
    except DatabaseUnusable as exc:
        problems.append(str(exc))
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        return 1
    state = "not created yet" if not version else f"schema version {version}"
    print(f"{config.path}: ok, {len(config.integrations)} integration(s); database {_shown(config.daemon.database)}:"
          f" {state}")
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
    from grouping.pipeline import preview, preview_json

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
    results = preview(integration, payload, config.daemon.render_budget)
    if args.email:
        for r in results:
            r["payload"] = payload
    print(json.dumps(preview_json(results), indent=2, ensure_ascii=False))
    return 0


def _slug(name: str) -> str:
    import re

    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:48] or "integration"


def _replace_config(path: Path, text: str) -> cfg.Config:
    """Write config.toml anew: beside the original, checked as `tocsin check` would, then renamed
    over it, so a reader never sees half a file and a bad result replaces nothing. The file keeps
    its mode, owner and group (a root-run command must leave it readable by the service).
    Raises ConfigError (an OSError becomes one line of it)."""
    import os
    import tempfile

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".config-", suffix=".toml")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        st = path.stat()
        os.chmod(tmp, st.st_mode & 0o777)
        if (st.st_uid, st.st_gid) != (os.geteuid(), os.getegid()):
            os.chown(tmp, st.st_uid, st.st_gid)
        new = load_config(tmp)
        os.replace(tmp, path)
        return new
    except (cfg.ConfigError, OSError) as exc:
        Path(tmp).unlink(missing_ok=True)
        raise exc if isinstance(exc, cfg.ConfigError) else cfg.ConfigError([str(exc)]) from None


def cmd_new_integration(args) -> int:
    """Append an integration to config.toml, comments and layout kept (tomlkit)."""
    import secrets

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
    try:
        new = _replace_config(path, text)
    except cfg.ConfigError as exc:
        return _fail("could not write the new integration:\n" + "\n".join(exc.problems))
    kind = KINDS[args.kind]
    print(f"integration '{iid}' ({kind.title}) added to {path}")
    print(f"url:   {new.daemon.public_url}/integrations/v1/{args.kind}/{token}/")
    if args.kind == "pagerduty":
        print(f"events API v2: {new.daemon.public_url}/v2/enqueue with routing_key {token}")
    if new.smtp is not None:
        print(f"email: {token}@{new.smtp.domain}")
    print("reload the daemon (systemctl reload tocsin, or SIGHUP) to start receiving")
    return 0


async def _with_store(config: cfg.Config, work):
    from grouping import rules
    from store import open_store

    store = open_store(config.daemon.database, rules=rules)
    # As the daemon's store has it: an action here writes the lifecycle notifications the
    # config asks for, and the daemon serving this database delivers them.
    store.lifecycle_events = {n.name: frozenset(n.events) for n in config.notifiers}
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
    from grouping.views import groups_json, iso

    config, err = _config_or_fail(args)
    if config is None:
        return err

    async def work(store):
        count, groups = await store.list_groups(state=args.state, integration_id=args.integration, limit=args.limit)
        shown = await groups_json(store, groups, public_url=config.daemon.public_url) if args.json else None
        return count, groups, shown

    count, groups, shown = asyncio.run(_with_store(config, work))
    if args.json:  # the API's shape (grouping.views), as the UI's scripts get it too
        print(json.dumps(shown, indent=2))
        return 0
    print(f"{'ID':<14} {'STATE':<13} {'INTEGRATION':<16} {'ALERTS':>6}  {'CREATED (UTC)':<20} TITLE")
    for g in groups:
        created = (iso(g.created_at) or "")[:19].replace("T", " ")
        print(f"{g.id:<14} {g.state:<13} {g.integration_id[:16]:<16} {g.alerts_count:>6}  {created:<20} {g.title or ''}")
    print(f"{len(groups)} of {count} group(s)")
    return 0


def cmd_action(args) -> int:
    """ack, resolve, silence, …: the same function (checks, timeline, notifications) as the API and UI."""
    from grouping import lifecycle
    from grouping.durations import parse_duration

    config, err = _config_or_fail(args)
    if config is None:
        return err
    delay = None
    if args.command == "silence":
        try:
            delay = -1 if args.duration in (None, "forever") else parse_duration(args.duration)
            delay = lifecycle.silence_delay(delay)
        except ValueError as exc:
            return _fail(str(exc))

    async def work(store):
        return await lifecycle.act(store, args.id, args.command, delay=delay)

    try:
        g = asyncio.run(_with_store(config, work))
    except (lifecycle.ActionError, lifecycle.InvalidTransition, lifecycle.NotFound) as exc:
        return _fail(str(exc))
    except lifecycle.StoreUnavailable as exc:
        return _fail(f"storage unavailable, retry later: {exc}")
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
    if is_url(source_path):
        return _fail("the database is on PostgreSQL: back it up with pg_dump"
                     " (pg_dump -Fc -f tocsin.dump <database URL>), restore with pg_restore")
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


def _shown(database) -> str:
    from store.postgres import redact

    return redact(database) if is_url(database) else str(database)


def cmd_migrate(args) -> int:
    """Migrate the schema alone (serve does it too, at start); two at once migrate once."""
    config, err = _config_or_fail(args)
    if config is None:
        return err

    async def work(store):
        return store.migrated_from

    before = asyncio.run(_with_store(config, work))
    from store import SCHEMA_VERSION
    from store.postgres import SCHEMA_VERSION as PG_VERSION

    now = PG_VERSION if is_url(config.daemon.database) else SCHEMA_VERSION
    if before == now:
        print(f"database {_shown(config.daemon.database)}: schema version {now}, up to date")
    else:
        print(f"database {_shown(config.daemon.database)}: migrated from schema version {before or 0} to {now}")
    return 0


def cmd_copy_db(args) -> int:
    """Copy this config's SQLite database into an empty PostgreSQL database, then check the copy."""
    from store.copy import CopyFailed, copy_database

    config, err = _config_or_fail(args)
    if config is None:
        return err
    if is_url(config.daemon.database):
        return _fail("copy-db copies an SQLite database: [daemon] database is already a PostgreSQL URL")
    if not is_url(args.to):
        return _fail("--to must be a postgresql:// URL")
    try:
        counts = asyncio.run(copy_database(config.daemon.database, args.to))
    except CopyFailed as exc:
        return _fail(f"copy-db: {exc}")
    print(f"copied {config.daemon.database} to {_shown(args.to)}: "
          + ", ".join(f"{n} {table}" for table, n in counts.items()) + "; every table checked")
    print(f'serve from it: set [daemon] database = "{_shown(args.to)}" and restart')
    return 0


def cmd_import_oncall(args) -> int:
    """Append Grafana OnCall's integrations, routes and chains to config.toml (comments kept)."""

    from grouping.kinds import KINDS

    from . import oncall_import as oi

    path = Path(args.config)
    try:
        config = load_config(path)
        original = path.read_text(encoding="utf-8")
    except cfg.ConfigError as exc:
        return _fail("invalid configuration:\n" + "\n".join(exc.problems))
    except OSError as exc:
        return _fail(f"cannot read {path}: {exc}")
    try:
        export = oi.read_dir(args.source) if args.source else oi.fetch(args.url, args.token)
    except oi.ImportFailed as exc:
        return _fail(f"import failed, {path} untouched: {exc}")
    plan = oi.plan_import(export, config, KINDS, _template_problem)
    origin = args.source or oi.api_base(args.url)
    print(f"import from Grafana OnCall ({origin}): {len(plan.imported)} integration(s) to add,"
          f" {len(plan.skipped)} already configured")
    for line in plan.report:
        print(f"  - {line}")
    if not plan.imported:
        print(f"nothing to add; {path} untouched")
        return 0
    text = (original if original.endswith("\n") or not original else original + "\n") \
        + f"\n# ---- imported from Grafana OnCall ({origin}) by tocsin import-oncall ----\n\n" + plan.blocks
    if args.dry_run:
        print("\n# dry run: these blocks would be appended to", path)
        print(plan.blocks, end="")
        return 0
    try:
        _replace_config(path, text)
    except cfg.ConfigError as exc:
        return _fail(f"the imported config does not check, {path} untouched:\n" + "\n".join(exc.problems))
    print(f"{path}: appended {len(plan.imported)} integration(s); reload the daemon (SIGHUP) to serve them")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tocsin", description="Alert-ingestion daemon (webhooks and email).")
    parser.add_argument("--version", action="version", version=f"tocsin {version()}")
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

    with_config(sub.add_parser("migrate", help="bring the database schema up to date, then exit")).set_defaults(
        func=cmd_migrate)
    cp = with_config(sub.add_parser("copy-db", help="copy the SQLite database into an empty PostgreSQL one"))
    cp.add_argument("--to", required=True, metavar="postgresql://…", help="the PostgreSQL database to fill")
    cp.set_defaults(func=cmd_copy_db)

    i = with_config(sub.add_parser("import-oncall", help="append Grafana OnCall's integrations, routes and chains"))
    source = i.add_mutually_exclusive_group(required=True)
    source.add_argument("--url", help="Grafana OnCall's address (/api/v1/ is appended unless given)")
    source.add_argument("--from", dest="source", metavar="DIR", help="a directory of saved API answers")
    i.add_argument("--token", help="OnCall API token (with --url)")
    i.add_argument("--dry-run", action="store_true", help="print the report and the blocks; write nothing")
    i.set_defaults(func=cmd_import_oncall)

    args = parser.parse_args(argv)
    if args.command == "import-oncall" and args.url and not args.token:
        parser.error("import-oncall --url needs --token")
    args.command = {"ack": "acknowledge", "unack": "unacknowledge"}.get(args.command, args.command)
    try:
        return args.func(args)
    except DatabaseUnusable as exc:  # any command that opens the database: one line, no traceback
        return _fail(str(exc))
    except BrokenPipeError:
        # `tocsin render … | head`: the reader left; say nothing more (no traceback).
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
