//! Tonic services audited with their real gRPC status, over a real loopback socket with a real Tonic client.
#![cfg(feature = "tonic")]

mod common;
#[path = "../examples/grpc_server/kv.rs"]
mod kv;

use std::net::SocketAddr;
use std::time::Duration;

use kv::pb::key_value_client::KeyValueClient;
use kv::pb::{GetRequest, PutRequest, WatchRequest};
use tokio_stream::StreamExt;
use tonic::Code;
use tower_audit::{AuditEvent, AuditHandle, AuditLayer, MemorySink, Outcome, Policy, Rule, kind};

const LIMIT: Duration = Duration::from_secs(30);
const TOKEN: &str = "secret-token";

async fn start() -> (KeyValueClient<tonic::transport::Channel>, AuditHandle, MemorySink) {
    let sink = MemorySink::new();
    let (layer, handle) = AuditLayer::builder(sink.clone()).build().unwrap();
    (serve(layer).await, handle, sink)
}

async fn serve(layer: AuditLayer) -> KeyValueClient<tonic::transport::Channel> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    tokio::spawn(kv::serve(listener, kv::Kv::new(TOKEN), layer, std::future::pending()));
    KeyValueClient::connect(kv::local(addr)).await.unwrap()
}

/// Put durable, Get sampled one in two: rules by gRPC method.
fn policy(timeout: Duration) -> Policy {
    Policy::new()
        .rule(Rule::route("/kv.v1.KeyValue/Put").durable(timeout))
        .rule(Rule::route("/kv.v1.KeyValue/Get").sample(2))
}

fn authorized<T>(message: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    req.metadata_mut().insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    req
}

/// Shuts the pipeline down and returns what it wrote between its boot and shutdown events.
async fn events(handle: &AuditHandle, sink: &MemorySink) -> Vec<AuditEvent> {
    assert!(handle.shutdown(LIMIT).await.drained);
    common::ended_cleanly(sink.events())
}

/// (kind, route, HTTP status, gRPC status, outcome, actor)
type Summary = (String, Option<String>, Option<u16>, Option<i32>, Outcome, Option<String>);

fn summary(events: &[AuditEvent]) -> Vec<Summary> {
    events
        .iter()
        .map(|e| (e.kind.to_string(), e.route.clone(), e.status, e.grpc_status, e.outcome, e.actor.clone()))
        .collect()
}

fn call(method: &str, grpc: i32, outcome: Outcome, actor: Option<&str>) -> Summary {
    (
        kind::GRPC_CALL.to_owned(),
        Some(format!("/kv.v1.KeyValue/{method}")),
        Some(200),
        Some(grpc),
        outcome,
        actor.map(str::to_owned),
    )
}

#[tokio::test]
async fn unary_calls_are_recorded_with_their_grpc_status() {
    let (mut client, handle, sink) = start().await;
    let reply = client.put(authorized(PutRequest { key: "colour".into(), value: "teal".into() })).await.unwrap();
    assert!(reply.get_ref().created);
    let reply = client.get(GetRequest { key: "colour".into() }).await.unwrap();
    assert_eq!(reply.get_ref().value, "teal");

    let err = client.get(GetRequest { key: "missing".into() }).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = client.put(PutRequest { key: "colour".into(), value: "red".into() }).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let err = client.put(authorized(PutRequest { key: String::new(), value: "x".into() })).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    let events = events(&handle, &sink).await;
    assert_eq!(
        summary(&events),
        [
            call("Put", 0, Outcome::Success, Some("admin")),
            call("Get", 0, Outcome::Success, None),
            call("Get", 5, Outcome::ClientError, None),
            ("kv.write_denied".to_owned(), Some("/kv.v1.KeyValue/Put".to_owned()), None, None, Outcome::Denied, None),
            call("Put", 16, Outcome::Denied, None),
            call("Put", 3, Outcome::ClientError, None),
        ]
    );
    assert_eq!(events[0].attributes["key"], "colour");
    assert_eq!(events[0].method.as_deref(), Some("POST"));
    assert_eq!(events[0].path.as_deref(), Some("/kv.v1.KeyValue/Put"));
    let localhost: std::net::IpAddr = "127.0.0.1".parse().unwrap();
    assert!(events.iter().all(|e| e.client_addr == Some(localhost)), "client address from TcpConnectInfo");
}

#[tokio::test]
async fn a_server_stream_is_timed_to_its_end() {
    let (mut client, handle, sink) = start().await;
    const INTERVAL_MS: u32 = 25;
    let mut stream =
        client.watch(WatchRequest { key: "k".into(), count: 5, interval_ms: INTERVAL_MS }).await.unwrap().into_inner();
    let mut received = Vec::new();
    while let Some(item) = stream.next().await {
        received.push(item.unwrap().n);
    }
    assert_eq!(received, [1, 2, 3, 4, 5]);

    let events = events(&handle, &sink).await;
    assert_eq!(summary(&events), [call("Watch", 0, Outcome::Success, None)]);
    // The first value goes out at once, the other four `INTERVAL_MS` apart: the event covers the whole stream.
    let latency = events[0].latency_us.unwrap();
    assert!(latency >= 4 * u64::from(INTERVAL_MS) * 1000, "latency {latency} µs covers the stream");
}

#[tokio::test]
async fn a_stream_the_client_cancels_is_recorded_once_as_cancelled() {
    let (mut client, handle, sink) = start().await;
    let mut stream =
        client.watch(WatchRequest { key: "k".into(), count: 0, interval_ms: 5 }).await.unwrap().into_inner();
    for expected in 1..=3 {
        assert_eq!(stream.next().await.unwrap().unwrap().n, expected);
    }
    drop(stream);
    // The server learns of the reset on its own time; wait (bounded) until the response body is dropped.
    common::eventually(LIMIT, || handle.stats().accepted == 1).await;

    let events = events(&handle, &sink).await;
    assert_eq!(
        summary(&events),
        [(
            kind::GRPC_CALL.to_owned(),
            Some("/kv.v1.KeyValue/Watch".to_owned()),
            Some(200),
            None,
            Outcome::Cancelled,
            None
        )]
    );
}

#[tokio::test]
async fn a_policy_decides_per_grpc_method() {
    let sink = MemorySink::new();
    let (layer, handle) = AuditLayer::builder(sink.clone()).policy(policy(LIMIT)).build().unwrap();
    let mut client = serve(layer).await;
    let reply = client.put(authorized(PutRequest { key: "colour".into(), value: "teal".into() })).await.unwrap();
    assert!(reply.get_ref().created);
    for _ in 0..4 {
        assert_eq!(client.get(GetRequest { key: "colour".into() }).await.unwrap().get_ref().value, "teal");
    }
    let events = events(&handle, &sink).await;
    // The durable Put is completed at its response head: Tonic sends the gRPC status in the trailers, which come
    // after it, so the event has none (the README says so); the sampled Gets have theirs.
    assert_eq!(
        summary(&events),
        [
            call("Put", 0, Outcome::Success, Some("admin")),
            call("Get", 0, Outcome::Success, None),
            call("Get", 0, Outcome::Success, None)
        ]
        .map(|mut c| {
            if c.1.as_deref() == Some("/kv.v1.KeyValue/Put") {
                c.3 = None;
            }
            c
        })
    );
    assert_eq!(events[0].attributes["delivery"], "durable");
    let stats = handle.stats();
    assert_eq!((stats.durable_confirmed, stats.sampled_out, stats.written), (1, 2, 3));
}

#[tokio::test]
async fn a_durable_grpc_method_is_unavailable_while_the_sink_is_frozen() {
    let timeout = Duration::from_millis(300);
    let (layer, handle) = AuditLayer::builder(common::StalledSink::default()).policy(policy(timeout)).build().unwrap();
    let mut client = serve(layer).await;
    let started = std::time::Instant::now();
    let err = client.put(authorized(PutRequest { key: "k".into(), value: "v".into() })).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(started.elapsed() < timeout + Duration::from_secs(2), "{:?}", started.elapsed());
    // The handler ran (the value is there), and a best-effort method answers meanwhile.
    assert_eq!(client.get(GetRequest { key: "k".into() }).await.unwrap().get_ref().value, "v");
    assert_eq!(handle.stats().durable_withheld, 1);
}
