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
    // Three rounds of 4 events, each round drained before the next: a checkpoint follows the round in which
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
