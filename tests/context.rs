//! `AuditContext::current`: the request being polled is current on its thread, and only while it is polled;
//! layers nest; a context kept past the response still reaches its event; `context_in_extensions` serves a
//! handler on another task.

mod common;

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::Full;
use tower::{Layer, ServiceExt, service_fn};
use tower_audit::{AuditContext, AuditEvent, AuditLayer, MemorySink, kind};

#[tokio::test]
async fn only_the_handler_of_a_request_finds_it_current() {
    let (layer, handle, sink) = pipeline();
    assert!(AuditContext::current().is_none(), "outside any request");
    let svc = layer.layer(service_fn(|_req: Request<Full<Bytes>>| async {
        let audit = AuditContext::current().expect("the handler's request is current");
        audit.set_actor("alice");
        // A task the handler spawns runs outside the request's poll: the context is moved there, not found.
        let spawned = tokio::spawn(async { AuditContext::current().is_none() }).await.unwrap();
        // Across an await the request is current again (each poll makes it so).
        tokio::task::yield_now().await;
        let again = AuditContext::current().expect("current after an await");
        again.set_attribute("spawned_found_none", spawned.to_string());
        answer(200, "ok").await
    }));
    let res = svc.oneshot(get("/me")).await.unwrap();
    assert!(AuditContext::current().is_none(), "between polls nothing is current");
    read_body(res.into_body()).await.unwrap();
    assert!(AuditContext::current().is_none(), "after the response");

    let events = drained(&handle, &sink).await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].actor.as_deref(), Some("alice"));
    assert_eq!(events[0].attributes["spawned_found_none"], "true");
}

#[tokio::test]
async fn nested_layers_each_give_their_handler_their_own_request() {
    let (outer_layer, outer_handle, outer_sink) = pipeline();
    let (inner_layer, inner_handle, inner_sink) = pipeline();
    let inner = inner_layer.layer(service_fn(|_req: Request<Full<Bytes>>| async {
        AuditContext::current().unwrap().set_actor("inner");
        answer(200, "inner").await
    }));
    let svc = outer_layer.layer(service_fn(move |_req: Request<Full<Bytes>>| {
        let inner = inner.clone();
        async move {
            AuditContext::current().unwrap().set_attribute("before", "yes");
            // A request through another layer, polled inside this one's poll.
            let res = inner.oneshot(get("/inner")).await.unwrap();
            read_body(res.into_body()).await.unwrap();
            // This request is current again once the inner one's poll is over.
            AuditContext::current().unwrap().set_actor("outer");
            answer(200, "outer").await
        }
    }));
    let res = svc.oneshot(get("/outer")).await.unwrap();
    read_body(res.into_body()).await.unwrap();

    let outer = drained(&outer_handle, &outer_sink).await;
    let inner = drained(&inner_handle, &inner_sink).await;
    let summary = |e: &AuditEvent| (e.path.clone().unwrap(), e.actor.clone(), e.attributes.get("before").cloned());
    assert_eq!(
        outer.iter().map(summary).collect::<Vec<_>>(),
        [("/outer".into(), Some("outer".into()), Some("yes".into()))]
    );
    assert_eq!(inner.iter().map(summary).collect::<Vec<_>>(), [("/inner".into(), Some("inner".into()), None)]);
}

#[tokio::test]
async fn a_context_kept_past_the_response_still_gives_its_event_every_field() {
    let (layer, handle, sink) = pipeline();
    let kept: Arc<Mutex<Option<AuditContext>>> = Arc::default();
    let keep = Arc::clone(&kept);
    let svc = layer.layer(service_fn(move |_req: Request<Full<Bytes>>| {
        let keep = Arc::clone(&keep);
        async move {
            let audit = AuditContext::current().unwrap();
            audit.set_actor("bob");
            audit.set_attribute("tenant", "acme");
            *keep.lock().unwrap() = Some(audit);
            answer(200, "ok").await
        }
    }));
    let req = Request::get("/orders/7").header("x-request-id", "r-9").body(Full::default()).unwrap();
    let res = svc.oneshot(req).await.unwrap();
    read_body(res.into_body()).await.unwrap();
    // Still held: the request's event copied what it needed. A late event still inherits the request's fields.
    let audit = kept.lock().unwrap().take().unwrap();
    assert!(audit.record(AuditEvent::new("export.finished")));
    drop(audit);

    let events = drained(&handle, &sink).await;
    let seen: Vec<_> = events
        .iter()
        .map(|e| (e.kind.as_ref(), e.path.as_deref(), e.request_id.as_deref(), e.actor.as_deref()))
        .collect();
    assert_eq!(
        seen,
        [
            (kind::HTTP_REQUEST, Some("/orders/7"), Some("r-9"), Some("bob")),
            ("export.finished", Some("/orders/7"), Some("r-9"), Some("bob")),
        ]
    );
    assert_eq!(events[0].attributes["tenant"], "acme");
}

#[tokio::test]
async fn a_panic_in_the_handler_leaves_nothing_current() {
    let (layer, handle, sink) = pipeline();
    let svc = layer.layer(service_fn(|_req: Request<Full<Bytes>>| async {
        AuditContext::current().unwrap().set_actor("carol");
        panic!("handler bug");
        #[allow(unreachable_code)]
        answer(200, "never").await
    }));
    // Polled on this thread (a current-thread runtime), so the unwind passes through the layer here.
    let joined = tokio::spawn(svc.oneshot(get("/boom"))).await;
    assert!(joined.unwrap_err().is_panic());
    assert!(AuditContext::current().is_none(), "the unwind put the outer state back");

    let events = drained(&handle, &sink).await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].actor.as_deref(), Some("carol"));
    assert_eq!(events[0].attributes["panic"], "true");
}

/// A service that runs its handler on a task of its own: the handler finds no current request; with
/// `context_in_extensions` it reads the context from the request.
#[tokio::test]
async fn a_handler_on_another_task_reads_the_context_from_the_extensions_when_asked() {
    for in_extensions in [false, true] {
        let sink = MemorySink::new();
        let (layer, handle) = AuditLayer::builder(sink.clone()).context_in_extensions(in_extensions).build().unwrap();
        let handler = |req: Request<Full<Bytes>>| async move {
            let current = AuditContext::current().is_some();
            let audit = req.extensions().get::<AuditContext>().cloned();
            if let Some(audit) = &audit {
                audit.set_actor("dave");
            }
            Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from(format!("{current} {}", audit.is_some())))))
        };
        let svc = layer.layer(service_fn(move |req| async move { tokio::spawn(handler(req)).await.unwrap() }));
        let res = svc.oneshot(get("/buffered")).await.unwrap();
        let body = read_body(res.into_body()).await.unwrap();
        assert_eq!(body, format!("false {in_extensions}"));

        let events = drained(&handle, &sink).await;
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].actor.as_deref(), in_extensions.then_some("dave"));
    }
}

/// A finished request's state is reused by the next one: nothing the first handler set reaches the second
/// request's event.
#[tokio::test]
async fn a_reused_state_carries_nothing_over() {
    let (layer, handle, sink) = pipeline();
    let svc = layer.layer(service_fn(|req: Request<Full<Bytes>>| async move {
        if req.uri().path() == "/first" {
            let audit = AuditContext::current().unwrap();
            audit.set_actor("erin");
            audit.set_attribute("tenant", "acme");
        }
        answer(200, "ok").await
    }));
    for (path, id) in [("/first", Some("r-1")), ("/second", None), ("/third", Some("r-3"))] {
        let mut req = Request::get(path);
        if let Some(id) = id {
            req = req.header("x-request-id", id).header("user-agent", "probe/1");
        }
        let res = svc.clone().oneshot(req.body(Full::default()).unwrap()).await.unwrap();
        read_body(res.into_body()).await.unwrap();
    }

    let events = drained(&handle, &sink).await;
    let seen: Vec<_> = events
        .iter()
        .map(|e| {
            (
                e.path.as_deref(),
                e.request_id.as_deref(),
                e.user_agent.as_deref(),
                e.actor.as_deref(),
                e.attributes.len(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            (Some("/first"), Some("r-1"), Some("probe/1"), Some("erin"), 1),
            (Some("/second"), None, None, None, 0),
            (Some("/third"), Some("r-3"), Some("probe/1"), None, 0),
        ]
    );
}
