//! Review of the request path's context through the thread (`AuditContext::current`) and the reused request
//! states: nothing of one request reaches another's event, whatever way a request ends; `current` gives the
//! request being polled and no other; every request still has exactly one event; the SQLite sink's batch that
//! fits one statement is still written whole or not at all.

mod common;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Method, Request, Response};
use http_body::{Body, Frame};
use http_body_util::Full;
use tower::{Layer, ServiceExt, service_fn};
use tower_audit::{
    AuditContext, AuditEvent, AuditLayer, AuditSink, ClientAddr, MemorySink, Outcome, Policy, Rule, kind,
};

const LIMIT: Duration = Duration::from_secs(10);

/// Every field of an event a request could leak into another's, the time and latency aside.
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    kind: String,
    outcome: Outcome,
    method: Option<String>,
    route: Option<String>,
    path: Option<String>,
    status: Option<u16>,
    grpc_status: Option<i32>,
    request_id: Option<String>,
    actor: Option<String>,
    client_addr: Option<String>,
    user_agent: Option<String>,
    attributes: Vec<(String, String)>,
}

fn seen(e: &AuditEvent) -> Seen {
    Seen {
        kind: e.kind.to_string(),
        outcome: e.outcome,
        method: e.method.as_ref().map(|m| m.to_string()),
        route: e.route.clone(),
        path: e.path.clone(),
        status: e.status,
        grpc_status: e.grpc_status,
        request_id: e.request_id.clone(),
        actor: e.actor.clone(),
        client_addr: e.client_addr.map(|a| a.to_string()),
        user_agent: e.user_agent.clone(),
        attributes: e.attributes.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
    }
}

/// The fields of a plain `GET` answered 200 with nothing captured or set.
fn plain(path: &str) -> Seen {
    Seen {
        kind: kind::HTTP_REQUEST.into(),
        outcome: Outcome::Success,
        method: Some("GET".into()),
        route: None,
        path: Some(path.into()),
        status: Some(200),
        grpc_status: None,
        request_id: None,
        actor: None,
        client_addr: None,
        user_agent: None,
        attributes: vec![],
    }
}

fn attrs(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

/// Polls `future` once, then drops it: a client that went away mid-request.
async fn poll_once_then_drop<F: Future>(future: F) {
    let mut future = Box::pin(future);
    std::future::poll_fn(|cx| {
        assert!(future.as_mut().poll(cx).is_pending(), "the handler was meant to wait");
        Poll::Ready(())
    })
    .await;
    drop(future);
}

/// One service, requests of every sort one after the other (each reusing the state the one before left): each
/// event holds its own request's fields and nothing else.
#[tokio::test(flavor = "current_thread")]
async fn requests_of_every_sort_in_a_row_each_get_only_their_own_fields() {
    let sink = MemorySink::new();
    let (layer, handle) = AuditLayer::builder(sink.clone())
        .flush_interval(Duration::from_secs(3600))
        .capture_header("x-tenant")
        .build()
        .unwrap();
    let cancelled_ran = Arc::new(AtomicBool::new(false));
    let ran = Arc::clone(&cancelled_ran);
    let svc = layer.layer(service_fn(move |req: Request<Full<Bytes>>| {
        let ran = Arc::clone(&ran);
        async move {
            let audit = AuditContext::current().expect("current in the handler");
            let mut status_header = None;
            match req.uri().path() {
                "/pkg.Svc/Get" => {
                    audit.set_actor("grpc-actor");
                    audit.set_attribute("grpc-attr", "1");
                    status_header = Some("5");
                }
                "/panic" => {
                    audit.set_actor("panic-actor");
                    panic!("handler bug");
                }
                "/cancelled" => {
                    audit.set_actor("cancelled-actor");
                    audit.set_attribute("cancelled-attr", "1");
                    ran.store(true, Ordering::SeqCst);
                    std::future::pending::<()>().await;
                }
                "/head" => {
                    audit.set_actor("head-actor");
                }
                "/http-with-grpc-status" => status_header = Some("13"),
                _ => {}
            }
            let mut res = Response::builder().status(200);
            if let Some(code) = status_header {
                res = res.header("grpc-status", code);
            }
            Ok::<_, Infallible>(res.body(Full::new(Bytes::from_static(b"body"))).unwrap())
        }
    }));
    let run = async |req: Request<Full<Bytes>>| {
        let res = svc.clone().oneshot(req).await.unwrap();
        read_body(res.into_body()).await.unwrap();
    };

    // A gRPC call with everything captured: request id, user agent, captured header, client address.
    let mut grpc = Request::post("/pkg.Svc/Get")
        .header("content-type", "application/grpc")
        .header("x-request-id", "g-1")
        .header("user-agent", "grpc-ua/1")
        .header("x-tenant", "acme")
        .body(Full::default())
        .unwrap();
    grpc.extensions_mut().insert(ClientAddr("10.1.2.3:4000".parse::<SocketAddr>().unwrap()));
    run(grpc).await;
    run(get("/after-grpc")).await;
    // A custom method (an owned method name).
    run(Request::builder().method(Method::from_bytes(b"PURGE").unwrap()).uri("/purge").body(Full::default()).unwrap())
        .await;
    run(get("/after-purge")).await;
    // A panic, caught by the runtime (the future is dropped after the unwind).
    let joined = tokio::spawn(svc.clone().oneshot(get("/panic"))).await;
    assert!(joined.unwrap_err().is_panic());
    run(get("/after-panic")).await;
    // A request dropped while its handler waits.
    poll_once_then_drop(svc.clone().oneshot(get("/cancelled"))).await;
    assert!(cancelled_ran.load(Ordering::SeqCst));
    run(get("/after-cancel")).await;
    // A HEAD whose body is never polled.
    let res = svc.clone().oneshot(Request::head("/head").body(Full::default()).unwrap()).await.unwrap();
    drop(res);
    run(get("/after-head")).await;
    // An HTTP response carrying a grpc-status header: not a gRPC call, so not read.
    run(get("/http-with-grpc-status")).await;
    run(get("/last")).await;

    let events = drained(&handle, &sink).await;
    let got: Vec<Seen> = events.iter().map(seen).collect();
    let expected = vec![
        Seen {
            kind: kind::GRPC_CALL.into(),
            outcome: Outcome::from_grpc_code(5),
            method: Some("POST".into()),
            route: Some("/pkg.Svc/Get".into()),
            path: Some("/pkg.Svc/Get".into()),
            status: Some(200),
            grpc_status: Some(5),
            request_id: Some("g-1".into()),
            actor: Some("grpc-actor".into()),
            client_addr: Some("10.1.2.3".into()),
            user_agent: Some("grpc-ua/1".into()),
            attributes: attrs(&[("grpc-attr", "1"), ("header.x-tenant", "acme")]),
        },
        plain("/after-grpc"),
        Seen { method: Some("PURGE".into()), ..plain("/purge") },
        plain("/after-purge"),
        Seen {
            outcome: Outcome::Error,
            status: None,
            actor: Some("panic-actor".into()),
            attributes: attrs(&[("panic", "true")]),
            ..plain("/panic")
        },
        plain("/after-panic"),
        Seen {
            outcome: Outcome::Cancelled,
            status: None,
            actor: Some("cancelled-actor".into()),
            attributes: attrs(&[("cancelled-attr", "1")]),
            ..plain("/cancelled")
        },
        plain("/after-cancel"),
        Seen { method: Some("HEAD".into()), actor: Some("head-actor".into()), ..plain("/head") },
        plain("/after-head"),
        plain("/http-with-grpc-status"),
        plain("/last"),
    ];
    assert_eq!(got, expected);
    // Every event's time is its own: in order, none the same as the one before.
    assert!(events.windows(2).all(|w| w[0].time <= w[1].time), "{events:?}");
}

/// Skipped, durable and durable-intent requests between plain ones: the plain ones carry nothing of them, and a
/// skipped request's handler still records events with its own request's fields.
#[tokio::test(flavor = "current_thread")]
async fn skipped_durable_and_intent_requests_leave_nothing_behind() {
    let sink = MemorySink::new();
    let policy = Policy::new()
        .rule(Rule::route("/skip").skip())
        .rule(Rule::route("/durable").durable(LIMIT))
        .rule(Rule::route("/intent").durable_intent(LIMIT));
    let (layer, handle) =
        AuditLayer::builder(sink.clone()).flush_interval(Duration::from_secs(3600)).policy(policy).build().unwrap();
    let svc = layer.layer(service_fn(|req: Request<Full<Bytes>>| async move {
        let path = req.uri().path().to_owned();
        if !path.starts_with("/plain") {
            let audit = AuditContext::current().expect("current in the handler");
            audit.set_actor(format!("actor{path}"));
            audit.set_attribute("set", &path);
            if path == "/skip" {
                assert!(audit.record(AuditEvent::new("skip.custom")));
            }
        }
        answer(200, "ok").await
    }));
    for path in ["/skip", "/plain1", "/durable", "/plain2", "/intent", "/plain3", "/skip", "/plain4"] {
        let req = Request::get(path).header("x-request-id", format!("id{path}")).body(Full::default()).unwrap();
        let res = svc.clone().oneshot(req).await.unwrap();
        assert_eq!(res.status(), 200, "{path}");
        read_body(res.into_body()).await.unwrap();
    }

    let events = drained(&handle, &sink).await;
    let requests: Vec<_> = events
        .iter()
        .filter(|e| e.kind != kind::HTTP_INTENT)
        .map(|e| {
            (
                e.kind.to_string(),
                e.path.clone().unwrap(),
                e.request_id.clone(),
                e.actor.clone(),
                e.attributes.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
            )
        })
        .collect();
    let row = |kind: &str, path: &str, actor: Option<&str>, attributes: &[&str]| {
        (
            kind.to_owned(),
            path.to_owned(),
            Some(format!("id{path}")),
            actor.map(str::to_owned),
            attributes.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>(),
        )
    };
    let intent_id =
        events.iter().find(|e| e.kind == kind::HTTP_INTENT).expect("an intent event").attributes["intent_id"].clone();
    let intent_attr = format!("intent_id={intent_id}");
    assert_eq!(
        requests,
        [
            row("skip.custom", "/skip", Some("actor/skip"), &[]),
            row(kind::HTTP_REQUEST, "/plain1", None, &[]),
            row(kind::HTTP_REQUEST, "/durable", Some("actor/durable"), &["delivery=durable", "set=/durable"]),
            row(kind::HTTP_REQUEST, "/plain2", None, &[]),
            row(
                kind::HTTP_REQUEST,
                "/intent",
                Some("actor/intent"),
                &["delivery=durable_intent", &intent_attr, "set=/intent"]
            ),
            row(kind::HTTP_REQUEST, "/plain3", None, &[]),
            row("skip.custom", "/skip", Some("actor/skip"), &[]),
            row(kind::HTTP_REQUEST, "/plain4", None, &[]),
        ]
    );
}

/// A handler that keeps its context past the response: its state is never handed to a later request, and a
/// late event still inherits its own request's fields, whatever the requests in between set.
#[tokio::test(flavor = "current_thread")]
async fn a_kept_context_is_never_reused_by_later_requests() {
    let (layer, handle, sink) = pipeline();
    let kept: Arc<Mutex<Vec<AuditContext>>> = Arc::default();
    let keep = Arc::clone(&kept);
    let svc = layer.layer(service_fn(move |req: Request<Full<Bytes>>| {
        let keep = Arc::clone(&keep);
        async move {
            let audit = AuditContext::current().unwrap();
            let path = req.uri().path().to_owned();
            audit.set_actor(format!("actor{path}"));
            if path == "/keep" {
                keep.lock().unwrap().push(audit);
            }
            answer(200, "ok").await
        }
    }));
    for path in ["/keep", "/a", "/b", "/c"] {
        let req = Request::get(path).header("x-request-id", format!("id{path}")).body(Full::default()).unwrap();
        let res = svc.clone().oneshot(req).await.unwrap();
        read_body(res.into_body()).await.unwrap();
    }
    let audit = kept.lock().unwrap().pop().unwrap();
    assert!(audit.record(AuditEvent::new("late")));
    audit.set_actor("changed-late");
    assert!(audit.record(AuditEvent::new("later")));
    drop(audit);
    // And the requests after it still get fresh states.
    let res = svc.clone().oneshot(get("/d")).await.unwrap();
    read_body(res.into_body()).await.unwrap();

    let events = drained(&handle, &sink).await;
    let got: Vec<_> = events
        .iter()
        .map(|e| (e.kind.as_ref(), e.path.as_deref(), e.request_id.as_deref(), e.actor.as_deref()))
        .collect();
    assert_eq!(
        got,
        [
            (kind::HTTP_REQUEST, Some("/keep"), Some("id/keep"), Some("actor/keep")),
            (kind::HTTP_REQUEST, Some("/a"), Some("id/a"), Some("actor/a")),
            (kind::HTTP_REQUEST, Some("/b"), Some("id/b"), Some("actor/b")),
            (kind::HTTP_REQUEST, Some("/c"), Some("id/c"), Some("actor/c")),
            ("late", Some("/keep"), Some("id/keep"), Some("actor/keep")),
            ("later", Some("/keep"), Some("id/keep"), Some("changed-late")),
            (kind::HTTP_REQUEST, Some("/d"), None, Some("actor/d")),
        ]
    );
}

/// Two requests through one service, joined on one task: each poll of either makes only its own request
/// current, across many interleaved awaits.
#[tokio::test(flavor = "current_thread")]
async fn two_interleaved_requests_on_one_task_each_find_their_own() {
    let (layer, handle, sink) = pipeline();
    let svc = layer.layer(service_fn(|req: Request<Full<Bytes>>| async move {
        let path = req.uri().path().to_owned();
        for step in 0..5 {
            AuditContext::current().unwrap().set_attribute(format!("step{step}"), &path);
            tokio::task::yield_now().await;
        }
        AuditContext::current().unwrap().set_actor(&path);
        answer(200, "ok").await
    }));
    let one = async {
        let res = svc.clone().oneshot(get("/one")).await.unwrap();
        assert!(AuditContext::current().is_none());
        read_body(res.into_body()).await.unwrap();
    };
    let two = async {
        let res = svc.clone().oneshot(get("/two")).await.unwrap();
        read_body(res.into_body()).await.unwrap();
    };
    tokio::join!(one, two);
    assert!(AuditContext::current().is_none());

    let mut events = drained(&handle, &sink).await;
    events.sort_by(|a, b| a.path.cmp(&b.path));
    for (e, path) in events.iter().zip(["/one", "/two"]) {
        let expected: Vec<(String, String)> = (0..5).map(|s| (format!("step{s}"), path.to_owned())).collect();
        assert_eq!(seen(e), Seen { actor: Some(path.into()), attributes: expected, ..plain(path) });
    }
    assert_eq!(events.len(), 2);
}

/// A handler races two requests through another audited service (the same pipeline) with `select!`: the loser
/// is dropped inside the handler's poll, its state goes back for reuse, and a request made right after takes
/// it; each handler, and the outer one, only ever sees its own request.
#[tokio::test(flavor = "current_thread")]
async fn select_between_two_audited_requests_inside_a_handler() {
    let (layer, handle, sink) = pipeline();
    let inner = layer.layer(service_fn(|req: Request<Full<Bytes>>| async move {
        let path = req.uri().path().to_owned();
        let audit = AuditContext::current().unwrap();
        audit.set_actor(format!("actor{path}"));
        tokio::task::yield_now().await;
        AuditContext::current().unwrap().set_attribute("after_yield", &path);
        if path == "/slow" {
            std::future::pending::<()>().await;
        }
        answer(200, "inner").await
    }));
    let outer = layer.layer(service_fn(move |_req: Request<Full<Bytes>>| {
        let inner = inner.clone();
        async move {
            AuditContext::current().unwrap().set_attribute("before", "outer");
            let winner = tokio::select! {
                biased;
                res = inner.clone().oneshot(get("/slow")) => { read_body(res.unwrap().into_body()).await.unwrap(); "slow" }
                res = inner.clone().oneshot(get("/fast")) => { read_body(res.unwrap().into_body()).await.unwrap(); "fast" }
            };
            AuditContext::current().unwrap().set_attribute("winner", winner);
            // The loser's state is kept by now: this request reuses it.
            let res = inner.clone().oneshot(get("/after")).await.unwrap();
            read_body(res.into_body()).await.unwrap();
            AuditContext::current().unwrap().set_actor("actor/outer");
            answer(200, "outer").await
        }
    }));
    let res = outer.oneshot(get("/outer")).await.unwrap();
    read_body(res.into_body()).await.unwrap();

    let events = drained(&handle, &sink).await;
    let mut got: Vec<Seen> = events.iter().map(seen).collect();
    got.sort_by(|a, b| a.path.cmp(&b.path));
    assert_eq!(
        got,
        [
            Seen {
                actor: Some("actor/after".into()),
                attributes: attrs(&[("after_yield", "/after")]),
                ..plain("/after")
            },
            Seen { actor: Some("actor/fast".into()), attributes: attrs(&[("after_yield", "/fast")]), ..plain("/fast") },
            Seen {
                actor: Some("actor/outer".into()),
                attributes: attrs(&[("before", "outer"), ("winner", "fast")]),
                ..plain("/outer")
            },
            Seen {
                outcome: Outcome::Cancelled,
                status: None,
                actor: Some("actor/slow".into()),
                attributes: attrs(&[("after_yield", "/slow")]),
                ..plain("/slow")
            },
        ]
    );
}

/// A response body that runs a future as it is polled, and reports whether a request was current then.
struct ProbeBody {
    future: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    current_seen: Arc<Mutex<Vec<bool>>>,
}

impl Body for ProbeBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.current_seen.lock().unwrap().push(AuditContext::current().is_some());
        let Some(future) = self.future.as_mut() else { return Poll::Ready(None) };
        std::task::ready!(future.as_mut().poll(cx));
        self.future = None;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"done")))))
    }
}

/// A request polled from inside another request's response body: it is current for its own handler, and once
/// its poll is over nothing is (the body's stream runs outside any request).
#[tokio::test(flavor = "current_thread")]
async fn a_request_polled_inside_a_response_body_finds_its_own_and_leaves_none() {
    let (layer, handle, sink) = pipeline();
    let inner = layer.layer(service_fn(|_req: Request<Full<Bytes>>| async {
        AuditContext::current().unwrap().set_actor("actor/inner");
        tokio::task::yield_now().await;
        AuditContext::current().unwrap().set_attribute("inner", "yes");
        answer(200, "inner").await
    }));
    let seen_in_body: Arc<Mutex<Vec<bool>>> = Arc::default();
    let probe = Arc::clone(&seen_in_body);
    let outer = layer.layer(service_fn(move |_req: Request<Full<Bytes>>| {
        let (inner, probe) = (inner.clone(), Arc::clone(&probe));
        async move {
            AuditContext::current().unwrap().set_actor("actor/outer");
            let future = Box::pin(async move {
                let res = inner.oneshot(get("/inner")).await.unwrap();
                read_body(res.into_body()).await.unwrap();
            });
            Ok::<_, Infallible>(Response::new(ProbeBody { future: Some(future), current_seen: probe }))
        }
    }));
    let res = outer.oneshot(get("/outer")).await.unwrap();
    assert_eq!(read_body(res.into_body()).await.unwrap(), "done");
    assert!(AuditContext::current().is_none());
    let seen_in_body = seen_in_body.lock().unwrap().clone();
    assert!(seen_in_body.len() >= 2 && seen_in_body.iter().all(|found| !found), "{seen_in_body:?}");

    let mut events = drained(&handle, &sink).await;
    events.sort_by(|a, b| a.path.cmp(&b.path));
    assert_eq!(
        events.iter().map(seen).collect::<Vec<_>>(),
        [
            Seen { actor: Some("actor/inner".into()), attributes: attrs(&[("inner", "yes")]), ..plain("/inner") },
            Seen { actor: Some("actor/outer".into()), ..plain("/outer") },
        ]
    );
}

/// The other way round: a handler reads the response body of a request it made through an audited service.
/// That body's stream is not the handler's request, and the documentation says a body's stream finds no
/// current request; it must not find the outer handler's request either (its events would be misattributed).
#[tokio::test(flavor = "current_thread")]
async fn a_response_body_read_inside_another_handler_does_not_find_that_handler_s_request() {
    let (layer, handle, sink) = pipeline();
    let seen_in_body: Arc<Mutex<Vec<bool>>> = Arc::default();
    let probe = Arc::clone(&seen_in_body);
    let inner = layer.layer(service_fn(move |_req: Request<Full<Bytes>>| {
        let probe = Arc::clone(&probe);
        async move {
            let future: Pin<Box<dyn Future<Output = ()> + Send>> = Box::pin(async {});
            Ok::<_, Infallible>(Response::new(ProbeBody { future: Some(future), current_seen: probe }))
        }
    }));
    let outer = layer.layer(service_fn(move |_req: Request<Full<Bytes>>| {
        let inner = inner.clone();
        async move {
            let res = inner.oneshot(get("/inner")).await.unwrap();
            read_body(res.into_body()).await.unwrap();
            answer(200, "outer").await
        }
    }));
    let res = outer.oneshot(get("/outer")).await.unwrap();
    read_body(res.into_body()).await.unwrap();
    let seen_in_body = seen_in_body.lock().unwrap().clone();
    assert!(!seen_in_body.is_empty() && seen_in_body.iter().all(|found| !found), "{seen_in_body:?}");
    assert_eq!(drained(&handle, &sink).await.len(), 2);
}

/// The request id header may be any recordable header, the user agent or the content type included: the one
/// pass over the headers must still find it.
#[tokio::test(flavor = "current_thread")]
async fn a_request_id_header_that_is_also_a_header_the_layer_reads_is_still_found() {
    for (id_header, value) in [("user-agent", "agent/7"), ("content-type", "text/plain")] {
        let sink = MemorySink::new();
        let (layer, handle) = AuditLayer::builder(sink.clone())
            .flush_interval(Duration::from_secs(3600))
            .request_id_header(id_header)
            .build()
            .unwrap();
        let svc = layer.layer(service_fn(|_req: Request<Full<Bytes>>| answer(200, "ok")));
        let req = Request::get("/x").header(id_header, value).body(Full::default()).unwrap();
        let res = svc.oneshot(req).await.unwrap();
        read_body(res.into_body()).await.unwrap();
        let events = drained(&handle, &sink).await;
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].request_id.as_deref(), Some(value), "request id read from {id_header}");
        if id_header == "user-agent" {
            assert_eq!(events[0].user_agent.as_deref(), Some(value));
        }
    }
}

/// After skipped requests, a context kept past its response and then dropped, a cancelled request and a
/// panic, dropping every layer, service and handle still ends the worker, with every event written.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn the_worker_ends_after_every_way_a_request_can_end() {
    let memory = MemorySink::new();
    let (sink, rx) = DropSignal::new(memory.clone());
    let (layer, handle) = AuditLayer::builder(sink)
        .flush_interval(Duration::from_secs(5))
        .policy(Policy::new().rule(Rule::route("/skip").skip()))
        .build()
        .unwrap();
    let kept: Arc<Mutex<Option<AuditContext>>> = Arc::default();
    let keep = Arc::clone(&kept);
    let svc = layer.layer(service_fn(move |req: Request<Full<Bytes>>| {
        let keep = Arc::clone(&keep);
        async move {
            match req.uri().path() {
                "/keep" => *keep.lock().unwrap() = AuditContext::current(),
                "/wait" => std::future::pending::<()>().await,
                "/panic" => panic!("handler bug"),
                _ => {}
            }
            answer(200, "ok").await
        }
    }));
    for path in ["/skip", "/keep", "/plain", "/skip"] {
        let res = svc.clone().oneshot(get(path)).await.unwrap();
        read_body(res.into_body()).await.unwrap();
    }
    poll_once_then_drop(svc.clone().oneshot(get("/wait"))).await;
    assert!(tokio::spawn(svc.clone().oneshot(get("/panic"))).await.unwrap_err().is_panic());
    let stats = handle.stats();
    drop((layer, svc, handle));
    // The kept context still holds its pipeline: dropping it is what lets the worker end.
    drop(kept.lock().unwrap().take().expect("kept"));
    tokio::time::timeout(LIMIT, rx).await.expect("worker did not end").unwrap();
    assert_eq!(stats.skipped, 2);
    let paths: Vec<_> = ended_cleanly(memory.events()).iter().map(|e| e.path.clone().unwrap()).collect();
    assert_eq!(paths, ["/keep", "/plain", "/wait", "/panic"]);
}

/// Many requests, some keeping their context for a while, some cancelled, interleaved on one task: exactly one
/// event per request, each with its own request id, and the stats add up.
#[tokio::test(flavor = "current_thread")]
async fn many_interleaved_requests_each_have_exactly_one_event_with_their_own_fields() {
    let (layer, handle, sink) = pipeline();
    let held: Arc<Mutex<Vec<AuditContext>>> = Arc::default();
    let hold = Arc::clone(&held);
    let svc = layer.layer(service_fn(move |req: Request<Full<Bytes>>| {
        let hold = Arc::clone(&hold);
        async move {
            let id = req.headers()["x-request-id"].to_str().unwrap().to_owned();
            let n: usize = id.parse().unwrap();
            let audit = AuditContext::current().unwrap();
            audit.set_actor(format!("actor-{id}"));
            for _ in 0..(n % 4) {
                tokio::task::yield_now().await;
            }
            AuditContext::current().unwrap().set_attribute("n", &id);
            if n.is_multiple_of(5) {
                hold.lock().unwrap().push(audit);
            }
            if n % 7 == 3 {
                std::future::pending::<()>().await;
            }
            answer(200, "ok").await
        }
    }));
    let mut requests = Vec::new();
    for n in 0..60usize {
        let svc = svc.clone();
        requests.push(async move {
            let req = Request::get(format!("/r/{n}")).header("x-request-id", n.to_string()).body(Full::default());
            let call = svc.oneshot(req.unwrap());
            if n % 7 == 3 {
                // Given up on after one poll.
                poll_once_then_drop(call).await;
            } else {
                let res = call.await.unwrap();
                read_body(res.into_body()).await.unwrap();
            }
        });
        if requests.len() == 6 {
            let batch: Vec<_> = std::mem::take(&mut requests);
            join_all(batch).await;
            held.lock().unwrap().clear();
        }
    }
    join_all(requests).await;
    held.lock().unwrap().clear();

    let events = drained(&handle, &sink).await;
    assert_eq!(events.len(), 60);
    let mut ns: Vec<usize> = events.iter().map(|e| e.request_id.as_deref().unwrap().parse().unwrap()).collect();
    ns.sort_unstable();
    assert_eq!(ns, (0..60).collect::<Vec<_>>());
    for e in &events {
        let id = e.request_id.as_deref().unwrap();
        let n: usize = id.parse().unwrap();
        assert_eq!(e.path.as_deref(), Some(format!("/r/{n}").as_str()));
        assert_eq!(e.actor.as_deref(), Some(format!("actor-{id}").as_str()));
        let expected_n = if n % 7 == 3 && !n.is_multiple_of(4) { None } else { Some(id) };
        assert_eq!(e.attributes.get("n").map(String::as_str), expected_n, "{e:?}");
        assert_eq!(e.outcome, if n % 7 == 3 { Outcome::Cancelled } else { Outcome::Success });
        assert_eq!(e.attributes.len(), usize::from(expected_n.is_some()), "{e:?}");
    }
}

/// Polls the futures together on this task until all are done.
async fn join_all<F: Future<Output = ()>>(futures: Vec<F>) {
    let mut futures: Vec<Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    std::future::poll_fn(|cx| {
        futures.retain_mut(|f| f.as_mut().poll(cx).is_pending());
        if futures.is_empty() { Poll::Ready(()) } else { Poll::Pending }
    })
    .await;
}

#[cfg(feature = "sqlite")]
mod sqlite {
    use super::*;
    use tower_audit::SqliteSink;
    use uuid::Uuid;

    async fn sink(dir: &tempfile::TempDir) -> (SqliteSink, sqlx::SqlitePool) {
        let path = dir.path().join("audit.db");
        let sink = SqliteSink::connect(path.to_str().unwrap()).await.unwrap();
        sink.ensure_schema().await.unwrap();
        let reader = sqlx::SqlitePool::connect(&format!("sqlite://{}", path.display())).await.unwrap();
        (sink, reader)
    }

    fn event(boot: Uuid, seq: u64, name: &str) -> AuditEvent {
        let mut e = AuditEvent::new("review").attribute("name", name);
        e.id = Uuid::now_v7();
        e.boot = Some(boot);
        e.seq = seq;
        e
    }

    async fn names(reader: &sqlx::SqlitePool) -> Vec<String> {
        sqlx::query_scalar("SELECT json_extract(attributes, '$.name') FROM audit_events ORDER BY seq, id")
            .fetch_all(reader)
            .await
            .unwrap()
    }

    /// A small batch (one statement, no explicit transaction) that breaks the `(boot, seq)` index in its last
    /// row: the batch fails and none of its rows is written; retried as it was, whole batches and duplicate ids
    /// in one batch are written once.
    #[tokio::test]
    async fn a_one_statement_batch_is_written_whole_or_not_at_all_and_once() {
        let dir = tempfile::tempdir().unwrap();
        let (sqlite, reader) = sink(&dir).await;
        let boot = Uuid::now_v7();
        let first = vec![event(boot, 1, "a"), event(boot, 2, "b")];
        sqlite.write_batch(&first).await.unwrap();

        let bad = vec![event(boot, 3, "c"), event(boot, 4, "d"), event(boot, 2, "clash")];
        assert!(sqlite.write_batch(&bad).await.is_err(), "a (boot, seq) clash fails the batch");
        assert_eq!(names(&reader).await, ["a", "b"], "nothing of the failed batch is written");

        // Retries: the first batch again, and a batch with the same event twice, then again.
        sqlite.write_batch(&first).await.unwrap();
        let twice = event(boot, 3, "c");
        let dup = vec![twice.clone(), twice.clone(), event(boot, 4, "d")];
        sqlite.write_batch(&dup).await.unwrap();
        sqlite.write_batch(&dup).await.unwrap();
        assert_eq!(names(&reader).await, ["a", "b", "c", "d"]);

        // A batch whose clash is with an earlier row of the same batch.
        let inner_clash = vec![event(boot, 5, "e"), event(boot, 5, "e-clash")];
        assert!(sqlite.write_batch(&inner_clash).await.is_err());
        assert_eq!(names(&reader).await, ["a", "b", "c", "d"]);
    }
}

/// A service that does its work in `call` (a custom `Service`, or the synchronous part of a `service_fn`), behind
/// a layer whose request is made inside another audited request's handler: in `call` it must not find the
/// outer handler's request (the thread-local is documented as the request "whose inner service is being called
/// or polled").
#[tokio::test(flavor = "current_thread")]
async fn a_service_s_call_made_inside_another_handler_does_not_find_that_handler_s_request() {
    let (layer, handle, sink) = pipeline();
    let inner = layer.layer(service_fn(|req: Request<Full<Bytes>>| {
        // Synchronous, in `call`: the work is moved to a task with the context found here.
        let audit = AuditContext::current();
        let path = req.uri().path().to_owned();
        async move {
            if let Some(audit) = audit {
                audit.set_attribute("found_in_call", path);
            }
            answer(200, "inner").await
        }
    }));
    let outer = layer.layer(service_fn(move |_req: Request<Full<Bytes>>| {
        let inner = inner.clone();
        async move {
            let res = inner.oneshot(get("/inner")).await.unwrap();
            read_body(res.into_body()).await.unwrap();
            answer(200, "outer").await
        }
    }));
    let res = outer.oneshot(get("/outer")).await.unwrap();
    read_body(res.into_body()).await.unwrap();

    let mut events = drained(&handle, &sink).await;
    events.sort_by(|a, b| a.path.cmp(&b.path));
    let found: Vec<_> =
        events.iter().map(|e| (e.path.clone().unwrap(), e.attributes.get("found_in_call").cloned())).collect();
    // The outer request got nothing from the inner service's call; the inner one, if anything, its own.
    assert_eq!(found[1], ("/outer".to_owned(), None), "{found:?}");
    assert!(matches!(found[0].1.as_deref(), None | Some("/inner")), "{found:?}");
}
