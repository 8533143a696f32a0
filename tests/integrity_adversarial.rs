//! Adversarial review of integrity (issue 12), by a reviewer who had not seen the other integrity tests: the chain
//! in every write path, checkpoints and their anchor, boots across restarts, and the verifier against attacks.
//! Tests named `regression_…` failed on the code as reviewed and pass since the fix.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use tower_audit::integrity::{Checkpoint, Finding, Integrity, Report, event_hash, verify};
use tower_audit::{AuditEvent, AuditLayer, AuditSink, Hash, MemorySink, Retry, SinkError, Spill, kind};
use uuid::Uuid;

const LIMIT: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_secs(10);

fn integrity() -> Integrity {
    Integrity::from_seed(&[42; 32])
        .key_name("adv.test")
        .checkpoint_every(3)
        .checkpoint_interval(Duration::from_secs(3600))
}

/// Checks, per boot, that seqs run from 1 without a hole, `prev_hash` is the previous event's hash (zero for
/// seq 1) and `hash` is `event_hash(prev, event)`. Duplicate rows (same id) are dropped first.
fn assert_linked(events: &[AuditEvent]) {
    let mut boots: BTreeMap<Option<Uuid>, BTreeMap<u64, &AuditEvent>> = BTreeMap::new();
    for e in events {
        if let Some(prev) = boots.entry(e.boot).or_default().insert(e.seq, e) {
            assert_eq!(prev.id, e.id, "two different events at seq {} of boot {:?}", e.seq, e.boot);
        }
    }
    for (boot, events) in boots {
        let mut head = Hash::ZERO;
        for (i, (seq, e)) in events.iter().enumerate() {
            assert_eq!(*seq, i as u64 + 1, "boot {boot:?}: seqs not contiguous from 1: {:?}", events.keys());
            assert_eq!(e.prev_hash, Some(head), "boot {boot:?} seq {seq} ({}): prev_hash", e.kind);
            assert_eq!(e.hash, Some(event_hash(&head, e)), "boot {boot:?} seq {seq}: hash");
            head = e.hash.unwrap();
        }
    }
}

fn findings(report: &Report) -> Vec<Finding> {
    report.findings().map(|(_, f)| f.clone()).collect()
}

fn key() -> tower_audit::integrity::VerifierKey {
    integrity().verifier_key()
}

/// A clean boot into a memory sink: `n` user events, one per batch, checkpoint every 3; returns the trail and
/// the anchored checkpoints.
async fn honest(n: usize) -> (Vec<AuditEvent>, Vec<AuditEvent>) {
    let sink = MemorySink::new();
    let anchor = MemorySink::new();
    let (_layer, handle) = AuditLayer::builder(sink.clone())
        .flush_interval(Duration::from_millis(2))
        .integrity(integrity().checkpoint_sink(anchor.clone()))
        .build()
        .unwrap();
    for i in 0..n {
        assert!(handle.record(AuditEvent::new("user.action").attribute("i", i.to_string())));
        eventually(POLL, || handle.stats().written == i as u64 + 1).await;
    }
    let report = handle.shutdown(LIMIT).await;
    assert!(report.drained, "{report}");
    (sink.events(), anchor.events())
}

// ---------------------------------------------------------------------------------------------------------------
// Claim 1 and 2: honest trails, every path.

#[tokio::test]
async fn honest_direct_trail_is_linked_signed_anchored_before_shutdown_returns() {
    let sink = MemorySink::new();
    let anchor = MemorySink::new();
    let integrity = integrity().checkpoint_sink(anchor.clone());
    let vkey = integrity.verifier_key();
    let (_layer, handle) = AuditLayer::builder(sink.clone())
        .flush_interval(Duration::from_millis(2))
        .integrity(integrity)
        .build()
        .unwrap();
    for i in 0..10u64 {
        handle.record(AuditEvent::new("user.action").attribute("i", i.to_string()));
        eventually(POLL, || handle.stats().written == i + 1).await;
    }
    let report = handle.shutdown(LIMIT).await;
    assert!(report.drained, "{report}");
    let events = sink.events();
    assert_linked(&events);
    // Every anchored checkpoint is in the trail, verifies, and the shutdown's is there when shutdown returns.
    let anchored = anchor.events();
    assert_eq!(anchored.len() as u64, report.stats.checkpoints, "{report}");
    assert_eq!(report.stats.anchor_failed, 0);
    assert_eq!(anchored.last().unwrap().kind, kind::AUDIT_SHUTDOWN);
    let mut trusted = Vec::new();
    for a in &anchored {
        assert!(events.contains(a), "anchored checkpoint not in the trail: {a:?}");
        let c = Checkpoint::from_event(a).unwrap().unwrap();
        c.verify(&vkey).unwrap();
        assert_eq!(c.seq + 1, a.seq);
        trusted.push(c);
    }
    assert!(trusted.len() >= 4, "10 events, every 3, plus the shutdown: {}", trusted.len());
    let report = verify(events.clone(), &vkey, &trusted);
    assert!(report.ok(), "{report}");
    let boot = &report.boots[0];
    assert!(boot.clean_shutdown);
    assert_eq!(boot.verified_to, events.len() as u64 - 1);
}

/// Writes every batch, then fails the first batch holding a user event once: a retry writes it twice.
#[derive(Clone, Default)]
struct WriteThenFailOnce {
    inner: MemorySink,
    failed: Arc<AtomicBool>,
}

impl AuditSink for WriteThenFailOnce {
    async fn write_batch(&self, batch: &[AuditEvent]) -> Result<(), SinkError> {
        self.inner.write_batch(batch).await?;
        if batch.iter().any(|e| !e.is_pipeline_event()) && !self.failed.swap(true, Ordering::SeqCst) {
            return Err(SinkError::backend("committed, then the connection dropped"));
        }
        Ok(())
    }
}

#[tokio::test]
async fn retried_batch_written_twice_verifies_with_duplicates() {
    let sink = WriteThenFailOnce::default();
    let (_layer, handle) = AuditLayer::builder(sink.clone())
        .retry(Retry::default().base_delay(Duration::from_millis(1)))
        .integrity(integrity())
        .build()
        .unwrap();
    for i in 0..5 {
        handle.record(AuditEvent::new("user.action").attribute("i", i.to_string()));
    }
    assert!(handle.shutdown(LIMIT).await.drained);
    let events = sink.inner.events();
    assert_linked(&events);
    let report = verify(events, &key(), &[]);
    assert!(report.ok(), "{report}");
    assert!(report.boots[0].duplicates >= 5, "{report:?}");
    assert!(report.boots[0].clean_shutdown);
}

#[tokio::test]
async fn spill_trail_and_its_replay_after_a_restart_verify_and_the_new_boot_references_the_last_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    // Boot A: the sink is down; everything stays in the spill.
    let (_layer, a) = AuditLayer::builder(FailingSink)
        .retry(Retry::default().base_delay(Duration::from_millis(5)))
        .spill(Spill::new(dir.path()))
        .integrity(integrity())
        .build()
        .unwrap();
    for i in 0..7 {
        a.record(AuditEvent::new("user.action").attribute("i", i.to_string()));
    }
    let report_a = a.shutdown(Duration::from_millis(300)).await;
    assert!(report_a.stats.left_in_spill >= 7, "{report_a}");
    // Boot B, same directory, a working sink: replays A, then its own.
    let sink = MemorySink::new();
    let anchor = MemorySink::new();
    let (_layer, b) = AuditLayer::builder(sink.clone())
        .spill(Spill::new(dir.path()))
        .integrity(integrity().checkpoint_sink(anchor.clone()))
        .build()
        .unwrap();
    for i in 0..4 {
        b.record(AuditEvent::new("user.action").attribute("i", i.to_string()));
    }
    let report_b = b.shutdown(LIMIT).await;
    assert!(report_b.drained, "{report_b}");
    let events = sink.events();
    assert_linked(&events);
    let of_a: Vec<_> = events.iter().filter(|e| e.boot == Some(a.boot())).collect();
    assert_eq!(of_a.last().unwrap().kind, kind::AUDIT_SHUTDOWN, "A's whole trail replayed");
    let last_a = Checkpoint::from_event(of_a.last().unwrap()).unwrap().unwrap();
    let boot_b = events.iter().find(|e| e.boot == Some(b.boot()) && e.seq == 1).unwrap();
    assert_eq!(boot_b.kind, kind::AUDIT_BOOT);
    assert_eq!(Checkpoint::previous_of(boot_b).unwrap().unwrap(), last_a);
    let trusted: Vec<_> = anchor.events().iter().map(|e| Checkpoint::from_event(e).unwrap().unwrap()).collect();
    let report = verify(events, &key(), &trusted);
    assert!(report.ok(), "{report}");
    assert_eq!(report.boots.len(), 2);
    assert!(report.boots.iter().all(|b| b.clean_shutdown), "{report}");
}

/// Two boots on one spill directory; the whole first boot is deleted from the trail. README: "deleting a whole
/// boot is noticed by the next one"; `previous_of` docs: "A verifier checks it against that boot's trail".
#[tokio::test]
async fn regression_the_verifier_checks_the_previous_checkpoint_so_a_deleted_boot_is_noticed() {
    let dir = tempfile::tempdir().unwrap();
    let sink = MemorySink::new();
    let mut boots = Vec::new();
    for _ in 0..2 {
        let (_layer, h) =
            AuditLayer::builder(sink.clone()).spill(Spill::new(dir.path())).integrity(integrity()).build().unwrap();
        h.record(AuditEvent::new("user.action"));
        assert!(h.shutdown(LIMIT).await.drained);
        boots.push(h.boot());
    }
    let events = sink.events();
    let second_boot = events.iter().find(|e| e.boot == Some(boots[1]) && e.seq == 1).unwrap();
    assert_eq!(Checkpoint::previous_of(second_boot).unwrap().unwrap().boot, boots[0], "the reference is there");
    assert!(verify(events.clone(), &key(), &[]).ok());
    let tampered: Vec<_> = events.into_iter().filter(|e| e.boot != Some(boots[0])).collect();
    let report = verify(tampered, &key(), &[]);
    assert!(!report.ok(), "boot {} deleted whole, yet: {report}", boots[0]);
}

#[tokio::test]
async fn failing_checkpoint_sink_is_counted_and_never_holds_up_the_trail() {
    let sink = MemorySink::new();
    let (_layer, handle) = AuditLayer::builder(sink.clone())
        .flush_interval(Duration::from_millis(2))
        .integrity(integrity().checkpoint_every(1).checkpoint_sink(FailingSink))
        .build()
        .unwrap();
    for i in 0..4u64 {
        handle.record(AuditEvent::new("user.action"));
        eventually(POLL, || handle.stats().written == i + 1).await;
    }
    let report = handle.shutdown(LIMIT).await;
    assert!(report.drained, "{report}");
    assert!(report.stats.checkpoints >= 5);
    assert_eq!(report.stats.anchor_failed, report.stats.checkpoints, "{report}");
    assert!(verify(sink.events(), &key(), &[]).ok());
}

/// Stalled checkpoint sink: the trail goes on, shutdown returns by its deadline; "What it has not taken by
/// then is counted in `anchor_failed`" (chain.rs `finish`) — every checkpoint, none was taken.
#[tokio::test]
async fn regression_a_stalled_checkpoint_sink_counts_every_unanchored_checkpoint() {
    let sink = MemorySink::new();
    let stalled = StalledSink::default();
    let (_layer, handle) = AuditLayer::builder(sink.clone())
        .flush_interval(Duration::from_millis(2))
        .integrity(integrity().checkpoint_every(1).checkpoint_sink(stalled.clone()))
        .build()
        .unwrap();
    for i in 0..4u64 {
        handle.record(AuditEvent::new("user.action"));
        eventually(POLL, || handle.stats().written == i + 1).await;
    }
    let started = std::time::Instant::now();
    let report = handle.shutdown(Duration::from_millis(300)).await;
    assert!(started.elapsed() < Duration::from_secs(5), "shutdown held up by the anchor");
    assert_eq!(stalled.entered.load(Ordering::SeqCst), 1);
    assert!(verify(sink.events(), &key(), &[]).ok(), "the trail is whole");
    assert!(report.stats.checkpoints >= 5, "{report}");
    assert_eq!(report.stats.anchor_failed, report.stats.checkpoints, "none anchored: {report}");
}

// ---------------------------------------------------------------------------------------------------------------
// Claim 4: attacks on an honest trail.

fn seq_of(events: &[AuditEvent], kind: &str) -> u64 {
    events.iter().find(|e| e.kind == kind).unwrap().seq
}

#[tokio::test]
async fn attack_prev_hash_only_edited_is_altered_at_that_seq() {
    let (mut t, _) = honest(8).await;
    t[4].prev_hash = Some(Hash([9; 32]));
    let seq = t[4].seq;
    assert_eq!(findings(&verify(t, &key(), &[])), [Finding::Altered { seq }]);
}

#[tokio::test]
async fn attack_checkpoint_attribute_edited_is_altered_and_bad_signature() {
    let (mut t, _) = honest(8).await;
    let c = seq_of(&t, kind::AUDIT_CHECKPOINT);
    let e = &mut t[c as usize - 1];
    e.attributes.insert("checkpoint.seq".into(), "1".into());
    assert_eq!(findings(&verify(t, &key(), &[])), [Finding::Altered { seq: c }, Finding::BadSignature { seq: c }]);
}

#[tokio::test]
async fn attack_checkpoint_attribute_edited_and_rehashed_is_bad_signature_and_link_break() {
    let (mut t, _) = honest(8).await;
    let c = seq_of(&t, kind::AUDIT_CHECKPOINT) as usize;
    // Edit the checkpoint's key label and recompute every hash from there on.
    t[c - 1].attributes.insert("checkpoint.key".into(), "evil+00000000".into());
    for i in c - 1..t.len() {
        let prev = t[i - 1].hash.unwrap();
        t[i].prev_hash = Some(prev);
        t[i].hash = Some(event_hash(&prev, &t[i]));
    }
    let report = verify(t, &key(), &[]);
    let f = findings(&report);
    assert!(f.contains(&Finding::WrongKey { seq: c as u64, key: "evil+00000000".into() }), "{report}");
}

#[tokio::test]
async fn attack_checkpoint_event_deleted_is_missing() {
    let (mut t, _) = honest(8).await;
    let c = seq_of(&t, kind::AUDIT_CHECKPOINT);
    t.retain(|e| e.seq != c);
    assert_eq!(findings(&verify(t, &key(), &[])), [Finding::Missing { from: c, to: c }]);
}

#[tokio::test]
async fn attack_boot_event_deleted_is_missing() {
    let (mut t, _) = honest(5).await;
    t.remove(0);
    assert_eq!(findings(&verify(t, &key(), &[])), [Finding::Missing { from: 1, to: 1 }]);
}

#[tokio::test]
async fn attack_seq_of_last_row_changed_is_named() {
    let (mut t, _) = honest(5).await;
    let last = t.last_mut().unwrap();
    let n = last.seq;
    last.seq = n + 1;
    let report = verify(t, &key(), &[]);
    let f = findings(&report);
    assert!(!report.ok());
    assert!(f.contains(&Finding::Missing { from: n, to: n }), "{report}");
    assert!(!report.boots[0].clean_shutdown);
}

#[tokio::test]
async fn attack_truncation_shown_only_against_out_of_band_checkpoint() {
    let (t, anchored) = honest(8).await;
    let trusted: Vec<_> = anchored.iter().map(|e| Checkpoint::from_event(e).unwrap().unwrap()).collect();
    let n = t.len() as u64;
    let cut: Vec<_> = t.into_iter().filter(|e| e.seq <= n - 3).collect();
    assert!(verify(cut.clone(), &key(), &[]).ok(), "without a trusted checkpoint, a truncation is invisible");
    let report = verify(cut, &key(), &trusted);
    assert_eq!(findings(&report), [Finding::Truncated { after: n - 3, expected: n - 1 }]);
}

#[tokio::test]
async fn two_boots_interleaved_in_one_file_verify() {
    let (a, _) = honest(6).await;
    let (b, _) = honest(5).await;
    let mut mixed = Vec::new();
    let (mut ia, mut ib) = (a.into_iter(), b.into_iter());
    loop {
        match (ia.next(), ib.next()) {
            (None, None) => break,
            (x, y) => mixed.extend(x.into_iter().chain(y)),
        }
    }
    let report = verify(mixed, &key(), &[]);
    assert!(report.ok(), "{report}");
    assert_eq!(report.boots.len(), 2);
}

#[tokio::test]
async fn wrong_key_and_replay_from_another_boot_are_named() {
    let (a, _) = honest(6).await;
    let (b, _) = honest(6).await;
    let other = Integrity::from_seed(&[1; 32]).key_name("adv.test").verifier_key();
    let report = verify(a.clone(), &other, &[]);
    assert!(findings(&report).iter().all(|f| matches!(f, Finding::WrongKey { .. })), "{report}");
    // B's seq 3 replaced by A's seq 3, as is.
    let mut t: Vec<_> = b.iter().filter(|e| e.seq != 3).cloned().collect();
    t.push(a[2].clone());
    let report = verify(t.into_iter().chain(a.clone()), &key(), &[]);
    assert!(report.boots.iter().any(|r| r.findings.contains(&Finding::Missing { from: 3, to: 3 })), "{report}");
    assert!(!findings(&report).iter().any(|f| matches!(f, Finding::Altered { .. })), "{report}");
}

// ---------------------------------------------------------------------------------------------------------------
// Hostile values through every store.

fn hostile() -> Vec<AuditEvent> {
    let mut out = hostile_events();
    let addrs =
        ["::ffff:192.0.2.1", "::1", "::", "fe80::1", "2001:db8:0:0:1:0:0:1", "::1.2.3.4", "0.0.0.0", "10.0.0.1"];
    for (i, addr) in addrs.iter().enumerate() {
        let mut e = AuditEvent::new("net.addr")
            // Keys whose byte order differs from jsonb's (shorter first): "b" < "aa" in jsonb, "aa" < "b" in bytes.
            .attribute("b", "1")
            .attribute("aa", "2")
            .attribute("Z", "upper")
            .attribute("é", "accent")
            .attribute("", "empty key")
            .attribute("ctl", "tab\tnl\ncr\rnul\0bell\u{7} del\u{7f} ls\u{2028}")
            .attribute("long", "x".repeat(50_000))
            .actor("a\u{0}b \u{202e}rtl 𝕏 ﷽");
        e.client_addr = Some(addr.parse().unwrap());
        e.latency_us = Some(u64::MAX >> 1);
        e.status = Some(599);
        e.grpc_status = Some(-1);
        e.time = std::time::SystemTime::UNIX_EPOCH + Duration::new(1_700_000_000 + i as u64, 123_456_789);
        out.push(e);
    }
    out
}

async fn record_hostile(sink: impl AuditSink) -> (tower_audit::AuditHandle, MemorySink) {
    let copy = MemorySink::new();
    let (_layer, handle) =
        AuditLayer::builder(TeeSink { primary: sink, copy: copy.clone() }).integrity(integrity()).build().unwrap();
    for e in hostile() {
        assert!(handle.record(e));
    }
    let report = handle.shutdown(LIMIT).await;
    assert!(report.drained, "{report}");
    assert_linked(&copy.events());
    (handle, copy)
}

#[tokio::test]
async fn hostile_values_round_trip_through_json_lines_and_verify() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let (_h, copy) = record_hostile(tower_audit::JsonLinesSink::open(&path).unwrap()).await;
    let report = tower_audit::integrity::verify_json_lines(&path, &key(), &[]).unwrap();
    assert!(report.ok(), "{report}");
    assert_eq!(report.events(), copy.len() as u64);
}

#[cfg(feature = "sqlite")]
#[tokio::test]
async fn hostile_values_and_ipv6_round_trip_through_sqlite_and_verify() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.db");
    let sink = tower_audit::SqliteSink::connect_with(path.to_str().unwrap(), 2).await.unwrap();
    sink.ensure_schema().await.unwrap();
    let (_h, copy) = record_hostile(sink).await;
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", path.display())).await.unwrap();
    let report = tower_audit::integrity::verify_sqlite(&pool, None, &key(), &[]).await.unwrap();
    assert!(report.ok(), "{report}");
    assert_eq!(report.events(), copy.len() as u64);
}

#[cfg(feature = "postgres")]
#[tokio::test]
async fn hostile_values_ipv6_and_jsonb_key_order_round_trip_through_postgres_and_verify() {
    use sqlx::postgres::PgPoolOptions;
    let Some(admin) = pg_pool(PgPoolOptions::new().max_connections(2)).await else { return };
    let scratch = PgScratch::new(&admin, "t_integrity_adv").await;
    let sink = tower_audit::PostgresSink::connect(&pg_url()).await.unwrap().table(&scratch.table()).unwrap();
    sink.ensure_schema().await.unwrap();
    let (_h, copy) = record_hostile(sink).await;
    let report = tower_audit::integrity::verify_postgres(&admin, Some(&scratch.table()), &key(), &[]).await.unwrap();
    assert!(report.ok(), "{report}");
    assert_eq!(report.events(), copy.len() as u64);
}

#[tokio::test]
async fn heartbeat_checkpoints_without_traffic_verify() {
    let sink = MemorySink::new();
    let (_layer, handle) = AuditLayer::builder(sink.clone())
        .flush_interval(Duration::from_millis(5))
        .integrity(integrity().checkpoint_interval(Duration::from_millis(20)))
        .build()
        .unwrap();
    eventually(POLL, || sink.events().iter().filter(|e| e.kind == kind::AUDIT_CHECKPOINT).count() >= 2).await;
    assert!(handle.shutdown(LIMIT).await.drained);
    let events = sink.events();
    assert_linked(&events);
    let report = verify(events.clone(), &key(), &[]);
    assert!(report.ok(), "{report}");
    assert_eq!(report.boots[0].verified_to, events.len() as u64 - 1);
}
