"""The values storage deals in (groups, alerts as decided, where they landed), the errors
every engine raises, and the ids it gives rows. Shared by both engines."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, fields

_ID_ALPHABET = "ABCDEFGHIJKLMNPQRSTUVWXYZ123456789"  # Grafana OnCall's: no O, no 0
# Each random byte picks a character (256 % 34 leaves a slight bias; these ids are
# opaque, not secrets: the API is behind its token).
_ID_TABLE = bytes(ord(_ID_ALPHABET[b % len(_ID_ALPHABET)]) for b in range(256))


def public_id(prefix: str) -> str:
    """An opaque id like Grafana OnCall's: a prefix letter and 12 random characters."""
    return prefix + os.urandom(12).translate(_ID_TABLE).decode("ascii")


_SORTED_ALPHABET = "".join(sorted(_ID_ALPHABET))  # digits before letters, as ASCII sorts them


def row_id(prefix: str, seq: int) -> str:
    """The public id of a group or alert row: 8 characters of its sequence number, then 4
    random ones. The digits use the alphabet in ASCII order, so ids sort like rows and
    the unique index on them grows at its end instead of at random pages (measured on a
    million alerts: a commit of 64 alerts 8 ms -> 3 ms). Unique by construction."""
    digits = []
    for _ in range(8):
        seq, r = divmod(seq, 34)
        digits.append(_SORTED_ALPHABET[r])
    return prefix + "".join(reversed(digits)) + os.urandom(4).translate(_ID_TABLE).decode("ascii")


class StoreUnavailable(Exception):
    """The database cannot take the write now; the sender should retry."""


class InvalidWrite(Exception):
    """This one write cannot be stored as it is (its text names why); retrying will not help.
    The other writes of its batch are kept."""


class DatabaseUnusable(Exception):
    """The database cannot be used at all (at start, or by `tocsin check`): one line saying why."""


class InvalidTransition(Exception):
    """A group action that the group's state does not allow."""


class NotFound(Exception):
    """No such alert group."""


class OverLimit(Exception):
    """The integration's rate limit, counted in the database over every process, is reached;
    `retry_after` seconds until an alert would fit."""

    def __init__(self, retry_after: float):
        super().__init__(f"rate limit reached, retry in {retry_after:.1f} s")
        self.retry_after = retry_after


@dataclass
class Group:
    """One alert_groups row, as the writer and the readers see it."""

    seq: int | None
    id: str
    integration_id: str
    grouping_key: str
    state: str
    open: int | None
    route_id: str | None
    title: str | None
    alerts_count: int
    created_at: float
    acknowledged_at: float | None = None
    acknowledged_by: str | None = None
    resolved_at: float | None = None
    resolved_by: str | None = None
    silenced_at: float | None = None
    silenced_until: float | None = None
    last_alert_id: str | None = None
    last_alert_at: float | None = None
    root_group_id: str | None = None  # the maintenance group this one is attached to
    grouping_id: str | None = None    # what the grouping template rendered (its md5 is the key)


GROUP_COLUMNS = tuple(f.name for f in fields(Group))
GROUP_SELECT = "SELECT " + ", ".join(GROUP_COLUMNS) + " FROM alert_groups"
GROUP_INSERT = (
    "INSERT INTO alert_groups (" + ", ".join(GROUP_COLUMNS) + ") VALUES ("
    + ", ".join("?" for _ in GROUP_COLUMNS) + ")"
)
GROUP_UPDATE = (
    "UPDATE alert_groups SET " + ", ".join(f"{c} = ?" for c in GROUP_COLUMNS[4:]) + " WHERE id = ?"
)


@dataclass(frozen=True)
class NewAlert:
    """An alert the pipeline has decided on, ready to be stored."""

    integration_id: str
    grouping_key: str
    payload_json: str
    resolve: bool = False
    acknowledge: bool = False
    title: str | None = None
    route_id: str | None = None
    source: str = "http"
    raw: bytes | None = None
    received_at: float = field(default_factory=time.time)
    escalation: str | None = None  # the route's chain snapshot (JSON), started if a group is created
    only_if_open: bool = False  # joins an open group or is not stored at all (PagerDuty follow-ups)
    receipt: str | None = None     # the source's own id for it (an IMAP UID), recorded in the same commit
    rate_limit: tuple[int, float] | None = None  # (N, seconds): admitted only while the integration has had
    #                                              fewer than N such alerts in the last `seconds`, cluster-wide
    grouping_id: str | None = None  # kept on a group it creates, for the UI
    labels: tuple[tuple[str, str], ...] = ()  # (key, value) pairs the group gets, for the label filter


@dataclass(frozen=True)
class StoredAlert:
    """Where a stored alert landed."""

    alert_id: str
    alert_group_id: str
    grouping_key: str
    group_created: bool
    group_state: str


def group_of(row) -> Group:
    """A Group from a row of GROUP_SELECT."""
    return Group(*row)
