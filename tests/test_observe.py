"""What operators see: metrics moving on /metrics, `tocsin --version`, log lines that carry
fields (logfmt and JSON), and durations written the way people write them."""
from __future__ import annotations

import asyncio
import json
import logging
import signal
import subprocess
import sys
import time
import tomllib
from importlib import metadata

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import API_TOKEN, INTEGRATIONS, ROOT, TOKEN, integration, parse_log_line, write_config, webhook_receiver
from daemon import config as cfg
from daemon.logs import JsonFormatter, LogfmtFormatter
from grouping.durations import parse_duration
from grouping.limits import parse_rate


# -- helpers ---------------------------------------------------------------------------------


@pytest.fixture
async def receiver():
    async with webhook_receiver(fail_first=1) as rec:
        yield rec


async def scrape(h) -> dict[tuple[str, frozenset], float]:
    """Every sample on /metrics, parsed by prometheus-client's own parser: (name, labels) -> value."""
    async with h.session.get(f"{h.base}/metrics", timeout=aiohttp.ClientTimeout(total=10)) as r:
        assert r.status == 200
        text = await r.text()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def sample(samples, name: str, **labels) -> float | None:
    return samples.get((name, frozenset(labels.items())))


async def until_metric(h, name: str, value: float, seconds: float = 10.0, **labels) -> dict:
    """Scrape until the sample reaches `value` (bounded); the last scrape either way."""
    deadline = time.monotonic() + seconds
    while True:
        samples = await scrape(h)
        if sample(samples, name, **labels) == value or time.monotonic() > deadline:
            return samples
        await asyncio.sleep(0.1)


def paged(url: str, steps: str, rest: str = "") -> str:
    """An alertmanager integration whose default route escalates through `steps` to one webhook."""
    return integration("pg", "alertmanager", "tok-paged-000001", name="Paged", rest=rest) + f"""
[[integrations.routes]]
id = "all"
escalation = "page"

[[notifiers]]
name = "ops-hook"
kind = "webhook"
url = "{url}"
timeout = "2s"
events = []

[[escalations]]
name = "page"
steps = {steps}
"""


def am(key: str) -> dict:
    return {"status": "firing", "groupKey": key, "commonLabels": {"severity": "critical"},
            "groupLabels": {"alertname": key}, "alerts": [{"status": "firing", "labels": {"alertname": key}}]}


def tocsin(*args):
    return subprocess.run([sys.executable, "-m", "daemon", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


# -- metrics ---------------------------------------------------------------------------------


async def test_notification_attempts_and_escalation_steps_are_counted(start_tocsin, receiver):
    h = await start_tocsin(extra_integrations=paged(
        receiver.url, '[ { notify = ["ops-hook"] }, { wait = "300ms" }, { resolve = true } ]'))
    before = await scrape(h)
    assert sample(before, "tocsin_escalation_steps_total", step="notify") == 0  # present before the first
    assert (await h.post("pg", am("disk")))[0] == 200
    # The receiver refuses the first attempt (500: retryable), takes the second after the 1 s backoff.
    samples = await until_metric(h, "tocsin_notification_attempts_total", 1.0, notifier="ops-hook", outcome="ok")
    assert sample(samples, "tocsin_notification_attempts_total", notifier="ops-hook", outcome="retry") == 1.0
    assert sample(samples, "tocsin_notification_attempts_total", notifier="ops-hook", outcome="ok") == 1.0
    assert sample(samples, "tocsin_notification_attempts_total", notifier="ops-hook", outcome="failed") is None
    assert len(receiver.bodies) == 1 and receiver.seen == 2
    # notify, then wait; 300 ms later the second run resolves: three steps, two timed runs.
    samples = await until_metric(h, "tocsin_escalation_steps_total", 1.0, step="resolve")
    for step in ("notify", "wait", "resolve"):
        assert sample(samples, "tocsin_escalation_steps_total", step=step) == 1.0, step
    assert sample(samples, "tocsin_escalation_steps_total", step="repeat") == 0.0
    assert sample(samples, "tocsin_escalation_lateness_seconds_count") == 2.0
    late = sample(samples, "tocsin_escalation_lateness_seconds_sum")
    assert late is not None and late >= 0.0


async def test_heartbeat_expired_and_restored_are_counted(start_tocsin, receiver):
    h = await start_tocsin(extra_integrations=paged(receiver.url, '[ { notify = ["ops-hook"] } ]',
                                                    rest='heartbeat_timeout = "1s"'))
    beat = f"{h.base}/integrations/v1/alertmanager/{TOKEN['pg']}/heartbeat/"
    async with h.session.get(beat) as r:
        assert r.status == 200
    samples = await until_metric(h, "tocsin_heartbeats_total", 1.0, integration="pg", event="expired")
    assert sample(samples, "tocsin_heartbeats_total", integration="pg", event="expired") == 1.0
    assert sample(samples, "tocsin_heartbeats_total", integration="pg", event="restored") is None
    async with h.session.get(beat) as r:
        assert r.status == 200
    samples = await until_metric(h, "tocsin_heartbeats_total", 1.0, integration="pg", event="restored")
    assert sample(samples, "tocsin_heartbeats_total", integration="pg", event="restored") == 1.0


async def test_wrong_api_token_and_wrong_ui_login_are_counted(tocsin):
    samples = await scrape(tocsin)
    assert sample(samples, "tocsin_auth_failures_total", surface="api") == 0.0
    assert sample(samples, "tocsin_auth_failures_total", surface="ui") == 0.0
    assert (await tocsin.api("GET", "alert_groups/", token="not-the-token"))[0] == 401
    assert (await tocsin.api("GET", "alert_groups/", token=None))[0] == 401
    assert (await tocsin.api("GET", "alert_groups/"))[0] == 200  # the right token is no failure
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True),
                                     timeout=aiohttp.ClientTimeout(total=10)) as browser:
        async with browser.get(f"{tocsin.base}/ui/login") as r:
            page = await r.text()
        nonce = page.split('name="_login" value="', 1)[1].split('"', 1)[0]
        async with browser.post(f"{tocsin.base}/ui/login", allow_redirects=False,
                                data={"_login": nonce, "token": "guess-1234"}) as r:
            assert r.status == 401
        async with browser.post(f"{tocsin.base}/ui/login", allow_redirects=False,
                                data={"_login": nonce, "token": API_TOKEN}) as r:
            assert r.status == 303
    samples = await scrape(tocsin)
    assert sample(samples, "tocsin_auth_failures_total", surface="api") == 2.0
    assert sample(samples, "tocsin_auth_failures_total", surface="ui") == 1.0


async def test_build_info_names_the_version_and_python(tocsin):
    samples = await scrape(tocsin)
    [(labels, value)] = [(dict(k[1]), v) for k, v in samples.items() if k[0] == "tocsin_build_info"]
    assert value == 1.0
    assert labels == {"version": metadata.version("tocsin"), "python": ".".join(map(str, sys.version_info[:3]))}


# -- version ---------------------------------------------------------------------------------


def test_version_flag_prints_the_package_version():
    r = tocsin("--version")
    assert r.returncode == 0, r.stderr
    with open(ROOT / "pyproject.toml", "rb") as f:
        declared = tomllib.load(f)["project"]["version"]
    assert r.stdout.strip() == f"tocsin {metadata.version('tocsin')}"
    assert metadata.version("tocsin") == declared


# -- logs ------------------------------------------------------------------------------------


def _wait_for(proc, text: str, seconds: float = 15.0) -> list[str]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = [line for line in list(proc.output) if text in line]
        if found:
            return found
        time.sleep(0.05)
    return []


def test_logfmt_lines_carry_fields(spawn, tmp_path):
    path = write_config(tmp_path)
    proc = spawn(path)
    [ready] = [line for line in proc.output if "tocsin ready" in line]
    fields = parse_log_line(ready)
    assert fields["msg"] == "tocsin ready" and fields["level"] == "info" and fields["logger"] == "tocsin"
    assert fields["http"] == f"127.0.0.1:{proc.http_port}" and fields["smtp"] == "off"
    assert fields["integrations"] == str(len(INTEGRATIONS)) and fields["version"] == metadata.version("tocsin")
    # A refused reload: its problems are one field, quoted because they hold spaces and quotes.
    path.write_text(path.read_text().replace("[http]", '[http]\nbody_timeout = "a while"'))
    proc.proc.send_signal(signal.SIGHUP)
    [line] = _wait_for(proc, "reload refused")
    refused = parse_log_line(line)
    assert refused["level"] == "error" and refused["msg"] == "reload refused, keeping the running config"
    assert refused["problems"] == "[http]: 'body_timeout': duration 'a while' is not like 90, 45s, 90m, 1h30m, 2d"
    assert ' problems="[http]: ' in line
    assert proc.stop() == 0


def test_json_lines_carry_fields_as_keys(spawn, tmp_path):
    path = write_config(tmp_path, daemon_extra='log_format = "json"')
    proc = spawn(path)
    events = [json.loads(line) for line in proc.output if line.strip()]
    [ready] = [e for e in events if e["msg"] == "tocsin ready"]
    assert ready["http"] == f"127.0.0.1:{proc.http_port}" and ready["integrations"] == len(INTEGRATIONS)
    path.write_text(path.read_text().replace('log_format = "json"', 'log_format = "json"\nretention = "soon"\n'
                                             'shutdown_timeout = "-1s"'))
    proc.proc.send_signal(signal.SIGHUP)
    [line] = _wait_for(proc, "reload refused")
    refused = json.loads(line)
    assert refused["problems"] == ["[daemon]: 'shutdown_timeout': duration '-1s' is not like 90, 45s, 90m, 1h30m, 2d",
                                   "[daemon]: 'retention': duration 'soon' is not like 90, 45s, 90m, 1h30m, 2d"]
    assert proc.stop() == 0


def test_formatters_quote_and_keep_extra_fields():
    record = logging.LogRecord("tocsin.test", logging.WARNING, __file__, 1, "notification failed for good", (), None)
    record.__dict__.update({"notifier": "ops hook", "detail": 'HTTP 500: "no" a=b\nline', "attempt": 6,
                            "ok": False, "gone": None})
    line = LogfmtFormatter().format(record)
    assert "\n" not in line
    assert ' notifier="ops hook" ' in line and " attempt=6 " in line and " ok=false " in line
    fields = parse_log_line(line)
    assert fields["detail"] == 'HTTP 500: "no" a=b\nline' and fields["msg"] == "notification failed for good"
    assert fields["gone"] == ""
    event = json.loads(JsonFormatter().format(record))
    assert event["attempt"] == 6 and event["ok"] is False and event["gone"] is None
    assert event["detail"] == 'HTTP 500: "no" a=b\nline' and event["level"] == "warning"


# -- durations -------------------------------------------------------------------------------


@pytest.mark.parametrize("text,seconds", [
    ("1h30m", 5400), ("90m", 5400), ("1d", 86400), ("45s", 45), ("2h", 7200), ("90", 90), (90, 90),
    (1.5, 1.5), ("500ms", 0.5), ("1h 30m", 5400), (" 2w ", 1209600), ("1.5h", 5400), ("0", 0),
])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "1x", "h", "-5", "1h1h", "1h-30m", "30m2", True, -1, float("inf"),
                                  None, [5]])
def test_parse_duration_refuses(text):
    with pytest.raises(ValueError):
        parse_duration(text)


def test_rate_periods_are_durations():
    assert parse_rate("300/5m").seconds == 300
    assert parse_rate("10/s").seconds == 1
    assert parse_rate("1000/1h30m").seconds == 5400
    with pytest.raises(ValueError, match="period 'fortnight' is not a duration"):
        parse_rate("10/fortnight")
    with pytest.raises(ValueError, match="period positive"):
        parse_rate("10/0s")


DURATIONS = """
[daemon]
database = "x.db"
shutdown_timeout = "1m30s"
retention = "30d"
rate_limit = "1000/1h30m"
[http]
listen = "127.0.0.1:0"
body_timeout = "45s"
[smtp]
listen = "127.0.0.1:0"
session_timeout = "5m"
data_timeout = 90
[[notifiers]]
name = "hook"
kind = "webhook"
url = "http://127.0.0.1:9/"
timeout = "1m"
[[escalations]]
name = "slow"
steps = [ { notify = ["hook"] }, { wait = "1h30m" }, { wait = 600 }, { notify = ["hook"] } ]
[[integrations]]
id = "hb"
kind = "webhook"
token = "tok-durations-01"
heartbeat_timeout = "90m"
rate_limit = "10/s"
"""


def test_config_durations_are_read_everywhere(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text(DURATIONS)
    r = tocsin("check", "-c", str(path))
    assert r.returncode == 0, r.stderr
    c = cfg.load(path)
    assert (c.daemon.shutdown_timeout, c.daemon.retention, c.http.body_timeout) == (90, 30 * 86400, 45)
    assert (c.smtp.session_timeout, c.smtp.data_timeout) == (300, 90)
    assert c.notifiers[0].timeout == 60
    assert [s.seconds for s in c.escalations[0].steps if s.kind == "wait"] == [5400, 600]
    assert c.integrations[0].heartbeat_timeout == 5400


def test_bad_durations_are_config_errors_naming_the_key(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text(DURATIONS.replace('"1m30s"', '"later"').replace('body_timeout = "45s"', 'body_timeout = "0s"')
                    .replace('heartbeat_timeout = "90m"', 'heartbeat_timeout = "90 minutes"')
                    .replace('{ wait = "1h30m" }', '{ wait = "1h30" }'))
    r = tocsin("check", "-c", str(path))
    assert r.returncode == 1
    problems = r.stderr.splitlines()
    assert "[daemon]: 'shutdown_timeout': duration 'later' is not like 90, 45s, 90m, 1h30m, 2d" in problems
    assert "[http]: 'body_timeout' must be positive" in problems
    assert ("integration 'hb': 'heartbeat_timeout': duration '90 minutes' is not like 90, 45s, 90m, 1h30m, 2d"
            in problems)
    assert "escalation 'slow' step 2: wait: duration '1h30' is not like 90, 45s, 90m, 1h30m, 2d" in problems
    assert len(problems) == 4, problems


async def test_api_maintenance_takes_a_duration(tocsin):
    status, body = await tocsin.api("POST", "integrations/wh/maintenance_start/",
                                    {"mode": "debug", "duration": "1h30m"})
    assert status == 200, body
    info = (await tocsin.daemon.store.maintenance())["wh"]
    assert info["ends_at"] - info["started_at"] == 5400
    status, body = await tocsin.api("POST", "integrations/fw/maintenance_start/", {"mode": "debug", "duration": "ages"})
    assert status == 400 and "duration" in body["error"]
