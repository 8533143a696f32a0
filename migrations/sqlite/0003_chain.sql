-- tower-audit: schema version 3 for SQLite (event schema version 3): the integrity hash chain.
-- SqliteSink::ensure_schema() runs 0001, 0002 and then this, in one write transaction, with `audit_events`
-- replaced by the configured table name, skipping an `ADD COLUMN` whose column already exists. Run by hand, run
-- it once.
--
-- With integrity on, `hash` links each event into its boot's chain and `prev_hash` names the event before it
-- (64 lowercase hex digits each; see the README's "Integrity" section for what the hash covers). Both are NULL
-- without integrity, and in rows written before this version.
ALTER TABLE audit_events ADD COLUMN prev_hash TEXT;
ALTER TABLE audit_events ADD COLUMN hash TEXT;
