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
    # 2: escalation state, notifications outbox, timeline, maintenance.
    """
    ALTER TABLE alert_groups ADD COLUMN root_group_id TEXT;
    CREATE INDEX ix_groups_root ON alert_groups (root_group_id) WHERE root_group_id IS NOT NULL;

    CREATE TABLE escalations (
        group_id         TEXT PRIMARY KEY,
        chain            TEXT NOT NULL,     -- the chain's snapshot (JSON) taken when the group was created
        step             INTEGER NOT NULL DEFAULT 0,
        repeats          INTEGER NOT NULL DEFAULT 0,
        state            TEXT NOT NULL,     -- running | paused | stopped | finished
        due_at           REAL
    );
    CREATE INDEX ix_escalations_due ON escalations (due_at) WHERE state = 'running';

    CREATE TABLE notifications (
        id               TEXT PRIMARY KEY,  -- also the idempotency key receivers see
        group_id         TEXT NOT NULL,
        notifier         TEXT NOT NULL,
        event            TEXT NOT NULL,
        step             INTEGER,
        created_at       REAL NOT NULL,
        state            TEXT NOT NULL,     -- pending | sent | failed
        attempts         INTEGER NOT NULL DEFAULT 0,   -- attempts started
        results          INTEGER NOT NULL DEFAULT 0,   -- attempts whose outcome is recorded
        due_at           REAL,
        last_detail      TEXT
    );
    CREATE INDEX ix_notifications_due ON notifications (due_at) WHERE state = 'pending';
    CREATE INDEX ix_notifications_group ON notifications (group_id, event);

    CREATE TABLE timeline (
        seq              INTEGER PRIMARY KEY,
        group_id         TEXT NOT NULL,
        at               REAL NOT NULL,
        event            TEXT NOT NULL,
        detail           TEXT
    );
    CREATE INDEX ix_timeline_group ON timeline (group_id, seq);

    CREATE TABLE maintenance (
        integration_id   TEXT PRIMARY KEY,
        mode             TEXT NOT NULL,     -- debug | maintenance
        started_at       REAL NOT NULL,
        ends_at          REAL NOT NULL,
        group_id         TEXT               -- the group that collects everything, in maintenance mode
    );
    """,
    # 3: the web UI and /metrics over many groups (measured with bench/ui_pages.py on 100,000
    # groups: the open-group count 57 ms -> under 1 ms, a time-range page 28 ms -> 8 ms).
    """
    CREATE INDEX ix_groups_unresolved ON alert_groups (integration_id, state) WHERE state != 'resolved';
    CREATE INDEX ix_groups_created ON alert_groups (created_at);
    """,
    # 4: receipts: a source's own id for what it delivered (an IMAP message's mailbox, UIDVALIDITY
    # and UID), written in the alert's transaction, so a source can tell what is already stored.
    """
    CREATE TABLE receipts (
        key              TEXT PRIMARY KEY,
        alert_id         TEXT NOT NULL,
        created_at       REAL NOT NULL
    );
    """,
    # 5: the UI's label filter and grouping id (issue 14). Labels are keyed by the group's seq
    # so a filter walks (key, value) newest first and a page reads its 50 rows off the index.
    # Existing groups get the labels of their last alert.
    """
    ALTER TABLE alert_groups ADD COLUMN grouping_id TEXT;
    CREATE TABLE group_labels (
        key              TEXT NOT NULL,
        value            TEXT NOT NULL,
        group_seq        INTEGER NOT NULL,
        PRIMARY KEY (key, value, group_seq)
    ) WITHOUT ROWID;
    CREATE INDEX ix_group_labels_group ON group_labels (group_seq);
    INSERT OR IGNORE INTO group_labels (key, value, group_seq)
        SELECT substr(j.key, 1, 100), substr(CAST(j.value AS TEXT), 1, 200), p.seq
        FROM (SELECT g.seq, CASE WHEN json_valid(a.payload) THEN a.payload ELSE '{}' END AS body
              FROM alert_groups g JOIN alerts a ON a.id = g.last_alert_id) p,
             json_each(p.body, '$.labels') j
        WHERE json_type(p.body, '$.labels') = 'object' AND j.key IS NOT NULL AND j.type IN ('text', 'integer', 'real');
    INSERT OR IGNORE INTO group_labels (key, value, group_seq)
        SELECT substr(j.key, 1, 100), substr(CAST(j.value AS TEXT), 1, 200), p.seq
        FROM (SELECT g.seq, CASE WHEN json_valid(a.payload) THEN a.payload ELSE '{}' END AS body
              FROM alert_groups g JOIN alerts a ON a.id = g.last_alert_id) p,
             json_each(p.body, '$.commonLabels') j
        WHERE json_type(p.body, '$.commonLabels') = 'object' AND j.key IS NOT NULL AND j.type IN ('text', 'integer', 'real');
    """,
    # 6: rate-limit admissions: one row per alert a rate limit let through, kept for the
    # limit's window, so "at most N in any window" holds over every process and restarts.
    """
    CREATE TABLE admissions (
        integration_id   TEXT NOT NULL,
        at               REAL NOT NULL
    );
    CREATE INDEX ix_admissions ON admissions (integration_id, at);
    """,
)
