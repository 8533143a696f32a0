//! Adversarial tests of issue 11, "Delivery per route": durable responses, intents, group commit, the audit
//! policy (skip, sample, overflow per rule) and the accounting around them.
//!
//! Written by a reviewer who had not seen the other delivery tests. Tests named `regression_…` failed on the
//! code as it was reviewed (each comment says why) and pass since the fix; every other test documents a claim
//! that held.

mod common;
#[cfg(feature = "tonic")]
#[path = "../examples/grpc_server/kv.rs"]
mod kv;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::{FailingSink, ScriptedSink, StalledSink, Step, answer, assert_identity, eventually, get, kinds};
use http::{Request, StatusCode};
use http_body_util::Full;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tower::{Layer, ServiceExt, service_fn};
use tower_audit::{
    AuditContext, AuditEvent, AuditLayer, AuditSink, MemorySink, Overflow, Policy, Retry, Rule, SinkError, Spill,
    SyncPolicy, kind,
};

const LIMIT: Duration = Duration::from_secs(20);

/// A sink whose calls each need a permit (`open(n)` gives `n`); records every batch it wrote, as a batch.
#[derive(Clone)]
struct Valve {
    permits: Arc<Semaphore>,
    entered: Arc<AtomicUsize>,
    batches: Arc<Mutex<Vec<Vec<AuditEvent>>>>,
}

impl Valve {
    /// `initial` calls go through at once (1 lets the boot event through).
    fn new(initial: usize) -> Self {
        Valve { permits: Arc::new(Semaphore::new(initial)), entered: Arc::default(), batches: Arc::default() }
    }

    fn open(&self, n: usize) {
        self.permits.add_permits(n);
    }

    fn entered(&self) -> usize {
        self.entered.load(SeqCst)
    }

    fn batches(&self) -> Vec<Vec<AuditEvent>> {
        self.batches.lock().unwrap().clone()
    }

    /// Every event written, without the worker's own events.
    fn events(&self) -> Vec<AuditEvent> {
        self.batches().into_iter().flatten().filter(|e| !e.is_pipeline_event()).collect()
    }
}

impl AuditSink for Valve {
    async fn write_batch(&self, batch: &[AuditEvent]) -> Result<(), SinkError> {
        self.entered.fetch_add(1, SeqCst);
        self.permits.acquire().await.unwrap().forget();
        self.batches.lock().unwrap().push(batch.to_vec());
        Ok(())
    }
}

/// A sink that fails every batch holding an event whose path starts with `/doomed` (a constraint the
/// database enforces on some rows, say), and writes the others.
#[derive(Clone, Default)]
struct Doomed {
    written: MemorySink,
    calls: Arc<Mutex<Vec<Vec<AuditEvent>>>>,
}

impl AuditSink for Doomed {
    async fn write_batch(&self, batch: &[AuditEvent]) -> Result<(), SinkError> {
        self.calls.lock().unwrap().push(batch.to_vec());
        if batch.iter().any(|e| e.path.as_deref().is_some_and(|p| p.starts_with("/doomed"))) {
            return Err(SinkError::backend("row rejected"));
        }
        self.written.write_batch(batch).await
    }
}

fn durable_all(timeout: Duration) -> Policy {
    Policy::new().rule(Rule::any().durable(timeout))
}

fn intent_all(timeout: Duration) -> Policy {
    Policy::new().rule(Rule::any().durable_intent(timeout))
}

fn with_id(uri: &str, id: &str) -> Request<Full<Bytes>> {
    Request::get(uri).header("x-request-id", id).body(Full::default()).unwrap()
}

fn request_events(events: &[AuditEvent]) -> Vec<&AuditEvent> {
    events.iter().filter(|e| e.kind == kind::HTTP_REQUEST).collect()
}

fn of_kind<'a>(events: &'a [AuditEvent], k: &str) -> Vec<&'a AuditEvent> {
    events.iter().filter(|e| e.kind == k).collect()
}

// ---------------------------------------------------------------------------------------------------------------
// Regressions: found by the review, fixed since
// ---------------------------------------------------------------------------------------------------------------

/// Regression. With `batch_size(1)` (or whenever a full batch is taken while a gap event is due), `Worker::deliver`
/// writes the gap event alone first and then the batch, with two calls to `write`. In the direct (no spill)
/// path, `write` only ever sets `state.users_durable = true` on success and never resets it to `false`, so the
/// lone gap event's success leaves the flag `true` when the batch's own write then fails. The watermark is
/// settled "durable" and the durable request is released with its 200 although its event was `lost`.
///
/// Sequence: an event is lost (sink error), so a gap event is due; a durable request comes in; batch 3 is the
/// gap event alone (ok), batch 4 is the request's event (sink error, no retries): `lost` = 2, yet the client
/// gets 200 and `durable_confirmed` = 1.
#[tokio::test]
async fn regression_durable_200_released_when_its_batch_failed_after_a_lone_gap_event() {
    // boot ok, the lost event fails, the gap event goes through, the durable event fails.
    let sink = ScriptedSink::new(&[Step::Ok, Step::Fail, Step::Ok, Step::Fail]);
    let (layer, handle) = AuditLayer::builder(sink.clone())
        .batch_size(1)
        .retry(Retry::none())
        .policy(durable_all(Duration::from_secs(5)))
        .build()
        .unwrap();
    assert!(handle.record(AuditEvent::new("test.lost_first")));
    eventually(LIMIT, || handle.stats().lost == 1).await;

    let response = layer.layer(service_fn(|_req| answer(200, "transferred"))).oneshot(get("/transfer")).await.unwrap();

    let calls: Vec<Vec<String>> =
        sink.calls().iter().map(|b| kinds(b).into_iter().map(str::to_owned).collect()).collect();
    assert_eq!(
        calls,
        [vec![kind::AUDIT_BOOT], vec!["test.lost_first"], vec![kind::AUDIT_GAP], vec![kind::HTTP_REQUEST]]
    );
    let stats = handle.stats();
    assert_eq!(stats.lost, 2, "the durable request's event was lost: {stats}");
    assert!(!sink.written.events().iter().any(|e| e.kind == kind::HTTP_REQUEST), "the event is not in the trail");
    // The promise: a durable response is released only once its event is durable.
    assert_eq!(
        (response.status(), stats.durable_confirmed, stats.durable_withheld),
        (StatusCode::SERVICE_UNAVAILABLE, 0, 1),
        "a 2xx was released for a durable request whose event never reached the sink"
    );
}

/// Regression, same root cause through the fallback sink: the primary takes the lone gap event, then fails the
/// batch, and the fallback fails it too (`lost`); the durable request still gets 200.
#[tokio::test]
async fn regression_durable_200_released_when_primary_and_fallback_failed_after_a_lone_gap_event() {
    let sink = ScriptedSink::new(&[Step::Ok, Step::Fail, Step::Ok, Step::Fail]);
    let (layer, handle) = AuditLayer::builder(sink.clone())
        .batch_size(1)
        .retry(Retry::none())
        .fallback(FailingSink)
        .policy(durable_all(Duration::from_secs(5)))
        .build()
        .unwrap();
    assert!(handle.record(AuditEvent::new("test.lost_first")));
    eventually(LIMIT, || handle.stats().lost == 1).await;

    let response = layer.layer(service_fn(|_req| answer(201, "created"))).oneshot(get("/register")).await.unwrap();

    let stats = handle.stats();
    assert_eq!((stats.lost, stats.fallback_written), (2, 0), "{stats}");
    assert_eq!(
        (response.status(), stats.durable_confirmed),
        (StatusCode::SERVICE_UNAVAILABLE, 0),
        "a 201 was released although neither sink has the event"
    );
}

/// Regression (as an invariant, deterministic): batch_size 1, a sink that rejects some rows (any batch holding
/// an event whose path starts with `/doomed`), sequential durable requests. Invariant: every 2xx durable
/// response has its event in the sink. A doomed request right after a loss (its gap event still due) breaks it.
#[tokio::test]
async fn regression_every_released_durable_response_has_its_event_in_the_sink() {
    let sink = Doomed::default();
    let (layer, handle) = AuditLayer::builder(sink.clone())
        .batch_size(1)
        .retry(Retry::none())
        .policy(durable_all(Duration::from_secs(5)))
        .build()
        .unwrap();
    let svc = layer.layer(service_fn(|_req| answer(200, "ok")));
    let mut statuses = Vec::new();
    let mut released = Vec::new();
    for (i, path) in ["/ok", "/doomed/1", "/ok", "LOSS", "/doomed/2", "/ok"].iter().enumerate() {
        if *path == "LOSS" {
            // A best-effort event the sink rejects: lost, so a gap event is due for the next batch.
            let mut lost = AuditEvent::new("test.rejected");
            lost.path = Some("/doomed/custom".into());
            let before = handle.stats().lost;
            assert!(handle.record(lost));
            eventually(LIMIT, || handle.stats().lost == before + 1).await;
            continue;
        }
        let id = format!("r{i}");
        let res = svc.clone().oneshot(with_id(path, &id)).await.unwrap();
        statuses.push((path.to_string(), res.status().as_u16()));
        if res.status().is_success() {
            released.push(id);
        }
    }
    let in_sink: Vec<String> = sink.written.events().iter().filter_map(|e| e.request_id.clone()).collect();
    let not_in_sink: Vec<&String> = released.iter().filter(|id| !in_sink.contains(id)).collect();
    assert!(
        not_in_sink.is_empty(),
        "released with 2xx, event not in the sink: {not_in_sink:?}; statuses {statuses:?} ({})",
        handle.stats()
    );
}

/// Panics seen by this process: (thread name, file:line). Installed once; the previous hook still runs.
static PANICS: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());

fn watch_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let thread = std::thread::current().name().unwrap_or_default().to_owned();
            let at = info.location().map(|l| format!("{}:{}", l.file(), l.line())).unwrap_or_default();
            PANICS.lock().unwrap_or_else(|e| e.into_inner()).push((thread, at));
            previous(info);
        }));
    });
}

/// Regression: every clean shutdown panics the worker with "attempt to add with
/// overflow" (debug builds, or any build with `overflow-checks`). `Worker::shut_down` ends with
/// `self.queue.settle_rest()`, which calls `Watermark::close()` = `settle(u64::MAX, false)`, setting `settled =
/// u64::MAX`; then `Worker` is dropped, and `Drop for Queue` calls `settle_rest()` again, so `settle` computes
/// `self.settled.load() + 1` = `u64::MAX + 1` (src/durable.rs:59). The report is already sent, so the test suites don't
/// notice (the panic is in the spawned task, printed to stderr), but with `panic = "abort"` it aborts the process at
/// shutdown, and a panic hook that alerts or exits fires on every shutdown. In release builds it wraps silently (from =
/// 0) and pushes a bogus failed range.
///
/// Runs on a current-thread runtime: the worker's last poll (report sent, worker dropped) completes before
/// `shutdown` returns to this task, so the panic, if any, has happened on this thread by then.
#[tokio::test]
async fn regression_worker_panics_with_overflow_at_every_clean_shutdown() {
    watch_panics();
    let (_layer, handle) = AuditLayer::builder(MemorySink::new()).build().unwrap();
    assert!(handle.shutdown(LIMIT).await.drained);
    tokio::task::yield_now().await;
    let me = std::thread::current().name().unwrap_or_default().to_owned();
    let here: Vec<String> = PANICS
        .lock()
        .unwrap()
        .iter()
        .filter(|(thread, at)| *thread == me && at.contains("durable.rs"))
        .map(|(_, at)| at.clone())
        .collect();
    assert!(here.is_empty(), "the worker panicked in the watermark at shutdown: {here:?}");
}

/// Regression (found by this review, since fixed): Tonic's `Routes` is an Axum router
/// (`route_service("/kv.v1.KeyValue/{*rest}")`). Serving gRPC through it with the layer applied by `Router::layer` (the
/// usual way to put gRPC and REST on one port, or `Routes::into_axum_router().layer(..)`), `matched_path` wins over the
/// request path, so a rule on the gRPC method path (`/kv.v1.KeyValue/Put`, as the README says) never matches: the
/// durable rule is silently downgraded to best effort, and every event's route is `/kv.v1.KeyValue/{*rest}`.
#[cfg(feature = "tonic")]
#[tokio::test]
async fn regression_grpc_rule_by_method_never_matches_when_served_through_an_axum_router() {
    use kv::pb::PutRequest;
    use kv::pb::key_value_client::KeyValueClient;
    use kv::pb::key_value_server::KeyValueServer;

    let sink = MemorySink::new();
    let (layer, handle) = AuditLayer::builder(sink.clone())
        .policy(Policy::new().rule(Rule::route("/kv.v1.KeyValue/Put").durable(Duration::from_secs(5))))
        .build()
        .unwrap();
    let router = tonic::service::Routes::new(KeyValueServer::new(kv::Kv::new("t"))).into_axum_router().layer(layer);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_routes(tonic::service::Routes::from(router))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let mut client = KeyValueClient::connect(kv::local(addr)).await.unwrap();
    let mut req = tonic::Request::new(PutRequest { key: "k".into(), value: "v".into() });
    req.metadata_mut().insert("authorization", "Bearer t".parse().unwrap());
    client.put(req).await.unwrap();
    drop(client);
    assert!(handle.shutdown(LIMIT).await.drained);
    let events = common::ended_cleanly(sink.events());
    let call = of_kind(&events, kind::GRPC_CALL);
    assert_eq!(call.len(), 1, "{events:?}");
    assert_eq!(
        (call[0].route.as_deref(), call[0].attributes.get("delivery").map(String::as_str)),
        (Some("/kv.v1.KeyValue/Put"), Some("durable")),
        "the durable rule on the gRPC method did not apply"
    );
}

// ---------------------------------------------------------------------------------------------------------------
// Durable: claims that held
// ---------------------------------------------------------------------------------------------------------------

/// A stalled sink: the durable response is 503 with `Retry-After: 1` exactly at the timeout (from the head), and
/// once the sink moves, the trail has the request's event (delivery=durable, status 200) and the
/// `audit.response_withheld` event (reason timeout, withheld_status 200).
#[tokio::test(start_paused = true)]
async fn durable_times_out_with_503_retry_after_and_a_withheld_event() {
    let sink = Valve::new(1);
    let timeout = Duration::from_millis(300);
    let (layer, handle) = AuditLayer::builder(sink.clone())
        .sink_timeout(Duration::from_secs(3600))
        .policy(durable_all(timeout))
        .build()
        .unwrap();
    eventually(LIMIT, || sink.batches().len() == 1).await;
    let start = Instant::now();
    let res = layer.layer(service_fn(|_req| answer(200, "hi"))).oneshot(get("/login")).await.unwrap();
    let waited = start.elapsed();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(res.headers()[http::header::RETRY_AFTER], "1");
    assert!(waited >= timeout && waited < timeout + Duration::from_millis(50), "{waited:?}");
    let s = handle.stats();
    assert_eq!((s.durable_confirmed, s.durable_withheld), (0, 1), "{s}");

    sink.open(100);
    let report = handle.shutdown(LIMIT).await;
    assert!(report.drained, "{report}");
    assert_identity(&report.stats);
    assert_eq!(report.stats.missing(), 0);
    let events = sink.events();
    let req = request_events(&events);
    assert_eq!(req.len(), 1);
    assert_eq!((req[0].status, req[0].attributes["delivery"].as_str()), (Some(200), "durable"));
    let withheld = of_kind(&events, kind::AUDIT_RESPONSE_WITHHELD);
    assert_eq!(withheld.len(), 1, "{events:?}");
    assert_eq!(withheld[0].attributes["reason"], "timeout");
    assert_eq!(withheld[0].attributes["withheld_status"], "200");
    assert_eq!(withheld[0].attributes["timeout_ms"], "300");
    assert_eq!(withheld[0].status, Some(503));
}

/// The timeout runs from the response head: a handler slower than the timeout still gets its 200 once durable.
#[tokio::test(start_paused = true)]
async fn durable_timeout_runs_from_the_head_not_the_request() {
    let sink = MemorySink::new();
    let (layer, handle) =
        AuditLayer::builder(sink.clone()).policy(durable_all(Duration::from_millis(100))).build().unwrap();
    let svc = layer.layer(service_fn(|_req| async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        answer(200, "slow").await
    }));
    let res = svc.oneshot(get("/slow")).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(handle.stats().durable_confirmed, 1);
    // Released only once the event is in the sink.
    assert_eq!(request_events(&common::recorded(&sink)).len(), 1);
}

/// A sink that panics, no retries, no fallback: 503 at once ("failed"), long before the timeout; the event is
/// lost and counted, the withheld event written afterwards.
#[tokio::test(start_paused = true)]
async fn durable_sink_panic_answers_503_failed_without_waiting_for_the_timeout() {
    let sink = ScriptedSink::new(&[Step::Ok, Step::Panic]);
    let (layer, handle) = AuditLayer::builder(sink.clone())
        .retry(Retry::none())
        .policy(durable_all(Duration::from_secs(30)))
        .build()
        .unwrap();
    let start = Instant::now();
    let res = layer.layer(service_fn(|_req| answer(200, "x"))).oneshot(get("/pay")).await.unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(start.elapsed() < Duration::from_secs(1), "{:?}", start.elapsed());
    let report = handle.shutdown(LIMIT).await;
    let s = report.stats;
    assert_identity(&s);
    assert_eq!((s.lost, s.sink_panics, s.durable_confirmed, s.durable_withheld), (1, 1, 0, 1), "{s}");
    let written = sink.written.events();
    let withheld = of_kind(&written, kind::AUDIT_RESPONSE_WITHHELD);
    assert_eq!(withheld.len(), 1);
    assert_eq!(withheld[0].attributes["reason"], "failed");
    assert!(request_events(&written).is_empty());
}

/// A batch that fails once and is retried within the timeout: released with 200, in the trail once.
#[tokio::test(start_paused = true)]
async fn durable_released_after_a_retry_within_the_timeout() {
    let sink = ScriptedSink::new(&[Step::Ok, Step::Fail]);
    let (layer, handle) = AuditLayer::builder(sink.clone())
        .retry(Retry::default().base_delay(Duration::from_millis(20)))
        .policy(durable_all(Duration::from_secs(2)))
        .build()
        .unwrap();
    let res = layer.layer(service_fn(|_req| answer(200, "x"))).oneshot(get("/pay")).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(request_events(&sink.written.events()).len(), 1, "released before its event was written");
    let s = handle.shutdown(LIMIT).await.stats;
    assert_eq!((s.retries, s.written, s.durable_confirmed, s.durable_withheld, s.missing()), (1, 1, 1, 0, 0), "{s}");
}

/// Primary fails, the fallback takes it: durable (confirmed by the fallback) and released with 200.
#[tokio::test(start_paused = true)]
async fn durable_confirmed_by_the_fallback() {
    let fallback = MemorySink::new();
    let (layer, handle) = AuditLayer::builder(FailingSink)
        .retry(Retry::none())
        .fallback(fallback.clone())
        .policy(durable_all(Duration::from_secs(2)))
        .build()
        .unwrap();
    let res = layer.layer(service_fn(|_req| answer(200, "x"))).oneshot(get("/pay")).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(request_events(&fallback.events()).len(), 1);
    let s = handle.shutdown(LIMIT).await.stats;
    assert_eq!((s.fallback_written, s.durable_confirmed, s.durable_withheld), (1, 1, 0), "{s}");
}

/// Group commit: while one durable batch is in the sink, five more durable requests arrive; they all go in one
/// next sink call, and all six are released with 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_commit_one_sink_call_for_every_waiting_durable_event() {
    let sink = Valve::new(1);
    let (layer, handle) =
        AuditLayer::builder(sink.clone()).policy(durable_all(Duration::from_secs(10))).build().unwrap();
    eventually(LIMIT, || sink.batches().len() == 1).await;
    let svc = layer.layer(service_fn(|_req| answer(200, "x")));
    let first = tokio::spawn(svc.clone().oneshot(get("/a")));
    eventually(LIMIT, || sink.entered() == 2).await;
    let rest: Vec<_> = (0..5).map(|i| tokio::spawn(svc.clone().oneshot(get(&format!("/b{i}"))))).collect();
    eventually(LIMIT, || handle.stats().queued == 6).await;
    sink.open(1);
    assert_eq!(first.await.unwrap().unwrap().status(), 200);
    eventually(LIMIT, || sink.entered() == 3).await;
    sink.open(1);
    for r in rest {
        assert_eq!(r.await.unwrap().unwrap().status(), 200);
    }
    let sizes: Vec<usize> = sink.batches().iter().map(Vec::len).collect();
    assert_eq!(sizes, [1, 1, 5], "one commit for the five waiting events");
    assert_eq!(handle.stats().durable_confirmed, 6);
    sink.open(10);
    assert!(handle.shutdown(LIMIT).await.drained);
}

/// Best-effort events waiting in the queue ride along with the durable one: group commit writes everything
/// waiting, and releases the durable request with the batch.
#[tokio::test(start_paused = true)]
async fn durable_batch_carries_the_best_effort_events_waiting() {
    let sink = Valve::new(1);
    let policy = Policy::new().rule(Rule::route("/durable").durable(Duration::from_secs(5)));
    let (layer, handle) = AuditLayer::builder(sink.clone())
        .flush_interval(Duration::from_secs(3600))
        .sink_timeout(Duration::from_secs(3600))
        .policy(policy)
        .build()
        .unwrap();
    eventually(LIMIT, || sink.batches().len() == 1).await;
    let svc = layer.layer(service_fn(|_req| answer(200, "x")));
    for i in 0..3 {
        let res = svc.clone().oneshot(get(&format!("/plain{i}"))).await.unwrap();
        common::read_body(res.into_body()).await.unwrap();
    }
    assert_eq!(handle.stats().queued, 3);
    sink.open(1);
    let res = svc.clone().oneshot(get("/durable")).await.unwrap();
    assert_eq!(res.status(), 200);
    let sizes: Vec<usize> = sink.batches().iter().map(Vec::len).collect();
    assert_eq!(sizes, [1, 4]);
    sink.open(10);
    assert!(handle.shutdown(LIMIT).await.drained);
}

/// With a spill, durable means fsynced in the spill: a stalled sink does not hold the response back.
#[tokio::test]
async fn durable_with_a_spill_is_released_while_the_sink_is_stalled() {
    let dir = tempfile::tempdir().unwrap();
    let sink = StalledSink::default();
    let (layer, handle) = AuditLayer::builder(sink.clone())
        .spill(Spill::new(dir.path()).sync(SyncPolicy::Interval(Duration::from_secs(3600))))
        .policy(durable_all(Duration::from_secs(5)))
        .build()
        .unwrap();
    let res = layer.layer(service_fn(|_req| answer(200, "x"))).oneshot(get("/pay")).await.unwrap();
    assert_eq!(res.status(), 200);
    let s = handle.stats();
    assert_eq!((s.durable_confirmed, s.spilled >= 2), (1, true), "{s}");
    let report = handle.shutdown(Duration::from_millis(300)).await;
    // Not delivered (the sink is stalled), but left in the spill: nothing missing.
    assert_identity(&report.stats);
    assert_eq!(report.stats.missing(), 0, "{report}");
    assert!(report.stats.left_in_spill >= 1, "{report}");
}

/// The spill's disk budget has no room for the event: 503 ("failed"), counted as spill_full, never a 200.
#[tokio::test]
async fn durable_with_a_full_spill_is_withheld() {
    let dir = tempfile::tempdir().unwrap();
    let (layer, handle) = AuditLayer::builder(MemorySink::new())
        .spill(Spill::new(dir.path()).max_bytes(40).segment_bytes(10))
        .policy(durable_all(Duration::from_secs(5)))
        .build()
        .unwrap();
    let res = layer.layer(service_fn(|_req| answer(200, "x"))).oneshot(get("/pay")).await.unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    let s = handle.stats();
    assert_eq!((s.spill_full >= 1, s.durable_confirmed, s.durable_withheld), (true, 0, 1), "{s}");
    let report = handle.shutdown(LIMIT).await;
    assert_identity(&report.stats);
}

/// After the pipeline shut down, a durable request is answered 503 at once (no wait for its timeout), and both
/// its event and the withheld event are counted as dropped_closed.
#[tokio::test(start_paused = true)]
async fn durable_after_shutdown_is_503_at_once() {
    let (layer, handle) =
        AuditLayer::builder(MemorySink::new()).policy(durable_all(Duration::from_secs(30))).build().unwrap();
    assert!(handle.shutdown(LIMIT).await.drained);
    let start = Instant::now();
    let res = layer.layer(service_fn(|_req| answer(200, "x"))).oneshot(get("/pay")).await.unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(start.elapsed(), Duration::ZERO);
    let s = handle.stats();
    assert_eq!((s.dropped_closed, s.durable_withheld, s.durable_confirmed), (2, 1, 0), "{s}");
    assert_identity(&s);
}

/// Shutdown whose deadline catches a durable event inside a stalled sink: the request is answered 503 at the
/// shutdown deadline (well before its own 60 s timeout), the event counted abandoned.
#[tokio::test(start_paused = true)]
async fn durable_waiter_released_by_the_shutdown_deadline() {
    let sink = Valve::new(1);
    let (layer, handle) = AuditLayer::builder(sink.clone())
        .sink_timeout(Duration::from_secs(3600))
        .policy(durable_all(Duration::from_secs(60)))
        .build()
        .unwrap();
    eventually(LIMIT, || sink.batches().len() == 1).await;
    let start = Instant::now();
    let req = tokio::spawn(layer.layer(service_fn(|_req| answer(200, "x"))).oneshot(get("/pay")));
    eventually(LIMIT, || sink.entered() == 2).await;
    let report = handle.shutdown(Duration::from_secs(1)).await;
    let res = req.await.unwrap().unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(start.elapsed() < Duration::from_secs(5), "{:?}", start.elapsed());
    let s = handle.stats();
    assert_eq!((s.abandoned, s.durable_withheld, s.durable_confirmed), (1, 1, 0), "{report} / {s}");
    assert_identity(&s);
}

/// Every handle dropped: the worker goes on while layers exist; durable requests are still confirmed.
#[tokio::test]
async fn durable_still_served_after_every_handle_is_dropped() {
    let sink = MemorySink::new();
    let (layer, handle) =
        AuditLayer::builder(sink.clone()).policy(durable_all(Duration::from_secs(5))).build().unwrap();
    drop(handle);
    let res = layer.layer(service_fn(|_req| answer(200, "x"))).oneshot(get("/pay")).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(request_events(&sink.events()).len(), 1);
}

/// The worker is gone mid-request (the runtime it was spawned on is shut down): the waiting durable request is
/// answered 503 at once (the queue's `Drop` closes the watermark), not at its 60 s timeout; the event is
/// abandoned and counted.
#[test]
fn durable_waiter_answered_when_the_workers_runtime_goes_away() {
    let sink = Valve::new(1);
    let worker_rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let (layer, handle) = worker_rt.block_on(async {
        AuditLayer::builder(sink.clone())
            .sink_timeout(Duration::from_secs(3600))
            .policy(durable_all(Duration::from_secs(60)))
            .build()
            .unwrap()
    });
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async move {
        eventually(LIMIT, || sink.batches().len() == 1).await;
        let req = tokio::spawn(layer.layer(service_fn(|_req| answer(200, "x"))).oneshot(get("/pay")));
        eventually(LIMIT, || sink.entered() == 2).await;
        let start = std::time::Instant::now();
        worker_rt.shutdown_background();
        let res = tokio::time::timeout(Duration::from_secs(10), req).await.expect("hung").unwrap().unwrap();
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(start.elapsed() < Duration::from_secs(5));
        let s = handle.stats();
        assert_eq!((s.abandoned, s.durable_withheld, s.durable_confirmed), (1, 1, 0), "{s}");
        assert_identity(&s);
    });
}

/// A client that goes away while its durable response waits: nothing leaks or hangs, the event is still
/// written, and the response is counted as withheld with an `audit.response_withheld` event, reason
/// `cancelled` (it was never released), so confirmed + withheld still covers every durable request.
#[tokio::test(start_paused = true)]
async fn durable_cancelled_while_waiting_is_written_and_counted_as_withheld_cancelled() {
    let sink = Valve::new(1);
    let (layer, handle) = AuditLayer::builder(sink.clone())
        .sink_timeout(Duration::from_secs(3600))
        .policy(durable_all(Duration::from_secs(60)))
        .build()
        .unwrap();
    eventually(LIMIT, || sink.batches().len() == 1).await;
    let fut = layer.layer(service_fn(|_req| answer(200, "x"))).oneshot(get("/pay"));
    assert!(tokio::time::timeout(Duration::from_millis(50), fut).await.is_err(), "still waiting");
    sink.open(10);
    let report = handle.shutdown(LIMIT).await;
    assert!(report.drained);
    let s = report.stats;
    assert_identity(&s);
    assert_eq!((s.written, s.missing(), s.durable_confirmed, s.durable_withheld), (2, 0, 0, 1), "{s}");
    let events = sink.events();
    assert_eq!(kinds(&events), [kind::HTTP_REQUEST, kind::AUDIT_RESPONSE_WITHHELD]);
    assert_eq!((events[0].status, events[0].outcome), (Some(200), tower_audit::Outcome::Success));
    assert_eq!(events[1].attributes.get("reason").map(String::as_str), Some("cancelled"));
}

/// Many concurrent durable requests against a sink that intermittently fails (no spill, batch_size 3): every
/// 2xx's event is in the sink, every request is confirmed or withheld exactly once, and the identity holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_concurrent_with_intermittent_failures_keeps_its_promises() {
    let sink = Doomed::default();
    let (layer, handle) = AuditLayer::builder(sink.clone())
        .batch_size(3)
        .capacity(4096)
        .retry(Retry::none())
        .policy(durable_all(Duration::from_secs(10)))
        .build()
        .unwrap();
    let svc = layer.layer(service_fn(|_req| answer(200, "ok")));
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let path = if i % 7 == 0 { format!("/doomed/{i}") } else { format!("/ok/{i}") };
            let svc = svc.clone();
            tokio::spawn(async move {
                let res = svc.oneshot(with_id(&path, &format!("r{i}"))).await.unwrap();
                (format!("r{i}"), res.status())
            })
        })
        .collect();
    let mut released = Vec::new();
    let mut withheld = 0;
    for t in tasks {
        let (id, status) = t.await.unwrap();
        if status.is_success() {
            released.push(id);
        } else {
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
            withheld += 1;
        }
    }
    let report = handle.shutdown(LIMIT).await;
    let s = report.stats;
    assert_identity(&s);
    assert_eq!((s.durable_confirmed, s.durable_withheld), (released.len() as u64, withheld), "{s}");
    let in_sink: Vec<String> = sink.written.events().iter().filter_map(|e| e.request_id.clone()).collect();
    let missing: Vec<&String> = released.iter().filter(|id| !in_sink.contains(id)).collect();
    assert!(missing.is_empty(), "2xx released, event not in the sink: {missing:?} ({s})");
}

// ---------------------------------------------------------------------------------------------------------------
// DurableIntent
// ---------------------------------------------------------------------------------------------------------------

/// The intent is in the sink before the handler runs (checked from inside the handler), the request's event
/// shares its `intent_id`, and the response waits for the request's event too.
#[tokio::test]
async fn intent_is_in_the_sink_before_the_handler_runs() {
    let sink = MemorySink::new();
    let (layer, handle) = AuditLayer::builder(sink.clone()).policy(intent_all(Duration::from_secs(5))).build().unwrap();
    let seen = sink.clone();
    let svc = layer.layer(service_fn(move |_req: Request<Full<Bytes>>| {
        let seen = seen.clone();
        async move {
            let intents = seen.events().iter().filter(|e| e.kind == kind::HTTP_INTENT).count();
            answer(if intents == 1 { 200 } else { 500 }, "x").await
        }
    }));
    let res = svc.oneshot(get("/delete")).await.unwrap();
    assert_eq!(res.status(), 200, "the handler ran before its intent was in the sink");
    let events = common::recorded(&sink);
    assert_eq!(kinds(&events), [kind::HTTP_INTENT, kind::HTTP_REQUEST], "released before its event was written");
    let id = &events[0].attributes["intent_id"];
    assert_eq!(id.len(), 16);
    assert_eq!(&events[1].attributes["intent_id"], id);
    assert_eq!(events[1].attributes["delivery"], "durable_intent");
    let s = handle.shutdown(LIMIT).await.stats;
    assert_eq!((s.written, s.durable_confirmed, s.durable_withheld), (2, 1, 0), "{s}");
}

/// The intent cannot be made durable in time: 503 with Retry-After, the handler's future is never polled, its
/// request event says withheld=intent (status 503), and `durable_withheld` counts it once (no second withheld
/// event).
#[tokio::test(start_paused = true)]
async fn intent_not_durable_handler_never_runs() {
    let sink = Valve::new(1);
    let (layer, handle) = AuditLayer::builder(sink.clone())
        .sink_timeout(Duration::from_secs(3600))
        .policy(intent_all(Duration::from_millis(250)))
        .build()
        .unwrap();
    eventually(LIMIT, || sink.batches().len() == 1).await;
    let called = Arc::new(AtomicUsize::new(0));
    let ran = Arc::new(AtomicBool::new(false));
    let svc = layer.layer(service_fn({
        let (called, ran) = (Arc::clone(&called), Arc::clone(&ran));
        move |_req: Request<Full<Bytes>>| {
            called.fetch_add(1, SeqCst);
            let ran = Arc::clone(&ran);
            async move {
                ran.store(true, SeqCst);
                answer(200, "deleted").await
            }
        }
    }));
    let start = Instant::now();
    let res = svc.oneshot(get("/delete")).await.unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(res.headers()[http::header::RETRY_AFTER], "1");
    let waited = start.elapsed();
    assert!(waited >= Duration::from_millis(250) && waited < Duration::from_millis(300), "{waited:?}");
    assert_eq!(called.load(SeqCst), 1, "call happens at once (documented)");
    assert!(!ran.load(SeqCst), "the handler's future was polled after its intent failed");
    sink.open(100);
    let report = handle.shutdown(LIMIT).await;
    assert!(report.drained);
    let s = report.stats;
    assert_identity(&s);
    assert_eq!((s.durable_withheld, s.durable_confirmed, s.written), (1, 0, 2), "{s}");
    let events = sink.events();
    assert_eq!(kinds(&events), [kind::HTTP_INTENT, kind::HTTP_REQUEST], "{events:?}");
    assert_eq!(events[0].attributes["intent_id"], events[1].attributes["intent_id"]);
    let req = &events[1];
    assert_eq!(req.status, Some(503));
    assert_eq!(req.attributes["withheld"], "intent");
    assert_eq!(req.attributes["reason"], "timeout");
    assert_eq!(req.attributes["timeout_ms"], "250");
    assert!(!ran.load(SeqCst));
}

/// The intent is refused at the door (the queue is full): 503 at once, the handler never runs.
#[tokio::test(start_paused = true)]
async fn intent_refused_by_a_full_queue_answers_at_once() {
    let sink = Valve::new(1);
    let (layer, handle) = AuditLayer::builder(sink.clone())
        .capacity(2)
        .batch_size(1)
        .sink_timeout(Duration::from_secs(3600))
        .policy(intent_all(Duration::from_secs(30)))
        .build()
        .unwrap();
    eventually(LIMIT, || sink.batches().len() == 1).await;
    // One in the sink's hands, two queued: full.
    for i in 0..3 {
        assert!(handle.record(AuditEvent::new(format!("filler.{i}"))));
        if i == 0 {
            eventually(LIMIT, || sink.entered() == 2).await;
        }
    }
    let ran = Arc::new(AtomicBool::new(false));
    let svc = layer.layer(service_fn({
        let ran = Arc::clone(&ran);
        move |_req: Request<Full<Bytes>>| {
            let ran = Arc::clone(&ran);
            async move {
                ran.store(true, SeqCst);
                answer(200, "x").await
            }
        }
    }));
    let start = Instant::now();
    let res = svc.oneshot(get("/delete")).await.unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert!(!ran.load(SeqCst));
    let s = handle.stats();
    assert_eq!((s.durable_withheld, s.dropped_queue_full), (1, 2), "intent and request event dropped: {s}");
    sink.open(100);
    assert_identity(&handle.shutdown(LIMIT).await.stats);
}

/// A client that goes away while the intent waits: the handler never runs, the request's event says
/// `cancelled` and carries the intent's id; nothing is counted as confirmed or withheld.
#[tokio::test(start_paused = true)]
async fn intent_cancelled_while_waiting_never_runs_the_handler() {
    let sink = Valve::new(1);
    let (layer, handle) = AuditLayer::builder(sink.clone())
        .sink_timeout(Duration::from_secs(3600))
        .policy(intent_all(Duration::from_secs(30)))
        .build()
        .unwrap();
    eventually(LIMIT, || sink.batches().len() == 1).await;
    let ran = Arc::new(AtomicBool::new(false));
    let svc = layer.layer(service_fn({
        let ran = Arc::clone(&ran);
        move |_req: Request<Full<Bytes>>| {
            let ran = Arc::clone(&ran);
            async move {
                ran.store(true, SeqCst);
                answer(200, "x").await
            }
        }
    }));
    assert!(tokio::time::timeout(Duration::from_millis(50), svc.oneshot(get("/delete"))).await.is_err());
    assert!(!ran.load(SeqCst));
    sink.open(100);
    let report = handle.shutdown(LIMIT).await;
    let s = report.stats;
    assert_identity(&s);
    assert_eq!((s.durable_withheld, s.durable_confirmed, s.missing()), (0, 0, 0), "{s}");
    let events = sink.events();
    assert_eq!(kinds(&events), [kind::HTTP_INTENT, kind::HTTP_REQUEST]);
    assert_eq!(events[1].outcome, tower_audit::Outcome::Cancelled);
    assert_eq!(events[0].attributes["intent_id"], events[1].attributes["intent_id"]);
    assert!(!ran.load(SeqCst));
}

/// Intent durable, then the request's event lost: the handler ran (the intent says so) and the response is
/// withheld, with the gap made by the loss reported.
#[tokio::test(start_paused = true)]
async fn intent_durable_then_request_event_failed_is_withheld() {
    // boot ok, intent ok, request event fails.
    let sink = ScriptedSink::new(&[Step::Ok, Step::Ok, Step::Fail]);
    let (layer, handle) = AuditLayer::builder(sink.clone())
        .retry(Retry::none())
        .policy(intent_all(Duration::from_secs(5)))
        .build()
        .unwrap();
    let res = layer.layer(service_fn(|_req| answer(200, "x"))).oneshot(get("/delete")).await.unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    let s = handle.shutdown(LIMIT).await.stats;
    assert_eq!((s.lost, s.durable_withheld, s.durable_confirmed), (1, 1, 0), "{s}");
    let written = sink.written.events();
    assert_eq!(of_kind(&written, kind::HTTP_INTENT).len(), 1);
    assert_eq!(of_kind(&written, kind::AUDIT_RESPONSE_WITHHELD).len(), 1);
    assert_eq!(of_kind(&written, kind::AUDIT_GAP).len(), 1);
}

// ---------------------------------------------------------------------------------------------------------------
// Policy: skip, sample, overflow per rule, route_layer, gRPC
// ---------------------------------------------------------------------------------------------------------------

/// 1 in 3 sampled: 3 of 9 recorded (the 1st, 4th, 7th), 6 sampled_out; no gap event, nothing missing, and the
/// sampled-out requests are not offered.
#[tokio::test]
async fn sampled_out_requests_are_not_losses_nor_gaps() {
    let sink = MemorySink::new();
    let policy = Policy::new().rule(Rule::route("/items/*").sample(3));
    let (layer, handle) = AuditLayer::builder(sink.clone()).policy(policy).build().unwrap();
    let svc = layer.layer(service_fn(|_req| answer(200, "x")));
    for i in 0..9 {
        let res = svc.clone().oneshot(get(&format!("/items/{i}"))).await.unwrap();
        common::read_body(res.into_body()).await.unwrap();
    }
    let report = handle.shutdown(LIMIT).await;
    assert!(report.drained);
    let s = report.stats;
    assert_eq!((s.offered(), s.written, s.sampled_out, s.missing(), s.gap_events), (3, 3, 6, 0, 0), "{s}");
    assert_eq!(report.unreported, 0);
    let events = common::ended_cleanly(sink.events());
    let paths: Vec<_> = events.iter().map(|e| e.path.clone().unwrap()).collect();
    assert_eq!(paths, ["/items/0", "/items/3", "/items/6"]);
}

/// A sampled durable route: the sampled-out requests are not held back by a stalled sink (they record
/// nothing), the recorded one is.
#[tokio::test(start_paused = true)]
async fn sampled_out_durable_requests_are_not_held() {
    let sink = Valve::new(1);
    let policy = Policy::new().rule(Rule::any().sample(2).durable(Duration::from_millis(100)));
    let (layer, handle) =
        AuditLayer::builder(sink.clone()).sink_timeout(Duration::from_secs(3600)).policy(policy).build().unwrap();
    eventually(LIMIT, || sink.batches().len() == 1).await;
    let svc = layer.layer(service_fn(|_req| answer(200, "x")));
    let statuses: Vec<u16> = {
        let mut v = Vec::new();
        for _ in 0..4 {
            v.push(svc.clone().oneshot(get("/a")).await.unwrap().status().as_u16());
        }
        v
    };
    assert_eq!(statuses, [503, 200, 503, 200]);
    let s = handle.stats();
    assert_eq!((s.sampled_out, s.durable_withheld, s.durable_confirmed), (2, 2, 0), "{s}");
    sink.open(100);
    assert!(handle.shutdown(LIMIT).await.drained);
}

/// Skipped: no request event, `skipped` counted, but the handler's own events are kept.
#[tokio::test]
async fn skipped_requests_keep_handler_events() {
    let sink = MemorySink::new();
    let policy = Policy::new().rule(Rule::route("/health").skip()).rule(Rule::any().durable(Duration::from_secs(2)));
    let (layer, handle) = AuditLayer::builder(sink.clone()).policy(policy).build().unwrap();
    let svc = layer.layer(service_fn(|_req: Request<Full<Bytes>>| async move {
        let ctx = AuditContext::current().unwrap();
        assert!(ctx.record(AuditEvent::new("health.probe")));
        answer(200, "ok").await
    }));
    let res = svc.oneshot(get("/health")).await.unwrap();
    assert_eq!(res.status(), 200);
    let s = handle.shutdown(LIMIT).await.stats;
    assert_eq!((s.skipped, s.written, s.durable_confirmed, s.missing()), (1, 1, 0, 0), "{s}");
    assert_eq!(kinds(&common::ended_cleanly(sink.events())), ["health.probe"]);
}

/// Overflow per rule: with the queue full, the FailClosed route is refused (503, handler not called) while
/// the other route is served and its event dropped and counted.
#[tokio::test(start_paused = true)]
async fn overflow_per_rule_fail_closed_refuses_while_others_drop() {
    let sink = Valve::new(1);
    let policy = Policy::new().rule(Rule::route("/critical").overflow(Overflow::FailClosed));
    let (layer, handle) = AuditLayer::builder(sink.clone())
        .capacity(2)
        .batch_size(1)
        .sink_timeout(Duration::from_secs(3600))
        .policy(policy)
        .build()
        .unwrap();
    eventually(LIMIT, || sink.batches().len() == 1).await;
    for i in 0..3 {
        assert!(handle.record(AuditEvent::new(format!("filler.{i}"))));
        if i == 0 {
            eventually(LIMIT, || sink.entered() == 2).await;
        }
    }
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = layer.layer(service_fn({
        let calls = Arc::clone(&calls);
        move |_req: Request<Full<Bytes>>| {
            calls.fetch_add(1, SeqCst);
            answer(200, "x")
        }
    }));
    let critical = svc.clone().oneshot(get("/critical")).await.unwrap();
    assert_eq!(critical.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(calls.load(SeqCst), 0);
    let other = svc.clone().oneshot(get("/other")).await.unwrap();
    assert_eq!(other.status(), 200);
    common::read_body(other.into_body()).await.unwrap();
    let s = handle.stats();
    assert_eq!((s.refused, s.dropped_queue_full, calls.load(SeqCst)), (1, 1, 1), "{s}");
    sink.open(100);
    assert_identity(&handle.shutdown(LIMIT).await.stats);
}

/// `Router::route_layer` with `with_policy` over a real socket: a durable group and a best-effort group on one
/// pipeline; each request recorded once, matched by its Axum route template; a durable 503 over the wire has
/// `Retry-After: 1`.
#[tokio::test]
async fn route_layer_groups_over_a_socket_record_each_request_once() {
    use axum::Router;
    use axum::routing::{get as aget, post};

    let sink = Valve::new(1);
    let (base, handle) = AuditLayer::builder(sink.clone()).sink_timeout(Duration::from_secs(3600)).build().unwrap();
    let durable = base
        .with_policy(Policy::new().rule(Rule::route("/auth/{action}").durable(Duration::from_millis(300))))
        .unwrap();
    let app = Router::new()
        .route("/auth/{action}", post(|| async { "done" }))
        .route_layer(durable)
        .merge(Router::new().route("/items/{id}", aget(|| async { "item" })).route_layer(base.clone()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>()).await.unwrap();
    });
    let client = reqwest::Client::new();
    eventually(LIMIT, || sink.batches().len() == 1).await;
    // The sink is shut: the durable login times out.
    let res = client.post(format!("http://{addr}/auth/login")).send().await.unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(res.headers()["retry-after"], "1");
    assert_eq!(res.text().await.unwrap(), "");
    sink.open(1000);
    let res = client.post(format!("http://{addr}/auth/logout")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.text().await.unwrap(), "done");
    let res = client.get(format!("http://{addr}/items/7")).send().await.unwrap();
    assert_eq!(res.text().await.unwrap(), "item");
    let res = client.get(format!("http://{addr}/nowhere")).send().await.unwrap();
    assert_eq!(res.status(), 404);
    let report = handle.shutdown(LIMIT).await;
    assert!(report.drained, "{report}");
    let events = sink.events();
    let mut summary: Vec<(String, String, Option<u16>, Option<String>)> = events
        .iter()
        .map(|e| {
            (e.kind.to_string(), e.path.clone().unwrap_or_default(), e.status, e.attributes.get("delivery").cloned())
        })
        .collect();
    summary.sort();
    let durable = Some("durable".to_owned());
    assert_eq!(
        summary,
        [
            (kind::AUDIT_RESPONSE_WITHHELD.to_owned(), "/auth/login".to_owned(), Some(503), None),
            (kind::HTTP_REQUEST.to_owned(), "/auth/login".to_owned(), Some(200), durable.clone()),
            (kind::HTTP_REQUEST.to_owned(), "/auth/logout".to_owned(), Some(200), durable),
            (kind::HTTP_REQUEST.to_owned(), "/items/7".to_owned(), Some(200), None),
        ]
    );
    let s = report.stats;
    assert_eq!((s.durable_confirmed, s.durable_withheld), (1, 1), "{s}");
}

/// gRPC through `Server::layer` (the request path is the method): a durable Put against a stalled sink is
/// answered UNAVAILABLE at the timeout, and no hang.
#[cfg(feature = "tonic")]
#[tokio::test]
async fn grpc_durable_put_is_unavailable_while_the_sink_is_stalled() {
    use kv::pb::PutRequest;
    use kv::pb::key_value_client::KeyValueClient;

    let (layer, handle) = AuditLayer::builder(StalledSink::default())
        .sink_timeout(Duration::from_secs(3600))
        .policy(Policy::new().rule(Rule::route("/kv.v1.KeyValue/Put").durable(Duration::from_millis(300))))
        .build()
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    tokio::spawn(kv::serve(listener, kv::Kv::new("t"), layer, std::future::pending()));
    let mut client = KeyValueClient::connect(kv::local(addr)).await.unwrap();
    let mut req = tonic::Request::new(PutRequest { key: "k".into(), value: "v".into() });
    req.metadata_mut().insert("authorization", "Bearer t".parse().unwrap());
    let start = std::time::Instant::now();
    let status = client.put(req).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(start.elapsed() < Duration::from_secs(5));
    assert_eq!(handle.stats().durable_withheld, 1);
}

/// The identity and counters after a clean shutdown of a mixed workload (skip, sample, durable, intent, best
/// effort): confirmed + withheld equals the durable requests answered; nothing missing.
#[tokio::test]
async fn mixed_policy_accounting_adds_up() {
    let sink = MemorySink::new();
    let policy = Policy::new()
        .rule(Rule::route("/health").skip())
        .rule(Rule::route("/list").sample(4))
        .rule(Rule::route("/login").durable(Duration::from_secs(5)))
        .rule(Rule::route("/delete").durable_intent(Duration::from_secs(5)));
    let (layer, handle) = AuditLayer::builder(sink.clone()).policy(policy).build().unwrap();
    let svc = layer.layer(service_fn(|_req| answer(200, "x")));
    let mut durable = 0;
    for round in 0..8 {
        for path in ["/health", "/list", "/login", "/delete", "/other"] {
            let res = svc.clone().oneshot(get(path)).await.unwrap();
            assert_eq!(res.status(), 200, "{path} round {round}");
            common::read_body(res.into_body()).await.unwrap();
            if path == "/login" || path == "/delete" {
                durable += 1;
            }
        }
    }
    let report = handle.shutdown(LIMIT).await;
    assert!(report.drained);
    let s = report.stats;
    assert_identity(&s);
    // 2 /list + 8 /login + 8 /delete (+ 8 intents) + 8 /other
    assert_eq!((s.skipped, s.sampled_out, s.written, s.missing(), s.gap_events), (8, 6, 34, 0, 0), "{s}");
    assert_eq!(s.durable_confirmed + s.durable_withheld, durable, "{s}");
    assert_eq!(s.durable_withheld, 0);
}

/// A rule that cannot hold is refused, by `build` and by `with_policy`.
#[tokio::test]
async fn invalid_rules_are_refused() {
    let bad = [
        Rule::any().sample(0),
        Rule::any().durable(Duration::ZERO),
        Rule::any().durable_intent(Duration::ZERO),
        Rule::any().overflow(Overflow::Wait(Duration::from_secs(1))),
    ];
    for rule in bad {
        let policy = Policy::new().rule(Rule::route("/ok")).rule(rule);
        assert!(AuditLayer::builder(MemorySink::new()).policy(policy).build().is_err());
    }
    let (layer, _handle) = AuditLayer::builder(MemorySink::new()).build().unwrap();
    assert!(layer.with_policy(Policy::new().rule(Rule::any().sample(0))).is_err());
}
