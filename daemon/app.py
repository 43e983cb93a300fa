"""The process: config in, store opened, listeners bound, signals handled.

`Daemon(config)` is what `tocsin serve` runs and what end-to-end tests start
in-process (ports 0 bind ephemeral ports; read `http_port` / `smtp_port` after start).
"""
from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from grouping.kinds import KINDS
from grouping.limits import Limiter, parse_rate
from grouping.routes import compile_route
from grouping.runtime import Settings
from grouping.pipeline import Integration, IntegrationError, Pipeline, build_integration
from grouping.templates import TemplateCompileError, compile_template
from handlers.api import Api
from handlers.edge import GatedSite, edge_middleware
from handlers.http import Ingress
from handlers.metrics import Metrics
from handlers.pagerduty import PagerDutyEvents
from escalation.engine import Engine
from grouping import rules
from store import ServeLock, examine, is_url, open_store
from ui import setup_ui

from . import config as cfg
from .version import version

log = logging.getLogger("tocsin")


def build_integrations(config: cfg.Config) -> list[Integration]:
    """Compile every integration; raise ConfigError listing each template that fails."""
    out, problems = [], []
    snapshots = {c.name: c.to_json() for c in config.escalations}
    for ic in config.integrations:
        try:
            routes = tuple(compile_route(r.id, condition=r.condition, regex_text=r.regex, escalation=r.escalation)
                           for r in ic.routes)
            chains = {r.id: snapshots[r.escalation] for r in routes if r.escalation in snapshots}
            out.append(build_integration(ic.id, ic.name, ic.kind, ic.token, ic.templates, routes, chains))
        except (IntegrationError, ValueError) as exc:
            problems.extend(f"integration '{ic.id}': {line}" if not str(line).startswith("integration") else line
                            for line in str(exc).splitlines())
    if problems:
        raise cfg.ConfigError(problems)
    return out


def _template_problem(source: str) -> str | None:
    try:
        compile_template(source)
    except TemplateCompileError as exc:
        return str(exc)
    return None


async def _listen(what: str, host: str, port: int, starting) -> None:
    """Await a listener's start; a port that cannot be bound (or a TLS file that cannot be
    read) becomes one line."""
    try:
        await starting
    except OSError as exc:
        if exc.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES) and not exc.filename:
            raise StartupError(f"cannot listen for {what} on {host}:{port}: {os.strerror(exc.errno).lower()}") from None
        reason = (exc.strerror or str(exc)) + (f": {exc.filename}" if exc.filename else "")
        raise StartupError(f"cannot start the {what} listener on {host}:{port}: {reason}") from None


def load_config(path) -> cfg.Config:
    """Parse, validate and compile: what `tocsin check` and SIGHUP both run."""
    config = cfg.load(path, frozenset(KINDS), _template_problem)
    build_integrations(config)
    return config


def settings_of(config: cfg.Config) -> Settings:
    """The running config's values the API and the engine read (one object, swapped with the pipeline)."""
    return Settings(
        public_url=config.daemon.public_url,
        api_tokens=tuple(config.api_tokens),
        email_domain=config.smtp.domain if config.smtp else None,
        notifiers={n.name: n for n in config.notifiers},
        heartbeat_timeouts={i.id: i.heartbeat_timeout for i in config.integrations if i.heartbeat_timeout},
    )


class StartupError(Exception):
    """tocsin cannot start; the text is one line for the operator."""


def _rate_spec(own: str | None, default: str | None):
    text = own if own is not None else default
    return None if text is None or text == "off" else parse_rate(text)


class Daemon:
    """One tocsin process: HTTP and SMTP listeners over one store."""

    def __init__(self, config: cfg.Config):
        self.config = config
        self.store = open_store(config.daemon.database, rules=rules)
        # One serving process per SQLite file; on PostgreSQL any number share the database.
        self.lock = None if is_url(config.daemon.database) else ServeLock(config.daemon.database)
        self.metrics = Metrics(version=version())
        self.limiter = Limiter()
        self.engine = Engine(self.store, self.current, hooks=self.metrics)
        self.store.on_commit = self.metrics.committed
        self.executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="render")
        self.pipeline: Pipeline | None = None
        self.http_port: int | None = None
        self.smtp_port: int | None = None
        self._runner: web.AppRunner | None = None
        self._smtp = None
        self._tasks: list[asyncio.Task] = []
        self._stopped = asyncio.Event()
        self._notifier = None
        self.mailboxes: dict = {}  # integration id -> handlers.imap.Mailbox

    def current(self) -> Pipeline:
        return self.pipeline

    def _make_pipeline(self, config: cfg.Config) -> Pipeline:
        self.store.lifecycle_events = {n.name: frozenset(n.events) for n in config.notifiers}
        self.limiter.configure({i.id: _rate_spec(i.rate_limit, config.daemon.rate_limit) for i in config.integrations})
        return Pipeline(build_integrations(config), self.store,
                        render_budget=config.daemon.render_budget, executor=self.executor,
                        metrics=self.metrics, limiter=self.limiter, settings=settings_of(config))

    def make_app(self) -> web.Application:
        c = self.config
        api = Api(self.current, max_body_bytes=c.http.max_body_bytes, hooks=self.metrics)
        app = web.Application(client_max_size=c.http.max_body_bytes, middlewares=[edge_middleware])
        ingress = Ingress(self.current, max_body_bytes=c.http.max_body_bytes, hooks=self.metrics,
                          on_heartbeat=self.engine.heartbeat_received)
        # Before Ingress: its /integrations/v1/{kind}/{token} would match the pagerduty URL too.
        app.add_routes(PagerDutyEvents(self.current, max_body_bytes=c.http.max_body_bytes, hooks=self.metrics,
                                       parsers=ingress.parsers, budget=ingress.budget).routes())
        app.add_routes(ingress.routes())
        app.cleanup_ctx.append(ingress.cleanup_ctx)
        app.add_routes(api.routes())
        app.add_routes([
            web.get("/healthz", self.healthz),
            web.get("/readyz", self.readyz),
            web.get("/metrics", self.metrics.handler(self.store.count_open_groups)),
        ])
        setup_ui(app, self)
        return app

    async def healthz(self, request: web.Request) -> web.Response:
        """Alive; with the state of each IMAP mailbox (a mailbox down never makes tocsin unready:
        HTTP and SMTP intake still work, so the load balancer keeps sending)."""
        body: dict = {"status": "ok"}
        if self.mailboxes:
            body["mailboxes"] = {iid: {"state": b.status.state, "error": b.status.error, "since": b.status.since,
                                       "last_message_at": b.status.last_message_at}
                                 for iid, b in self.mailboxes.items()}
        return web.json_response(body)

    async def readyz(self, request: web.Request) -> web.Response:
        problem = await self.store.readiness()
        if problem is not None:
            return web.json_response({"status": "unavailable", "error": problem}, status=503)
        return web.json_response({"status": "ok"})

    async def start(self) -> None:
        """Take the database, bind the listeners, start the background work. On any failure
        whatever was started is stopped again before the error propagates: a half-started
        daemon would keep the process alive (the reader's thread, the listeners)."""
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        c = self.config
        if self.lock is not None:
            examine(c.daemon.database)  # before the lock creates anything beside it
            self.lock.acquire()
        await self.store.open()
        self.pipeline = self._make_pipeline(self.config)
        self._runner = web.AppRunner(self.make_app(), access_log=None, handle_signals=False,
                                     shutdown_timeout=c.daemon.shutdown_timeout,
                                     keepalive_timeout=c.http.keepalive_timeout)
        await self._runner.setup()
        site = GatedSite(self._runner, c.http.host, c.http.port, max_connections=c.http.max_connections,
                         header_timeout=c.http.header_timeout, body_timeout=c.http.body_timeout,
                         on_refused=lambda reason: self.metrics.rejected("", "http", reason))
        await _listen("HTTP", c.http.host, c.http.port, site.start())
        self.http_port = self._runner.addresses[0][1]
        self._http_listen = (c.http.host, c.http.port)
        if c.smtp is not None:
            from handlers.smtp import SmtpIngress

            self._smtp = SmtpIngress(c.smtp, self.current, metrics=self.metrics)
            await _listen("SMTP", c.smtp.host, c.smtp.port, self._smtp.start())
            self.smtp_port = self._smtp.port
        self._sync_mailboxes(c)
        self._tasks.append(asyncio.create_task(self._housekeeping(), name="housekeeping"))
        await self.engine.start()
        log.info("tocsin ready", extra={"version": version(), "http": f"{c.http.host}:{self.http_port}",
                                        "smtp": f"{c.smtp.host}:{self.smtp_port}" if c.smtp else "off",
                                        "integrations": len(c.integrations)})

    def _sync_mailboxes(self, config: cfg.Config) -> None:
        """One IMAP reader per integration with `imap`; a changed setting restarts its reader."""
        from handlers.imap import Mailbox

        wanted = {i.id: i.imap for i in config.integrations if i.imap is not None}
        for iid, box in list(self.mailboxes.items()):
            if wanted.get(iid) != box.settings:
                del self.mailboxes[iid]
                self._tasks.append(asyncio.create_task(box.stop(), name=f"imap-stop-{iid}"))
        raw_cap = config.smtp.max_stored_raw_bytes if config.smtp else 1024 * 1024
        for iid, settings in wanted.items():
            if iid not in self.mailboxes:
                box = Mailbox(iid, settings, self.current, max_stored_raw_bytes=raw_cap, metrics=self.metrics)
                box.start()
                self.mailboxes[iid] = box

    async def _housekeeping(self) -> None:
        """Background upkeep: silences that end, and retention of resolved groups."""
        next_prune = 0.0
        failed: str | None = None
        while True:
            await asyncio.sleep(1)
            try:
                now = time.time()
                ends = await self.store.next_silence_end()
                if ends is not None and ends <= now:
                    await self.store.expire_silences(now)
                retention = self.config.daemon.retention
                if retention and now >= next_prune:
                    # Small batches through the writer, so ingestion never waits long behind them.
                    pruned = await self.store.prune(now - retention, limit=500)
                    if pruned:
                        log.info("retention pruned resolved groups", extra={"groups": pruned})
                    next_prune = now if pruned == 500 else now + 60
                failed = None
            except Exception as exc:  # noqa: BLE001 - retried next second
                if str(exc) != failed:  # once per cause, not every second of an outage
                    log.warning("housekeeping failed", extra={"error": str(exc)})
                failed = str(exc)

    def reload(self, path) -> bool:
        """Swap in a new config atomically; a bad file leaves the running one in place."""
        self.notify("RELOADING=1")
        try:
            new = load_config(path)
            problems = cfg.serving_problems(new, running=self.config)
            if problems:
                raise cfg.ConfigError(problems)
            pipeline = self._make_pipeline(new)
        except cfg.ConfigError as exc:
            log.error("reload refused, keeping the running config", extra={"problems": exc.problems})
            self.notify("READY=1")
            return False
        self.config, self.pipeline = new, pipeline
        self._sync_mailboxes(new)
        if self._smtp is not None and new.smtp is not None and not self._smtp.reconfigure(new.smtp):
            log.warning("reload: the [smtp] listen address or TLS files changed; they apply after a restart")
        if (new.http.host, new.http.port) != (self._http_listen):
            log.warning("reload: the [http] listen address changed; it applies after a restart")
        log.info("config reloaded", extra={"integrations": len(new.integrations)})
        self.notify("READY=1")
        return True

    async def stop(self) -> None:
        """Drain: stop accepting, finish in-flight requests and commits, close."""
        for task in self._tasks:
            task.cancel()
        await self.engine.stop()
        await asyncio.gather(*(box.stop() for box in self.mailboxes.values()))
        if self._smtp is not None:
            await self._smtp.stop(self.config.daemon.shutdown_timeout)
        if self._runner is not None:
            await self._runner.cleanup()
        await self.store.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
        if self.lock is not None:
            self.lock.release()
        self._stopped.set()

    def notify(self, state: str) -> None:
        """Tell systemd (Type=notify) about our state; a no-op outside systemd."""
        if self._notifier is not None:
            self._notifier.notify(state)

    async def _watchdog(self, interval: float) -> None:
        while True:
            self.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    async def serve_forever(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: self.reload(self.config.path))
        if os.environ.get("NOTIFY_SOCKET"):
            import sdnotify

            self._notifier = sdnotify.SystemdNotifier()
        await self.start()
        # Only now: both listeners are bound and the database is open.
        self.notify(f"READY=1\nSTATUS=serving http on port {self.http_port}"
                    + (f", smtp on port {self.smtp_port}" if self.smtp_port else ""))
        watchdog_usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
        if watchdog_usec and os.environ.get("WATCHDOG_PID", str(os.getpid())) == str(os.getpid()):
            self._tasks.append(asyncio.create_task(self._watchdog(watchdog_usec / 2e6), name="watchdog"))
        await stop.wait()
        self.notify("STOPPING=1")
        log.info("stopping: draining in-flight requests")
        await self.stop()
        log.info("stopped")
