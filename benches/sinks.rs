//! Sink throughput in rows per second at batch sizes 1, 64, 512 and 4096: JSON lines (a file), SQLite (a file, WAL)
//! and Postgres (`TOWER_AUDIT_PG_URL`, default `postgres://postgres@127.0.0.1:5432/test`; skipped with a message
//! when no server answers). Every write carries fresh, time-ordered (UUIDv7) ids, as the worker assigns them, so
//! the idempotent inserts really insert.
//!
//! `cargo bench --bench sinks --features sqlite,postgres`

mod common;

use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tower_audit::{AuditEvent, AuditSink, JsonLinesSink, PostgresSink, SqliteSink};

const BATCHES: [usize; 4] = [1, 64, 512, 4096];

fn batch(n: usize) -> Vec<AuditEvent> {
    (0..n)
        .map(|i| {
            let mut e = common::request_event();
            // Time-ordered, as the worker makes them: index inserts land at the right edge of the B-tree.
            e.id = uuid::Uuid::now_v7();
            e.seq = i as u64;
            e
        })
        .collect()
}

fn bench_sink<S: AuditSink>(c: &mut Criterion, rt: &tokio::runtime::Runtime, name: &str, sink: &S) {
    let mut group = c.benchmark_group(format!("sink_{name}"));
    group.sample_size(10).measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    for size in BATCHES {
        group.throughput(Throughput::Elements(size as u64));
        group.bench_function(format!("batch_{size}"), |b| {
            b.to_async(rt).iter_custom(|iters| async move {
                let mut spent = Duration::ZERO;
                for _ in 0..iters {
                    let events = batch(size);
                    let start = Instant::now();
                    sink.write_batch(&events).await.unwrap();
                    spent += start.elapsed();
                }
                spent
            })
        });
    }
    group.finish();
}

fn sinks(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();

    let jsonl = JsonLinesSink::open(dir.path().join("audit.jsonl")).unwrap();
    bench_sink(c, &rt, "json_lines", &jsonl);

    let sqlite = rt.block_on(async {
        let sink = SqliteSink::connect(dir.path().join("audit.db").to_str().unwrap()).await.unwrap();
        sink.ensure_schema().await.unwrap();
        sink
    });
    bench_sink(c, &rt, "sqlite", &sqlite);

    let url = std::env::var("TOWER_AUDIT_PG_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let postgres = rt.block_on(async {
        let admin = sqlx::PgPool::connect(&url).await.ok()?;
        sqlx::raw_sql("DROP TABLE IF EXISTS bench_audit_events").execute(&admin).await.ok()?;
        let sink = PostgresSink::connect(&url).await.ok()?.table("bench_audit_events").unwrap();
        sink.ensure_schema().await.ok()?;
        Some(sink)
    });
    match postgres {
        Some(sink) => bench_sink(c, &rt, "postgres", &sink),
        None => eprintln!("sink_postgres: skipped, no Postgres at {url} (set TOWER_AUDIT_PG_URL)"),
    }
}

criterion_group!(benches, sinks);
criterion_main!(benches);
