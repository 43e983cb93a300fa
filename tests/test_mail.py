"""Email into payload: the corpus expectations, OnCall's rules, and broken mail never raising."""
from __future__ import annotations

import json
import random

import pytest

from conftest import CORPUS, corpus_files
from handlers.mail import html_to_text, is_cheap, parse_message

KEYS = {"subject", "message", "sender", "to", "cc", "date", "message_id", "headers", "attachments"}


def parse(name: str) -> dict:
    return parse_message((CORPUS / "email" / name).read_bytes())


def mail(text: str) -> bytes:
    return text.replace("\n", "\r\n").encode("utf-8", "surrogateescape")


def storable(payload: dict) -> None:
    """The payload has the contract's keys and goes to JSON (and UTF-8) as it is."""
    assert set(payload) == KEYS
    json.dumps(payload, ensure_ascii=False).encode("utf-8")
    assert isinstance(payload["subject"], str) and isinstance(payload["message"], str)
    assert isinstance(payload["sender"], str)
    assert all(isinstance(a, str) for a in payload["to"] + payload["cc"])
    assert all(set(a) == {"filename", "content_type", "size"} for a in payload["attachments"])


# --- the corpus ------------------------------------------------------------------


@pytest.mark.parametrize("name", [p.name for p in corpus_files("email/*.eml")])
def test_every_corpus_email_parses_to_the_contract_shape(name):
    payload = parse(name)
    storable(payload)
    assert payload["subject"] == payload["subject"].strip() != ""
    assert payload["message"] == payload["message"].strip() != ""
    assert payload["to"] == ["TOKEN@alerts.example.com"] and payload["cc"] == []


def test_html_only_is_converted_like_oncall():
    payload = parse("html-only.eml")
    assert payload["message"] == "\n".join(
        [
            "Storage report",                      # <title> kept
            "Volume vol2 degraded",
            "Disk sdc in pool tank has failed.",   # inline elements stay on the line
            "* Pool: tank",                        # <li> prefixed
            "* State: DEGRADED",
            "-" * 32,                              # <hr>
            "See the storage page (https://nas01.example.com/storage).",  # link text (href)
        ]
    )
    assert payload["sender"] == "nas@nas01.example.com"
    assert payload["attachments"] == []


def test_text_part_wins_over_html():
    payload = parse("multipart-alternative.eml")
    assert payload["message"] == (
        "Problem started at 03:04:05 on 2026.11.22\nProblem name: High CPU utilization\n"
        "Host: app03\nSeverity: Warning"
    )
    assert payload["subject"] == "Problem: High CPU utilization on app03"
    assert payload["sender"] == "zabbix@zbx.example.com"
    assert payload["attachments"] == []  # the HTML alternative is not an attachment


def test_rfc2047_subject_and_sender_name_base64_utf8_body():
    payload = parse("utf8-encoded.eml")
    assert payload["subject"] == "Störung: Kühlung Serverraum 2 ausgefallen"
    assert payload["sender"] == "monitor@sued.example.de"
    assert payload["headers"]["from"] == "Überwachung Süd <monitor@sued.example.de>"
    assert payload["message"] == "Temperatur 41 °C — Grenzwert 30 °C überschritten."
    assert payload["date"] == "2026-11-23T12:00:00+01:00"


def test_latin1_quoted_printable():
    payload = parse("latin1-qp.eml")
    assert payload["subject"] == "Alarme UPS baie B3 - température"
    assert payload["message"] == "Température critique: 45°C sur baie B3.\nIntervention requise."
    assert payload["sender"] == "ups@dc1.example.fr"


def test_attachment_listed_not_in_message():
    payload = parse("with-attachment.eml")
    assert payload["message"] == "Replication lag exceeded 300 s. Details attached."
    assert payload["attachments"] == [{"filename": "lag.csv", "content_type": "application/csv", "size": 27}]


def test_cron_output_minimal_headers_and_from_comment():
    payload = parse("cron-output.eml")
    assert payload["sender"] == "root@batch01.example.com"  # "(Cron Daemon)" is a comment
    assert payload["date"] is None and payload["message_id"] is None
    assert payload["headers"] == {
        "from": "root@batch01.example.com (Cron Daemon)",
        "to": "TOKEN@alerts.example.com",
        "subject": "Cron <root@batch01> /usr/local/bin/rotate-logs",
    }
    assert payload["message"] == "/usr/local/bin/rotate-logs: line 14: /var/log/app: No space left on device"


def test_nagios_problem_fields_and_crlf_becomes_lf():
    payload = parse("nagios-problem.eml")
    assert payload["subject"] == "** PROBLEM Service Alert: web01/HTTP is CRITICAL **"
    assert payload["message_id"] == "<nagios.1.web01.http@mon01.example.com>"
    assert payload["date"] == "2026-11-20T10:00:00+00:00"
    assert payload["message"].startswith("***** Nagios *****\n\nNotification Type: PROBLEM\n")
    assert "\r" not in payload["message"]


def test_backup_ok_message_is_ok():
    assert parse("backup-ok.eml")["message"] == "ok"


# --- OnCall's rules ------------------------------------------------------------------


@pytest.mark.parametrize(
    "from_values, sender",
    [
        (["'Alex Smith' <test@example.com>"], "test@example.com"),
        (['"\'Alex Smith\' via [TEST] mail" <test@example.com>'], "test@example.com"),
        # Unparsable (unquoted specials): the header text as OnCall's email policy renders it
        # (OnCall's test_get_sender_from_email_message); tests/test_oncall_parity.py has more.
        (["'Alex Smith' via [TEST] mail <test@example.com>"], "\"'Alex Smith' via\""),
        (["=?utf-8?q?M=C3=BCller=2C_Anna?= <anna@example.de>"], "anna@example.de"),
        (["a@example.com, b@example.com"], "a@example.com"),
        (["<bounce@example.com>"], "bounce@example.com"),
        (["first@example.com", "second@example.com"], "first@example.com"),
        ([""], ""),
        ([], ""),
    ],
)
def test_sender_is_the_from_addr_spec_or_the_raw_value(from_values, sender):
    head = "".join(f"From: {v}\n" for v in from_values)
    assert parse_message(mail(f"{head}Subject: s\n\nbody\n"))["sender"] == sender


def test_html_conversion_rules():
    html = (
        "<html><head><title>Daily</title><style>p { color: red }</style></head><body>"
        "<div><h2>Jobs</h2><br><br>"
        "<p>job <b>nightly</b><i>-2</i> <span>failed</span></p> <p>exit 3</p><hr/>"
        "<a href='https://ci.example.com/42'>build 42</a> <a>no link</a> <a href=''>empty</a>"
        "<ol><li>step one</li><li>step <em>two</em><ul><li>nested</li></ul></li></ol>"
        "<table><tr><td>a</td><td>b</td></tr><tr><td>c</td></tr></table>"
        "<!-- hidden --><script>alert(1)</script>&nbsp;<p>&nbsp;</p>tail &amp; end"
        "</div></body></html>"
    )
    assert html_to_text(html) == "\n".join(
        [
            "Daily",
            "Jobs",
            "job nightly-2 failed",
            "exit 3",
            "-" * 32,
            "build 42 (https://ci.example.com/42) no link empty",
            "* step one",
            "* step two",
            "* nested",
            "ab",
            "c",
            "tail & end",
        ]
    )


def test_empty_text_part_falls_back_to_html():
    raw = mail(
        "Subject: s\nContent-Type: multipart/alternative; boundary=b\n\n"
        "--b\nContent-Type: text/plain\n\n\n--b\nContent-Type: text/html\n\n<p>from html</p>\n--b--\n"
    )
    assert parse_message(raw)["message"] == "from html"


def test_text_attachment_is_not_the_message():
    raw = mail(
        "Subject: s\nContent-Type: multipart/mixed; boundary=b\n\n"
        "--b\nContent-Type: text/plain\nContent-Disposition: attachment; filename=log.txt\n\nlog line\n"
        "--b\nContent-Type: text/html\n\n<p>see log</p>\n"
        "--b\nContent-Type: image/png\nContent-ID: <img1>\nContent-Transfer-Encoding: base64\n\niVBORw0KGgo=\n"
        "--b\nContent-Type: application/octet-stream\n"
        "Content-Disposition: attachment; filename*=utf-8''r%C3%A9sum%C3%A9.bin\n\nxyz\n"
        "--b\nContent-Type: text/csv; name=\"=?utf-8?q?donn=C3=A9es.csv?=\"\n\na,b\n"
        "--b--\n"
    )
    payload = parse_message(raw)
    assert payload["message"] == "see log"
    assert payload["attachments"] == [
        {"filename": "log.txt", "content_type": "text/plain", "size": len(b"log line")},
        {"filename": None, "content_type": "image/png", "size": 8},
        {"filename": "résumé.bin", "content_type": "application/octet-stream", "size": 3},
        {"filename": "données.csv", "content_type": "text/csv", "size": 3},
    ]


def test_attached_message_listed_once_and_outer_text_wins():
    raw = mail(
        "Subject: fwd\nContent-Type: multipart/mixed; boundary=b\n\n"
        "--b\nContent-Type: text/plain\n\nsee attached\n"
        "--b\nContent-Type: message/rfc822\nContent-Disposition: attachment\n\n"
        "Subject: inner\nContent-Type: multipart/mixed; boundary=c\n\n"
        "--c\nContent-Type: text/plain\n\ninner text\n--c\nContent-Type: application/pdf; name=a.pdf\n\n%PDF\n--c--\n"
        "--b--\n"
    )
    payload = parse_message(raw)
    assert payload["message"] == "see attached"
    [attached] = payload["attachments"]
    assert attached["content_type"] == "message/rfc822" and attached["size"] > 0


def test_addresses_date_message_id_and_headers():
    raw = mail(
        "From: Ops <ops@example.com>\n"
        "To: a@example.com, \"B, Team\" <b@example.com>\n"
        "To: undisclosed-recipients:;\n"
        "Cc: =?utf-8?q?J=C3=BCrgen?= <j@example.de>,\n c@example.com (C)\n"
        "Subject: =?utf-8?b?8J+UpSBmaXJl?= and =?iso-8859-1?q?caf=E9?=\n"
        "Date: not a date\n"
        "Message-ID:   <m1@example.com>  \n"
        "X-Priority: 1\nX-Mailer: NetBackup 10\nReceived: from somewhere\nDKIM-Signature: v=1\n\nbody\n"
    )
    payload = parse_message(raw)
    assert payload["to"] == ["a@example.com", "b@example.com"]
    assert payload["cc"] == ["j@example.de", "c@example.com"]
    assert payload["subject"] == "🔥 fire and café"
    assert payload["date"] is None
    assert payload["message_id"] == "<m1@example.com>"
    h = payload["headers"]
    assert h["x-priority"] == "1" and h["x-mailer"] == "NetBackup 10"
    assert h["to"] == 'a@example.com, "B, Team" <b@example.com>, undisclosed-recipients:;'
    assert h["cc"] == "Jürgen <j@example.de>, c@example.com (C)"  # unfolded and decoded
    assert "received" not in h and "dkim-signature" not in h


def test_adjacent_encoded_words_join_without_the_space():
    raw = mail("Subject: =?utf-8?q?Disk_?= =?utf-8?q?full?= on =?utf-8?q?db1?=\n\nx\n")
    assert parse_message(raw)["subject"] == "Disk full on db1"


# --- broken mail ---------------------------------------------------------------------

BROKEN = {
    "multipart without boundary": (
        "Subject: s\nContent-Type: multipart/mixed\n\n--XYZ\nContent-Type: text/plain\n\nhello body\n--XYZ--\n",
        "hello body",
    ),
    "boundary that the body does not use": (
        'Subject: s\nContent-Type: multipart/alternative; boundary="declared"\n\n'
        "--actual\nContent-Type: text/plain\n\nthe real text\n--actual\nContent-Type: text/html\n\n<p>h</p>\n--actual--\n",
        "the real text",
    ),
    "no closing boundary": (
        "Subject: s\nContent-Type: multipart/mixed; boundary=b\n\npreamble\n--b\nContent-Type: text/plain\n\ncut short\n",
        "cut short",
    ),
    "multipart with no parts at all": (
        "Subject: s\nContent-Type: multipart/mixed\n\njust some text\n",
        "just some text",
    ),
    "unknown charset name": (
        "Subject: s\nContent-Type: text/plain; charset=x-no-such-charset\n\nna\u00efve\n",
        "na\u00efve",
    ),
    "charset that is not a text codec": (
        "Subject: s\nContent-Type: text/plain; charset=base64\n\nplain\n",
        "plain",
    ),
    "RFC 2231 charset": (
        "Subject: s\nContent-Type: text/plain; charset*=iso-8859-1''\n\nok\n",
        "ok",
    ),
    "bad base64": (
        "Subject: s\nContent-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: base64\n\n"
        "aGVsbG8gd29y!!bGQ\n",
        "hello world",
    ),
    "truncated base64": (
        "Subject: s\nContent-Transfer-Encoding: base64\n\naGVsbG8gd29ybGQgZnJvbSBh\nYmM",
        "hello world from abc",
    ),
    "bad quoted-printable": (
        "Subject: s\nContent-Transfer-Encoding: quoted-printable\n\ntemp=3D45=\n=C2=B0C =ZZ end\n",
        "temp=45°C =ZZ end",
    ),
    "8-bit body without charset": (
        "Subject: s\n\ntemp\u00e9rature\n",
        "temp\u00e9rature",
    ),
    "unknown transfer encoding": (
        "Subject: s\nContent-Transfer-Encoding: x-weird\n\nas is\n",
        "as is",
    ),
    "headers only": ("Subject: s\n", ""),
}


@pytest.mark.parametrize("name", list(BROKEN))
def test_broken_mime_gives_best_effort_text(name):
    text, message = BROKEN[name]
    payload = parse_message(mail(text))
    storable(payload)
    assert payload["message"] == message


def test_eight_bit_junk_in_headers():
    raw = (
        b"From: J\xe9r\xf4me <jerome@example.fr>\r\n"
        b"Subject: caf\xc3\xa9 \xff\xfe broken\r\n"
        b"To: \xff@example.com\r\n"
        b"X-Note: =?utf-8?b?!!!?= =?no-such?q?x?=\r\n\r\nbody\r\n"
    )
    payload = parse_message(raw)
    storable(payload)
    assert payload["sender"] == "jerome@example.fr"
    assert payload["headers"]["from"] == "Jérôme <jerome@example.fr>"  # not UTF-8: read as Windows-1252
    assert payload["subject"].startswith("caf") and payload["subject"].endswith(" broken")
    assert payload["message"] == "body"


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\r\n\r\n",
        b"\x00\x01\x02\xff" * 100,
        b"no colon header line\r\n\r\nbody",
        b"Content-Type: multipart/mixed; boundary=x\r\n\r\n" + b"--x\r\nContent-Type: multipart/mixed; boundary=x\r\n\r\n" * 2000,
        b"Content-Type: text/html\r\n\r\n" + b"<div>" * 5000 + b"deep" + b"</div>" * 5000,
        b"Subject: =?utf-8?q?" + b"=E2" * 50 + b"?=\r\n\r\n",
        b"Content-Type: message/rfc822\r\n\r\nSubject: inner\r\n\r\ninner body",
        b"Content-Type: text/plain; charset=utf-7\r\n\r\n+2D3cAA-",
    ],
)
def test_pathological_input_never_raises(raw):
    storable(parse_message(raw))


def test_fuzzed_corpus_never_raises():
    rng = random.Random(20261127)
    originals = [p.read_bytes() for p in corpus_files("email/*.eml")]
    alphabet = b"\r\n:;=?-\"<>@\x00\xff\xc3 boundary=charset"
    for _ in range(300):
        data = bytearray(rng.choice(originals))
        for _ in range(rng.randint(1, 12)):
            op, at = rng.random(), rng.randrange(len(data) or 1)
            if op < 0.4:
                data[at:at + 1] = bytes([rng.choice(alphabet)])
            elif op < 0.7:
                del data[at:at + rng.randint(1, 40)]
            else:
                data[at:at] = bytes(rng.choice(alphabet) for _ in range(rng.randint(1, 8)))
        storable(parse_message(bytes(data)))


def test_is_cheap_says_when_to_leave_the_event_loop():
    assert is_cheap((CORPUS / "email" / "multipart-alternative.eml").read_bytes())  # text wins, small
    assert is_cheap((CORPUS / "email" / "nagios-problem.eml").read_bytes())
    assert not is_cheap((CORPUS / "email" / "html-only.eml").read_bytes())  # HTML conversion is slow
    assert not is_cheap(b"Subject: s\r\n\r\n" + b"x" * 20000)


# --- the fast split agrees with the feed parser -------------------------------------


def _generated_mail(rng: random.Random) -> bytes:
    from email.mime.application import MIMEApplication
    from email.mime.multipart import MIMEMultipart
    from email.mime.text import MIMEText

    def leaf():
        body = rng.choice(["hello\nworld\n", "caf\u00e9 \u2014 x\n", "", "\n\n", "line", "<p>x</p>", ".dot\n..two\n"])
        roll = rng.random()
        if roll < 0.5:
            part = MIMEText(body, rng.choice(["plain", "html"]), "us-ascii" if body.isascii() else "utf-8")
        elif roll < 0.7:
            part = MIMEApplication(bytes(rng.randrange(256) for _ in range(rng.randint(0, 40))), Name="f.bin")
        else:
            part = MIMEText(body, "plain", "utf-8")
            part.add_header("Content-Disposition", "attachment", filename="a.txt")
        return part

    def tree(depth):
        if depth > 2 or rng.random() < 0.3:
            return leaf()
        multipart = MIMEMultipart(rng.choice(["mixed", "alternative", "related"]))
        if rng.random() < 0.3:
            multipart.preamble = "This is a MIME message."
        for _ in range(rng.randint(1, 4)):
            multipart.attach(tree(depth + 1))
        return multipart

    msg = tree(0)
    msg["Subject"] = rng.choice(["s", "=?utf-8?q?x=C3=A9?=", "long " * 30])
    msg["From"] = rng.choice(["a@b.c", "Name <n@x.y>", '"Q, R" <q@r.s>'])
    raw = msg.as_bytes()
    return raw.replace(b"\n", b"\r\n") if rng.random() < 0.5 else raw


def test_fast_split_gives_the_feed_parsers_payload():
    from handlers.mail import _PARSER, _payload, split_message

    rng = random.Random(7)
    originals = [p.read_bytes() for p in corpus_files("email/*.eml")]
    assert all(split_message(raw) is not None for raw in originals)  # real mail takes the fast path
    fast = 0
    for n in range(600):
        raw = _generated_mail(rng) if n % 3 else rng.choice(originals)
        if rng.random() < 0.5:  # and broken variants: mostly refused, else identical
            data = bytearray(raw)
            for _ in range(rng.randint(1, 4)):
                at = rng.randrange(len(data))
                data[at:at + rng.randint(0, 3)] = bytes(rng.choice(b"\r\n:-= \t\xff") for _ in range(rng.randint(0, 3)))
            raw = bytes(data)
        tree = split_message(raw)
        if tree is not None:
            fast += 1
            assert _payload(tree) == _payload(_PARSER.parsebytes(raw)), raw
    assert fast > 300
