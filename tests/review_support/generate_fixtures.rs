//! Generator of tests/data/review/: run ONCE against the previous version (160a4ca), whose `Serialize` was
//! derived and whose hex was hand-made, so that tests/review_adversarial.rs compares the new code with bytes the
//! old code really wrote. Not compiled here (a file under a test's subdirectory); to regenerate:
//!
//! ```sh
//! git worktree add --detach /tmp/old 160a4ca
//! cp tests/review_support/generate_fixtures.rs /tmp/old/tests/review_gen.rs
//! mkdir -p /tmp/old/tests/review_support && cp tests/review_support/mod.rs /tmp/old/tests/review_support/
//! cd /tmp/old && REVIEW_FIXTURES=$OLDPWD/tests/data/review cargo test --test review_gen
//! ```
#![allow(clippy::unwrap_used)]

mod review_support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use review_support::varied_events;
use tower_audit::integrity::Integrity;
use tower_audit::{AuditEvent, AuditLayer, AuditSink, JsonLinesSink, MemorySink, SinkError, Spill};

/// Never returns: events stay in the spill.
#[derive(Clone)]
struct Stalled;

impl AuditSink for Stalled {
    async fn write_batch(&self, _batch: &[AuditEvent]) -> Result<(), SinkError> {
        std::future::pending().await
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &to.join(entry.file_name()));
        } else {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}

#[tokio::test]
async fn generate() {
    let out = PathBuf::from(std::env::var("REVIEW_FIXTURES").expect("REVIEW_FIXTURES"));
    std::fs::create_dir_all(&out).unwrap();
    let events = varied_events();

    // The JSON lines sink's output (serde_json::to_writer of the derived Serialize).
    let jsonl = out.join("events.jsonl");
    let _ = std::fs::remove_file(&jsonl);
    let sink = JsonLinesSink::open(&jsonl).unwrap();
    for chunk in events.chunks(37) {
        sink.write_batch(chunk).await.unwrap();
    }
    // Postcard, as the spill's codec encodes an event: u32 LE length, then the bytes.
    let mut bin = Vec::new();
    for e in &events {
        let bytes = postcard::to_allocvec(e).unwrap();
        bin.extend_from_slice(&u32::try_from(bytes.len()).unwrap().to_le_bytes());
        bin.extend_from_slice(&bytes);
    }
    std::fs::write(out.join("events.postcard"), bin).unwrap();

    // A spill left behind by a run whose sink stalled, with integrity on (events carry prev_hash and hash).
    let work = tempfile::tempdir().unwrap();
    let spill_dir = work.path().join("spill");
    let (_layer, handle) = AuditLayer::builder(Stalled)
        .spill(Spill::new(&spill_dir))
        .integrity(Integrity::from_seed(&[7; 32]))
        .build()
        .unwrap();
    for e in events.iter().take(120).cloned() {
        assert!(handle.record(e));
    }
    let report = handle.shutdown(Duration::from_millis(500)).await;
    assert!(!report.drained, "{report}");
    let _ = std::fs::remove_dir_all(out.join("spill"));
    copy_dir(&spill_dir, &out.join("spill"));

    // What the old version replays from that spill, as its JSON lines.
    let replay = tempfile::tempdir().unwrap();
    copy_dir(&out.join("spill"), replay.path());
    let memory = MemorySink::new();
    let (_layer, handle) = AuditLayer::builder(memory.clone()).spill(Spill::new(replay.path())).build().unwrap();
    let report = handle.shutdown(Duration::from_secs(20)).await;
    assert!(report.drained, "{report}");
    let replayed = memory.events();
    let mut lines = String::new();
    for e in &replayed {
        lines.push_str(&serde_json::to_string(e).unwrap());
        lines.push('\n');
    }
    std::fs::write(out.join("replayed_by_old.jsonl"), lines).unwrap();
    std::fs::write(out.join("old_stats.txt"), format!("{:?}\n", handle.stats())).unwrap();
}
