-- tower-audit: schema version 3 for Postgres (event schema version 3): the integrity hash chain.
-- PostgresSink::ensure_schema() runs 0001, 0002 and then exactly this, with `audit_events` replaced by the
-- configured table name; idempotent, and it only changes the catalog (nullable columns without a default).
--
-- With integrity on, `hash` links each event into its boot's chain and `prev_hash` names the event before it
-- (64 lowercase hex digits each; see the README's "Integrity" section for what the hash covers). Both are NULL
-- without integrity, and in rows written before this version.
ALTER TABLE audit_events ADD COLUMN IF NOT EXISTS prev_hash text;
ALTER TABLE audit_events ADD COLUMN IF NOT EXISTS hash text;
