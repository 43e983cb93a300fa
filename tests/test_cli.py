"""The `tocsin` command line: check, render (same code as live traffic), exit codes."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys

from conftest import CORPUS, ROOT, write_config


def tocsin(*args, stdin: str | None = None):
    return subprocess.run([sys.executable, "-m", "daemon", *args], cwd=ROOT, capture_output=True,
                          text=True, input=stdin, timeout=60)


def test_check_ok_and_example_config():
    r = tocsin("check", "-c", str(ROOT / "config.toml"))
    assert r.returncode == 0, r.stderr


def test_check_reports_every_problem(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("""
[daemon]
bogus = 1
[http]
listen = "nowhere"
[[integrations]]
id = "a"
kind = "webhook"
token = "same-token-123"
[integrations.templates]
title = "{{ payload.x "
[[integrations]]
id = "a"
kind = "nope"
token = "same-token-123"
""")
    r = tocsin("check", "-c", str(bad))
    assert r.returncode == 1
    err = r.stderr
    assert "unknown key 'bogus'" in err
    assert "not host:port" in err
    assert "duplicate id" in err
    assert "duplicate token" in err
    assert "unknown kind 'nope'" in err
    assert "integration 'a': template 'title'" in err


def test_check_missing_file(tmp_path):
    r = tocsin("check", "-c", str(tmp_path / "none.toml"))
    assert r.returncode == 1 and "no such file" in r.stderr


def test_render_corpus_payload(tmp_path):
    cfg = write_config(tmp_path)
    r = tocsin("render", "-c", str(cfg), "--integration", "am", str(CORPUS / "http" / "alertmanager-firing.json"))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["grouping_key"] == hashlib.md5(b'{}:{alertname="InstanceDown"}').hexdigest()
    assert out["resolve"] is False and out["acknowledge"] is False
    assert out["title"].startswith("InstanceDown")
    assert "Status: firing" in out["message"]
    assert set(out) >= {"grouping_id", "grouping_key", "resolve", "acknowledge", "source_link", "title",
                        "message", "image_url", "route"}


def test_render_stdin_and_errors(tmp_path):
    cfg = write_config(tmp_path)
    r = tocsin("render", "-c", str(cfg), "--integration", "kp", "-", stdin='{"id": "x", "level": "OK"}')
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["resolve"] is True
    r = tocsin("render", "-c", str(cfg), "--integration", "kp", "-", stdin="{not json")
    assert r.returncode == 1 and "not JSON" in r.stderr
    r = tocsin("render", "-c", str(cfg), "--integration", "nope", "-", stdin="{}")
    assert r.returncode == 1 and "no integration 'nope'" in r.stderr
    r = tocsin("render")
    assert r.returncode == 2


def test_render_matches_preview_api_shape(tmp_path):
    cfg = write_config(tmp_path)
    r = tocsin("render", "-c", str(cfg), "--integration", "fw",
               str(CORPUS / "http" / "formatted-webhook-alerting.json"))
    out = json.loads(r.stdout)
    assert out["title"] == "Disk /var almost full on files01"
    assert out["source_link"] == "https://monitor.example.com/hosts/files01"
    assert out["image_url"] is None


def test_config_rewrites_keep_owner_group_and_mode(tmp_path):
    """new-integration (and import-oncall) replace config.toml whole: the service must still read it."""
    import os
    import stat

    import pytest

    if os.geteuid() != 0:
        pytest.skip("needs root to give the file another owner")
    cfg = write_config(tmp_path)
    os.chown(cfg, 65534, 65534)
    os.chmod(cfg, 0o640)
    r = tocsin("new-integration", "-c", str(cfg), "--kind", "webhook", "--name", "Owned")
    assert r.returncode == 0, r.stderr
    st = cfg.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (65534, 65534, 0o640)
    assert 'name = "Owned"' in cfg.read_text()


def test_new_pagerduty_integration_prints_the_events_url(tmp_path):
    cfg = write_config(tmp_path)
    r = tocsin("new-integration", "-c", str(cfg), "--kind", "pagerduty", "--name", "Datadog")
    assert r.returncode == 0, r.stderr
    token = r.stdout.split("/integrations/v1/pagerduty/", 1)[1].split("/", 1)[0]
    assert f"events API v2: http://127.0.0.1:8080/v2/enqueue with routing_key {token}" in r.stdout
