//! Non-blocking audit middleware for [Tower], [Axum] and [Tonic].
//!
//! [`AuditLayer`] records one [`AuditEvent`] per request (plus any custom security events a handler records
//! through [`AuditContext`]) and pushes it into a bounded queue **without ever waiting**. A background worker
//! batches the events into an [`AuditSink`]. The request path never opens a database session, never awaits
//! I/O for auditing, and never loses an event without counting it: every drop, retry and failure shows up in
//! [`AuditHandle::stats`], in rate-limited `tracing` warnings, and as an `audit.gap` event in the trail itself.
//!
//! ```
//! use std::time::Duration;
//! use axum::{Router, routing::post};
//! use tower_audit::{AuditContext, AuditEvent, AuditLayer, MemorySink, Outcome};
//!
//! async fn login(audit: AuditContext) -> &'static str {
//!     audit.set_actor("alice@example.com");
//!     audit.record(AuditEvent::new("auth.login_succeeded"));
//!     "welcome"
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let sink = MemorySink::new();
//! let (audit, handle) = AuditLayer::builder(sink.clone()).build()?;
//! let app: Router = Router::new().route("/login", post(login)).layer(audit);
//!
//! // Serve `app` as usual; here one request goes straight through it.
//! use tower::ServiceExt;
//! let response = app.oneshot(http::Request::post("/login").body(axum::body::Body::empty())?).await?;
//! assert_eq!(response.status(), 200);
//! let body = axum::body::to_bytes(response.into_body(), 1024).await?; // the event is emitted at the end
//! assert_eq!(body, "welcome");
//!
//! let report = handle.shutdown(Duration::from_secs(5)).await;
//! assert_eq!(report.stats.written, 2);
//! // The trail begins with the pipeline's `audit.boot` event and ends with its `audit.shutdown` event.
//! let events: Vec<AuditEvent> = sink.events().into_iter().filter(|e| !e.is_pipeline_event()).collect();
//! assert_eq!(events[0].kind, "auth.login_succeeded");
//! assert_eq!(events[1].kind, "http.request");
//! assert_eq!(events[1].route.as_deref(), Some("/login"));
//! assert_eq!(events[1].actor.as_deref(), Some("alice@example.com"));
//! assert_eq!(events[1].outcome, Outcome::Success);
//! # Ok(())
//! # }
//! ```
//!
//! In a real server, serve the app with the client's address (the layer records it) and shut the pipeline down
//! after the server, so that every queued event is written:
//!
//! ```no_run
//! # use std::time::Duration;
//! # use axum::{Router, routing::get};
//! # use tower_audit::{AuditLayer, JsonLinesSink};
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let (audit, handle) = AuditLayer::builder(JsonLinesSink::open("audit.jsonl")?).build()?;
//! let app = Router::new().route("/", get(|| async { "hello" })).layer(audit);
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
//! axum::serve(listener, app.into_make_service_with_connect_info::<std::net::SocketAddr>())
//!     .with_graceful_shutdown(async { let _ = tokio::signal::ctrl_c().await; })
//!     .await?;
//! println!("{}", handle.shutdown(Duration::from_secs(10)).await);
//! # Ok(()) }
//! ```
//!
//! # Feature flags
//!
//! | feature | default | what it adds |
//! |---|---|---|
//! | `axum` | yes | reads Axum's `MatchedPath` (the route template) and `ConnectInfo<SocketAddr>` (the client address); [`AuditContext`] becomes an extractor |
//! | `tonic` | no | reads Tonic's `TcpConnectInfo` (the client address of gRPC calls) |
//! | `postgres` | no | `PostgresSink`: one multi-row insert per batch on a dedicated pool (sqlx) |
//! | `sqlite` | no | `SqliteSink`: one transaction per batch into an embedded, bundled SQLite (sqlx) |
//! | `nats` | no | `NatsSink`: each event published to a NATS JetStream stream, deduplicated by event id (async-nats) |
//! | `metrics` | no | publishes every counter of [`Stats`] and the queue depth through the [`metrics`](https://docs.rs/metrics) facade every flush interval (names and labels in the README's Metrics section) |
//!
//! # Defaults, and why
//!
//! | setting | default | |
//! |---|---|---|
//! | queue capacity | 65,536 events (and 32 MiB) | bounds memory; a burst this large, or a sink's stall of seconds, is absorbed |
//! | batch size | 512 | large enough for multi-row inserts, small enough for one round trip |
//! | flush interval | 200 ms | the longest an event waits in light traffic |
//! | overflow | [`Overflow::Drop`] | a full queue costs the request nothing; the drop is counted |
//! | retries | 5, 100 ms → 5 s, jittered | rides out a database restart |
//! | sink timeout | 10 s | a sink that never returns cannot stall the pipeline |
//! | redacted query parameters | [`DEFAULT_REDACTED_QUERY_PARAMS`] | tokens in URLs never reach the trail |
//! | client address | the connection's peer ([`ClientAddrSource::Peer`]) | no header can forge it; a proxy's header is read only when you name it and the proxy |
//!
//! The worker never wakes per event: it drains the queue every flush interval, or as soon as a whole batch
//! is waiting. A request pays for an atomic push, not for a cross-core wake-up.
//!
//! [Tower]: https://docs.rs/tower
//! [Axum]: https://docs.rs/axum
//! [Tonic]: https://docs.rs/tonic
#![cfg_attr(docsrs, feature(doc_cfg))]

mod body;
mod call;
mod client_addr;
mod config;
mod context;
mod delivery;
mod durable;
mod error;
mod event;
mod future;
mod gap;
mod handle;
mod intake;
pub mod integrity;
mod layer;
mod lifecycle;
#[cfg(feature = "metrics")]
mod metrics;
mod pipeline;
mod policy;
mod request;
mod sanitize;
mod service;
mod siem;
pub mod sink;
mod spill;
mod stamp;
mod stats;
mod worker;

pub use self::body::ResponseBody;
pub use self::client_addr::{ClientAddr, ClientAddrSource};
pub use self::config::{
    DEFAULT_BATCH_SIZE, DEFAULT_CAPACITY, DEFAULT_FLUSH_INTERVAL, DEFAULT_MAX_QUEUED_BYTES,
    DEFAULT_REDACTED_QUERY_PARAMS, DEFAULT_SINK_TIMEOUT, Overflow, Retry, SENSITIVE_HEADER_PARTS, SENSITIVE_HEADERS,
};
pub use self::context::AuditContext;
pub use self::error::{BoxError, ConfigError, SinkError};
pub use self::event::{AuditEvent, Hash, Outcome, ParseHashError, SCHEMA_VERSION, kind};
pub use self::future::ResponseFuture;
pub use self::handle::{AuditHandle, ShutdownReport};
pub use self::layer::{AuditLayer, AuditLayerBuilder};
pub use self::policy::{Delivery, Policy, RequestHead, Rule};
pub use self::service::AuditService;
pub use self::siem::{ECS_VERSION, Encoding, OCSF_VERSION, encode_ecs, encode_ocsf};
#[cfg(feature = "nats")]
pub use self::sink::NatsSink;
#[cfg(feature = "postgres")]
pub use self::sink::PostgresSink;
#[cfg(feature = "sqlite")]
pub use self::sink::SqliteSink;
pub use self::sink::{AuditSink, JsonLinesSink, MemorySink, TracingSink};
pub use self::spill::{DEFAULT_SEGMENT_BYTES, DEFAULT_SPILL_MAX_BYTES, DEFAULT_SYNC_INTERVAL, Spill, SyncPolicy};
pub use self::stats::Stats;

/// The README's code compiles (it uses every feature).
#[cfg(all(doctest, feature = "postgres", feature = "sqlite", feature = "nats"))]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
