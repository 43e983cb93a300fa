"""config.toml parsed into plain frozen values, defaults applied once.

Everything the rest of tocsin needs from the file is handed down as these values;
nothing below `daemon/` imports this module.
"""
from __future__ import annotations

import ipaddress
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from escalation.chains import Chain, parse_chain
from escalation.notifiers import NotifierConfig, parse_notifier
from grouping.kinds import TEMPLATE_NAMES
from grouping.durations import parse_duration
from grouping.limits import parse_rate


class ConfigError(Exception):
    """The configuration is unusable; `problems` holds one line per defect."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class DaemonConfig:
    database: Path | str  # an SQLite file, or a postgresql:// URL
    public_url: str
    render_budget: float = 1.0
    log_level: str = "INFO"
    log_format: str = "logfmt"
    shutdown_timeout: float = 30.0
    rate_limit: str | None = None       # default for every integration, "N/period"
    retention: float | None = None      # seconds; resolved groups older than this are pruned


@dataclass(frozen=True)
class HttpConfig:
    host: str
    port: int
    max_body_bytes: int = 1024 * 1024
    max_connections: int = 2048
    body_timeout: float = 30.0        # seconds from the request head to the body's last byte
    header_timeout: float = 10.0      # seconds to send a whole request head
    keepalive_timeout: float = 75.0   # seconds an idle keep-alive connection stays open


@dataclass(frozen=True)
class SmtpConfig:
    host: str
    port: int
    domain: str
    extra_domains: tuple[str, ...] = ()
    max_message_bytes: int = 10 * 1024 * 1024
    max_recipients: int = 50
    session_timeout: float = 300.0
    data_timeout: float = 120.0
    max_sessions: int = 200
    tls_cert: Path | None = None
    tls_key: Path | None = None
    allowed_networks: tuple[str, ...] = ()
    max_stored_raw_bytes: int = 1024 * 1024

    @property
    def domains(self) -> tuple[str, ...]:
        """Every domain whose addresses tocsin accepts, lower-cased."""
        return tuple(d.lower() for d in (self.domain, *self.extra_domains))


@dataclass(frozen=True)
class RouteConfig:
    """One [[integrations.routes]] entry; neither condition nor regex: the default route."""

    id: str
    condition: str | None = None
    regex: str | None = None
    escalation: str | None = None


@dataclass(frozen=True)
class ImapConfig:
    """An inbound_email integration's mailbox: `imap = { url, password_file, after, poll }`."""

    url: str                    # as written, for logs (no password in it)
    host: str
    port: int
    user: str
    folder: str
    password: str = field(repr=False, default="")
    tls: str = "ssl"            # ssl (imaps://) | starttls (imap://) ; plain only to loopback
    after: str = "seen"         # seen | delete | move
    move_to: str | None = None
    poll: float = 30.0
    ca_file: Path | None = None


@dataclass(frozen=True)
class IntegrationConfig:
    id: str
    name: str
    kind: str
    token: str
    templates: dict[str, str] = field(default_factory=dict)
    rate_limit: str | None = None
    routes: tuple[RouteConfig, ...] = ()
    heartbeat_timeout: float | None = None
    imap: ImapConfig | None = None


@dataclass(frozen=True)
class Config:
    path: Path
    daemon: DaemonConfig
    http: HttpConfig
    smtp: SmtpConfig | None
    api_tokens: tuple[str, ...]
    integrations: tuple[IntegrationConfig, ...]
    escalations: tuple[Chain, ...] = ()
    notifiers: tuple[NotifierConfig, ...] = ()

    def integration(self, integration_id: str) -> IntegrationConfig | None:
        return next((i for i in self.integrations if i.id == integration_id), None)


_SLUG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class _Reader:
    """Walks one TOML table, collecting problems instead of stopping at the first."""

    def __init__(self, problems: list[str], where: str, table: Any):
        self.problems = problems
        self.where = where
        self.table = table if isinstance(table, dict) else {}
        self.seen: set[str] = set()
        if not isinstance(table, dict):
            problems.append(f"{where}: must be a table")

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = None, required: bool = False):
        self.seen.add(key)
        if key not in self.table:
            if required:
                self.problems.append(f"{self.where}: missing required key '{key}'")
            return default
        value = self.table[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, float)):
            name = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            self.problems.append(f"{self.where}: '{key}' must be {name}, got {type(value).__name__}")
            return default
        return value

    def duration(self, key: str, default: float | None, *, positive: bool = True, off: bool = False) -> float | None:
        """Seconds from a number or a text like "90m", "1h30m" (grouping.durations); None for "off" if allowed."""
        self.seen.add(key)
        value = self.table.get(key, default)
        if key not in self.table or value is None:
            return default
        if off and isinstance(value, str) and value.strip().lower() == "off":
            return None
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            self.problems.append(f"{self.where}: '{key}': {exc}")
            return default
        if positive and seconds <= 0:
            self.problems.append(f"{self.where}: '{key}' must be positive" + (' (or "off")' if off else ""))
            return default
        return seconds

    def positive(self, key: str, default: int | float, kind: type = int):
        value = self.get(key, kind, default)
        if value is not None and value <= 0:
            self.problems.append(f"{self.where}: '{key}' must be positive")
            return default
        return value

    def finish(self) -> None:
        for key in self.table:
            if key not in self.seen:
                self.problems.append(f"{self.where}: unknown key '{key}'")


def parse_listen(value: str, where: str, problems: list[str]) -> tuple[str, int]:
    """`host:port` or `[v6]:port` into a pair, reporting a clear problem when malformed."""
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([^:\[\]]+):(\d+)", value or "")
    if not match:
        problems.append(f"{where}: listen address '{value}' is not host:port")
        return "127.0.0.1", 0
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    if not 0 <= port <= 65535:
        problems.append(f"{where}: port {port} out of range")
    if match.group(1):
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            problems.append(f"{where}: '{host}' is not an IPv6 address")
    return host, port


def _rate(text: str | None, where: str, problems: list[str]) -> str | None:
    if text is None or text.strip().lower() == "off":
        return text and "off"
    try:
        parse_rate(text)
    except ValueError as exc:
        problems.append(f"{where}: {exc}")
        return None
    return text


def _imap(table: Any, base: Path, where: str, problems: list[str]) -> ImapConfig | None:
    """`imap = { url = "imaps://user@host/INBOX", password_file, after = "seen", poll = "30s" }`."""
    from urllib.parse import unquote, urlsplit

    where = f"{where} imap"
    if not isinstance(table, dict):
        problems.append(f"{where}: must be a table like {{ url = \"imaps://user@host/INBOX\", password_file = \"…\" }}")
        return None
    r = _Reader(problems, where, table)
    url = r.get("url", str, "", required=True)
    password_file = r.get("password_file", str, "", required=True)
    after = r.get("after", str, "seen")
    poll = r.duration("poll", 30.0)
    ca_file = r.get("ca_file", str)
    r.finish()
    if not url:
        return None
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        problems.append(f"{where}: '{url}' has an invalid port")
        return None
    if parts.scheme not in ("imaps", "imap") or not parts.hostname:
        problems.append(f"{where}: url must be imaps://user@host/FOLDER (or imap://, which uses STARTTLS)")
        return None
    if not parts.username:
        problems.append(f"{where}: url must name the user, as in imaps://user@host/INBOX")
    if parts.password is not None:
        problems.append(f"{where}: put the password in password_file, not in the url")
    if parts.query or parts.fragment:
        problems.append(f"{where}: url takes no query or fragment")
    mode, _, move_to = after.partition(":")
    if mode not in ("seen", "delete", "move") or (mode == "move") != bool(move_to):
        problems.append(f"{where}: 'after' must be \"seen\", \"delete\" or \"move:Folder\"")
    password = ""
    if password_file:
        pf = Path(password_file) if Path(password_file).is_absolute() else base / password_file
        try:
            password = pf.read_text(encoding="utf-8").rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(f"{where}: cannot read password_file: {exc}")
    ca = None
    if ca_file:
        ca = Path(ca_file) if Path(ca_file).is_absolute() else base / ca_file
        if not ca.is_file():
            problems.append(f"{where}: ca_file {ca} is not a file")
    folder = unquote(parts.path.lstrip("/")) or "INBOX"
    tls = "ssl" if parts.scheme == "imaps" else "starttls"
    return ImapConfig(url=url, host=parts.hostname, port=port or (993 if tls == "ssl" else 143),
                      user=unquote(parts.username or ""), folder=folder, password=password, tls=tls,
                      after=mode, move_to=move_to or None, poll=poll, ca_file=ca)


def _routes(tables: list, iid: str, where: str, problems: list[str], chains: set[str],
            check_template) -> tuple[RouteConfig, ...]:
    """Routes in order; the default route (no condition, no regex) must be last."""
    out: list[RouteConfig] = []
    for n, table in enumerate(tables, start=1):
        here = f"{where} route #{n}"
        r = _Reader(problems, here, table)
        rid = r.get("id", str, f"{iid}-route-{n}")
        condition = r.get("condition", str)
        regex_text = r.get("regex", str)
        escalation = r.get("escalation", str)
        r.finish()
        if condition is not None and regex_text is not None:
            problems.append(f"{here}: give 'condition' or 'regex', not both")
        if escalation is not None and escalation not in chains:
            problems.append(f"{here}: unknown escalation '{escalation}'")
        if condition is not None and check_template is not None and (problem := check_template(condition)):
            problems.append(f"{here}: condition: {problem}")
        if regex_text is not None:
            import regex as _regex

            try:
                _regex.compile(regex_text)
            except _regex.error as exc:
                problems.append(f"{here}: invalid regex: {exc}")
        if any(x.id == rid for x in out):
            problems.append(f"{here}: duplicate route id '{rid}'")
        out.append(RouteConfig(rid, condition, regex_text, escalation))
    defaults = [i for i, x in enumerate(out) if x.condition is None and x.regex is None]
    if len(defaults) > 1:
        problems.append(f"{where}: more than one default route (a route without condition or regex)")
    elif defaults and defaults[0] != len(out) - 1:
        problems.append(f"{where}: the default route (no condition or regex) must come last")
    return tuple(out)


def load(path: str | Path, known_kinds: frozenset[str] | None = None, check_template=None) -> Config:
    """Read and validate config.toml; raise ConfigError listing every problem."""
    path = Path(path).resolve()
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError([f"{path}: no such file"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}: cannot read: {exc}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: invalid TOML: {exc}"]) from None
    return parse(raw, path, known_kinds, check_template)


def parse(raw: dict, path: Path, known_kinds: frozenset[str] | None = None, check_template=None) -> Config:
    """Validate a parsed TOML document; `check_template(text)` returns a problem or None."""
    problems: list[str] = []
    base = path.parent
    top = _Reader(problems, "config", raw)

    d = _Reader(problems, "[daemon]", top.get("daemon", dict, {}))
    database = d.get("database", str, "var/tocsin.db")
    if database.startswith(("postgresql://", "postgres://")):
        db_path: Path | str = database  # the password may come from the URL, PGPASSWORD or PGPASSFILE
    else:
        db_path = Path(database) if Path(database).is_absolute() else base / database
    daemon = DaemonConfig(
        database=db_path,
        public_url=d.get("public_url", str, "http://127.0.0.1:8080").rstrip("/"),
        render_budget=d.positive("render_budget", 1.0, float),
        log_level=d.get("log_level", str, "INFO").upper(),
        log_format=d.get("log_format", str, "logfmt"),
        shutdown_timeout=d.duration("shutdown_timeout", 30.0),
        rate_limit=_rate(d.get("rate_limit", str), "[daemon]", problems),
        retention=d.duration("retention", None, off=True),
    )
    if daemon.log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        problems.append("[daemon]: 'log_level' must be DEBUG, INFO, WARNING or ERROR")
    if daemon.log_format not in ("logfmt", "json"):
        problems.append("[daemon]: 'log_format' must be 'logfmt' or 'json'")
    d.finish()

    h = _Reader(problems, "[http]", top.get("http", dict, {}))
    host, port = parse_listen(h.get("listen", str, "127.0.0.1:8080"), "[http]", problems)
    http = HttpConfig(host=host, port=port, max_body_bytes=h.positive("max_body_bytes", 1024 * 1024),
                      max_connections=h.positive("max_connections", 2048),
                      body_timeout=h.duration("body_timeout", 30.0),
                      header_timeout=h.duration("header_timeout", 10.0),
                      keepalive_timeout=h.duration("keepalive_timeout", 75.0))
    h.finish()

    smtp = None
    if "smtp" in raw:
        s = _Reader(problems, "[smtp]", top.get("smtp", dict, {}))
        shost, sport = parse_listen(s.get("listen", str, "127.0.0.1:2525"), "[smtp]", problems)
        networks = tuple(s.get("allowed_networks", list, []))
        for net in networks:
            try:
                ipaddress.ip_network(str(net), strict=False)
            except ValueError:
                problems.append(f"[smtp]: allowed_networks entry '{net}' is not a CIDR network")
        cert, key = s.get("tls_cert", str), s.get("tls_key", str)
        if bool(cert) != bool(key):
            problems.append("[smtp]: 'tls_cert' and 'tls_key' go together")
        smtp = SmtpConfig(
            host=shost,
            port=sport,
            domain=s.get("domain", str, "alerts.example.com").strip().lower(),
            extra_domains=tuple(str(x).strip().lower() for x in s.get("extra_domains", list, [])),
            max_message_bytes=s.positive("max_message_bytes", 10 * 1024 * 1024),
            max_recipients=s.positive("max_recipients", 50),
            session_timeout=s.duration("session_timeout", 300.0),
            data_timeout=s.duration("data_timeout", 120.0),
            max_sessions=s.positive("max_sessions", 200),
            tls_cert=(base / cert) if cert else None,
            tls_key=(base / key) if key else None,
            allowed_networks=tuple(str(n) for n in networks),
            max_stored_raw_bytes=s.get("max_stored_raw_bytes", int, 1024 * 1024),
        )
        s.finish()

    a = _Reader(problems, "[api]", top.get("api", dict, {}))
    tokens = a.get("tokens", list, [])
    if any(not isinstance(t, str) or not t for t in tokens):
        problems.append("[api]: 'tokens' must be a list of non-empty strings")
        tokens = [t for t in tokens if isinstance(t, str) and t]
    a.finish()

    notifiers: list[NotifierConfig] = []
    for n, table in enumerate(top.get("notifiers", list, [])):
        notifier = parse_notifier(table, f"[[notifiers]] #{n + 1}", problems)
        if notifier is not None:
            if any(x.name == notifier.name for x in notifiers):
                problems.append(f"notifier '{notifier.name}': duplicate name")
            notifiers.append(notifier)
    notifier_names = {x.name for x in notifiers}
    chains: list[Chain] = []
    for n, table in enumerate(top.get("escalations", list, [])):
        chain = parse_chain(table, f"[[escalations]] #{n + 1}", problems, notifier_names)
        if chain is not None:
            if any(c.name == chain.name for c in chains):
                problems.append(f"escalation '{chain.name}': duplicate name")
            chains.append(chain)
    chain_names = {c.name for c in chains}

    integrations = []
    seen_ids: set[str] = set()
    seen_tokens: dict[str, str] = {}
    for n, table in enumerate(top.get("integrations", list, [])):
        where = f"[[integrations]] #{n + 1}"
        r = _Reader(problems, where, table)
        iid = r.get("id", str, "", required=True)
        if iid:
            where = f"integration '{iid}'"
            r.where = where
            if not _SLUG.match(iid):
                problems.append(f"{where}: id must be a slug (letters, digits, '_', '-', '.')")
            if iid in seen_ids:
                problems.append(f"{where}: duplicate id")
            seen_ids.add(iid)
        kind = r.get("kind", str, "", required=True)
        if kind and known_kinds is not None and kind not in known_kinds:
            problems.append(f"{where}: unknown kind '{kind}' (known: {', '.join(sorted(known_kinds))})")
        token = r.get("token", str)
        token_file = r.get("token_file", str)
        if token and token_file:
            problems.append(f"{where}: give 'token' or 'token_file', not both")
        if token_file:
            tf = Path(token_file) if Path(token_file).is_absolute() else base / token_file
            try:
                token = tf.read_text(encoding="utf-8").strip()
            except OSError as exc:
                problems.append(f"{where}: cannot read token_file: {exc}")
        if not token:
            if not token_file:
                problems.append(f"{where}: missing 'token' (or 'token_file')")
        elif not re.fullmatch(r"[A-Za-z0-9_.~-]{8,128}", token):
            problems.append(f"{where}: token must be 8-128 URL-safe characters")
        elif token in seen_tokens:
            problems.append(f"{where}: duplicate token (also used by '{seen_tokens[token]}')")
        else:
            seen_tokens[token] = iid
        templates = r.get("templates", dict, {})
        for name, value in templates.items():
            if name not in TEMPLATE_NAMES:
                problems.append(f"{where}: unknown template '{name}' (known: {', '.join(TEMPLATE_NAMES)})")
            elif not isinstance(value, str):
                problems.append(f"{where}: template '{name}' must be a string")
            elif check_template is not None and (problem := check_template(value)):
                problems.append(f"{where}: template '{name}': {problem}")
        imap = None
        imap_table = r.get("imap", dict)
        if imap_table is not None:
            imap = _imap(imap_table, base, where, problems)
            if kind and kind != "inbound_email":
                problems.append(f"{where}: 'imap' applies to inbound_email integrations only")
        integrations.append(
            IntegrationConfig(
                id=iid,
                name=r.get("name", str, iid),
                kind=kind,
                token=token or "",
                templates={k: v for k, v in templates.items() if k in TEMPLATE_NAMES and isinstance(v, str)},
                rate_limit=_rate(r.get("rate_limit", str), where, problems),
                routes=_routes(r.get("routes", list, []), iid, where, problems, chain_names, check_template),
                heartbeat_timeout=r.duration("heartbeat_timeout", None, off=True),
                imap=imap,
            )
        )
        r.finish()
    top.finish()

    if problems:
        raise ConfigError(problems)
    return Config(
        path=path,
        daemon=daemon,
        http=http,
        smtp=smtp,
        api_tokens=tuple(tokens),
        integrations=tuple(integrations),
        escalations=tuple(chains),
        notifiers=tuple(notifiers),
    )


def serving_problems(config: Config, running: Config | None = None) -> list[str]:
    """What makes a valid file unfit to serve from: the rule `tocsin check`, `tocsin serve`
    and a reload (SIGHUP) share. An empty or truncated file parses; refuse it anyway when
    it would leave the daemon accepting nothing, or, on reload, lock everyone out of the
    API and web UI that the running config let in. (`new-integration` does not ask: it
    must work on a file with no integrations yet.)"""
    problems = []
    if not config.integrations:
        problems.append(f"{config.path}: no [[integrations]]: tocsin would accept no alert"
                        " (an empty or truncated file? add one with `tocsin new-integration`)")
    if running is not None and running.api_tokens and not config.api_tokens:
        problems.append(f"{config.path}: [api] tokens: none left, the running config has {len(running.api_tokens)};"
                        " the API and web UI would refuse everyone (a truncated file?)")
    return problems
