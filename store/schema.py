"""Versioned schema migrations, applied in order and recorded in PRAGMA user_version."""

MIGRATIONS: tuple[str, ...] = (
    # 1: alert groups and alerts.
    """
    CREATE TABLE alert_groups (
        seq              INTEGER PRIMARY KEY,
        id               TEXT NOT NULL UNIQUE,
        integration_id   TEXT NOT NULL,
        grouping_key     TEXT NOT NULL,
        state            TEXT NOT NULL,
        open             INTEGER,          -- 1 while open for grouping, NULL once resolved
        route_id         TEXT,
        title            TEXT,
        alerts_count     INTEGER NOT NULL DEFAULT 0,
        created_at       REAL NOT NULL,
        acknowledged_at  REAL,
        acknowledged_by  TEXT,
        resolved_at      REAL,
        resolved_by      TEXT,
        silenced_at      REAL,
        silenced_until   REAL,
        last_alert_id    TEXT,
        last_alert_at    REAL
    );
    -- At most one open group per (integration, key): the grouping rule, enforced by the database too.
    CREATE UNIQUE INDEX ix_groups_open ON alert_groups (grouping_key, integration_id) WHERE open = 1;
    -- The latest resolved group for a key, for resolve signals with no open group.
    CREATE INDEX ix_groups_resolved ON alert_groups (grouping_key, integration_id, seq) WHERE state = 'resolved';
    CREATE INDEX ix_groups_state ON alert_groups (state, seq);
    CREATE INDEX ix_groups_integration ON alert_groups (integration_id, seq);
    CREATE INDEX ix_groups_silenced ON alert_groups (silenced_until) WHERE state = 'silenced';

    CREATE TABLE alerts (
        seq              INTEGER PRIMARY KEY,
        id               TEXT NOT NULL UNIQUE,
        alert_group_id   TEXT NOT NULL,
        integration_id   TEXT NOT NULL,
        created_at       REAL NOT NULL,
        source           TEXT NOT NULL,
        is_resolve_signal INTEGER NOT NULL DEFAULT 0,
        payload          TEXT NOT NULL,    -- the JSON as received (numFiring/numResolved added where missing)
        raw              BLOB              -- the raw email, when the alert came by SMTP
    );
    CREATE INDEX ix_alerts_group ON alerts (alert_group_id, seq);
    CREATE INDEX ix_alerts_integration ON alerts (integration_id, seq);

    CREATE TABLE heartbeats (
        integration_id   TEXT PRIMARY KEY,
        last_seen        REAL NOT NULL,
        state            TEXT NOT NULL DEFAULT 'alive'
    );
    """,
)
