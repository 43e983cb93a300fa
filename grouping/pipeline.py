"""The one path every alert takes: templates decide, the store commits.

`decide` is pure (payload and templates in, a Decision out) and serves live traffic;
`preview` runs it over a request body split as ingestion splits it, for `tocsin render`,
the preview API and the template editor alike. `Pipeline` wraps it with the time budget
and hands decided alerts to the store.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Iterable, Mapping

from store import NewAlert, OverLimit, Store, StoreUnavailable

from .kinds import KINDS, TEMPLATE_NAMES, Kind, count_alerts, split_alerts
from .labels import labels_of
from .limits import Limiter
from .native import with_native
from .runtime import Settings
from .routes import Route, choose
from .templates import (
    Budget,
    NeedsMoreTime,
    render_budget,
    Outcome,
    TemplateCompileError,
    compile_template,
    is_truthy,
    render,
)

BEHAVIOUR = ("grouping_id", "resolve_condition", "acknowledge_condition")
APPEARANCE = ("source_link", "title", "message", "image_url")
assert BEHAVIOUR + APPEARANCE == TEMPLATE_NAMES

# A render first runs on the event loop with this much time; past it, it restarts in a
# worker thread with the full budget, so a slow template never stalls other traffic.
INLINE_SECONDS = 0.01


class Unavailable(Exception):
    """Storage cannot take the alert now; the sender should retry."""

    def __init__(self, reason: str, retry_after: int = 5):
        super().__init__(reason)
        self.retry_after = retry_after


class RateLimited(Exception):
    """The integration is over its rate limit."""

    def __init__(self, limit: str, retry_after: int):
        super().__init__(f"rate limit {limit} exceeded")
        self.limit = limit
        self.retry_after = retry_after


class IntegrationError(ValueError):
    """An integration's templates do not compile; names the integration and template."""


@dataclass(frozen=True)
class Integration:
    """A configured integration with its templates compiled (overrides over kind defaults)."""

    id: str
    name: str
    kind: Kind
    token: str
    templates: Mapping[str, Any]       # name -> compiled template, or None
    sources: Mapping[str, str | None]  # name -> effective template text
    overrides: Mapping[str, str] = field(default_factory=dict)
    routes: tuple[Route, ...] = ()     # in order, the default route last
    chains: Mapping[str, str] = field(default_factory=dict)  # route id -> escalation snapshot (JSON)


def build_integration(id: str, name: str, kind: str, token: str, templates: Mapping[str, str],
                      routes: tuple[Route, ...] = (), chains: Mapping[str, str] | None = None) -> Integration:
    """Compile an integration's templates; raise IntegrationError naming each bad one.

    Without a default route, one is added (id `<integration>-default`, no escalation)."""
    if kind not in KINDS:
        raise IntegrationError(f"integration '{id}': unknown kind '{kind}'")
    k = KINDS[kind]
    compiled, sources, problems = {}, {}, []
    for tname in TEMPLATE_NAMES:
        source = templates.get(tname) or k.templates.get(tname)
        sources[tname] = source
        if not source:
            compiled[tname] = None
            continue
        try:
            compiled[tname] = with_native(source, compile_template(source))
        except TemplateCompileError as exc:
            problems.append(f"integration '{id}': template '{tname}': {exc}")
    if problems:
        raise IntegrationError("\n".join(problems))
    if not any(r.is_default for r in routes):
        routes = (*routes, Route(f"{id}-default", None))
    return Integration(id, name, k, token, compiled, sources, dict(templates), tuple(routes), dict(chains or {}))


@dataclass(frozen=True)
class Decision:
    """What the templates decided for one payload."""

    grouping_id: str | None
    grouping_key: str
    resolve: bool
    acknowledge: bool
    title: str | None
    source_link: str | None = None
    message: str | None = None
    image_url: str | None = None
    route: str | None = None
    errors: Mapping[str, str] = field(default_factory=dict)
    only_if_open: bool = False  # a follow-up (PagerDuty acknowledge/resolve): never opens a group

    def as_json(self) -> dict:
        out = asdict(self)
        out["errors"] = dict(self.errors)
        return out


def grouping_key_of(grouping_id: str | None) -> str:
    """md5 hex of the grouping id; an empty or failed one gets a fresh uuid, so it stands alone."""
    return hashlib.md5((grouping_id or str(uuid.uuid4())).encode("utf-8", "surrogatepass")).hexdigest()


def _appearance(outcome: Outcome) -> str | None:
    # Grafana OnCall shows the error text in place of the value, and "None" means nothing.
    text = outcome.text if outcome.error is None else outcome.error
    return None if text is None or text == "None" or text == "" else text


def _as_oncall_passes(outcome: Outcome | None) -> str | None:
    if outcome is None:
        return None
    text = outcome.text if outcome.error is None else outcome.error
    return None if text == "None" else text


def decide(
    integration: Integration,
    payload: Any,
    budget: Budget,
    *,
    full: bool = False,
    alert_group_id: str | None = None,
    grouped: bool = True,
) -> Decision:
    """Run the integration's templates over one payload.

    With full=False only what ingestion needs is rendered (behaviour and the group
    title); full=True adds source link, message and image as a user sees them.
    """
    t = integration.templates
    errors: dict[str, str] = {}

    def run(name: str, variables: dict, title: bool = False) -> Outcome | None:
        template = t.get(name)
        if template is None:
            return None
        outcome = render(template, variables, budget, title=title)
        if outcome.error is not None:
            errors[name] = outcome.error
        return outcome

    base = {"payload": payload}
    gid = run("grouping_id", base)
    grouping_id = gid.text if gid is not None and gid.error is None else None
    resolve = run("resolve_condition", base)
    ack = run("acknowledge_condition", base)
    key = grouping_key_of(grouping_id if grouped else None)
    route = choose(integration.routes, payload, budget) if integration.routes else None
    route_id = route.id if route is not None else None
    only_if_open = integration.kind.only_if_open(payload)

    if not full:
        # The title cached on a new group sees the payload only (Grafana OnCall's web_title_cache).
        title = run("title", base, title=True)
        return Decision(
            grouping_id=grouping_id, grouping_key=key,
            resolve=bool(resolve and is_truthy(resolve)), acknowledge=bool(ack and is_truthy(ack)),
            title=_appearance(title) if title else None, route=route_id, errors=errors,
            only_if_open=only_if_open,
        )

    link = run("source_link", base)
    source_link = _appearance(link) if link else None
    variables = {
        "payload": payload,
        "integration_name": integration.name,
        # As Grafana OnCall passes it: an empty rendering stays "", only "None" is None.
        "source_link": _as_oncall_passes(link),
        "alert_group_id": alert_group_id,
        "grafana_oncall_alert_group_id": alert_group_id,
        "grafana_oncall_incident_id": alert_group_id,
    }
    title = run("title", variables, title=True)
    message = run("message", variables)
    image = run("image_url", variables)
    return Decision(
        grouping_id=grouping_id,
        grouping_key=key,
        resolve=bool(resolve and is_truthy(resolve)),
        acknowledge=bool(ack and is_truthy(ack)),
        title=_appearance(title) if title else None,
        source_link=source_link,
        message=_appearance(message) if message else None,
        image_url=_appearance(image) if image else None,
        route=route_id,
        errors=errors,
        only_if_open=only_if_open,
    )


@dataclass(frozen=True)
class Accepted:
    """An alert that is on disk."""

    alert_id: str
    alert_group_id: str
    grouping_key: str
    group_created: bool = False
    group_state: str = "new"


def payloads_of(kind: Kind, payload: Any) -> list[Any]:
    """The alert payloads one webhook body makes: split (legacy grafana) and counted (AM v2)."""
    if kind.counts_alerts and isinstance(payload, dict):
        return [count_alerts(payload)]
    return list(split_alerts(kind, payload))


def render_output(d: Decision) -> dict:
    """A Decision as `tocsin render`, the preview API and the template editor show it."""
    return {
        "grouping_id": d.grouping_id,
        "grouping_key": d.grouping_key,
        "resolve": d.resolve,
        "acknowledge": d.acknowledge,
        "source_link": d.source_link,
        "title": d.title,
        "message": d.message,
        "image_url": d.image_url or None,
        "route": d.route,
        "errors": dict(d.errors),
    }


def with_templates(integration: Integration, overrides: Mapping[str, str]) -> Integration:
    """The integration with other template overrides, its routes and escalations kept
    (a preview decides the route the edited integration would really take).
    Raises IntegrationError when a template does not compile."""
    return build_integration(integration.id, integration.name, integration.kind.slug, integration.token,
                             overrides, integration.routes, integration.chains)


def preview(integration: Integration, payload: Any, budget_seconds: float = 1.0) -> list[dict]:
    """What the pipeline decides for one request body, alert by alert, as live traffic
    would: the body split and counted as ingestion does (payloads_of), each alert's
    templates rendered in full within its own budget. The one function behind
    `tocsin render`, the preview API and the template editor. Blocking: run it off the loop."""
    return [render_output(decide(integration, body, render_budget(budget_seconds), full=True))
            for body in payloads_of(integration.kind, payload)]


def preview_json(results: list[dict]) -> Any:
    """The printed form of a preview: the one alert's result, or the list when a body
    makes none or several (a split `grafana` body)."""
    return results[0] if len(results) == 1 else results


def _shown(grouping_id: str | None, limit: int = 1000) -> str | None:
    """The grouping id as kept on a group for people to read: a long one is cut, and says so."""
    if grouping_id is None or len(grouping_id) <= limit:
        return grouping_id
    return grouping_id[:limit] + "…"


def _refund(taken: list) -> None:
    for limit in reversed(taken):
        limit.refund()


class Pipeline:
    """Integrations of one config generation, wired to the store.

    Swapped whole on reload; the store and the render threads outlive it.
    """

    def __init__(
        self,
        integrations: Iterable[Integration],
        store: Store,
        *,
        render_budget: float = 1.0,
        executor: ThreadPoolExecutor | None = None,
        metrics=None,
        limiter: Limiter | None = None,
        settings: Settings | None = None,
    ):
        self.settings = settings or Settings()  # the rest of this config generation (grouping.runtime)
        self.metrics = metrics  # optional: .template_error(integration_id, template)
        self.limiter = limiter
        self.integrations = {i.id: i for i in integrations}
        self._by_token = {i.token: i for i in self.integrations.values()}
        self.store = store
        self.render_budget = render_budget
        self._executor = executor
        self._render_slots: dict[str, asyncio.Semaphore] = {}

    def by_token(self, token: str) -> Integration | None:
        return self._by_token.get(token)

    def by_id(self, integration_id: str) -> Integration | None:
        return self.integrations.get(integration_id)

    async def decide(self, integration: Integration, payload: Any, *, full: bool = False, **kw) -> Decision:
        """decide() within the render budget, off the event loop when it is slow."""
        start = time.monotonic()
        inline = min(INLINE_SECONDS, self.render_budget)
        try:
            return decide(integration, payload, Budget(start + inline, True, self.render_budget), full=full, **kw)
        except NeedsMoreTime:
            pass
        # One worker render per integration at a time: a flood of slow templates on one
        # integration must not take every thread of the executor it shares with others.
        slot = self._render_slots.setdefault(integration.id, asyncio.Semaphore(1))
        async with slot:
            budget = Budget(time.monotonic() + self.render_budget, False, self.render_budget)
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(
                self._executor, lambda: decide(integration, payload, budget, full=full, **kw)
            )

    async def preview(self, integration: Integration, payload: Any) -> list[dict]:
        """preview() in a render thread, with this generation's budget."""
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, preview, integration, payload, self.render_budget)

    async def ingest(
        self, integration: Integration, payload: Any, *, source: str = "http",
        payload_json: str | None = None, raw: bytes | None = None, grouped: bool = True,
        receipt: str | None = None,
    ) -> list[Accepted]:
        """Decide and durably store the alert(s) one request carries; `receipt` (a source's own
        id for it, one alert only) is committed with the alert."""
        return await self._ingest([(integration, payload, payload_json)], source, raw, grouped, receipt)

    async def ingest_many(
        self, items: list[tuple[Integration, Any]], *, source: str, raw: bytes | None = None
    ) -> list[Accepted]:
        """One payload into several integrations, committed atomically (one email, many recipients)."""
        return await self._ingest([(i, p, None) for i, p in items], source, raw, True)

    async def _ingest(self, items, source: str, raw: bytes | None, grouped: bool,
                      receipt: str | None = None) -> list[Accepted]:
        new, admitted = [], []
        with self.store.expect():
            try:
                for integration, payload, payload_json in items:
                    bodies = payloads_of(integration.kind, payload)
                    if len(bodies) != 1 or bodies[0] is not payload:
                        payload_json = None  # what is stored is what templates saw
                    mine = []
                    for body in bodies:
                        d = await self.decide(integration, body, grouped=grouped)
                        mine.append(self._new_alert(integration, body, d, source, payload_json, raw))
                    admitted += self._admit(integration, mine)
                    new += mine
                if receipt is not None and new:
                    new[0] = replace(new[0], receipt=receipt)
            except RateLimited:
                _refund(admitted)
                raise
            pending = self._submit(new, admitted)
        return await self._finish(pending, admitted)

    def _admit(self, integration: Integration, new: list[NewAlert]) -> list:
        """Count firing alerts against the integration's rate limit; resolve signals and
        follow-ups (which never open a group) pass free, so a flood never blocks its own
        recovery. All or nothing for one request."""
        limit = self.limiter.get(integration.id) if self.limiter is not None else None
        if limit is None:
            return []
        taken = []
        for n, alert in enumerate(new):
            if alert.resolve or alert.only_if_open:
                continue
            wait = limit.try_acquire()
            if wait:
                _refund(taken)
                raise RateLimited(limit.spec.text, Limiter.retry_after(wait))
            taken.append(limit)
            # Counted again by the store, in the database: the limit holds over every process.
            new[n] = replace(alert, rate_limit=(limit.spec.count, limit.spec.seconds))
        return taken

    def _new_alert(self, integration, body, d: Decision, source, payload_json, raw) -> NewAlert:
        if d.errors and self.metrics is not None:
            for name in d.errors:
                self.metrics.template_error(integration.id, name)
        return NewAlert(
            integration_id=integration.id,
            grouping_key=d.grouping_key,
            payload_json=payload_json if payload_json is not None else json.dumps(body),
            resolve=d.resolve,
            acknowledge=d.acknowledge,
            title=d.title,
            route_id=d.route,
            escalation=integration.chains.get(d.route) if d.route else None,
            only_if_open=d.only_if_open,
            source=source,
            raw=raw,
            grouping_id=_shown(d.grouping_id),
            labels=labels_of(body),
        )

    def _submit(self, new: list[NewAlert], admitted: list):
        """Queue the alerts for the writer now (the future resolves after the commit)."""
        if not new:
            return None
        try:
            return self.store.add_alerts(new)
        except StoreUnavailable as exc:
            _refund(admitted)
            raise Unavailable(str(exc)) from exc

    async def _finish(self, pending, admitted: list) -> list[Accepted]:
        if pending is None:
            return []
        try:
            stored = await pending
        except StoreUnavailable as exc:
            _refund(admitted)  # not kept, so not counted
            raise Unavailable(str(exc)) from exc
        except OverLimit as exc:  # other processes used the window up
            _refund(admitted)
            raise RateLimited(admitted[0].spec.text if admitted else "", Limiter.retry_after(exc.retry_after)) from None
        # None: a follow-up with no open group to join, not stored (as PagerDuty drops it).
        return [Accepted(s.alert_id, s.alert_group_id, s.grouping_key, s.group_created, s.group_state)
                for s in stored if s is not None]
