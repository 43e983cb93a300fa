"""The UI's request handlers: server-rendered pages, a few JSON endpoints for the page
scripts, and the guard (session, CSRF, security headers) in front of all of them."""
from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import jinja2
from aiohttp import web

from grouping import lifecycle
from grouping.labels import parse_label
from grouping.pipeline import (TEMPLATE_NAMES, Integration, IntegrationError, RateLimited, Unavailable, preview_json,
                               render_output, with_templates)
from grouping.views import (
    MAX_PAGE,
    STATES,
    alert_json,
    group_story,
    groups_json,
    integration_json,
    maintenance_of,
    parse_time,
    routes_view,
)
from handlers.http import read_form
from grouping.rules import ALLOWED_FROM
from store import InvalidTransition, NotFound, StoreUnavailable

from . import editor
from .auth import (
    CSRF_FIELD,
    CSRF_HEADER,
    LOGIN_COOKIE,
    SESSION_COOKIE,
    LoginThrottle,
    Sessions,
    same,
    source_address,
    token_matches,
)
from .filters import filters, when
from .markdown import render_markdown
from .timeline import chain_view, describe, escalation_view

HERE = Path(__file__).resolve().parent
PAGE_SIZE = 50
MAX_PAGE_SIZE = 200
GROUP_ALERTS_PAGE = 20
RECENT_PAYLOADS = 20
GROUPING_SAMPLE = 100
GROUPING_SECONDS = 2.0  # all the renders of one grouping comparison, together
FLASH_COOKIE = "tocsin_flash"
# Per-request storage keys (web.RequestKey where aiohttp has it, plain strings before).
_key = getattr(web, "RequestKey", None)
SESSION = _key("session", object) if _key else "session"
FLASH = _key("flash", object) if _key else "flash"
# Grafana OnCall's silence choices.
SILENCE_CHOICES = ((1800, "30 minutes"), (3600, "1 hour"), (7200, "2 hours"), (21600, "6 hours"),
                   (43200, "12 hours"), (57600, "16 hours"), (86400, "24 hours"), (-1, "forever"))
# Grafana OnCall's maintenance modes and durations.
MAINTENANCE_MODES = (("debug", "Debug (groups form, nothing escalates)"),
                     ("maintenance", "Maintenance (one group collects everything)"))
MAINTENANCE_CHOICES = ((3600, "1 hour"), (10800, "3 hours"), (21600, "6 hours"), (43200, "12 hours"),
                       (86400, "24 hours"))
MAX_LABEL_FILTERS = 10
MIN_SEARCH = 3  # shorter text matches nearly every title: a scan for nothing
MAX_BULK = MAX_PAGE_SIZE
LABELS_PER_GROUP = 8  # chips on a card; the group page shows them all
BULK_ACTIONS = ("acknowledge", "resolve", "silence")
ACTION_LABELS = {"acknowledge": "Acknowledge", "unacknowledge": "Unacknowledge", "resolve": "Resolve",
                 "unresolve": "Unresolve", "silence": "Silence", "unsilence": "Unsilence"}

SECURITY_HEADERS = {
    # Scripts and styles only from /ui/static.
    # Images from anywhere, but only on a click (alerts' image_url, Markdown images: see ui/markdown.py).
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: https: http:;"
                               " connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def see_other(to: str, status: int = 303) -> web.Response:
    return web.Response(status=status, headers={"Location": to})


def _local(next_: str | None, default: str = "/ui/groups") -> str:
    """Only our own pages are redirect targets: a path under /ui/ of printable ASCII
    without spaces or backslashes. Anything else (another site, a scheme, a CR/LF that
    would split the Location header) gives `default`. Kept without the path prefix (see
    Views.prefix), which the redirect adds."""
    if (next_ and next_.startswith("/ui/") and next_.isascii() and next_.isprintable()
            and not any(c in next_ for c in " \\")):
        return next_
    return default


class Views:
    """Every /ui/ handler, over a daemon duck-typed as in setup_ui()."""

    def __init__(self, daemon, *, sessions: Sessions | None = None):
        self.daemon = daemon
        self.sessions = sessions or Sessions()
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(HERE / "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.filters.update(filters())
        self.static_version = _static_version(HERE / "static")
        self.throttle = LoginThrottle()
        self._write_lock = asyncio.Lock()

    # -- plumbing --------------------------------------------------------------------

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("", self.home), web.get("/", self.home),
            web.get("/login", self.login_form), web.post("/login", self.login),
            web.post("/logout", self.logout),
            web.get("/integrations", self.integrations),
            web.get("/integrations/{id}", self.integration_page),
            web.post("/integrations/{id}/demo", self.demo),
            web.post("/integrations/{id}/maintenance/start", self.maintenance_start),
            web.post("/integrations/{id}/maintenance/stop", self.maintenance_stop),
            web.get("/integrations/{id}/templates", self.templates_page),
            web.post("/integrations/{id}/templates", self.templates_save),
            web.post("/api/integrations/{id}/preview", self.preview),
            web.get("/api/integrations/{id}/payload", self.sample_payload),
            web.get("/groups", self.groups),
            web.get("/api/groups", self.groups_json),
            web.post("/groups/bulk", self.groups_bulk),
            web.get("/groups/{id}", self.group),
            web.post("/groups/{id}/{action}", self.group_action),
            web.static("/static", HERE / "static"),
        ]

    @property
    def public_url(self) -> str:
        return self.daemon.config.daemon.public_url

    @property
    def prefix(self) -> str:
        """The path tocsin is served under behind a reverse proxy: public_url's path
        ("https://example.com/tocsin" -> "/tocsin"; "" at the root). The proxy strips it
        before passing requests on; every link, form and cookie the UI writes carries it."""
        return urlsplit(self.public_url).path.rstrip("/")

    def url(self, path: str) -> str:
        """A link to one of our paths ("/ui/…"), as the browser must ask for it."""
        return self.prefix + path

    def tokens(self) -> tuple[str, ...]:
        return self.daemon.config.api_tokens

    def integration_json(self, i: Integration, maintenance: dict | None) -> dict:
        config = self.daemon.config
        return integration_json(i, public_url=self.public_url,
                                email_domain=config.smtp.domain if config.smtp else None, maintenance=maintenance)

    @web.middleware
    async def guard(self, request: web.Request, handler):
        """Session on every page but login and static files; CSRF on every POST."""
        path = request.path
        if not (path.startswith("/ui/static/") or path == "/ui/login"):
            session = self.sessions.check(request.cookies.get(SESSION_COOKIE), self.tokens())
            if session is None:
                if path.startswith("/ui/api/"):
                    return self._headers(web.json_response({"error": "log in first"}, status=401))
                target = request.path_qs if request.method == "GET" else "/ui/groups"
                return self._headers(see_other(self.url("/ui/login?" + urlencode({"next": _local(target)}))))
            request[SESSION] = session
            if request.method not in ("GET", "HEAD", "OPTIONS"):
                given = request.headers.get(CSRF_HEADER)
                if given is None and request.content_type in ("application/x-www-form-urlencoded",
                                                              "multipart/form-data"):
                    given = (await read_form(request)).get(CSRF_FIELD)
                if not self.sessions.csrf_ok(session, given if isinstance(given, str) else None):
                    return self._headers(self.page(request, "error.html", status=403, title="Forbidden",
                                                   message="This form has expired or did not come from tocsin"
                                                           " (missing or wrong CSRF token). Go back, reload the"
                                                           " page and try again."))
        try:
            response = await handler(request)
        except StoreUnavailable as exc:
            response = self.page(request, "error.html", status=503, title="Database unavailable",
                                 message=f"The database cannot answer now ({exc}); try again in a moment.")
            response.headers["Retry-After"] = "5"
        except web.HTTPException as exc:
            if exc.status >= 400 and not path.startswith("/ui/api/") and not path.startswith("/ui/static/"):
                response = self.page(request, "error.html", status=exc.status, title=exc.reason,
                                     message=exc.text if exc.text and not exc.text.startswith(str(exc.status))
                                     else exc.reason)
            else:
                raise self._headers(exc)
        if path.startswith("/ui/static/") and request.query.get("v") == self.static_version:
            response.headers["Cache-Control"] = "public, max-age=86400"  # the URL changes with the file
        return self._headers(response)

    def _headers(self, response):
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    def page(self, request: web.Request, template: str, *, status: int = 200, **context) -> web.Response:
        session = request.get(SESSION)
        flash = request.get(FLASH)
        text = self.env.get_template(template).render(
            logged_in=session is not None,
            section=context.pop("section", ""),
            flash=flash,
            **self._base_context(session),
            **context,
        )
        response = web.Response(text=text, content_type="text/html", status=status)
        if flash is not None:
            response.del_cookie(FLASH_COOKIE, path=self.url("/ui"))
        return response

    def _base_context(self, session) -> dict:
        """What every template (pages and fragments) may use: the CSRF token and our URLs."""
        return {"csrf": session.csrf if session else "", "root": self.url("/ui"), "url": self.url,
                "static": lambda name: self.url(f"/ui/static/{name}?v={self.static_version}")}

    def _cookie(self, response: web.StreamResponse, name: str, value: str, max_age: int | None) -> None:
        response.set_cookie(name, value, max_age=max_age, path=self.url("/ui"), httponly=True, samesite="Strict",
                            secure=self.public_url.lower().startswith("https://"))

    def _redirect(self, to: str, notice: str | None = None, error: bool = False) -> web.Response:
        """303 to one of our paths ("/ui/…", no prefix), with an optional one-shot notice."""
        response = see_other(self.url(to))
        if notice:
            # A one-shot message for the next page: a cookie, so no URL can inject one.
            self._cookie(response, FLASH_COOKIE, json.dumps({"text": notice, "error": error}), 60)
        return response

    def _take_flash(self, request: web.Request) -> None:
        raw = request.cookies.get(FLASH_COOKIE)
        if raw:
            try:
                value = json.loads(raw)
                request[FLASH] = {"text": str(value["text"])[:500], "error": bool(value.get("error"))}
            except (ValueError, KeyError, TypeError):
                pass

    def _integration(self, request: web.Request) -> Integration:
        i = self.daemon.current().by_id(request.match_info["id"])
        if i is None:
            raise web.HTTPNotFound(text="No such integration in the running config")
        return i

    # -- login -----------------------------------------------------------------------

    async def home(self, request: web.Request) -> web.Response:
        return see_other(self.url("/ui/groups"), 302)

    async def login_form(self, request: web.Request, *, error: str | None = None, status: int = 200) -> web.Response:
        nonce = request.cookies.get(LOGIN_COOKIE) or secrets.token_urlsafe(18)
        response = self.page(request, "login.html", status=status, title="Log in", error=error, nonce=nonce,
                             next=_local(request.query.get("next")))
        self._cookie(response, LOGIN_COOKIE, nonce, 3600)
        return response

    async def login(self, request: web.Request) -> web.Response:
        form = await read_form(request)
        nonce = request.cookies.get(LOGIN_COOKIE)
        given = form.get("_login")
        if not nonce or not isinstance(given, str) or not same(nonce, given):
            return await self.login_form(request, error="The login form expired; try again.", status=403)
        token = token_matches(str(form.get("token", "")), self.tokens())
        if token is None:
            hooks = getattr(self.daemon, "metrics", None)  # optional: the daemon's metrics
            if hooks is not None:
                hooks.auth_failure("ui")
            # Each wrong token slows the next from the same address (guessing is hopeless);
            # other addresses do not wait behind it.
            source = source_address(request.remote, request.headers.get("X-Forwarded-For"))
            wait = self.throttle.failed(source)
            if wait is None:
                return self._headers(web.Response(status=429, text="Too many wrong logins; wait a little.",
                                                  headers={"Retry-After": str(int(self.throttle.max_wait))}))
            await asyncio.sleep(wait)
            return await self.login_form(request, error="Wrong token.", status=401)
        response = see_other(self.url(_local(str(form.get("next", "")))))
        self._cookie(response, SESSION_COOKIE, self.sessions.issue(token), int(self.sessions.lifetime))
        response.del_cookie(LOGIN_COOKIE, path=self.url("/ui"))
        return response

    async def logout(self, request: web.Request) -> web.Response:
        self.sessions.end(request[SESSION])
        response = see_other(self.url("/ui/login"))
        response.del_cookie(SESSION_COOKIE, path=self.url("/ui"))
        return response

    # -- integrations ----------------------------------------------------------------

    async def integrations(self, request: web.Request) -> web.Response:
        self._take_flash(request)
        pipeline = self.daemon.current()
        store = pipeline.store
        open_counts: dict[str, dict[str, int]] = {}
        for iid, state, n in await store.count_open_groups():
            open_counts.setdefault(iid, {})[state] = n
        beats = await store.heartbeats()
        timeouts = {c.id: c.heartbeat_timeout for c in getattr(self.daemon.config, "integrations", ())}
        maintenance = await store.maintenance()
        rows = []
        for i in pipeline.integrations.values():
            counts = open_counts.get(i.id, {})
            rows.append({
                "integration": i,
                "json": self.integration_json(i, maintenance.get(i.id)),
                "open": sum(counts.values()),
                "open_by_state": counts,
                "heartbeat": _heartbeat(beats.get(i.id), timeouts.get(i.id)),
                "maintenance": maintenance.get(i.id),
            })
        return self.page(request, "integrations.html", title="Integrations", section="integrations", rows=rows,
                         modes=MAINTENANCE_MODES, durations=MAINTENANCE_CHOICES)

    async def maintenance_start(self, request: web.Request) -> web.Response:
        """Start maintenance through the same function as the API (same checks, title, refusals)."""
        i = self._integration(request)
        form = await read_form(request)
        mode, duration = form.get("mode"), str(form.get("duration", ""))
        # The form offers OnCall's choices only; the range itself is lifecycle's to say.
        if mode not in dict(MAINTENANCE_MODES):
            return self._redirect("/ui/integrations", "Choose debug or maintenance mode.", error=True)
        if duration not in {str(n) for n, _ in MAINTENANCE_CHOICES}:
            return self._redirect("/ui/integrations", "Choose how long the maintenance lasts.", error=True)
        try:
            info = await lifecycle.maintenance_start(self.daemon.current().store, i.id, i.name, mode, duration)
        except (lifecycle.ActionError, InvalidTransition) as exc:
            return self._redirect("/ui/integrations", f"{i.name}: {exc}", error=True)
        return self._redirect("/ui/integrations",
                              f"{i.name}: {mode} mode until {when(info['ends_at'])}.")

    async def maintenance_stop(self, request: web.Request) -> web.Response:
        i = self._integration(request)
        try:
            resolved = await lifecycle.maintenance_stop(self.daemon.current().store, i.id)
        except InvalidTransition as exc:
            return self._redirect("/ui/integrations", f"{i.name}: {exc}", error=True)
        more = f" {resolved} alert group{'' if resolved == 1 else 's'} resolved." if resolved else ""
        return self._redirect("/ui/integrations", f"{i.name}: maintenance stopped.{more}")

    # -- template editor -------------------------------------------------------------

    async def templates_page(self, request: web.Request) -> web.Response:
        self._take_flash(request)
        return await self._editor(request, self._integration(request))

    async def _editor(self, request, i: Integration, *, edited: dict[str, str] | None = None,
                      errors: dict[str, str] | None = None, block: str | None = None,
                      result: dict | None = None, config_digest: str | None = None, status: int = 200):
        store = self.daemon.current().store
        _, recent = await store.list_alerts(integration_id=i.id, newest_first=True, limit=RECENT_PAYLOADS)
        first = alert_json(recent[0])["payload"] if recent else i.kind.example_payload_copy()
        path = Path(self.daemon.config.path)
        rows = []
        for name in TEMPLATE_NAMES:
            default = i.kind.templates.get(name) or ""
            text = edited[name] if edited is not None else (i.sources.get(name) or "")
            rows.append({"name": name, "text": text, "default": default,
                         "overridden": name in i.overrides, "error": (errors or {}).get(name)})
        return self.page(
            request, "editor.html", status=status, title=f"Templates · {i.name}", section="integrations",
            integration=i, rows=rows, recent=recent, payload=json.dumps(first, indent=2, ensure_ascii=False),
            config_path=str(path), writable=editor.writable(path),
            config_digest=config_digest or editor.file_digest(path) or "",
            block=block, result=result,
        )

    def _edited(self, i: Integration, source: dict) -> dict[str, str]:
        """Every template's text: as edited, or as it runs now when the request leaves it out."""
        return {n: editor.normalize(v) if isinstance(v := source.get(n), str) else (i.sources.get(n) or "")
                for n in TEMPLATE_NAMES}

    async def templates_save(self, request: web.Request) -> web.Response:
        i = self._integration(request)
        form = await read_form(request)
        edited = self._edited(i, {n: form.get(f"tpl_{n}") for n in TEMPLATE_NAMES})
        errors = editor.compile_errors(edited)
        if errors:
            return await self._editor(request, i, edited=edited, errors=errors, status=400,
                                      config_digest=str(form.get("config_digest", "")))
        overrides = editor.overrides_from(i.kind, edited)
        block = editor.toml_block(i.id, overrides)
        if form.get("action") != "write":
            return await self._editor(request, i, edited=edited, block=block,
                                      config_digest=str(form.get("config_digest", "")))
        path = Path(self.daemon.config.path)
        async with self._write_lock:
            try:
                new_digest = editor.write_templates(path, i.id, overrides, str(form.get("config_digest", "")) or None)
            except editor.EditError as exc:
                return await self._editor(request, i, edited=edited, block=block, status=409,
                                          result={"ok": False, "text": str(exc)},
                                          config_digest=str(form.get("config_digest", "")))
            reloaded = self.daemon.reload(path)
        if reloaded:
            fresh = self.daemon.current().by_id(i.id) or i
            return await self._editor(request, fresh, result={
                "ok": True, "text": f"Written to {path} and reloaded: the new templates apply to the next alert."},
                config_digest=new_digest)
        return await self._editor(request, i, edited=edited, block=block, config_digest=new_digest, result={
            "ok": False, "text": f"Written to {path}, but the reload was refused (see the daemon's log);"
                                 " the previous config keeps running."})

    async def sample_payload(self, request: web.Request) -> web.Response:
        i = self._integration(request)
        alert_id = request.query.get("alert_id")
        if not alert_id:
            return web.json_response({"payload": i.kind.example_payload_copy()})
        found = (await self.daemon.current().store.alerts_by_id([alert_id])).get(alert_id)
        if found is None:
            return web.json_response({"error": "no such alert"}, status=404)
        return web.json_response({"payload": alert_json(found)["payload"]})

    async def preview(self, request: web.Request) -> web.Response:
        """What the edited templates decide for a payload (pipeline.preview, as `tocsin
        render` and the preview API), and how they would group recent alerts.

        `rendered` is exactly what those two print; the first alert's fields are also at
        the top level for the page script."""
        i = self._integration(request)
        try:
            body = await request.json()
        except ValueError:
            return web.json_response({"error": "send a JSON object"}, status=400)
        if not isinstance(body, dict) or not isinstance(body.get("templates", {}), dict):
            return web.json_response({"error": "send {\"templates\": {…}, \"payload\": \"…\"}"}, status=400)
        edited = self._edited(i, body.get("templates", {}))
        running = {n: i.sources.get(n) or "" for n in TEMPLATE_NAMES}
        # Only edits can fail to compile (compiling is the slow part: 20 ms for a big message template).
        errors = editor.compile_errors({n: v for n, v in edited.items() if v != running[n]})
        # A template that does not compile is shown as such, and the running one stands in for it.
        usable = {n: running[n] if n in errors else v for n, v in edited.items()}
        candidate = i
        if usable != running:
            try:
                candidate = with_templates(i, editor.overrides_from(i.kind, usable))
            except IntegrationError as exc:  # not expected: each edit compiled above
                return web.json_response({"error": str(exc)}, status=400)
        out: dict[str, Any] = {"compile_errors": errors}
        pipeline = self.daemon.current()
        text = body.get("payload", "")
        try:
            payload = json.loads(text) if isinstance(text, str) else text
        except ValueError as exc:
            out["payload_error"] = f"the payload is not JSON: {exc}"
        else:
            results = await pipeline.preview(candidate, payload)
            out["rendered"] = preview_json(results)
            if results:
                out.update(results[0])
            if len(results) != 1:
                out["alerts"] = len(results)
        out["groups"] = await self._compare_grouping(i, candidate)
        return web.json_response(out)

    async def _compare_grouping(self, current: Integration, candidate: Integration) -> dict:
        _, alerts = await self.daemon.current().store.list_alerts(integration_id=current.id, newest_first=True,
                                                                   limit=GROUPING_SAMPLE)
        payloads = [alert_json(a)["payload"] for a in alerts]
        (now_n, edited_n), evaluated = await asyncio.get_running_loop().run_in_executor(
            None, editor.count_groups,
            (current.templates.get("grouping_id"), candidate.templates.get("grouping_id")),
            payloads, GROUPING_SECONDS,
        )
        return {"alerts": len(payloads), "evaluated": evaluated, "current": now_n, "edited": edited_n}

    # -- alert groups ----------------------------------------------------------------

    def _group_filters(self, request: web.Request) -> tuple[dict, dict, list[str]]:
        """(store query, the filters as the form shows them, problems) from the query string."""
        q = request.query
        shown: dict[str, Any] = {k: q.get(k, "") for k in ("state", "integration", "since", "until", "q")}
        query: dict[str, Any] = {}
        problems = []
        if shown["state"]:
            if shown["state"] in STATES:
                query["state"] = shown["state"]
            else:
                problems.append(f"unknown state '{shown['state']}'")
        if shown["integration"]:
            query["integration_id"] = shown["integration"]
        for key, arg in (("since", "since"), ("until", "until")):
            if shown[key]:
                try:
                    query[arg] = parse_time(shown[key])
                except ValueError:
                    problems.append(f"'{shown[key]}' is not a date and time")
        text = shown["q"].strip()
        if text:
            if len(text) >= MIN_SEARCH:
                query["text"] = text[:200]
            else:
                problems.append(f"search for {MIN_SEARCH} characters or more")
        labels: list[tuple[str, str]] = []
        for raw in [v for v in q.getall("label", []) if v.strip()][:MAX_LABEL_FILTERS]:
            pair = parse_label(raw)
            if pair is None:
                problems.append(f"'{raw}' is not a label filter: write key=value")
            elif pair not in labels:
                labels.append(pair)
        if labels:
            query["labels"] = tuple(labels)
        shown["labels"] = labels
        try:
            page = max(1, int(q.get("page", "1")))
            size = min(MAX_PAGE_SIZE, max(1, int(q.get("perpage", str(PAGE_SIZE)))))
        except ValueError:
            page, size = 1, PAGE_SIZE
            problems.append("page and perpage must be numbers")
        if page > MAX_PAGE:  # past it the offset overflows SQLite's integers
            page = 1
            problems.append(f"page must be from 1 to {MAX_PAGE}")
        query.update(limit=size, offset=(page - 1) * size)
        shown.update(page=page, perpage=size)
        return query, shown, problems

    async def _groups_context(self, request: web.Request) -> dict:
        query, shown, problems = self._group_filters(request)
        pipeline = self.daemon.current()
        count, groups = await pipeline.store.list_groups(**query)
        labels = await pipeline.store.labels_of([g.seq for g in groups])
        size, page = shown["perpage"], shown["page"]
        pages = max(1, -(-count // size))
        # The filters as query parameters, in a stable order: every filtered view is a link.
        keep = [(k, shown[k]) for k in ("state", "integration", "since", "until", "q") if shown[k]]
        keep += [("label", f"{k}={v}") for k, v in shown["labels"]]
        if size != PAGE_SIZE:
            keep.append(("perpage", size))

        def link(n: int) -> str | None:
            return self.url("/ui/groups?" + urlencode([*keep, ("page", n)])) if 1 <= n <= pages and n != page else None

        def with_label(key: str, value: str) -> str:
            pair = ("label", f"{key}={value}")
            return self.url("/ui/groups?" + urlencode(keep if pair in keep else [*keep, pair]))

        def without(name: str, value: Any = None) -> str:
            rest = [(k, v) for k, v in keep if k != name or (value is not None and v != value)]
            return self.url("/ui/groups" + ("?" + urlencode(rest) if rest else ""))

        names = {iid: i.name for iid, i in pipeline.integrations.items()}
        here = "/ui/groups?" + urlencode([*keep, ("page", page)])
        return {
            "groups": groups, "count": count, "page": page, "pages": pages, "filters": shown,
            "problems": problems, "names": names, "states": STATES, "here": here,
            "group_labels": {seq: pairs[:LABELS_PER_GROUP] for seq, pairs in labels.items()},
            "more_labels": {seq: len(pairs) - LABELS_PER_GROUP for seq, pairs in labels.items()
                            if len(pairs) > LABELS_PER_GROUP},
            "with_label": with_label, "without": without,
            "links": {"first": link(1), "previous": link(page - 1), "next": link(page + 1), "last": link(pages)},
            "refresh": self.url("/ui/api/groups?" + urlencode([*keep, ("page", page)])),
            "allowed": ALLOWED_FROM, "silence_choices": SILENCE_CHOICES, "labels": ACTION_LABELS,
            "bulk_actions": BULK_ACTIONS,
        }

    async def groups(self, request: web.Request) -> web.Response:
        self._take_flash(request)
        context = await self._groups_context(request)
        return self.page(request, "groups.html", title="Alert groups", section="groups",
                         integrations=self.daemon.current().integrations, **context)

    async def groups_json(self, request: web.Request) -> web.Response:
        """The groups list for the page's auto-refresh: the rendered rows and the API's JSON."""
        context = await self._groups_context(request)
        html = self.env.get_template("_groups_table.html").render(**self._base_context(request[SESSION]), **context)
        results = await groups_json(self.daemon.current().store, context["groups"], public_url=self.public_url)
        return web.json_response({"count": context["count"], "page": context["page"], "pages": context["pages"],
                                  "results": results, "html": html})

    async def group(self, request: web.Request) -> web.Response:
        self._take_flash(request)
        pipeline = self.daemon.current()
        g = await pipeline.store.get_group(request.match_info["id"])
        if g is None:
            raise web.HTTPNotFound(text="No such alert group")
        try:
            page = min(MAX_PAGE, max(1, int(request.query.get("page", "1"))))
        except ValueError:
            page = 1
        count, alerts = await pipeline.store.list_alerts(alert_group_id=g.id, newest_first=True,
                                                         limit=GROUP_ALERTS_PAGE,
                                                         offset=(page - 1) * GROUP_ALERTS_PAGE)
        integration = pipeline.by_id(g.integration_id)
        shown = []
        for a in alerts:
            payload = alert_json(a)["payload"]
            decision = None
            if integration is not None:
                decision = render_output(await pipeline.decide(integration, payload, full=True,
                                                               alert_group_id=g.id))
                decision["message_html"] = render_markdown(decision["message"])
            shown.append({"alert": a, "payload": payload, "decision": decision})
        story = await group_story(pipeline.store, g)
        names = {iid: i.name for iid, i in pipeline.integrations.items()}
        timeline = [describe(e, names) for e in story["entries"]]
        if len(timeline) == 1:
            # A group from before the timeline was recorded (schema 1): what its own fields tell.
            for at, event, by in ((g.acknowledged_at, "acknowledged", g.acknowledged_by),
                                  (g.silenced_at, "silenced", None), (g.resolved_at, "resolved", g.resolved_by)):
                if at:
                    timeline.append(describe({"at": at, "event": event, "detail": {"by": by} if by else {}}))
        for entry in timeline:
            if entry["event"] == "silenced" and g.state == "silenced" and entry["at"] == g.silenced_at:
                until = f"until {when(g.silenced_until)}" if g.silenced_until else "forever"
                entry["text"] = f"{entry['text']}, {until}" if entry["text"] else until
        if g.last_alert_at and g.alerts_count > 1:
            timeline.append({**describe({"at": g.last_alert_at, "event": "last_alert"}),
                             "text": f"{g.alerts_count} alerts in all"})
        timeline.sort(key=lambda e: e["at"] or 0)
        pages = max(1, -(-count // GROUP_ALERTS_PAGE))
        source_link = next((s["decision"]["source_link"] for s in shown if s["decision"]), None) if page == 1 else None
        labels = (await pipeline.store.labels_of([g.seq])).get(g.seq, [])
        # Which route the group took: the one stored when it was made; the newest alert's
        # decision says whether that alert would take the same one now.
        routes = routes_view(integration, g.route_id) if integration is not None else []
        matched = next((r for r in routes if r["matched"]), None)
        now_route = next((s["decision"]["route"] for s in shown if s["decision"]), None) if page == 1 else None
        return self.page(
            request, "group.html", title=g.title or g.id, section="groups", g=g, integration=integration,
            alerts=shown, alerts_count=count, page=page, pages=pages, timeline=timeline, source_link=source_link,
            escalation=escalation_view(story["escalation"]), notifications=story["notifications"],
            chain=chain_view(story["escalation"]), routes=routes, matched=matched, route_now=now_route,
            group_labels=labels,
            maintenance=maintenance_of(await pipeline.store.maintenance(), g),
            allowed=ALLOWED_FROM, silence_choices=SILENCE_CHOICES, labels=ACTION_LABELS,
            here=f"/ui/groups/{g.id}",
            label_link=lambda k, v: self.url("/ui/groups?" + urlencode([("label", f"{k}={v}")])),
        )

    async def act(self, group_id: str, action: str, delay):
        """The one per-group action (the group page, each row and the bulk form all come here):
        lifecycle.act, as the API and the CLI call it."""
        return await lifecycle.act(self.daemon.current().store, group_id, action, delay=delay)

    async def groups_bulk(self, request: web.Request) -> web.Response:
        """One action on every selected group; says how many it changed and why others refused."""
        form = await read_form(request)
        back = _local(str(form.get("next", "")))
        action = str(form.get("action", ""))
        if action not in BULK_ACTIONS:
            return self._redirect(back, "Choose acknowledge, resolve or silence.", error=True)
        ids = list(dict.fromkeys(v for v in form.getall("group", []) if isinstance(v, str) and v))
        if not ids:
            return self._redirect(back, "Select one or more alert groups first.", error=True)
        if len(ids) > MAX_BULK:
            return self._redirect(back, f"Select at most {MAX_BULK} alert groups at once.", error=True)
        delay = form.get("delay") if action == "silence" else None
        if action == "silence":
            try:
                lifecycle.silence_delay(delay)  # refused once for the lot, not once per group
            except lifecycle.ActionError as exc:
                return self._redirect(back, str(exc), error=True)
        # Concurrent, so the writer commits them together (one fsync for the lot).
        outcomes = await asyncio.gather(*(self.act(gid, action, delay) for gid in ids), return_exceptions=True)
        refused = []
        for gid, outcome in zip(ids, outcomes):
            if isinstance(outcome, (NotFound, InvalidTransition, lifecycle.ActionError)):
                refused.append(f"{gid}: {outcome}")
            elif isinstance(outcome, BaseException):
                raise outcome
        done = len(ids) - len(refused)
        text = f"{done} alert group{'' if done == 1 else 's'} {lifecycle.PAST[action]}."
        if refused:
            text += f" {len(refused)} refused: " + "; ".join(refused[:5]) + ("; …" if len(refused) > 5 else "")
        return self._redirect(back, text, error=bool(refused) and not done)

    # -- one integration -------------------------------------------------------------

    async def integration_page(self, request: web.Request) -> web.Response:
        """An integration's URLs, routes and chains (read-only), recent groups, and a demo alert button."""
        self._take_flash(request)
        i = self._integration(request)
        store = self.daemon.current().store
        count, recent = await store.list_groups(integration_id=i.id, limit=5)
        chains = []
        for r in i.routes:
            chain = chain_view({"chain": i.chains[r.id]}) if r.id in i.chains else None
            if chain is not None and all(c["name"] != chain["name"] for c in chains):
                chains.append(chain)
        maintenance = (await store.maintenance()).get(i.id)
        return self.page(request, "integration.html", title=i.name, section="integrations", integration=i,
                         json=self.integration_json(i, maintenance), routes=routes_view(i), chains=chains,
                         recent=recent, recent_count=count, maintenance=maintenance)

    async def demo(self, request: web.Request) -> web.Response:
        """Send the kind's example payload through the pipeline, as `tocsin demo` does (never grouped)."""
        i = self._integration(request)
        back = f"/ui/integrations/{i.id}"
        try:
            accepted = await self.daemon.current().ingest(i, i.kind.example_payload_copy(), source="demo",
                                                          grouped=False)
        except RateLimited as exc:
            return self._redirect(back, f"Not sent: {exc}; try again in {exc.retry_after} s.", error=True)
        except Unavailable as exc:
            return self._redirect(back, f"Not sent: {exc}", error=True)
        if not accepted:
            return self._redirect(back, "The example payload made no alert.", error=True)
        first = accepted[0]
        return self._redirect(f"/ui/groups/{first.alert_group_id}",
                              f"Demo alert sent to {i.name}: alert {first.alert_id}.")

    async def group_action(self, request: web.Request) -> web.Response:
        """Acknowledge, resolve, silence, …: lifecycle.act, as the API and the CLI call it."""
        form = await read_form(request)
        group_id, action = request.match_info["id"], request.match_info["action"]
        # Settled before anything is done: a bad `next` falls back to the group's page
        # rather than failing the redirect after the action has been committed.
        back = _local(str(form.get("next", "")), f"/ui/groups/{group_id}")
        try:
            lifecycle.check_action(action)
        except lifecycle.UnknownAction:
            raise web.HTTPNotFound(text=f"No such action '{action}'") from None
        delay = form.get("delay") if action == "silence" else None
        try:
            await self.act(group_id, action, delay)
        except (lifecycle.ActionError, NotFound, InvalidTransition) as exc:
            return self._redirect(back, str(exc), error=True)
        return self._redirect(back, f"Alert group {group_id} {lifecycle.PAST[action]}.")


def _heartbeat(beat: tuple[float, str] | None, timeout: float | None) -> dict:
    """What the integrations page says about a heartbeat: off (no heartbeat_timeout),
    never (armed by the first ping), alive or expired; with the last ping and the timeout."""
    last_seen = beat[0] if beat else None
    if timeout is None:
        state = "off"
    elif beat is None:
        state = "never"
    else:
        state = "expired" if beat[1] == "expired" else "alive"
    return {"state": state, "last_seen": last_seen, "timeout": timeout}


def _static_version(folder: Path) -> str:
    """Changes whenever a static file does, so browsers never run a stale script."""
    h = hashlib.sha256()
    for path in sorted(folder.glob("*")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:12]
