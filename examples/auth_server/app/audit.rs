//! Audit wiring: which mode (the layer, the inline anti-pattern, none), which sink, and the handlers' access to
//! the request's audit context.

use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::extract::{FromRequestParts, Request, State};
use axum::http::Method;
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tower_audit::integrity::Integrity;
use tower_audit::{
    AuditContext, AuditEvent, AuditHandle, AuditLayer, Delivery, JsonLinesSink, Policy, PostgresSink, Rule, Spill,
    SqliteSink,
};

use super::BoxError;
use super::error::ApiError;
use super::routes::AppState;
use super::tokens::now;

/// How requests are audited (`--audit`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AuditMode {
    /// `tower-audit`: one event per request plus security events, queued without waiting. The default.
    Layer,
    /// The incident's anti-pattern, for demonstration and benchmarks: a middleware takes a second connection
    /// from the user store's pool, holds it across the handler, and writes the audit row through it.
    Inline,
    /// A naive audit layer (`naive.rs`), for benchmarks only: seven fields per request into a channel that is
    /// drained and discarded. No trail: the floor `benches/load.sh` measures the layer against.
    Naive,
    /// No auditing.
    Off,
}

/// Where the layer's audit events go.
#[derive(Debug, Clone)]
pub enum AuditSinkKind {
    Sqlite(String),
    JsonLines(PathBuf),
    Postgres(String),
    /// A NATS JetStream stream (`NatsSink`), made on `audit.>` if it does not exist: several servers can feed
    /// one stream, and `examples/nats_to_postgres` moves it into one Postgres table.
    #[cfg(feature = "nats")]
    Nats {
        /// `nats://host:4222`.
        url: String,
        /// The stream's name.
        stream: String,
    },
    /// A sink that never returns: stands in for a dead audit database (`benches/load.sh` uses it to show that
    /// a stalled audit store costs requests nothing). Never use it for real.
    Stalled,
    /// A sink that takes every batch and keeps nothing: what the request path and the worker cost without any
    /// sink's work (`benches/load.sh`). Never use it for real.
    Null,
}

/// Never returns, like a database that stopped answering.
struct StalledSink;

impl tower_audit::AuditSink for StalledSink {
    async fn write_batch(&self, _batch: &[AuditEvent]) -> Result<(), tower_audit::SinkError> {
        std::future::pending().await
    }
}

/// Takes every batch and keeps nothing.
struct NullSink;

impl tower_audit::AuditSink for NullSink {
    async fn write_batch(&self, _batch: &[AuditEvent]) -> Result<(), tower_audit::SinkError> {
        Ok(())
    }
}

/// Which routes answer only once their audit event is durable (`--durable`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum DurableRoutes {
    /// Register, login, refresh and logout (the actions PCI DSS 10.2 names): their response waits until their
    /// event is committed (or fsynced in the spill), or turns into a 503. `/me` stays best effort. The default.
    #[default]
    Auth,
    /// The same four routes with `DurableIntent`: an intent event is durable before the handler runs (so a
    /// crash inside it still leaves a record), then the response waits as with `auth`.
    AuthIntent,
    /// Every audited route, `/me` included (to measure what durability costs: `benches/load.sh`).
    All,
    /// None: every event best effort.
    None,
}

/// The audit policy: `/health` is not audited, the routes chosen by `durable` are durable (waiting at most
/// `timeout`), everything else best effort.
pub fn audit_policy(durable: DurableRoutes, timeout: Duration) -> Policy {
    let policy = Policy::new().rule(Rule::route("/health").skip());
    let auth_routes = |policy: Policy, delivery: Delivery| {
        ["register", "login", "refresh", "logout"].into_iter().fold(policy, |policy, action| {
            policy.rule(Rule::route(format!("/api/auth/{action}")).methods([Method::POST]).delivery(delivery))
        })
    };
    match durable {
        DurableRoutes::Auth => auth_routes(policy, Delivery::durable(timeout)),
        DurableRoutes::AuthIntent => auth_routes(policy, Delivery::durable_intent(timeout)),
        DurableRoutes::All => policy.rule(Rule::any().durable(timeout)),
        DurableRoutes::None => policy,
    }
}

/// How the audit pipeline is set up besides its sink.
#[derive(Debug, Clone)]
pub struct AuditOptions {
    pub spill: Option<Spill>,
    /// Signs the trail's checkpoints (`--signing-key`); off by default.
    pub integrity: Option<Integrity>,
    pub durable: DurableRoutes,
    pub durable_timeout: Duration,
    pub batch_size: usize,
}

impl Default for AuditOptions {
    fn default() -> Self {
        Self {
            spill: None,
            integrity: None,
            durable: DurableRoutes::Auth,
            durable_timeout: Duration::from_secs(2),
            batch_size: tower_audit::DEFAULT_BATCH_SIZE,
        }
    }
}

/// Builds the audit pipeline for the chosen sink. Audit rows never share the user store's pool. With a spill,
/// batches wait on disk through a sink outage; without one, what the sink fails for good goes to the log
/// (`TracingSink`) as a fallback.
pub async fn audit_pipeline(
    kind: &AuditSinkKind,
    options: AuditOptions,
) -> Result<(AuditLayer, AuditHandle), BoxError> {
    let builder = match kind {
        AuditSinkKind::Sqlite(url) => {
            let sink = SqliteSink::connect(url).await?;
            sink.ensure_schema().await?;
            AuditLayer::builder(sink)
        }
        AuditSinkKind::Postgres(url) => {
            let sink = PostgresSink::connect(url).await?;
            sink.ensure_schema().await?;
            AuditLayer::builder(sink)
        }
        #[cfg(feature = "nats")]
        AuditSinkKind::Nats { url, stream } => {
            let sink = tower_audit::NatsSink::connect(url, stream).await?;
            sink.ensure_stream().await?;
            AuditLayer::builder(sink)
        }
        AuditSinkKind::JsonLines(path) => AuditLayer::builder(JsonLinesSink::open(path)?),
        AuditSinkKind::Stalled => AuditLayer::builder(StalledSink),
        AuditSinkKind::Null => AuditLayer::builder(NullSink),
    };
    let builder = builder
        .policy(audit_policy(options.durable, options.durable_timeout))
        .batch_size(options.batch_size)
        .capacity(tower_audit::DEFAULT_CAPACITY.max(options.batch_size));
    let builder = match options.spill {
        Some(spill) => builder.spill(spill),
        None => builder.fallback(tower_audit::TracingSink::new()),
    };
    let builder = match options.integrity {
        Some(integrity) => builder.integrity(integrity),
        None => builder,
    };
    Ok(builder.build()?)
}

/// The trail's integrity from `--signing-key`: an Ed25519 key in a PKCS#8 PEM file (`openssl genpkey -algorithm
/// ed25519`), or `generate` for a throwaway one written to `<data dir>/audit_signing_key.pem`. Checkpoints also go
/// to `<data dir>/audit_checkpoints.jsonl`, the copy a verifier trusts (keep it where the trail's writers cannot
/// edit it).
pub fn integrity(signing_key: &str, data_dir: &Path) -> Result<Integrity, BoxError> {
    let integrity = if signing_key == "generate" {
        use tower_audit::integrity::ed25519::SigningKey;
        use tower_audit::integrity::ed25519::pkcs8::{EncodePrivateKey, spki::der::pem::LineEnding};
        let mut seed = [0u8; 32];
        std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut seed)?;
        let key = SigningKey::from_bytes(&seed);
        let path = data_dir.join("audit_signing_key.pem");
        let pem = key.to_pkcs8_pem(LineEnding::LF).map_err(|e| format!("cannot encode the key: {e}"))?;
        write_private(&path, pem.as_bytes())?;
        println!("generated a throwaway signing key: {}", path.display());
        Integrity::new(key)
    } else {
        let pem = std::fs::read_to_string(signing_key)
            .map_err(|e| format!("cannot read --signing-key {signing_key}: {e}"))?;
        Integrity::from_pem(&pem)?
    };
    let checkpoints = data_dir.join("audit_checkpoints.jsonl");
    let integrity = integrity.key_name("auth_server").checkpoint_sink(JsonLinesSink::open(&checkpoints)?);
    println!("audit checkpoints signed by {} (also in {})", integrity.verifier_key(), checkpoints.display());
    Ok(integrity)
}

/// Writes a secret readable by its owner only.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)?.write_all(bytes)
}

/// The request's audit context, when the layer is on (a no-op otherwise).
pub(crate) struct Audit(Option<AuditContext>);

impl<S: Send + Sync> FromRequestParts<S> for Audit {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(_parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(Audit(AuditContext::current()))
    }
}

impl Audit {
    pub(crate) fn actor(&self, actor: &str) {
        if let Some(ctx) = &self.0 {
            ctx.set_actor(actor);
        }
    }

    pub(crate) fn record(&self, event: AuditEvent) {
        if let Some(ctx) = &self.0 {
            ctx.record(event);
        }
    }
}

/// The anti-pattern `--audit=inline` reproduces: a second pooled connection, taken before the handler runs and
/// held across it, to write the audit row on the request path.
pub(crate) async fn inline_audit(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let method = req.method().to_string();
    let path = req.uri().path().to_owned();
    let mut conn = match state.users.acquire().await {
        Ok(conn) => conn,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let response = next.run(req).await;
    let written = sqlx::query("INSERT INTO inline_audit (time, method, path, status) VALUES ($1, $2, $3, $4)")
        .bind(now() as i64)
        .bind(method)
        .bind(path)
        .bind(i32::from(response.status().as_u16()))
        .execute(&mut *conn)
        .await;
    if let Err(error) = written {
        tracing::error!(%error, "inline audit write failed");
    }
    response
}
