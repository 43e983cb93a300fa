"""Running as a service: systemd notify, reload, drain, metrics, rate limits, operator CLI."""
from __future__ import annotations

import asyncio
import json
import signal
import socket
import sqlite3
import subprocess
import sys
import time

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from conftest import API_TOKEN, ROOT, TOKEN, config_text, integration, write_config


def cli(*args):
    return subprocess.run([sys.executable, "-m", "daemon", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


def test_ready_sent_after_listeners_bound(spawn, tmp_path):
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(20)
    try:
        proc = spawn(env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"}, smtp=True)
        messages = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any("WATCHDOG=1" in m for m in messages):
            messages.append(sock.recv(4096).decode())
        ready = next(m for m in messages if "READY=1" in m)
        # READY names both bound ports, and they accept connections right away.
        assert f"http on port {proc.http_port}" in ready and f"smtp on port {proc.smtp_port}" in ready
        socket.create_connection(("127.0.0.1", proc.http_port), timeout=2).close()
        socket.create_connection(("127.0.0.1", proc.smtp_port), timeout=2).close()
        assert any("WATCHDOG=1" in m for m in messages)
        assert proc.stop() == 0
        rest = []
        sock.settimeout(2)
        try:
            while True:
                rest.append(sock.recv(4096).decode())
        except socket.timeout:
            pass
        assert any("STOPPING=1" in m for m in rest)
    finally:
        sock.close()


async def _names(base: str) -> dict:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{base}/api/v1/integrations/", headers={"Authorization": API_TOKEN}) as r:
            return {i["id"]: i["name"] for i in (await r.json())["results"]}


async def test_sighup_reload_and_refusal(spawn, tmp_path):
    proc = spawn()
    assert (await _names(proc.base))["fw"] == "Test formatted_webhook"
    cfg = tmp_path / "config.toml"
    cfg.write_text(cfg.read_text().replace('name = "Test formatted_webhook"', 'name = "Renamed"'))
    proc.proc.send_signal(signal.SIGHUP)
    for _ in range(50):
        await asyncio.sleep(0.1)
        if (await _names(proc.base))["fw"] == "Renamed":
            break
    assert (await _names(proc.base))["fw"] == "Renamed"

    cfg.write_text(cfg.read_text().replace('name = "Renamed"', 'name = "Broken"') + "\n[[integrations]]\nid = 3\n")
    proc.proc.send_signal(signal.SIGHUP)
    for _ in range(50):
        await asyncio.sleep(0.1)
        if any("reload refused" in line for line in proc.output):
            break
    assert any("reload refused" in line for line in proc.output)
    assert (await _names(proc.base))["fw"] == "Renamed"
    async with aiohttp.ClientSession() as s:  # and it still takes alerts
        async with s.post(f"{proc.base}/integrations/v1/formatted_webhook/{TOKEN['fw']}/",
                          json={"alert_uid": "after-reload"}) as r:
            assert r.status == 200
    assert proc.stop() == 0


async def test_sigterm_under_load_drains(spawn, tmp_path):
    proc = spawn()
    url = f"{proc.base}/integrations/v1/formatted_webhook/{TOKEN['fw']}/"
    accepted, statuses = [], []
    stop = asyncio.Event()

    async def client(n):
        async with aiohttp.ClientSession() as s:
            i = 0
            while not stop.is_set():
                i += 1
                try:
                    async with s.post(url, json={"alert_uid": f"c{n}-{i}"}) as r:
                        statuses.append(r.status)
                        if r.status == 200:
                            accepted.append((await r.json())["alert_id"])
                except (aiohttp.ClientError, ConnectionError, asyncio.TimeoutError):
                    await asyncio.sleep(0.02)  # refused or closed: acceptable, the sender retries

    tasks = [asyncio.create_task(client(n)) for n in range(16)]
    while len(accepted) < 200:
        await asyncio.sleep(0.02)
    proc.proc.send_signal(signal.SIGTERM)
    code = await asyncio.get_running_loop().run_in_executor(None, proc.proc.wait, 30)
    stop.set()
    await asyncio.gather(*tasks)
    assert code == 0
    assert all(s == 200 for s in statuses), f"non-200 answers during drain: {set(statuses)}"
    with sqlite3.connect(tmp_path / "tocsin.db") as db:
        stored = {r[0] for r in db.execute("SELECT id FROM alerts")}
    assert set(accepted) <= stored


async def _metrics(h) -> dict:
    async with h.session.get(f"{h.base}/metrics") as r:
        assert r.status == 200
        text = await r.text()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


async def test_metrics_count_what_was_sent(tocsin):
    for n in range(5):
        assert (await tocsin.post("fw", {"alert_uid": f"m{n}"}))[0] == 200
    await tocsin.post("fw", {"alert_uid": "m0", "state": "ok"})
    await tocsin.post("fw", b"{broken")
    await tocsin.post("zb", {"alert_uid": "z"}, token="no-such-token-1")
    m = await _metrics(tocsin)
    assert m[("tocsin_alerts_received_total", (("integration", "fw"), ("source", "http")))] == 6
    assert m[("tocsin_alerts_rejected_total",
              (("integration", "fw"), ("reason", "bad_body"), ("source", "http")))] == 1
    assert m[("tocsin_alerts_rejected_total",
              (("integration", "unknown"), ("reason", "unknown_token"), ("source", "http")))] == 1
    assert m[("tocsin_alert_groups_open", (("integration", "fw"), ("state", "new")))] == 4
    assert m[("tocsin_commit_batch_size_count", ())] >= 1
    assert ("process_resident_memory_bytes", ()) in m


async def test_template_errors_counted(start_tocsin):
    h = await start_tocsin(extra_integrations=integration(
        "broken", "webhook", "tok-broken-00001", '[integrations.templates]\ngrouping_id = "{{ payload.a.b.c }}"'))
    assert (await h.post("broken", {"x": 1}))[0] == 200
    m = await _metrics(h)
    assert m[("tocsin_template_errors_total", (("integration", "broken"), ("template", "grouping_id")))] == 1


async def test_rate_limit(start_tocsin):
    h = await start_tocsin(extra_integrations=integration(
        "limited", "formatted_webhook", "tok-limited-0001", 'rate_limit = "3/1m"'))
    for n in range(3):
        assert (await h.post("limited", {"alert_uid": f"r{n}"}))[0] == 200
    status, body = await h.post("limited", {"alert_uid": "r3"})
    assert status == 429 and "3/1m" in body["error"]
    url = f"{h.base}/integrations/v1/formatted_webhook/tok-limited-0001/"
    async with h.session.post(url, json={"alert_uid": "r4"}) as r:
        assert r.status == 429 and 1 <= int(r.headers["Retry-After"]) <= 60
    # a resolve signal is neither counted nor refused; another integration is unaffected
    assert (await h.post("limited", {"alert_uid": "r0", "state": "ok"}))[0] == 200
    assert (await h.post("fw", {"alert_uid": "other"}))[0] == 200
    with sqlite3.connect(h.daemon.config.daemon.database) as db:
        (n,) = db.execute("SELECT count(*) FROM alerts WHERE integration_id = 'limited'").fetchone()
    assert n == 4


def test_rate_limit_config_errors(tmp_path):
    cfg = write_config(tmp_path, daemon_extra='rate_limit = "lots"')
    r = cli("check", "-c", str(cfg))
    assert r.returncode == 1 and "is not N/period" in r.stderr


def test_new_integration_keeps_comments(tmp_path):
    cfg = tmp_path / "config.toml"
    cfg.write_text("# my precious comment\n" + config_text(tmp_path) + "# trailing note\n")
    r = cli("new-integration", "-c", str(cfg), "--kind", "alertmanager", "--name", "Prod Prometheus")
    assert r.returncode == 0, r.stderr
    text = cfg.read_text()
    assert "# my precious comment" in text and "# trailing note" in text
    url = next(line for line in r.stdout.splitlines() if line.startswith("url:"))
    token = url.rstrip("/").rsplit("/", 1)[1]
    assert len(token) == 32 and int(token, 16) >= 0  # 128 bits
    assert 'id = "prod-prometheus"' in text and token in text
    assert cli("check", "-c", str(cfg)).returncode == 0
    r = cli("new-integration", "-c", str(cfg), "--kind", "nope", "--name", "x")
    assert r.returncode == 1


async def test_operator_commands_and_backup(tocsin, tmp_path):
    _, res = await tocsin.post("fw", {"alert_uid": "op1", "title": "Disk full"})
    gid = res["alert_group_id"]
    cfg = str(tocsin.config_path)
    r = await asyncio.to_thread(cli, "groups", "-c", cfg)
    assert gid in r.stdout and "Disk full" in r.stdout
    r = await asyncio.to_thread(cli, "ack", "-c", cfg, gid)
    assert r.returncode == 0 and "acknowledged" in r.stdout
    r = await asyncio.to_thread(cli, "silence", "-c", cfg, gid)
    assert r.returncode == 1 and "Can't silence an acknowledged alert group" in r.stderr
    r = await asyncio.to_thread(cli, "resolve", "-c", cfg, gid)
    assert r.returncode == 0
    status, g = await tocsin.api("GET", f"alert_groups/{gid}/")
    assert g["state"] == "resolved"
    r = await asyncio.to_thread(cli, "groups", "-c", cfg, "--state", "resolved", "--json")
    assert json.loads(r.stdout)[0]["id"] == gid
    r = await asyncio.to_thread(cli, "demo", "-c", cfg, "--integration", "am")
    assert r.returncode == 0, r.stderr
    r2 = await asyncio.to_thread(cli, "demo", "-c", cfg, "--integration", "am")
    assert json.loads(r.stdout)["alert_group_id"] != json.loads(r2.stdout)["alert_group_id"]  # never grouped
    backup = tmp_path / "backup.db"
    r = await asyncio.to_thread(cli, "backup", "-c", cfg, str(backup))
    assert r.returncode == 0, r.stderr
    with sqlite3.connect(backup) as db:
        assert db.execute("SELECT count(*) FROM alerts").fetchone()[0] == 3


async def test_retention_prunes_old_resolved_groups(tocsin):
    _, old = await tocsin.post("fw", {"alert_uid": "old", "state": "ok"})
    _, fresh = await tocsin.post("fw", {"alert_uid": "fresh"})
    store = tocsin.daemon.store
    pruned = await store.prune(time.time() + 1)
    assert pruned == 1
    assert await store.get_group(old["alert_group_id"]) is None
    assert await store.get_group(fresh["alert_group_id"]) is not None
    count, _ = await store.list_alerts(alert_group_id=old["alert_group_id"])
    assert count == 0


async def test_health_endpoints(tocsin):
    async with tocsin.session.get(f"{tocsin.base}/healthz") as r:
        assert r.status == 200
    async with tocsin.session.get(f"{tocsin.base}/readyz") as r:
        assert r.status == 200
    await tocsin.daemon.store.close()
    async with tocsin.session.get(f"{tocsin.base}/readyz") as r:
        assert r.status == 503


async def test_slow_body_gets_408_and_its_slot_back(start_tocsin):
    # (Idle sockets at the connection cap are evicted, not refused: tests/test_edges.py.)
    h = await start_tocsin(http_extra="max_connections = 5\nbody_timeout = 0.5")
    # A client that stalls in its body gets 408 and its slot back.
    reader, writer = await asyncio.open_connection("127.0.0.1", h.daemon.http_port)
    writer.write(f"POST /integrations/v1/formatted_webhook/{TOKEN['fw']}/ HTTP/1.1\r\nHost: x\r\n"
                 "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"a\":".encode())
    answer = await asyncio.wait_for(reader.read(200), 5)
    assert answer.startswith(b"HTTP/1.1 408")
    writer.close()
    assert (await h.post("fw", {"alert_uid": "after"}))[0] == 200


def test_json_logs_are_one_object_per_line(spawn):
    proc = spawn(daemon_extra='log_format = "json"')
    assert proc.stop() == 0
    lines = [line for line in proc.output if line.strip()]
    assert len(lines) >= 3
    events = [json.loads(line) for line in lines]
    assert all(set(e) >= {"ts", "level", "logger", "msg"} for e in events)
    assert any(e["msg"].startswith("tocsin ready") for e in events)


async def test_reload_applies_new_smtp_domains(start_tocsin):
    import smtplib

    h = await start_tocsin(smtp=True)
    port = h.daemon.smtp_port
    to = f"{TOKEN['mail']}@alerts.example.org"

    def send():
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
            try:
                s.sendmail("dev@example.com", [to], b"Subject: reload\r\n\r\nbody\r\n")
                return 250
            except smtplib.SMTPRecipientsRefused as exc:
                return exc.recipients[to][0]

    assert await asyncio.to_thread(send) == 550
    text = h.config_path.read_text().replace('domain = "alerts.example.com"',
                                             'domain = "alerts.example.com"\nextra_domains = ["alerts.example.org"]')
    h.config_path.write_text(text)
    assert h.daemon.reload(h.config_path)
    assert await asyncio.to_thread(send) == 250
