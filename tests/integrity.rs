//! Integrity on the pipeline side: every event the worker writes is linked into its boot's hash chain, and
//! checkpoints (every N events, every T, at shutdown) sign the chain head with the configured key.

mod common;

use std::time::Duration;

use common::eventually;
use tower_audit::integrity::{Checkpoint, Integrity, event_hash};
use tower_audit::{AuditEvent, AuditLayer, Hash, MemorySink, kind};

const LIMIT: Duration = Duration::from_secs(10);

/// Checks that `events` (one boot, in seq order from 1) form an unbroken chain, and every checkpoint in it
/// verifies and signs the event just before it. Returns the seqs of the checkpoint events.
fn assert_chained(events: &[AuditEvent], integrity: &Integrity) -> Vec<u64> {
    let key = integrity.verifier_key();
    let mut prev = Hash::ZERO;
    let mut checkpoints = Vec::new();
    for (i, event) in events.iter().enumerate() {
        assert_eq!(event.seq, i as u64 + 1);
        assert_eq!(event.prev_hash, Some(prev), "seq {}", event.seq);
        assert_eq!(event.hash, Some(event_hash(&prev, event)), "seq {}", event.seq);
        if let Some(checkpoint) = Checkpoint::from_event(event) {
            let checkpoint = checkpoint.unwrap();
            checkpoint.verify(&key).unwrap();
            assert_eq!((checkpoint.seq, checkpoint.hash), (event.seq - 1, prev));
            checkpoints.push(event.seq);
        }
        prev = event.hash.unwrap();
    }
    checkpoints
}

#[tokio::test]
async fn every_event_is_chained_and_checkpoints_sign_the_head_every_n_events_and_at_shutdown() {
    let sink = MemorySink::new();
    let integrity = Integrity::from_seed(&[1; 32]).checkpoint_every(5).checkpoint_interval(Duration::from_secs(3600));
    let (_layer, handle) = AuditLayer::builder(sink.clone()).integrity(integrity.clone()).build().unwrap();
    // Three rounds of 4 events, each round written before the next: a checkpoint follows the batch after which
    // 5 or more events have been linked since the last one (the boot event counts).
    for round in 0..3 {
        for i in 0..4 {
            assert!(handle.record(AuditEvent::new("test.event").attribute("i", format!("{round}.{i}"))));
        }
        let written = |sink: &MemorySink| sink.events().iter().filter(|e| e.kind == "test.event").count();
        eventually(LIMIT, || written(&sink) == 4 * (round + 1)).await;
    }
    let report = handle.shutdown(LIMIT).await;
    assert!(report.drained);
    let events = sink.events();
    let kinds: Vec<&str> = events.iter().map(|e| &*e.kind).collect();
    let t = "test.event";
    let c = kind::AUDIT_CHECKPOINT;
    assert_eq!(kinds, [kind::AUDIT_BOOT, t, t, t, t, c, t, t, t, t, t, t, t, t, c, kind::AUDIT_SHUTDOWN], "{kinds:?}");
    assert_eq!(assert_chained(&events, &integrity), [6, 15, 16]);
    assert_eq!(report.stats.checkpoints, 3);
    assert_eq!(report.stats.written, 12);
}

#[tokio::test]
async fn with_a_spill_a_new_boot_references_the_last_checkpoint_of_the_boot_before() {
    let dir = tempfile::tempdir().unwrap();
    let integrity = Integrity::from_seed(&[2; 32]);
    let mut trails = Vec::new();
    for _ in 0..2 {
        let sink = MemorySink::new();
        let (_layer, handle) = AuditLayer::builder(sink.clone())
            .spill(tower_audit::Spill::new(dir.path()))
            .integrity(integrity.clone())
            .build()
            .unwrap();
        assert!(handle.record(AuditEvent::new("test.event")));
        assert!(handle.shutdown(LIMIT).await.drained);
        trails.push(sink.events());
    }
    let (first, second) = (&trails[0], &trails[1]);
    assert_eq!(assert_chained(first, &integrity), [3]);
    assert_eq!(assert_chained(second, &integrity), [3]);
    // Boot 1 knew of no boot before it; boot 2's first event names boot 1's last checkpoint (its shutdown's).
    assert!(Checkpoint::previous_of(&first[0]).is_none());
    let previous = Checkpoint::previous_of(&second[0]).unwrap().unwrap();
    previous.verify(&integrity.verifier_key()).unwrap();
    assert_eq!(Checkpoint::from_event(&first[2]).unwrap().unwrap(), previous);
    assert_eq!((previous.boot, previous.seq, Some(previous.hash)), (first[1].boot.unwrap(), 2, first[1].hash));
    assert_ne!(first[0].boot, second[0].boot);
}

#[tokio::test]
async fn without_traffic_a_heartbeat_checkpoint_is_signed_every_interval() {
    let sink = MemorySink::new();
    let integrity = Integrity::from_seed(&[3; 32]).checkpoint_interval(Duration::from_millis(300));
    let (_layer, handle) = AuditLayer::builder(sink.clone())
        .flush_interval(Duration::from_millis(20))
        .integrity(integrity.clone())
        .build()
        .unwrap();
    let checkpoints = |sink: &MemorySink| sink.events().iter().filter(|e| e.kind == kind::AUDIT_CHECKPOINT).count();
    eventually(LIMIT, || checkpoints(&sink) >= 2).await;
    let report = handle.shutdown(LIMIT).await;
    let events = sink.events();
    let seqs = assert_chained(&events, &integrity);
    // Every event after the boot event is a checkpoint: the heartbeats, then the shutdown.
    assert_eq!(seqs, (2..=events.len() as u64).collect::<Vec<_>>());
    assert_eq!(report.stats.checkpoints, seqs.len() as u64);
    assert_eq!(report.stats.written, 0);
}

#[tokio::test]
async fn checkpoints_reach_the_checkpoint_sink_and_a_failing_one_is_counted() {
    let anchor = MemorySink::new();
    let integrity = Integrity::from_seed(&[4; 32]).checkpoint_every(2).checkpoint_sink(anchor.clone());
    let sink = MemorySink::new();
    let (_layer, handle) = AuditLayer::builder(sink.clone()).integrity(integrity).build().unwrap();
    assert!(handle.record(AuditEvent::new("test.event")));
    eventually(LIMIT, || sink.events().iter().any(|e| e.kind == kind::AUDIT_CHECKPOINT)).await;
    let report = handle.shutdown(LIMIT).await;
    let in_trail: Vec<AuditEvent> = sink.events().into_iter().filter(|e| Checkpoint::from_event(e).is_some()).collect();
    // Shutdown returns once the checkpoint sink has the shutdown's checkpoint too.
    assert_eq!(anchor.events(), in_trail);
    assert_eq!((report.stats.checkpoints, report.stats.anchor_failed), (2, 0));

    let integrity = Integrity::from_seed(&[4; 32]).checkpoint_sink(common::FailingSink);
    let (_layer, handle) = AuditLayer::builder(MemorySink::new()).integrity(integrity).build().unwrap();
    let report = handle.shutdown(LIMIT).await;
    assert_eq!((report.stats.checkpoints, report.stats.anchor_failed), (1, 1));
}

#[test]
fn settings_that_cannot_hold_are_refused() {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let _guard = runtime.enter();
    let cases = [
        (Integrity::from_seed(&[1; 32]).checkpoint_every(0), "integrity: checkpoint_every must be at least 1"),
        (
            Integrity::from_seed(&[1; 32]).checkpoint_interval(Duration::ZERO),
            "integrity: checkpoint_interval must not be zero",
        ),
        (
            Integrity::from_seed(&[1; 32]).key_name("a b"),
            "integrity: key_name must be non-empty, without spaces, '+' or control characters",
        ),
    ];
    for (integrity, message) in cases {
        let err = AuditLayer::builder(MemorySink::new()).integrity(integrity).build().unwrap_err();
        assert_eq!(err.to_string(), message);
    }
    let err = Integrity::from_pem("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n").unwrap_err();
    assert!(
        err.to_string().starts_with("cannot read the integrity signing key (want an Ed25519 key in PKCS#8 PEM)"),
        "{err}"
    );
}

#[test]
fn a_pkcs8_pem_key_from_openssl_loads() {
    // `openssl genpkey -algorithm ed25519` output (a throwaway key for this test).
    let pem = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIMHmeIJvNE3Dk8C7hu/yz7cfUS/OB3IpDW2hkrXopThy\n-----END PRIVATE KEY-----\n";
    let integrity = Integrity::from_pem(pem).unwrap();
    assert!(integrity.verifier_key().to_string().starts_with("tower-audit+"));
}

/// Under load that never lets the worker drain the queue, checkpoints keep their pace: the worker checks after
/// every batch, not only once the queue is empty.
#[tokio::test]
async fn checkpoints_keep_their_pace_between_full_batches() {
    let sink = MemorySink::new();
    let integrity = Integrity::from_seed(&[5; 32]).checkpoint_every(10).checkpoint_interval(Duration::from_secs(3600));
    let (_layer, handle) = AuditLayer::builder(sink.clone())
        .batch_size(4)
        .flush_interval(Duration::from_secs(3600))
        .integrity(integrity.clone())
        .build()
        .unwrap();
    // Queued before the worker runs (this runtime has one thread): ten full batches back to back.
    for i in 0..40 {
        assert!(handle.record(AuditEvent::new("test.event").attribute("i", i.to_string())));
    }
    eventually(LIMIT, || sink.events().iter().filter(|e| e.kind == "test.event").count() == 40).await;
    let report = handle.shutdown(LIMIT).await;
    // The boot event is seq 1; batches of 4 follow; a checkpoint follows the batch that brings the events linked
    // since the last one to 10 or more (13, then 12 and 12), and the shutdown event is the last checkpoint.
    assert_eq!(assert_chained(&sink.events(), &integrity), [14, 27, 40, 45]);
    assert_eq!(report.stats.checkpoints, 4);
}

/// A primary sink that fails every batch holding an event marked `fail`, and writes the others to a file.
struct Flaky(tower_audit::JsonLinesSink);

impl tower_audit::AuditSink for Flaky {
    async fn write_batch(&self, batch: &[AuditEvent]) -> Result<(), tower_audit::SinkError> {
        if batch.iter().any(|e| e.attributes.contains_key("fail")) {
            return Err(tower_audit::SinkError::backend("a marked batch"));
        }
        self.0.write_batch(batch).await
    }

    async fn flush(&self) -> Result<(), tower_audit::SinkError> {
        self.0.flush().await
    }
}

/// Records `rounds` rounds of 4 events (those of the rounds in `failing` marked to fail at the primary),
/// each round settled before the next, then shuts down. Returns the shutdown report.
async fn run_rounds(
    builder: tower_audit::AuditLayerBuilder,
    rounds: u64,
    failing: &[u64],
) -> tower_audit::ShutdownReport {
    let (_layer, handle) = builder.build().unwrap();
    for round in 0..rounds {
        for i in 0..4 {
            let mut event = AuditEvent::new("test.event").attribute("i", format!("{round}.{i}"));
            if failing.contains(&round) {
                event = event.attribute("fail", "yes");
            }
            assert!(handle.record(event));
        }
        let settled = |s: tower_audit::Stats| s.written + s.fallback_written + s.lost;
        eventually(LIMIT, || settled(handle.stats()) == 4 * (round + 1)).await;
    }
    handle.shutdown(LIMIT).await
}

fn seq_ranges(events: &[AuditEvent]) -> Vec<(u64, u64)> {
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for seq in events.iter().map(|e| e.seq) {
        match ranges.last_mut() {
            Some(last) if last.1 + 1 == seq => last.1 = seq,
            _ => ranges.push((seq, seq)),
        }
    }
    ranges
}

/// With a fallback sink the chain spans both trails: the primary's table (here a file) and the fallback's file
/// verify as one trail with nothing missing, each in storage order; the primary's alone verifies too, every seq
/// it lacks declared by its gap events (the events, and the pipeline's own events, in the fallback).
#[tokio::test]
async fn with_a_fallback_both_trails_verify_as_one_and_the_primary_declares_what_it_lacks() {
    let dir = tempfile::tempdir().unwrap();
    let (primary, fallback) = (dir.path().join("primary.jsonl"), dir.path().join("fallback.jsonl"));
    let integrity = Integrity::from_seed(&[6; 32]).checkpoint_interval(Duration::from_secs(3600));
    let key = integrity.verifier_key();
    let builder = AuditLayer::builder(Flaky(tower_audit::JsonLinesSink::open(&primary).unwrap()))
        .batch_size(4)
        .flush_interval(Duration::from_millis(10))
        .retry(tower_audit::Retry::none())
        .fallback(tower_audit::JsonLinesSink::open(&fallback).unwrap())
        .integrity(integrity);
    let report = run_rounds(builder, 5, &[1, 3]).await;
    assert_eq!((report.stats.written, report.stats.fallback_written, report.stats.lost), (12, 8, 0));
    assert_eq!(report.unreported, 0);

    let read = |path| tower_audit::integrity::read_json_lines(path).unwrap().into_iter().map(Result::unwrap);
    let in_primary: Vec<AuditEvent> = read(&primary).collect();
    let in_fallback: Vec<AuditEvent> = read(&fallback).collect();
    // The fallback holds the two failed rounds, each after the primary's gap event that led its batch (if any)
    // and in seq order; nothing numbered is missing from both.
    assert_eq!(in_fallback.iter().filter(|e| e.kind == "test.event").count(), 8);
    assert!(in_fallback.is_sorted_by_key(|e| e.seq) && in_primary.is_sorted_by_key(|e| e.seq));
    let mut all: Vec<u64> = in_primary.iter().chain(&in_fallback).map(|e| e.seq).collect();
    all.sort_unstable();
    assert_eq!(all, (1..=all.len() as u64).collect::<Vec<_>>());

    let mut verifier = tower_audit::integrity::Verifier::new(&key, &[]);
    verifier.push_json_lines(&primary).unwrap();
    verifier.push_json_lines(&fallback).unwrap();
    let both = verifier.finish();
    assert!(both.ok(), "{both}");
    let boot = &both.boots[0];
    assert_eq!((both.boots.len(), boot.events, boot.lost.len()), (1, all.len() as u64, 0));
    assert!(boot.clean_shutdown);

    let alone = tower_audit::integrity::verify_json_lines(&primary, &key, &[]).unwrap();
    assert!(alone.ok(), "{alone}");
    let declared: Vec<(u64, u64)> = alone.boots[0].lost.iter().map(|r| (r.from, r.to)).collect();
    assert_eq!(declared, seq_ranges(&in_fallback));

    // Storage order is still checked within each source: two lines of the fallback file swapped are caught.
    let text = std::fs::read_to_string(&fallback).unwrap();
    let mut lines: Vec<&str> = text.lines().collect();
    lines.swap(1, 2);
    std::fs::write(&fallback, lines.join("\n") + "\n").unwrap();
    let mut verifier = tower_audit::integrity::Verifier::new(&key, &[]);
    verifier.push_json_lines(&primary).unwrap();
    verifier.push_json_lines(&fallback).unwrap();
    let swapped = verifier.finish();
    let findings: Vec<_> = swapped.findings().map(|(_, f)| f.clone()).collect();
    assert_eq!(
        findings,
        [tower_audit::integrity::Finding::Reordered { seqs: vec![in_fallback[1].seq, in_fallback[2].seq] }]
    );
}

/// With a backlog of full batches the worker links the next batch while the sink writes the current one; when
/// the current one fails, the batch linked ahead is numbered anew after what the failure makes due (the
/// fallback's gap event, the primary's), so failures in a row, and a failure right after one, leave the same
/// trail as batch by batch: every seq once across both trails, both verifying as one, the primary alone
/// declaring what it lacks.
#[tokio::test]
async fn batches_linked_ahead_of_failing_ones_are_numbered_after_what_the_failure_makes_due() {
    let dir = tempfile::tempdir().unwrap();
    let (primary, fallback) = (dir.path().join("primary.jsonl"), dir.path().join("fallback.jsonl"));
    let integrity =
        Integrity::from_seed(&[8; 32]).checkpoint_every(1000).checkpoint_interval(Duration::from_secs(3600));
    let key = integrity.verifier_key();
    let (_layer, handle) = AuditLayer::builder(Flaky(tower_audit::JsonLinesSink::open(&primary).unwrap()))
        .batch_size(4)
        .flush_interval(Duration::from_secs(3600))
        .retry(tower_audit::Retry::none())
        .fallback(tower_audit::JsonLinesSink::open(&fallback).unwrap())
        .integrity(integrity)
        .build()
        .unwrap();
    // Queued before the worker runs (this runtime has one thread): twelve full batches back to back, the
    // third, fourth and seventh marked to fail at the primary.
    let failing = [2, 3, 6];
    for batch in 0..12 {
        for i in 0..4 {
            let mut event = AuditEvent::new("test.event").attribute("i", format!("{batch}.{i}"));
            if failing.contains(&batch) {
                event = event.attribute("fail", "yes");
            }
            assert!(handle.record(event));
        }
    }
    let settled = |s: tower_audit::Stats| s.written + s.fallback_written + s.lost;
    eventually(LIMIT, || settled(handle.stats()) == 48).await;
    let report = handle.shutdown(LIMIT).await;
    assert_eq!((report.stats.written, report.stats.fallback_written, report.stats.lost), (36, 12, 0));
    assert_eq!((report.unreported, report.stats.abandoned), (0, 0));

    let read = |path| tower_audit::integrity::read_json_lines(path).unwrap().into_iter().map(Result::unwrap);
    let in_primary: Vec<AuditEvent> = read(&primary).collect();
    let in_fallback: Vec<AuditEvent> = read(&fallback).collect();
    let marked = |events: &[AuditEvent]| -> Vec<String> {
        events.iter().filter(|e| e.kind == "test.event").map(|e| e.attributes["i"].clone()).collect()
    };
    let expected = |batches: &mut dyn Iterator<Item = u64>| -> Vec<String> {
        batches.flat_map(|b| (0..4).map(move |i| format!("{b}.{i}"))).collect()
    };
    assert_eq!(marked(&in_fallback), expected(&mut failing.into_iter()));
    assert_eq!(marked(&in_primary), expected(&mut (0..12).filter(|b| !failing.contains(b))));
    let mut all: Vec<u64> = in_primary.iter().chain(&in_fallback).map(|e| e.seq).collect();
    all.sort_unstable();
    assert_eq!(all, (1..=all.len() as u64).collect::<Vec<_>>());
    // Each failed batch's seqs follow the batch before it (or the gap event that led it); the batch after a failure
    // is led by the primary's gap event, written alone (the batch is full), and numbered after it.
    let seqs = |events: &[AuditEvent], kind: &str| -> Vec<u64> {
        events.iter().filter(|e| e.kind == kind).map(|e| e.seq).collect()
    };
    assert_eq!(seq_ranges(&in_fallback), [(10, 13), (15, 18), (28, 31)]);
    assert_eq!(seqs(&in_primary, "audit.gap"), [14, 19, 32]);
    assert_eq!(seqs(&in_primary, "audit.shutdown"), [53]);

    let mut verifier = tower_audit::integrity::Verifier::new(&key, &[]);
    verifier.push_json_lines(&primary).unwrap();
    verifier.push_json_lines(&fallback).unwrap();
    let both = verifier.finish();
    assert!(both.ok(), "{both}");
    assert_eq!((both.boots.len(), both.boots[0].events, both.boots[0].lost.len()), (1, all.len() as u64, 0));
    let alone = tower_audit::integrity::verify_json_lines(&primary, &key, &[]).unwrap();
    assert!(alone.ok(), "{alone}");
    let declared: Vec<(u64, u64)> = alone.boots[0].lost.iter().map(|r| (r.from, r.to)).collect();
    assert_eq!(declared, seq_ranges(&in_fallback));
}

/// A primary sink that never returns from a batch holding an event marked `stall`, and writes the others to a file.
struct Stalling(tower_audit::JsonLinesSink);

impl tower_audit::AuditSink for Stalling {
    async fn write_batch(&self, batch: &[AuditEvent]) -> Result<(), tower_audit::SinkError> {
        if batch.iter().any(|e| e.attributes.contains_key("stall")) {
            std::future::pending::<()>().await;
        }
        self.0.write_batch(batch).await
    }
}

/// The shutdown deadline passes while the sink holds a batch and the next one is linked ahead: both are
/// abandoned, exactly, and the trail holds what was written, its seqs with no hole.
#[tokio::test]
async fn a_deadline_during_a_write_abandons_the_batch_linked_ahead_too() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("primary.jsonl");
    let integrity = Integrity::from_seed(&[9; 32]).checkpoint_interval(Duration::from_secs(3600));
    let (_layer, handle) = AuditLayer::builder(Stalling(tower_audit::JsonLinesSink::open(&path).unwrap()))
        .batch_size(4)
        .flush_interval(Duration::from_secs(3600))
        .integrity(integrity)
        .build()
        .unwrap();
    // Queued before the worker runs: three full batches, the second stalls the sink.
    for batch in 0..3 {
        for i in 0..4 {
            let mut event = AuditEvent::new("test.event").attribute("i", format!("{batch}.{i}"));
            if batch == 1 {
                event = event.attribute("stall", "yes");
            }
            assert!(handle.record(event));
        }
    }
    eventually(LIMIT, || handle.stats().written == 4).await;
    let report = handle.shutdown(Duration::from_millis(300)).await;
    assert_eq!((report.stats.written, report.stats.abandoned, report.stats.lost), (4, 8, 0));
    assert!(!report.drained);
    let written: Vec<AuditEvent> =
        tower_audit::integrity::read_json_lines(&path).unwrap().into_iter().map(Result::unwrap).collect();
    assert_eq!(written.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2, 3, 4, 5]);
}

/// Without a fallback, a gap event the primary failed is lost with its batch; the next gap event declares it
/// (`pipeline_lost`) with the events, so the trail verifies with every missing seq declared.
#[tokio::test]
async fn a_gap_event_lost_with_its_batch_is_declared_by_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let primary = dir.path().join("primary.jsonl");
    let integrity = Integrity::from_seed(&[7; 32]).checkpoint_interval(Duration::from_secs(3600));
    let key = integrity.verifier_key();
    let builder = AuditLayer::builder(Flaky(tower_audit::JsonLinesSink::open(&primary).unwrap()))
        .batch_size(8)
        .flush_interval(Duration::from_millis(10))
        .retry(tower_audit::Retry::none())
        .integrity(integrity);
    // Round 1 fails; round 2's batch, led by the gap event declaring round 1, fails too; round 3 is written.
    let report = run_rounds(builder, 4, &[1, 2]).await;
    assert_eq!((report.stats.written, report.stats.lost), (8, 8));
    assert_eq!(report.unreported, 0);
    let events: Vec<AuditEvent> =
        tower_audit::integrity::read_json_lines(&primary).unwrap().into_iter().map(Result::unwrap).collect();
    let gaps: Vec<&AuditEvent> = events.iter().filter(|e| e.kind == kind::AUDIT_GAP).collect();
    assert_eq!(gaps.len(), 1);
    let attrs: Vec<String> = gaps[0].attributes.iter().map(|(k, v)| format!("{k}={v}")).collect();
    assert_eq!(attrs.join(" "), "lost=9 pipeline_lost=1 sink_failed=8 trail=primary");

    let report = tower_audit::integrity::verify_json_lines(&primary, &key, &[]).unwrap();
    assert!(report.ok(), "{report}");
    let declared: Vec<(u64, u64)> = report.boots[0].lost.iter().map(|r| (r.from, r.to)).collect();
    // Boot 1, round 0 at 2..=5, round 1 at 6..=9, round 2 with its gap event at 10..=14.
    assert_eq!(declared, [(6, 14)]);
}
