-- tower-audit: the audit events table for Postgres (event schema version 1).
-- PostgresSink::ensure_schema() runs exactly this (then 0002), with `audit_events` replaced by the configured table name.
CREATE TABLE IF NOT EXISTS audit_events (
    id          uuid        PRIMARY KEY,
    seq         bigint      NOT NULL,
    time        timestamptz NOT NULL,
    kind        text        NOT NULL,
    outcome     text        NOT NULL,
    method      text,
    route       text,
    path        text,
    status      integer,
    grpc_status integer,
    latency_us  bigint,
    request_id  text,
    actor       text,
    client_addr inet,
    user_agent  text,
    attributes  jsonb       NOT NULL DEFAULT '{}'::jsonb,
    version     smallint    NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_events_time_idx ON audit_events (time);
CREATE INDEX IF NOT EXISTS audit_events_actor_time_idx ON audit_events (actor, time);
CREATE INDEX IF NOT EXISTS audit_events_kind_time_idx ON audit_events (kind, time);
