-- tower-audit: the audit events table for SQLite (event schema version 1).
-- SqliteSink::ensure_schema() runs exactly this (then 0002), with `audit_events` replaced by the configured table name.
-- `time` is RFC 3339 in UTC with microseconds (2026-11-25T02:35:08.941293Z): it sorts as text.
-- `attributes` is a JSON object (query it with json_extract).
CREATE TABLE IF NOT EXISTS audit_events (
    id          TEXT    PRIMARY KEY NOT NULL,
    seq         INTEGER NOT NULL,
    time        TEXT    NOT NULL,
    kind        TEXT    NOT NULL,
    outcome     TEXT    NOT NULL,
    method      TEXT,
    route       TEXT,
    path        TEXT,
    status      INTEGER,
    grpc_status INTEGER,
    latency_us  INTEGER,
    request_id  TEXT,
    actor       TEXT,
    client_addr TEXT,
    user_agent  TEXT,
    attributes  TEXT    NOT NULL DEFAULT '{}',
    version     INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_events_time_idx ON audit_events (time);
CREATE INDEX IF NOT EXISTS audit_events_actor_time_idx ON audit_events (actor, time);
CREATE INDEX IF NOT EXISTS audit_events_kind_time_idx ON audit_events (kind, time);
