use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::Arguments as _;
use sqlx::sqlite::{
    SqliteArguments, SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use crate::error::{ConfigError, SinkError};
use crate::event::AuditEvent;
use crate::sink::AuditSink;
use crate::sink::sql::{COLUMN_COUNT, COLUMNS, DEFAULT_TABLE, Table};

/// Schema version 1: the table and its indexes.
const SCHEMA_V1: &str = include_str!("../../migrations/sqlite/0001_audit_events.sql");
/// Schema version 2: `instance`, `boot` and the unique `(boot, seq)` index.
const SCHEMA_V2: &str = include_str!("../../migrations/sqlite/0002_identity.sql");
/// Schema version 3: the integrity chain's columns.
const SCHEMA_V3: &str = include_str!("../../migrations/sqlite/0003_chain.sql");

/// SQLite's limit on bound parameters in one statement (since 3.32, as bundled).
const MAX_BINDS: usize = 32_766;
const ROWS_PER_STATEMENT: usize = (MAX_BINDS - SHARED.len()) / COLUMN_COUNT;

/// Writes batches into an SQLite table: one transaction per batch, multi-row `INSERT … VALUES` statements
/// chunked under SQLite's bound-parameter limit, idempotent on the event id (`ON CONFLICT (id) DO NOTHING`). An
/// event with another id under a `(boot, seq)` already stored fails the batch (the table's unique index).
///
/// [`connect`](Self::connect) opens a dedicated pool of one connection (SQLite serialises writers anyway) in WAL
/// mode with `synchronous = NORMAL`, creating the database file if needed. That connection leaves checkpoints
/// to a second connection of the sink's own, which runs them in the background after a batch (every 2 s, or one
/// after another once the WAL file passes 20 MiB), so a checkpoint's `fsync` seldom holds a batch up. The writer
/// checkpoints itself only once the WAL file has passed 40 MiB (the background checkpoints fell behind, or
/// failed), so the WAL stays bounded. Both connections open the file when the sink connects and keep it; a
/// relative path is made absolute, so a connection sqlx must replace opens the same file, even after the process
/// changes directory. An in-memory database (`sqlite::memory:`) has no WAL and no checkpoints. Keep the audit
/// database apart from your application's: a long application transaction would otherwise hold the single
/// writer lock.
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
    /// With a pool the sink opened itself: checkpoints the WAL from a connection of its own.
    checkpoints: Option<Arc<Checkpointer>>,
}

impl SqliteSink {
    /// Connections in the pool [`connect`](Self::connect) opens: SQLite has one writer at a time anyway.
    pub const DEFAULT_MAX_CONNECTIONS: u32 = 1;

    /// A batch size for [`AuditLayerBuilder::batch_size`](crate::AuditLayerBuilder::batch_size) when this sink
    /// shares the CPU with the requests it audits: 128 events, where the layer's default is
    /// [`DEFAULT_BATCH_SIZE`](crate::DEFAULT_BATCH_SIZE) (512).
    ///
    /// SQLite writes on a thread of the server's own, and a batch's write holds a core for as long as its
    /// B-tree work takes, about 4 µs an event with the default schema. The kernel does not take the core back
    /// before the thread's time slice is up, so every request in flight on that core waits out the whole write:
    /// about 2 ms for 512 events, 0.5 ms for 128. On the example auth server pinned to one core at about 12 k
    /// requests/s, batches of 128 had the lower p99 in every one of seven rounds (1.33× no auditing's, against
    /// 1.46×) at no cost in throughput (0.901× against 0.876×); three shorter sets agreed, one did not
    /// (BENCHMARKS.md §4). A sink with a core of its own, or one that must catch up on a long backlog, does
    /// better with larger batches: each batch is one commit.
    ///
    /// ```no_run
    /// use tower_audit::{AuditLayer, SqliteSink};
    ///
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// let sink = SqliteSink::connect("audit.db").await?;
    /// sink.ensure_schema().await?;
    /// let (layer, handle) = AuditLayer::builder(sink).batch_size(SqliteSink::SUGGESTED_BATCH_SIZE).build()?;
    /// # drop((layer, handle));
    /// # Ok(())
    /// # }
    /// ```
    pub const SUGGESTED_BATCH_SIZE: usize = 128;

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
        let in_memory = url.contains(":memory:") || url.contains("mode=memory");
        let mut options = options
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(5));
        if in_memory {
            // No file, no WAL: nothing to checkpoint.
            let pool = Self::pool(max_connections).connect_with(options).await.map_err(SinkError::backend)?;
            return Ok(Self::from_pool(pool));
        }
        // Every connection, opened now or later, opens this very file, even after the process changes directory.
        let path = std::path::absolute(options.get_filename()).map_err(SinkError::backend)?;
        options = options.filename(&path);
        // The writer never checkpoints on its own: SQLite's automatic checkpoint runs inside the commit that
        // fills the WAL, and its `fsync` can wait seconds on a disk's cache flush, with the queue filling
        // meanwhile. A connection of the sink's own does it instead (see `Checkpointer`). When the WAL starts
        // over, SQLite cuts its file back to half the guard, so past that the file's size is the WAL's own.
        let writer = options
            .clone()
            .pragma("wal_autocheckpoint", "0")
            .pragma("journal_size_limit", (WAL_GUARD_BYTES / 2).to_string());
        let pool = Self::pool(max_connections).connect_with(writer).await.map_err(SinkError::backend)?;
        // Opened now, on the file the writer holds, and kept: a connection opened later to the same path could
        // reach another file (one put there after this one moved) and checkpoint this WAL into it.
        let checkpointer =
            Self::pool(1).connect_with(options.create_if_missing(false)).await.map_err(SinkError::backend)?;
        let mut wal = path.into_os_string();
        wal.push("-wal");
        let checkpoints = Checkpointer::new(checkpointer, wal.into());
        Ok(Self { checkpoints: Some(Arc::new(checkpoints)), ..Self::from_pool(pool) })
    }

    /// The sink's pools keep their connections (no idle timeout, no lifetime): each opens the file once. (An
    /// in-memory database would vanish with its last connection.)
    fn pool(max_connections: u32) -> SqlitePoolOptions {
        SqlitePoolOptions::new()
            .max_connections(max_connections.max(1))
            .test_before_acquire(false)
            .idle_timeout(None)
            .max_lifetime(None)
    }

    /// Writes through a pool you own. Its connections checkpoint the WAL as you configured them (SQLite's
    /// default: automatically, inside the commit that fills it), not the way [`connect`](Self::connect)'s do.
    pub fn from_pool(pool: SqlitePool) -> Self {
        Self {
            pool,
            table: Table::parse(DEFAULT_TABLE, false).expect("the default table name is valid"),
            checkpoints: None,
        }
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

    /// Brings the table to schema version 3, in one write transaction: creates it with its indexes (time,
    /// actor, kind, and the unique `(boot, seq)`) if it does not exist, and upgrades an older table in place
    /// (adds the `instance` and `boot` columns of version 2 and the unique index, and the `prev_hash` and `hash`
    /// columns of version 3, NULL in the rows already there). Running it again changes nothing. The DDL is the
    /// one in `migrations/sqlite/`, `0001`, `0002` then `0003`.
    ///
    /// # Errors
    ///
    /// [`SinkError::Backend`] when the statements fail.
    pub async fn ensure_schema(&self) -> Result<(), SinkError> {
        self.upgrade().await.map_err(SinkError::backend)
    }

    async fn upgrade(&self) -> Result<(), sqlx::Error> {
        // IMMEDIATE: take the write lock before reading the columns, so two processes cannot both add one.
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(self.table.schema_sql(SCHEMA_V1))).execute(&mut *tx).await?;
        let columns: Vec<String> = sqlx::query_scalar("SELECT name FROM pragma_table_info(?)")
            .bind(self.table.qualified())
            .fetch_all(&mut *tx)
            .await?;
        let upgrades = [SCHEMA_V2, SCHEMA_V3].map(|template| self.table.schema_sql(template));
        for statement in upgrades.iter().flat_map(|sql| statements(sql)) {
            // SQLite has no `ADD COLUMN IF NOT EXISTS`.
            if added_column(&statement).is_some_and(|added| columns.iter().any(|c| c.eq_ignore_ascii_case(added))) {
                continue;
            }
            sqlx::raw_sql(sqlx::AssertSqlSafe(statement)).execute(&mut *tx).await?;
        }
        tx.commit().await
    }
}

/// The statements of a schema file, without its comments (whole lines starting with `--`).
fn statements(sql: &str) -> Vec<String> {
    let code: Vec<&str> = sql.lines().filter(|line| !line.trim_start().starts_with("--")).collect();
    code.join("\n").split(';').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect()
}

/// The column an `ALTER TABLE … ADD COLUMN name …` statement adds.
fn added_column(statement: &str) -> Option<&str> {
    let words: Vec<&str> = statement.split_whitespace().take(6).collect();
    match words.as_slice() {
        [alter, table, _, add, column, name]
            if [(alter, "alter"), (table, "table"), (add, "add"), (column, "column")]
                .iter()
                .all(|(word, keyword)| word.eq_ignore_ascii_case(keyword)) =>
        {
            Some(name)
        }
        _ => None,
    }
}

impl AuditSink for SqliteSink {
    async fn write_batch(&self, batch: &[AuditEvent]) -> Result<(), SinkError> {
        if batch.is_empty() {
            return Ok(());
        }
        if batch.len() <= ROWS_PER_STATEMENT {
            // One statement is a transaction of its own (SQLite commits it whole or not at all): one round trip
            // to sqlx's thread, not three (`BEGIN`, the insert, `COMMIT`).
            let (sql, args) = insert(&self.table, batch)?;
            sqlx::query_with(sqlx::AssertSqlSafe(sql), args).execute(&self.pool).await.map_err(SinkError::backend)?;
        } else {
            let mut tx = self.pool.begin().await.map_err(SinkError::backend)?;
            for chunk in batch.chunks(ROWS_PER_STATEMENT) {
                let (sql, args) = insert(&self.table, chunk)?;
                sqlx::query_with(sqlx::AssertSqlSafe(sql), args).execute(&mut *tx).await.map_err(SinkError::backend)?;
            }
            tx.commit().await.map_err(SinkError::backend)?;
        }
        if let Some(checkpoints) = &self.checkpoints {
            // The batch is stored: a failed checkpoint is logged, and tried again after the next batch.
            checkpoints.after_write(&self.pool).await;
        }
        Ok(())
    }
}

/// The WAL file's size past which the writer checkpoints itself, as SQLite's automatic checkpoint would (40 MiB:
/// 10,000 pages of 4 KiB). The background checkpoints copy the WAL into the database, but the WAL starts over
/// from its beginning only after a checkpoint that no write overlapped: between batches that happens by itself,
/// under writes that never pause only the writer can make sure of it; and if the background checkpoints fail,
/// nothing else keeps the WAL bounded.
///
/// Past half the guard, background checkpoints run one after another. When the WAL starts over, SQLite cuts the
/// file back to that half (`journal_size_limit`): below it the file keeps the largest size the WAL reached, so
/// only past it does the file's size tell what the WAL holds now. (Cut back to the whole guard, a file that had
/// once passed half of it stayed there, and checkpoints ran one after another from then on: on the example
/// server under load, 413 checkpoints in a run that needed 33, each a WAL `fsync` on the writer's path when the
/// WAL started over, and writes stalled up to a second behind them.)
const WAL_GUARD_BYTES: u64 = 40 << 20;
/// The least time between the starts of two background checkpoints.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(2);

/// Checkpoints the WAL of a sink that [`connect`](SqliteSink::connect) opened, from a connection of its own and
/// a task of its own, so the writer never waits for that checkpoint's `fsync`: after a batch is written, it
/// starts one (`PRAGMA wal_checkpoint(PASSIVE)`, which never blocks the writer) unless one runs or one started
/// less than [`CHECKPOINT_EVERY`] ago (once the WAL file has passed half the guard: whenever none runs). If the
/// WAL file has passed [`WAL_GUARD_BYTES`] all the same, the writer checkpoints itself before it goes on, as
/// SQLite would have: the WAL stays bounded, whatever the background checkpoints manage.
#[derive(Debug)]
struct Checkpointer {
    pool: SqlitePool,
    /// The WAL file (the database's absolute path and `-wal`).
    wal: std::path::PathBuf,
    /// [`WAL_GUARD_BYTES`] (lower in tests).
    guard_bytes: u64,
    state: std::sync::Mutex<CheckpointState>,
}

#[derive(Debug, Default)]
struct CheckpointState {
    running: bool,
    last_start: Option<std::time::Instant>,
}

impl Checkpointer {
    fn new(pool: SqlitePool, wal: std::path::PathBuf) -> Self {
        Self { pool, wal, guard_bytes: WAL_GUARD_BYTES, state: Default::default() }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, CheckpointState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn after_write(self: &Arc<Self>, writer: &SqlitePool) {
        // One `stat`: a file that is not there (yet) holds nothing.
        let wal_bytes = std::fs::metadata(&self.wal).map_or(0, |m| m.len());
        if wal_bytes > self.guard_bytes {
            if let Err(error) = checkpoint(writer).await {
                tracing::warn!(%error, wal_bytes, "the writer's checkpoint of the SQLite audit WAL failed");
            }
            return;
        }
        let start = {
            let mut state = self.state();
            // Past half the guard, one after another: the writer's own checkpoint then finds little to copy.
            let due = !state.running
                && (wal_bytes > self.guard_bytes / 2
                    || state.last_start.is_none_or(|t| t.elapsed() >= CHECKPOINT_EVERY));
            if due {
                state.running = true;
                state.last_start = Some(std::time::Instant::now());
            }
            due
        };
        if start {
            let this = Arc::clone(self);
            tokio::spawn(async move {
                let result = checkpoint(&this.pool).await;
                this.state().running = false;
                if let Err(error) = result {
                    tracing::warn!(%error, "a background checkpoint of the SQLite audit WAL failed");
                }
            });
        }
    }
}

/// A passive checkpoint: what it can copy from the WAL without waiting for anyone. (Its counts are not needed:
/// the WAL file's size is what the guard reads.)
async fn checkpoint(pool: &SqlitePool) -> Result<(), sqlx::Error> {
    sqlx::query("PRAGMA wal_checkpoint(PASSIVE)").execute(pool).await.map(drop)
}

/// The columns whose text is often the same down a whole batch (kind, outcome, method, route, path, actor,
/// client, user agent, attributes, instance, boot), by their place in [`COLUMNS`].
const SHARED: [usize; 11] = [3, 4, 5, 6, 7, 12, 13, 14, 15, 17, 18];

/// One multi-row `INSERT … ON CONFLICT (id) DO NOTHING` of `rows`, with its arguments (reserved at once).
///
/// SQLite copies every text bound to a statement, and frees it after: the dearest part of an insert after the
/// B-tree work itself. So a text the whole batch shares is bound once, as one of the statement's first
/// [`SHARED`]`.len()` parameters (the first row's text, or NULL), and the statement reads the rows from a
/// `VALUES` list:
/// - a [`SHARED`] column in which every row holds the first row's value (the same text, or no text) has no
///   place in the `VALUES` rows at all: the statement takes the batch's parameter for every row;
/// - any other [`SHARED`] column is `ifnull(<the row's>, <the batch's>)`. The batch's parameter is the first
///   row's text only if no row leaves the column NULL (so a NULL in a row always means "the batch's"); a row
///   binds NULL where its text equals the batch's, its own text elsewhere.
///
/// The statement's text depends on the row count and on which columns are uniform. sqlx keeps 100 prepared
/// statements per connection; a workload whose batches keep changing shape prepares more often (parsing a
/// 500-row statement costs about as much as running it), which is the price of the uniform columns' saving.
///
/// Every text is bound as an `Arc<str>`, which sqlx takes as it is: one allocation per text, made on the worker
/// and freed by sqlx's own thread. A text equal to the one in the row above (the same kind, method, route, user
/// agent, client, boot; a row's `prev_hash` is the `hash` above it) is that row's `Arc` again, not a new one.
fn insert(table: &Table, rows: &[AuditEvent]) -> Result<(String, SqliteArguments), SinkError> {
    let encode = |e| SinkError::backend(sqlx::Error::Encode(e));
    let mut args = SqliteArguments::default();
    let mut scratch = Scratch::default();
    let mut texts = Texts::default();
    if let Some(first) = rows.first() {
        // One pass: which shared columns every row has a text in, and which hold the first row's everywhere.
        let (everywhere, uniform) = rows.iter().fold(([true; 11], [true; 11]), |(everywhere, uniform), row| {
            let seen = against_first(row, first);
            (std::array::from_fn(|k| everywhere[k] && seen[k].0), std::array::from_fn(|k| uniform[k] && seen[k].1))
        });
        texts.uniform = uniform;
        args.reserve(SHARED.len() + rows.len() * values_per_row(&uniform), 0);
        let firsts = scratch.shared_texts(first, &[false; 11]).map_err(encode)?;
        for (k, first) in firsts.into_iter().enumerate() {
            texts.shared[k] = first.filter(|_| everywhere[k]).map(Arc::from);
            args.add(texts.shared[k].clone()).map_err(encode)?;
        }
    }
    for event in rows {
        texts.bind(event, &mut scratch, &mut args).map_err(encode)?;
    }
    Ok((statement(table, rows.len(), &texts.uniform), args))
}

/// The SQL of [`insert`] for `rows` rows, with the [`SHARED`] columns marked in `uniform` left out of the
/// `VALUES` rows.
fn statement(table: &Table, rows: usize, uniform: &[bool; 11]) -> String {
    use std::fmt::Write as _;
    let per_row = values_per_row(uniform);
    let mut sql = String::with_capacity(500 + COLUMNS.len() + rows * (3 * per_row + 2));
    sql.push_str("INSERT INTO ");
    sql.push_str(table.qualified());
    sql.push_str(" (");
    sql.push_str(COLUMNS);
    // The shared texts' parameters come first in the text, so they are parameters 1 to 11.
    sql.push_str(") SELECT ");
    let mut value = 0;
    for column in 0..COLUMN_COUNT {
        if column > 0 {
            sql.push_str(", ");
        }
        match SHARED.iter().position(|&c| c == column) {
            Some(k) if uniform[k] => sql.push('?'),
            Some(_) => {
                value += 1;
                let _ = write!(sql, "ifnull(column{value}, ?)");
            }
            None => {
                value += 1;
                let _ = write!(sql, "column{value}");
            }
        }
    }
    sql.push_str(" FROM (VALUES ");
    for i in 0..rows {
        sql.push_str(if i > 0 { ", (?" } else { "(?" });
        for _ in 1..per_row {
            sql.push_str(", ?");
        }
        sql.push(')');
    }
    // `WHERE true` tells SQLite's parser that `ON CONFLICT` is the upsert's, not a join's.
    sql.push_str(") WHERE true ON CONFLICT (id) DO NOTHING");
    sql
}

/// The values each `VALUES` row of [`statement`] holds: every column but those in `uniform`.
fn values_per_row(uniform: &[bool; 11]) -> usize {
    COLUMN_COUNT - uniform.iter().filter(|&&u| u).count()
}

/// For each of the [`SHARED`] columns, in the order of [`Scratch::shared_texts`]: whether `e` has a text there
/// (kind, outcome and attributes always do), and whether it holds `first`'s value (the same text, or none).
fn against_first(e: &AuditEvent, first: &AuditEvent) -> [(bool, bool); 11] {
    fn optional<T: PartialEq>(value: &Option<T>, first: &Option<T>) -> (bool, bool) {
        (value.is_some(), value == first)
    }
    [
        (true, e.kind == first.kind),
        (true, e.outcome == first.outcome),
        optional(&e.method, &first.method),
        optional(&e.route, &first.route),
        optional(&e.path, &first.path),
        optional(&e.actor, &first.actor),
        optional(&e.client_addr, &first.client_addr),
        optional(&e.user_agent, &first.user_agent),
        (true, e.attributes == first.attributes),
        optional(&e.instance, &first.instance),
        optional(&e.boot, &first.boot),
    ]
}

/// Buffers the client address, the attributes and the boot are written into.
struct Scratch {
    addr: String,
    json: Vec<u8>,
    boot: [u8; uuid::fmt::Hyphenated::LENGTH],
}

impl Default for Scratch {
    fn default() -> Self {
        Scratch { addr: String::new(), json: Vec::new(), boot: [0; uuid::fmt::Hyphenated::LENGTH] }
    }
}

impl Scratch {
    /// `e`'s texts in the [`SHARED`] columns, in their order; `None` in those marked in `skip`, not written.
    fn shared_texts<'a>(
        &'a mut self,
        e: &'a AuditEvent,
        skip: &[bool; 11],
    ) -> Result<[Option<&'a str>; 11], sqlx::error::BoxDynError> {
        let addr = e.client_addr.filter(|_| !skip[6]).map(|ip| write(&mut self.addr, ip));
        let json = if skip[8] {
            None
        } else {
            self.json.clear();
            serde_json::to_writer(&mut self.json, &e.attributes)?;
            Some(std::str::from_utf8(&self.json)?)
        };
        let boot = e.boot.filter(|_| !skip[10]).map(|b| &*b.hyphenated().encode_lower(&mut self.boot));
        Ok([
            Some(&*e.kind),
            Some(e.outcome.as_str()),
            e.method.as_deref(),
            e.route.as_deref(),
            e.path.as_deref(),
            e.actor.as_deref(),
            addr,
            e.user_agent.as_deref(),
            json,
            e.instance.as_deref(),
            boot,
        ])
    }
}

/// The batch's shared texts, the texts of the row above, column by column, and a buffer for the time.
#[derive(Default)]
struct Texts {
    /// The batch's text in each of the [`SHARED`] columns (`None`: each row binds its own).
    shared: [Option<Arc<str>>; 11],
    /// The [`SHARED`] columns in which every row holds the batch's value: no row binds them.
    uniform: [bool; 11],
    /// The row above's text in each of the [`SHARED`] columns.
    above: [Above; 11],
    /// `hash` and `prev_hash`: the hash of the row above is this row's `prev_hash`.
    hash: Above,
    time: String,
}

/// A column's text in the row above.
#[derive(Default)]
struct Above(Option<Arc<str>>);

impl Above {
    /// `text` as an `Arc<str>`: the row above's when equal, else a new one.
    fn text(&mut self, text: &str) -> Arc<str> {
        match &self.0 {
            Some(above) if **above == *text => Arc::clone(above),
            _ => Arc::clone(self.0.insert(Arc::from(text))),
        }
    }
}

impl Texts {
    fn bind(
        &mut self,
        e: &AuditEvent,
        scratch: &mut Scratch,
        args: &mut SqliteArguments,
    ) -> Result<(), sqlx::error::BoxDynError> {
        let shared = scratch.shared_texts(e, &self.uniform)?;
        let mut shared = shared.into_iter().enumerate().map(|(k, text)| match (text, &self.shared[k]) {
            // The whole batch's value: not in the row at all.
            _ if self.uniform[k] => None,
            // The batch's text: NULL here, the batch's in the table.
            (Some(text), Some(batch)) if **batch == *text => Some(None),
            (text, _) => Some(text.map(|text| self.above[k].text(text))),
        });
        let mut next = |args: &mut SqliteArguments| match shared.next().expect("one value per shared column") {
            Some(value) => args.add(value),
            None => Ok(()),
        };
        let mut id = [0; uuid::fmt::Hyphenated::LENGTH];
        args.add(Arc::<str>::from(&*e.id.hyphenated().encode_lower(&mut id)))?;
        args.add(i64::try_from(e.seq).unwrap_or(i64::MAX))?;
        args.add(Arc::<str>::from(write(&mut self.time, humantime::format_rfc3339_micros(e.time))))?;
        for _ in 3..=7 {
            // kind, outcome, method, route, path
            next(args)?;
        }
        args.add(e.status.map(i32::from))?;
        args.add(e.grpc_status)?;
        args.add(e.latency_us.map(|l| i64::try_from(l).unwrap_or(i64::MAX)))?;
        args.add(e.request_id.as_deref().map(Arc::<str>::from))?;
        for _ in 12..=15 {
            // actor, client address, user agent, attributes
            next(args)?;
        }
        args.add(i16::try_from(e.version).unwrap_or(i16::MAX))?;
        // instance, boot
        next(args)?;
        next(args)?;
        let mut hex = const_hex::Buffer::<32>::new();
        args.add(e.prev_hash.map(|h| self.hash.text(hex.format(&h.0))))?;
        args.add(e.hash.map(|h| self.hash.text(hex.format(&h.0))))
    }
}

/// `value`'s text, written into `buf`.
fn write(buf: &mut String, value: impl std::fmt::Display) -> &str {
    use std::fmt::Write as _;
    buf.clear();
    write!(buf, "{value}").expect("formatting into a String cannot fail");
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fresh events of one boot, numbered on from `*seq`.
    fn events(n: usize, seq: &mut u64) -> Vec<AuditEvent> {
        (0..n)
            .map(|i| {
                let mut e = AuditEvent::new("http.request").actor("alice");
                e.id = uuid::Uuid::now_v7();
                e.boot = Some(uuid::Uuid::from_u128(7));
                e.request_id = Some(format!("req-{i}-{seq}"));
                *seq += 1;
                e.seq = *seq;
                e
            })
            .collect()
    }

    #[test]
    fn a_value_the_whole_batch_shares_is_bound_once_not_in_every_row() {
        let table = Table::parse(DEFAULT_TABLE, false).unwrap();
        let mut rows = events(3, &mut 0);
        // Every shared column holds one value down the batch: each row binds its ten columns of its own only.
        let (sql, args) = insert(&table, &rows).unwrap();
        assert_eq!(args.len(), SHARED.len() + 3 * (COLUMN_COUNT - SHARED.len()));
        assert!(sql.contains("FROM (VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?), (?"), "{sql}");
        // An actor that changes down the batch takes its place in every row again (NULL where it is the batch's).
        rows[1].actor = Some("bob".into());
        let (sql, args) = insert(&table, &rows).unwrap();
        assert_eq!(args.len(), SHARED.len() + 3 * (COLUMN_COUNT - SHARED.len() + 1));
        assert!(sql.contains("ifnull(column8, ?)"), "{sql}");
    }

    /// A sink that `connect` opened on a new database in `dir`, with its schema, and the sink's checkpointer.
    async fn connected(dir: &tempfile::TempDir) -> (SqliteSink, Arc<Checkpointer>) {
        let sink = SqliteSink::connect(dir.path().join("audit.db").to_str().unwrap()).await.unwrap();
        sink.ensure_schema().await.unwrap();
        let checkpoints = sink.checkpoints.clone().expect("connect checkpoints in the background");
        (sink, checkpoints)
    }

    /// `checkpoints`' connection and WAL under another guard (the tests scale it down).
    fn with_guard(checkpoints: &Checkpointer, guard_bytes: u64) -> Arc<Checkpointer> {
        Arc::new(Checkpointer { guard_bytes, ..Checkpointer::new(checkpoints.pool.clone(), checkpoints.wal.clone()) })
    }

    async fn wal_autocheckpoint(pool: &SqlitePool) -> i64 {
        sqlx::query_scalar("PRAGMA wal_autocheckpoint").fetch_one(pool).await.unwrap()
    }

    /// Polls until no background checkpoint runs (bounded).
    async fn idle(checkpoints: &Checkpointer) {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while checkpoints.state().running {
            assert!(std::time::Instant::now() < deadline, "the background checkpoint never ended");
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_writer_never_checkpoints_a_connection_of_its_own_does() {
        let dir = tempfile::tempdir().unwrap();
        let (sink, checkpoints) = connected(&dir).await;
        let path = dir.path().join("audit.db");
        assert_eq!(wal_autocheckpoint(&sink.pool).await, 0, "the writer leaves checkpoints to the sink");
        let limit: i64 = sqlx::query_scalar("PRAGMA journal_size_limit").fetch_one(&sink.pool).await.unwrap();
        assert_eq!(limit, (WAL_GUARD_BYTES / 2) as i64, "a WAL that starts over is cut back to half the guard");
        assert_eq!(wal_autocheckpoint(&checkpoints.pool).await, 1000, "SQLite's default, unused: it never writes");
        let db_bytes = || std::fs::metadata(&path).unwrap().len();
        let before = db_bytes();
        let mut seq = 0;
        // The first write starts a checkpoint at once; it copies what the WAL holds into the database file.
        sink.write_batch(&events(512, &mut seq)).await.unwrap();
        idle(&checkpoints).await;
        assert!(db_bytes() > before + 100 * 1024, "{} bytes, {before} before: nothing was checkpointed", db_bytes());
        assert!(checkpoints.wal.is_absolute() && checkpoints.wal.ends_with("audit.db-wal"), "{:?}", checkpoints.wal);
        let wal_bytes = std::fs::metadata(&checkpoints.wal).unwrap().len();
        assert!(wal_bytes > 0 && wal_bytes < WAL_GUARD_BYTES, "{wal_bytes} bytes of WAL");

        // Past the guard (as if background checkpoints had fallen behind, or failed), the writer checkpoints
        // itself after its batch, even while a background one is counted as running.
        let guarded = SqliteSink { checkpoints: Some(with_guard(&checkpoints, wal_bytes - 1)), ..sink.clone() };
        guarded.checkpoints.as_ref().unwrap().state().running = true;
        let before = db_bytes();
        guarded.write_batch(&events(512, &mut seq)).await.unwrap();
        assert!(db_bytes() > before, "the writer's own checkpoint copied the batch into the database file");
        assert!(checkpoints.state().last_start.is_some() && !checkpoints.state().running);
        let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_events").fetch_one(&sink.pool).await.unwrap();
        assert_eq!(stored, 1024);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn past_half_the_guard_background_checkpoints_run_one_after_another() {
        let dir = tempfile::tempdir().unwrap();
        let (sink, checkpoints) = connected(&dir).await;
        let mut seq = 0;
        sink.write_batch(&events(512, &mut seq)).await.unwrap();
        idle(&checkpoints).await;
        let first = checkpoints.state().last_start.expect("the first batch starts a checkpoint");
        // Under half the guard, a batch within 2 s of the last start starts none.
        sink.write_batch(&events(16, &mut seq)).await.unwrap();
        assert_eq!(checkpoints.state().last_start, Some(first));
        // Past half of it (a guard of just under twice the WAL file), the next batch starts one at once.
        let wal_bytes = std::fs::metadata(&checkpoints.wal).unwrap().len();
        let eager = with_guard(&checkpoints, 2 * wal_bytes - 1);
        eager.state().last_start = Some(first);
        let eager_sink = SqliteSink { checkpoints: Some(Arc::clone(&eager)), ..sink.clone() };
        eager_sink.write_batch(&events(16, &mut seq)).await.unwrap();
        assert!(eager.state().last_start > Some(first), "no checkpoint started past half the guard");
        idle(&eager).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn once_the_wal_starts_over_checkpoints_keep_their_interval_again() {
        let dir = tempfile::tempdir().unwrap();
        let (sink, checkpoints) = connected(&dir).await;
        // The guard and the cut that `connect` set (40 and 20 MiB), scaled down to a guard of 2 MiB.
        let guard: u64 = 2 << 20;
        let cut: i64 = sqlx::query_scalar("PRAGMA journal_size_limit").fetch_one(&sink.pool).await.unwrap();
        let cut = cut as u64 * guard / WAL_GUARD_BYTES;
        sqlx::query(sqlx::AssertSqlSafe(format!("PRAGMA journal_size_limit = {cut}")))
            .execute(&sink.pool)
            .await
            .unwrap();
        let small = with_guard(&checkpoints, guard);
        let sink = SqliteSink { checkpoints: Some(Arc::clone(&small)), ..sink };
        let wal_bytes = || std::fs::metadata(&small.wal).map_or(0, |m| m.len());
        let mut seq = 0;
        // Past half the guard: the WAL file grows over 1 MiB; each batch starts a checkpoint, which copies
        // everything (nothing writes while it runs).
        while wal_bytes() <= guard / 2 {
            assert!(seq < 100 * 512, "the WAL file never passed 1 MiB");
            sink.write_batch(&events(512, &mut seq)).await.unwrap();
            idle(&small).await;
        }
        // The next batch starts the WAL over, and the file is cut back to half the guard: within the interval of
        // the last start, no checkpoint starts.
        let last = std::time::Instant::now();
        small.state().last_start = Some(last);
        sink.write_batch(&events(16, &mut seq)).await.unwrap();
        assert!(wal_bytes() <= guard / 2, "the file was not cut back: {} bytes", wal_bytes());
        assert_eq!(small.state().last_start, Some(last), "a checkpoint started as if the WAL were still past half");
        let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_events").fetch_one(&sink.pool).await.unwrap();
        assert_eq!(stored, seq as i64);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn background_checkpoints_that_fail_leave_the_writer_to_bound_the_wal() {
        let dir = tempfile::tempdir().unwrap();
        let (sink, checkpoints) = connected(&dir).await;
        let wal = checkpoints.wal.clone();
        // A checkpointing connection that can never open (its directory does not exist), and a guard of 1 MiB.
        let unreachable = SqliteConnectOptions::new().filename(dir.path().join("missing").join("audit.db"));
        let failing = Arc::new(Checkpointer {
            guard_bytes: 1 << 20,
            ..Checkpointer::new(SqliteSink::pool(1).connect_lazy_with(unreachable), wal.clone())
        });
        let sink = SqliteSink { checkpoints: Some(Arc::clone(&failing)), ..sink };
        let (mut seq, mut largest) = (0, 0);
        for _ in 0..20 {
            sink.write_batch(&events(512, &mut seq)).await.unwrap();
            idle(&failing).await;
            largest = largest.max(std::fs::metadata(&wal).unwrap().len());
        }
        let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_events").fetch_one(&sink.pool).await.unwrap();
        assert_eq!(stored, 20 * 512);
        assert!(largest <= 3 << 20, "the WAL file reached {largest} bytes, guard 1 MiB");
    }

    #[tokio::test]
    async fn an_in_memory_database_has_no_checkpointer_and_stores_every_row() {
        let sink = SqliteSink::connect("sqlite::memory:").await.unwrap();
        assert!(sink.checkpoints.is_none(), "no file, no WAL to checkpoint");
        sink.ensure_schema().await.unwrap();
        sink.write_batch(&events(300, &mut 0)).await.unwrap();
        let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_events").fetch_one(&sink.pool).await.unwrap();
        assert_eq!(stored, 300);
    }

    #[tokio::test]
    async fn a_pool_you_own_checkpoints_as_you_configured_it() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("own.db").display());
        let pool = SqlitePool::connect(&url).await.unwrap();
        let sink = SqliteSink::from_pool(pool.clone());
        assert!(sink.checkpoints.is_none());
        assert_eq!(wal_autocheckpoint(&pool).await, 1000);
    }

    #[test]
    fn the_version_2_file_is_read_as_two_added_columns_and_an_index() {
        let v2 = Table::parse("trail", false).unwrap().schema_sql(SCHEMA_V2);
        let found = statements(&v2);
        assert_eq!(
            found,
            [
                "ALTER TABLE trail ADD COLUMN instance TEXT",
                "ALTER TABLE trail ADD COLUMN boot TEXT",
                "CREATE UNIQUE INDEX IF NOT EXISTS trail_boot_seq_key ON trail (boot, seq)",
            ]
        );
        assert_eq!(found.iter().map(|s| added_column(s)).collect::<Vec<_>>(), [Some("instance"), Some("boot"), None]);
        let multi_line = "-- a comment; with a semicolon\nCREATE TABLE a (\n    x INTEGER -- no\n);\nSELECT 1;\n";
        assert_eq!(statements(multi_line), ["CREATE TABLE a (\n    x INTEGER -- no\n)", "SELECT 1"]);
    }
}
