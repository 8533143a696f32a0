//! The request path: one event per request on every path, the context, hostile input, overflow policies.

mod common;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::Full;
use tokio::sync::mpsc;
use tower::{Service, ServiceBuilder, ServiceExt, service_fn};
use tower_audit::{AuditContext, AuditEvent, AuditLayer, AuditSink, MemorySink, Outcome, Overflow, kind};

const LIMIT: Duration = Duration::from_secs(10);

#[tokio::test]
async fn one_event_when_the_body_ends_with_request_fields() {
    let (layer, handle, sink) = pipeline();
    let svc = ServiceBuilder::new().layer(layer).service(service_fn(|_req: Request<Full<Bytes>>| answer(201, "made")));
    let req = Request::post("/things?token=abc&x=1")
        .header("x-request-id", "req-42")
        .header("user-agent", "test-agent/1.0")
        .body(Full::default())
        .unwrap();
    let res = svc.oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    assert_eq!(read_body(res.into_body()).await.unwrap(), "made");

    let events = drained(&handle, &sink).await;
    assert_eq!(events.len(), 1, "{events:?}");
    let e = &events[0];
    assert_eq!(e.kind, kind::HTTP_REQUEST);
    assert_eq!(e.seq, 2, "after the boot event");
    assert_eq!(e.id.get_version_num(), 7);
    assert_eq!(e.method.as_deref(), Some("POST"));
    assert_eq!(e.path.as_deref(), Some("/things?token=REDACTED&x=1"));
    assert_eq!(e.route, None, "no router, no route template");
    assert_eq!(e.status, Some(201));
    assert_eq!(e.outcome, Outcome::Success);
    assert_eq!(e.request_id.as_deref(), Some("req-42"));
    assert_eq!(e.user_agent.as_deref(), Some("test-agent/1.0"));
    assert!(e.latency_us.is_some());
}

#[tokio::test(start_paused = true)]
async fn streaming_body_is_timed_to_its_last_byte() {
    let (layer, handle, sink) = pipeline();
    let (tx, rx) = mpsc::channel(4);
    let body = std::sync::Mutex::new(Some(ChannelBody { rx }));
    let svc = layer.layer_ready(service_fn(move |_req: Request<Full<Bytes>>| {
        let body = body.lock().unwrap().take().unwrap();
        async move { Ok::<_, Infallible>(Response::new(body)) }
    }));
    let res = svc.oneshot(get("/stream")).await.unwrap();
    let reader = tokio::spawn(read_body(res.into_body()));

    tx.send(Frame::data(Bytes::from_static(b"first "))).await.unwrap();
    tokio::time::advance(Duration::from_secs(5)).await;
    // The response started long ago, but the body has not ended: nothing queued yet.
    assert_eq!(handle.stats().accepted, 0);
    tx.send(Frame::data(Bytes::from_static(b"last"))).await.unwrap();
    drop(tx);
    assert_eq!(reader.await.unwrap().unwrap(), "first last");

    let events = drained(&handle, &sink).await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].outcome, Outcome::Success);
    assert!(events[0].latency_us.unwrap() >= 5_000_000, "{:?}", events[0].latency_us);
}

trait LayerReady {
    fn layer_ready<S>(&self, inner: S) -> tower_audit::AuditService<S>;
}

impl LayerReady for AuditLayer {
    fn layer_ready<S>(&self, inner: S) -> tower_audit::AuditService<S> {
        tower::Layer::layer(self, inner)
    }
}

#[tokio::test]
async fn inner_error_emits_one_error_event() {
    let (layer, handle, sink) = pipeline();
    let svc = layer.layer_ready(service_fn(|_req: Request<Full<Bytes>>| async {
        Err::<TestResponse, _>(std::io::Error::other("backend down"))
    }));
    let err = svc.oneshot(get("/fails")).await.unwrap_err();
    assert_eq!(err.to_string(), "backend down");

    let events = drained(&handle, &sink).await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].outcome, Outcome::Error);
    assert_eq!(events[0].status, None);
}

#[tokio::test]
async fn body_error_emits_one_error_event() {
    let (layer, handle, sink) = pipeline();
    let svc = layer.layer_ready(service_fn(|_req: Request<Full<Bytes>>| async {
        Ok::<_, Infallible>(Response::new(FailingBody { sent: false }))
    }));
    let res = svc.oneshot(get("/breaks")).await.unwrap();
    assert!(read_body(res.into_body()).await.is_err());

    let events = drained(&handle, &sink).await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].outcome, Outcome::Error);
    assert_eq!(events[0].status, Some(200));
}

#[tokio::test]
async fn dropped_future_emits_one_cancelled_event() {
    let (layer, handle, sink) = pipeline();
    let mut svc = layer.layer_ready(service_fn(|_req: Request<Full<Bytes>>| async {
        std::future::pending::<Result<TestResponse, Infallible>>().await
    }));
    let mut future = Box::pin(svc.ready().await.unwrap().call(get("/slow")));
    // Poll once so the inner future is in flight, then abandon it like a client that hangs up.
    assert!(futures_poll_once(&mut future).await.is_pending());
    drop(future);

    let events = drained(&handle, &sink).await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].outcome, Outcome::Cancelled);
    assert_eq!(events[0].status, None);
}

#[tokio::test]
async fn a_body_dropped_unread_takes_the_status_outcome_and_one_dropped_part_way_is_cancelled() {
    let (layer, handle, sink) = pipeline();
    // Never polled: a server that had no use for the body (as for HEAD, 204, 304) is not a cancellation.
    let svc = layer.layer_ready(service_fn(|_req: Request<Full<Bytes>>| answer(200, "never read")));
    drop(svc.oneshot(get("/unread")).await.unwrap());
    // Polled once, then dropped before its end: the client went away.
    let (tx, rx) = mpsc::channel(4);
    let body = std::sync::Mutex::new(Some(ChannelBody { rx }));
    let svc = layer.layer_ready(service_fn(move |_req: Request<Full<Bytes>>| {
        let body = body.lock().unwrap().take().unwrap();
        async move { Ok::<_, Infallible>(Response::new(body)) }
    }));
    let res = svc.oneshot(get("/part-way")).await.unwrap();
    tx.send(Frame::data(Bytes::from_static(b"first"))).await.unwrap();
    let mut body = Box::pin(res.into_body());
    let frame = std::future::poll_fn(|cx| http_body::Body::poll_frame(body.as_mut(), cx)).await;
    assert_eq!(frame.unwrap().unwrap().into_data().unwrap(), "first");
    drop(body);

    let events = drained(&handle, &sink).await;
    let seen: Vec<_> = events.iter().map(|e| (e.path.as_deref().unwrap(), e.status, e.outcome)).collect();
    assert_eq!(seen, [("/unread", Some(200), Outcome::Success), ("/part-way", Some(200), Outcome::Cancelled)]);
}

#[tokio::test]
async fn empty_body_counts_as_ended_without_being_polled() {
    let (layer, handle, sink) = pipeline();
    let svc = layer.layer_ready(service_fn(|_req: Request<Full<Bytes>>| answer(204, "")));
    let res = svc.oneshot(get("/nothing")).await.unwrap();
    // Servers do not poll a body whose `is_end_stream` is true; dropping it must not read as a cancellation.
    drop(res);

    let events = drained(&handle, &sink).await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].outcome, Outcome::Success);
    assert_eq!(events[0].status, Some(204));
}

#[tokio::test]
async fn outcomes_follow_status_codes() {
    let (layer, handle, sink) = pipeline();
    for status in [200u16, 302, 401, 403, 404, 500] {
        let svc = layer.layer_ready(service_fn(move |_req: Request<Full<Bytes>>| answer(status, "x")));
        let res = svc.oneshot(get("/")).await.unwrap();
        read_body(res.into_body()).await.unwrap();
    }
    let outcomes: Vec<_> = drained(&handle, &sink).await.iter().map(|e| (e.status.unwrap(), e.outcome)).collect();
    assert_eq!(
        outcomes,
        [
            (200, Outcome::Success),
            (302, Outcome::Success),
            (401, Outcome::Denied),
            (403, Outcome::Denied),
            (404, Outcome::ClientError),
            (500, Outcome::ServerError)
        ]
    );
}

async fn futures_poll_once<F: std::future::Future + Unpin>(f: &mut F) -> Poll<F::Output> {
    std::future::poll_fn(|cx| Poll::Ready(std::pin::Pin::new(&mut *f).poll(cx))).await
}

/// An inner service whose readiness the test controls.
#[derive(Clone)]
struct Gated {
    ready: Arc<std::sync::atomic::AtomicBool>,
}

impl Service<Request<Full<Bytes>>> for Gated {
    type Response = TestResponse;
    type Error = Infallible;
    type Future = std::future::Ready<Result<TestResponse, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut std::task::Context<'_>) -> Poll<Result<(), Infallible>> {
        if self.ready.load(Ordering::SeqCst) { Poll::Ready(Ok(())) } else { Poll::Pending }
    }

    fn call(&mut self, _req: Request<Full<Bytes>>) -> Self::Future {
        std::future::ready(Ok(Response::new(Full::default())))
    }
}

#[tokio::test]
async fn poll_ready_delegates_and_clones_share_the_pipeline() {
    let (layer, handle, sink) = pipeline();
    let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut svc = layer.layer_ready(Gated { ready: Arc::clone(&ready) });
    assert!(std::future::poll_fn(|cx| Poll::Ready(svc.poll_ready(cx))).await.is_pending());
    ready.store(true, Ordering::SeqCst);
    let mut clone = svc.clone();
    for s in [&mut svc, &mut clone] {
        let res = s.ready().await.unwrap().call(get("/")).await.unwrap();
        drop(res);
    }
    assert_eq!(drained(&handle, &sink).await.len(), 2);
}

#[tokio::test]
async fn handler_sets_actor_and_attributes_and_records_security_events() {
    let (layer, handle, sink) = pipeline();
    let svc = layer.layer_ready(service_fn(|_req: Request<Full<Bytes>>| async move {
        let audit = AuditContext::current().unwrap();
        audit.set_actor("mallory@example.com");
        audit.set_attribute("tenant", "acme");
        let queued = audit
            .record(AuditEvent::new("auth.login_failed").outcome(Outcome::Denied).attribute("reason", "bad_password"));
        assert!(queued);
        answer(401, "no").await
    }));
    let req = Request::post("/login").header("x-request-id", "r-7").body(Full::default()).unwrap();
    let res = svc.oneshot(req).await.unwrap();
    read_body(res.into_body()).await.unwrap();
    assert!(handle.record(AuditEvent::new("config.reloaded").actor("ops")));

    let events = drained(&handle, &sink).await;
    let kinds: Vec<_> = events.iter().map(|e| (e.seq, e.kind.as_ref())).collect();
    assert_eq!(kinds, [(2, "auth.login_failed"), (3, "http.request"), (4, "config.reloaded")]);
    let (custom, request, outside) = (&events[0], &events[1], &events[2]);
    assert_eq!(custom.actor.as_deref(), Some("mallory@example.com"));
    assert_eq!(custom.outcome, Outcome::Denied);
    assert_eq!(custom.request_id.as_deref(), Some("r-7"), "inherits the request's fields");
    assert_eq!(custom.path.as_deref(), Some("/login"));
    assert_eq!(custom.attributes["reason"], "bad_password");
    assert_eq!(request.actor.as_deref(), Some("mallory@example.com"));
    assert_eq!(request.attributes["tenant"], "acme");
    assert_eq!(request.outcome, Outcome::Denied);
    assert_eq!(outside.actor.as_deref(), Some("ops"));
    assert_eq!(outside.path, None);
}

#[tokio::test]
async fn secrets_never_reach_an_event_and_hostile_text_is_bounded() {
    let sink = MemorySink::new();
    let (layer, handle) = AuditLayer::builder(sink.clone())
        .flush_interval(Duration::from_secs(3600))
        .max_path_len(256)
        .max_field_len(64)
        .capture_header("x-tenant")
        .context_in_extensions(true)
        .build()
        .unwrap();
    let svc = layer.layer_ready(service_fn(|req: Request<Full<Bytes>>| async move {
        let audit = req.extensions().get::<AuditContext>().unwrap().clone();
        // An actor taken from user input, trying to forge a second JSON line.
        audit.set_actor("eve\n{\"kind\":\"forged\"}");
        Ok::<_, Infallible>(
            Response::builder()
                .header("set-cookie", "session=SETCOOKIESECRET")
                .body(Full::new(Bytes::from_static(b"RESPONSEBODYSECRET")))
                .unwrap(),
        )
    }));
    let long_path = format!("/{}?password=PWSECRET&q=ok", "a".repeat(10 * 1024));
    let req = Request::post(long_path.as_str())
        .header("authorization", "Bearer AUTHSECRET")
        .header("cookie", "session=COOKIESECRET")
        .header("x-tenant", "acme")
        .header("user-agent", http::HeaderValue::from_bytes(b"bad\xff\tagent").unwrap())
        .body(Full::new(Bytes::from_static(b"REQUESTBODYSECRET")))
        .unwrap();
    let res = svc.oneshot(req).await.unwrap();
    read_body(res.into_body()).await.unwrap();

    let events = drained(&handle, &sink).await;
    assert_eq!(events.len(), 1);
    let e = &events[0];
    let json = serde_json::to_string(e).unwrap();
    for secret in ["AUTHSECRET", "COOKIESECRET", "SETCOOKIESECRET", "REQUESTBODYSECRET", "RESPONSEBODYSECRET"] {
        assert!(!json.contains(secret), "{secret} leaked into {json}");
    }
    assert_eq!(e.path.as_ref().unwrap().len(), 256, "path is cut to the bound");
    assert!(e.path.as_ref().unwrap().ends_with('…'));
    assert_eq!(e.user_agent.as_deref(), Some("bad\u{fffd}\u{fffd}agent"), "invalid UTF-8 and tab replaced");
    assert_eq!(e.actor.as_deref(), Some("eve\u{fffd}{\"kind\":\"forged\"}"));
    assert_eq!(e.attributes["header.x-tenant"], "acme");
    assert_eq!(json.lines().count(), 1);
}

#[tokio::test]
async fn credential_headers_cannot_be_captured() {
    for header in ["Authorization", "cookie", "set-cookie", "proxy-authorization"] {
        let err = AuditLayer::builder(MemorySink::new()).capture_header(header).build().unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("header `{}` carries credentials and is never recorded in audit events", header.to_lowercase())
        );
    }
    let err = AuditLayer::builder(MemorySink::new()).capture_header("bad header").build().unwrap_err();
    assert_eq!(err.to_string(), "`bad header` is not a valid HTTP header name");
    let err = AuditLayer::builder(MemorySink::new()).trusted_proxies(["10.0.0.0/33"]).build().unwrap_err();
    assert!(matches!(err, tower_audit::ConfigError::InvalidProxy(p) if p == "10.0.0.0/33"));
    let err = AuditLayer::builder(MemorySink::new()).capacity(4).batch_size(8).build().unwrap_err();
    assert_eq!(err.to_string(), "batch_size (8) must not exceed capacity (4)");
}

#[test]
fn building_outside_a_runtime_is_a_clear_error() {
    let err = AuditLayer::builder(MemorySink::new()).build().unwrap_err();
    assert!(matches!(err, tower_audit::ConfigError::NoRuntime));
}

/// Fills a pipeline whose worker is stuck in its first batch of events (the boot batch let through), so the
/// queue's free room is known exactly.
async fn stuck_pipeline(capacity: usize, overflow: Overflow) -> (AuditLayer, tower_audit::AuditHandle, GateSink) {
    let sink = GateSink::default();
    let (layer, handle) = AuditLayer::builder(sink.clone())
        .capacity(capacity)
        .batch_size(1)
        .flush_interval(Duration::from_secs(3600))
        .overflow(overflow)
        .build()
        .unwrap();
    sink.pass_boot().await;
    assert!(handle.record(AuditEvent::new("first")));
    eventually(LIMIT, || sink.entered() == 2).await;
    for i in 0..capacity {
        assert!(handle.record(AuditEvent::new(format!("fill-{i}"))));
    }
    // `first` is in the sink's hands, the rest waits in the queue: all accepted, none settled.
    assert_eq!(handle.stats().queued, capacity as u64 + 1);
    (layer, handle, sink)
}

#[tokio::test]
async fn drop_policy_never_waits_and_counts_each_drop() {
    let (layer, handle, sink) = stuck_pipeline(4, Overflow::Drop).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&calls);
    let svc = layer.layer_ready(service_fn(move |_req: Request<Full<Bytes>>| {
        counted.fetch_add(1, Ordering::SeqCst);
        answer(200, "ok")
    }));
    for _ in 0..3 {
        let res = svc.clone().oneshot(get("/")).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        read_body(res.into_body()).await.unwrap();
    }
    assert!(!handle.record(AuditEvent::new("custom")));
    let stats = handle.stats();
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert_eq!(stats.dropped_queue_full, 4);
    assert_eq!(stats.accepted, 5);

    // Unblock the sink: everything queued is written, then a gap event reports the 4 losses.
    let report = sink.shutdown_open(&handle).await;
    assert!(report.drained);
    let written = sink.written.lock().unwrap().clone();
    let gap: Vec<_> = written.iter().filter(|e| e.kind == kind::AUDIT_GAP).collect();
    assert_eq!(gap.len(), 1);
    assert_eq!(gap[0].attributes["lost"], "4");
    assert_eq!(gap[0].attributes["queue_full"], "4");
    // The boot event, `first`, the 4 queued, the gap event, the shutdown event.
    assert_eq!(written.len(), 1 + 1 + 4 + 1 + 1);
    assert_eq!(ended_cleanly(written.clone()).len(), 1 + 4 + 1);
    let seqs: Vec<u64> = written.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=8).collect::<Vec<_>>(), "sequence numbers are gapless in the trail");
    assert_eq!(report.stats.written, 5, "gap events are counted apart from the events they describe");
    assert_eq!(report.stats.gap_events, 1);
}

#[tokio::test]
async fn fail_closed_refuses_with_503_without_calling_the_service() {
    let (layer, handle, sink) = stuck_pipeline(2, Overflow::FailClosed).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&calls);
    let svc = layer.layer_ready(service_fn(move |_req: Request<Full<Bytes>>| {
        counted.fetch_add(1, Ordering::SeqCst);
        answer(200, "ok")
    }));
    let res = svc.clone().oneshot(get("/")).await.unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(read_body(res.into_body()).await.unwrap(), "");
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    assert_eq!(handle.stats().refused, 1);

    // Once the sink moves, slots free up and requests are served and audited again.
    sink.open.notify_one();
    eventually(LIMIT, || {
        sink.open.notify_one();
        handle.stats().queued == 0
    })
    .await;
    let res = svc.clone().oneshot(get("/again")).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    read_body(res.into_body()).await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    eventually(LIMIT, || {
        sink.open.notify_one();
        sink.written.lock().unwrap().iter().any(|e| e.path.as_deref() == Some("/again"))
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn wait_policy_waits_for_a_slot_at_most_its_limit() {
    let (layer, handle, sink) = stuck_pipeline(1, Overflow::Wait(Duration::from_millis(100))).await;
    let svc = layer.layer_ready(service_fn(|_req: Request<Full<Bytes>>| answer(200, "ok")));

    // No slot frees up: after 100 ms the request goes on, and its event is dropped as a wait timeout.
    let started = tokio::time::Instant::now();
    let res = svc.clone().oneshot(get("/timeout")).await.unwrap();
    assert_eq!(started.elapsed(), Duration::from_millis(100));
    assert_eq!(res.status(), StatusCode::OK);
    read_body(res.into_body()).await.unwrap();
    assert_eq!(handle.stats().dropped_wait_timeout, 1);

    // A slot frees up while the request waits: it takes the slot and its event is queued.
    let waiting = tokio::spawn(svc.clone().oneshot(get("/slot")));
    tokio::time::advance(Duration::from_millis(10)).await;
    assert!(!waiting.is_finished());
    sink.open.notify_one();
    let res = waiting.await.unwrap().unwrap();
    read_body(res.into_body()).await.unwrap();
    let stats = handle.stats();
    assert_eq!(stats.dropped_wait_timeout, 1);
    assert_eq!(stats.accepted, 3, "first + fill + /slot");
}

/// The incident in miniature: the sink never returns, yet every request completes and every lost event is
/// counted; the queue never holds more than its capacity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_sink_costs_requests_nothing() {
    const REQUESTS: usize = 10_000;
    const CAPACITY: usize = 256;
    const BATCH: usize = 64;
    // The boot batch goes through; the first batch of events is the one the sink never returns from.
    let sink = PassBoot::new(StalledSink::default());
    let (layer, handle) = AuditLayer::builder(sink.clone())
        .capacity(CAPACITY)
        .batch_size(BATCH)
        .flush_interval(Duration::from_secs(3600))
        .sink_timeout(Duration::from_secs(3600))
        .build()
        .unwrap();
    let svc = layer.layer_ready(service_fn(|_req: Request<Full<Bytes>>| answer(200, "ok")));
    let run = async {
        let mut tasks = tokio::task::JoinSet::new();
        for task in 0..8 {
            let svc = svc.clone();
            tasks.spawn(async move {
                let mut ok = 0;
                for i in 0..REQUESTS / 8 {
                    let res = svc.clone().oneshot(get(&format!("/r/{task}/{i}"))).await.unwrap();
                    assert_eq!(res.status(), StatusCode::OK);
                    read_body(res.into_body()).await.unwrap();
                    ok += 1;
                }
                ok
            });
        }
        tasks.join_all().await.into_iter().sum::<usize>()
    };
    // A deadlock guard only: the requests take milliseconds.
    let completed = tokio::time::timeout(Duration::from_secs(60), run).await.expect("requests hung");
    assert_eq!(completed, REQUESTS);

    let stats = handle.stats();
    assert_eq!(stats.accepted + stats.dropped_queue_full, REQUESTS as u64, "{stats:?}");
    assert!(stats.queued <= (CAPACITY + BATCH) as u64, "{stats:?}");
    // The worker holds at most one batch inside the stalled sink; the rest of what was accepted waits in the
    // queue: memory is bounded by capacity + batch.
    let in_sink = sink.inner.entered.load(Ordering::SeqCst) as u64 * BATCH as u64;
    assert!(sink.inner.entered.load(Ordering::SeqCst) <= 1);
    assert!(sink.booted());
    assert_eq!(stats.accepted, stats.queued, "{stats:?}");
    assert!(stats.accepted <= CAPACITY as u64 + in_sink, "{stats:?}");
    assert_eq!(stats.written, 0);
}

#[allow(dead_code)]
fn assert_sink<S: AuditSink>() {}

/// The worker keeps the strings of written events and requests write their texts into them: each event must
/// hold exactly its own request's texts, whatever the request before it left in the strings it reuses.
#[tokio::test]
async fn events_written_into_reused_strings_hold_exactly_their_own_texts() {
    let sink = MemorySink::new();
    let (layer, handle) =
        AuditLayer::builder(sink.clone()).batch_size(1).flush_interval(Duration::from_secs(3600)).build().unwrap();
    let mut svc =
        ServiceBuilder::new().layer(layer).service(service_fn(|_req: Request<Full<Bytes>>| answer(200, "ok")));
    // (target, request id, user agent), each written before the next is sent.
    let requests: [(&str, Option<&str>, Option<&str>); 5] = [
        ("/a/rather/long/path/to/reuse?x=1", Some("request-id-0001"), Some("agent/1.0 (a long user agent)")),
        ("/b", None, None),
        ("/c?token=s3cret", Some("id-2"), None),
        ("/d/e", None, Some("ua")),
        ("/", Some("request-id-0005"), Some("agent/5")),
    ];
    eventually(LIMIT, || sink.len() == 1).await; // the boot event
    for (n, (target, id, agent)) in requests.iter().enumerate() {
        let mut req = Request::get(*target);
        if let Some(id) = id {
            req = req.header("x-request-id", *id);
        }
        if let Some(agent) = agent {
            req = req.header("user-agent", *agent);
        }
        let res = svc.ready().await.unwrap().call(req.body(Full::default()).unwrap()).await.unwrap();
        read_body(res.into_body()).await.unwrap();
        eventually(LIMIT, || sink.len() == n + 2).await;
    }
    let events = drained(&handle, &sink).await;
    let texts: Vec<_> = events
        .iter()
        .map(|e| (e.path.as_deref().unwrap(), e.route.as_deref(), e.request_id.as_deref(), e.user_agent.as_deref()))
        .collect();
    assert_eq!(
        texts,
        [
            ("/a/rather/long/path/to/reuse?x=1", None, Some("request-id-0001"), Some("agent/1.0 (a long user agent)")),
            ("/b", None, None, None),
            ("/c?token=REDACTED", None, Some("id-2"), None),
            ("/d/e", None, None, Some("ua")),
            ("/", None, Some("request-id-0005"), Some("agent/5")),
        ]
    );
}
