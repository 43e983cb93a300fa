"""Grafana OnCall parity where tocsin had drifted: time filters under any host TZ, the
source link passed to appearance templates, the sender of a mail with an unparsable From,
and Jinja's slice filter.

The expected texts were produced by Grafana OnCall's own filters (engine/common/jinja_templater,
commit 3666186a; Django 4.2, pytz, jinja2 3.1.6) in a process with TZ=UTC, as OnCall runs.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from grouping.kinds import KINDS
from grouping.pipeline import build_integration, decide
from grouping.templates import render_budget
from handlers.mail import parse_message

ROOT = Path(__file__).resolve().parent.parent

# (template, variables, what Grafana OnCall renders)
TIME_CASES = [
    ("{{ v|iso8601_to_time|datetimeformat('%Y-%m-%d %H:%M:%S %Z|%z') }}", {'v': '2023-11-22T15:30:00.000000000Z'}, '2023-11-22 15:30:00 UTC|+0000'),
    ("{{ v|iso8601_to_time|datetimeformat('%Y-%m-%d %H:%M:%S %Z|%z') }}", {'v': '2023-05-28 23:11:12+0000'}, '2023-05-28 23:11:12 UTC|+0000'),
    ("{{ v|iso8601_to_time|datetimeformat('%Y-%m-%d %H:%M:%S %Z|%z') }}", {'v': '2023-5-8 3:04:05,5 +05'}, '2023-05-08 03:04:05 +0500|+0500'),
    ("{{ v|iso8601_to_time|datetimeformat('%Y-%m-%d %H:%M:%S %Z|%z') }}", {'v': '2023-5-8 3:04:05 -0000'}, '2023-05-08 03:04:05 +0000|+0000'),
    ("{{ v|iso8601_to_time|datetimeformat('%Y-%m-%d %H:%M:%S %Z|%z') }}", {'v': '2023-5-8 3:04:05+05:30'}, '2023-05-08 03:04:05 +0530|+0530'),
    ("{{ v|iso8601_to_time|datetimeformat('%Y-%m-%d %H:%M:%S %Z|%z') }}", {'v': '2023-5-8 3:04:05Z'}, '2023-05-08 03:04:05 UTC|+0000'),
    ("{{ v|iso8601_to_time|datetimeformat('%Y-%m-%d %H:%M:%S %Z|%z') }}", {'v': '2023-11-22T15:30:00'}, '2023-11-22 15:30:00 |'),
    ("{{ v|iso8601_to_time|datetimeformat('%Y-%m-%d %H:%M') }}", {'v': '٢٠٢٣-5-8 3:04'}, '2023-05-08 03:04'),
    ('{{ v|iso8601_to_time }}', {'v': '2023-11-22T15:30:00+01:00'}, '2023-11-22 15:30:00+01:00'),
    ('{{ v|iso8601_to_time }}', {'v': 'nonsense'}, 'None'),
    ('{{ v|iso8601_to_time }}', {'v': 5}, 'None'),
    ('{{ v|iso8601_to_time }}', {'v': '2023-13-45T10:00:00'}, 'None'),
    ("{{ v|iso8601_to_time|datetimeformat('%s') }}", {'v': '2023-11-22T15:30:00'}, '1700667000'),
    ("{{ v|iso8601_to_time|datetimeformat('%s') }}", {'v': '2023-11-22T15:30:00+05:00'}, '1700667000'),
    ("{{ v|iso8601_to_time|datetimeformat('%%s %s') }}", {'v': '2023-07-01T12:00:00'}, '%s 1688212800'),
    ('{{ v|iso8601_to_time|datetimeformat }}', {'v': '2023-07-01T12:00:00Z'}, '12:00 / 01-07-2023'),
    ('{{ 5|datetimeformat }}', {}, 'None'),
    ('{{ v|iso8601_to_time|datetimeformat(5) }}', {'v': '2023-07-01T12:00:00Z'}, 'Template Warning: strftime() argument 1 must be str, not int'),
    ("{{ v|iso8601_to_time|datetimeformat_as_timezone('%Y-%m-%d %H:%M:%S %Z|%z', 'America/New_York') }}", {'v': '2023-07-01T12:00:00Z'}, '2023-07-01 08:00:00 EDT|-0400'),
    ("{{ v|iso8601_to_time|datetimeformat_as_timezone('%Y-%m-%d %H:%M:%S %Z|%z', 'Asia/Kolkata') }}", {'v': '2023-07-01T12:00:00'}, '2023-07-01 17:30:00 IST|+0530'),
    ("{{ v|iso8601_to_time|datetimeformat_as_timezone('%Y-%m-%d %H:%M:%S %Z|%z') }}", {'v': '2023-07-01T12:00:00'}, '2023-07-01 12:00:00 UTC|+0000'),
    ("{{ v|iso8601_to_time|datetimeformat_as_timezone('%Y-%m-%d %H:%M:%S %Z|%z', 'europe/paris') }}", {'v': '2023-01-01T12:00:00'}, '2023-01-01 13:00:00 CET|+0100'),
    ("{{ v|iso8601_to_time|datetimeformat_as_timezone('%Y-%m-%d %H:%M:%S %Z|%z', 'utc') }}", {'v': '2023-01-01T12:00:00+02:00'}, '2023-01-01 10:00:00 UTC|+0000'),
    ("{{ v|iso8601_to_time|datetimeformat_as_timezone('%H:%M', 'Mars/Olympus') }}", {'v': '2023-01-01T12:00:00'}, "Template Warning: 'Mars/Olympus'"),
    ("{{ v|iso8601_to_time|datetimeformat_as_timezone('%H:%M', 5) }}", {'v': '2023-01-01T12:00:00'}, 'Template Warning: 5'),
    ("{{ v|iso8601_to_time|datetimeformat_as_timezone('%s', 'Asia/Kolkata') }}", {'v': '2023-01-01T12:00:00'}, '1672594200'),
    ("{{ 'x'|datetimeformat_as_timezone }}", {}, 'None'),
    ('{{ 1700000000|timestamp_to_datetime }}', {}, '2023-11-14 22:13:20'),
    ("{{ 1700000000.5|timestamp_to_datetime|datetimeformat('%Y-%m-%d %H:%M:%S.%f %Z|%z') }}", {}, '2023-11-14 22:13:20.500000 |'),
    ("{{ 0|timestamp_to_datetime|datetimeformat_as_timezone('%Y-%m-%d %H:%M %Z', 'Asia/Kolkata') }}", {}, '1970-01-01 05:30 IST'),
    ('{{ -86400|timestamp_to_datetime }}', {}, '1969-12-31 00:00:00'),
    ("{{ '1700000000'|timestamp_to_datetime }}", {}, 'None'),
    ('{{ v|timestamp_to_datetime }}', {'v': 1e+20}, 'Template Error: timestamp out of range for platform time_t'),
    ('{{ v|timestamp_to_datetime }}', {'v': 1000000000000.0}, 'None'),
    ('{{ (1700000000|timestamp_to_datetime).timestamp() }}', {}, '1700000000.0'),
    ("{{ '15:30 / 22-11-2023'|datetimeparse }}", {}, '2023-11-22 15:30:00'),
    ("{{ '2023-11-22 15:30 UTC'|datetimeparse('%Y-%m-%d %H:%M %Z') }}", {}, '2023-11-22 15:30:00'),
    ("{{ '2023-11-22 15:30 EST'|datetimeparse('%Y-%m-%d %H:%M %Z') }}", {}, 'None'),
    ("{{ '2023-11-22 15:30 IST'|datetimeparse('%Y-%m-%d %H:%M %Z') }}", {}, 'None'),
    ("{{ '2023-11-22 15:30 +0530'|datetimeparse('%Y-%m-%d %H:%M %z') }}", {}, '2023-11-22 15:30:00+05:30'),
    ("{{ ('2023-11-22 15:30'|datetimeparse('%Y-%m-%d %H:%M')).timestamp() }}", {}, '1700667000.0'),
    ("{{ 'bad'|datetimeparse }}", {}, 'None'),
    ("{{ ('15:30 / 22-11-2023'|datetimeparse)|datetimeformat_as_timezone('%H:%M %Z', 'America/New_York') }}", {}, '10:30 EST'),
    ("{{ '5m'|timedeltaparse }} {{ '-2h'|timedeltaparse }} {{ '+1w'|timedeltaparse }} {{ '3M'|timedeltaparse }} {{ 'x'|timedeltaparse }} {{ 5|timedeltaparse }}", {}, '0:05:00 -1 day, 22:00:00 7 days, 0:00:00 None None None'),
    ("{{ (v|iso8601_to_time - '1d'|timedeltaparse)|datetimeformat('%Y-%m-%d %H:%M %z') }}", {'v': '2023-03-01T00:30:00Z'}, '2023-02-28 00:30 +0000'),
    ("{{ '99999999999d'|timedeltaparse }}", {}, 'Template Error: Python int too large to convert to C int'),
    ('{{ time().tzname() }} {{ time().utcoffset() }}', {}, 'UTC 0:00:00'),
    ('{{ (time() - time()).days }}', {}, '-1'),
    ('{{ (v|iso8601_to_time).timestamp() }}', {'v': '2023-07-01T12:00:00'}, '1688212800.0'),
    ("{{ (v|iso8601_to_time).astimezone().strftime('%H:%M %Z') }}", {'v': '2023-07-01T12:00:00'}, '12:00 UTC'),
    ("{{ ((v|iso8601_to_time) + '2h'|timedeltaparse).timestamp() }}", {'v': '2023-07-01T12:00:00'}, '1688220000.0'),
    ('{{ (time().now() - time().replace(tzinfo=None)).days }}', {}, '-1'),
    ('{{ (v|iso8601_to_time).fromtimestamp(0) }}', {'v': '2023-07-01T12:00:00'}, '1970-01-01 00:00:00'),
    ("{{ '{:%H:%M %s}'.format(v|iso8601_to_time) }}", {'v': '2023-07-01T12:00:00'}, '12:00 1688212800'),
    ('{{ [v|iso8601_to_time] }} {{ v|iso8601_to_time|pprint }}', {'v': '2023-01-02T03:04:05Z'}, '[datetime.datetime(2023, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)] datetime.datetime(2023, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)'),
    ('{{ [v|iso8601_to_time] }}', {'v': '2023-5-8 3:04:05+05:30'}, "[datetime.datetime(2023, 5, 8, 3, 4, 5, tzinfo=datetime.timezone(datetime.timedelta(seconds=19800), '+0530'))]"),
    ('{{ [1700000000|timestamp_to_datetime] }}', {}, '[datetime.datetime(2023, 11, 14, 22, 13, 20)]'),
]

_RENDER_ALL = """
import json, sys, time
from grouping.templates import compile_template, render, render_budget
out = []
for source, variables in json.load(sys.stdin):
    o = render(compile_template(source), variables, render_budget(5))
    out.append(o.text if o.error is None else o.error)
print(json.dumps({"tzname": list(time.tzname), "texts": out}))
"""


@pytest.mark.parametrize("tz", ["UTC", "America/New_York", "Asia/Kolkata", "Pacific/Chatham"])
def test_time_filters_render_as_oncall_whatever_the_host_tz(tz):
    env = {**os.environ, "TZ": tz}
    proc = subprocess.run(
        [sys.executable, "-c", _RENDER_ALL], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
        input=json.dumps([[source, variables] for source, variables, _ in TIME_CASES]),
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    if tz != "UTC":
        assert result["tzname"] != ["UTC", "UTC"]  # the child really ran in another zone
    mismatches = [
        (source, variables, want, got)
        for (source, variables, want), got in zip(TIME_CASES, result["texts"])
        if got != want
    ]
    assert mismatches == []


# (From header values, the sender Grafana OnCall derives: django-anymail 12.0's from_email,
# falling back to ", ".join(get_all("From")) on AnymailInvalidAddress, as inbound.py does)
SENDER_CASES = [
    (["'Alex Smith' <test@example.com>"], 'test@example.com'),
    (['"\'Alex Smith\' via [TEST] mail" <test@example.com>'], 'test@example.com'),
    (["'Alex Smith' via [TEST] mail <test@example.com>"], '"\'Alex Smith\' via"'),
    (['not an address'], '"not an address"'),
    (['a@b, c'], 'a@b, c'),
    (['<>'], '<>'),
    (['@'], '<>'),
    (['Foo Bar <foo@bar'], 'foo@bar'),
    (['a@example.com', 'b@example.com'], 'a@example.com'),
    (['undisclosed-recipients:;'], 'undisclosed-recipients:;'),
    (['=?utf-8?q?M=C3=BCller=2C_Anna?= <anna@example.de>'], 'anna@example.de'),
    (['a@example.com, b@example.com'], 'a@example.com'),
    (['<bounce@example.com>'], 'bounce@example.com'),
    (['root (Cron Daemon)'], 'root'),
    (['"quoted@local"@example.com'], '"quoted@local"@example.com'),
    (['Name <a@b> trailing'], 'a@b'),
    (['foo@bar.com (Foo Bar)'], 'foo@bar.com'),
    (['Jürgen <j@example.de>'], 'j@example.de'),
    (['x <y@z>, broken'], 'x <y@z>, broken'),
    (['Group: a@b.c, d@e.f;'], 'a@b.c'),
    (['  spaced@example.com  '], 'spaced@example.com'),
]


@pytest.mark.parametrize("from_values, sender", SENDER_CASES)
def test_sender_of_a_mail_is_what_oncall_derives(from_values, sender):
    head = "".join(f"From: {v}\n" for v in from_values)
    assert parse_message(f"{head}Subject: s\n\nbody\n".encode("utf-8"))["sender"] == sender


def test_mail_without_a_from_value_has_an_empty_sender():
    # OnCall fails with a 500 here (from_email is None); tocsin keeps the alert.
    assert parse_message(b"From: \nSubject: s\n\nbody\n")["sender"] == ""


def test_an_empty_source_link_reaches_appearance_templates_as_an_empty_string():
    # OnCall keeps a "" rendering ("None" alone becomes None): the Alertmanager message
    # ends with "[View in AlertManager]()" for the example payload (generatorURL "").
    am = KINDS["alertmanager"]
    d = decide(build_integration("am", "AM", "alertmanager", "t", {}), am.example_payload_copy(),
               render_budget(5), full=True)
    assert d.message.endswith("[View in AlertManager]()")
    probe = "{{ source_link is none }}|{{ source_link is string }}|{{ source_link }}"
    cases = [("{{ payload.url }}", {}, "False|True|"),       # renders empty: ""
             ("{{ None }}", {}, "True|False|None"),           # renders "None": None
             ("{{ payload.url }}", {"url": "https://x"}, "False|True|https://x")]
    for link, payload, want in cases:
        integration = build_integration("wh", "WH", "webhook", "t", {"source_link": link, "title": probe})
        assert decide(integration, payload, render_budget(5), full=True).title == want, link
    no_link = build_integration("ea", "EA", "elastalert", "t", {"title": probe})  # no source_link template
    assert decide(no_link, {}, render_budget(5), full=True).title == "True|False|None"


def test_a_failing_source_link_reaches_templates_as_its_error_text():
    integration = build_integration("wh", "WH", "webhook", "t",
                                    {"source_link": "{{ payload.a.b }}", "title": "<{{ source_link }}>"})
    d = decide(integration, {}, render_budget(5), full=True)
    assert d.title == "<Template Warning: 'dict object' has no attribute 'a'>"
