-- tower-audit: schema version 2 for Postgres (event schema version 2): who recorded each event.
-- PostgresSink::ensure_schema() runs 0001 and then exactly this, in one transaction, with `audit_events` replaced
-- by the configured table name; both are idempotent, so it creates a fresh table or upgrades a version 1 table
-- in place, and running it again changes nothing.
--
-- `instance` names the process and `boot` the pipeline run (a UUIDv7, made when the layer is built); `seq`
-- counts from 1 within a boot. Rows written before this version keep NULL in both.
--
-- Adding a nullable column without a default only changes the catalog: no table rewrite, whatever its size.
ALTER TABLE audit_events ADD COLUMN IF NOT EXISTS instance text;
ALTER TABLE audit_events ADD COLUMN IF NOT EXISTS boot uuid;
-- One row per (boot, seq): a second event under a number already taken is refused, whatever its id. It is also
-- the index a verifier walks (`WHERE boot = $1 ORDER BY seq`). NULLs are distinct, so version 1 rows pass.
-- Building it reads the whole table and blocks writes meanwhile: on a large version 1 table, create it first
-- with `CREATE UNIQUE INDEX CONCURRENTLY audit_events_boot_seq_key ON audit_events (boot, seq)`, and this line
-- then does nothing.
CREATE UNIQUE INDEX IF NOT EXISTS audit_events_boot_seq_key ON audit_events (boot, seq);
-- Indexes, each paid for on every insert:
-- - kept: `time` (time windows, retention deletes), `(actor, time)` (what did this account do) and
--   `(kind, time)` (every failed login of the last hour). These are an auditor's questions; they filter on
--   actor, kind and time, which neither the primary key on `id` nor `(boot, seq)` can serve.
-- - none on `instance`: a boot belongs to one instance, so finding an instance's events goes through its few
--   boots (`SELECT DISTINCT boot FROM audit_events WHERE instance = $1` is a rare forensic query, fine as a scan).
