//! What integrity costs the pipeline: events per second from one producer through the worker into a sink, with
//! and without the hash chain and checkpoints (`Integrity` with its defaults: a checkpoint every 4,096 events),
//! into a sink that discards (the pipeline's own ceiling) and into a JSON-lines file (a real sink); beside them
//! the chain hash alone (`integrity::event_hash` of a typical request event).
//!
//! `cargo bench --bench integrity`

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::NullSink;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tower_audit::integrity::{Integrity, event_hash};
use tower_audit::{AuditEvent, AuditLayer, AuditSink, Hash, JsonLinesSink, SinkError};

/// Writes to a JSON-lines file and counts what it wrote.
struct CountedJsonLines {
    file: JsonLinesSink,
    count: Arc<AtomicU64>,
}

impl AuditSink for CountedJsonLines {
    async fn write_batch(&self, batch: &[AuditEvent]) -> Result<(), SinkError> {
        self.file.write_batch(batch).await?;
        self.count.fetch_add(batch.len() as u64, Ordering::Relaxed);
        Ok(())
    }
}

fn move_events(rt: &tokio::runtime::Runtime, events: u64, json: bool, integrity: bool) -> Duration {
    let dir = tempfile::tempdir().unwrap();
    // Both sinks count into the same counter as this one reads.
    let counted = NullSink::default();
    let (_layer, handle) = {
        let _rt = rt.enter();
        let builder = if json {
            let file = JsonLinesSink::open(dir.path().join("audit.jsonl")).unwrap();
            AuditLayer::builder(CountedJsonLines { file, count: Arc::clone(&counted.0) })
        } else {
            AuditLayer::builder(counted.clone())
        };
        let builder = builder.capacity(65_536).batch_size(512).flush_interval(Duration::from_millis(1));
        let builder = if integrity { builder.integrity(Integrity::from_seed(&[7; 32])) } else { builder };
        builder.build().unwrap()
    };
    let template = common::request_event();
    let start = Instant::now();
    for _ in 0..events {
        while !handle.record(template.clone()) {
            std::thread::yield_now();
        }
    }
    // The boot event and checkpoints reach the sink too; they only make this end a little sooner.
    while counted.count() < events {
        std::thread::yield_now();
    }
    start.elapsed()
}

fn integrity(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let mut group = c.benchmark_group("integrity");
    group.throughput(Throughput::Elements(1)).measurement_time(Duration::from_secs(4)).sample_size(20);
    for (sink, json) in [("null", false), ("json_lines", true)] {
        for (mode, on) in [("off", false), ("on", true)] {
            group.bench_function(format!("{sink}_sink_integrity_{mode}"), |b| {
                b.iter_custom(|iters| move_events(&rt, iters, json, on))
            });
        }
    }
    let event = common::request_event();
    group.bench_function("event_hash", |b| b.iter(|| event_hash(&Hash::ZERO, &event)));
    group.finish();
}

criterion_group!(benches, integrity);
criterion_main!(benches);
