-- tower-audit: schema version 2 for SQLite (event schema version 2): who recorded each event.
-- SqliteSink::ensure_schema() runs 0001 and then this, in one write transaction, with `audit_events` replaced by
-- the configured table name. SQLite has no `ADD COLUMN IF NOT EXISTS`: it skips an `ADD COLUMN` whose column
-- `pragma_table_info` already lists, so it creates a fresh table or upgrades a version 1 table in place, and
-- running it again changes nothing. Run by hand, run it once.
--
-- `instance` names the process and `boot` the pipeline run (a UUIDv7 as text, made when the layer is built);
-- `seq` counts from 1 within a boot. Rows written before this version keep NULL in both.
ALTER TABLE audit_events ADD COLUMN instance TEXT;
ALTER TABLE audit_events ADD COLUMN boot TEXT;
-- One row per (boot, seq): a second event under a number already taken is refused, whatever its id. It is also
-- the index a verifier walks (`WHERE boot = ? ORDER BY seq`). NULLs are distinct, so version 1 rows pass.
CREATE UNIQUE INDEX IF NOT EXISTS audit_events_boot_seq_key ON audit_events (boot, seq);
-- Indexes, each paid for on every insert:
-- - kept: `time` (time windows, retention deletes), `(actor, time)` (what did this account do) and
--   `(kind, time)` (every failed login of the last hour). These are an auditor's questions; they filter on
--   actor, kind and time, which neither the primary key on `id` nor `(boot, seq)` can serve.
-- - none on `instance`: a boot belongs to one instance, so finding an instance's events goes through its few
--   boots (`SELECT DISTINCT boot FROM audit_events WHERE instance = ?` is a rare forensic query, fine as a scan).
