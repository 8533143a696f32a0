use std::time::Duration;

use sqlx::Connection as _;
use sqlx::Error;
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnection, PgPool, PgPoolOptions, Postgres};

use crate::error::{ConfigError, SinkError};
use crate::event::{AuditEvent, Hash};
use crate::integrity::canonical::micros;
use crate::sink::sql::{COLUMNS, DEFAULT_TABLE, Table};
use crate::sink::{AuditSink, pg_copy};

/// Schema version 1: the table and its indexes.
const SCHEMA_V1: &str = include_str!("../../migrations/postgres/0001_audit_events.sql");
/// Schema version 2: `instance`, `boot` and the unique `(boot, seq)` index.
const SCHEMA_V2: &str = include_str!("../../migrations/postgres/0002_identity.sql");
/// Schema version 3: the integrity chain's columns.
const SCHEMA_V3: &str = include_str!("../../migrations/postgres/0003_chain.sql");
/// The index schema version 2 adds, as named in its file.
const V2_INDEX: &str = "audit_events_boot_seq_key";

/// Writes batches into a Postgres table, one binary `COPY … FROM STDIN` per batch (one statement, so one
/// transaction; the server's cheapest way in for rows), idempotent on the event id: a batch that meets a row
/// already stored (a retry after a commit whose answer was lost) writes nothing by `COPY` and goes again, on the
/// same connection, as one `INSERT … ON CONFLICT (id) DO NOTHING`, so a retried batch never duplicates a row. An
/// event with another id under a `(boot, seq)` already stored fails the batch (the table's unique index).
///
/// # Written, failed, ambiguous
///
/// The worker bounds each write by its sink timeout; when that passes it drops the write, retries the batch (same
/// ids) and in the end hands it to the fallback sink. Dropping the write does not stop a statement the server has
/// already received: a stalled backend (stopped, swapped out, waiting for a lock) runs it whenever it gets going
/// again. It acts on a cancel request or its `statement_timeout` only once it runs again (with a fresh timer for
/// a statement it had not yet read), and it notices a closed socket only after running what it had read. So this
/// sink sends `COMMIT` only once the `INSERT` has answered, and closes (never returns to the pool) a connection
/// whose write was dropped half-way. A batch's outcome is then one of:
///
/// - **written** (`Ok`): `COMMIT` answered; every event of the batch is in the table exactly once.
/// - **failed** (an error, or the write dropped, before `COMMIT` was sent): the transaction can never commit; the
///   server rolls it back when it reads the `ROLLBACK` or the end of the session, however late. A batch the
///   worker counts as failed and hands to the fallback is in the fallback only.
/// - **ambiguous** (the write dropped, or the connection lost, while `COMMIT` was on its way): the rows may
///   commit. The worker retries it like a failure and the idempotent insert settles it: the uncommitted rows hold
///   their ids, so the retry's insert waits until that transaction ends, then skips the rows that committed or
///   writes them itself; `Ok` means the batch is in the table exactly once. Only when the retries run out before
///   the server finishes that `COMMIT` does the batch reach the fallback while it may still commit: it can then
///   be in both places (a duplicate, never a loss); merge the fallback back on `id`.
///
/// The price is two more round trips per batch (`BEGIN`, `COMMIT`), small beside the insert itself. A
/// server-side `statement_timeout` below the sink timeout on the sink's connections (e.g.
/// `?options[statement_timeout]=4s` in the URL) makes a live but slow backend give up on its own, freeing the ids
/// sooner for the retry; the guarantees above do not depend on it.
///
/// # Its own pool
///
/// [`connect`](Self::connect) opens a **dedicated pool** of [`DEFAULT_MAX_CONNECTIONS`](Self::DEFAULT_MAX_CONNECTIONS)
/// connections used only by the worker. That is the safe choice: auditing can never take a connection your
/// handlers need, and a slow audit insert can never make a request wait. [`from_pool`](Self::from_pool) shares a
/// pool you already have; that works too (the worker only ever holds one connection, and never on the request
/// path), but audit writes then queue behind your handlers for the pool, so under load the audit trail lags and
/// a batch may time out and be retried.
///
/// ```no_run
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use tower_audit::{AuditLayer, PostgresSink};
///
/// let sink = PostgresSink::connect("postgres://postgres@127.0.0.1/app").await?.table("audit_events")?;
/// sink.ensure_schema().await?;
/// let (layer, handle) = AuditLayer::builder(sink).build()?;
/// # drop((layer, handle));
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub struct PostgresSink {
    pool: PgPool,
    table: Table,
    /// The batch's `COPY`, and the `INSERT … ON CONFLICT (id) DO NOTHING` a batch meeting a stored row goes by.
    copy: String,
    insert_idempotent: String,
}

impl PostgresSink {
    /// Connections in the pool [`connect`](Self::connect) opens: one for the worker, one spare so a reconnect
    /// or `ensure_schema` never waits.
    pub const DEFAULT_MAX_CONNECTIONS: u32 = 2;

    /// Opens a dedicated pool of [`DEFAULT_MAX_CONNECTIONS`](Self::DEFAULT_MAX_CONNECTIONS) to `url`
    /// (`postgres://user@host/db`), writing to the table `audit_events`.
    ///
    /// # Errors
    ///
    /// [`SinkError::Backend`] when the URL is invalid or the server cannot be reached.
    pub async fn connect(url: &str) -> Result<Self, SinkError> {
        Self::connect_with(url, Self::DEFAULT_MAX_CONNECTIONS).await
    }

    /// Like [`connect`](Self::connect), with a pool of `max_connections`.
    ///
    /// # Errors
    ///
    /// [`SinkError::Backend`] when the URL is invalid or the server cannot be reached.
    pub async fn connect_with(url: &str, max_connections: u32) -> Result<Self, SinkError> {
        let pool = PgPoolOptions::new()
            .max_connections(max_connections.max(1))
            .acquire_timeout(Duration::from_secs(5))
            // A broken connection shows up as a failed insert, which the worker retries on a fresh one; a ping
            // before every batch would double the round trips.
            .test_before_acquire(false)
            .connect(url)
            .await
            .map_err(SinkError::backend)?;
        Ok(Self::from_pool(pool))
    }

    /// Writes through a pool you own (see the type's docs for what sharing costs).
    pub fn from_pool(pool: PgPool) -> Self {
        let table = Table::parse(DEFAULT_TABLE, true).expect("the default table name is valid");
        Self { copy: copy_sql(&table), insert_idempotent: insert_sql(&table), pool, table }
    }

    /// Writes into `table` (`[a-z_][a-z0-9_]*`, optionally `schema.table`) instead of `audit_events`.
    ///
    /// # Errors
    ///
    /// [`ConfigError::InvalidTableName`] for anything else, so no SQL can be injected through configuration.
    pub fn table(mut self, table: &str) -> Result<Self, ConfigError> {
        self.table = Table::parse(table, true)?;
        self.copy = copy_sql(&self.table);
        self.insert_idempotent = insert_sql(&self.table);
        Ok(self)
    }

    /// Brings the table to schema version 3: creates it with its indexes (time, actor, kind, and the unique
    /// `(boot, seq)`) if it does not exist, and upgrades an older table in place (adds version 2's `instance`
    /// and `boot` columns and unique index, and version 3's `prev_hash` and `hash` columns, NULL in the rows
    /// already there). Running it again changes nothing. The DDL is the one in `migrations/postgres/`, `0001`,
    /// `0002` then `0003`, for those who run migrations themselves.
    ///
    /// The upgrade runs only when the table lacks one of those: its `ALTER TABLE`s would lock the table
    /// exclusively, behind any query reading it, even when they change nothing. Building the unique index on a
    /// large version 1 table blocks writes while it reads the table; see the migration file to build it
    /// concurrently beforehand.
    ///
    /// # Errors
    ///
    /// [`SinkError::Backend`] when the statements fail.
    pub async fn ensure_schema(&self) -> Result<(), SinkError> {
        self.upgrade().await.map_err(SinkError::backend)
    }

    async fn upgrade(&self) -> Result<(), sqlx::Error> {
        let run = |template| sqlx::raw_sql(sqlx::AssertSqlSafe(self.table.schema_sql(template)));
        run(SCHEMA_V1).execute(&self.pool).await?;
        let at_v2: bool = sqlx::query_scalar(
            "SELECT (SELECT count(*) FROM pg_attribute \
                     WHERE attrelid = to_regclass($1) AND attname IN ('instance', 'boot') AND NOT attisdropped) = 2 \
                AND EXISTS (SELECT 1 FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
                            WHERE i.indrelid = to_regclass($1) AND c.relname = $2)",
        )
        .bind(self.table.qualified())
        .bind(self.table.schema_sql(V2_INDEX))
        .fetch_one(&self.pool)
        .await?;
        if !at_v2 {
            // Several statements in one simple query: one transaction.
            run(SCHEMA_V2).execute(&self.pool).await?;
        }
        let at_v3: bool = sqlx::query_scalar(
            "SELECT count(*) = 2 FROM pg_attribute \
             WHERE attrelid = to_regclass($1) AND attname IN ('prev_hash', 'hash') AND NOT attisdropped",
        )
        .bind(self.table.qualified())
        .fetch_one(&self.pool)
        .await?;
        if !at_v3 {
            run(SCHEMA_V3).execute(&self.pool).await?;
        }
        Ok(())
    }
}

/// Postgres' `unique_violation`.
const UNIQUE_VIOLATION: &str = "23505";

fn copy_sql(table: &Table) -> String {
    format!("COPY {} ({COLUMNS}) FROM STDIN (FORMAT binary)", table.qualified())
}

/// The batch as one statement: each column bound as one array in its own type (binary on the wire, so ids,
/// boots and addresses need no text parsing), the arrays unnested into rows.
fn insert_sql(table: &Table) -> String {
    format!(
        "INSERT INTO {table} ({COLUMNS}) \
         SELECT id, seq, 'epoch'::timestamptz + micros * interval '1 microsecond', kind, outcome, method, \
                route, path, status, grpc_status, latency_us, request_id, actor, client_addr, user_agent, \
                attributes::jsonb, version, instance, boot, prev_hash, hash \
         FROM UNNEST($1::uuid[], $2::int8[], $3::int8[], $4::text[], $5::text[], $6::text[], $7::text[], \
                     $8::text[], $9::int4[], $10::int4[], $11::int8[], $12::text[], $13::text[], $14::inet[], \
                     $15::text[], $16::text[], $17::int2[], $18::text[], $19::uuid[], $20::text[], $21::text[]) \
              AS t(id, seq, micros, kind, outcome, method, route, path, status, grpc_status, latency_us, \
                   request_id, actor, client_addr, user_agent, attributes, version, instance, boot, prev_hash, hash) \
         ON CONFLICT (id) DO NOTHING",
        table = table.qualified()
    )
}

/// A batch goes in as one binary `COPY` into the table (one statement, so one transaction): the server's
/// cheapest way in for rows, with no SQL to parse and no text to cast. `COPY` cannot skip a row already stored
/// (a batch retried after its commit went through unacknowledged): it then fails whole, writing nothing, and the
/// batch goes again on the same connection as `INSERT … ON CONFLICT (id) DO NOTHING`, so each event is stored
/// once whatever is retried.
impl AuditSink for PostgresSink {
    async fn write_batch(&self, batch: &[AuditEvent]) -> Result<(), SinkError> {
        let data = pg_copy::encode(batch)?;
        let mut checkout = Checkout { conn: self.pool.acquire().await.map_err(SinkError::backend)?, answered: false };
        let copied = async {
            let mut copy = checkout.conn.copy_in_raw(&self.copy).await?;
            copy.send(data).await?;
            // Only `finish` ends the data: a write dropped before it can never commit.
            copy.finish().await
        }
        .await;
        let written = match copied {
            Err(Error::Database(e)) if e.code().as_deref() == Some(UNIQUE_VIOLATION) => {
                insert(&self.insert_idempotent, batch, &mut checkout.conn).await
            }
            copied => copied.map(drop),
        };
        checkout.answered = true;
        written.map_err(SinkError::backend)
    }
}

/// Runs `sql` (one of the sink's inserts) with `batch` bound, in a transaction.
async fn insert(sql: &str, batch: &[AuditEvent], conn: &mut PgConnection) -> Result<(), Error> {
    let n = batch.len();
    let text = |f: fn(&AuditEvent) -> Option<&str>| batch.iter().map(f).collect::<Vec<_>>();
    let mut attributes = Vec::with_capacity(n);
    for event in batch {
        attributes.push(serde_json::to_string(&event.attributes).map_err(|e| Error::Encode(e.into()))?);
    }
    let hex =
        |f: fn(&AuditEvent) -> Option<Hash>| batch.iter().map(|e| f(e).map(|h| h.to_string())).collect::<Vec<_>>();
    let insert = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(batch.iter().map(|e| e.id).collect::<Vec<_>>())
        .bind(batch.iter().map(|e| i64::try_from(e.seq).unwrap_or(i64::MAX)).collect::<Vec<_>>())
        // As the chain's encoding counts it (before 1970 too), so a verifier reads back the time hashed.
        .bind(batch.iter().map(|e| micros(e.time)).collect::<Vec<_>>())
        .bind(batch.iter().map(|e| &*e.kind).collect::<Vec<_>>())
        .bind(batch.iter().map(|e| e.outcome.as_str()).collect::<Vec<_>>())
        .bind(text(|e| e.method.as_deref()))
        .bind(text(|e| e.route.as_deref()))
        .bind(text(|e| e.path.as_deref()))
        .bind(batch.iter().map(|e| e.status.map(i32::from)).collect::<Vec<_>>())
        .bind(batch.iter().map(|e| e.grpc_status).collect::<Vec<_>>())
        .bind(batch.iter().map(|e| e.latency_us.map(|l| i64::try_from(l).unwrap_or(i64::MAX))).collect::<Vec<_>>())
        .bind(text(|e| e.request_id.as_deref()))
        .bind(text(|e| e.actor.as_deref()))
        .bind(batch.iter().map(|e| e.client_addr).collect::<Vec<_>>())
        .bind(text(|e| e.user_agent.as_deref()))
        .bind(attributes)
        .bind(batch.iter().map(|e| i16::try_from(e.version).unwrap_or(i16::MAX)).collect::<Vec<_>>())
        .bind(text(|e| e.instance.as_deref()))
        .bind(batch.iter().map(|e| e.boot).collect::<Vec<_>>())
        .bind(hex(|e| e.prev_hash))
        .bind(hex(|e| e.hash));
    let mut tx = conn.begin().await?;
    insert.execute(&mut *tx).await?;
    // Only now: a write dropped before this point can never commit.
    tx.commit().await
}

struct Checkout {
    conn: PoolConnection<Postgres>,
    answered: bool,
}

impl Drop for Checkout {
    fn drop(&mut self) {
        if !self.answered {
            self.conn.close_on_drop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_version_2_check_looks_for_the_index_the_file_creates() {
        assert!(
            SCHEMA_V2.contains(&format!("CREATE UNIQUE INDEX IF NOT EXISTS {V2_INDEX} ON audit_events (boot, seq);"))
        );
        let table = Table::parse("logs.trail", true).unwrap();
        assert_eq!(table.schema_sql(V2_INDEX), "trail_boot_seq_key");
    }
}
