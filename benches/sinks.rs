//! Sink throughput, each against its ceiling measured in the same run.
//!
//! - `sink_<name>/batch_<n>`: one `write_batch` call of `n` fresh events (time-ordered UUIDv7 ids and increasing
//!   seqs of one boot, as the worker assigns them, so the idempotent inserts really insert), at batch sizes 1,
//!   64, 512 and 4096: JSON lines (a file), SQLite (a file, WAL, the default schema) and Postgres
//!   (`TOWER_AUDIT_PG_URL`, default `postgres://postgres@127.0.0.1:5432/test`, in a schema of its own dropped at
//!   the end; skipped with a message when no server answers).
//! - `ceiling_<name>/batch_512`, the same 512 rows written the cheapest way there is, with nothing of the sink:
//!   JSON lines, the same bytes (serialised beforehand) written to a file; SQLite, the same column values
//!   inserted through the C API (rusqlite) with one prepared statement, one transaction per batch, into a table of
//!   the same schema; Postgres, the same rows (staged beforehand in an unindexed table) moved by the server's own
//!   `INSERT … SELECT`, one statement (so one transaction) per batch, into a table of the same schema; and
//!   (`ceiling_postgres_copy`) the same rows in `COPY`'s binary format, read by the server from a file, one
//!   `COPY` per batch (the sink writes by `COPY`: this ceiling pays the same input parsing, without the client).
//!
//! The machine's load is printed before and after, and the number of rows each table held at the end.
//! `bash benches/sinks.sh` runs this and prints the ratios; it refuses a run that began on a busy machine.
//!
//! `cargo bench --bench sinks --features sqlite,postgres`

mod common;

use std::io::Write;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use sqlx::AssertSqlSafe;
use tower_audit::{AuditEvent, AuditSink, JsonLinesSink, PostgresSink, SqliteSink};

/// The other batch sizes measured (each sink's rows/s at 512 is measured on a fresh table, right after its
/// ceiling, so both tables hold about as many rows).
const OTHER_BATCHES: [usize; 3] = [1, 64, 4096];
/// The batch size the ceilings are measured at (the worker's default).
const CEILING_BATCH: usize = 512;

/// The columns both database sinks write, in their order.
const COLUMNS: &str = "id, seq, time, kind, outcome, method, route, path, status, grpc_status, latency_us, \
                       request_id, actor, client_addr, user_agent, attributes, version, instance, boot, prev_hash, hash";

/// Fresh events as one boot's worker stamps them, numbered on from `*seq`.
fn batch(n: usize, boot: uuid::Uuid, seq: &mut u64) -> Vec<AuditEvent> {
    (0..n)
        .map(|_| {
            let mut e = common::request_event();
            e.id = uuid::Uuid::now_v7();
            // Each request has its own request id.
            e.request_id = Some(e.id.hyphenated().to_string());
            e.instance = Some("bench-host".into());
            e.boot = Some(boot);
            *seq += 1;
            e.seq = *seq;
            e
        })
        .collect()
}

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim().to_owned()
}

fn new_group<'a>(c: &'a mut Criterion, name: &str) -> criterion::BenchmarkGroup<'a, criterion::measurement::WallTime> {
    let mut group = c.benchmark_group(name);
    group.sample_size(10).measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    group
}

/// A ceiling's group: rows per second at [`CEILING_BATCH`].
fn ceiling_group<'a>(
    c: &'a mut Criterion,
    name: &str,
) -> criterion::BenchmarkGroup<'a, criterion::measurement::WallTime> {
    let mut group = new_group(c, name);
    group.throughput(Throughput::Elements(CEILING_BATCH as u64));
    group
}

fn bench_sink<S: AuditSink>(c: &mut Criterion, rt: &tokio::runtime::Runtime, name: &str, sink: &S, sizes: &[usize]) {
    let mut group = new_group(c, &format!("sink_{name}"));
    let boot = uuid::Uuid::now_v7();
    let seq = std::cell::Cell::new(0);
    for &size in sizes {
        group.throughput(criterion::Throughput::Elements(size as u64));
        group.bench_function(format!("batch_{size}"), |b| {
            b.to_async(rt).iter_custom(|iters| {
                let seq = &seq;
                async move {
                    let mut spent = Duration::ZERO;
                    for _ in 0..iters {
                        let mut next = seq.get();
                        let events = batch(size, boot, &mut next);
                        seq.set(next);
                        let start = Instant::now();
                        sink.write_batch(&events).await.unwrap();
                        spent += start.elapsed();
                    }
                    spent
                }
            })
        });
    }
    group.finish();
}

/// The same bytes as the JSON lines sink writes, serialised beforehand, written and handed to the kernel.
fn ceiling_json_lines(c: &mut Criterion, dir: &std::path::Path) {
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("ceiling.jsonl")).unwrap();
    let mut group = ceiling_group(c, "ceiling_json_lines");
    let (boot, mut seq) = (uuid::Uuid::now_v7(), 0);
    group.bench_function(format!("batch_{CEILING_BATCH}"), |b| {
        b.iter_custom(|iters| {
            let mut spent = Duration::ZERO;
            for _ in 0..iters {
                let mut bytes = Vec::new();
                for event in batch(CEILING_BATCH, boot, &mut seq) {
                    serde_json::to_writer(&mut bytes, &event).unwrap();
                    bytes.push(b'\n');
                }
                let start = Instant::now();
                file.write_all(&bytes).unwrap();
                spent += start.elapsed();
            }
            spent
        })
    });
    group.finish();
}

/// One event's column values as the SQLite sink stores them.
fn sqlite_values(e: &AuditEvent) -> Vec<rusqlite::types::Value> {
    use rusqlite::types::Value::{Integer, Null, Text};
    let text = |s: Option<&str>| s.map_or(Null, |s| Text(s.to_owned()));
    let int = |i: Option<i64>| i.map_or(Null, Integer);
    vec![
        Text(e.id.hyphenated().to_string()),
        Integer(e.seq as i64),
        Text(humantime::format_rfc3339_micros(e.time).to_string()),
        Text(e.kind.to_string()),
        Text(e.outcome.as_str().to_owned()),
        text(e.method.as_deref()),
        text(e.route.as_deref()),
        text(e.path.as_deref()),
        int(e.status.map(i64::from)),
        int(e.grpc_status.map(i64::from)),
        int(e.latency_us.map(|l| l as i64)),
        text(e.request_id.as_deref()),
        text(e.actor.as_deref()),
        text(e.client_addr.map(|a| a.to_string()).as_deref()),
        text(e.user_agent.as_deref()),
        Text(serde_json::to_string(&e.attributes).unwrap()),
        Integer(i64::from(e.version)),
        text(e.instance.as_deref()),
        text(e.boot.map(|b| b.hyphenated().to_string()).as_deref()),
        text(e.prev_hash.map(|h| h.to_string()).as_deref()),
        text(e.hash.map(|h| h.to_string()).as_deref()),
    ]
}

/// A database file with the sink's schema and settings (WAL, `synchronous = NORMAL`), of `page_size` bytes a
/// page, opened through the C API (rusqlite).
fn c_api_database(rt: &tokio::runtime::Runtime, path: &std::path::Path, page_size: u32) -> rusqlite::Connection {
    let conn = rusqlite::Connection::open(path).unwrap();
    // The page size holds only if set before the first table is made.
    conn.pragma_update(None, "page_size", page_size).unwrap();
    conn.pragma_update(None, "journal_mode", "WAL").unwrap();
    conn.pragma_update(None, "synchronous", "NORMAL").unwrap();
    rt.block_on(async {
        let sink = SqliteSink::connect(path.to_str().unwrap()).await.unwrap();
        sink.ensure_schema().await.unwrap();
    });
    let actual: u32 = conn.query_row("PRAGMA page_size", [], |row| row.get(0)).unwrap();
    assert_eq!(actual, page_size, "{}", path.display());
    conn
}

/// Benchmarks `name`: batches of [`CEILING_BATCH`] fresh rows inserted through the C API into `conn`, one
/// prepared `INSERT … ON CONFLICT (id) DO NOTHING`, one transaction per batch.
fn c_api_inserts(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    conn: &rusqlite::Connection,
) {
    let insert = format!(
        "INSERT INTO audit_events ({COLUMNS}) VALUES ({}) ON CONFLICT (id) DO NOTHING",
        vec!["?"; 21].join(", ")
    );
    let (boot, mut seq) = (uuid::Uuid::now_v7(), 0);
    group.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let mut spent = Duration::ZERO;
            for _ in 0..iters {
                let rows: Vec<_> = batch(CEILING_BATCH, boot, &mut seq).iter().map(sqlite_values).collect();
                let start = Instant::now();
                conn.execute_batch("BEGIN").unwrap();
                let mut statement = conn.prepare_cached(&insert).unwrap();
                for row in &rows {
                    statement.execute(rusqlite::params_from_iter(row)).unwrap();
                }
                conn.execute_batch("COMMIT").unwrap();
                spent += start.elapsed();
            }
            spent
        })
    });
}

/// The same rows through SQLite's C API: one prepared statement, one transaction per batch, into a table the
/// sink's own schema made (in a file of its own, with the sink's settings: WAL, `synchronous = NORMAL`).
fn ceiling_sqlite(c: &mut Criterion, rt: &tokio::runtime::Runtime, dir: &std::path::Path) -> i64 {
    let conn = c_api_database(rt, &dir.join("ceiling.db"), 4096);
    let mut group = ceiling_group(c, "ceiling_sqlite");
    c_api_inserts(&mut group, &format!("batch_{CEILING_BATCH}"), &conn);
    group.finish();
    conn.query_row("SELECT count(*) FROM audit_events", [], |row| row.get(0)).unwrap()
}

/// What each index of the default schema costs, and what a larger page would save: the ceiling's inserts (the
/// C API, one prepared statement, one transaction per batch) into tables made by `SqliteSink::ensure_schema`
/// with one index dropped, all but the primary key and `(boot, seq)` dropped, and every index kept in a
/// database of 8 KiB and 16 KiB pages (SQLite's default is 4 KiB), each table fresh and in a file of its own,
/// measured one after the other in the same run.
fn index_cost_sqlite(c: &mut Criterion, rt: &tokio::runtime::Runtime, dir: &std::path::Path) {
    let all_query_indexes = ["audit_events_time_idx", "audit_events_actor_time_idx", "audit_events_kind_time_idx"];
    let variants: [(&str, &[&str], u32); 8] = [
        ("all", &[], 4096),
        ("without_time", &all_query_indexes[..1], 4096),
        ("without_actor_time", &all_query_indexes[1..2], 4096),
        ("without_kind_time", &all_query_indexes[2..], 4096),
        ("without_boot_seq", &["audit_events_boot_seq_key"], 4096),
        ("primary_key_and_boot_seq_only", &all_query_indexes, 4096),
        ("all_page_8k", &[], 8192),
        ("all_page_16k", &[], 16384),
    ];
    let mut group = ceiling_group(c, "sqlite_index_cost");
    for (name, dropped, page_size) in variants {
        let conn = c_api_database(rt, &dir.join(format!("index_{name}.db")), page_size);
        for index in dropped {
            conn.execute_batch(&format!("DROP INDEX {index}")).unwrap();
        }
        c_api_inserts(&mut group, name, &conn);
    }
    group.finish();
}

/// The same rows moved by the server alone: staged beforehand (by the sink, into a table without indexes),
/// then one `INSERT … SELECT` per batch into a table the sink's own schema made.
fn ceiling_postgres(c: &mut Criterion, rt: &tokio::runtime::Runtime, admin: &sqlx::PgPool, schema: &str) {
    let stage = rt.block_on(async {
        let ceiling = PostgresSink::from_pool(admin.clone()).table(&format!("{schema}.ceiling")).unwrap();
        ceiling.ensure_schema().await.unwrap();
        sqlx::raw_sql(AssertSqlSafe(format!(
            "CREATE TABLE {schema}.staging (LIKE {schema}.ceiling INCLUDING DEFAULTS); \
             CREATE INDEX ON {schema}.staging (seq)"
        )))
        .execute(admin)
        .await
        .unwrap();
        PostgresSink::from_pool(admin.clone()).table(&format!("{schema}.staging")).unwrap()
    });
    let move_one = format!(
        "INSERT INTO {schema}.ceiling ({COLUMNS}) SELECT {COLUMNS} FROM {schema}.staging WHERE seq > $1 AND seq <= $2"
    );
    let mut group = ceiling_group(c, "ceiling_postgres");
    let boot = uuid::Uuid::now_v7();
    let seq = std::cell::Cell::new(0u64);
    group.bench_function(format!("batch_{CEILING_BATCH}"), |b| {
        b.to_async(rt).iter_custom(|iters| {
            let (stage, move_one, seq) = (&stage, &move_one, &seq);
            async move {
                let first = seq.get();
                let mut next = first;
                for _ in 0..iters {
                    stage.write_batch(&batch(CEILING_BATCH, boot, &mut next)).await.unwrap();
                }
                seq.set(next);
                let mut conn = admin.acquire().await.unwrap();
                let start = Instant::now();
                for i in 0..iters {
                    let from = first + i * CEILING_BATCH as u64;
                    let moved = sqlx::query(AssertSqlSafe(move_one.clone()))
                        .bind(from as i64)
                        .bind((from + CEILING_BATCH as u64) as i64)
                        .execute(&mut *conn)
                        .await
                        .unwrap();
                    assert_eq!(moved.rows_affected(), CEILING_BATCH as u64);
                }
                start.elapsed()
            }
        })
    });
    group.finish();

    // The second ceiling, for a sink that writes by `COPY`: the same rows, in the same binary format, read by
    // the server from a file (no client at all), one `COPY` per batch into a table of the same schema.
    let files: Vec<String> = rt.block_on(async {
        let ceiling = PostgresSink::from_pool(admin.clone()).table(&format!("{schema}.ceiling_copy")).unwrap();
        ceiling.ensure_schema().await.unwrap();
        let mut files = Vec::new();
        // Nothing staged when a filter skipped the first ceiling: no files, and nothing to measure.
        let staged: Option<i64> = sqlx::query_scalar(AssertSqlSafe(format!("SELECT max(seq) FROM {schema}.staging")))
            .fetch_one(admin)
            .await
            .unwrap();
        let staged = staged.unwrap_or(0);
        for (i, from) in (0..staged).step_by(CEILING_BATCH).enumerate().take(64) {
            let file = std::env::temp_dir().join(format!("{schema}_{i}.bin")).display().to_string();
            sqlx::raw_sql(AssertSqlSafe(format!(
                "COPY (SELECT {COLUMNS} FROM {schema}.staging WHERE seq > {from} AND seq <= {}) TO '{file}' \
                 (FORMAT binary)",
                from + CEILING_BATCH as i64
            )))
            .execute(admin)
            .await
            .unwrap();
            files.push(file);
        }
        files
    });
    let mut group = ceiling_group(c, "ceiling_postgres_copy");
    let next = std::cell::Cell::new(0usize);
    group.bench_function(format!("batch_{CEILING_BATCH}"), |b| {
        b.to_async(rt).iter_custom(|iters| {
            let (files, next) = (&files, &next);
            async move {
                assert!(!files.is_empty(), "ceiling_postgres_copy needs the rows ceiling_postgres stages");
                let mut conn = admin.acquire().await.unwrap();
                let mut spent = Duration::ZERO;
                for _ in 0..iters {
                    // Each file holds its batch's ids: a second pass over them starts on an emptied table.
                    let i = next.get() % files.len();
                    if i == 0 {
                        sqlx::raw_sql(AssertSqlSafe(format!("TRUNCATE {schema}.ceiling_copy")))
                            .execute(&mut *conn)
                            .await
                            .unwrap();
                    }
                    next.set(next.get() + 1);
                    let copy = format!("COPY {schema}.ceiling_copy ({COLUMNS}) FROM '{}' (FORMAT binary)", files[i]);
                    let start = Instant::now();
                    let copied = sqlx::raw_sql(AssertSqlSafe(copy)).execute(&mut *conn).await.unwrap();
                    spent += start.elapsed();
                    assert_eq!(copied.rows_affected(), CEILING_BATCH as u64);
                }
                spent
            }
        })
    });
    group.finish();
    for file in files {
        let _ = std::fs::remove_file(file);
    }
}

fn sinks(c: &mut Criterion) {
    eprintln!("load before: {}", load());
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let at_512 = [CEILING_BATCH];

    ceiling_json_lines(c, dir.path());
    let jsonl = JsonLinesSink::open(dir.path().join("audit_512.jsonl")).unwrap();
    bench_sink(c, &rt, "json_lines", &jsonl, &at_512);
    let jsonl = JsonLinesSink::open(dir.path().join("audit.jsonl")).unwrap();
    bench_sink(c, &rt, "json_lines", &jsonl, &OTHER_BATCHES);

    let sqlite_sink = |file: &str| {
        let path = dir.path().join(file);
        rt.block_on(async {
            let sink = SqliteSink::connect(path.to_str().unwrap()).await.unwrap();
            sink.ensure_schema().await.unwrap();
            sink
        })
    };
    index_cost_sqlite(c, &rt, dir.path());
    let ceiling_rows = ceiling_sqlite(c, &rt, dir.path());
    bench_sink(c, &rt, "sqlite", &sqlite_sink("audit_512.db"), &at_512);
    let sink_rows: i64 = {
        let conn = rusqlite::Connection::open(dir.path().join("audit_512.db")).unwrap();
        conn.query_row("SELECT count(*) FROM audit_events", [], |row| row.get(0)).unwrap()
    };
    eprintln!("rows at the end: sqlite ceiling {ceiling_rows}, sqlite sink (batch 512) {sink_rows}");
    bench_sink(c, &rt, "sqlite", &sqlite_sink("audit.db"), &OTHER_BATCHES);

    let url = std::env::var("TOWER_AUDIT_PG_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let schema = format!("bench_sinks_{}", std::process::id());
    let admin = rt.block_on(async {
        let admin = sqlx::postgres::PgPoolOptions::new().max_connections(2).connect(&url).await.ok()?;
        sqlx::raw_sql(AssertSqlSafe(format!("DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}")))
            .execute(&admin)
            .await
            .unwrap();
        Some(admin)
    });
    let Some(admin) = admin else {
        eprintln!("sink_postgres: skipped, no Postgres at {url} (set TOWER_AUDIT_PG_URL)");
        eprintln!("load after: {}", load());
        return;
    };
    let postgres_sink = |table: &str| {
        rt.block_on(async {
            let sink = PostgresSink::connect(&url).await.unwrap().table(&format!("{schema}.{table}")).unwrap();
            sink.ensure_schema().await.unwrap();
            sink
        })
    };
    ceiling_postgres(c, &rt, &admin, &schema);
    bench_sink(c, &rt, "postgres", &postgres_sink("audit_512"), &at_512);
    bench_sink(c, &rt, "postgres", &postgres_sink("audit_events"), &OTHER_BATCHES);
    rt.block_on(async {
        let rows = async |table: &str| -> i64 {
            sqlx::query_scalar(AssertSqlSafe(format!("SELECT count(*) FROM {schema}.{table}")))
                .fetch_one(&admin)
                .await
                .unwrap()
        };
        eprintln!(
            "rows at the end: postgres ceiling {}, ceiling_copy {}, sink (batch 512) {}",
            rows("ceiling").await,
            rows("ceiling_copy").await,
            rows("audit_512").await
        );
        sqlx::raw_sql(AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE"))).execute(&admin).await.unwrap();
    });
    eprintln!("load after: {}", load());
}

criterion_group!(benches, sinks);
criterion_main!(benches);
