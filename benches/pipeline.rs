//! Pipeline throughput: events per second from 1 and 2 producer threads through the channel and the worker into
//! a sink that discards, across batch sizes; beside it the anchor, lines per second through `tracing-appender`'s
//! non-blocking writer (JSON formatter, writing to `io::sink()`).
//!
//! Producers push with `AuditHandle::record` and, when the queue is full, yield and push again, so the figure is
//! what the pipeline *moves*, not what it drops. `cargo bench --bench pipeline`

mod common;

use std::time::{Duration, Instant};

use common::NullSink;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tower_audit::{AuditEvent, AuditLayer};

fn move_events(rt: &tokio::runtime::Runtime, events: u64, producers: u64, batch: usize) -> Duration {
    let sink = NullSink::default();
    let (_layer, handle) = {
        let _rt = rt.enter();
        AuditLayer::builder(sink.clone())
            .capacity(65_536)
            .batch_size(batch)
            .flush_interval(Duration::from_millis(1))
            .build()
            .unwrap()
    };
    let template = AuditEvent::new("bench.event").actor("alice@example.com");
    let start = Instant::now();
    std::thread::scope(|scope| {
        for p in 0..producers {
            let (handle, template) = (&handle, &template);
            scope.spawn(move || {
                let share = events / producers + u64::from(p < events % producers);
                for _ in 0..share {
                    while !handle.record(template.clone()) {
                        std::thread::yield_now();
                    }
                }
            });
        }
    });
    // Gap events (after a full queue) also reach the sink; they are few and only make this end a little sooner.
    while sink.count() < events {
        std::thread::yield_now();
    }
    start.elapsed()
}

fn appender_lines(lines: u64) -> Duration {
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .buffered_lines_limit(65_536)
        .finish(std::io::sink());
    let subscriber = tracing_subscriber::fmt().json().with_writer(writer).finish();
    let start = Instant::now();
    tracing::subscriber::with_default(subscriber, || {
        for n in 0..lines {
            tracing::info!(n, actor = "alice@example.com", "bench.event");
        }
    });
    drop(guard); // waits until every line is written
    start.elapsed()
}

fn throughput(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let mut group = c.benchmark_group("pipeline");
    group.throughput(Throughput::Elements(1)).measurement_time(Duration::from_secs(4)).sample_size(20);
    for producers in [1, 2] {
        for batch in [64, 512, 4096] {
            group.bench_function(format!("{producers}_producers_batch_{batch}"), |b| {
                b.iter_custom(|iters| move_events(&rt, iters, producers, batch))
            });
        }
    }
    group.bench_function("anchor_tracing_appender_json_lines", |b| b.iter_custom(appender_lines));
    group.finish();
}

criterion_group!(benches, throughput);
criterion_main!(benches);
