"""Native default templates: exact Python equivalents of the kinds' default templates.

Why: three sandboxed renders of the built-in defaults cost ~105 µs per alert (py-spy).
bench/default_templates.py, decide() per alert on the kinds' examples (mean): 64 µs
sandboxed, 15 µs native; the full render (UI, preview) 133 vs 34 µs.

Each function returns exactly the text the sandbox renders for its template, or declines
(raises) for any input it is not sure of, and the sandbox renders that one: errors,
"Template Warning" texts, size limits and the time budget stay the sandbox's alone.
tests/test_native_templates.py renders every kind's defaults both ways.

A native is found by the template's text, never by the kind: an integration that
overrides a template gets the sandbox (unless its text is the default, character for
character), and a default whose text changes loses its native until one is written.
Adding a kind means adding its functions to NATIVES.
"""
from __future__ import annotations

import functools
from types import MappingProxyType, NoneType
from typing import Any, Callable, Mapping

import jinja2

from .kinds import KINDS
# The sandbox's own size measure and tojson_pretty filter: the same code, so the same answers.
from .templates import Declined, NativeTemplate, _text_size, _tojson_pretty

# Input or output past this many characters is declined: well below the sandbox's own
# limits (10M), so that whatever they would refuse, and anything slow, goes to the sandbox.
MAX_CHARS = 1_000_000


class _Undefined:
    """Jinja's Undefined as the natives use it: prints empty, is false, equals nothing else."""

    __slots__ = ()

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return "UNDEFINED"


UNDEFINED = _Undefined()

_DICT_ATTRS = frozenset(dir(dict))
_SCALARS = frozenset({int, float, bool, NoneType})
_NOT_DICT = frozenset({list, str, int, float, bool, NoneType})

# ---------------------------------------------------------------- the sandbox's operations, for JSON values
# Each helper does what the sandbox does with a value json.loads can make (dict, list, str,
# int, float, bool, None) or with UNDEFINED, and declines anything else.


def _attr(obj: Any, name: str) -> Any:
    """`obj.name`: a dict's key (or undefined); undefined on other JSON values."""
    kind = type(obj)
    if kind is dict:
        if name in _DICT_ATTRS:  # the sandbox would find the method, not the key
            raise Declined
        return obj.get(name, UNDEFINED)
    if kind in _NOT_DICT and not hasattr(kind, name):
        return UNDEFINED
    raise Declined  # an attribute of undefined is an UndefinedError


def _get(obj: Any, key: str, default: Any) -> Any:
    """`obj.get(key, default)`: only a dict has it; on anything else the sandbox errs."""
    if type(obj) is dict:
        return obj.get(key, default)
    raise Declined


def _dict(value: Any) -> dict:
    """A dict the template iterates or prints piecewise, small enough to be sure of."""
    if type(value) is not dict:
        raise Declined
    _small(value)
    return value


def _small(value: Any) -> None:
    if _text_size(value) > MAX_CHARS:
        raise Declined


def _first(obj: Any) -> Any:
    """`obj[0]`: an element, or undefined where the sandbox's lookup fails."""
    kind = type(obj)
    if kind is list or kind is str:
        return obj[0] if obj else UNDEFINED
    if kind is dict:
        return obj.get(0, UNDEFINED)
    if kind in _SCALARS:
        return UNDEFINED
    raise Declined  # undefined[0] is an UndefinedError


def _is_mapping(value: Any) -> bool:
    """Jinja's `is mapping`."""
    if type(value) is dict:
        return True
    if type(value) in _NOT_DICT or value is UNDEFINED:
        return False
    raise Declined


def _is_sequence_not_string(value: Any) -> bool:
    """Jinja's `is sequence and is not string` (a dict, and undefined, count as sequences)."""
    kind = type(value)
    if kind is list or kind is dict or value is UNDEFINED:
        return True
    if kind is str or kind in _SCALARS:
        return False
    raise Declined


def _pick(table: Mapping[str, str], key: Any, default: str) -> str:
    """`{literal dict}[key] | default(default)`."""
    if type(key) is str:
        if key in table:
            return table[key]
        if key in _DICT_ATTRS:  # the sandbox falls back to the dict's attribute
            raise Declined
        return default
    if key is UNDEFINED or type(key) in _SCALARS or type(key) is list or type(key) is dict:
        return default  # KeyError or TypeError: undefined, then the default
    raise Declined


def _text(value: Any) -> str:
    """What `{{ value }}` prints."""
    kind = type(value)
    if kind is str:
        if len(value) > MAX_CHARS:
            raise Declined
        return value
    if kind in _SCALARS:
        return str(value)  # an int past Python's digit limit raises: declined
    if value is UNDEFINED:
        return ""
    if kind is dict or kind is list:
        _small(value)
        return str(value)
    raise Declined


def _upper(value: Any) -> str:
    """`value.upper()` on a str; anything else has no upper() and the sandbox errs."""
    if type(value) is not str or len(value) > MAX_CHARS:
        raise Declined
    return value.upper()


# ---------------------------------------------------------------- templates shared by several kinds
# The factories are memoized: the same arguments give the same function.


@functools.cache
def _print_get(key: str, default: str) -> Callable[[dict], str]:
    """`{{ payload.get(key, default) }}`"""

    def native(variables: dict) -> str:
        return _text(_get(variables["payload"], key, default))

    return native


@functools.cache
def _print_attr(name: str) -> Callable[[dict], str]:
    """`{{ payload.<name> }}`"""

    def native(variables: dict) -> str:
        return _text(_attr(variables["payload"], name))

    return native


@functools.cache
def _attr_equals(name: str, value: str) -> Callable[[dict], str]:
    """`{{ payload.<name> == value }}`"""

    def native(variables: dict) -> str:
        return str(_attr(variables["payload"], name) == value)

    return native


@functools.cache
def _constant(text: str) -> Callable[[dict], str]:
    def native(variables: dict) -> str:
        return text

    return native


def _state_is_ok(variables: dict) -> str:
    """`{{ payload.get("state", "").upper() == "OK" }}`"""
    return str(_upper(_get(variables["payload"], "state", "")) == "OK")


def _raw_json_message(variables: dict) -> str:
    """The payload as pretty JSON in a code block (tojson_pretty prints None when json.dumps fails)."""
    payload = variables["payload"]
    _small(payload)
    return f"```\n{_tojson_pretty(payload)}\n```"


_NO_TITLE = "Title undefined (check Web Title Template)"

# ---------------------------------------------------------------- webhook


def _webhook_grouping_id(variables: dict) -> str:
    payload = variables["payload"]
    if type(payload) not in (dict, list, str):  # `in` on a number or None is a TypeError
        raise Declined
    if "is_oncall_heartbeat" in payload:
        return "\n" + _text(_attr(payload, "alert_uid")) + "\n"
    return _text(payload) + "\n"


# ---------------------------------------------------------------- kapacitor, inbound_email


def _level_starts_with_ok(variables: dict) -> str:
    """`{{ payload.get("level", "").startswith("OK") }}`"""
    level = _get(variables["payload"], "level", "")
    if type(level) is not str:
        raise Declined
    return str(level.startswith("OK"))


def _subject_upper(variables: dict) -> str:
    """`{{ payload.get("subject", "").upper() }}`"""
    return _upper(_get(variables["payload"], "subject", ""))


def _message_is_ok(variables: dict) -> str:
    """`{{ payload.get("message", "").upper() == "OK" }}`"""
    return str(_upper(_get(variables["payload"], "message", "")) == "OK")


# ---------------------------------------------------------------- alertmanager, grafana_alerting


def _am_source_link(variables: dict) -> str:
    """`{{ payload.alerts[0].generatorURL }}`"""
    return _text(_attr(_first(_attr(variables["payload"], "alerts")), "generatorURL"))


def _am_title(variables: dict) -> str:
    payload = variables["payload"]
    group_labels = dict(_dict(_get(payload, "groupLabels", {})))  # .copy()
    if "labels" in payload:
        alertname = _get(_get(payload, "labels", {}), "alertname", "")
    else:
        alertname = group_labels.pop("alertname", "")
    text = _text(alertname) + " "
    if len(group_labels) > 0:
        text += "(" + ", ".join(map(str, group_labels.values())) + ")"
    return text


_AM_SEVERITY_EMOJI = MappingProxyType({"critical": ":rotating_light:", "warning": ":warning:"})
_AM_STATUS_EMOJI = MappingProxyType({"firing": ":fire:", "resolved": ":white_check_mark:"})


def _items(out: list[str], mapping: dict) -> None:
    for k, v in mapping.items():
        out += ("- ", _text(k), ": ", _text(v), "\n")


def _am_message(variables: dict) -> str:
    payload = variables["payload"]
    annotations = dict(_dict(_get(payload, "commonAnnotations", {})))  # .copy()
    group_labels = _dict(_get(payload, "groupLabels", {}))
    common_labels = _dict(_get(payload, "commonLabels", {}))
    severity = _attr(group_labels, "severity")
    legacy_labels = _dict(_get(payload, "labels", {}))
    legacy_annotations = _dict(_get(payload, "annotations", {}))
    out: list[str] = []
    if severity:
        out += ("Severity: ", _text(severity), " ", _pick(_AM_SEVERITY_EMOJI, severity, ":question:"), "\n")
    status = _get(payload, "status", "Unknown")
    out += ("Status: ", _text(status), " ", _pick(_AM_STATUS_EMOJI, status, ":warning:"), " (on the source)\n")
    if status == "firing" and _attr(payload, "numFiring"):
        out += ("Firing alerts – ", _text(_attr(payload, "numFiring")),
                "\nResolved alerts – ", _text(_attr(payload, "numResolved")), "\n")
    if "runbook_url" in annotations:
        out += ("[:book: Runbook:link:](", _text(_attr(annotations, "runbook_url")), ")\n")
        annotations.pop("runbook_url")
    if "runbook_url_internal" in annotations:
        out += ("[:closed_book: Runbook (internal):link:](", _text(_attr(annotations, "runbook_url_internal")), ")\n")
        annotations.pop("runbook_url_internal")
    if len(group_labels) > 0:
        out.append("\nGroupLabels:\n")
        _items(out, group_labels)
        out.append("\n")
    for heading, mapping in (("CommonLabels:\n", common_labels), ("Annotations:\n", annotations),
                             ("Labels:\n", legacy_labels), ("Annotations:\n", legacy_annotations)):
        if len(mapping) > 0:
            out.append(heading)
            _items(out, mapping)
            out.append("\n")
    out += ("[View in AlertManager](", _text(variables.get("source_link", UNDEFINED)), ")")
    return "".join(out)


# ---------------------------------------------------------------- grafana (legacy)


def _grafana_or_alertname(key: str) -> Callable[[dict], str]:
    """`{{ payload.get(key, "") or payload.get("labels", {}).get("alertname", "No title …") }}`"""

    def native(variables: dict) -> str:
        payload = variables["payload"]
        value = _get(payload, key, "")
        if not value:
            value = _get(_get(payload, "labels", {}), "alertname", "No title (check Web Title Template)")
        return _text(value)

    return native


def _grafana_resolve(variables: dict) -> str:
    """`{{ payload.get("state") == "ok" or payload.get("status", "") == "resolved" }}`"""
    payload = variables["payload"]
    return str(_get(payload, "state", None) == "ok" or _get(payload, "status", "") == "resolved")


def _grafana_source_link(variables: dict) -> str:
    """`{{ payload.get("ruleUrl", "") or payload.generatorURL }}`"""
    payload = variables["payload"]
    return _text(_get(payload, "ruleUrl", "") or _attr(payload, "generatorURL"))


def _grafana_message(variables: dict) -> str:
    payload = variables["payload"]
    if type(payload) is not dict:
        raise Declined
    out = [_text(_attr(payload, "message")), "\n"]
    matches = payload.get("evalMatches", [])
    if type(matches) is not list:
        raise Declined
    _small(matches)
    for match in matches:
        out += ("**", _text(_attr(match, "metric")), "**: ", _text(_attr(match, "value")), "\n")
    if "status" in payload:
        out += ("\n**Status**: ", _text(_attr(payload, "status")), "\n")
    if "labels" in payload:
        out.append("**Labels:** ")
        for k, v in _dict(payload["labels"]).items():
            out += ("\n*", _text(k), "*: ", _text(v))
        out.append("\n")
    if "annotations" in payload:
        out.append("**Annotations:**")
        for k, v in _dict(payload["annotations"]).items():
            if type(v) is not str:  # v.startswith: only a str has it
                raise Declined
            if v.startswith("http"):
                out += ("\n*", _text(k), "*:  [here](", _text(v), ")")
            else:
                out += ("\n*", _text(k), "*:  ", _text(v), " ")
        out.append("\n")
    return "".join(out)


def _grafana_image_url(variables: dict) -> str:
    """`{{- payload.get(imageUrl) -}}`: imageUrl is an undefined name, so the key is never there."""
    payload = variables["payload"]
    if type(payload) is not dict or not all(type(k) is str for k in payload):
        raise Declined
    return "None"


# ---------------------------------------------------------------- pagerduty


def _pd_source_link(variables: dict) -> str:
    payload = variables["payload"]
    links = _attr(payload, "links")
    if not _is_sequence_not_string(links):
        links = []
    if links:
        first = _first(links)
        if _is_mapping(first) and _attr(first, "href"):
            return _text(_attr(first, "href"))
    return _text(_attr(payload, "client_url"))


def _pd_event(payload: Any) -> Any:
    event = _attr(payload, "payload")
    return event if _is_mapping(event) else {}


def _pd_title(variables: dict) -> str:
    return _text(_attr(_pd_event(variables["payload"]), "summary") or _NO_TITLE)


_PD_SEVERITY_EMOJI = MappingProxyType(
    {"critical": ":rotating_light:", "error": ":red_circle:", "warning": ":warning:", "info": ":information_source:"}
)
_PD_FIELDS = (("**Source**: ", "source"), ("**Component**: ", "component"), ("**Group**: ", "group"),
              ("**Class**: ", "class"), ("**Timestamp**: ", "timestamp"))


def _pd_message(variables: dict) -> str:
    payload = variables["payload"]
    event = _pd_event(payload)
    severity = _attr(event, "severity")
    emoji = _pick(_PD_SEVERITY_EMOJI, severity, ":question:")
    out: list[str] = []
    if severity:
        out += ("**Severity**: ", _text(severity), " ", emoji, "\n")
    for label, name in _PD_FIELDS:
        value = _attr(event, name)
        if value:
            out += (label, _text(value), "\n")
    details = _attr(event, "custom_details")
    if _is_mapping(details) and len(details) > 0:
        out.append("**Details:**\n")
        for k, v in _dict(details).items():
            out += ("*", _text(k), "*: ", _text(v), "\n")
    elif details:
        out += ("**Details**: ", _text(details), "\n")
    links = _attr(payload, "links")
    if _is_sequence_not_string(links) and links is not UNDEFINED:
        _small(links)
        for link in links:  # a dict iterates its keys: strings, never mappings
            if _is_mapping(link) and _attr(link, "href"):
                href = _attr(link, "href")
                out += ("[", _text(_attr(link, "text") or href), "](", _text(href), ")\n")
    client = _attr(payload, "client")
    if client:
        url = _attr(payload, "client_url")
        if url:
            out += ("Sent by [", _text(client), "](", _text(url), ")\n")
        else:
            out += ("Sent by ", _text(client), "\n")
    return "".join(out)


def _pd_image_url(variables: dict) -> str:
    images = _attr(variables["payload"], "images")
    if not _is_sequence_not_string(images):
        images = []
    if images:
        first = _first(images)
        if _is_mapping(first):
            return _text(_attr(first, "src"))
    return ""


# ---------------------------------------------------------------- the registry

_WEBHOOK_LIKE = {
    "grouping_id": _print_get("alert_uid", ""),
    "resolve_condition": _state_is_ok,
    "source_link": _print_attr("link_to_upstream_details"),
}
_ALERTMANAGER = {
    "grouping_id": _print_attr("groupKey"),
    "resolve_condition": _attr_equals("status", "resolved"),
    "source_link": _am_source_link,
    "title": _am_title,
    "message": _am_message,
}

# kind -> template name -> the template's native equivalent. Kinds share functions where
# their templates mean the same; a text both kinds share must map to one function.
NATIVES: Mapping[str, Mapping[str, Callable[[dict], str]]] = MappingProxyType({
    "webhook": {
        "grouping_id": _webhook_grouping_id,
        "resolve_condition": _state_is_ok,
        "source_link": _print_attr("url"),
        "title": _constant("Incident"),
        "message": _raw_json_message,
    },
    "formatted_webhook": {
        **_WEBHOOK_LIKE,
        "title": _print_get("title", "Title undefined (Check Web Title Template)"),
        "message": _print_attr("message"),
        "image_url": _print_attr("image_url"),
    },
    "zabbix": {
        **_WEBHOOK_LIKE,
        "title": _print_get("title", _NO_TITLE),
        "message": _print_get("message", ""),
        "image_url": _print_get("image_url", ""),
    },
    "elastalert": {
        "grouping_id": _WEBHOOK_LIKE["grouping_id"],
        "resolve_condition": _state_is_ok,
        "title": _constant("Incident"),
        "message": _raw_json_message,
    },
    "kapacitor": {
        "grouping_id": _print_get("id", ""),
        "resolve_condition": _level_starts_with_ok,
        "title": _print_get("id", _NO_TITLE),
        "message": _raw_json_message,
    },
    "inbound_email": {
        "grouping_id": _subject_upper,
        "resolve_condition": _message_is_ok,
        "title": _print_get("subject", _NO_TITLE),
        "message": _print_attr("message"),
        "image_url": _print_attr("image_url"),
    },
    "alertmanager": _ALERTMANAGER,
    "grafana_alerting": _ALERTMANAGER,
    "grafana": {
        "grouping_id": _grafana_or_alertname("ruleName"),
        "resolve_condition": _grafana_resolve,
        "source_link": _grafana_source_link,
        "title": _grafana_or_alertname("title"),
        "message": _grafana_message,
        "image_url": _grafana_image_url,
    },
    "pagerduty": {
        "grouping_id": _print_attr("dedup_key"),
        "resolve_condition": _attr_equals("event_action", "resolve"),
        "acknowledge_condition": _attr_equals("event_action", "acknowledge"),
        "source_link": _pd_source_link,
        "title": _pd_title,
        "message": _pd_message,
        "image_url": _pd_image_url,
    },
})


def _bounded(native: Callable[[dict], str]) -> Callable[[dict], str]:
    # The sandbox refuses output past its limit: leave anything long to it.
    def bounded(variables: dict) -> str:
        text = native(variables)
        if type(text) is not str or len(text) > MAX_CHARS:
            raise Declined
        return text

    bounded.__wrapped__ = native
    return bounded


def _by_text() -> Mapping[str, Callable[[dict], str]]:
    table: dict[str, Callable[[dict], str]] = {}
    chosen: dict[str, Callable[[dict], str]] = {}
    for slug, natives in NATIVES.items():
        kind = KINDS.get(slug)
        if kind is None:
            continue
        for name, native in natives.items():
            source = kind.templates[name]
            if source is None:
                raise ValueError(f"native for {slug}.{name}, which has no default template")
            if chosen.setdefault(source, native) is not native:
                raise ValueError(f"{slug}.{name}: another kind's native already covers the same text")
            table[source] = _bounded(native)
    return MappingProxyType(table)


# template text -> native equivalent
BY_TEXT = _by_text()


def native_for(source: str | None) -> Callable[[dict], str] | None:
    """The native equivalent of a template text, or None when it has none."""
    return BY_TEXT.get(source) if source else None


def with_native(source: str, template: jinja2.Template) -> jinja2.Template | NativeTemplate:
    """`template` (compiled from `source`), paired with its native equivalent when there is one."""
    native = native_for(source)
    return template if native is None else NativeTemplate(template, native)
