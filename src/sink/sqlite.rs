use std::str::FromStr;
use std::time::Duration;

use sqlx::QueryBuilder;
use sqlx::sqlite::{Sqlite, SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};

use crate::error::{ConfigError, SinkError};
use crate::event::AuditEvent;
use crate::sink::AuditSink;
use crate::sink::sql::{COLUMN_COUNT, COLUMNS, DEFAULT_TABLE, Row, Table};

const SCHEMA: &str = include_str!("../../migrations/sqlite/0001_audit_events.sql");

/// SQLite's limit on bound parameters in one statement (since 3.32, as bundled).
const MAX_BINDS: usize = 32_766;
const ROWS_PER_STATEMENT: usize = MAX_BINDS / COLUMN_COUNT;

/// Writes batches into an SQLite table: one transaction per batch, multi-row `INSERT … VALUES` statements
/// chunked under SQLite's bound-parameter limit, idempotent on the event id (`ON CONFLICT (id) DO NOTHING`).
///
/// [`connect`](Self::connect) opens a dedicated pool of one connection (SQLite serialises writers anyway) in WAL
/// mode with `synchronous = NORMAL`, creating the database file if needed. Keep the audit database apart from
/// your application's: a long application transaction would otherwise hold the single writer lock.
///
/// ```no_run
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use tower_audit::{AuditLayer, SqliteSink};
///
/// let sink = SqliteSink::connect("sqlite://audit.db").await?;
/// sink.ensure_schema().await?;
/// let (layer, handle) = AuditLayer::builder(sink).build()?;
/// # drop((layer, handle));
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
#[cfg_attr(docsrs, doc(cfg(feature = "sqlite")))]
pub struct SqliteSink {
    pool: SqlitePool,
    table: Table,
}

impl SqliteSink {
    /// Connections in the pool [`connect`](Self::connect) opens: SQLite has one writer at a time anyway.
    pub const DEFAULT_MAX_CONNECTIONS: u32 = 1;

    /// Opens (creating it if needed) the database at `url` (`sqlite://path/to/audit.db`, or a plain path) on a
    /// dedicated pool of [`DEFAULT_MAX_CONNECTIONS`](Self::DEFAULT_MAX_CONNECTIONS) connection, writing to the
    /// table `audit_events`.
    ///
    /// # Errors
    ///
    /// [`SinkError::Backend`] when the URL is invalid or the file cannot be opened or created.
    pub async fn connect(url: &str) -> Result<Self, SinkError> {
        Self::connect_with(url, Self::DEFAULT_MAX_CONNECTIONS).await
    }

    /// Like [`connect`](Self::connect), with a pool of `max_connections` (more than one only helps if something
    /// else reads the audit database through this sink's pool; writers take turns in SQLite).
    ///
    /// # Errors
    ///
    /// [`SinkError::Backend`] when the URL is invalid or the file cannot be opened or created.
    pub async fn connect_with(url: &str, max_connections: u32) -> Result<Self, SinkError> {
        let options = if url.starts_with("sqlite:") {
            SqliteConnectOptions::from_str(url).map_err(SinkError::backend)?
        } else {
            SqliteConnectOptions::new().filename(url)
        };
        let options = options
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(5));
        let pool = SqlitePoolOptions::new()
            .max_connections(max_connections.max(1))
            .test_before_acquire(false)
            .connect_with(options)
            .await
            .map_err(SinkError::backend)?;
        Ok(Self::from_pool(pool))
    }

    /// Writes through a pool you own.
    pub fn from_pool(pool: SqlitePool) -> Self {
        Self { pool, table: Table::parse(DEFAULT_TABLE, false).expect("the default table name is valid") }
    }

    /// Writes into `table` (`[a-z_][a-z0-9_]*`) instead of `audit_events`.
    ///
    /// # Errors
    ///
    /// [`ConfigError::InvalidTableName`] for anything else, so no SQL can be injected through configuration.
    pub fn table(mut self, table: &str) -> Result<Self, ConfigError> {
        self.table = Table::parse(table, false)?;
        Ok(self)
    }

    /// Creates the table and its indexes (time, actor, kind) if they do not exist. The DDL is the one in
    /// `migrations/sqlite/`.
    ///
    /// # Errors
    ///
    /// [`SinkError::Backend`] when the statements fail.
    pub async fn ensure_schema(&self) -> Result<(), SinkError> {
        let sql = self.table.schema_sql(SCHEMA);
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&self.pool).await.map_err(SinkError::backend)?;
        Ok(())
    }
}

impl AuditSink for SqliteSink {
    async fn write_batch(&self, batch: &[AuditEvent]) -> Result<(), SinkError> {
        let rows = batch.iter().map(Row::from_event).collect::<Result<Vec<_>, _>>()?;
        let mut tx = self.pool.begin().await.map_err(SinkError::backend)?;
        for chunk in rows.chunks(ROWS_PER_STATEMENT) {
            let mut insert =
                QueryBuilder::<Sqlite>::new(format!("INSERT INTO {} ({COLUMNS}) ", self.table.qualified()));
            insert.push_values(chunk, |mut values, row| {
                values
                    .push_bind(&row.id)
                    .push_bind(row.seq)
                    .push_bind(&row.time_text)
                    .push_bind(&row.kind)
                    .push_bind(row.outcome)
                    .push_bind(&row.method)
                    .push_bind(&row.route)
                    .push_bind(&row.path)
                    .push_bind(row.status)
                    .push_bind(row.grpc_status)
                    .push_bind(row.latency_us)
                    .push_bind(&row.request_id)
                    .push_bind(&row.actor)
                    .push_bind(&row.client_addr)
                    .push_bind(&row.user_agent)
                    .push_bind(&row.attributes)
                    .push_bind(row.version);
            });
            insert.push(" ON CONFLICT (id) DO NOTHING");
            insert.build().execute(&mut *tx).await.map_err(SinkError::backend)?;
        }
        tx.commit().await.map_err(SinkError::backend)?;
        Ok(())
    }
}
