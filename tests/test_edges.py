"""The HTTP edge over real sockets on 127.0.0.1: JSON for every refusal, strict JSON
bodies, deadlines for heads, bodies and idle connections, the connection cap, and
large legal bodies."""
from __future__ import annotations

import asyncio
import gc
import json
import logging

import aiohttp
import pytest

from conftest import API_TOKEN, TOKEN
from daemon.config import ConfigError, parse
from handlers.edge import dumps

IO = 5  # seconds: bound on every network wait


def url(h, iid: str) -> str:
    kind = {"fw": "formatted_webhook", "wh": "webhook", "gl": "grafana"}[iid]
    return f"{h.base}/integrations/v1/{kind}/{TOKEN[iid]}/"


async def exchange(port: int, data: bytes, *, shut: bool = False) -> bytes:
    """Send raw bytes, read until the server closes (bounded)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    if shut:
        writer.write_eof()
    try:
        return await asyncio.wait_for(reader.read(), IO)
    finally:
        writer.close()


async def first_answer(port: int, data: bytes) -> tuple[int, dict]:
    """Send raw bytes, read one response (head and Content-Length body), bounded."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), IO)
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length")))
        return split(head + await asyncio.wait_for(reader.readexactly(length), IO))
    finally:
        writer.close()


def split(answer: bytes) -> tuple[int, dict]:
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body)


async def stored(h) -> int:
    status, body = await h.api("GET", "alerts/?perpage=1")
    assert status == 200, body
    return body["count"]


# --- every refusal is JSON ---------------------------------------------------------


@pytest.mark.parametrize("method,path,code", [
    ("GET", "/integrations/v1/webhook/{wh}/", 405),
    ("PUT", "/integrations/v1/webhook/{wh}/", 405),
    ("POST", "/integrations/v2/nothing/", 404),
    ("GET", "/integrations/", 404),
    ("GET", "/api/v1/no_such_thing/", 404),
    ("DELETE", "/api/v1/alert_groups/", 405),
])
async def test_404_and_405_are_json(tocsin, method, path, code):
    async with tocsin.session.request(method, tocsin.base + path.format(wh=TOKEN["wh"]),
                                      headers={"Authorization": API_TOKEN}) as r:
        assert r.status == code
        assert r.content_type == "application/json"
        body = await r.json()
        assert set(body) == {"error"} and body["error"]
        if code == 405:
            assert "Allow" in r.headers


@pytest.mark.parametrize("raw", [
    b"GARBAGE\r\n\r\n",
    b"GET /integrations/ HTTP/1.1\r\nHost: x\r\nBad Header Line\r\n\r\n",
    b"POST /integrations/v1/webhook/x/ HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
])
async def test_unparseable_requests_get_json_400_and_one_short_log_line(tocsin, caplog, raw):
    caplog.set_level(logging.INFO)
    status, body = split(await exchange(tocsin.daemon.http_port, raw))
    assert 400 <= status < 500 and body["error"]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []  # aiohttp's own "Error handling request" traceback is gone
    lines = [r for r in caplog.records if "malformed request" in r.getMessage()]
    assert len(lines) == 1 and lines[0].exc_info is None


async def test_malformed_request_logs_are_rate_limited(tocsin, caplog):
    caplog.set_level(logging.INFO)
    for _ in range(5):
        await exchange(tocsin.daemon.http_port, b"GARBAGE\r\n\r\n")
    lines = [r for r in caplog.records if "malformed request" in r.getMessage()]
    assert 1 <= len(lines) < 5


def test_api_json_never_carries_nan():
    assert json.loads(dumps({"a": float("nan"), "b": [float("inf"), 1.5]})) == {"a": None, "b": [None, 1.5]}


# --- strict JSON ------------------------------------------------------------------


@pytest.mark.parametrize("text,word", [
    ('{"value": NaN}', "NaN"),
    ('{"value": Infinity}', "Infinity"),
    ('{"value": -Infinity}', "-Infinity"),
    ('{"value": 1e999999}', "out of range"),
    ('{"value": -1E+400}', "out of range"),
    ('[' + "9" * 400 + '.5]', "out of range"),
    ('{"title": "\\ud800"}', "lone surrogate \\ud800"),
    ('{"title": "cut emoji \\ud83d"}', "lone surrogate"),
    ('{"\\udc00": 1}', "lone surrogate \\udc00"),
])
async def test_non_standard_json_is_400_and_nothing_stored(tocsin, text, word):
    status, body = await tocsin.post("fw", text)
    assert status == 400, body
    assert word in body["error"]
    assert await stored(tocsin) == 0


@pytest.mark.parametrize("text", [
    '{"title": "emoji \\ud83d\\ude00"}', '{"title": "\\\\ud800 is just text"}', '{"value": 1e308, "e": "1e999"}',
])
async def test_standard_json_lookalikes_are_accepted(tocsin, text):
    status, body = await tocsin.post("fw", text)
    assert status == 200, body
    _, alerts = await tocsin.api("GET", "alerts/")
    assert alerts["results"][0]["payload"] == json.loads(text)


async def test_poisoned_and_innocent_alerts_in_the_same_batches(tocsin):
    """Concurrent posts over real sockets share group commits; each gets its own answer."""
    bodies = []
    for n in range(60):
        if n % 3 == 0:
            bodies.append(("bad", '{"alert_uid": "p%d", "title": "\\ud800"}' % n))
        elif n % 3 == 1:
            bodies.append(("bad", '{"alert_uid": "n%d", "v": NaN}' % n))
        else:
            bodies.append(("good", json.dumps({"alert_uid": f"g{n}", "title": f"innocent {n} \u00e9"})))
    connector = aiohttp.TCPConnector(limit=60, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as s:
        async def one(text):
            async with s.post(url(tocsin, "fw"), data=text, headers={"Content-Type": "application/json"},
                              timeout=aiohttp.ClientTimeout(total=IO)) as r:
                return r.status
        codes = await asyncio.gather(*(one(text) for _, text in bodies))
    for (kind, _), code in zip(bodies, codes):
        assert code == (200 if kind == "good" else 400)
    assert await stored(tocsin) == sum(kind == "good" for kind, _ in bodies)


# --- forms and multipart --------------------------------------------------------


async def test_form_percent_escaped_surrogate_is_replaced_not_stored(tocsin):
    status, _ = await tocsin.post("fw", data=b"title=%ED%A0%80x&a=1&a=2",
                                  headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 200
    _, alerts = await tocsin.api("GET", "alerts/")
    payload = alerts["results"][0]["payload"]
    assert payload["a"] == "2" and payload["title"].endswith("x") and "\ud800" not in payload["title"]


def multipart(fields: list[tuple[str, bytes]], *, filename: str | None = None, boundary: str = "b0UnD") -> bytes:
    """A multipart/form-data body; names go out as raw UTF-8, as browsers send them."""
    out = b""
    for name, value in fields:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disp}\r\n\r\n".encode() + value + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


async def test_multipart_fields_last_value_wins(tocsin):
    body = multipart([("title", "caf\u00e9".encode()), ("a", b"1"), ("a", b"2"), ("n\u00e4me", b"x")])
    status, _ = await tocsin.post("fw", data=body, headers={"Content-Type": "multipart/form-data; boundary=b0UnD"})
    assert status == 200
    _, alerts = await tocsin.api("GET", "alerts/")
    assert alerts["results"][0]["payload"] == {"title": "caf\u00e9", "a": "2", "n\u00e4me": "x"}


@pytest.mark.parametrize("body,ctype,word", [
    (multipart([("f", b"data")], filename="x.txt"), "multipart/form-data; boundary=b0UnD", "File uploads"),
    (multipart([("f", b"\xff\xfe bad")]), "multipart/form-data; boundary=b0UnD", "not valid utf-8"),
    (b"no parts at all", "multipart/form-data; boundary=b0UnD", "malformed multipart"),
])
async def test_bad_multipart_is_400(tocsin, body, ctype, word):
    status, answer = await tocsin.post("fw", data=body, headers={"Content-Type": ctype})
    assert status == 400 and word in answer["error"]
    assert await stored(tocsin) == 0


async def test_grafana_body_with_empty_alerts_is_400_not_a_silent_200(tocsin):
    status, body = await tocsin.post("gl", {"alerts": [], "title": "nothing"})
    assert status == 400 and "no alerts" in body["error"]
    assert await stored(tocsin) == 0
    status, body = await tocsin.post("gl", {"alerts": [{"labels": {"alertname": "A"}}, {"labels": {"alertname": "B"}}]})
    assert status == 200 and len(body["alerts"]) == 2


# --- large legal bodies ------------------------------------------------------------


@pytest.mark.parametrize("kind", ["lists", "form", "multipart"])
async def test_large_legal_bodies_are_accepted(tocsin, kind):
    if kind == "lists":
        data, ctype = b"[" + b",".join([b"[]"] * 200_000) + b"]", "application/json"
    elif kind == "form":
        data, ctype = "&".join(f"f{i}=v" for i in range(100_000)).encode(), "application/x-www-form-urlencoded"
    else:
        data, ctype = multipart([(f"f{i}", b"v") for i in range(10_000)]), "multipart/form-data; boundary=b0UnD"
    assert len(data) < 1024 * 1024
    codes = await asyncio.gather(*(tocsin.post("wh", data=data, headers={"Content-Type": ctype}) for _ in range(3)))
    assert [status for status, _ in codes] == [200, 200, 200], codes
    assert gc.isenabled()  # the collector's pause while big payloads live is over
    _, alerts = await tocsin.api("GET", "alerts/")
    payload = alerts["results"][0]["payload"]
    assert len(payload) == {"lists": 200_000, "form": 100_000, "multipart": 10_000}[kind]


async def test_json_nested_too_deep_is_400(tocsin):
    status, body = await tocsin.post("fw", "[" * 129 + "]" * 129)
    assert status == 400 and "nested deeper than 128" in body["error"]
    status, _ = await tocsin.post("fw", "[" * 128 + "]" * 128)
    assert status == 200


# --- deadlines ---------------------------------------------------------------------

FAST = 'header_timeout = "1s"\nbody_timeout = "1s"\nkeepalive_timeout = "2s"\nmax_connections = 4'


def post_head(token: str, length: int, ctype: str = "application/json", kind: str = "formatted_webhook") -> bytes:
    return (f"POST /integrations/v1/{kind}/{token}/ HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


async def test_half_sent_head_gets_408_and_the_connection_closes(start_tocsin):
    h = await start_tocsin(http_extra=FAST)
    answer = await exchange(h.daemon.http_port, b"POST /integrations/v1/webhook/x/ HTTP/1.1\r\nHost: x\r\n")
    status, body = split(answer)
    assert status == 408 and "head" in body["error"]
    async with h.session.get(f"{h.base}/metrics") as r:
        assert 'reason="header_timeout"' in await r.text()


async def test_silent_connection_is_closed(start_tocsin):
    h = await start_tocsin(http_extra=FAST)
    assert await exchange(h.daemon.http_port, b"") == b""


@pytest.mark.parametrize("ctype,partial", [
    ("application/json", b'{"title": "sta'),
    ("application/x-www-form-urlencoded", b"title=sta"),
    ("multipart/form-data; boundary=b0UnD", b'--b0UnD\r\nContent-Disposition: form-data; name="t"\r\n\r\nsta'),
])
async def test_stalled_body_gets_408_on_every_body_path(start_tocsin, ctype, partial):
    h = await start_tocsin(http_extra=FAST)
    status, body = split(await exchange(h.daemon.http_port, post_head(TOKEN["fw"], 500, ctype) + partial))
    assert status == 408 and "body not received" in body["error"]
    assert await stored(h) == 0


async def test_stalled_ui_form_gets_408(start_tocsin):
    h = await start_tocsin(http_extra=FAST)
    head = (b"POST /ui/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
            b"Content-Length: 300\r\n\r\ntoken=abc")
    answer = await exchange(h.daemon.http_port, head)
    assert answer.startswith(b"HTTP/1.1 408")


async def test_idle_keepalive_connection_is_closed(start_tocsin):
    h = await start_tocsin(http_extra=FAST)
    body = b'{"alert_uid": "ka"}'
    reader, writer = await asyncio.open_connection("127.0.0.1", h.daemon.http_port)
    writer.write(post_head(TOKEN["fw"], len(body)) + body)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), IO)
    assert head.startswith(b"HTTP/1.1 200") and b"close" not in head.lower()
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    await asyncio.wait_for(reader.readexactly(length), IO)
    assert await asyncio.wait_for(reader.read(), IO) == b""  # closed by the server once idle
    writer.close()


async def test_half_closed_client_still_gets_its_answer(start_tocsin):
    h = await start_tocsin(http_extra=FAST)
    body = b'{"alert_uid": "half-closed"}'
    status, answer = split(await exchange(h.daemon.http_port, post_head(TOKEN["fw"], len(body)) + body, shut=True))
    assert status == 200 and answer["alert_id"]
    assert await stored(h) == 1


async def test_half_close_inside_the_body_is_400(start_tocsin):
    h = await start_tocsin(http_extra=FAST)
    status, answer = split(await exchange(h.daemon.http_port, post_head(TOKEN["fw"], 100) + b'{"a":', shut=True))
    assert status == 400 and "closed" in answer["error"]


async def test_idle_sockets_at_the_cap_never_shut_out_a_client(start_tocsin):
    h = await start_tocsin(http_extra=FAST.replace("1s", "60s"))  # only eviction can make room
    held = [await asyncio.open_connection("127.0.0.1", h.daemon.http_port) for _ in range(4)]
    # one of them half-way through a head
    held[1][1].write(b"GET /healthz HTTP/1.1\r\n")
    await asyncio.sleep(0.1)
    for n in range(3):
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{h.base}/healthz", timeout=aiohttp.ClientTimeout(total=IO)) as r:
                assert r.status == 200
    evicted = [await asyncio.wait_for(r.read(), IO) for r, _ in held[:3]]
    assert evicted == [b"", b"", b""]  # the longest-waiting went first, silently
    for _, w in held:
        w.close()


async def test_cap_full_of_requests_in_progress_answers_503(start_tocsin):
    h = await start_tocsin(http_extra=FAST.replace("1s", "60s"))
    held = []
    for _ in range(4):
        r, w = await asyncio.open_connection("127.0.0.1", h.daemon.http_port)
        w.write(post_head(TOKEN["fw"], 100) + b'{"a":')  # inside a request: not evictable
        held.append((r, w))
    await asyncio.sleep(0.2)
    status, body = split(await exchange(h.daemon.http_port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"))
    assert status == 503 and "too many connections" in body["error"]
    for _, w in held:
        w.close()
    await asyncio.sleep(0.2)
    assert (await h.post("fw", {"alert_uid": "after"}))[0] == 200


# --- config ------------------------------------------------------------------------


def http_config(tmp_path, text: str):
    return parse({"http": json.loads(text)}, tmp_path / "config.toml").http


def test_http_durations_accept_numbers_and_strings(tmp_path):
    c = http_config(tmp_path, '{"header_timeout": "2m", "body_timeout": 5, "keepalive_timeout": "1.5s"}')
    assert (c.header_timeout, c.body_timeout, c.keepalive_timeout) == (120.0, 5.0, 1.5)
    d = http_config(tmp_path, "{}")
    assert (d.header_timeout, d.body_timeout, d.keepalive_timeout) == (10.0, 30.0, 75.0)


@pytest.mark.parametrize("text", ['{"header_timeout": "soon"}', '{"keepalive_timeout": 0}', '{"body_timeout": true}'])
def test_bad_http_durations_are_config_errors(tmp_path, text):
    with pytest.raises(ConfigError):
        http_config(tmp_path, text)


# --- nothing a sender can reach answers 500 ----------------------------------------


async def test_undecodable_content_encoding_is_400_and_logs_no_traceback(tocsin, caplog):
    import gzip

    caplog.set_level(logging.INFO)
    head = (f"POST /integrations/v1/webhook/{TOKEN['wh']}/ HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            "Content-Encoding: gzip\r\nContent-Length: {n}\r\nConnection: close\r\n\r\n")
    status, body = split(await exchange(tocsin.daemon.http_port, head.format(n=5).encode() + b"hello"))
    assert status == 400 and "content-encoding" in body["error"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    packed = gzip.compress(b'{"alert_uid": "zipped"}')
    status, body = split(await exchange(tocsin.daemon.http_port, head.format(n=len(packed)).encode() + packed))
    assert status == 200 and body["alert_id"]


@pytest.mark.parametrize("query", ["page=99999999999999999999999", "perpage=-5&page=0", "page=abc"])
async def test_api_paging_never_500(tocsin, query):
    status, body = await tocsin.api("GET", f"alert_groups/?{query}")
    assert status in (200, 400) and isinstance(body, dict)


async def test_unread_body_then_idle_is_closed_quietly_not_408(start_tocsin):
    """A refused request whose body aiohttp drains afterwards is not a late head."""
    h = await start_tocsin(http_extra=FAST.replace('keepalive_timeout = "2s"', 'keepalive_timeout = "3s"'))
    reader, writer = await asyncio.open_connection("127.0.0.1", h.daemon.http_port)
    writer.write(post_head("no-such-token", 20000))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), IO)
    assert head.startswith(b"HTTP/1.1 403")
    writer.write(b"x" * 20000)  # the rest of the body, after the answer
    rest = await asyncio.wait_for(reader.read(), IO)  # until the keep-alive deadline closes it
    assert b"408" not in rest
    writer.close()


@pytest.mark.parametrize("text,word", [
    ('{"pad": "' + "x" * 100_000 + '", "v": NaN}', "NaN"),
    ('{"pad": "' + "x" * 100_000 + '", "t": "\\udfff"}', "lone surrogate"),
    ('[' + "[" * 200 + "]" * 200 + ',"' + "x" * 100_000 + '"]', "nested deeper"),
])
async def test_big_bodies_parsed_in_a_worker_are_refused_alike(tocsin, text, word):
    status, body = await tocsin.post("fw", text)
    assert status == 400 and word in body["error"]
    assert await stored(tocsin) == 0


async def test_stalled_uploads_share_a_bounded_budget(start_tocsin):
    """Bodies still arriving may hold 32 MiB in all; past that a new one gets 503 at once."""
    h = await start_tocsin(http_extra='body_timeout = "60s"\nmax_body_bytes = 1000000')
    held = []
    for _ in range(33):  # 33 x 1,000,000 declared bytes fit in 32 MiB
        r, w = await asyncio.open_connection("127.0.0.1", h.daemon.http_port)
        w.write(post_head(TOKEN["fw"], 1_000_000) + b'{"a": "')
        held.append((r, w))
    await asyncio.sleep(0.3)
    status, body = await first_answer(h.daemon.http_port, post_head(TOKEN["fw"], 1_000_000) + b'{"a": "')
    assert status == 503 and "retry" in body["error"]
    for _, w in held:
        w.close()
    await asyncio.sleep(0.3)
    big = json.dumps({"alert_uid": "after", "pad": "x" * 500_000})
    assert (await h.post("fw", big))[0] == 200
