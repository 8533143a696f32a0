//! The disk spill: outages longer than the memory queue, restarts, a corrupt record, the disk budget, and one
//! pipeline per directory. Real files in a temporary directory; the sink is a `MemorySink` behind a switch
//! (the outage is the point of these tests).

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::{assert_identity, eventually};
use tower_audit::{
    AuditEvent, AuditHandle, AuditLayer, AuditSink, ConfigError, MemorySink, Retry, SinkError, Spill, SyncPolicy, kind,
};

/// A memory sink that refuses every batch while it is down.
#[derive(Clone, Default)]
struct Switch {
    sink: MemorySink,
    down: Arc<AtomicBool>,
    refused: Arc<AtomicUsize>,
}

impl Switch {
    fn down() -> Self {
        let switch = Switch::default();
        switch.down.store(true, Ordering::SeqCst);
        switch
    }

    fn up(&self) {
        self.down.store(false, Ordering::SeqCst);
    }

    fn events(&self) -> Vec<AuditEvent> {
        self.sink.events()
    }
}

impl AuditSink for Switch {
    async fn write_batch(&self, batch: &[AuditEvent]) -> Result<(), SinkError> {
        if self.down.load(Ordering::SeqCst) {
            self.refused.fetch_add(1, Ordering::SeqCst);
            return Err(SinkError::backend("the audit database is down"));
        }
        self.sink.write_batch(batch).await
    }
}

fn quick_retry() -> Retry {
    Retry::default().base_delay(Duration::from_millis(5)).max_delay(Duration::from_millis(20))
}

fn build(sink: &Switch, spill: Spill, capacity: usize) -> (AuditLayer, AuditHandle) {
    AuditLayer::builder(sink.clone())
        .capacity(capacity)
        .batch_size(capacity.min(512))
        .flush_interval(Duration::from_millis(10))
        .retry(quick_retry())
        .spill(spill)
        .build()
        .unwrap()
}

/// Records `n` events named `e<i>`, `chunk` at a time, waiting after each chunk until the worker has moved
/// the memory queue into the spill (so a producer faster than the disk cannot overflow it; what is asserted
/// is that the worker keeps draining while the sink is down).
async fn record(handle: &AuditHandle, range: std::ops::Range<usize>, chunk: usize) {
    let mut start = range.start;
    while start < range.end {
        let end = (start + chunk).min(range.end);
        for i in start..end {
            assert!(handle.record(AuditEvent::new("test.event").actor(format!("e{i}"))));
        }
        eventually(Duration::from_secs(30), || handle.stats().queued_bytes == 0).await;
        start = end;
    }
}

/// The user events in `events`, by actor, each checked to appear once.
fn actors_once(events: &[AuditEvent]) -> HashSet<String> {
    let mut seen = HashSet::new();
    for event in events.iter().filter(|e| !e.is_pipeline_event()) {
        let actor = event.actor.clone().expect("every test event has an actor");
        assert!(seen.insert(actor.clone()), "{actor} was written twice");
    }
    seen
}

fn expected(range: std::ops::Range<usize>) -> HashSet<String> {
    range.map(|i| format!("e{i}")).collect()
}

fn segment_bytes_on_disk(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".seg"))
        .map(|e| e.metadata().unwrap().len())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_of_100k_events_with_a_queue_of_1024_loses_none_and_replays_each_once() {
    const N: usize = 100_000;
    let dir = tempfile::tempdir().unwrap();
    let sink = Switch::down();
    let (_layer, handle) = build(&sink, Spill::new(dir.path()), 1024);

    record(&handle, 0..N, 1000).await;
    let during = handle.stats();
    assert_eq!((during.accepted, during.dropped(), during.spill_full, during.written), (N as u64, 0, 0, 0));
    assert!(sink.refused.load(Ordering::SeqCst) > 0, "the sink was asked and refused");
    assert!(sink.events().is_empty());
    // The backlog is on disk (each event takes well over 100 bytes there), not in the memory queue.
    assert!(segment_bytes_on_disk(dir.path()) > (N * 100) as u64);
    assert_eq!(during.queued_bytes, 0);

    sink.up();
    eventually(Duration::from_secs(120), || handle.stats().written == N as u64).await;
    let report = handle.shutdown(Duration::from_secs(30)).await;
    let s = report.stats;
    assert!(report.drained, "{report}");
    assert_eq!((s.written, s.missing(), s.left_in_spill, s.spilled), (N as u64, 0, 0, N as u64 + 2));
    assert_identity(&s);

    let events = sink.events();
    assert_eq!(actors_once(&events), expected(0..N));
    // Oldest first: the boot event, then every event in the order recorded, then the shutdown event.
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=N as u64 + 2).collect::<Vec<_>>());
    assert_eq!((&*events[0].kind, &*events[N + 1].kind), (kind::AUDIT_BOOT, kind::AUDIT_SHUTDOWN));
    assert_eq!(events[1].actor.as_deref(), Some("e0"));
    // All of it was delivered, so every segment but the one being written was deleted.
    assert!(segment_bytes_on_disk(dir.path()) < 64 << 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_is_left_in_the_spill_at_shutdown_is_replayed_by_the_next_boot() {
    let dir = tempfile::tempdir().unwrap();
    let first = Switch::down();
    let (_layer, handle) = build(&first, Spill::new(dir.path()), 64);
    let boot1 = handle.boot();
    record(&handle, 0..300, 50).await;
    // The sink is still down: shutdown gives up at its deadline and leaves everything in the spill.
    let report = handle.shutdown(Duration::from_millis(200)).await;
    let s = report.stats;
    assert!(!report.drained);
    assert_eq!((s.accepted, s.written, s.left_in_spill, s.abandoned, s.missing()), (300, 0, 300, 0, 0));
    assert_identity(&s);
    assert!(first.events().is_empty());

    let second = Switch::default();
    let (_layer, handle) = build(&second, Spill::new(dir.path()), 64);
    assert_eq!(handle.stats().recovered, 300);
    record(&handle, 300..310, 10).await;
    eventually(Duration::from_secs(30), || handle.stats().written == 310).await;
    let report = handle.shutdown(Duration::from_secs(10)).await;
    assert!(report.drained, "{report}");
    let s = report.stats;
    assert_eq!((s.accepted, s.recovered, s.written, s.left_in_spill, s.missing()), (10, 300, 310, 0, 0));
    assert_identity(&s);

    let events = second.events();
    assert_eq!(actors_once(&events), expected(0..310));
    // The first boot's trail comes first and whole: its boot event, 300 events, its shutdown event (which
    // counted them as left in the spill); then the second boot's, whose boot event names the first.
    let of_boot1: Vec<&AuditEvent> = events.iter().filter(|e| e.boot == Some(boot1)).collect();
    assert_eq!(of_boot1.iter().map(|e| e.seq).collect::<Vec<_>>(), (1..=302).collect::<Vec<_>>());
    assert_eq!(of_boot1[301].kind, kind::AUDIT_SHUTDOWN);
    assert_eq!(of_boot1[301].attributes["left_in_spill"], "300");
    let boot2 = events.iter().find(|e| e.kind == kind::AUDIT_BOOT && e.boot == Some(handle.boot())).unwrap();
    assert_eq!(boot2.attributes["previous_boot"], boot1.to_string());
    assert_eq!(boot2.attributes["previous_ended"], "clean");
    assert_eq!(boot2.attributes["replayed"], "300");
    assert_eq!(boot2.attributes["corrupt"], "0");
    assert_eq!(boot2.attributes["spill"], "on");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_byte_costs_exactly_that_record_which_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let first = Switch::down();
    let (_layer, handle) = build(&first, Spill::new(dir.path()), 64);
    record(&handle, 0..100, 50).await;
    assert_eq!(handle.shutdown(Duration::from_millis(100)).await.stats.left_in_spill, 100);

    // Flip one byte inside the record of e42 (its actor is in the payload as plain text).
    let segment = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "seg"))
        .unwrap();
    let mut bytes = std::fs::read(&segment).unwrap();
    let at = bytes.windows(4).position(|w| w == b"\x03e42").expect("e42's actor in the segment") + 2;
    bytes[at] ^= 0x01;
    std::fs::write(&segment, &bytes).unwrap();

    let second = Switch::default();
    let (_layer, handle) = build(&second, Spill::new(dir.path()), 64);
    let s = handle.stats();
    assert_eq!((s.recovered, s.corrupt), (100, 1), "the corrupt record is counted as recovered and corrupt");
    eventually(Duration::from_secs(30), || handle.stats().written == 99).await;
    let report = handle.shutdown(Duration::from_secs(10)).await;
    assert_eq!((report.stats.corrupt, report.stats.missing(), report.unreported), (1, 1, 0), "{report}");

    let events = second.events();
    let mut want = expected(0..100);
    want.remove("e42");
    assert_eq!(actors_once(&events), want);
    let boot = events.iter().find(|e| e.kind == kind::AUDIT_BOOT && e.boot == Some(handle.boot())).unwrap();
    assert_eq!(boot.attributes["corrupt"], "1");
    let gaps: Vec<&AuditEvent> = events.iter().filter(|e| e.kind == kind::AUDIT_GAP).collect();
    assert_eq!(gaps.len(), 1, "{gaps:?}");
    assert_eq!((gaps[0].attributes["corrupt"].as_str(), gaps[0].attributes["lost"].as_str()), ("1", "1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_disk_budget_events_are_dropped_counted_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Switch::down();
    let spill = Spill::new(dir.path()).max_bytes(64 << 10).segment_bytes(16 << 10);
    let (_layer, handle) = build(&sink, spill, 64);
    record(&handle, 0..2000, 50).await;
    // Every event the worker took is either in the spill (after the boot event) or dropped at its budget.
    eventually(Duration::from_secs(30), || {
        let s = handle.stats();
        s.spilled + s.spill_full == 2000 + 1
    })
    .await;
    let s = handle.stats();
    assert_eq!(s.accepted, 2000);
    assert!(s.spill_full > 0 && s.spill_full < 2000, "{s:?}");
    assert!(segment_bytes_on_disk(dir.path()) <= 64 << 10);
    let dropped = s.spill_full;

    // Back up: the backlog drains, room comes back, and the gap event tells the trail what was dropped.
    sink.up();
    eventually(Duration::from_secs(30), || handle.stats().written == 2000 - dropped).await;
    let report = handle.shutdown(Duration::from_secs(10)).await;
    assert!(report.drained, "{report}");
    assert_eq!((report.stats.spill_full, report.stats.missing(), report.unreported), (dropped, dropped, 0));
    assert_identity(&report.stats);
    let events = sink.events();
    assert_eq!(actors_once(&events).len() as u64, 2000 - dropped);
    let gaps: Vec<&AuditEvent> = events.iter().filter(|e| e.kind == kind::AUDIT_GAP).collect();
    let reported: u64 = gaps.iter().map(|g| g.attributes["spill_full"].parse::<u64>().unwrap()).sum();
    assert_eq!(reported, dropped);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_pipeline_per_directory() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Switch::default();
    let (_layer, handle) = build(&sink, Spill::new(dir.path()), 64);
    let second = AuditLayer::builder(MemorySink::new()).spill(Spill::new(dir.path())).build();
    let err = second.expect_err("a second pipeline on the directory is refused");
    assert!(matches!(&err, ConfigError::SpillLocked { dir: d } if d == dir.path()), "{err:?}");
    let message = err.to_string();
    assert!(message.contains(&dir.path().display().to_string()) && message.contains("LOCK"), "{message}");

    // Once the first has shut down, the directory is free again.
    assert!(handle.shutdown(Duration::from_secs(5)).await.drained);
    let (_layer, again) = build(&sink, Spill::new(dir.path()), 64);
    assert!(again.shutdown(Duration::from_secs(5)).await.drained);
}

#[tokio::test]
async fn spill_settings_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let refused = |builder: tower_audit::AuditLayerBuilder| builder.build().err().unwrap().to_string();
    let with_fallback =
        AuditLayer::builder(MemorySink::new()).spill(Spill::new(dir.path())).fallback(MemorySink::new());
    assert!(refused(with_fallback).contains("configure one or the other"));
    let zero = AuditLayer::builder(MemorySink::new()).spill(Spill::new(dir.path()).max_bytes(0));
    assert_eq!(refused(zero), "`spill max_bytes` must be at least 1");
    let zero =
        AuditLayer::builder(MemorySink::new()).spill(Spill::new(dir.path()).sync(SyncPolicy::Interval(Duration::ZERO)));
    assert_eq!(refused(zero), "`spill sync interval` must be at least 1");
    // A path that cannot be a directory.
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let err = AuditLayer::builder(MemorySink::new()).spill(Spill::new(&file)).build().err().unwrap();
    assert!(matches!(err, ConfigError::SpillIo { .. }), "{err:?}");
}
