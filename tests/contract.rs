//! The core contract at the boundaries an auditor looks at: shutdown under load, the report, reservations,
//! panicking sinks, fail-closed, gap events, unread bodies, panics, and the byte budget.

mod common;

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::Full;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt, service_fn};
use tower_audit::{AuditEvent, AuditLayer, AuditSink, MemorySink, Outcome, Overflow, Retry, SinkError, kind};

const LIMIT: Duration = Duration::from_secs(10);

async fn poll_once<F: Future + Unpin>(f: &mut F) -> Poll<F::Output> {
    std::future::poll_fn(|cx| Poll::Ready(std::pin::Pin::new(&mut *f).poll(cx))).await
}

/// Under a paused clock: steps virtual time a millisecond at a time (firing every timer on the way) until
/// `condition` holds; fails after `LIMIT` of virtual time.
async fn until(mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + LIMIT;
    while !condition() {
        assert!(Instant::now() < deadline, "condition not reached within {LIMIT:?} of virtual time");
        tokio::time::advance(Duration::from_millis(1)).await;
    }
}

/// Under a paused clock: lets `d` of virtual time pass a millisecond at a time.
async fn run_for(d: Duration) {
    let end = Instant::now() + d;
    until(|| Instant::now() >= end).await;
}

/// A memory sink that takes `delay` per batch.
#[derive(Clone)]
struct SlowSink {
    delay: Duration,
    inner: MemorySink,
}

impl AuditSink for SlowSink {
    async fn write_batch(&self, batch: &[AuditEvent]) -> Result<(), SinkError> {
        tokio::time::sleep(self.delay).await;
        self.inner.write_batch(batch).await
    }
}

// 1. Steady load cannot starve shutdown.
#[tokio::test(start_paused = true)]
async fn steady_producers_cannot_starve_shutdown() {
    let written = MemorySink::new();
    let sink = SlowSink { delay: Duration::from_millis(10), inner: written.clone() };
    let (_layer, handle) = AuditLayer::builder(sink)
        .capacity(64)
        .batch_size(16)
        .flush_interval(Duration::from_millis(50))
        .build()
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let attempts = Arc::new(AtomicU64::new(0));
    let producers: Vec<_> = (0..4)
        .map(|p| {
            let (handle, stop, attempts) = (handle.clone(), Arc::clone(&stop), Arc::clone(&attempts));
            tokio::spawn(async move {
                let mut i = 0;
                while !stop.load(SeqCst) {
                    attempts.fetch_add(1, SeqCst);
                    handle.record(AuditEvent::new("load").attribute("p", format!("{p}-{i}")));
                    i += 1;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            })
        })
        .collect();
    run_for(Duration::from_millis(500)).await;
    assert!(handle.stats().dropped_queue_full > 0, "the producers keep the queue full");

    let started = Instant::now();
    let mut shutdown = Box::pin(handle.shutdown(Duration::from_secs(60)));
    assert!(poll_once(&mut shutdown).await.is_pending());
    // Intake closed at the call itself, before the worker even ran.
    assert!(!handle.record(AuditEvent::new("late")));
    let at_close = handle.stats();
    let report = tokio::time::timeout(LIMIT, shutdown).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(1), "returned at {:?}, not when drained", started.elapsed());
    let s = report.stats;
    assert_eq!(s.accepted, at_close.accepted, "nothing admitted after the call");
    assert_eq!((s.written, s.abandoned, s.lost, s.queued), (s.accepted, 0, 0, 0), "{s:?}");
    assert!(report.drained);
    assert!(s.dropped_closed >= 1);
    // Between the boot and shutdown events: every event written, and the gap events.
    assert_eq!(ended_cleanly(written.events()).len() as u64, s.written + s.gap_events);

    stop.store(true, SeqCst);
    run_for(Duration::from_millis(5)).await;
    for p in producers {
        p.await.unwrap();
    }
    let s = handle.stats();
    assert_eq!(s.offered(), attempts.load(SeqCst) + 1, "{s:?}");
    assert_identity(&s);
}

// 2. The report is true: a sink that never returns, no fallback.
#[tokio::test(start_paused = true)]
async fn a_stalled_sink_at_the_deadline_leaves_abandoned_events_not_failed_ones() {
    // The boot batch goes through; the first batch of events is the one the sink never returns from.
    let sink = PassBoot::new(StalledSink::default());
    let (_layer, handle) = AuditLayer::builder(sink.clone()).batch_size(10).build().unwrap();
    for i in 0..110 {
        assert!(handle.record(AuditEvent::new("x").attribute("i", i.to_string())));
    }
    let started = Instant::now();
    let report = handle.shutdown(Duration::from_millis(300)).await;
    assert_eq!(started.elapsed(), Duration::from_millis(300));
    assert_eq!(sink.inner.entered.load(SeqCst), 1, "10 events inside the stalled call, 100 queued");
    assert!(sink.booted());
    let s = report.stats;
    assert_eq!((s.written, s.lost, s.fallback_written, s.abandoned, s.queued), (0, 0, 0, 110, 0), "{s:?}");
    assert!(!report.drained);
    assert_eq!((s.missing(), report.unreported), (110, 110));
    assert_identity(&s);
    assert!(report.to_string().contains("110 missing from every trail; NOT drained"), "{report}");
}

/// Records the virtual time at which each call started, then behaves as told.
#[derive(Clone, Default)]
struct TimedSink {
    starts: Arc<Mutex<Vec<Instant>>>,
    fail_after: Option<Duration>,
    written: MemorySink,
}

impl AuditSink for TimedSink {
    async fn write_batch(&self, batch: &[AuditEvent]) -> Result<(), SinkError> {
        self.starts.lock().unwrap().push(Instant::now());
        match self.fail_after {
            Some(after) => {
                tokio::time::sleep(after).await;
                Err(SinkError::backend("down"))
            }
            None => self.written.write_batch(batch).await,
        }
    }
}

#[tokio::test(start_paused = true)]
async fn nothing_is_attempted_after_the_deadline_not_even_the_fallback() {
    fastrand::seed(7);
    let primary = TimedSink { fail_after: Some(Duration::from_millis(150)), ..TimedSink::default() };
    let fallback = TimedSink::default();
    let (_layer, handle) = AuditLayer::builder(primary.clone())
        .batch_size(10)
        .retry(
            Retry::default()
                .max_retries(3)
                .base_delay(Duration::from_millis(400))
                .max_delay(Duration::from_millis(400)),
        )
        .fallback(fallback.clone())
        .build()
        .unwrap();
    // The primary fails the boot batch too: it goes through the same retries into the fallback. Once it is
    // there, the 100 events meet the deadline as they would have without it.
    until(|| fallback.written.len() == 1).await;
    assert_eq!(kinds(&fallback.written.events()), [kind::AUDIT_BOOT]);
    fastrand::seed(7); // and the same retry jitter
    for i in 0..100 {
        handle.record(AuditEvent::new("x").attribute("i", i.to_string()));
    }
    let deadline = Instant::now() + Duration::from_secs(1);
    let report = handle.shutdown(Duration::from_secs(1)).await;
    let s = report.stats;
    assert_eq!((s.written, s.lost, s.sink_timeouts), (0, 0, 0), "no instant zero-time attempts: {s:?}");
    assert!(s.fallback_written > 0 && s.abandoned > 0, "{s:?}");
    assert_eq!(s.fallback_written + s.abandoned, 100, "{s:?}");
    // The boot event, then the events and gap events; no shutdown event, as the deadline came first.
    let in_fallback = without_bookends(fallback.written.events());
    let count = |f: &dyn Fn(&AuditEvent) -> bool| in_fallback.iter().filter(|e| f(e)).count() as u64;
    assert_eq!(count(&|e| e.kind == "x"), s.fallback_written);
    // The primary wrote nothing: every gap event counted is the fallback's own; the primary's went with their
    // batches.
    assert_eq!(count(&|e| e.kind == kind::AUDIT_GAP && e.attributes["trail"] == "fallback"), s.gap_events);
    assert_eq!(count(&|e| e.kind == "x" || e.kind == kind::AUDIT_GAP), in_fallback.len() as u64);
    assert_eq!(fallback.written.events().last().unwrap().kind, "x");
    let starts: Vec<Instant> =
        primary.starts.lock().unwrap().iter().chain(fallback.starts.lock().unwrap().iter()).copied().collect();
    assert!(starts.iter().all(|t| *t < deadline), "a call started at or after the deadline");
    assert!(!report.drained);
    assert_identity(&s);
}

// 3. Reservations never hold shutdown hostage, and are not events.
#[tokio::test(start_paused = true)]
async fn a_service_polled_ready_and_never_called_does_not_delay_shutdown() {
    for overflow in [Overflow::FailClosed, Overflow::Wait(Duration::from_secs(1))] {
        let (layer, handle) = AuditLayer::builder(MemorySink::new()).overflow(overflow).build().unwrap();
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&calls);
        let mut svc = layer.layer(service_fn(move |_req: Request<Full<Bytes>>| {
            counted.fetch_add(1, SeqCst);
            answer(200, "ok")
        }));
        std::future::poll_fn(|cx| svc.poll_ready(cx)).await.unwrap();
        assert_eq!((handle.stats().accepted, handle.stats().queued), (0, 0), "a reservation is not an event");

        let started = Instant::now();
        let report = handle.shutdown(Duration::from_secs(2)).await;
        assert_eq!(started.elapsed(), Duration::ZERO, "{overflow:?}");
        assert!(report.drained, "{overflow:?}: {report:?}");

        // The service is still ready; calling it now, after shutdown:
        let res = svc.call(get("/after")).await.unwrap();
        let s = handle.stats();
        if overflow == Overflow::FailClosed {
            assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!((calls.load(SeqCst), s.refused, s.dropped_closed), (0, 1, 0));
        } else {
            assert_eq!(res.status(), StatusCode::OK);
            read_body(res.into_body()).await.unwrap();
            assert_eq!((calls.load(SeqCst), s.refused, handle.stats().dropped_closed), (1, 0, 1));
        }
        assert_identity(&handle.stats());
    }
}

#[tokio::test(start_paused = true)]
async fn a_request_in_flight_at_shutdown_is_counted_dropped_closed() {
    let (layer, handle) = AuditLayer::builder(MemorySink::new()).overflow(Overflow::FailClosed).build().unwrap();
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    let released = Arc::new(Mutex::new(Some(released)));
    let svc = layer.layer(service_fn(move |_req: Request<Full<Bytes>>| {
        let released = released.lock().unwrap().take().unwrap();
        async move {
            released.await.unwrap();
            answer(200, "late").await
        }
    }));
    let request = tokio::spawn(svc.oneshot(get("/slow")));
    tokio::task::yield_now().await;
    assert!(!request.is_finished());

    let report = handle.shutdown(Duration::from_secs(2)).await;
    assert!(report.drained);
    assert_eq!((report.stats.accepted, report.stats.queued, report.stats.dropped_closed), (0, 0, 0));

    release.send(()).unwrap();
    let res = request.await.unwrap().unwrap();
    assert_eq!(res.status(), StatusCode::OK, "admitted before shutdown: served");
    read_body(res.into_body()).await.unwrap();
    let s = handle.stats();
    assert_eq!((s.dropped_closed, s.accepted, s.queued), (1, 0, 0), "its event is counted, not vanished");
    assert_identity(&s);
}

#[tokio::test]
async fn fail_closed_with_a_full_queue_refuses_without_waiting_for_the_inner_service() {
    let sink = GateSink::default();
    let (layer, handle) =
        AuditLayer::builder(sink.clone()).capacity(1).batch_size(1).overflow(Overflow::FailClosed).build().unwrap();
    sink.pass_boot().await;
    assert!(handle.record(AuditEvent::new("first")));
    eventually(LIMIT, || sink.entered() == 2).await;
    assert!(handle.record(AuditEvent::new("fills the queue")));
    let mut never_ready = tower::ServiceBuilder::new().layer(layer.clone()).service(NeverReady);
    let res = tokio::time::timeout(LIMIT, async { never_ready.ready().await.unwrap().call(get("/")).await }).await;
    assert_eq!(res.expect("refused without waiting").unwrap().status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(handle.stats().refused, 1);
    sink.open.notify_waiters();
}

/// An inner service that is never ready.
#[derive(Clone)]
struct NeverReady;

impl Service<Request<Full<Bytes>>> for NeverReady {
    type Response = TestResponse;
    type Error = Infallible;
    type Future = std::future::Ready<Result<TestResponse, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut std::task::Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Pending
    }

    fn call(&mut self, _req: Request<Full<Bytes>>) -> Self::Future {
        unreachable!("never ready, never called")
    }
}

// 4. A sink that panics before it returns its future, in write, fallback and flush.
#[derive(Clone, Default)]
struct PanicsWhenCalled {
    write_panics: Arc<AtomicUsize>,
    inner: MemorySink,
}

impl AuditSink for PanicsWhenCalled {
    #[allow(clippy::manual_async_fn)]
    fn write_batch(&self, batch: &[AuditEvent]) -> impl Future<Output = Result<(), SinkError>> + Send {
        if self.write_panics.load(SeqCst) > 0 {
            self.write_panics.fetch_sub(1, SeqCst);
            panic!("panics before returning its future");
        }
        self.inner.write_batch(batch)
    }

    #[allow(clippy::manual_async_fn)]
    fn flush(&self) -> impl Future<Output = Result<(), SinkError>> + Send {
        panic!("flush panics before returning its future");
        #[allow(unreachable_code)]
        async {
            Ok(())
        }
    }
}

#[tokio::test(start_paused = true)]
async fn panics_raised_while_making_the_sink_future_are_contained_and_counted() {
    let (primary, fallback) = (PanicsWhenCalled::default(), PanicsWhenCalled::default());
    let (_layer, handle) = AuditLayer::builder(primary.clone())
        .batch_size(1)
        .flush_interval(Duration::from_millis(10))
        .retry(Retry::default().max_retries(1))
        .fallback(fallback.clone())
        .build()
        .unwrap();
    // The boot batch goes through; then the sinks start panicking, for the first event.
    until(|| primary.inner.len() == 1).await;
    primary.write_panics.store(2, SeqCst);
    fallback.write_panics.store(1, SeqCst);
    assert!(handle.record(AuditEvent::new("first")));
    until(|| handle.stats().lost == 1).await;
    assert_eq!(handle.stats().sink_panics, 3, "two primary attempts and the fallback");

    // The worker lives on: the next event reaches the primary, behind a gap event about the first.
    assert!(handle.record(AuditEvent::new("second")));
    until(|| primary.inner.len() == 3).await;
    let trail = recorded(&primary.inner);
    assert_eq!((trail[0].kind.as_ref(), trail[0].attributes["sink_failed"].as_str()), (kind::AUDIT_GAP, "1"));
    assert_eq!(trail[1].kind, "second");

    let report = handle.shutdown(LIMIT).await;
    let s = report.stats;
    assert_eq!((s.written, s.lost, s.sink_panics), (1, 1, 3 + 2), "both flushes panicked too: {s:?}");
    assert!(!report.drained, "a flush that panicked is not a flush");
    assert_eq!(kinds(&primary.inner.events()), [kind::AUDIT_BOOT, kind::AUDIT_GAP, "second", kind::AUDIT_SHUTDOWN]);
    assert_identity(&s);
}

// 5. Fail-closed stays closed when the worker is gone.
#[test]
fn fail_closed_refuses_once_the_worker_is_gone() {
    let first = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (layer, handle) = first
        .block_on(async { AuditLayer::builder(MemorySink::new()).overflow(Overflow::FailClosed).build() })
        .unwrap();
    // The worker's runtime goes away, and the worker with it.
    drop(first);

    let second = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    second.block_on(async {
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&calls);
        let svc = layer.layer(service_fn(move |_req: Request<Full<Bytes>>| {
            counted.fetch_add(1, SeqCst);
            answer(200, "unaudited")
        }));
        let res = svc.oneshot(get("/")).await.unwrap();
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(calls.load(SeqCst), 0);
        assert!(!handle.record(AuditEvent::new("custom")));
        let s = handle.stats();
        assert_eq!((s.refused, s.dropped_closed, s.accepted), (1, 1, 0));
        assert_identity(&s);
    });
}

// 8. Gap events.
#[tokio::test(start_paused = true)]
async fn a_gap_event_never_makes_a_batch_exceed_batch_size() {
    let sink = ScriptedSink::new(&[]);
    let (_layer, handle) = AuditLayer::builder(sink.clone())
        .capacity(4)
        .batch_size(4)
        .flush_interval(Duration::from_millis(10))
        .build()
        .unwrap();
    for i in 0..10 {
        handle.record(AuditEvent::new("x").attribute("i", i.to_string()));
    }
    handle.shutdown(LIMIT).await;
    let calls = sink.calls();
    let sizes: Vec<usize> = calls.iter().map(Vec::len).collect();
    assert_eq!(sizes, [1, 4, 1, 1], "the boot event, gap + 3 events, the 4th, the shutdown event");
    assert_eq!((kinds(&calls[0]), kinds(&calls[3])), (vec![kind::AUDIT_BOOT], vec![kind::AUDIT_SHUTDOWN]));
    let first = &calls[1][0];
    assert_eq!((first.kind.as_ref(), first.attributes["queue_full"].as_str()), (kind::AUDIT_GAP, "6"));
}

#[tokio::test(start_paused = true)]
async fn a_gap_event_that_fails_is_carried_into_the_next_and_the_fallback_gets_its_own() {
    // The boot batch goes through; the first batch of events fails.
    let primary = ScriptedSink::new(&[Step::Ok, Step::Fail]);
    let fallback = MemorySink::new();
    let (_layer, handle) = AuditLayer::builder(primary.clone())
        .capacity(4)
        .batch_size(4)
        .flush_interval(Duration::from_millis(10))
        .retry(Retry::none())
        .fallback(fallback.clone())
        .build()
        .unwrap();
    for i in 0..10 {
        handle.record(AuditEvent::new("x").attribute("i", i.to_string()));
    }
    let report = handle.shutdown(LIMIT).await;
    // The first batch (the primary's gap event and three events) failed: the fallback took it as numbered, then
    // its own gap event (the 6 dropped; nothing about its own contents), numbered and written after it.
    let attrs = |e: &AuditEvent| e.attributes.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ");
    let fb = fallback.events();
    assert_eq!(kinds(&fb), [kind::AUDIT_GAP, "x", "x", "x", kind::AUDIT_GAP]);
    assert_eq!(attrs(&fb[0]), "lost=6 queue_full=6 trail=primary");
    assert_eq!(attrs(&fb[4]), "lost=6 queue_full=6 trail=fallback");
    // The primary's first gap event failed: the next one carries its counts, plus what happened since, the
    // pipeline's two events in the fallback included.
    let trail = primary.written.events();
    assert_eq!(kinds(&trail), [kind::AUDIT_BOOT, kind::AUDIT_GAP, "x", kind::AUDIT_SHUTDOWN]);
    assert_eq!(attrs(&trail[1]), "in_fallback=3 lost=11 pipeline_in_fallback=2 queue_full=6 trail=primary");
    assert_eq!(report.unreported, 0);
    // Each trail in seq order, and together every seq once: nothing numbered went missing.
    let seqs = |events: &[AuditEvent]| events.iter().map(|e| e.seq).collect::<Vec<u64>>();
    assert_eq!((seqs(&trail), seqs(&fb)), (vec![1, 7, 8, 9], vec![2, 3, 4, 5, 6]));
    assert_identity(&report.stats);
}

#[tokio::test(start_paused = true)]
async fn with_the_primary_down_the_fallback_trail_gets_non_cumulative_gaps_and_the_report_says_what_the_primary_missed()
{
    let fallback = MemorySink::new();
    let (_layer, handle) = AuditLayer::builder(FailingSink)
        .capacity(2)
        .batch_size(2)
        .flush_interval(Duration::from_millis(100))
        .retry(Retry::none())
        .fallback(fallback.clone())
        .build()
        .unwrap();
    let mut dropped = Vec::new();
    for round in 0..5u64 {
        let before = handle.stats().dropped_queue_full;
        for i in 0..(3 + round) {
            handle.record(AuditEvent::new("x").attribute("i", format!("{round}-{i}")));
        }
        dropped.push(handle.stats().dropped_queue_full - before);
        tokio::time::advance(Duration::from_millis(100)).await;
        eventually(LIMIT, || handle.stats().queued == 0).await;
    }
    let report = handle.shutdown(LIMIT).await;
    let gaps: Vec<u64> = fallback
        .events()
        .iter()
        .filter(|e| e.kind == kind::AUDIT_GAP && e.attributes["trail"] == "fallback")
        .map(|e| e.attributes["lost"].parse().unwrap())
        .collect();
    assert_eq!(gaps, dropped, "one gap per round, each saying what that round lost, never cumulative");
    let s = report.stats;
    assert_eq!(s.fallback_written, 10);
    assert_eq!(report.unreported, s.dropped_queue_full + s.fallback_written, "the primary trail was never told");
    assert_identity(&s);
}

// 9. Outcomes: HEAD, 204, 304 over a real server; panics.
#[tokio::test]
async fn head_204_and_304_are_recorded_with_their_status_outcome_not_cancelled() {
    use axum::routing::get as route_get;
    let sink = MemorySink::new();
    let (layer, handle) = AuditLayer::builder(sink.clone()).build().unwrap();
    let app = axum::Router::new()
        .route("/doc", route_get(|| async { "a body the server never sends for HEAD" }))
        .route("/empty", route_get(|| async { StatusCode::NO_CONTENT }))
        .route("/cached", route_get(|| async { (StatusCode::NOT_MODIFIED, "ignored") }))
        .layer(layer);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let client = reqwest::Client::new();
    for (method, path, status) in
        [("HEAD", "/doc", 200), ("GET", "/empty", 204), ("GET", "/cached", 304), ("HEAD", "/empty", 204)]
    {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let res = client.request(method, format!("http://{addr}{path}")).send().await.unwrap();
        assert_eq!(res.status().as_u16(), status);
        res.bytes().await.unwrap();
    }
    eventually(LIMIT, || handle.stats().accepted == 4).await;
    assert!(handle.shutdown(LIMIT).await.drained);
    let seen: Vec<_> = ended_cleanly(sink.events())
        .iter()
        .map(|e| (e.method.clone().unwrap().into_owned(), e.status.unwrap(), e.outcome))
        .collect();
    assert_eq!(
        seen,
        [
            ("HEAD".to_owned(), 200, Outcome::Success),
            ("GET".to_owned(), 204, Outcome::Success),
            ("GET".to_owned(), 304, Outcome::Success),
            ("HEAD".to_owned(), 204, Outcome::Success)
        ]
    );
}

/// A body that panics when polled.
struct PanickingBody;

impl http_body::Body for PanickingBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        panic!("the body panicked")
    }
}

#[tokio::test]
async fn a_panic_in_the_service_or_the_body_is_an_error_with_a_panic_attribute() {
    let sink = MemorySink::new();
    let (layer, handle) = AuditLayer::builder(sink.clone()).build().unwrap();
    let svc = layer.layer(service_fn(|req: Request<Full<Bytes>>| async move {
        if req.uri().path() == "/service" {
            panic!("the handler panicked");
        }
        Ok::<_, Infallible>(http::Response::new(PanickingBody))
    }));
    let service_panic = tokio::spawn(svc.clone().oneshot(get("/service"))).await.unwrap_err();
    assert!(service_panic.is_panic());
    let res = svc.oneshot(get("/body")).await.unwrap();
    let body_panic = tokio::spawn(read_body(res.into_body())).await.unwrap_err();
    assert!(body_panic.is_panic());

    assert!(handle.shutdown(LIMIT).await.drained);
    let seen: Vec<_> = ended_cleanly(sink.events())
        .iter()
        .map(|e| (e.path.clone().unwrap(), e.status, e.outcome, e.attributes.get("panic").cloned()))
        .collect();
    let panic = Some("true".to_owned());
    assert_eq!(
        seen,
        [
            ("/service".to_owned(), None, Outcome::Error, panic.clone()),
            ("/body".to_owned(), Some(200), Outcome::Error, panic)
        ]
    );
}

// 12. Memory bounded in bytes.
#[tokio::test]
async fn the_queue_is_bounded_in_bytes_and_drops_past_the_budget_are_counted() {
    const BUDGET: usize = 64 * 1024;
    let sink = GateSink::default();
    let (_layer, handle) =
        AuditLayer::builder(sink.clone()).capacity(1000).batch_size(1).max_queued_bytes(BUDGET).build().unwrap();
    // Each event at the limits: 32 attributes of 250 bytes, about 10 KB.
    let big = || (0..32).fold(AuditEvent::new("big"), |e, i| e.attribute(format!("a{i:02}"), "v".repeat(250)));
    sink.pass_boot().await;
    assert!(handle.record(big()));
    eventually(LIMIT, || sink.entered() == 2).await;
    let queued_before = handle.stats().queued_bytes;
    assert_eq!(queued_before, 0, "the worker's batch is out of the queue");
    let accepted = (0..100).filter(|_| handle.record(big())).count() as u64;
    let s = handle.stats();
    assert_eq!(s.dropped_queue_bytes, 100 - accepted, "{s:?}");
    assert_eq!(s.dropped_queue_full, 0);
    assert!(accepted > 1 && accepted < 10, "{accepted} events of ~10 KB in 64 KiB");
    let per_event = s.queued_bytes / accepted;
    assert!(s.queued_bytes <= BUDGET as u64 && s.queued_bytes + per_event > BUDGET as u64, "{s:?}");
    let report = sink.shutdown_open(&handle).await;
    assert_eq!((report.stats.written, report.stats.queued_bytes), (1 + accepted, 0));
    assert_identity(&report.stats);
}
