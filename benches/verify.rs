//! The verifier's throughput on a JSON lines trail: events per second through `verify_json_lines` (read, parse,
//! hash, check), on a trail a real pipeline wrote with integrity on (a checkpoint every 4096 events), of events
//! about 450 bytes long in JSON.
//!
//! The trail lives under Cargo's `target/tmp` and is written once per run; `TOWER_AUDIT_BENCH_EVENTS` sets its
//! size (default 1,000,000). `cargo bench --bench verify`

use std::path::{Path, PathBuf};
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tower_audit::integrity::{Integrity, verify_json_lines};
use tower_audit::{AuditEvent, AuditLayer, JsonLinesSink};

const SEED: [u8; 32] = [3; 32];

/// An ordinary API call's event: about 450 bytes of JSON once stamped and chained.
fn event(i: u64) -> AuditEvent {
    let mut event = AuditEvent::new("auth.login").actor(format!("user-{i}@example.com")).attribute("tenant", "acme");
    event.method = Some("POST".into());
    event.route = Some("/v1/sessions".into());
    event.path = Some("/v1/sessions".into());
    event.status = Some(200);
    event.latency_us = Some(1234);
    event.request_id = Some(format!("req-{i:016x}"));
    event.client_addr = Some("203.0.113.9".parse().unwrap());
    event.user_agent = Some("Mozilla/5.0 (X11; Linux x86_64) bench/1.0".into());
    event
}

/// Writes `n` events through a real pipeline with integrity on into a fresh file at `path`.
fn write_trail(path: &Path, n: u64) {
    let _ = std::fs::remove_file(path);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async {
        let integrity = Integrity::from_seed(&SEED);
        let sink = JsonLinesSink::open(path).unwrap();
        let (_layer, handle) =
            AuditLayer::builder(sink).capacity(16_384).batch_size(1024).integrity(integrity).build().unwrap();
        let mut recorded = 0;
        while recorded < n {
            let round = (n - recorded).min(8192);
            for i in recorded..recorded + round {
                assert!(handle.record(event(i)));
            }
            recorded += round;
            while handle.stats().written < recorded {
                tokio::task::yield_now().await;
            }
        }
        assert!(handle.shutdown(Duration::from_secs(60)).await.drained);
    });
}

fn verify(c: &mut Criterion) {
    let n: u64 = std::env::var("TOWER_AUDIT_BENCH_EVENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000);
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("verify-bench.jsonl");
    write_trail(&path, n);
    let bytes = std::fs::metadata(&path).unwrap().len();
    let key = Integrity::from_seed(&SEED).verifier_key();
    let report = verify_json_lines(&path, &key, &[]).unwrap();
    assert!(report.ok(), "{report}");
    let events = report.events();
    eprintln!(
        "trail: {events} events, {bytes} bytes ({} bytes per event), {}, key {key}",
        bytes / events,
        path.display()
    );
    let mut group = c.benchmark_group("verify");
    group.sample_size(10).measurement_time(Duration::from_secs(20)).throughput(Throughput::Elements(events));
    group.bench_function("json_lines", |b| b.iter(|| assert!(verify_json_lines(&path, &key, &[]).unwrap().ok())));
    // The ceiling in the same run: reading the same file and parsing every line into an event, on one thread,
    // with no hashing or checking.
    group.bench_function("ceiling_read_and_parse", |b| {
        b.iter(|| {
            let text = std::fs::read(&path).unwrap();
            let mut parsed = 0u64;
            for line in text.split(|b| *b == b'\n').filter(|line| !line.is_empty()) {
                let event: AuditEvent = serde_json::from_slice(line).unwrap();
                parsed += u64::from(event.seq > 0);
            }
            assert_eq!(parsed, events);
        })
    });
    group.finish();
}

criterion_group!(benches, verify);
criterion_main!(benches);
