//! What the Postgres and SQLite sinks share: the validated table name, the schema template and the columns.

use crate::error::ConfigError;

/// The default table name, as in the files under `migrations/`.
pub(crate) const DEFAULT_TABLE: &str = "audit_events";

/// The longest table name accepted, so that derived index names stay under Postgres' 63-byte limit.
const MAX_TABLE_LEN: usize = 48;

/// A table name checked to be `[a-z_][a-z0-9_]*` (at most 48 bytes), optionally `schema.` qualified, so it can
/// be spliced into SQL without quoting and without any way to inject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Table {
    qualified: String,
    name_start: usize,
}

impl Table {
    pub(crate) fn parse(text: &str, allow_schema: bool) -> Result<Self, ConfigError> {
        let invalid = || ConfigError::InvalidTableName(text.to_owned());
        let parts: Vec<&str> = text.split('.').collect();
        let ok = match parts.as_slice() {
            [name] => is_identifier(name),
            [schema, name] if allow_schema => is_identifier(schema) && is_identifier(name),
            _ => false,
        };
        if !ok {
            return Err(invalid());
        }
        Ok(Table { qualified: text.to_owned(), name_start: text.rfind('.').map_or(0, |dot| dot + 1) })
    }

    pub(crate) fn qualified(&self) -> &str {
        &self.qualified
    }

    fn name(&self) -> &str {
        &self.qualified[self.name_start..]
    }

    /// A schema file with `audit_events` replaced by this table (and its index names by `<name>_…`).
    pub(crate) fn schema_sql(&self, template: &str) -> String {
        let index_prefix = format!("{}_", self.name());
        template
            .replace("audit_events_", "\u{0}")
            .replace(DEFAULT_TABLE, self.qualified())
            .replace('\u{0}', &index_prefix)
    }
}

fn is_identifier(s: &str) -> bool {
    let mut bytes = s.bytes();
    matches!(bytes.next(), Some(b'a'..=b'z' | b'_'))
        && bytes.all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_'))
        && s.len() <= MAX_TABLE_LEN
}

/// The columns, in the order both sinks bind them (those of schema versions 2 and 3 last, as they are in the
/// table).
pub(crate) const COLUMNS: &str = "id, seq, time, kind, outcome, method, route, path, status, grpc_status, latency_us, \
                                  request_id, actor, client_addr, user_agent, attributes, version, instance, boot, \
                                  prev_hash, hash";
pub(crate) const COLUMN_COUNT: usize = 21;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_are_counted() {
        assert_eq!(COLUMNS.split(',').count(), COLUMN_COUNT);
    }

    #[test]
    fn table_names_are_validated() {
        for good in ["audit_events", "_a1", "audit.events"] {
            assert!(Table::parse(good, true).is_ok(), "{good}");
        }
        for bad in ["", "1abc", "Audit", "audit events", "a;drop table x", "a\"b", "a.b.c", ".a", "a.", &"a".repeat(49)]
        {
            let err = Table::parse(bad, true).unwrap_err();
            assert!(matches!(err, ConfigError::InvalidTableName(ref t) if t == bad), "{bad}");
        }
        assert!(Table::parse("audit.events", false).is_err(), "SQLite has no schemas");
    }

    #[test]
    fn schema_template_is_rewritten_for_the_table() {
        let template = "CREATE TABLE IF NOT EXISTS audit_events (x int);\n\
                        CREATE INDEX IF NOT EXISTS audit_events_time_idx ON audit_events (time);";
        let sql = Table::parse("logs.trail", true).unwrap().schema_sql(template);
        assert_eq!(
            sql,
            "CREATE TABLE IF NOT EXISTS logs.trail (x int);\n\
             CREATE INDEX IF NOT EXISTS trail_time_idx ON logs.trail (time);"
        );
        assert_eq!(Table::parse(DEFAULT_TABLE, true).unwrap().schema_sql(template), template);
    }
}
