//! The Postgres sink with its backends frozen (SIGSTOP) past the sink timeout: a batch the worker gave up on must
//! never commit later, so every event ends up in exactly one of Postgres and the fallback sink, and `written` and
//! `fallback_written` say which.
//!
//! Backends are stopped at known points: idle, or inside a statement waiting for a lock the test holds (the lock
//! is then released while they are stopped). They are resumed once the worker has given up on them (in the last
//! test, while its retry waits), and then run whatever they had been sent. Each test owns a schema and an
//! `application_name` (both with a random suffix), stops only backends carrying that name, resumes them through
//! a guard (so a failing assertion cannot leave one stopped), and drops its schema. Signals need the server on
//! this machine; like the other Postgres tests, each test skips when no server is configured or answering (or the
//! server is not on this machine), unless `TOWER_AUDIT_PG_URL` is set.
#![cfg(feature = "postgres")]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use sqlx::postgres::{PgPool, PgPoolOptions};
use tower_audit::{AuditEvent, AuditHandle, AuditLayer, AuditSink, MemorySink, PostgresSink, Retry, Stats};

/// Events recorded per test: one batch.
const EVENTS: usize = 512;
const KIND: &str = "freeze.test";
const SINK_TIMEOUT: Duration = Duration::from_secs(2);
/// The bound on every wait for the pipeline or the server, and on shutdown.
const PATIENCE: Duration = Duration::from_secs(30);

/// Only the in-use backend is frozen, inside its INSERT: the retry on a fresh connection writes the batch, and
/// the resumed statement adds nothing.
#[tokio::test]
async fn frozen_mid_insert_the_retry_on_a_fresh_connection_writes_every_event_once() {
    let Some(fx) = Fixture::new().await else { return };
    let sink = fx.sink().await;
    warm_up(&fx, &sink, 1).await;
    let fallback = MemorySink::new();
    let (_layer, handle) = pipeline(sink, &fallback, 3).await;
    let mut frozen = Frozen::default();

    let lock = fx.lock_table("events", "SHARE").await;
    record(&handle);
    let in_use = until("the sink's INSERT waits for the table lock", async || fx.waiting_on_lock().await.pop()).await;
    frozen.freeze(in_use);
    lock.commit().await.unwrap();
    until("the batch is settled", async || settled(&handle.stats())).await;
    frozen.resume_and_settle(&fx).await;

    let report = handle.shutdown(PATIENCE).await;
    let ledger = fx.ledger(&fallback).await;
    assert!(report.drained, "{report:?}");
    let (in_postgres, in_fallback) = ledger.assert_each_event_in_exactly_one_place(&report.stats);
    assert_eq!((in_postgres, in_fallback), (EVENTS, 0), "{:?}", report.stats);
}

/// Every backend of the sink is frozen through all retries: one idle before the batch (its statement waits
/// unread in the socket, to run with a fresh timer on resume), the others inside their statements. The batch
/// goes to the fallback, and after the backends resume none of its events is in Postgres.
#[tokio::test]
async fn frozen_through_every_retry_the_fallback_holds_the_batch_and_postgres_never_does() {
    let Some(fx) = Fixture::new().await else { return };
    let sink = fx.sink().await;
    warm_up(&fx, &sink, 2).await;
    let fallback = MemorySink::new();
    let (_layer, handle) = pipeline(sink, &fallback, 2).await;
    let mut frozen = Frozen::default();

    let idle = fx.backends("true").await;
    assert_eq!(idle.len(), 2, "both pooled connections are open and have written a batch");
    frozen.freeze(idle[0]);
    let lock = fx.lock_table("events", "SHARE").await;
    record(&handle);
    until("every attempt is given up and the batch is in the fallback", async || {
        for pid in fx.waiting_on_lock().await {
            if !frozen.pids.contains(&pid) {
                frozen.freeze(pid);
            }
        }
        settled(&handle.stats())
    })
    .await;
    lock.commit().await.unwrap();
    frozen.resume_and_settle(&fx).await;

    let report = handle.shutdown(PATIENCE).await;
    let ledger = fx.ledger(&fallback).await;
    assert!(report.drained, "{report:?}");
    let (in_postgres, in_fallback) = ledger.assert_each_event_in_exactly_one_place(&report.stats);
    assert_eq!((in_postgres, in_fallback), (0, EVENTS), "{:?}", report.stats);
    assert_eq!(ledger.claimed_in_fallback(), EVENTS as u64, "the primary trail's gap event tells the truth");
}

/// The backend is frozen inside `COMMIT` (a deferred trigger waits for a lock), the one window where the outcome
/// is unknown; it resumes while the retry waits for its transaction. The retry finds the rows committed and the
/// batch counts as written, once.
#[tokio::test]
async fn frozen_in_commit_the_idempotent_retry_resolves_the_ambiguity() {
    let Some(fx) = Fixture::new().await else { return };
    let sink = fx.sink().await;
    warm_up(&fx, &sink, 1).await;
    let s = &fx.schema;
    fx.execute(format!(
        "CREATE TABLE {s}.gate (); \
         CREATE FUNCTION {s}.pass_gate() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN LOCK TABLE {s}.gate IN ROW SHARE MODE; RETURN NULL; END $$; \
         CREATE CONSTRAINT TRIGGER pass_gate AFTER INSERT ON {s}.events DEFERRABLE INITIALLY DEFERRED \
         FOR EACH ROW EXECUTE FUNCTION {s}.pass_gate()"
    ))
    .await;
    let fallback = MemorySink::new();
    let (_layer, handle) = pipeline(sink, &fallback, 3).await;
    let mut frozen = Frozen::default();

    let lock = fx.lock_table("gate", "EXCLUSIVE").await;
    record(&handle);
    let committing = until("the sink's commit waits for the gate", async || fx.waiting_on_lock().await.pop()).await;
    frozen.freeze(committing);
    lock.commit().await.unwrap();
    until("the retry waits for the frozen transaction", async || {
        fx.backends("wait_event = 'transactionid'").await.pop()
    })
    .await;
    frozen.resume_and_settle(&fx).await;
    until("the batch is settled", async || settled(&handle.stats())).await;

    let report = handle.shutdown(PATIENCE).await;
    let ledger = fx.ledger(&fallback).await;
    assert!(report.drained, "{report:?}");
    let (in_postgres, in_fallback) = ledger.assert_each_event_in_exactly_one_place(&report.stats);
    assert_eq!((in_postgres, in_fallback), (EVENTS, 0), "{:?}", report.stats);
}

/// A table in a schema of its own, the sink's `application_name`, and an admin pool to watch and lock with.
struct Fixture {
    admin: PgPool,
    /// Also the sink's `application_name`.
    schema: String,
}

impl Fixture {
    /// `None` (after saying why) when no server is configured or answering, or it is not on this machine.
    async fn new() -> Option<Self> {
        let options = PgPoolOptions::new().max_connections(3).acquire_timeout(Duration::from_secs(5));
        let admin = pg_pool(options).await?;
        let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(&admin).await.unwrap();
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim() != "postgres" {
            let why = format!("the server at {} is not on this machine: its backends cannot be stopped", pg_url());
            assert!(std::env::var_os("TOWER_AUDIT_PG_URL").is_none(), "TOWER_AUDIT_PG_URL is set, but {why}");
            eprintln!("skipping: {why}");
            return None;
        }
        let schema = format!("tower_audit_freeze_{:08x}", fastrand::u32(..));
        let fx = Fixture { admin, schema };
        fx.execute(format!("CREATE SCHEMA {}", fx.schema)).await;
        Some(fx)
    }

    /// A sink as users make one (`connect`, its own pool), its connections named after the schema.
    async fn sink(&self) -> PostgresSink {
        let url = pg_url();
        let separator = if url.contains('?') { '&' } else { '?' };
        let url = format!("{url}{separator}application_name={}", self.schema);
        let sink = PostgresSink::connect(&url).await.unwrap().table(&format!("{}.events", self.schema)).unwrap();
        sink.ensure_schema().await.unwrap();
        sink
    }

    async fn execute(&self, sql: String) {
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&self.admin).await.unwrap();
    }

    /// Holds `LOCK TABLE … IN mode` until the returned transaction ends.
    async fn lock_table(&self, table: &str, mode: &str) -> sqlx::Transaction<'static, sqlx::Postgres> {
        let mut tx = self.admin.begin().await.unwrap();
        let sql = format!("LOCK TABLE {}.{table} IN {mode} MODE", self.schema);
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&mut *tx).await.unwrap();
        tx
    }

    /// The pids of the sink's backends matching `filter` (SQL over `pg_stat_activity`).
    async fn backends(&self, filter: &str) -> Vec<i32> {
        let sql = format!("SELECT pid FROM pg_stat_activity WHERE application_name = $1 AND ({filter}) ORDER BY pid");
        sqlx::query_scalar(sqlx::AssertSqlSafe(sql)).bind(&self.schema).fetch_all(&self.admin).await.unwrap()
    }

    async fn waiting_on_lock(&self) -> Vec<i32> {
        self.backends("wait_event_type = 'Lock' AND wait_event = 'relation'").await
    }

    /// What the table and the fallback hold.
    async fn ledger(&self, fallback: &MemorySink) -> Ledger {
        let sql = format!("SELECT id::text, kind, attributes::text FROM {}.events", self.schema);
        let rows: Vec<(String, String, String)> =
            sqlx::query_as(sqlx::AssertSqlSafe(sql)).fetch_all(&self.admin).await.unwrap();
        let postgres = rows
            .into_iter()
            .map(|(id, kind, attributes)| Entry { id, kind, attributes: serde_json::from_str(&attributes).unwrap() })
            .collect();
        let fallback = fallback
            .events()
            .into_iter()
            .map(|e| Entry { id: e.id.to_string(), kind: e.kind.to_string(), attributes: e.attributes })
            .collect();
        Ledger { postgres, fallback }
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        drop_pg_schema(&self.schema);
    }
}

/// Writes `connections` one-event batches at once straight through the sink, so that as many pooled connections
/// are open and have prepared the insert (as in a service that has been running), then empties the table.
async fn warm_up(fx: &Fixture, sink: &PostgresSink, connections: usize) {
    let mut writes = tokio::task::JoinSet::new();
    for _ in 0..connections {
        let sink = sink.clone();
        writes.spawn(async move { sink.write_batch(&[AuditEvent::new("warm_up")]).await });
    }
    while let Some(written) = writes.join_next().await {
        written.unwrap().unwrap();
    }
    fx.execute(format!("DELETE FROM {}.events", fx.schema)).await;
}

/// One whole batch per write; partial batches wait for shutdown, so the worker sends nothing but the batch
/// under test while the test runs. Returns once the boot batch is written: no statement of it is in flight
/// when the test locks a table or freezes a backend.
async fn pipeline(sink: PostgresSink, fallback: &MemorySink, max_retries: u32) -> (AuditLayer, AuditHandle) {
    let (layer, handle) = AuditLayer::builder(sink)
        .capacity(EVENTS)
        .batch_size(EVENTS)
        .flush_interval(Duration::from_secs(3600))
        .sink_timeout(SINK_TIMEOUT)
        .retry(
            Retry::default()
                .max_retries(max_retries)
                .base_delay(Duration::from_millis(50))
                .max_delay(Duration::from_millis(100)),
        )
        .fallback(fallback.clone())
        .build()
        .unwrap();
    until("the boot batch is written", async || (handle.stats().batches == 1).then_some(())).await;
    (layer, handle)
}

fn record(handle: &AuditHandle) {
    for n in 0..EVENTS {
        assert!(handle.record(AuditEvent::new(KIND).attribute("n", n.to_string())));
    }
}

/// `Some` once the worker is done with the batch, either way.
fn settled(stats: &Stats) -> Option<()> {
    (stats.written + stats.fallback_written >= EVENTS as u64).then_some(())
}

/// Probes every 10 ms until `probe` answers `Some`; fails the test after [`PATIENCE`].
async fn until<T>(what: &str, mut probe: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + PATIENCE;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    loop {
        tick.tick().await;
        if let Some(found) = probe().await {
            return found;
        }
        assert!(Instant::now() < deadline, "{what}: not within {PATIENCE:?}");
    }
}

/// Backends stopped with SIGSTOP. Dropping the guard sends each one SIGCONT, so a failing assertion or a panic
/// cannot leave a backend stopped.
#[derive(Debug, Default)]
struct Frozen {
    pids: Vec<i32>,
}

impl Frozen {
    fn freeze(&mut self, pid: i32) {
        // Pushed first, so the guard resumes it even if `kill` reports an error.
        self.pids.push(pid);
        signal("STOP", pid).unwrap();
    }

    /// Resumes every frozen backend and waits until each has either gone or finished all it had been sent
    /// (idle, outside any transaction, since after the resume).
    async fn resume_and_settle(&mut self, fx: &Fixture) {
        let since: String = sqlx::query_scalar("SELECT clock_timestamp()::text").fetch_one(&fx.admin).await.unwrap();
        let pids = std::mem::take(&mut self.pids);
        for &pid in &pids {
            signal("CONT", pid).unwrap();
        }
        until("the resumed backends finish what they had been sent", async || {
            let busy: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE pid = ANY($1) AND NOT (state = 'idle' AND state_change > $2::timestamptz)",
            )
            .bind(&pids)
            .bind(&since)
            .fetch_one(&fx.admin)
            .await
            .unwrap();
            (busy == 0).then_some(())
        })
        .await;
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        for &pid in &self.pids {
            if let Err(e) = signal("CONT", pid) {
                eprintln!("could not resume backend {pid}: {e}");
            }
        }
    }
}

fn signal(name: &str, pid: i32) -> Result<(), String> {
    let status = Command::new("kill").arg(format!("-{name}")).arg(pid.to_string()).status();
    match status {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => Err(format!("kill -{name} {pid}: {s}")),
        Err(e) => Err(format!("kill -{name} {pid}: {e}")),
    }
}

struct Entry {
    id: String,
    kind: String,
    attributes: BTreeMap<String, String>,
}

/// Where the events ended up.
struct Ledger {
    postgres: Vec<Entry>,
    fallback: Vec<Entry>,
}

impl Ledger {
    /// Asserts that no id is in both places or twice in one, that each recorded event is in exactly one place,
    /// and that the counters match the places. Returns how many recorded events are in Postgres and how many
    /// in the fallback.
    fn assert_each_event_in_exactly_one_place(&self, stats: &Stats) -> (usize, usize) {
        let mut ids = BTreeSet::new();
        for entry in self.postgres.iter().chain(&self.fallback) {
            let in_postgres = self.postgres.iter().filter(|e| e.id == entry.id).count();
            let in_fallback = self.fallback.iter().filter(|e| e.id == entry.id).count();
            assert!(
                ids.insert(&entry.id),
                "event {} ({}) is {in_postgres}× in Postgres and {in_fallback}× in the fallback: {stats:?}",
                entry.id,
                entry.kind
            );
        }
        let recorded = |entries: &[Entry]| -> Vec<usize> {
            entries.iter().filter(|e| e.kind == KIND).map(|e| e.attributes["n"].parse().unwrap()).collect()
        };
        let (in_postgres, in_fallback) = (recorded(&self.postgres), recorded(&self.fallback));
        let all: BTreeSet<usize> = in_postgres.iter().chain(&in_fallback).copied().collect();
        assert_eq!((all.len(), all.last().copied()), (EVENTS, Some(EVENTS - 1)), "every recorded event is somewhere");
        // Besides the recorded events: gap events, counted apart (`gap_events`), and the pipeline's boot and
        // shutdown events, counted nowhere, both in Postgres (written before the freeze and after it).
        let count = |entries: &[Entry], kind: &str| entries.iter().filter(|e| e.kind == kind).count() as u64;
        let (gap, boot, shutdown) = ("audit.gap", "audit.boot", "audit.shutdown");
        let other: Vec<_> = self
            .postgres
            .iter()
            .chain(&self.fallback)
            .filter(|e| ![KIND, gap, boot, shutdown].contains(&e.kind.as_str()))
            .map(|e| &e.kind)
            .collect();
        assert!(other.is_empty(), "{other:?}");
        let bookends = |entries: &[Entry]| (count(entries, boot), count(entries, shutdown));
        assert_eq!((bookends(&self.postgres), bookends(&self.fallback)), ((1, 1), (0, 0)), "{stats:?}");
        assert_eq!(
            (stats.written, stats.fallback_written, stats.gap_events),
            (
                count(&self.postgres, KIND),
                count(&self.fallback, KIND),
                count(&self.postgres, gap) + count(&self.fallback, gap)
            ),
            "`written`, `fallback_written` and `gap_events` count what Postgres and the fallback hold: {stats:?}"
        );
        (in_postgres.len(), in_fallback.len())
    }

    /// The events that the primary trail's `audit.gap` events say went to the fallback instead.
    fn claimed_in_fallback(&self) -> u64 {
        self.postgres
            .iter()
            .filter(|e| e.kind == "audit.gap")
            .map(|e| e.attributes.get("in_fallback").map_or(0, |n| n.parse::<u64>().unwrap()))
            .sum()
    }
}
