"""examples/ ships a sample for every built-in kind, and every sample is what it claims to be."""
from __future__ import annotations

import json
from email import policy
from email.parser import BytesParser
from pathlib import Path

import pytest

from conftest import CORPUS, INTEGRATIONS, corpus_files
from grouping.kinds import KINDS
from handlers.mail import parse_message

HTTP_EXAMPLES = corpus_files("http/*.json")
EMAIL_EXAMPLES = corpus_files("email/*.eml")
MAIL_KIND = "inbound_email"


def kind_of(path: Path) -> str | None:
    """The kind an example is for: mails are inbound_email; an HTTP file is named
    `<kind>-<case>.json` with `-` for `_`, the longest matching kind winning
    (`grafana-alerting-firing` is grafana_alerting, `grafana-legacy-ok` is grafana)."""
    if path.parent.name == "email":
        return MAIL_KIND
    stem = path.stem
    named = [slug for slug in KINDS
             if stem == slug.replace("_", "-") or stem.startswith(slug.replace("_", "-") + "-")]
    return max(named, key=len, default=None)


def test_kind_of_reads_the_naming_rule():
    assert kind_of(CORPUS / "http" / "grafana-alerting-firing.json") == "grafana_alerting"
    assert kind_of(CORPUS / "http" / "grafana-legacy-ok.json") == "grafana"
    assert kind_of(CORPUS / "http" / "formatted-webhook-ok.json") == "formatted_webhook"
    assert kind_of(CORPUS / "http" / "webhook-generic.json") == "webhook"
    assert kind_of(CORPUS / "http" / "elastalert.json") == "elastalert"
    assert kind_of(CORPUS / "http" / "nagios.json") is None
    assert kind_of(CORPUS / "email" / "cron-output.eml") == MAIL_KIND


def test_every_built_in_kind_has_an_example():
    covered = {kind_of(p) for p in HTTP_EXAMPLES + EMAIL_EXAMPLES}
    assert set(KINDS) - covered == set(), "kinds without a sample in examples/"


@pytest.mark.parametrize("path", HTTP_EXAMPLES, ids=lambda p: p.name)
def test_http_example_is_json_named_after_its_kind(path):
    assert kind_of(path) in KINDS, f"{path.name}: name it <kind>-<case>.json"
    body = json.loads(path.read_bytes().decode("utf-8"))
    assert isinstance(body, (dict, list)) and body


@pytest.mark.parametrize("path", EMAIL_EXAMPLES, ids=lambda p: p.name)
def test_email_example_is_a_well_formed_mail(path):
    raw = path.read_bytes()
    message = BytesParser(policy=policy.default).parsebytes(raw)
    assert [d for part in message.walk() for d in part.defects] == []
    assert message["From"] and message["Subject"]
    assert "TOKEN@alerts.example.com" in message["To"]  # the address examples/README.md says to replace
    payload = parse_message(raw)
    assert payload["subject"] and payload["message"]


async def test_every_http_example_is_accepted_at_its_kind_url(tocsin):
    integration_of = {kind: iid for iid, kind, _ in INTEGRATIONS}
    for path in HTTP_EXAMPLES:
        kind = kind_of(path)
        if kind == "pagerduty":
            # PagerDuty's own examples carry a placeholder routing key; at the integration URL
            # the token is the key, and PagerDuty's answer is 202 with the dedup_key.
            event = json.loads(path.read_bytes())
            event.pop("routing_key")
            status, body = await tocsin.post(integration_of[kind], event)
            assert (status, body["status"]) == (202, "success"), (path.name, body)
            continue
        status, body = await tocsin.post(integration_of[kind], path.read_bytes())
        assert status == 200, (path.name, body)
        assert body["alert_group_id"], path.name
