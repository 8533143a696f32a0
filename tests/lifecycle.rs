//! The worker's own bookends of a boot: `audit.boot` first (alone, seq 1, with the settings), `audit.shutdown`
//! last at a clean shutdown (after the final gap event, with the final counters), and no shutdown event when
//! the deadline came first, so a reader can tell a clean end from an unclean one.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use tower_audit::{AuditEvent, AuditLayer, Outcome, Overflow, ShutdownReport, kind};

const LIMIT: Duration = Duration::from_secs(10);

/// An event of about 4 KB (text fields are bounded: 16 attributes of 250 bytes), over a 2 KiB byte budget
/// even with the queue empty.
fn too_big() -> AuditEvent {
    (0..16).fold(AuditEvent::new("too big"), |e, i| e.attribute(format!("a{i:02}"), "v".repeat(250)))
}

fn attributes(event: &AuditEvent) -> Vec<String> {
    event.attributes.iter().map(|(k, v)| format!("{k}={v}")).collect()
}

/// What the shutdown event should say: every counter of the report, as it stood before the last batch (the
/// gap event due, if any, and the shutdown event itself) was written, plus `offered` and `missing`.
fn expected_shutdown_attributes(report: &ShutdownReport, gap_in_last_batch: bool) -> BTreeMap<String, String> {
    let mut stats = report.stats;
    stats.batches -= 1;
    stats.gap_events -= u64::from(gap_in_last_batch);
    let serde_json::Value::Object(fields) = serde_json::to_value(stats).unwrap() else { unreachable!() };
    let mut expected: BTreeMap<String, String> = fields.into_iter().map(|(k, v)| (k, v.to_string())).collect();
    expected.insert("offered".into(), stats.offered().to_string());
    expected.insert("missing".into(), stats.missing().to_string());
    expected
}

#[tokio::test]
async fn the_boot_event_is_the_first_batch_alone_seq_1_with_the_handles_identity_and_the_settings() {
    for (overflow, named) in [
        (Overflow::Drop, "drop"),
        (Overflow::Wait(Duration::from_millis(5)), "wait 5ms"),
        (Overflow::FailClosed, "fail_closed"),
    ] {
        let sink = ScriptedSink::new(&[]);
        let (_layer, handle) = AuditLayer::builder(sink.clone())
            .instance("api-eu-1")
            .capacity(64)
            .max_queued_bytes(4096)
            .batch_size(2)
            .overflow(overflow)
            .build()
            .unwrap();
        // Queued before the worker ever ran, a whole batch of them: the boot event still goes first, alone.
        assert!(handle.record(AuditEvent::new("a")));
        assert!(handle.record(AuditEvent::new("b")));
        let report = handle.shutdown(LIMIT).await;
        assert!(report.drained, "{report}");

        let calls = sink.calls();
        let shapes: Vec<Vec<&str>> = calls.iter().map(|c| kinds(c)).collect();
        assert_eq!(shapes, [vec![kind::AUDIT_BOOT], vec!["a", "b"], vec![kind::AUDIT_SHUTDOWN]], "{overflow:?}");
        let boot = &calls[0][0];
        assert_eq!(
            (boot.seq, boot.instance.as_deref(), boot.boot, boot.outcome),
            (1, Some("api-eu-1"), Some(handle.boot()), Outcome::Success)
        );
        assert_eq!(boot.id.get_version_num(), 7);
        assert_eq!(
            attributes(boot),
            [
                "batch_size=2".to_owned(),
                "capacity=64".to_owned(),
                "max_queued_bytes=4096".to_owned(),
                format!("overflow={named}"),
                "spill=off".to_owned(),
                format!("version={}", env!("CARGO_PKG_VERSION")),
            ]
        );
        assert_eq!(calls[1].iter().map(|e| e.seq).collect::<Vec<_>>(), [2, 3], "the first event is seq 2");
        assert_eq!(calls[2][0].seq, 4);
        // The boot and shutdown batches count as batches; their events are neither accepted nor written.
        let s = report.stats;
        assert_eq!((s.accepted, s.written, s.batches, s.gap_events), (2, 2, 3, 0), "{s:?}");
    }
}

#[tokio::test]
async fn the_shutdown_event_ends_the_trail_after_the_final_gap_event_with_the_reports_counters() {
    let sink = ScriptedSink::new(&[]);
    let (_layer, handle) = AuditLayer::builder(sink.clone())
        .capacity(4)
        .batch_size(2)
        .max_queued_bytes(2048)
        .flush_interval(Duration::from_secs(3600))
        .build()
        .unwrap();
    assert!(handle.record(AuditEvent::new("a")));
    assert!(handle.record(AuditEvent::new("b"))); // a whole batch: written without waiting for the tick
    tokio::time::timeout(LIMIT, sink.written.wait_for(3)).await.unwrap();
    // Lost after the last batch, with nothing queued behind it: only the last batch can report it.
    assert!(!handle.record(too_big()));
    let report = handle.shutdown(LIMIT).await;
    assert!(report.drained, "{report}");
    assert_eq!(report.unreported, 0, "the final gap event told the primary trail");

    let calls = sink.calls();
    let shapes: Vec<Vec<&str>> = calls.iter().map(|c| kinds(c)).collect();
    assert_eq!(
        shapes,
        [vec![kind::AUDIT_BOOT], vec!["a", "b"], vec![kind::AUDIT_GAP, kind::AUDIT_SHUTDOWN]],
        "the gap event and the shutdown event share the last batch, in that order"
    );
    let (gap, end) = (&calls[2][0], &calls[2][1]);
    assert_eq!(attributes(gap), ["lost=1", "queue_bytes=1", "trail=primary"]);
    assert_eq!((gap.seq, end.seq), (4, 5));
    assert_eq!((end.instance.as_deref(), end.boot), (Some(handle.instance()), Some(handle.boot())));
    assert_eq!(end.outcome, Outcome::Error, "an event is missing");
    assert_eq!(end.attributes, expected_shutdown_attributes(&report, true));
    let s = report.stats;
    assert_eq!(
        (s.accepted, s.written, s.dropped_queue_bytes, s.batches, s.gap_events, s.missing()),
        (2, 2, 1, 3, 1, 1),
        "{s:?}"
    );
    for (counter, value) in [("accepted", "2"), ("written", "2"), ("dropped_queue_bytes", "1"), ("missing", "1")] {
        assert_eq!(end.attributes[counter], value, "{counter}");
    }
}

#[tokio::test]
async fn a_clean_shutdown_with_nothing_lost_ends_with_a_successful_shutdown_event() {
    let sink = ScriptedSink::new(&[]);
    let (_layer, handle) = AuditLayer::builder(sink.clone()).build().unwrap();
    for i in 0..3 {
        assert!(handle.record(AuditEvent::new("x").attribute("i", i.to_string())));
    }
    let report = handle.shutdown(LIMIT).await;
    assert!(report.drained && report.unreported == 0, "{report}");
    let trail = sink.written.events();
    assert_eq!(kinds(&trail), [kind::AUDIT_BOOT, "x", "x", "x", kind::AUDIT_SHUTDOWN]);
    assert_eq!(trail.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2, 3, 4, 5]);
    let end = &trail[4];
    assert_eq!(end.outcome, Outcome::Success);
    assert_eq!(end.attributes, expected_shutdown_attributes(&report, false));
    assert_eq!((end.attributes["written"].as_str(), end.attributes["missing"].as_str()), ("3", "0"));
}

#[tokio::test(start_paused = true)]
async fn a_shutdown_whose_deadline_passes_while_the_sink_hangs_writes_no_shutdown_event() {
    let sink = GateSink::default();
    let (_layer, handle) =
        AuditLayer::builder(sink.clone()).batch_size(1).sink_timeout(Duration::from_secs(3600)).build().unwrap();
    sink.pass_boot().await;
    assert!(handle.record(AuditEvent::new("a")));
    eventually(LIMIT, || sink.entered() == 2).await; // the sink hangs on it
    let report = handle.shutdown(Duration::from_millis(300)).await;
    assert!(!report.drained, "{report}");
    assert_eq!((report.stats.abandoned, report.stats.written), (1, 0));
    // Nothing is attempted after the deadline, the shutdown event included: the trail holds the boot event
    // alone, which is how a reader tells this boot did not end cleanly.
    tokio::time::sleep(Duration::from_secs(3600)).await;
    sink.open.notify_waiters();
    tokio::task::yield_now().await;
    assert_eq!(sink.entered(), 2);
    assert_eq!(kinds(&sink.written.lock().unwrap()), [kind::AUDIT_BOOT]);
}

/// With a primary that fails, the boot and shutdown events go to the fallback like any batch: its trail too
/// starts with the boot and, at a clean shutdown, ends with the shutdown event.
#[tokio::test(start_paused = true)]
async fn with_the_primary_down_the_bookends_go_to_the_fallback() {
    let fallback = tower_audit::MemorySink::new();
    let (_layer, handle) =
        AuditLayer::builder(FailingSink).retry(tower_audit::Retry::none()).fallback(fallback.clone()).build().unwrap();
    assert!(handle.record(AuditEvent::new("a")));
    let report = handle.shutdown(LIMIT).await;
    assert!(report.drained, "{report}");
    let s = report.stats;
    assert_eq!((s.written, s.fallback_written, s.lost, s.batches), (0, 1, 0, 0), "{s:?}");
    let trail = fallback.events();
    // The primary's last gap event (the event, and the boot event, in the fallback) failed too, and went along.
    assert_eq!(kinds(&trail), [kind::AUDIT_BOOT, "a", kind::AUDIT_GAP, kind::AUDIT_SHUTDOWN]);
    assert_eq!(trail[2].attributes["trail"], "primary");
    assert_eq!(trail[2].attributes["pipeline_in_fallback"], "1");
    assert_eq!(trail[3].attributes["fallback_written"], "1");
    assert_eq!(report.unreported, 1, "the primary trail never learnt of it");
}

/// The README: "A batch never exceeds `batch_size`, its gap event included"; `batch_size` is "the most events
/// handed to the sink at once". The last batch too: with a batch size of one, the final gap event and the
/// shutdown event go one after the other, as `deliver` sends a gap event alone when there is no room.
#[tokio::test]
async fn the_last_batch_never_exceeds_a_batch_size_of_one() {
    let sink = ScriptedSink::new(&[]);
    let (_layer, handle) = AuditLayer::builder(sink.clone())
        .capacity(1)
        .batch_size(1)
        .max_queued_bytes(2048)
        .flush_interval(Duration::from_secs(3600))
        .build()
        .unwrap();
    assert!(handle.record(AuditEvent::new("a")));
    tokio::time::timeout(LIMIT, sink.written.wait_for(2)).await.unwrap();
    assert!(!handle.record(too_big()));
    let report = handle.shutdown(LIMIT).await;
    assert!(report.drained, "{report}");
    let calls = sink.calls();
    let shapes: Vec<Vec<&str>> = calls.iter().map(|c| kinds(c)).collect();
    assert_eq!(
        shapes,
        [vec![kind::AUDIT_BOOT], vec!["a"], vec![kind::AUDIT_GAP], vec![kind::AUDIT_SHUTDOWN]],
        "a batch of more than batch_size (1) events"
    );
}
