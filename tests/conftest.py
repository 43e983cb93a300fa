"""Shared fixtures: a real tocsin on 127.0.0.1 ephemeral ports over a real SQLite file."""
from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from daemon.app import Daemon, load_config

ROOT = Path(__file__).resolve().parent.parent
# The sample payloads and mails shipped in examples/: the tests read nothing outside the repository.
CORPUS = ROOT / "examples"
API_TOKEN = "test-api-token"

# One integration per kind: (id, kind, token).
INTEGRATIONS = [
    ("am", "alertmanager", "tok-alertmanager-1"),
    ("ga", "grafana_alerting", "tok-grafana-alerting-1"),
    ("gl", "grafana", "tok-grafana-legacy-1"),
    ("wh", "webhook", "tok-webhook-0001"),
    ("fw", "formatted_webhook", "tok-formatted-0001"),
    ("zb", "zabbix", "tok-zabbix-00001"),
    ("kp", "kapacitor", "tok-kapacitor-001"),
    ("ea", "elastalert", "tok-elastalert-01"),
    ("mail", "inbound_email", "tok-inbound-email-1"),
    ("pager", "pagerduty", "tok-pagerduty-00001"),
]
TOKEN = {i: t for i, _, t in INTEGRATIONS}
KIND = {i: k for i, k, _ in INTEGRATIONS}


def integration(iid: str, kind: str, token: str, rest: str = "", name: str | None = None) -> str:
    """An extra [[integrations]] block for `extra_integrations`; Harness.post then knows its URL.
    `rest` follows the token line (more keys, a templates table, routes)."""
    KIND[iid], TOKEN[iid] = kind, token
    named = f'name = "{name}"\n' if name else ""
    return f'\n[[integrations]]\nid = "{iid}"\n{named}kind = "{kind}"\ntoken = "{token}"\n{rest}\n'


def corpus(name: str) -> bytes:
    """The bytes of one file under examples/, e.g. `corpus("http/zabbix-ok.json")`."""
    return (CORPUS / name).read_bytes()


def corpus_files(pattern: str) -> list[Path]:
    """Files under examples/ matching a glob, sorted; matching none is an error, so a moved
    folder fails collection instead of quietly parametrizing zero cases."""
    paths = sorted(CORPUS.glob(pattern))
    assert paths, f"no {pattern} under {CORPUS}"
    return paths


def config_text(tmp_path: Path, *, extra_integrations: str = "", daemon_extra: str = "",
                http_extra: str = "", smtp: bool = False) -> str:
    lines = [
        "[daemon]",
        f'database = "{tmp_path / "tocsin.db"}"',
        'public_url = "http://127.0.0.1:8080"',
        daemon_extra,
        "[http]",
        'listen = "127.0.0.1:0"',
        http_extra,
    ]
    if smtp:
        lines += ["[smtp]", 'listen = "127.0.0.1:0"', 'domain = "alerts.example.com"']
    lines += ["[api]", f'tokens = ["{API_TOKEN}"]']
    for iid, kind, token in INTEGRATIONS:
        lines += ["[[integrations]]", f'id = "{iid}"', f'name = "Test {kind}"', f'kind = "{kind}"',
                  f'token = "{token}"']
    lines.append(extra_integrations)
    return "\n".join(lines) + "\n"


def write_config(tmp_path: Path, **kw) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(config_text(tmp_path, **kw))
    return path


class Harness:
    """A running daemon plus a client session pointed at it."""

    def __init__(self, daemon: Daemon, session: aiohttp.ClientSession, config_path: Path):
        self.daemon = daemon
        self.session = session
        self.config_path = config_path
        self.base = f"http://127.0.0.1:{daemon.http_port}"

    async def post(self, iid: str, body=None, *, kind: str | None = None, token: str | None = None,
                   data=None, headers=None, slash: bool = True):
        url = f"{self.base}/integrations/v1/{kind or KIND[iid]}/{token or TOKEN[iid]}" + ("/" if slash else "")
        kwargs = {"headers": headers or {}}
        if body is not None:
            kwargs["data"] = body if isinstance(body, (bytes, str)) else json.dumps(body)
            kwargs["headers"].setdefault("Content-Type", "application/json")
        elif data is not None:
            kwargs["data"] = data
        async with self.session.post(url, **kwargs) as r:
            return r.status, await _body(r)

    async def api(self, method: str, path: str, body=None, *, token: str | None = API_TOKEN):
        headers = {"Authorization": token} if token else {}
        kwargs = {"headers": headers}
        if body is not None:
            kwargs["json"] = body
        async with self.session.request(method, f"{self.base}/api/v1/{path}", **kwargs) as r:
            return r.status, await _body(r)

    async def groups(self, **query) -> list[dict]:
        q = "&".join(f"{k}={v}" for k, v in query.items())
        status, body = await self.api("GET", f"alert_groups/?perpage=200&{q}")
        assert status == 200, body
        return body["results"]


async def _body(r: aiohttp.ClientResponse):
    text = await r.text()
    try:
        return json.loads(text)
    except ValueError:
        return text


@pytest.fixture
async def start_tocsin(tmp_path):
    """Factory: start a daemon on a config (written from keyword options), stop it at the end."""
    started: list[tuple[Daemon, aiohttp.ClientSession]] = []

    async def start(config_path: Path | None = None, **kw) -> Harness:
        path = config_path or write_config(tmp_path, **kw)
        daemon = Daemon(load_config(path))
        await daemon.start()
        session = aiohttp.ClientSession()
        started.append((daemon, session))
        return Harness(daemon, session, path)

    yield start
    for daemon, session in started:
        await session.close()
        await daemon.stop()


@pytest.fixture
async def tocsin(start_tocsin) -> Harness:
    return await start_tocsin()


_LOGFMT_PAIR = re.compile(r'(\w+)=(?:"((?:[^"\\]|\\.)*)"|(\S*))')
_LOGFMT_ESCAPE = {"n": "\n", "t": "\t", "r": "\r"}


def parse_log_line(line: str) -> dict:
    """One line of the daemon's log, JSON or logfmt, as a dict of strings (JSON keeps its types)."""
    line = line.strip()
    if line.startswith("{"):
        try:
            return json.loads(line)
        except ValueError:
            return {}
    return {key: re.sub(r"\\(.)", lambda m: _LOGFMT_ESCAPE.get(m.group(1), m.group(1)), quoted) if quoted else bare
            for key, quoted, bare in _LOGFMT_PAIR.findall(line)}


def ready_ports(line: str) -> tuple[int, int | None] | None:
    """(http port, smtp port or None) from the daemon's "tocsin ready" line; None for any other line."""
    fields = parse_log_line(line)
    if fields.get("msg") != "tocsin ready" or "http" not in fields:
        return None
    smtp = fields.get("smtp", "off")
    return int(fields["http"].rpartition(":")[2]), (None if smtp == "off" else int(smtp.rpartition(":")[2]))


class Process:
    """`python -m daemon serve` as a child process, ports read from its ready line."""

    def __init__(self, config_path: Path, env: dict | None = None):
        self.config_path = config_path
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "daemon", "serve", "-c", str(config_path)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, **(env or {})},
        )
        self.http_port = self.smtp_port = None
        deadline = time.monotonic() + 20
        self.output: list[str] = []
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.output.append(line)
            ready = ready_ports(line)
            if ready:
                self.http_port, self.smtp_port = ready
                # Keep reading, so a chatty child never blocks on a full pipe.
                threading.Thread(target=self._drain, daemon=True).start()
                return
        self.proc.kill()
        raise RuntimeError("daemon did not start:\n" + "".join(self.output))

    def _drain(self) -> None:
        try:
            for line in self.proc.stdout:
                self.output.append(line)
        except (ValueError, OSError):
            pass

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def stop(self, sig=None) -> int:
        if self.proc.poll() is None:
            if sig is None:
                self.proc.terminate()
            else:
                self.proc.send_signal(sig)
        return self.proc.wait(timeout=30)


@pytest.fixture
def spawn(tmp_path):
    procs: list[Process] = []

    def start(config_path: Path | None = None, env: dict | None = None, **kw) -> Process:
        p = Process(config_path or write_config(tmp_path, **kw), env)
        procs.append(p)
        return p

    yield start
    for p in procs:
        if p.proc.poll() is None:
            p.proc.kill()
            p.proc.wait()


def require(available: bool, what: str) -> None:
    """Skip a test whose real peer (a Debian package, a server) is missing, with one line saying
    how to get it; under CI (.ci/run sets TOCSIN_CI=1) a missing peer fails the test instead."""
    if available:
        return
    if os.environ.get("TOCSIN_CI"):
        pytest.fail(f"{what} (required under TOCSIN_CI)")
    pytest.skip(what)


class WebhookReceiver:
    """A webhook notifier's receiver on 127.0.0.1 (see `webhook_receiver`): records each JSON
    request it accepts; answers 500 to the first `fail_first` requests."""

    def __init__(self, fail_first: int = 0):
        self.requests: list[dict] = []   # {"body", "headers"} of each accepted request
        self.fail_first = fail_first
        self.seen = 0
        self.url = ""

    async def handle(self, request) -> "web.Response":
        self.seen += 1
        body = await request.json()
        if self.seen <= self.fail_first:
            return web.Response(status=500, text="not now")
        self.requests.append({"body": body, "headers": dict(request.headers)})
        return web.json_response({"ok": True})

    @property
    def bodies(self) -> list[dict]:
        return [r["body"] for r in self.requests]

    def events(self, group_id: str | None = None) -> list[str]:
        return [b["event"] for b in self.bodies if group_id is None or b["alert_group"]["id"] == group_id]


@contextlib.asynccontextmanager
async def webhook_receiver(fail_first: int = 0):
    """A WebhookReceiver listening on an ephemeral port for the block's duration; its url is set."""
    rec = WebhookReceiver(fail_first)
    app = web.Application()
    app.router.add_post("/hook", rec.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    rec.url = f"http://127.0.0.1:{runner.addresses[0][1]}/hook"
    try:
        yield rec
    finally:
        await runner.cleanup()
# -- PostgreSQL: a throwaway database per test on a real server ------------------------------

PG_URL = os.environ.get("TOCSIN_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def _pg(sql: str) -> str | None:
    """Run one statement on the server's maintenance database; None, or why it could not."""
    import asyncio

    import asyncpg

    async def run():
        conn = await asyncpg.connect(PG_URL, timeout=5)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()
    try:
        # In a thread of its own: a test's event loop may be running in this one.
        with __import__("concurrent.futures").futures.ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, run()).result(timeout=30)
    except Exception as exc:  # noqa: BLE001 - any failure means: no usable server
        return str(exc) or type(exc).__name__
    return None


@pytest.fixture
def pg_url():
    """A fresh, empty PostgreSQL database's URL (dropped afterwards). Skips with one line where
    no server answers (fails under TOCSIN_CI)."""
    import secrets
    import urllib.parse

    name = f"tocsin_test_{secrets.token_hex(6)}"
    problem = _pg(f"CREATE DATABASE {name}")
    shown = urllib.parse.urlsplit(PG_URL)
    require(problem is None, f"PostgreSQL not reachable at {shown.hostname}:{shown.port or 5432} ({problem}):"
                             " set TOCSIN_PG_URL=postgresql://user@host:port/db to run these")
    yield urllib.parse.urlunsplit(shown._replace(path=f"/{name}"))
    _pg(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
