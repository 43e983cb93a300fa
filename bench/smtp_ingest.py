"""SMTP ingestion benchmark: tocsin (parse + durable commit) against a bare aiosmtpd.

Both servers run as child processes on 127.0.0.1: `python -m daemon serve` on a temp
SQLite file, and a stock aiosmtpd whose handler only answers 250. One client process
drives each in turn with ~3 KB multipart/alternative mails from concurrent clients,
in two cases: one message per connection (connect, EHLO, MAIL, RCPT, DATA, QUIT) and
many messages per connection. Prints messages/s, p50/p99 latency (per message,
including the connection for the first case), server CPU per message, peak RSS and
tocsin's share of the bare rate. Rounds are interleaved and the best is reported, as
the figures swing on a shared machine; the CPU per message is the steadier figure.

    .venv/bin/python bench/smtp_ingest.py [--messages 3000] [--clients 32] [--per-connection 50] [--rounds 2]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import sys
import tempfile
import time
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from http_ingest import rss_mib, start  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "bench-mail-token-01"
DOMAIN = "alerts.example.com"
CASE_SECONDS = 120  # a case that takes longer than this is cut short and reported as such

# Stock aiosmtpd, configured as tocsin configures it where it costs: a fixed hostname
# (else a DNS lookup per connection) and its per-command INFO logging off.
BARE_SERVER = r"""
import asyncio, logging
from aiosmtpd.smtp import SMTP

logging.getLogger("mail.log").setLevel(logging.WARNING)

class Answer250:
    async def handle_DATA(self, server, session, envelope):
        return "250 OK"

async def main():
    loop = asyncio.get_running_loop()
    handler = Answer250()
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="bare.example.com", loop=loop), "127.0.0.1", 0)
    print("ready port", server.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


def message(n: int) -> bytes:
    """~3 KB multipart/alternative alert mail, CRLF, dot-stuffed, ending with the final dot."""
    mail = MIMEMultipart("alternative")
    mail["From"] = "Zabbix <zabbix@zbx.example.com>"
    mail["To"] = f"{TOKEN}@{DOMAIN}"
    mail["Subject"] = f"Problem: High CPU utilization on app{n % 200:03d}"
    mail["Date"] = "Sun, 22 Nov 2026 03:04:05 +0000"
    mail["Message-ID"] = f"<bench.{n}@zbx.example.com>"
    lines = [f"Problem started at 03:04:05 on 2026.11.22 (event {n})", "Problem name: High CPU utilization",
             f"Host: app{n % 200:03d}", "Severity: Warning", "Operational data: 97.3 %"]
    lines += [f"Item {i}: system.cpu.util[,user] = {i * 7 % 100} % (threshold 90 %)" for i in range(16)]
    text = "\n".join(lines) + "\n"
    mail.attach(MIMEText(text, "plain", "utf-8"))
    mail.attach(MIMEText("<html><body><p>" + text.replace("\n", "<br>\n") + "</p></body></html>", "html", "utf-8"))
    raw = mail.as_bytes().replace(b"\r\n", b"\n").split(b"\n")
    return b"".join((b"." + l if l.startswith(b".") else l) + b"\r\n" for l in raw) + b".\r\n"


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Session:
    """A minimal SMTP client: one reply per command, no pipelining."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> "Session":
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
        session = cls(reader, writer)
        await session.expect(b"220")
        await session.command(b"EHLO bench.example.net", b"250")
        return session

    async def expect(self, code: bytes) -> None:
        while True:
            line = await asyncio.wait_for(self.reader.readline(), 30)
            if line[3:4] != b"-":
                if not line.startswith(code):
                    raise RuntimeError(f"expected {code!r}, got {line!r}")
                return

    async def command(self, line: bytes, code: bytes) -> None:
        self.writer.write(line + b"\r\n")
        await self.expect(code)

    async def send(self, data: bytes) -> None:
        await self.command(b"MAIL FROM:<zabbix@zbx.example.com>", b"250")
        await self.command(f"RCPT TO:<{TOKEN}@{DOMAIN}>".encode(), b"250")
        await self.command(b"DATA", b"354")
        self.writer.write(data)
        await self.expect(b"250")

    async def close(self) -> None:
        try:
            await self.command(b"QUIT", b"221")
        finally:
            self.writer.close()


async def drive(port: int, total: int, clients: int, per_connection: int) -> dict:
    """Send `total` messages; per_connection=1 opens a connection for each."""
    mails = [message(n) for n in range(200)]
    counter = iter(range(total))
    latencies: list[float] = []
    errors = 0
    deadline = time.monotonic() + CASE_SECONDS

    async def client() -> None:
        nonlocal errors
        session = None
        sent_on_session = 0
        for n in counter:
            if time.monotonic() > deadline:
                break
            t0 = time.perf_counter()
            try:
                if session is None:
                    session = await Session.open(port)
                await session.send(mails[n % len(mails)])
                sent_on_session += 1
                if sent_on_session >= per_connection:
                    await session.close()
                    session, sent_on_session = None, 0
            except (OSError, RuntimeError, asyncio.TimeoutError):
                errors += 1
                if session is not None:
                    session.writer.close()
                session, sent_on_session = None, 0
                continue
            latencies.append(time.perf_counter() - t0)
        if session is not None:
            await session.close()

    warm = await Session.open(port)  # warm-up: imports, first connection, first commit
    for n in range(20):
        await warm.send(mails[n])
    await warm.close()
    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "rate": len(latencies) / elapsed,
        "sent": len(latencies),
        "p50": latencies[len(latencies) // 2] * 1000 if latencies else 0.0,
        "p99": latencies[int(len(latencies) * 0.99)] * 1000 if latencies else 0.0,
        "errors": errors,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=3000, help="messages per case")
    ap.add_argument("--clients", type=int, default=32, help="concurrent SMTP clients")
    ap.add_argument("--per-connection", type=int, default=50, help="messages per connection, second case")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the best is reported")
    args = ap.parse_args()

    cases = [("1 msg/conn", 1), (f"{args.per_connection} msg/conn", args.per_connection)]
    runs: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "config.toml"
        cfg.write_text(
            f'[daemon]\ndatabase = "{tmp}/bench.db"\nlog_level = "INFO"\n'
            '[http]\nlisten = "127.0.0.1:0"\n'
            f'[smtp]\nlisten = "127.0.0.1:0"\ndomain = "{DOMAIN}"\nmax_sessions = 1000\n'
            '[api]\ntokens = ["x"]\n'
            f'[[integrations]]\nid = "bench"\nkind = "inbound_email"\ntoken = "{TOKEN}"\n'
        )
        servers = {
            "bare aiosmtpd": start([sys.executable, "-c", BARE_SERVER], r"ready port (\d+)"),
            "tocsin": start([sys.executable, "-m", "daemon", "serve", "-c", str(cfg)],
                            r"tocsin ready.*? smtp=[^ ]+:(\d+)"),
        }
        try:
            # Interleaved, so both servers see the same background load on a shared machine.
            for _ in range(args.rounds):
                for case, per_connection in cases:
                    for name, (proc, port) in servers.items():
                        cpu = cpu_seconds(proc.pid)
                        r = asyncio.run(drive(port, args.messages, args.clients, per_connection))
                        r["cpu"] = (cpu_seconds(proc.pid) - cpu) / max(1, r["sent"] + 20) * 1000
                        r["rss"] = rss_mib(proc.pid)[1]
                        runs.setdefault((name, case), []).append(r)
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(timeout=60)
        with sqlite3.connect(Path(tmp) / "bench.db") as db:
            stored = db.execute("SELECT count(*) FROM alerts").fetchone()[0]

    best = {key: max(rs, key=lambda r: r["rate"]) for key, rs in runs.items()}
    print(f"{args.messages} messages per case of ~{len(message(0))} bytes (multipart/alternative), "
          f"{args.clients} concurrent clients, {os.cpu_count()} cores, loopback; "
          f"best of {args.rounds} interleaved rounds")
    print(f"{'server':<15}{'case':<13}{'msg/s':>8}{'p50 ms':>9}{'p99 ms':>9}{'CPU ms/msg':>12}"
          f"{'peak RSS':>10}{'errors':>8}   all rounds msg/s")
    for (name, case), r in best.items():
        short = "" if r["sent"] >= args.messages else f"  (cut at {CASE_SECONDS}s: {r['sent']} sent)"
        every = " ".join(f"{x['rate']:.0f}" for x in runs[(name, case)])
        print(f"{name:<15}{case:<13}{r['rate']:>8.0f}{r['p50']:>9.1f}{r['p99']:>9.1f}{r['cpu']:>12.2f}"
              f"{r['rss']:>9.0f}M{r['errors']:>8}   {every}{short}")
    for case, _ in cases:
        bare, ours = best[("bare aiosmtpd", case)], best[("tocsin", case)]
        print(f"ratio tocsin/bare, {case}: {ours['rate'] / bare['rate']:.2f} msg/s, "
              f"{bare['cpu'] / ours['cpu']:.2f} by CPU per message"
              + ("  (target >= 0.40)" if case.startswith("1 ") else ""))
    sent = sum(r["sent"] + 20 for (name, _), rs in runs.items() if name == "tocsin" for r in rs)
    print(f"tocsin stored {stored} alerts of {sent} sent (warm-ups included), each 250 after its commit")


if __name__ == "__main__":
    main()
