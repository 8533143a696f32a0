//! Review, attack 3 (memory): the strings the worker keeps for requests to come stay bounded (at most 512 per
//! field of at most 256 bytes of capacity: 512 KiB, plus the four vectors holding them), whatever the traffic;
//! measured with a counting global allocator (alone in this binary, so no other test allocates meanwhile).

mod common;

use std::time::Duration;

use axum::routing::get;
use stats_alloc::{INSTRUMENTED_SYSTEM, StatsAlloc};
use tower::ServiceExt as _;
use tower_audit::{AuditEvent, AuditLayer, AuditSink, SinkError};

#[global_allocator]
static GLOBAL: &StatsAlloc<std::alloc::System> = &INSTRUMENTED_SYSTEM;

/// Bytes allocated and not yet freed since the start of the process (stats_alloc counts a realloc's growth
/// and shrinking in these two already).
fn live() -> isize {
    let s = GLOBAL.stats();
    s.bytes_allocated as isize - s.bytes_deallocated as isize
}

/// Drops every batch: only the pipeline's own memory stays.
#[derive(Clone)]
struct Discard;

impl AuditSink for Discard {
    async fn write_batch(&self, _batch: &[AuditEvent]) -> Result<(), SinkError> {
        Ok(())
    }
}

const LIMIT: Duration = Duration::from_secs(30);
const KIB: isize = 1024;

async fn ok() -> &'static str {
    "ok"
}

/// Sends `n` requests (numbered from `from`) whose path, request id and user agent are each `len` bytes,
/// letting the worker catch up every 1,000 only (so more than the 512 kept come back at once), and waits until all are written.
async fn traffic(app: &axum::Router, handle: &tower_audit::AuditHandle, from: usize, n: usize, len: usize) {
    for i in from..from + n {
        let tail = format!("{i:08}");
        let fill = |prefix: &str| format!("{prefix}{tail}{}", "q".repeat(len - prefix.len() - tail.len()));
        let req = http::Request::get(fill("/r/"))
            .header("x-request-id", fill("id-"))
            .header("user-agent", fill("ua/"))
            .body(axum::body::Body::empty())
            .unwrap();
        let res = app.clone().oneshot(req).await.unwrap();
        assert_eq!(res.status(), 200);
        axum::body::to_bytes(res.into_body(), 1024).await.unwrap();
        if i % 1000 == 999 {
            let target = (i + 1) as u64;
            common::eventually(LIMIT, || handle.stats().written >= target).await;
        }
    }
    let target = (from + n) as u64;
    common::eventually(LIMIT, || handle.stats().written == target).await;
}

/// Only prints the figures (REVIEW_MEASURE set): to compare with a build without kept strings.
fn measuring() -> bool {
    std::env::var_os("REVIEW_MEASURE").is_some()
}

#[tokio::test(flavor = "current_thread")]
async fn kept_strings_stay_within_their_bound_whatever_the_traffic() {
    let (layer, handle) = AuditLayer::builder(Discard)
        .batch_size(64)
        .flush_interval(Duration::from_millis(1))
        .max_path_len(4096)
        .max_field_len(4096)
        .build()
        .unwrap();
    let app = axum::Router::new().route("/r/{rest}", get(ok)).layer(layer);
    traffic(&app, &handle, 0, 200, 64).await;
    let start = live();

    // Texts of 250 bytes: the most that is kept, 4 x 512 strings of 250 bytes (500 KiB), plus the vectors
    // holding them (4 x 512 x 24 bytes, 48 KiB).
    traffic(&app, &handle, 200, 3000, 250).await;
    let filled = live();
    assert!(measuring() || filled - start <= 512 * KIB + 48 * KIB + 64 * KIB, "kept {} KiB", (filled - start) / KIB);

    // As much traffic again: nothing more is kept.
    traffic(&app, &handle, 3200, 3000, 250).await;
    let again = live();
    assert!(measuring() || again - filled <= 64 * KIB, "grew by {} KiB", (again - filled) / KIB);

    // Long texts (past the 256 bytes of capacity kept): their strings are freed, not kept.
    traffic(&app, &handle, 6200, 3000, 2000).await;
    let long = live();
    assert!(measuring() || long - filled <= 64 * KIB, "grew by {} KiB", (long - filled) / KIB);

    let report = handle.shutdown(LIMIT).await;
    assert!(report.drained, "{report}");
    let s = handle.stats();
    assert_eq!((s.accepted, s.written, s.lost), (9200, 9200, 0), "{s:?}");
    common::assert_identity(&s);
    eprintln!("live bytes: start {start}, filled {filled}, again {again}, long {long}");
}
