"""`tocsin import-oncall`: Grafana OnCall's saved or live API answers become config.toml blocks."""
from __future__ import annotations

import asyncio
import json
import shutil
import smtplib
import sys
from email.message import EmailMessage
from pathlib import Path

import aiohttp
from aiohttp import web

from conftest import ROOT, Harness

from daemon.app import Daemon, load_config

SAVED = Path(__file__).parent / "data" / "oncall"
COLLECTIONS = ("integrations", "routes", "escalation_chains", "escalation_policies", "webhooks")
ONCALL_TOKEN = "oncall-api-token-1"

# Every integration of the saved export that has a tocsin kind, with its old URL kind and token.
OLD_URLS = [
    ("alertmanager", "mReAoNwDm0eMwKo1mTeTwYo"),
    ("webhook", "Yk2qtUmD8wsQ3bPZxV7cN1rAe"),
    ("zabbix", "Zb1x2c3v4b5n6m7a8s9d0f1g2"),
    ("alertmanager", "La9s8d7f6g5h4j3k2l1z0x9c8"),
]
MAIL_TOKEN = "Nq4cWm2XbT9sRk8vLp3zHd6yE"


def base_config(tmp_path: Path) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(f"""# my tocsin: hand-written comment that must survive
[daemon]
database = "{tmp_path / 'tocsin.db'}"   # keep this comment too
[http]
listen = "127.0.0.1:0"
[smtp]
listen = "127.0.0.1:0"
domain = "alerts.example.com"
extra_domains = ["inbound.oncall.example.com"]
[api]
tokens = ["api-token-1"]

[[integrations]]
id = "existing"
kind = "webhook"
token = "existing-token-0001"
""")
    return path


async def tocsin(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "daemon", *args, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode, out.decode(), err.decode()


async def test_import_from_saved_answers_serves_every_old_url(tmp_path):
    config = base_config(tmp_path)
    code, out, err = await tocsin("import-oncall", "-c", str(config), "--from", str(SAVED))
    assert code == 0, err
    text = config.read_text()
    assert "# my tocsin: hand-written comment that must survive" in text
    assert "# keep this comment too" in text
    for _, token in OLD_URLS:
        assert f'token = "{token}"' in text
    # The report names what was left out, and the file keeps it as a comment where it stood.
    for left_out in ("notify_persons (U4DNY931HHJS5, U6RV9WPSL6DFW)", "'Direct paging': not imported",
                     "authorization_header is masked", "grafana_oncall_link", "slack templates (title)",
                     "escalation chain 'people only': no step has a tocsin equivalent", "uses variables tocsin lacks: labels",
                     "telegram channel not imported"):
        assert left_out in out, (left_out, out)
    assert "# oncall: notify_persons (U4DNY931HHJS5, U6RV9WPSL6DFW): no tocsin equivalent" in text
    assert "# oncall: integration 'Direct paging' (direct_paging) not imported" in text

    code, _, err = await tocsin("check", "-c", str(config))
    assert code == 0, err
    loaded = load_config(config)
    prom = loaded.integration("prometheus-prod")
    assert [(r.condition is not None, r.regex, r.escalation) for r in prom.routes] == [
        (True, None, "page-ops"), (False, '"team": "dba"', "dba"), (False, None, "page-ops")]
    chains = {c.name: c for c in loaded.escalations}
    assert [s.kind for s in chains["page-ops"].steps] == ["notify", "wait", "if_time", "notify", "repeat"]
    assert chains["page-ops"].steps[1].seconds == 300 and chains["page-ops"].steps[4].times == 5
    assert [s.kind for s in chains["dba"].steps] == ["if_alerts_in_window", "resolve", "wait"]
    assert {n.name: n.url for n in loaded.notifiers}["oncall-ops-hook"] == "http://127.0.0.1:9/ops"

    daemon = Daemon(loaded)
    await daemon.start()
    try:
        async with aiohttp.ClientSession() as session:
            h = Harness(daemon, session, config)
            for kind, token in OLD_URLS:
                async with session.post(f"{h.base}/integrations/v1/{kind}/{token}/",
                                        json={"status": "firing", "service": "db"}) as r:
                    assert r.status == 200, (kind, await r.text())
        msg = EmailMessage()
        msg["From"], msg["To"], msg["Subject"] = "ups@example.com", f"{MAIL_TOKEN}@inbound.oncall.example.com", "On battery"
        msg.set_content("UPS on battery")
        await asyncio.to_thread(_send, daemon.smtp_port, msg)
    finally:
        await daemon.stop()


def _send(port: int, msg: EmailMessage) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        refused = s.send_message(msg)
    assert refused == {}


async def test_render_gives_what_oncall_gave(tmp_path):
    config = base_config(tmp_path)
    assert (await tocsin("import-oncall", "-c", str(config), "--from", str(SAVED)))[0] == 0
    payload = tmp_path / "p.json"
    payload.write_text(json.dumps({"service": "billing", "text": "queue stuck", "state": "ack"}))
    code, out, err = await tocsin("render", "-c", str(config), "--integration", "deploy-scripts", str(payload))
    assert code == 0, err
    got = json.loads(out)
    # OnCall: grouping_key "{{ payload.service }}", acknowledge "{{ payload.state == "ack" }}", web title.
    assert got["grouping_id"] == "billing" and got["acknowledge"] is True and got["resolve"] is False
    assert got["title"] == "billing: queue stuck"


async def test_rerun_skips_and_dry_run_writes_nothing(tmp_path):
    config = base_config(tmp_path)
    assert (await tocsin("import-oncall", "-c", str(config), "--from", str(SAVED)))[0] == 0
    after_first = config.read_bytes()
    code, out, _ = await tocsin("import-oncall", "-c", str(config), "--from", str(SAVED))
    assert code == 0
    assert "'Prometheus (prod)': skipped, its token is already configured (integration 'prometheus-prod')" in out
    assert "nothing to add" in out and config.read_bytes() == after_first

    (tmp_path / "dry").mkdir()
    fresh = base_config(tmp_path / "dry")
    before = fresh.read_bytes()
    code, out, _ = await tocsin("import-oncall", "-c", str(fresh), "--from", str(SAVED), "--dry-run")
    assert code == 0 and "[[escalations]]" in out and 'token = "mReAoNwDm0eMwKo1mTeTwYo"' in out
    assert fresh.read_bytes() == before


def _pages(items: list, size: int = 2):
    return [items[i:i + size] for i in range(0, len(items), size)] or [[]]


async def fake_oncall(saved: Path, seen: list[str]) -> web.AppRunner:
    """Grafana OnCall's public API over the saved answers, two objects a page, token checked."""
    data = {}
    for name in COLLECTIONS:
        document = json.loads((saved / f"{name}.json").read_text())
        data[name] = document["results"] if isinstance(document, dict) else document

    async def collection(request: web.Request) -> web.Response:
        seen.append(f"{request.method} {request.path_qs}")
        if request.headers.get("Authorization") != ONCALL_TOKEN:
            return web.json_response({"detail": "Invalid token."}, status=401)
        pages = _pages(data[request.match_info["name"]])
        n = int(request.query.get("page", "1"))
        nxt = str(request.url.with_query(page=n + 1)) if n < len(pages) else None
        return web.json_response({"count": sum(map(len, pages)), "next": nxt, "previous": None,
                                  "results": pages[n - 1]})

    app = web.Application()
    app.router.add_get("/oncall/api/v1/{name}/", collection)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner


async def test_import_from_a_running_oncall_follows_every_page(tmp_path):
    seen: list[str] = []
    runner = await fake_oncall(SAVED, seen)
    port = runner.addresses[0][1]
    try:
        config = base_config(tmp_path)
        before = config.read_bytes()
        code, _, err = await tocsin("import-oncall", "-c", str(config), "--url", f"http://127.0.0.1:{port}/oncall",
                                    "--token", "wrong-token")
        assert code == 1 and "refused the token (HTTP 401" in err and config.read_bytes() == before

        code, out, err = await tocsin("import-oncall", "-c", str(config), "--url", f"http://127.0.0.1:{port}/oncall",
                                      "--token", ONCALL_TOKEN)
        assert code == 0, err
    finally:
        await runner.cleanup()
    assert all(s.startswith("GET ") for s in seen)
    # 6 integrations at two a page: three pages, the last one reached through `next`.
    assert "GET /oncall/api/v1/integrations/?page=3" in seen
    from_dir = tmp_path / "from-dir"
    from_dir.mkdir()
    other = base_config(from_dir)
    assert (await tocsin("import-oncall", "-c", str(other), "--from", str(SAVED)))[0] == 0
    imported = lambda p: p.read_text().split("by tocsin import-oncall ----", 1)[1]  # noqa: E731
    assert imported(config) == imported(other)
    assert (await tocsin("check", "-c", str(config)))[0] == 0


async def test_unreachable_oncall_and_bad_export_leave_the_file_untouched(tmp_path):
    config = base_config(tmp_path)
    before = config.read_bytes()
    # A port nobody listens on: bind one, close it, use its number.
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    code, _, err = await tocsin("import-oncall", "-c", str(config), "--url", f"http://127.0.0.1:{port}",
                                "--token", ONCALL_TOKEN)
    assert code == 1 and "cannot reach OnCall" in err and "Traceback" not in err
    broken = tmp_path / "broken"
    shutil.copytree(SAVED, broken)
    (broken / "routes.json").write_text("{not json")
    code, _, err = await tocsin("import-oncall", "-c", str(config), "--from", str(broken))
    assert code == 1 and "routes.json" in err and "Traceback" not in err
    assert config.read_bytes() == before
