"""IMAP mailboxes against a real Dovecot on loopback, run as our own instance in a temp dir."""
from __future__ import annotations

import asyncio
import imaplib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from email.message import EmailMessage
from pathlib import Path

import aiohttp
import pytest

from conftest import API_TOKEN, config_text, require

DOVECOT = shutil.which("dovecot") or "/usr/sbin/dovecot"
USER, PASSWORD = "alerts", "imap-secret-1"
TOKEN = "tok-imap-mailbox-1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Dovecot:
    """A private Dovecot: one user, Maildir under the test's temp dir, plain IMAP on loopback."""

    def __init__(self, root: Path):
        self.root = root
        self.port = _free_port()
        self.proc: subprocess.Popen | None = None
        for d in ("run", "state", "home"):
            (root / d).mkdir(parents=True, exist_ok=True)
        uid, gid = (65534, 65534) if os.geteuid() == 0 else (os.getuid(), os.getgid())
        if os.geteuid() == 0:
            os.chown(root / "home", uid, gid)
        (root / "passwd").write_text(f"{USER}:{{PLAIN}}{PASSWORD}\n")
        users = "" if os.geteuid() == 0 else (
            f"default_internal_user = {os.environ.get('USER', 'nobody')}\n"
            f"default_login_user = {os.environ.get('USER', 'nobody')}\n")
        (root / "dovecot.conf").write_text(f"""
base_dir = {root}/run
state_dir = {root}/state
log_path = {root}/dovecot.log
{users}protocols = imap
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
first_valid_uid = 1
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {root}/passwd
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={root}/home/%u
}}
mail_location = maildir:~/Maildir
namespace inbox {{
  inbox = yes
  mailbox Done {{
    auto = create
  }}
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {self.port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service stats {{
  unix_listener stats-reader {{
    mode = 0666
  }}
  unix_listener stats-writer {{
    mode = 0666
  }}
}}
""")

    def start(self) -> None:
        # Its own process group: stop() ends the open IMAP sessions too, as a server going away does.
        self.proc = subprocess.Popen([DOVECOT, "-F", "-c", str(self.root / "dovecot.conf")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"dovecot exited: {self.proc.stderr.read().decode()}")
                time.sleep(0.05)
        raise RuntimeError("dovecot did not listen")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=15)

    def client(self) -> imaplib.IMAP4:
        m = imaplib.IMAP4("127.0.0.1", self.port, timeout=10)
        m.login(USER, PASSWORD)
        return m

    def deliver(self, subject: str, body: str = "UPS on battery", folder: str = "INBOX") -> None:
        msg = EmailMessage()
        msg["From"], msg["To"], msg["Subject"] = "ups@example.com", "alerts@example.com", subject
        msg.set_content(body)
        m = self.client()
        try:
            status, _ = m.append(folder, None, None, msg.as_bytes())
            assert status == "OK"
        finally:
            m.logout()

    def uids(self, folder: str = "INBOX", criterion: str = "ALL") -> list[int]:
        m = self.client()
        try:
            m.select(folder)
            _, data = m.uid("search", None, criterion)
            return [int(x) for x in data[0].split()]
        finally:
            m.logout()


@pytest.fixture
def dovecot():
    require(os.path.exists(DOVECOT), "dovecot is not installed: `make test` installs dovecot-imapd")
    # Dovecot's own processes (other users) must reach these files: pytest's temp dirs are 0700.
    root = Path(tempfile.mkdtemp(prefix="tocsin-dovecot-"))
    root.chmod(0o755)
    server = Dovecot(root)
    server.start()
    yield server
    server.stop()
    shutil.rmtree(root, ignore_errors=True)


def write_imap_config(tmp_path: Path, dovecot: Dovecot, after: str = "seen", poll: str = "30s") -> Path:
    (tmp_path / "imap-password").write_text(PASSWORD + "\n")
    extra = f"""
[[integrations]]
id = "ups"
kind = "inbound_email"
token = "{TOKEN}"
imap = {{ url = "imap://{USER}@127.0.0.1:{dovecot.port}/INBOX", password_file = "imap-password", after = "{after}", poll = "{poll}" }}
[integrations.templates]
grouping_id = "{{{{ payload.subject }}}}"
"""
    path = tmp_path / "config.toml"
    path.write_text(config_text(tmp_path, extra_integrations=extra))
    return path


async def _get(base: str, path: str) -> dict:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{base}{path}", headers={"Authorization": API_TOKEN},
                         timeout=aiohttp.ClientTimeout(total=10)) as r:
            return json.loads(await r.text()) | {"_status": r.status}


async def titles(base: str) -> list[str]:
    body = await _get(base, "/api/v1/alert_groups/?integration_id=ups&perpage=200")
    return sorted(g["title"] for g in body["results"])


async def alerts_count(base: str) -> int:
    body = await _get(base, "/api/v1/alert_groups/?integration_id=ups&perpage=200")
    return sum(g["alerts_count"] for g in body["results"])


async def wait_for(predicate, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.1)


async def test_mails_in_alerts_out_while_down_and_by_idle(tmp_path, dovecot, spawn):
    # Mail that arrived while tocsin was down.
    dovecot.deliver("PROBLEM disk full")
    dovecot.deliver("PROBLEM load high")
    daemon = spawn(write_imap_config(tmp_path, dovecot, after="seen", poll="300s"))
    expect = ["PROBLEM disk full", "PROBLEM load high"]
    assert await wait_for(lambda: _equal(titles(daemon.base), expect)), await titles(daemon.base)
    assert dovecot.uids(criterion="UNSEEN") == []  # `after = "seen"`, applied after the commit
    # A new mail while running: IDLE wakes the reader; the 300 s poll would not.
    dovecot.deliver("PROBLEM fan failed")
    expect = sorted(expect + ["PROBLEM fan failed"])
    assert await wait_for(lambda: _equal(titles(daemon.base), expect), 10), await titles(daemon.base)
    health = await _get(daemon.base, "/healthz")
    assert health["mailboxes"]["ups"]["state"] == "connected"
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{daemon.base}/metrics") as r:
            text = await r.text()
    assert 'tocsin_imap_mailbox_up{integration="ups"} 1.0' in text
    assert 'tocsin_imap_messages_total{integration="ups",outcome="stored"} 3.0' in text


async def _equal(coroutine, expected) -> bool:
    return await coroutine == expected


async def test_sigkill_after_commit_neither_loses_nor_doubles(tmp_path, dovecot, spawn):
    # `after = "move:Archive"` to a folder that does not exist yet: every alert commits, and then
    # moving fails, so the process holds committed messages whose `after` never ran. Kill it there.
    for n in range(5):
        dovecot.deliver(f"PROBLEM host{n} down")
    config = write_imap_config(tmp_path, dovecot, after="move:Archive", poll="1s")
    daemon = spawn(config)
    assert await wait_for(lambda: _count_is(daemon.base, 1), 20)
    await asyncio.sleep(1.5)  # a retry or two of the failing move
    daemon.stop(signal.SIGKILL)
    assert len(dovecot.uids()) == 5  # nothing was moved: `after` failed every time
    m = dovecot.client()
    assert m.create("Archive")[0] == "OK"
    m.logout()
    daemon = spawn(config)
    # Every message becomes exactly one alert, across the kill, and each is moved once stored.
    assert await wait_for(lambda: _moved(dovecot, 5), 20), (dovecot.uids(), dovecot.uids("Archive"))
    assert await alerts_count(daemon.base) == 5
    assert len(await titles(daemon.base)) == 5

    # A kill under load at an arbitrary instant: nothing lost, nothing doubled.
    for n in range(20):
        dovecot.deliver(f"PROBLEM burst {n}")
    assert await wait_for(lambda: _count_at_least(daemon.base, 7), 20)
    daemon.stop(signal.SIGKILL)
    daemon = spawn(config)
    assert await wait_for(lambda: _moved(dovecot, 25), 30), (dovecot.uids(), len(dovecot.uids("Archive")))
    assert await wait_for(lambda: _count_is(daemon.base, 25), 10)
    await asyncio.sleep(1.5)  # another poll: still no doubles
    assert await alerts_count(daemon.base) == 25


async def _count_is(base: str, n: int) -> bool:
    return await alerts_count(base) == n


async def _count_at_least(base: str, n: int) -> bool:
    return await alerts_count(base) >= n


async def _moved(dovecot: Dovecot, n: int) -> bool:
    return dovecot.uids() == [] and len(dovecot.uids("Archive")) == n


async def test_server_going_away_and_back(tmp_path, dovecot, spawn):
    daemon = spawn(write_imap_config(tmp_path, dovecot, after="delete", poll="1s"))
    dovecot.deliver("PROBLEM before outage")
    assert await wait_for(lambda: _count_is(daemon.base, 1), 15)
    assert await wait_for(lambda: _empty(dovecot), 10)  # `after = "delete"`
    dovecot.stop()

    async def unreachable() -> bool:
        return (await _get(daemon.base, "/healthz"))["mailboxes"]["ups"]["state"] == "unreachable"

    assert await wait_for(unreachable, 15)
    # Shown in the health detail and the metrics, never in /readyz: HTTP and SMTP intake still work.
    assert (await _get(daemon.base, "/readyz"))["_status"] == 200
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{daemon.base}/metrics") as r:
            assert 'tocsin_imap_mailbox_up{integration="ups"} 0.0' in await r.text()
    dovecot.start()
    dovecot.deliver("PROBLEM after outage")
    # Reconnect backoff is capped at 30 s; here the outage is short, so it is back within seconds.
    assert await wait_for(lambda: _count_is(daemon.base, 2), 35)
    assert sorted(await titles(daemon.base)) == ["PROBLEM after outage", "PROBLEM before outage"]


async def _empty(dovecot: Dovecot) -> bool:
    return dovecot.uids() == []


def test_imap_config_errors(tmp_path):
    from daemon.app import load_config
    from daemon.config import ConfigError

    (tmp_path / "pw").write_text("x\n")
    extra = """
[[integrations]]
id = "bad1"
kind = "webhook"
token = "tok-bad-imap-1"
imap = { url = "imaps://u@h/INBOX", password_file = "pw" }
[[integrations]]
id = "bad2"
kind = "inbound_email"
token = "tok-bad-imap-2"
imap = { url = "pop3://u@h/INBOX", password_file = "pw" }
[[integrations]]
id = "bad3"
kind = "inbound_email"
token = "tok-bad-imap-3"
imap = { url = "imaps://u:secret@h/INBOX", password_file = "missing", after = "archive" }
"""
    path = tmp_path / "config.toml"
    path.write_text(config_text(tmp_path, extra_integrations=extra))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = "\n".join(err.value.problems)
    assert "integration 'bad1': 'imap' applies to inbound_email integrations only" in text
    assert "integration 'bad2' imap: url must be imaps://" in text
    assert "put the password in password_file" in text
    assert "cannot read password_file" in text
    assert "'after' must be" in text
