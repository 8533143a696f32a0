//! The router and its handlers: register, login, me, refresh, logout, the audit counters, and `/metrics`.

use std::sync::Arc;

use argon2::Argon2;
use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware;
use axum::routing::{get, post};
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Deserialize;
use serde_json::json;
use sqlx::AnyPool;
use tower_audit::{AuditEvent, AuditHandle, AuditLayer, Outcome};

use super::audit::{Audit, AuditMode, inline_audit};
use super::error::{ApiError, JsonBody};
use super::naive::{NaiveCounts, NaiveLayer};
use super::tokens::{Claims, TokenPair, Tokens, bearer, is_revoked, revoke};
use super::users::{self, RegisterRequest, UserView};

#[derive(Clone)]
pub(crate) struct AppState {
    pub(crate) users: AnyPool,
    pub(crate) tokens: Arc<Tokens>,
    pub(crate) hasher: Arc<Argon2<'static>>,
    /// Bounds concurrent hashes (each takes Argon2's memory cost, 19 MiB by default) to the number of CPUs, so a
    /// burst of logins queues instead of exhausting memory.
    pub(crate) hashing: Arc<tokio::sync::Semaphore>,
    pub(crate) dummy_hash: Arc<str>,
    pub(crate) audit: Option<AuditHandle>,
    pub(crate) mode: AuditMode,
    /// `--audit naive`: what the naive layer did.
    pub(crate) naive: Option<&'static NaiveCounts>,
}

/// The router. The audit layer (or the inline anti-pattern) wraps every route but `/metrics` (there when a
/// Prometheus recorder is given): a scraper polling every few seconds would fill the trail with its requests.
pub(crate) fn app(
    state: AppState,
    max_body_bytes: usize,
    audit: Option<AuditLayer>,
    naive: Option<NaiveLayer>,
    metrics: Option<PrometheusHandle>,
) -> Router {
    let mode = state.mode;
    let router = Router::new()
        .route("/api/auth/register", post(register))
        .route("/api/auth/login", post(login))
        .route("/api/auth/me", get(me))
        .route("/api/auth/refresh", post(refresh))
        .route("/api/auth/logout", post(logout))
        .route("/api/audit/stats", get(audit_stats))
        // Inside the layer, and skipped by the audit policy: a load balancer's probes fill no trail.
        .route("/health", get(|| async { "ok" }))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such endpoint") })
        .layer(DefaultBodyLimit::max(max_body_bytes));
    let router = match (mode, audit, naive) {
        (AuditMode::Layer, Some(layer), _) => router.layer(layer),
        (AuditMode::Inline, ..) => router.layer(middleware::from_fn_with_state(state.clone(), inline_audit)),
        (AuditMode::Naive, _, Some(naive)) => router.layer(naive),
        _ => router,
    };
    let router = router.with_state(state);
    match metrics {
        Some(prometheus) => router.route("/metrics", get(move || scrape(prometheus.clone()))),
        None => router,
    }
}

/// The Prometheus text exposition of every metric recorded in the process.
async fn scrape(prometheus: PrometheusHandle) -> ([(header::HeaderName, &'static str); 1], String) {
    // Upkeep only drains histograms (the audit pipeline publishes counters and gauges); cheap at scrape time.
    prometheus.run_upkeep();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], prometheus.render())
}

/// Checks a token of type `typ`: signature, expiry, revocation. Records `auth.token_invalid` when refused.
async fn authenticate(state: &AppState, audit: &Audit, token: &str, typ: &str) -> Result<Claims, ApiError> {
    let refused = |reason: &'static str| {
        audit.record(AuditEvent::new("auth.token_invalid").outcome(Outcome::Denied).attribute("reason", reason));
        ApiError::unauthorized("invalid or expired token")
    };
    let claims = state.tokens.verify(token, typ).map_err(refused)?;
    audit.actor(&claims.email);
    if is_revoked(&state.users, &claims.jti).await? {
        return Err(refused("revoked"));
    }
    Ok(claims)
}

async fn register(
    State(state): State<AppState>,
    audit: Audit,
    JsonBody(req): JsonBody<RegisterRequest>,
) -> Result<(StatusCode, Json<TokenPair>), ApiError> {
    let email = users::validate(&req)?;
    audit.actor(&email);
    if users::email_taken(&state.users, &email).await? {
        audit.record(AuditEvent::new("auth.register_conflict").outcome(Outcome::ClientError));
        return Err(ApiError::new(StatusCode::CONFLICT, "email: already registered"));
    }
    let hasher = Arc::clone(&state.hasher);
    let password = req.password.clone();
    let _permit = state.hashing.acquire().await.map_err(ApiError::internal)?;
    let hash = tokio::task::spawn_blocking(move || hasher.hash_password(password.as_bytes()).map(|h| h.to_string()))
        .await
        .map_err(ApiError::internal)?
        .map_err(ApiError::internal)?;
    let id = uuid::Uuid::new_v4().to_string();
    match users::insert(&state.users, &id, &email, &hash, &req).await {
        Ok(()) => {}
        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
            audit.record(AuditEvent::new("auth.register_conflict").outcome(Outcome::ClientError));
            return Err(ApiError::new(StatusCode::CONFLICT, "email: already registered"));
        }
        Err(e) => return Err(e.into()),
    }
    audit.record(AuditEvent::new("auth.register_succeeded").attribute("user_id", &id));
    Ok((StatusCode::CREATED, Json(state.tokens.issue(&id, &email)?)))
}

#[derive(Deserialize)]
struct LoginRequest {
    email: String,
    password: String,
}

async fn login(
    State(state): State<AppState>,
    audit: Audit,
    JsonBody(req): JsonBody<LoginRequest>,
) -> Result<Json<TokenPair>, ApiError> {
    let email = req.email.trim().to_lowercase();
    audit.actor(&email);
    let user = users::credentials(&state.users, &email).await?;
    // Unknown emails still pay for one verification, so timing does not tell whether the email exists.
    let (id, stored) = match &user {
        Some((id, hash)) => (Some(id.clone()), hash.clone()),
        None => (None, state.dummy_hash.to_string()),
    };
    let hasher = Arc::clone(&state.hasher);
    let password = req.password;
    let _permit = state.hashing.acquire().await.map_err(ApiError::internal)?;
    let verified = tokio::task::spawn_blocking(move || {
        PasswordHash::new(&stored).is_ok_and(|parsed| hasher.verify_password(password.as_bytes(), &parsed).is_ok())
    })
    .await
    .map_err(ApiError::internal)?;
    match id {
        Some(id) if verified => {
            audit.record(AuditEvent::new("auth.login_succeeded").attribute("user_id", &id));
            Ok(Json(state.tokens.issue(&id, &email)?))
        }
        _ => {
            let reason = if user.is_some() { "bad_password" } else { "unknown_email" };
            audit.record(AuditEvent::new("auth.login_failed").outcome(Outcome::Denied).attribute("reason", reason));
            Err(ApiError::unauthorized("invalid email or password"))
        }
    }
}

async fn me(State(state): State<AppState>, audit: Audit, headers: HeaderMap) -> Result<Json<UserView>, ApiError> {
    let claims = authenticate(&state, &audit, bearer(&headers)?, "access").await?;
    let user = users::find(&state.users, &claims.sub).await?;
    Ok(Json(user.ok_or_else(|| ApiError::unauthorized("invalid or expired token"))?))
}

#[derive(Deserialize)]
struct RefreshRequest {
    refresh_token: String,
}

async fn refresh(
    State(state): State<AppState>,
    audit: Audit,
    JsonBody(req): JsonBody<RefreshRequest>,
) -> Result<Json<TokenPair>, ApiError> {
    let claims = authenticate(&state, &audit, &req.refresh_token, "refresh").await?;
    // Rotation: a refresh token works once.
    revoke(&state.users, &claims).await?;
    audit.record(AuditEvent::new("auth.token_refreshed"));
    Ok(Json(state.tokens.issue(&claims.sub, &claims.email)?))
}

#[derive(Deserialize, Default)]
struct LogoutRequest {
    refresh_token: Option<String>,
}

async fn logout(
    State(state): State<AppState>,
    audit: Audit,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<StatusCode, ApiError> {
    let claims = authenticate(&state, &audit, bearer(&headers)?, "access").await?;
    revoke(&state.users, &claims).await?;
    // The body is optional: `{"refresh_token": "…"}` revokes that refresh token too.
    let body: LogoutRequest = if body.iter().all(u8::is_ascii_whitespace) {
        LogoutRequest::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("invalid JSON body: {e}")))?
    };
    let refresh = body.refresh_token;
    if let Some(refresh) = refresh.as_deref().and_then(|t| state.tokens.verify(t, "refresh").ok())
        && refresh.sub == claims.sub
    {
        revoke(&state.users, &refresh).await?;
    }
    audit.record(AuditEvent::new("auth.logout"));
    Ok(StatusCode::NO_CONTENT)
}

async fn audit_stats(State(state): State<AppState>) -> Json<serde_json::Value> {
    let mode = match state.mode {
        AuditMode::Layer => "layer",
        AuditMode::Inline => "inline",
        AuditMode::Naive => "naive",
        AuditMode::Off => "off",
    };
    let mut body = json!({ "mode": mode, "stats": state.audit.as_ref().map(AuditHandle::stats) });
    if let Some(counts) = state.naive {
        let count = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        body["naive"] =
            json!({ "queued": count(&counts.queued), "full": count(&counts.full), "drained": count(&counts.drained) });
    }
    Json(body)
}
