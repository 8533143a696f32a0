//! The layer inside a real Axum server, over a real loopback socket, with a real HTTP client.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::extract::Path;
use axum::routing::get;
use tower_audit::{AuditContext, AuditEvent, AuditHandle, AuditLayer, ClientAddrSource, MemorySink, Outcome};

const LIMIT: Duration = Duration::from_secs(10);

async fn user(Path(id): Path<u32>, audit: AuditContext) -> String {
    audit.set_actor(format!("user-{id}"));
    if id == 0 {
        audit.record(AuditEvent::new("user.lookup_denied").outcome(Outcome::Denied));
    }
    format!("user {id}")
}

async fn serve(layer: AuditLayer) -> SocketAddr {
    let app = Router::new().route("/users/{id}", get(user)).layer(layer);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>()).await.unwrap();
    });
    addr
}

/// Shuts the pipeline down and returns what it wrote between its boot and shutdown events.
async fn events_after(handle: &AuditHandle, sink: &MemorySink) -> Vec<AuditEvent> {
    assert!(handle.shutdown(LIMIT).await.drained);
    common::ended_cleanly(sink.events())
}

#[tokio::test]
async fn router_layer_records_route_template_client_address_and_actor() {
    let sink = MemorySink::new();
    let (layer, handle) = AuditLayer::builder(sink.clone()).build().unwrap();
    let addr = serve(layer).await;
    let client = reqwest::Client::new();

    let res = client
        .get(format!("http://{addr}/users/7?access_token=SECRET"))
        .header("x-forwarded-for", "203.0.113.66")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.text().await.unwrap(), "user 7");
    let res = client.get(format!("http://{addr}/users/0")).send().await.unwrap();
    assert_eq!(res.text().await.unwrap(), "user 0");
    let res = client.get(format!("http://{addr}/nowhere")).send().await.unwrap();
    assert_eq!(res.status(), 404);

    let events = events_after(&handle, &sink).await;
    let summary: Vec<_> = events
        .iter()
        .map(|e| (e.kind.as_ref(), e.route.as_deref(), e.path.as_deref(), e.status, e.actor.as_deref()))
        .collect();
    assert_eq!(
        summary,
        [
            ("http.request", Some("/users/{id}"), Some("/users/7?access_token=REDACTED"), Some(200), Some("user-7")),
            ("user.lookup_denied", Some("/users/{id}"), Some("/users/0"), None, Some("user-0")),
            ("http.request", Some("/users/{id}"), Some("/users/0"), Some(200), Some("user-0")),
            ("http.request", None, Some("/nowhere"), Some(404), None),
        ]
    );
    let localhost: std::net::IpAddr = "127.0.0.1".parse().unwrap();
    assert!(events.iter().all(|e| e.client_addr == Some(localhost)), "X-Forwarded-For is not believed by default");
    assert_eq!(events[3].outcome, Outcome::ClientError);
}

/// A server whose only trusted proxy is the loopback client, reading `X-Forwarded-For`.
async fn behind_trusted_xff_proxy() -> (SocketAddr, AuditHandle, MemorySink) {
    let sink = MemorySink::new();
    let (layer, handle) = AuditLayer::builder(sink.clone())
        .client_addr_source(ClientAddrSource::XForwardedFor)
        .trusted_proxies(["127.0.0.1/32"])
        .build()
        .unwrap();
    (serve(layer).await, handle, sink)
}

#[tokio::test]
async fn forwarded_address_is_believed_only_from_a_trusted_proxy() {
    let (addr, handle, sink) = behind_trusted_xff_proxy().await;
    let res = reqwest::Client::new()
        .get(format!("http://{addr}/users/1"))
        .header("x-forwarded-for", "198.51.100.23, 127.0.0.1")
        .send()
        .await
        .unwrap();
    assert_eq!(res.text().await.unwrap(), "user 1");
    let events = events_after(&handle, &sink).await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].client_addr, Some("198.51.100.23".parse().unwrap()));
}

/// The loopback client plays the trusted proxy: it sets the forwarding headers a real proxy would pass on.
#[tokio::test]
async fn forged_forwarded_header_is_ignored_when_the_source_is_x_forwarded_for() {
    let (addr, handle, sink) = behind_trusted_xff_proxy().await;
    let client = reqwest::Client::new();
    // The client forged `Forwarded`; the proxy appended the address it saw to `X-Forwarded-For`.
    let res = client
        .get(format!("http://{addr}/users/1"))
        .header("forwarded", "for=6.6.6.6")
        .header("x-forwarded-for", "198.51.100.23")
        .send()
        .await
        .unwrap();
    assert_eq!(res.text().await.unwrap(), "user 1");
    // A forged `Forwarded` alone: the trusted peer is recorded, never the forgery.
    let res = client.get(format!("http://{addr}/users/2")).header("forwarded", "for=6.6.6.6").send().await.unwrap();
    assert_eq!(res.text().await.unwrap(), "user 2");

    let events = events_after(&handle, &sink).await;
    let addrs: Vec<_> = events.iter().map(|e| (e.actor.as_deref(), e.client_addr)).collect();
    assert_eq!(
        addrs,
        [
            (Some("user-1"), Some("198.51.100.23".parse().unwrap())),
            (Some("user-2"), Some("127.0.0.1".parse().unwrap())),
        ]
    );
}

#[tokio::test]
async fn single_value_header_set_by_the_proxy_is_the_only_one_read() {
    let sink = MemorySink::new();
    let (layer, handle) = AuditLayer::builder(sink.clone())
        .client_addr_source(ClientAddrSource::Header(http::HeaderName::from_static("x-real-ip")))
        .trusted_proxies(["127.0.0.1"])
        .build()
        .unwrap();
    let addr = serve(layer).await;
    let res = reqwest::Client::new()
        .get(format!("http://{addr}/users/3"))
        .header("forwarded", "for=6.6.6.6")
        .header("x-forwarded-for", "6.6.6.7")
        .header("x-real-ip", "203.0.113.9")
        .send()
        .await
        .unwrap();
    assert_eq!(res.text().await.unwrap(), "user 3");
    let events = events_after(&handle, &sink).await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].client_addr, Some("203.0.113.9".parse().unwrap()));
}

#[tokio::test]
async fn missing_layer_gives_a_clear_extractor_error() {
    let app: Router = Router::new().route("/users/{id}", get(user));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let res = reqwest::get(format!("http://{addr}/users/1")).await.unwrap();
    assert_eq!(res.status(), 500);
    assert_eq!(
        res.text().await.unwrap(),
        "AuditContext is missing: add tower_audit::AuditLayer to this route (Router::layer), or turn on \
         context_in_extensions when the handler runs on another task"
    );
}

#[tokio::test]
async fn client_that_hangs_up_mid_stream_is_recorded_once_as_cancelled() {
    use axum::body::Body;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let sink = MemorySink::new();
    let (layer, handle) = AuditLayer::builder(sink.clone()).build().unwrap();
    let (started_tx, started_rx) = tokio::sync::oneshot::channel::<()>();
    let started_tx = std::sync::Arc::new(std::sync::Mutex::new(Some(started_tx)));
    let app = Router::new()
        .route(
            "/stream",
            get(move || {
                let started = started_tx.lock().unwrap().take();
                async move {
                    // One chunk, then a body that never ends.
                    let (tx, rx) = tokio::sync::mpsc::channel::<Result<axum::body::Bytes, std::io::Error>>(1);
                    tx.send(Ok(axum::body::Bytes::from_static(b"chunk"))).await.unwrap();
                    if let Some(started) = started {
                        let _ = started.send(());
                    }
                    tokio::spawn(async move {
                        tx.closed().await;
                    });
                    Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
                }
            }),
        )
        .layer(layer);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    socket.write_all(b"GET /stream HTTP/1.1\r\nhost: test\r\n\r\n").await.unwrap();
    started_rx.await.unwrap();
    let mut buf = [0u8; 256];
    let n = socket.read(&mut buf).await.unwrap();
    assert!(std::str::from_utf8(&buf[..n]).unwrap().starts_with("HTTP/1.1 200 OK"));
    drop(socket);

    // The server notices the hang-up on its own time; wait (bounded) until it has dropped the body.
    common::eventually(LIMIT, || handle.stats().accepted == 1).await;
    let events = events_after(&handle, &sink).await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].outcome, Outcome::Cancelled);
    assert_eq!(events[0].status, Some(200));
}
