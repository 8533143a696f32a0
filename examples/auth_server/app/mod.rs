//! The auth server, one concern per file: [`users`] (the user store and what a valid registration is),
//! [`tokens`] (JWTs and their revocation), [`audit`] (sinks and modes), [`routes`] (router and handlers),
//! [`error`] (JSON errors). This file holds the configuration, start-up and `serve`. `main.rs` only parses flags,
//! binds and serves; the tests (`tests/auth_server.rs`) drive exactly this code over a real socket.

// Shared by `main.rs` and the tests (`#[path]`-included), so items are `pub` for the tests and some are unused
// by one side or the other.
#![allow(unreachable_pub, dead_code)]

mod audit;
mod error;
mod naive;
mod routes;
mod tokens;
mod users;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use argon2::password_hash::PasswordHasher;
use argon2::{Algorithm, Argon2, Params, Version};
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use sqlx::AnyPool;
use tower_audit::{AuditHandle, AuditLayer};

#[allow(unused_imports)] // `audit_policy`: the tests build pipelines of their own with it.
pub use audit::{AuditMode, AuditOptions, AuditSinkKind, DurableRoutes, audit_pipeline, audit_policy, integrity};
#[allow(unused_imports)] // the tests decode tokens with it; `main.rs` does not
pub use tokens::Claims;

use routes::AppState;
use tokens::Tokens;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, Clone)]
pub struct Config {
    /// The user store: `sqlite://…` (default, created on first start) or `postgres://…`.
    pub database_url: String,
    pub db_pool_size: u32,
    pub db_acquire_timeout: Duration,
    pub audit: AuditMode,
    pub audit_sink: AuditSinkKind,
    /// The audit pipeline's spill (off by default), durable routes and batch size.
    pub audit_options: AuditOptions,
    /// HS256 secret; generated at start when `None` (tokens then die with the process).
    pub jwt_secret: Option<String>,
    pub access_ttl: Duration,
    pub refresh_ttl: Duration,
    pub argon2: Params,
    pub max_body_bytes: usize,
    /// The installed Prometheus recorder: when given, `GET /metrics` renders it (the audit pipeline's metrics among
    /// them). Outside the audit layer, so scrapes are not audited.
    pub metrics: Option<PrometheusHandle>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            database_url: "sqlite://data/auth_server.db?mode=rwc".to_owned(),
            db_pool_size: 5,
            db_acquire_timeout: Duration::from_secs(5),
            audit: AuditMode::Layer,
            audit_sink: AuditSinkKind::Sqlite("sqlite://data/auth_server_audit.db".to_owned()),
            audit_options: AuditOptions::default(),
            jwt_secret: None,
            access_ttl: Duration::from_secs(15 * 60),
            refresh_ttl: Duration::from_secs(30 * 24 * 3600),
            argon2: Params::default(),
            max_body_bytes: 16 * 1024,
            metrics: None,
        }
    }
}

/// A started server: its router, and what `main` (or a test) needs to shut it down and look inside.
pub struct Server {
    pub router: Router,
    pub audit: Option<AuditHandle>,
    pub users: AnyPool,
}

impl Server {
    /// Opens the user store (creating its tables), builds the audit pipeline the config asks for, and the router.
    pub async fn start(config: Config) -> Result<Self, BoxError> {
        let audit = match config.audit {
            AuditMode::Layer => Some(audit_pipeline(&config.audit_sink, config.audit_options.clone()).await?),
            AuditMode::Inline | AuditMode::Naive | AuditMode::Off => None,
        };
        Self::start_with(config, audit).await
    }

    /// Like [`start`](Self::start), with an audit pipeline built by the caller (tests use a stalled sink).
    pub async fn start_with(config: Config, audit: Option<(AuditLayer, AuditHandle)>) -> Result<Self, BoxError> {
        let users = users::connect(&config.database_url, config.db_pool_size, config.db_acquire_timeout).await?;
        let secret = config
            .jwt_secret
            .clone()
            .unwrap_or_else(|| format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple()));
        // `--audit naive`: the benchmarks' floor; its drain runs until the router (every copy of the layer) is gone.
        let naive = (config.audit == AuditMode::Naive).then(|| {
            let (layer, drain) = naive::NaiveLayer::new(tower_audit::DEFAULT_CAPACITY);
            tokio::spawn(drain);
            layer
        });
        let hasher = Argon2::new(Algorithm::Argon2id, Version::V0x13, config.argon2.clone());
        let dummy_hash = hasher.hash_password(b"not a real password; equalises timing")?.to_string();
        let state = AppState {
            users: users.clone(),
            tokens: Arc::new(Tokens::new(secret.as_bytes(), config.access_ttl, config.refresh_ttl)),
            hasher: Arc::new(hasher),
            hashing: Arc::new(tokio::sync::Semaphore::new(
                std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get),
            )),
            dummy_hash: Arc::from(dummy_hash),
            audit: audit.as_ref().map(|(_, handle)| handle.clone()),
            mode: config.audit,
            naive: naive.as_ref().map(naive::NaiveLayer::counts),
        };
        let (layer, handle) = audit.unzip();
        let router = routes::app(state, config.max_body_bytes, layer, naive, config.metrics);
        Ok(Server { router, audit: handle, users })
    }
}

/// Serves until `shutdown` resolves, then finishes in-flight requests.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router.into_make_service_with_connect_info::<SocketAddr>())
        .with_graceful_shutdown(shutdown)
        .await
}
