"""The PostgreSQL schema: versioned migrations, applied in order under an advisory lock and
recorded in tocsin_schema. Version 1 is SQLite's schema 4 in PostgreSQL's types."""

MIGRATIONS: tuple[str, ...] = (
    # 1: everything SQLite's migrations 1-4 make, with sequences for the row numbers (the
    # writer takes them in blocks: ids are made before the rows are inserted).
    """
    CREATE SEQUENCE alert_groups_seq;
    CREATE SEQUENCE alerts_seq;
    CREATE TABLE alert_groups (
        seq              BIGINT PRIMARY KEY,
        id               TEXT NOT NULL UNIQUE,
        integration_id   TEXT NOT NULL,
        grouping_key     TEXT NOT NULL,
        state            TEXT NOT NULL,
        open             INTEGER,          -- 1 while open for grouping, NULL once resolved
        route_id         TEXT,
        title            TEXT,
        alerts_count     INTEGER NOT NULL DEFAULT 0,
        created_at       DOUBLE PRECISION NOT NULL,
        acknowledged_at  DOUBLE PRECISION,
        acknowledged_by  TEXT,
        resolved_at      DOUBLE PRECISION,
        resolved_by      TEXT,
        silenced_at      DOUBLE PRECISION,
        silenced_until   DOUBLE PRECISION,
        last_alert_id    TEXT,
        last_alert_at    DOUBLE PRECISION,
        root_group_id    TEXT
    );
    -- At most one open group per (integration, key), whichever instance creates it.
    CREATE UNIQUE INDEX ix_groups_open ON alert_groups (grouping_key, integration_id) WHERE open = 1;
    CREATE INDEX ix_groups_resolved ON alert_groups (grouping_key, integration_id, seq) WHERE state = 'resolved';
    CREATE INDEX ix_groups_state ON alert_groups (state, seq);
    CREATE INDEX ix_groups_integration ON alert_groups (integration_id, seq);
    CREATE INDEX ix_groups_silenced ON alert_groups (silenced_until) WHERE state = 'silenced';
    CREATE INDEX ix_groups_root ON alert_groups (root_group_id) WHERE root_group_id IS NOT NULL;
    CREATE INDEX ix_groups_unresolved ON alert_groups (integration_id, state) WHERE state != 'resolved';
    CREATE INDEX ix_groups_created ON alert_groups (created_at);

    CREATE TABLE alerts (
        seq              BIGINT PRIMARY KEY,
        id               TEXT NOT NULL UNIQUE,
        alert_group_id   TEXT NOT NULL,
        integration_id   TEXT NOT NULL,
        created_at       DOUBLE PRECISION NOT NULL,
        source           TEXT NOT NULL,
        is_resolve_signal INTEGER NOT NULL DEFAULT 0,
        payload          TEXT NOT NULL,
        raw              BYTEA
    );
    CREATE INDEX ix_alerts_group ON alerts (alert_group_id, seq);
    CREATE INDEX ix_alerts_integration ON alerts (integration_id, seq);

    CREATE TABLE heartbeats (
        integration_id   TEXT PRIMARY KEY,
        last_seen        DOUBLE PRECISION NOT NULL,
        state            TEXT NOT NULL DEFAULT 'alive'
    );

    CREATE TABLE escalations (
        group_id         TEXT PRIMARY KEY,
        chain            TEXT NOT NULL,
        step             INTEGER NOT NULL DEFAULT 0,
        repeats          INTEGER NOT NULL DEFAULT 0,
        state            TEXT NOT NULL,
        due_at           DOUBLE PRECISION
    );
    CREATE INDEX ix_escalations_due ON escalations (due_at) WHERE state = 'running';

    CREATE TABLE notifications (
        id               TEXT PRIMARY KEY,  -- also the idempotency key receivers see
        group_id         TEXT NOT NULL,
        notifier         TEXT NOT NULL,
        event            TEXT NOT NULL,
        step             INTEGER,
        created_at       DOUBLE PRECISION NOT NULL,
        state            TEXT NOT NULL,
        attempts         INTEGER NOT NULL DEFAULT 0,
        results          INTEGER NOT NULL DEFAULT 0,
        due_at           DOUBLE PRECISION,  -- while an attempt runs: when its claim ends
        last_detail      TEXT
    );
    CREATE INDEX ix_notifications_due ON notifications (due_at) WHERE state = 'pending';
    CREATE INDEX ix_notifications_group ON notifications (group_id, event);

    CREATE TABLE timeline (
        seq              BIGSERIAL PRIMARY KEY,
        group_id         TEXT NOT NULL,
        at               DOUBLE PRECISION NOT NULL,
        event            TEXT NOT NULL,
        detail           TEXT
    );
    CREATE INDEX ix_timeline_group ON timeline (group_id, seq);

    CREATE TABLE maintenance (
        integration_id   TEXT PRIMARY KEY,
        mode             TEXT NOT NULL,
        started_at       DOUBLE PRECISION NOT NULL,
        ends_at          DOUBLE PRECISION NOT NULL,
        group_id         TEXT
    );

    CREATE TABLE receipts (
        key              TEXT PRIMARY KEY,
        alert_id         TEXT NOT NULL,
        created_at       DOUBLE PRECISION NOT NULL
    );

    CREATE TABLE admissions (
        integration_id   TEXT NOT NULL,
        at               DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX ix_admissions ON admissions (integration_id, at);
    """,
    # 2: the UI's label filter and grouping id (SQLite's migration 5).
    """
    ALTER TABLE alert_groups ADD COLUMN grouping_id TEXT;
    CREATE TABLE group_labels (
        key              TEXT NOT NULL,
        value            TEXT NOT NULL,
        group_seq        BIGINT NOT NULL,
        PRIMARY KEY (key, value, group_seq)
    );
    CREATE INDEX ix_group_labels_group ON group_labels (group_seq);
    """,
)
