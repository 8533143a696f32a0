//! Shared by the benchmarks (each uses some of it).
#![allow(dead_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tower_audit::{AuditEvent, AuditSink, SinkError};

/// Counts the events it is given and discards them: the pipeline's cost without any sink's.
#[derive(Clone, Default)]
pub(crate) struct NullSink(pub(crate) Arc<AtomicU64>);

impl NullSink {
    pub(crate) fn count(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

impl AuditSink for NullSink {
    async fn write_batch(&self, batch: &[AuditEvent]) -> Result<(), SinkError> {
        self.0.fetch_add(batch.len() as u64, Ordering::Relaxed);
        Ok(())
    }
}

/// A typical request event, as the layer fills it for an authenticated HTTP request (about 450 bytes of JSON
/// without integrity); its id, seq and identity are left to the bench.
pub(crate) fn request_event() -> AuditEvent {
    let mut e = AuditEvent::new("http.request").actor("alice@example.com").attribute("tenant", "acme");
    e.outcome = tower_audit::Outcome::Success;
    e.method = Some("GET".into());
    e.route = Some("/api/auth/me".into());
    e.path = Some("/api/auth/me".into());
    e.status = Some(200);
    e.latency_us = Some(412);
    e.request_id = Some("0191b8a4-7c4e-7a1b-9d2e-3f4a5b6c7d8e".into());
    e.client_addr = Some("203.0.113.9".parse().unwrap());
    e.user_agent = Some("Mozilla/5.0 (X11; Linux x86_64)".into());
    e
}

/// The service every request bench wraps: answers "hello".
pub(crate) async fn hello(
    _req: http::Request<http_body_util::Full<bytes::Bytes>>,
) -> Result<http::Response<http_body_util::Full<bytes::Bytes>>, std::convert::Infallible> {
    Ok(http::Response::new(http_body_util::Full::new(bytes::Bytes::from_static(b"hello"))))
}

/// The request every request bench sends: a path with a query, a user agent and a request id.
pub(crate) fn request() -> http::Request<http_body_util::Full<bytes::Bytes>> {
    http::Request::get("/api/auth/me?x=1")
        .header("user-agent", "bench/1.0")
        .header("x-request-id", "0191b8a4-7c4e-7a1b-9d2e-3f4a5b6c7d8e")
        .body(http_body_util::Full::default())
        .unwrap()
}
