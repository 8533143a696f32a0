//! Spill log throughput: batches of 512 records, each the JSON of a typical HTTP audit event (~460 bytes), appended
//! to the segment log with an fsync after every batch and with one at most every 200 ms; beside them, in the same
//! run, the baseline: a plain `BufWriter<File>` appending the same payload bytes, flushed after each batch and never
//! fsynced. Throughput is reported in records and in payload bytes.
//!
//! The files live under Cargo's `target/tmp` (`CARGO_TARGET_TMPDIR`): a real disk next to the build, never a tmpfs
//! `/tmp`, which would make fsync free and the comparison meaningless. `cargo bench --bench spill`

// The log is crate-private; the bench compiles its source in directly. Not all of it is used here, and test-mode
// checks of this bench (`cargo clippy --all-targets`) compile its unit-test module without running it.
#[allow(dead_code, unused_imports)]
#[path = "../src/spill/log/mod.rs"]
mod log;

use std::fs::File;
use std::io::{BufWriter, Seek, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use log::{Log, LogOptions};
use tower_audit::{AuditEvent, kind};

const BATCH: usize = 512;

/// When the log is fsynced.
#[derive(Debug, Clone, Copy)]
enum Sync {
    /// After every batch: nothing acknowledged upstream is ever lost.
    EveryBatch,
    /// When this long has passed since the last sync: a crash loses at most that much.
    Interval(Duration),
}

/// What the middleware records for an ordinary API call, as the JSON the spill would hold (about 460 bytes, most of
/// it field names, ids and the timestamp).
fn event_payload() -> Vec<u8> {
    let mut event = AuditEvent::new(kind::HTTP_REQUEST).actor("alice@example.com");
    event.id = uuid::Uuid::now_v7();
    event.instance = Some("api-7f9c4d".into());
    event.boot = Some(uuid::Uuid::now_v7());
    event.seq = 1_048_576;
    event.method = Some("GET".into());
    event.route = Some("/api/v1/orders/{id}".into());
    event.path = Some("/api/v1/orders/8c1f2a9e".into());
    event.status = Some(200);
    event.latency_us = Some(1834);
    event.client_addr = Some("203.0.113.42".parse().unwrap());
    serde_json::to_vec(&event).unwrap()
}

/// Appends `iters` batches to `log`, syncing by `policy`, and returns the time taken.
///
/// Acknowledges everything whenever half the budget is used, as a delivering pipeline would, so segments get
/// deleted and the disk never fills; that cost (a ledger write, the unlink of a segment) is part of the figure.
fn log_batches(log: &mut Log, last_sync: &mut Instant, records: &[&[u8]], policy: Sync, iters: u64) -> Duration {
    let start = Instant::now();
    for _ in 0..iters {
        assert_eq!(log.append(records).unwrap(), records.len());
        match policy {
            Sync::EveryBatch => log.sync().unwrap(),
            Sync::Interval(interval) if last_sync.elapsed() >= interval => {
                log.sync().unwrap();
                *last_sync = Instant::now();
            }
            Sync::Interval(_) => {}
        }
        if log.disk_bytes() > log::DEFAULT_MAX_BYTES / 2 {
            log.ack(log.end(), false).unwrap();
        }
    }
    start.elapsed()
}

/// The baseline: the same payloads through a `BufWriter`, flushed per batch. The file starts over at the segment
/// size, as the log's deletions keep its files from growing.
fn plain_batches(file: &mut BufWriter<File>, written: &mut u64, records: &[&[u8]], iters: u64) -> Duration {
    let start = Instant::now();
    for _ in 0..iters {
        for record in records {
            file.write_all(record).unwrap();
            *written += record.len() as u64;
        }
        file.flush().unwrap();
        if *written >= log::DEFAULT_SEGMENT_BYTES {
            file.get_mut().set_len(0).unwrap();
            file.rewind().unwrap();
            *written = 0;
        }
    }
    start.elapsed()
}

fn open_log(dir: &Path) -> Log {
    Log::open(dir, LogOptions::default()).unwrap().0
}

fn spill(c: &mut Criterion) {
    let payload = event_payload();
    eprintln!("spill: batches of {BATCH} records of {} bytes: {}", payload.len(), String::from_utf8_lossy(&payload));
    let records: Vec<&[u8]> = vec![payload.as_slice(); BATCH];
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();

    let mut group = c.benchmark_group("spill");
    let bytes = (payload.len() * BATCH) as u64;
    group.throughput(Throughput::ElementsAndBytes { elements: BATCH as u64, bytes });
    for (name, policy) in [
        ("log_append_sync_every_batch", Sync::EveryBatch),
        ("log_append_sync_interval_200ms", Sync::Interval(Duration::from_millis(200))),
    ] {
        let path = dir.path().join(name);
        let mut log = open_log(&path);
        let mut last_sync = Instant::now();
        group.bench_function(name, |b| {
            b.iter_custom(|iters| log_batches(&mut log, &mut last_sync, &records, policy, iters))
        });
    }
    let mut file = BufWriter::new(File::create(dir.path().join("plain")).unwrap());
    let mut written = 0;
    group.bench_function("bufwriter_append_flush_per_batch", |b| {
        b.iter_custom(|iters| plain_batches(&mut file, &mut written, &records, iters))
    });
    group.finish();
}

criterion_group!(benches, spill);
criterion_main!(benches);
