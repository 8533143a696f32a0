//! The worker: batching by size and time, retries, fallback, panics, shutdown, loss reporting.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use tokio::time::Instant;
use tower_audit::{AuditEvent, AuditLayer, MemorySink, Outcome, Retry, kind};

const LIMIT: Duration = Duration::from_secs(10);

fn events(n: usize) -> impl Iterator<Item = AuditEvent> {
    (0..n).map(|i| AuditEvent::new("test.event").attribute("i", i.to_string()))
}

#[tokio::test(start_paused = true)]
async fn a_partial_batch_waits_for_the_flush_interval() {
    let sink = MemorySink::new();
    let (_layer, handle) =
        AuditLayer::builder(sink.clone()).batch_size(3).flush_interval(Duration::from_secs(1)).build().unwrap();
    let start = Instant::now();
    for e in events(2) {
        assert!(handle.record(e));
    }
    // The clock only moves when every task is idle, so the write happens exactly at the tick.
    tokio::time::timeout(LIMIT, sink.wait_for(1 + 2)).await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_secs(1));
    assert_eq!(handle.stats().batches, 2, "the boot batch, then the partial batch");
    assert_eq!(recorded(&sink).len(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_full_batch_is_written_without_waiting_for_the_interval() {
    let sink = MemorySink::new();
    let (_layer, handle) =
        AuditLayer::builder(sink.clone()).batch_size(3).flush_interval(Duration::from_secs(60)).build().unwrap();
    let start = Instant::now();
    for e in events(7) {
        assert!(handle.record(e));
    }
    // The boot event first, then two full batches.
    tokio::time::timeout(LIMIT, sink.wait_for(1 + 6)).await.unwrap();
    assert_eq!(start.elapsed(), Duration::ZERO, "woken by the full batch, not by the tick");
    assert_eq!(recorded(&sink).len(), 6, "the partial batch waits");
    assert_eq!(handle.stats().batches, 1 + 2);
    // The seventh waits for the tick.
    tokio::time::timeout(LIMIT * 10, sink.wait_for(1 + 7)).await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_secs(60));
    let seqs: Vec<u64> = recorded(&sink).iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (2..=8).collect::<Vec<_>>(), "after the boot event's seq 1");
}

#[tokio::test(start_paused = true)]
async fn failed_batches_are_retried_with_backoff_and_the_same_ids() {
    // The boot batch goes through; the batch of events fails twice.
    let sink = ScriptedSink::new(&[Step::Ok, Step::Fail, Step::Fail]);
    let retry =
        Retry::default().max_retries(3).base_delay(Duration::from_millis(100)).max_delay(Duration::from_secs(1));
    let (_layer, handle) = AuditLayer::builder(sink.clone())
        .batch_size(4)
        .flush_interval(Duration::from_millis(10))
        .retry(retry)
        .build()
        .unwrap();
    let start = Instant::now();
    for e in events(4) {
        handle.record(e);
    }
    tokio::time::timeout(LIMIT, sink.written.wait_for(1 + 4)).await.unwrap();
    // Two failed attempts: waits of 50–100 ms, then 100–200 ms (jittered).
    let waited = start.elapsed();
    assert!(waited >= Duration::from_millis(150) && waited <= Duration::from_millis(300), "{waited:?}");
    let calls = sink.calls();
    assert_eq!(calls.len(), 1 + 3);
    assert_eq!(kinds(&calls[0]), [kind::AUDIT_BOOT]);
    assert_eq!(calls[1].len(), 4);
    assert_eq!(calls[1], calls[3], "a retry sends the very same events, ids and sequence numbers included");
    let stats = handle.stats();
    assert_eq!((stats.retries, stats.written, stats.lost, stats.batches), (2, 4, 0, 1 + 1));
}

#[test]
fn backoff_grows_exponentially_with_jitter_up_to_the_maximum() {
    let retry = Retry::default().base_delay(Duration::from_millis(100)).max_delay(Duration::from_millis(1000));
    for _ in 0..100 {
        let d = |n| retry.delay(n);
        assert!(d(1) >= Duration::from_millis(50) && d(1) <= Duration::from_millis(100));
        assert!(d(2) >= Duration::from_millis(100) && d(2) <= Duration::from_millis(200));
        assert!(d(4) >= Duration::from_millis(400) && d(4) <= Duration::from_millis(800));
        assert!(d(10) >= Duration::from_millis(500) && d(10) <= Duration::from_millis(1000));
        assert!(d(200) <= Duration::from_millis(1000), "no overflow");
    }
}

#[tokio::test(start_paused = true)]
async fn exhausted_retries_go_to_the_fallback_and_are_reported_in_the_trail() {
    // The boot batch goes through; the batch of events fails its 3 attempts.
    let primary = ScriptedSink::new(&[Step::Ok, Step::Fail, Step::Fail, Step::Fail]);
    let fallback = MemorySink::new();
    let (_layer, handle) = AuditLayer::builder(primary.clone())
        .batch_size(5)
        .flush_interval(Duration::from_millis(10))
        .retry(Retry::default().max_retries(2))
        .fallback(fallback.clone())
        .build()
        .unwrap();
    for e in events(5) {
        handle.record(e);
    }
    tokio::time::timeout(LIMIT, fallback.wait_for(5)).await.unwrap();
    let stats = handle.stats();
    assert_eq!((stats.fallback_written, stats.lost, stats.retries), (5, 0, 2));

    // The primary trail learns of the hole with the next batch.
    handle.record(AuditEvent::new("after"));
    tokio::time::timeout(LIMIT, primary.written.wait_for(1 + 2)).await.unwrap();
    let trail = recorded(&primary.written);
    assert_eq!(trail.len(), 2);
    assert_eq!(trail[0].kind, kind::AUDIT_GAP);
    assert_eq!(trail[0].attributes["in_fallback"], "5");
    assert_eq!(trail[0].attributes["lost"], "5", "missing from the primary trail");
    assert_eq!(trail[0].outcome, Outcome::Error);
    assert_eq!(trail[1].kind, "after");
    assert_eq!(trail.iter().map(|e| e.seq).collect::<Vec<_>>(), [7, 8], "after the boot event and the five");
}

/// Every event of a pipeline, in either trail and gap events included, carries its instance and boot, and
/// one sequence runs through both trails.
#[tokio::test(start_paused = true)]
async fn every_event_in_every_trail_carries_the_instance_and_the_boot() {
    // The boot batch goes through; the first batch of events fails into the fallback.
    let primary = ScriptedSink::new(&[Step::Ok, Step::Fail]);
    let fallback = MemorySink::new();
    let (_layer, handle) = AuditLayer::builder(primary.clone())
        .instance("api-eu-1")
        .batch_size(3)
        .flush_interval(Duration::from_millis(10))
        .retry(Retry::none())
        .fallback(fallback.clone())
        .build()
        .unwrap();
    assert_eq!(handle.instance(), "api-eu-1");
    for e in events(3) {
        assert!(handle.record(e));
    }
    tokio::time::timeout(LIMIT, fallback.wait_for(3)).await.unwrap();
    assert!(handle.record(AuditEvent::new("after")));
    assert!(handle.shutdown(LIMIT).await.drained);

    let stamped = |events: Vec<AuditEvent>| -> Vec<_> {
        events.into_iter().map(|e| (e.kind.into_owned(), e.instance, e.boot, e.seq)).collect()
    };
    let at = |kind: &str, seq| (kind.to_owned(), Some("api-eu-1".into()), Some(handle.boot()), seq);
    assert_eq!(stamped(fallback.events()), [at("test.event", 2), at("test.event", 3), at("test.event", 4)]);
    assert_eq!(
        stamped(primary.written.events()),
        [at(kind::AUDIT_BOOT, 1), at(kind::AUDIT_GAP, 5), at("after", 6), at(kind::AUDIT_SHUTDOWN, 7)]
    );
}

/// Two pipelines of one process share the default instance (the host name and a random suffix) and have a
/// boot each, each counting from 1.
#[tokio::test]
async fn two_pipelines_of_one_process_share_the_instance_and_count_their_own_boots() {
    let sinks = [MemorySink::new(), MemorySink::new()];
    let mut handles = Vec::new();
    for sink in &sinks {
        let (_layer, handle) = AuditLayer::builder(sink.clone()).build().unwrap();
        for e in events(2) {
            assert!(handle.record(e));
        }
        assert!(handle.shutdown(LIMIT).await.drained);
        handles.push(handle);
    }
    assert_eq!(handles[0].instance(), handles[1].instance());
    assert_ne!(handles[0].boot(), handles[1].boot());
    let host = gethostname::gethostname();
    let (head, suffix) = handles[0].instance().rsplit_once('-').unwrap();
    assert_eq!((head, suffix.len()), (host.to_str().unwrap(), 8));
    for (sink, handle) in sinks.iter().zip(&handles) {
        assert_eq!(handle.boot().get_version_num(), 7);
        let identity: Vec<_> = sink.events().into_iter().map(|e| (e.kind, e.instance, e.boot, e.seq)).collect();
        let at = |kind: &'static str, seq| (kind.into(), Some(handle.instance().into()), Some(handle.boot()), seq);
        let event = "test.event";
        assert_eq!(identity, [at(kind::AUDIT_BOOT, 1), at(event, 2), at(event, 3), at(kind::AUDIT_SHUTDOWN, 4)]);
    }
}

#[test]
fn an_instance_name_that_cannot_be_recorded_is_refused() {
    let refused = |builder: tower_audit::AuditLayerBuilder| builder.build().unwrap_err().to_string();
    let builder = || AuditLayer::builder(MemorySink::new());
    assert_eq!(
        refused(builder().instance("api\n1")),
        "instance name \"api\\n1\" holds a control character, a line or paragraph separator, or a bidi control: \
         name the process with 1 to 256 bytes (max_field_len) of printable text, such as the host or pod name"
    );
    assert_eq!(
        refused(builder().instance(" ")),
        "instance name \" \" is empty or blank: name the process with 1 to 256 bytes (max_field_len) of printable \
         text, such as the host or pod name"
    );
    assert!(
        refused(builder().max_field_len(8).instance("api-eu-12")).starts_with(
            "instance name \"api-eu-12\" is longer than max_field_len: name the process with 1 to 8 bytes"
        )
    );
    // A valid name passes validation (and only then needs a runtime).
    assert!(matches!(builder().instance("api-eu-1").build(), Err(tower_audit::ConfigError::NoRuntime)));
}

#[tokio::test(start_paused = true)]
async fn without_a_fallback_failed_events_are_counted_as_lost() {
    let (_layer, handle) = AuditLayer::builder(FailingSink)
        .flush_interval(Duration::from_millis(10))
        .retry(Retry::none())
        .build()
        .unwrap();
    for e in events(3) {
        handle.record(e);
    }
    let report = handle.shutdown(LIMIT).await;
    assert_eq!((report.stats.lost, report.stats.written, report.stats.gap_events), (3, 0, 0));
    assert_eq!(report.unreported, 3, "the primary trail could not be told");
}

#[tokio::test(start_paused = true)]
async fn a_panicking_sink_is_counted_and_auditing_goes_on() {
    // The boot batch goes through; the batch of the first event panics, then its retry succeeds.
    let sink = ScriptedSink::new(&[Step::Ok, Step::Panic]);
    let (_layer, handle) = AuditLayer::builder(sink.clone())
        .flush_interval(Duration::from_millis(10))
        .retry(Retry::default().max_retries(1))
        .build()
        .unwrap();
    handle.record(AuditEvent::new("first"));
    tokio::time::timeout(LIMIT, sink.written.wait_for(1 + 1)).await.unwrap();
    handle.record(AuditEvent::new("second"));
    tokio::time::timeout(LIMIT, sink.written.wait_for(1 + 2)).await.unwrap();
    assert_eq!(kinds(&recorded(&sink.written)), ["first", "second"]);
    let stats = handle.stats();
    assert_eq!((stats.sink_panics, stats.retries, stats.written, stats.lost), (1, 1, 2, 0));
}

#[tokio::test(start_paused = true)]
async fn a_sink_that_never_returns_times_out_into_the_fallback() {
    let fallback = MemorySink::new();
    // The boot batch goes through; the batch of the event is the one that never returns.
    let sink = PassBoot::new(StalledSink::default());
    let (_layer, handle) = AuditLayer::builder(sink.clone())
        .flush_interval(Duration::from_millis(10))
        .sink_timeout(Duration::from_secs(2))
        .retry(Retry::none())
        .fallback(fallback.clone())
        .build()
        .unwrap();
    let start = Instant::now();
    handle.record(AuditEvent::new("x"));
    tokio::time::timeout(LIMIT, fallback.wait_for(1)).await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_millis(10) + Duration::from_secs(2));
    assert_eq!(handle.stats().sink_timeouts, 1);
    assert_eq!(kinds(&fallback.events()), ["x"]);
    assert!(sink.booted());
}

#[tokio::test]
async fn shutdown_drains_every_queued_event_and_closes_intake() {
    let sink = MemorySink::new();
    let (layer, handle) =
        AuditLayer::builder(sink.clone()).batch_size(100).flush_interval(Duration::from_secs(3600)).build().unwrap();
    for e in events(250) {
        assert!(handle.record(e));
    }
    let report = handle.shutdown(LIMIT).await;
    assert!(report.drained);
    assert_eq!(ended_cleanly(sink.events()).len(), 250);
    // The boot batch, three batches of events, the shutdown batch.
    assert_eq!((report.stats.written, report.stats.batches, report.stats.accepted), (250, 1 + 3 + 1, 250));

    assert!(!handle.record(AuditEvent::new("late")));
    assert_eq!(handle.stats().dropped_closed, 1);
    assert_eq!(handle.clone().shutdown(LIMIT).await, report, "a second call returns the same report");
    drop(layer);
}

#[tokio::test(start_paused = true)]
async fn shutdown_deadline_bounds_a_stalled_sink_and_reports_what_was_left() {
    // The boot batch goes through; the first batch of events is the one inside the sink at the deadline.
    let sink = PassBoot::new(StalledSink::default());
    let (_layer, handle) = AuditLayer::builder(sink.clone())
        .batch_size(10)
        .flush_interval(Duration::from_secs(3600))
        .sink_timeout(Duration::from_secs(3600))
        .build()
        .unwrap();
    for e in events(25) {
        handle.record(e);
    }
    let start = Instant::now();
    let report = handle.shutdown(Duration::from_secs(3)).await;
    assert_eq!(start.elapsed(), Duration::from_secs(3), "the deadline cuts the stalled write short");
    assert_eq!(sink.inner.entered.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert!(sink.booted());
    assert!(!report.drained);
    let stats = report.stats;
    // The batch inside the sink when the deadline came and the 15 still queued are abandoned, not "failed".
    assert_eq!((stats.written, stats.lost, stats.abandoned, stats.queued), (0, 0, 25, 0), "{stats:?}");
    assert_eq!(stats.accepted, 25);
}

#[tokio::test(start_paused = true)]
async fn dropping_every_layer_and_handle_ends_the_worker_after_draining() {
    let memory = MemorySink::new();
    let (sink, rx) = DropSignal::new(memory.clone());
    let (layer, handle) = AuditLayer::builder(sink).flush_interval(Duration::from_secs(5)).build().unwrap();
    let layer2 = layer.clone();
    for e in events(3) {
        handle.record(e);
    }
    drop((layer, layer2, handle));
    tokio::time::timeout(LIMIT, rx).await.expect("worker did not end").unwrap();
    // A clean end: the shutdown event last.
    assert_eq!(ended_cleanly(memory.events()).len(), 3);
}

/// The states of finished requests are kept for reuse without a reference to their pipeline: after requests,
/// dropping every layer, service and handle still ends the worker.
#[tokio::test(start_paused = true)]
async fn dropping_every_layer_after_requests_ends_the_worker_after_draining() {
    use tower::{Layer, ServiceExt};
    let memory = MemorySink::new();
    let (sink, rx) = DropSignal::new(memory.clone());
    let (layer, handle) = AuditLayer::builder(sink).flush_interval(Duration::from_secs(5)).build().unwrap();
    let svc =
        layer.layer(tower::service_fn(|_req: http::Request<http_body_util::Full<bytes::Bytes>>| answer(200, "ok")));
    for _ in 0..3 {
        let res = svc.clone().oneshot(get("/")).await.unwrap();
        read_body(res.into_body()).await.unwrap();
    }
    drop((layer, svc, handle));
    tokio::time::timeout(LIMIT, rx).await.expect("worker did not end").unwrap();
    assert_eq!(ended_cleanly(memory.events()).len(), 3);
}

/// Counts `WARN` events from the worker about lost events.
#[derive(Clone, Default)]
struct LossWarnings(Arc<Mutex<Vec<String>>>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for LossWarnings {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: tracing_subscriber::layer::Context<'_, S>) {
        struct Message(String);
        impl tracing::field::Visit for Message {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                self.0.push_str(&format!("{}={:?} ", field.name(), value));
            }
        }
        if *event.metadata().level() == tracing::Level::WARN {
            let mut message = Message(String::new());
            event.record(&mut message);
            if message.0.contains("lost") {
                self.0.lock().unwrap().push(message.0);
            }
        }
    }
}

#[tokio::test(start_paused = true)]
async fn losses_are_warned_about_at_a_limited_rate() {
    use tracing_subscriber::layer::SubscriberExt;
    let warnings = LossWarnings::default();
    let _guard = tracing::subscriber::set_default(tracing_subscriber::registry().with(warnings.clone()));

    let sink = MemorySink::new();
    let (_layer, handle) = AuditLayer::builder(sink.clone())
        .capacity(2)
        .batch_size(2)
        .flush_interval(Duration::from_millis(100))
        .loss_warning_interval(Duration::from_secs(10))
        .build()
        .unwrap();
    // Ten rounds, 100 ms apart: each overfills the queue by three events.
    for round in 0..10u64 {
        for e in events(5) {
            handle.record(e);
        }
        // The boot event, then per round two events and a gap event.
        tokio::time::timeout(LIMIT, sink.wait_for(1 + 3 * (round as usize + 1))).await.unwrap();
    }
    assert_eq!(handle.stats().dropped_queue_full, 30);
    let seen = warnings.0.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "one warning within the interval, not one per event: {seen:?}");
    assert!(seen[0].contains("lost=3"), "{seen:?}");
}
