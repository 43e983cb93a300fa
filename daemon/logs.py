"""One structured line per event on stdout (journald): logfmt or JSON.

A log call says what happened in its message and carries the values as fields
(`log.info("config reloaded", extra={"integrations": 3})`); both formats print those
fields as their own keys, so a log pipeline can filter on them.
"""
from __future__ import annotations

import json
import logging
import sys
import time

# Attributes every LogRecord has; anything else on a record came in through `extra`.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "taskName"}
_OWN = ("ts", "level", "logger", "msg", "error")


def _record(record: logging.LogRecord) -> dict:
    out = {
        "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
        "level": record.levelname.lower(),
        "logger": record.name,
        "msg": record.getMessage(),
    }
    for key, value in record.__dict__.items():
        if key not in _STANDARD and key not in _OWN:
            out[key] = value
    if record.exc_info:
        out["error"] = logging.Formatter().formatException(record.exc_info)
    elif "error" in record.__dict__:
        out["error"] = record.__dict__["error"]
    return out


class JsonFormatter(logging.Formatter):
    """One JSON object per line; fields keep their JSON types (numbers, lists)."""

    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(_record(record), ensure_ascii=False, default=str)


class LogfmtFormatter(logging.Formatter):
    """`key=value` pairs; values with spaces, quotes or `=` are quoted."""

    def format(self, record: logging.LogRecord) -> str:
        return " ".join(f"{k}={_logfmt_value(v)}" for k, v in _record(record).items())


def _logfmt_value(value) -> str:
    if value is None:
        text = ""
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, (list, tuple, set, frozenset)):
        text = "; ".join(str(v) for v in value)
    else:
        text = str(value)
    if text and not any(c in text for c in ' ="\\\n\t\r'):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace(
        "\t", "\\t").replace("\r", "\\r") + '"'


def setup(level: str = "INFO", fmt: str = "logfmt") -> None:
    """Send every logger's records to stdout in `fmt` ("logfmt" or "json") from `level` up."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter() if fmt == "json" else LogfmtFormatter())
    logging.basicConfig(level=level, handlers=[handler], force=True)
