//! Delivery per route: durable responses (group commit, deadline, 503), skip and sample, per-route overflow;
//! a real Axum server on a loopback socket, a real HTTP client, and SQLite where the trail is checked.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::{get, post};
use common::*;
use http::Method;
use tower_audit::{
    AuditContext, AuditEvent, AuditLayer, AuditSink, ConfigError, MemorySink, Overflow, Policy, Retry, Rule, SinkError,
    Spill, SyncPolicy, kind,
};

const LIMIT: Duration = Duration::from_secs(20);
const TIMEOUT: Duration = Duration::from_millis(300);

async fn login(audit: AuditContext) -> &'static str {
    audit.set_actor("alice");
    "welcome"
}

fn app() -> Router {
    Router::new()
        .route("/login", post(login))
        .route("/me", get(|| async { "me" }))
        .route("/health", get(|| async { "ok" }))
        .route("/items/{id}", get(|| async { "item" }))
        .route("/pay", post(|| async { "paid" }))
}

fn policy() -> Policy {
    Policy::new()
        .rule(Rule::route("/health").skip())
        .rule(Rule::route("/login").methods([Method::POST]).durable(TIMEOUT))
        .rule(Rule::route("/items/*").sample(3))
        .rule(Rule::route("/pay").overflow(Overflow::FailClosed))
}

async fn serve(app: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>()).await.unwrap();
    });
    format!("http://{addr}")
}

fn attr<'a>(event: &'a AuditEvent, key: &str) -> Option<&'a str> {
    event.attributes.get(key).map(String::as_str)
}

#[tokio::test]
async fn with_the_sink_frozen_a_durable_route_answers_503_at_its_timeout_while_best_effort_answers_200() {
    let sink = StalledSink::default();
    let (layer, handle) = AuditLayer::builder(sink.clone()).policy(policy()).build().unwrap();
    let base = serve(app().layer(layer)).await;
    let client = reqwest::Client::new();
    eventually(LIMIT, || sink.entered.load(Ordering::SeqCst) == 1).await;

    let started = Instant::now();
    let durable = tokio::spawn({
        let (client, base) = (client.clone(), base.clone());
        async move { client.post(format!("{base}/login")).header("x-request-id", "d-1").send().await.unwrap() }
    });
    // While it waits, the best-effort route on the same server answers, 50 times.
    for _ in 0..50 {
        let res = client.get(format!("{base}/me")).send().await.unwrap();
        assert_eq!((res.status().as_u16(), res.text().await.unwrap().as_str()), (200, "me"));
    }
    let res = durable.await.unwrap();
    let waited = started.elapsed();
    assert_eq!(res.status(), 503);
    assert_eq!(res.headers()["retry-after"], "1");
    assert_eq!(res.text().await.unwrap(), "");
    // It waited for its timeout, and not much longer: nothing hangs on the frozen sink.
    assert!(waited >= TIMEOUT && waited < TIMEOUT + Duration::from_secs(2), "{waited:?}");
    let stats = handle.stats();
    assert_eq!((stats.durable_confirmed, stats.durable_withheld), (0, 1));
    // 50 best-effort events, the durable one, and its audit.response_withheld, all queued behind the frozen sink.
    assert_eq!(stats.accepted, 52);
    let report = handle.shutdown(Duration::from_millis(100)).await;
    assert_eq!(report.stats.abandoned, 52);
}

#[tokio::test]
async fn a_withheld_response_is_in_the_trail_beside_the_request_it_withheld() {
    let sink = GateSink::default();
    let (layer, handle) = AuditLayer::builder(sink.clone()).policy(policy()).build().unwrap();
    let base = serve(app().layer(layer)).await;
    sink.pass_boot().await;
    let res = reqwest::Client::new().post(format!("{base}/login")).header("x-request-id", "w-1").send().await.unwrap();
    assert_eq!(res.status(), 503);

    let report = sink.shutdown_open(&handle).await;
    assert!(report.drained);
    let events = ended_cleanly(sink.written.lock().unwrap().clone());
    assert_eq!(kinds(&events), [kind::HTTP_REQUEST, kind::AUDIT_RESPONSE_WITHHELD]);
    let (request, withheld) = (&events[0], &events[1]);
    assert_eq!((request.status, request.actor.as_deref()), (Some(200), Some("alice")));
    assert_eq!(attr(request, "delivery"), Some("durable"));
    assert_eq!((withheld.status, withheld.actor.as_deref()), (Some(503), Some("alice")));
    assert_eq!((request.request_id.as_deref(), withheld.request_id.as_deref()), (Some("w-1"), Some("w-1")));
    assert_eq!((withheld.route.as_deref(), withheld.method.as_deref()), (Some("/login"), Some("POST")));
    assert_eq!(attr(withheld, "reason"), Some("timeout"));
    assert_eq!(attr(withheld, "withheld_status"), Some("200"));
    assert_eq!(attr(withheld, "timeout_ms"), Some("300"));
    assert_eq!((report.stats.durable_withheld, report.stats.written, report.stats.missing()), (1, 2, 0));
}

/// Durable requests that arrive while a batch is being written go out together in the next one.
#[tokio::test]
async fn durable_events_waiting_together_are_written_in_one_batch() {
    for (batch_size, calls) in [(64, 2), (1, 20)] {
        let sink = GateSink::default();
        let policy = Policy::new().rule(Rule::any().durable(LIMIT));
        let (layer, handle) = AuditLayer::builder(sink.clone()).batch_size(batch_size).policy(policy).build().unwrap();
        let base = serve(app().layer(layer)).await;
        sink.pass_boot().await;
        let client = reqwest::Client::new();
        let request = |i: usize| {
            let (client, base) = (client.clone(), base.clone());
            tokio::spawn(async move {
                client.get(format!("{base}/me")).header("x-request-id", format!("g-{i}")).send().await.unwrap()
            })
        };
        // The first request's event is written at once, alone: its batch is held in the sink.
        let mut requests = vec![request(0)];
        eventually(LIMIT, || sink.entered() == 2).await;
        // 19 more arrive meanwhile, and wait.
        requests.extend((1..20).map(request));
        eventually(LIMIT, || handle.stats().accepted == 20).await;
        assert!(requests.iter().all(|r| !r.is_finished()));
        eventually(LIMIT, || {
            sink.open.notify_waiters();
            sink.written.lock().unwrap().len() == 21
        })
        .await;
        for request in requests {
            assert_eq!(request.await.unwrap().status(), 200);
        }
        let report = sink.shutdown_open(&handle).await;
        assert_eq!((report.stats.durable_confirmed, report.stats.written), (20, 20));
        // Batches besides the boot and shutdown events': the first request's, then the other 19 together
        // (group commit); or, with a batch size of 1, one per event.
        assert_eq!(report.stats.batches - 2, calls, "batch size {batch_size}");
    }
}

/// Fails every fourth call without writing: some durable batches are retried, some requests wait for it.
#[derive(Clone)]
struct Flaky<S> {
    inner: S,
    calls: Arc<AtomicUsize>,
}

impl<S: AuditSink> AuditSink for Flaky<S> {
    async fn write_batch(&self, batch: &[AuditEvent]) -> Result<(), SinkError> {
        if self.calls.fetch_add(1, Ordering::SeqCst) % 4 == 3 {
            return Err(SinkError::backend("flaky"));
        }
        self.inner.write_batch(batch).await
    }
}

#[cfg(feature = "sqlite")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_2xx_durable_response_leaves_before_its_event_is_in_sqlite() {
    const REQUESTS: usize = 1000;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.db");
    let sqlite = tower_audit::SqliteSink::connect(path.to_str().unwrap()).await.unwrap();
    sqlite.ensure_schema().await.unwrap();
    let reader = sqlx::SqlitePool::connect(&format!("sqlite://{}", path.display())).await.unwrap();
    let sink = Flaky { inner: sqlite, calls: Arc::new(AtomicUsize::new(0)) };
    let (layer, handle) = AuditLayer::builder(sink)
        .retry(Retry::default().base_delay(Duration::from_millis(1)).max_delay(Duration::from_millis(2)))
        .policy(Policy::new().rule(Rule::route("/login").durable(Duration::from_secs(10))))
        .build()
        .unwrap();
    let base = serve(app().layer(layer)).await;
    let client = reqwest::Client::new();
    let mut tasks = Vec::new();
    for c in 0..16 {
        let (client, base, reader) = (client.clone(), base.clone(), reader.clone());
        tasks.push(tokio::spawn(async move {
            let mut ok = 0;
            for i in (c..REQUESTS).step_by(16) {
                let id = format!("r-{i}");
                let res = client.post(format!("{base}/login")).header("x-request-id", &id).send().await.unwrap();
                assert_eq!(res.status(), 200, "{id}");
                // Checked the moment the 2xx arrives: its event is committed already.
                let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM audit_events WHERE request_id = ?")
                    .bind(&id)
                    .fetch_one(&reader)
                    .await
                    .unwrap();
                assert_eq!(rows, 1, "{id} answered 200 with {rows} rows in the trail");
                ok += 1;
            }
            ok
        }));
    }
    let mut ok = 0;
    for task in tasks {
        ok += task.await.unwrap();
    }
    assert_eq!(ok, REQUESTS);
    let report = handle.shutdown(LIMIT).await;
    assert!(report.drained);
    let s = report.stats;
    assert_eq!((s.durable_confirmed, s.durable_withheld, s.written, s.lost), (REQUESTS as u64, 0, REQUESTS as u64, 0));
    assert!(s.retries > 0, "the flaky sink failed no batch: {s:?}");
    let rows: i64 =
        sqlx::query_scalar("SELECT COUNT(DISTINCT request_id) FROM audit_events WHERE kind = 'http.request'")
            .fetch_one(&reader)
            .await
            .unwrap();
    assert_eq!(rows, REQUESTS as i64);
}

#[tokio::test]
async fn with_a_spill_durable_means_synced_on_disk_and_a_frozen_sink_does_not_matter() {
    let dir = tempfile::tempdir().unwrap();
    let sink = StalledSink::default();
    // Synced only when durable events ask for it: the interval alone would sync in an hour.
    let spill = Spill::new(dir.path()).sync(SyncPolicy::Interval(Duration::from_secs(3600)));
    let (layer, handle) = AuditLayer::builder(sink.clone()).policy(policy()).spill(spill).build().unwrap();
    let base = serve(app().layer(layer)).await;
    let client = reqwest::Client::new();
    for i in 0..5 {
        let res = client.post(format!("{base}/login")).header("x-request-id", format!("s-{i}")).send().await.unwrap();
        assert_eq!(res.status(), 200);
    }
    let stats = handle.stats();
    assert_eq!((stats.durable_confirmed, stats.durable_withheld, stats.written), (5, 0, 0));
    // The boot event and the five (the sink has taken none).
    assert_eq!(stats.spilled, 6);
    let report = handle.shutdown(Duration::from_millis(200)).await;
    assert_eq!(report.stats.left_in_spill, 5);
}

#[tokio::test]
async fn skipped_and_sampled_requests_are_counted_and_never_reported_as_gaps() {
    let sink = MemorySink::new();
    let (layer, handle) = AuditLayer::builder(sink.clone()).policy(policy()).build().unwrap();
    let base = serve(app().layer(layer)).await;
    let client = reqwest::Client::new();
    for _ in 0..10 {
        assert_eq!(client.get(format!("{base}/health")).send().await.unwrap().status(), 200);
    }
    for i in 0..9 {
        let res = client.get(format!("{base}/items/{i}")).header("x-request-id", format!("i-{i}")).send().await;
        assert_eq!(res.unwrap().status(), 200);
    }
    assert_eq!(client.get(format!("{base}/me")).send().await.unwrap().status(), 200);
    let report = handle.shutdown(LIMIT).await;
    assert!(report.drained);
    let s = report.stats;
    assert_eq!((s.skipped, s.sampled_out, s.offered(), s.written, s.missing()), (10, 6, 4, 4, 0));
    assert_eq!(report.unreported, 0);
    let all = sink.events();
    assert!(all.iter().all(|e| e.kind != kind::AUDIT_GAP), "{:?}", kinds(&all));
    let events = ended_cleanly(all.clone());
    // One item request in three, the first of each three.
    let recorded: Vec<_> =
        events.iter().map(|e| e.request_id.as_deref().unwrap_or(e.path.as_deref().unwrap())).collect();
    assert_eq!(recorded, ["i-0", "i-3", "i-6", "/me"]);
    let shutdown = all.last().unwrap();
    assert_eq!((attr(shutdown, "skipped"), attr(shutdown, "sampled_out")), (Some("10"), Some("6")));
    assert_eq!(attr(shutdown, "missing"), Some("0"));
}

#[tokio::test]
async fn a_skipped_handler_still_records_its_own_events() {
    let sink = MemorySink::new();
    let policy = Policy::new().rule(Rule::route("/login").skip());
    let (layer, handle) = AuditLayer::builder(sink.clone()).policy(policy).build().unwrap();
    let app = Router::new()
        .route(
            "/login",
            post(|audit: AuditContext| async move {
                audit.record(AuditEvent::new("auth.login_failed"));
                "no"
            }),
        )
        .layer(layer);
    let base = serve(app).await;
    let res = reqwest::Client::new().post(format!("{base}/login")).header("x-request-id", "k-1").send().await;
    assert_eq!(res.unwrap().status(), 200);
    assert!(handle.shutdown(LIMIT).await.drained);
    let events = ended_cleanly(sink.events());
    assert_eq!(kinds(&events), ["auth.login_failed"]);
    assert_eq!((events[0].request_id.as_deref(), events[0].route.as_deref()), (Some("k-1"), Some("/login")));
}

#[tokio::test]
async fn a_full_queue_refuses_a_fail_closed_route_and_drops_for_the_others() {
    let sink = StalledSink::default();
    let (layer, handle) = AuditLayer::builder(sink.clone()).capacity(2).batch_size(1).policy(policy()).build().unwrap();
    let base = serve(app().layer(layer)).await;
    let client = reqwest::Client::new();
    eventually(LIMIT, || sink.entered.load(Ordering::SeqCst) == 1).await;
    // The boot event is stuck in the sink; two events fill the queue.
    for _ in 0..2 {
        assert_eq!(client.get(format!("{base}/me")).send().await.unwrap().status(), 200);
    }
    eventually(LIMIT, || handle.stats().queued == 2).await;
    let pay = client.post(format!("{base}/pay")).send().await.unwrap();
    assert_eq!(pay.status(), 503);
    let me = client.get(format!("{base}/me")).send().await.unwrap();
    assert_eq!(me.status(), 200);
    let s = handle.stats();
    assert_eq!((s.refused, s.dropped_queue_full, s.accepted), (1, 1, 2));
    let report = handle.shutdown(Duration::from_millis(100)).await;
    assert_eq!(report.stats.abandoned, 2);
}

#[tokio::test]
async fn route_layer_and_with_policy_make_one_route_durable_over_the_same_pipeline() {
    let sink = MemorySink::new();
    let (layer, handle) = AuditLayer::builder(sink.clone()).build().unwrap();
    let durable = layer.with_policy(Policy::new().rule(Rule::any().durable(LIMIT))).unwrap();
    let app = Router::new()
        .route("/login", post(login))
        .route_layer(durable)
        .route("/me", get(|| async { "me" }).layer(layer.clone()))
        .route("/health", get(|| async { "ok" }));
    let base = serve(app).await;
    let client = reqwest::Client::new();
    for path in ["/login", "/me", "/health"] {
        let method = if path == "/login" { Method::POST } else { Method::GET };
        let res = client.request(method, format!("{base}{path}")).send().await.unwrap();
        assert_eq!(res.status(), 200, "{path}");
    }
    let report = handle.shutdown(LIMIT).await;
    assert_eq!((report.stats.durable_confirmed, report.stats.written), (1, 2));
    let events = ended_cleanly(sink.events());
    let got: Vec<_> = events.iter().map(|e| (e.route.as_deref().unwrap(), attr(e, "delivery"))).collect();
    assert_eq!(got, [("/login", Some("durable")), ("/me", None)]);
}

#[tokio::test]
async fn rules_that_cannot_hold_are_refused_by_build_and_with_policy() {
    let bad = [
        (Rule::route("/a").sample(0), "policy rule 0 (Route(\"/a\")) samples 1 in 0 requests (sample needs n >= 1)"),
        (Rule::any().durable(Duration::ZERO), "policy rule 0 (Any) has a durable timeout of zero"),
        (Rule::any().durable_intent(Duration::ZERO), "policy rule 0 (Any) has a durable timeout of zero"),
        (
            Rule::route("/b/*").overflow(Overflow::Wait(Duration::from_secs(1))),
            "policy rule 0 (Route(\"/b/*\")) sets Overflow::Wait, which only the whole layer can have (it acts in \
             poll_ready)",
        ),
    ];
    for (rule, message) in bad {
        let err = AuditLayer::builder(MemorySink::new()).policy(Policy::new().rule(rule)).build().unwrap_err();
        assert!(matches!(err, ConfigError::InvalidRule { rule: 0, .. }), "{err:?}");
        assert_eq!(err.to_string(), message);
    }
    let (layer, _handle) = AuditLayer::builder(MemorySink::new()).build().unwrap();
    let policy = Policy::new().rule(Rule::any()).rule(Rule::any().sample(0));
    assert!(matches!(layer.with_policy(policy).unwrap_err(), ConfigError::InvalidRule { rule: 1, .. }));
}

/// A `DurableIntent` route: what the handler saw of the trail when it ran, and how often it ran.
fn intent_app(sink: MemorySink, calls: Arc<AtomicUsize>) -> Router {
    Router::new().route(
        "/transfer",
        post(move || {
            let (sink, calls) = (sink.clone(), Arc::clone(&calls));
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                let intents = sink.events().iter().filter(|e| e.kind == kind::HTTP_INTENT).count();
                format!("intents in the trail: {intents}")
            }
        }),
    )
}

fn intent_policy() -> Policy {
    Policy::new().rule(Rule::route("/transfer").durable_intent(TIMEOUT))
}

#[tokio::test]
async fn an_intent_is_in_the_sink_before_the_handler_runs_and_shares_its_id_with_the_request() {
    let (sink, calls) = (MemorySink::new(), Arc::new(AtomicUsize::new(0)));
    let (layer, handle) = AuditLayer::builder(sink.clone()).policy(intent_policy()).build().unwrap();
    let base = serve(intent_app(sink.clone(), Arc::clone(&calls)).layer(layer)).await;
    let client = reqwest::Client::new();
    for (i, want) in ["intents in the trail: 1", "intents in the trail: 2"].into_iter().enumerate() {
        let res = client.post(format!("{base}/transfer")).header("x-request-id", format!("t-{i}")).send().await;
        let res = res.unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(res.text().await.unwrap(), want);
    }
    let report = handle.shutdown(LIMIT).await;
    assert!(report.drained);
    let s = report.stats;
    // Four events (two intents, two requests); two responses released, none withheld.
    assert_eq!((s.accepted, s.written, s.durable_confirmed, s.durable_withheld, s.missing()), (4, 4, 2, 0, 0));
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    let events = ended_cleanly(sink.events());
    assert_eq!(kinds(&events), [kind::HTTP_INTENT, kind::HTTP_REQUEST, kind::HTTP_INTENT, kind::HTTP_REQUEST]);
    for pair in events.chunks(2) {
        let (intent, request) = (&pair[0], &pair[1]);
        let id = attr(intent, "intent_id").unwrap();
        assert!(id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
        assert_eq!(attr(request, "intent_id"), Some(id));
        assert_eq!(intent.request_id, request.request_id);
        assert_eq!((intent.method.as_deref(), intent.route.as_deref()), (Some("POST"), Some("/transfer")));
        assert_eq!((intent.status, intent.latency_us), (None, None));
        assert_eq!((request.status, attr(request, "delivery")), (Some(200), Some("durable_intent")));
        assert!(intent.seq < request.seq);
    }
    assert_ne!(attr(&events[0], "intent_id"), attr(&events[2], "intent_id"));
}

#[tokio::test]
async fn an_intent_not_durable_in_time_answers_503_and_the_handler_never_runs() {
    let sink = GateSink::default();
    let calls = Arc::new(AtomicUsize::new(0));
    let (layer, handle) = AuditLayer::builder(sink.clone()).policy(intent_policy()).build().unwrap();
    let base = serve(intent_app(MemorySink::new(), Arc::clone(&calls)).layer(layer)).await;
    sink.pass_boot().await;
    let client = reqwest::Client::new();
    let started = Instant::now();
    let res = client.post(format!("{base}/transfer")).header("x-request-id", "x-1").send().await.unwrap();
    let waited = started.elapsed();
    assert_eq!((res.status().as_u16(), res.headers()["retry-after"].to_str().unwrap()), (503, "1"));
    assert!(waited >= TIMEOUT && waited < TIMEOUT + Duration::from_secs(2), "{waited:?}");
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    assert_eq!((handle.stats().durable_confirmed, handle.stats().durable_withheld), (0, 1));

    let report = sink.shutdown_open(&handle).await;
    assert!(report.drained);
    let events = ended_cleanly(sink.written.lock().unwrap().clone());
    assert_eq!(kinds(&events), [kind::HTTP_INTENT, kind::HTTP_REQUEST]);
    let request = &events[1];
    assert_eq!((request.status, request.outcome), (Some(503), tower_audit::Outcome::ServerError));
    assert_eq!((attr(request, "withheld"), attr(request, "reason")), (Some("intent"), Some("timeout")));
    assert_eq!(attr(request, "timeout_ms"), Some("300"));
    assert_eq!(attr(request, "intent_id"), attr(&events[0], "intent_id"));
    assert_eq!(report.stats.missing(), 0);

    // Once the pipeline is shut down, no intent can be queued: 503 at once, and still no handler.
    let res = client.post(format!("{base}/transfer")).send().await.unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    assert_eq!(handle.stats().durable_withheld, 2);
}
