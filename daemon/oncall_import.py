"""`tocsin import-oncall`: Grafana OnCall's integrations, routes and chains as config.toml blocks.

Reads OnCall's public API (live, every `next` page followed, nothing written there) or a
directory of saved answers, and plans TOML blocks to append to config.toml. Whatever has
no tocsin equivalent is named in the report and kept as a comment where it stood, so
nothing is dropped silently. Tokens are kept: every sender changes only its hostname.
"""
from __future__ import annotations

import json
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import jinja2
import jinja2.meta
import tomlkit

# OnCall's public API collections, by the file name `--from DIR` reads.
COLLECTIONS = ("integrations", "routes", "escalation_chains", "escalation_policies", "webhooks")
MAX_PAGES = 1000  # a loop of `next` links must end

# OnCall template name -> tocsin template name (the web appearance is tocsin's only one).
_BEHAVIOUR = {"grouping_key": "grouping_id", "resolve_signal": "resolve_condition",
              "acknowledge_signal": "acknowledge_condition", "source_link": "source_link"}
_WEB = {"title": "title", "message": "message", "image_url": "image_url"}
# What tocsin's templates can see (grouping/pipeline.py); OnCall also has labels and grafana_oncall_link.
_BEHAVIOUR_VARIABLES = frozenset({"payload"})
_APPEARANCE_VARIABLES = frozenset({"payload", "integration_name", "source_link", "alert_group_id",
                                   "grafana_oncall_alert_group_id", "grafana_oncall_incident_id"})
_JINJA_GLOBALS = frozenset({"range", "dict", "cycler", "joiner", "namespace", "time", "loop"})
# OnCall types tocsin serves under another kind: (tocsin kind, what differs).
_LEGACY = {
    "legacy_alertmanager": ("alertmanager", "legacy Alertmanager split each alert of a body into its own"
                            " alert; tocsin's alertmanager kind keeps the body as one alert"),
    "legacy_grafana_alerting": ("grafana_alerting", "legacy Grafana Alerting split each alert of a body into"
                                " its own alert; tocsin's grafana_alerting kind keeps the body as one alert"),
}
_PERSON_STEPS = {
    "notify_persons": "notify users", "notify_person_next_each_time": "notify users in turn",
    "notify_on_call_from_schedule": "notify an on-call schedule", "notify_user_group": "notify a Slack user group",
    "notify_team_members": "notify team members", "notify_whole_channel": "notify a whole Slack channel",
    "declare_incident": "declare an incident",
}
_LINK = re.compile(r"/integrations/v1/([^/]+)/([^/]+)/$")
_TOKEN = re.compile(r"[A-Za-z0-9_.~-]{8,128}")
_MASK = re.compile(r"^\*+$")


class ImportFailed(Exception):
    """The export could not be read (unreachable server, refused token, bad file)."""


@dataclass
class Export:
    """OnCall's objects, one list per collection."""

    integrations: list[dict] = field(default_factory=list)
    routes: list[dict] = field(default_factory=list)
    escalation_chains: list[dict] = field(default_factory=list)
    escalation_policies: list[dict] = field(default_factory=list)
    webhooks: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what reading it noticed (a collection missing)


@dataclass
class Plan:
    """What an import appends, and what it tells the user."""

    blocks: str = ""
    report: list[str] = field(default_factory=list)
    imported: list[str] = field(default_factory=list)  # integration ids written
    skipped: list[str] = field(default_factory=list)


# -- reading ----------------------------------------------------------------------------------

def _results(document: Any, where: str) -> tuple[list[dict], str | None]:
    """One page of OnCall's answer: (objects, next page URL)."""
    if isinstance(document, list):
        items, nxt = document, None
    elif isinstance(document, dict) and isinstance(document.get("results"), list):
        items, nxt = document["results"], document.get("next")
    else:
        raise ImportFailed(f"{where}: expected a page with 'results' or a list")
    if not all(isinstance(x, dict) for x in items):
        raise ImportFailed(f"{where}: every result must be an object")
    return items, nxt if isinstance(nxt, str) and nxt else None


def read_dir(directory: str | Path) -> Export:
    """Saved answers: <collection>.json, each one page object with `results` or a plain list."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ImportFailed(f"{directory}: not a directory")
    export = Export()
    for name in COLLECTIONS:
        path = directory / f"{name}.json"
        if not path.exists():
            if name == "integrations":
                raise ImportFailed(f"{path}: missing (integrations.json is required)")
            export.notes.append(f"{path.name} not found: no {name.replace('_', ' ')} imported")
            continue
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise ImportFailed(f"{path}: {exc}") from None
        items, _ = _results(document, str(path))
        setattr(export, name, items)
    return export


def api_base(url: str) -> str:
    """OnCall's address with `/api/v1/` appended unless it is given."""
    url = url.strip()
    if not re.match(r"^https?://[^/]+", url):
        raise ImportFailed(f"'{url}' is not an http:// or https:// address")
    if not re.search(r"/api/v1/?$", url):
        url = url.rstrip("/") + "/api/v1"
    return url.rstrip("/") + "/"


def fetch(url: str, token: str, *, timeout: float = 15.0,
          opener: Callable[..., Any] = urllib.request.urlopen) -> Export:
    """Every page of every collection from a running OnCall; only GET requests are made."""
    base = api_base(url)
    export = Export()
    for name in COLLECTIONS:
        page_url: str | None = urllib.parse.urljoin(base, f"{name}/")
        items: list[dict] = []
        for _ in range(MAX_PAGES):
            if page_url is None:
                break
            request = urllib.request.Request(page_url, headers={"Authorization": token, "Accept": "application/json"})
            try:
                with opener(request, timeout=timeout) as response:
                    body = response.read()
            except urllib.error.HTTPError as exc:
                if exc.code in (401, 403):
                    raise ImportFailed(f"OnCall refused the token (HTTP {exc.code} from {page_url})") from None
                if exc.code == 404 and name == "webhooks":
                    export.notes.append("this OnCall has no outgoing webhooks API (404): no webhooks imported")
                    break
                raise ImportFailed(f"OnCall answered HTTP {exc.code} for {page_url}") from None
            except (urllib.error.URLError, OSError, ValueError) as exc:
                reason = getattr(exc, "reason", exc)
                raise ImportFailed(f"cannot reach OnCall at {page_url}: {reason}") from None
            try:
                document = json.loads(body)
            except ValueError:
                raise ImportFailed(f"{page_url}: the answer is not JSON") from None
            page, page_url = _results(document, page_url)
            items.extend(page)
        else:
            raise ImportFailed(f"{name}: more than {MAX_PAGES} pages; stopping")
        setattr(export, name, items)
    return export


# -- planning ---------------------------------------------------------------------------------

def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-")[:48]


def _unique(base: str, taken: set[str]) -> str:
    name, n = base, 2
    while name in taken:
        name, n = f"{base}-{n}", n + 1
    taken.add(name)
    return name


def _value(value: Any) -> str:
    """A TOML literal for a string, number or boolean."""
    return tomlkit.item(value).as_string()


def _commented(text: str) -> str:
    return "".join(f"# {line}".rstrip() + "\n" for line in text.splitlines() or [""])


def _undeclared(source: str) -> set[str] | None:
    """The variables a template reads; None when Jinja cannot parse it."""
    try:
        return set(jinja2.meta.find_undeclared_variables(jinja2.Environment().parse(source)))
    except jinja2.TemplateSyntaxError:
        return None


def _token_of(integration: dict) -> tuple[str | None, str | None]:
    """(token, URL kind) from the integration's link, or its inbound email address."""
    link = integration.get("link")
    if isinstance(link, str) and (m := _LINK.search(urllib.parse.urlsplit(link).path.rstrip("/") + "/")):
        return m.group(2), m.group(1)
    email = integration.get("inbound_email")
    if isinstance(email, str) and "@" in email:
        return email.split("@", 1)[0], None
    return None, None


class _Planner:
    def __init__(self, export: Export, config, kinds, check_template: Callable[[str], str | None]):
        self.export = export
        self.kinds = kinds
        self.check_template = check_template
        self.plan = Plan(report=list(export.notes))
        self.tokens = {i.token: i.id for i in config.integrations}
        self.ids = {i.id for i in config.integrations}
        self.chain_names = {c.name for c in config.escalations}
        self.notifier_names = {n.name for n in config.notifiers}
        self.webhooks = {w.get("id"): w for w in export.webhooks}
        self.webhook_notifier: dict[str, str | None] = {}  # OnCall webhook id -> notifier name (None: not importable)
        self.chain_of: dict[str, str | None] = {}         # OnCall chain id -> tocsin chain name (None: nothing to run)
        self.out: list[str] = []

    def note(self, text: str) -> None:
        self.plan.report.append(text)

    # webhooks -> notifiers
    def notifier_for(self, webhook_id: str, where: str) -> str | None:
        if webhook_id in self.webhook_notifier:
            return self.webhook_notifier[webhook_id]
        hook = self.webhooks.get(webhook_id)
        name = None
        if hook is None:
            self.note(f"{where}: trigger_webhook names webhook {webhook_id}, which the export lacks: step left out")
        elif hook.get("is_webhook_enabled") is False:
            self.note(f"{where}: webhook '{hook.get('name')}' is disabled in OnCall: step left out")
        elif not isinstance(hook.get("url"), str) or not re.match(r"^https?://", hook["url"]):
            self.note(f"{where}: webhook '{hook.get('name')}' has no http(s) URL: step left out")
        else:
            name = self.write_notifier(hook)
        self.webhook_notifier[webhook_id] = name
        return name

    def write_notifier(self, hook: dict) -> str:
        label = f"webhook '{hook.get('name') or hook.get('id')}'"
        base = "oncall-" + (_slug(hook.get("name") or "") or _slug(hook.get("id") or "webhook"))
        if base in self.notifier_names:
            self.note(f"{label}: notifier '{base}' is already configured, kept as it is")
            return base
        name = _unique(base, self.notifier_names)
        lines = ["[[notifiers]]", f"name = {_value(name)}", 'kind = "webhook"', f"url = {_value(hook['url'])}"]
        method = str(hook.get("http_method") or "POST").upper()
        if method != "POST":
            lines.append(f"# oncall: http_method = {method}; tocsin webhooks always POST")
            self.note(f"{label}: sent with {method} in OnCall; tocsin webhooks always POST")
        headers = hook.get("headers")
        if headers:
            parsed = None
            try:
                parsed = json.loads(headers) if isinstance(headers, str) else headers
            except ValueError:
                pass
            if (isinstance(parsed, dict) and parsed and all(isinstance(v, str) and "{" not in v and not _MASK.match(v)
                                                            for v in parsed.values())):
                lines.append("headers = { " + ", ".join(f"{_value(str(k))} = {_value(v)}" for k, v in parsed.items()) + " }")
            else:
                lines.append("# oncall: headers (templated or masked; set them yourself):")
                lines.append(_commented(str(headers)).rstrip("\n"))
                self.note(f"{label}: headers not imported (templated with OnCall's variables or masked)")
        for secret in ("password", "authorization_header"):
            if hook.get(secret):
                lines.append(f"# oncall: {secret} was set (OnCall's API masks it): add it as a header yourself")
                self.note(f"{label}: {secret} is masked by OnCall's API: add it to the notifier's headers yourself")
        if hook.get("username"):
            lines.append(f"# oncall: basic auth user {hook['username']!r}: add an Authorization header yourself")
            self.note(f"{label}: basic auth not imported: add an Authorization header yourself")
        data = hook.get("data")
        if data and not hook.get("forward_all"):
            lines.append("# oncall: data template (uses OnCall's webhook variables; tocsin sends its own JSON body):")
            lines.append(_commented(str(data)).rstrip("\n"))
            self.note(f"{label}: data template not imported (OnCall's webhook variables differ); tocsin's JSON body is sent")
        trigger = hook.get("trigger_type")
        if trigger not in (None, "escalation", 0, "0"):
            self.note(f"{label}: trigger '{trigger}' has no tocsin equivalent; it is sent only from escalation steps")
        self.out.append("\n".join(lines) + "\n")
        return name

    # chains
    def chain(self, chain_id: str, where: str) -> str | None:
        if chain_id in self.chain_of:
            return self.chain_of[chain_id]
        chain = next((c for c in self.export.escalation_chains if c.get("id") == chain_id), None)
        if chain is None:
            self.note(f"{where}: escalation chain {chain_id} is not in the export: route left without escalation")
            self.chain_of[chain_id] = None
            return None
        label = f"escalation chain '{chain.get('name') or chain_id}'"
        base = str(chain.get("name") or chain_id)
        if base in self.chain_names:
            self.note(f"{label}: already configured, kept as it is")
            self.chain_of[chain_id] = base
            return base
        policies = sorted((p for p in self.export.escalation_policies if p.get("escalation_chain_id") == chain_id),
                          key=lambda p: (p.get("position") if isinstance(p.get("position"), int) else 0))
        steps: list[str] = []
        runnable = 0
        for n, policy in enumerate(policies, start=1):
            step, comment = self.step(policy, f"{label} step {n}")
            if step is not None:
                steps.append(f"  {step},")
                runnable += 1
            if comment is not None:
                steps.append(f"  # oncall: {comment}")
        if not runnable:
            self.note(f"{label}: no step has a tocsin equivalent; the chain is left as a comment")
            self.out.append(f"# oncall: {label} not imported: no step has a tocsin equivalent\n"
                            + "".join(line.strip() + "\n" for line in steps))
            self.chain_of[chain_id] = None
            return None
        name = _unique(base, self.chain_names)
        self.out.append("[[escalations]]\n" f"name = {_value(name)}\n" "steps = [\n" + "\n".join(steps) + "\n]\n")
        self.chain_of[chain_id] = name
        return name

    def step(self, policy: dict, where: str) -> tuple[str | None, str | None]:
        """(inline TOML step, comment) for one escalation policy."""
        kind = policy.get("type")
        if kind == "wait":
            seconds = policy.get("duration")
            if isinstance(seconds, (int, float)) and not isinstance(seconds, bool) and seconds > 0:
                return f"{{ wait = {_value(f'{int(seconds)}s')} }}", None
            self.note(f"{where}: wait without a duration: left out")
            return None, f"wait without a duration ({seconds!r})"
        if kind == "repeat_escalation":
            return "{ repeat = 5 }", None  # OnCall repeats a chain at most 5 times
        if kind == "resolve":
            return "{ resolve = true }", None
        if kind == "notify_if_time_from_to":
            start, end = policy.get("notify_if_time_from"), policy.get("notify_if_time_to")
            if isinstance(start, str) and isinstance(end, str) and re.match(r"^\d\d:\d\d", start) and re.match(r"^\d\d:\d\d", end):
                return f'{{ if_time = "{start[:5]}-{end[:5]}", timezone = "UTC" }}', None
            self.note(f"{where}: time window without times: left out")
            return None, f"notify_if_time_from_to without times ({start!r}, {end!r})"
        if kind == "notify_if_num_alerts_in_window":
            count, minutes = policy.get("num_alerts_in_window"), policy.get("num_minutes_in_window")
            if isinstance(count, int) and isinstance(minutes, (int, float)) and minutes > 0:
                return f"{{ if_alerts_in_window = {count}, minutes = {_value(minutes)} }}", None
            self.note(f"{where}: alerts-in-window without its numbers: left out")
            return None, "notify_if_num_alerts_in_window without its numbers"
        if kind in ("trigger_webhook", "trigger_action"):
            hook_id = policy.get("action_to_trigger")
            name = self.notifier_for(hook_id, where) if hook_id else None
            if name is None:
                return None, f"trigger_webhook {hook_id!r} not imported (see the report)"
            return f"{{ notify = [{_value(name)}] }}", None
        what = _PERSON_STEPS.get(kind)
        if what is not None:
            targets = [str(x) for key in ("persons_to_notify", "persons_to_notify_next_each_time",
                                          "notify_on_call_from_schedule", "group_to_notify", "team_to_notify")
                       for x in (policy.get(key) if isinstance(policy.get(key), list) else [policy.get(key)])
                       if x]
            detail = f" ({', '.join(targets)})" if targets else ""
            self.note(f"{where}: {kind}{detail}: tocsin has no users or schedules; add a notifier step for it")
            return None, f"{kind}{detail}: no tocsin equivalent ({what})"
        self.note(f"{where}: step type {kind!r} has no tocsin equivalent: left out")
        return None, f"step type {kind!r} has no tocsin equivalent"

    # templates
    def templates(self, integration: dict, label: str) -> tuple[list[str], list[str]]:
        """(TOML lines for [integrations.templates], comment lines)."""
        raw = integration.get("templates") if isinstance(integration.get("templates"), dict) else {}
        wanted: list[tuple[str, str, str, frozenset[str]]] = []
        for theirs, ours in _BEHAVIOUR.items():
            if isinstance(raw.get(theirs), str) and raw[theirs].strip():
                allowed = _APPEARANCE_VARIABLES if ours == "source_link" else _BEHAVIOUR_VARIABLES
                wanted.append((theirs, ours, raw[theirs], allowed))
        web = raw.get("web") if isinstance(raw.get("web"), dict) else {}
        for theirs, ours in _WEB.items():
            if isinstance(web.get(theirs), str) and web[theirs].strip():
                wanted.append((f"web.{theirs}", ours, web[theirs], _APPEARANCE_VARIABLES))
        lines, comments = [], []
        for theirs, ours, source, allowed in wanted:
            variables = _undeclared(source)
            problem = None
            if variables is None or (problem := self.check_template(source)):
                problem = f"does not compile here: {problem or 'syntax error'}"
            elif missing := sorted(variables - allowed - _JINJA_GLOBALS):
                problem = f"uses variables tocsin lacks: {', '.join(missing)}"
            if problem:
                self.note(f"{label}: template {theirs} not imported: {problem}")
                comments.append(f"# oncall: template {theirs} not imported ({problem}):")
                comments.append(_commented(f"{ours} = {_value(source)}").rstrip("\n"))
            else:
                lines.append(f"{ours} = {_value(source)}")
        for channel, value in raw.items():
            if channel in _BEHAVIOUR or channel == "web" or not isinstance(value, dict):
                continue
            custom = {k: v for k, v in value.items() if isinstance(v, str) and v.strip()}
            if custom:
                self.note(f"{label}: {channel} templates ({', '.join(sorted(custom))}) not imported:"
                          " tocsin renders the web templates only")
                comments.append(f"# oncall: {channel} templates not imported (tocsin renders the web templates only):")
                for k, v in custom.items():
                    comments.append(_commented(f"{channel}.{k} = {_value(v)}").rstrip("\n"))
        return lines, comments

    # integrations
    def integration(self, integration: dict) -> None:
        name = str(integration.get("name") or integration.get("id") or "integration")
        label = f"integration '{name}'"
        their_type = str(integration.get("type") or "")
        token, url_kind = _token_of(integration)
        if token is not None and token in self.tokens:
            self.plan.skipped.append(name)
            self.note(f"{label}: skipped, its token is already configured (integration '{self.tokens[token]}')")
            return
        kind, difference = (their_type, None) if their_type in self.kinds else _LEGACY.get(their_type, (None, None))
        if kind is None or token is None or not _TOKEN.fullmatch(token):
            why = (f"type '{their_type}' has no tocsin kind" if kind is None
                   else "no token in its link or inbound email address" if token is None
                   else "its token is not 8-128 URL-safe characters")
            self.note(f"{label}: not imported: {why}")
            self.out.append(f"# oncall: {label} ({their_type}) not imported: {why}\n")
            return
        iid = _unique(_slug(name) or _slug(str(integration.get("id"))) or "oncall", self.ids)
        self.tokens[token] = iid
        lines = ["[[integrations]]", f"id = {_value(iid)}", f"name = {_value(name)}", f"kind = {_value(kind)}",
                 f"token = {_value(token)}"]
        if difference:
            lines.append(f"# oncall: type {their_type}: {difference}")
            self.note(f"{label}: imported as kind '{kind}': {difference}")
        if url_kind and url_kind != kind:
            lines.append(f"# oncall: senders posted to /integrations/v1/{url_kind}/…; here the URL is"
                         f" /integrations/v1/{kind}/<same token>/")
            self.note(f"{label}: its URL changes from /integrations/v1/{url_kind}/ to /integrations/v1/{kind}/"
                      " (same token)")
        email = integration.get("inbound_email")
        if kind == "inbound_email" and isinstance(email, str) and "@" in email:
            domain = email.split("@", 1)[1].lower()
            self.note(f"{label}: mail came to {email}; add '{domain}' to [smtp] extra_domains (or make it the"
                      " domain) and point its MX at tocsin, so senders keep the address")
        routes = self.routes(integration, label)
        template_lines, comments = self.templates(integration, label)
        lines.extend(comments)
        if template_lines:
            lines.append("[integrations.templates]")
            lines.extend(template_lines)
        lines.extend(routes)
        self.out.append("\n".join(lines) + "\n")
        self.plan.imported.append(iid)

    def routes(self, integration: dict, label: str) -> list[str]:
        mine = [r for r in self.export.routes if r.get("integration_id") == integration.get("id")]
        default = next((r for r in mine if r.get("is_the_last_route")), None)
        if default is None and isinstance(integration.get("default_route"), dict):
            default = {**integration["default_route"], "is_the_last_route": True}
        ordered = sorted((r for r in mine if not r.get("is_the_last_route")),
                         key=lambda r: (r.get("position") if isinstance(r.get("position"), int) else 0))
        lines: list[str] = []
        for route in ordered + ([default] if default is not None else []):
            where = f"{label} route {route.get('id') or len(lines)}"
            body = ["[[integrations.routes]]"]
            if not route.get("is_the_last_route"):
                text = route.get("routing_regex")
                if not isinstance(text, str) or not text:
                    self.note(f"{where}: no routing expression: left out")
                    lines.append(f"# oncall: {where} not imported: no routing expression")
                    continue
                if route.get("routing_type") == "jinja2":
                    problem = self.check_template(text)
                    if problem:
                        self.note(f"{where}: jinja2 condition not imported: {problem}")
                        lines.append(_commented(f"oncall: route condition not imported ({problem}): {text}").rstrip("\n"))
                        continue
                    body.append(f"condition = {_value(text)}")
                else:
                    body.append(f"regex = {_value(text)}")
            chain_id = route.get("escalation_chain_id")
            if chain_id:
                chain = self.chain(chain_id, where)
                if chain is not None:
                    body.append(f"escalation = {_value(chain)}")
                else:
                    body.append(f"# oncall: escalation chain {chain_id} not imported (see the report)")
            for channel in ("slack", "telegram", "msteams"):
                target = route.get(channel)
                if isinstance(target, dict) and any(v for k, v in target.items() if k != "enabled"):
                    body.append(f"# oncall: {channel} channel {json.dumps(target)} has no tocsin equivalent")
                    self.note(f"{where}: {channel} channel not imported (add a notifier for it)")
            lines.extend(body)
        return lines


def plan_import(export: Export, config, kinds, check_template: Callable[[str], str | None]) -> Plan:
    """The blocks to append for `export` to a config (`cfg.Config`), and the report."""
    planner = _Planner(export, config, kinds, check_template)
    for integration in export.integrations:
        planner.integration(integration)
    planner.plan.blocks = "\n".join(planner.out)
    return planner.plan
