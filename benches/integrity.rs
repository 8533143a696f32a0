//! What integrity costs the pipeline: events per second through the worker into a sink, with and without the
//! hash chain and checkpoints (`Integrity` with its defaults: a checkpoint every 4,096 events), into a sink that
//! discards (the pipeline's own ceiling) and into a JSON-lines file (a real sink); beside them the chain hash alone
//! (`integrity::event_hash` of a typical request event).
//!
//! Each round fills the queue first (65,536 events, while the sink holds its first write), then the clock runs
//! while the worker drains it: what is timed is the worker and the sink alone. (A producer pushing while the
//! worker drains makes three busy threads on two cores, and the figures then vary by ±30 % from run to run.)
//!
//! `cargo bench --all-features --bench integrity`

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tokio::sync::watch;
use tower_audit::integrity::{Integrity, event_hash};
use tower_audit::{AuditEvent, AuditLayer, AuditSink, Hash, JsonLinesSink, SinkError};

/// Events per round: the queue's capacity.
const ROUND: u64 = 65_536;

/// Writes to a JSON-lines file (or nowhere) once the gate opens, counts the requests' events it wrote (not the
/// pipeline's own), and says when it has written `target` of them.
struct Gated {
    file: Option<JsonLinesSink>,
    gate: watch::Receiver<bool>,
    count: AtomicU64,
    target: u64,
    done: mpsc::SyncSender<()>,
}

impl AuditSink for Gated {
    async fn write_batch(&self, batch: &[AuditEvent]) -> Result<(), SinkError> {
        let _ = self.gate.clone().wait_for(|open| *open).await;
        if let Some(file) = &self.file {
            file.write_batch(batch).await?;
        }
        let requests = batch.iter().filter(|e| !e.is_pipeline_event()).count() as u64;
        if self.count.fetch_add(requests, Ordering::Relaxed) + requests >= self.target {
            let _ = self.done.try_send(());
        }
        Ok(())
    }
}

/// One round: `events` queued while the sink waits, then timed from opening the gate until the sink has written
/// them all.
fn drain(rt: &tokio::runtime::Runtime, events: u64, json: bool, integrity: bool) -> Duration {
    let dir = tempfile::tempdir().unwrap();
    let (open, gate) = watch::channel(false);
    let (done, finished) = mpsc::sync_channel(1);
    let file = json.then(|| JsonLinesSink::open(dir.path().join("audit.jsonl")).unwrap());
    let sink = Gated { file, gate, count: AtomicU64::new(0), target: events, done };
    let (_layer, handle) = {
        let _rt = rt.enter();
        let builder = AuditLayer::builder(sink)
            .capacity(ROUND as usize)
            .max_queued_bytes(1 << 30)
            .batch_size(512)
            .flush_interval(Duration::from_millis(1));
        let builder = if integrity { builder.integrity(Integrity::from_seed(&[7; 32])) } else { builder };
        builder.build().unwrap()
    };
    let template = common::request_event();
    for _ in 0..events {
        assert!(handle.record(template.clone()), "the queue holds a whole round");
    }
    let start = Instant::now();
    open.send_replace(true);
    finished.recv().unwrap();
    start.elapsed()
}

fn move_events(rt: &tokio::runtime::Runtime, events: u64, json: bool, integrity: bool) -> Duration {
    let mut spent = Duration::ZERO;
    let mut left = events;
    while left > 0 {
        let round = left.min(ROUND);
        spent += drain(rt, round, json, integrity);
        left -= round;
    }
    spent
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
