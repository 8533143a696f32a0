//! The auth server: configuration, start-up, router, handlers. `main.rs` only parses flags and serves; the
//! tests (`tests/auth_server.rs`) drive exactly this code over a real socket.

// Shared by `main.rs` and the tests (`#[path]`-included), so items are `pub` for the tests and some are unused
// by one side or the other.
#![allow(unreachable_pub, dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use argon2::{Algorithm, Argon2, Params, Version};
use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use jsonwebtoken::{DecodingKey, EncodingKey, Header, Validation};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::AnyPool;
use sqlx::any::AnyPoolOptions;
use tower_audit::{
    AuditContext, AuditEvent, AuditHandle, AuditLayer, JsonLinesSink, Outcome, PostgresSink, SqliteSink,
};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How requests are audited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditMode {
    /// `tower-audit`: one event per request plus security events, queued without waiting. The default.
    Layer,
    /// The incident's anti-pattern, for demonstration and benchmarks: a middleware takes a second connection
    /// from the user store's pool, holds it across the handler, and writes the audit row through it.
    Inline,
    /// No auditing.
    Off,
}

/// Where the layer's audit events go.
#[derive(Debug, Clone)]
pub enum AuditSinkKind {
    Sqlite(String),
    JsonLines(PathBuf),
    Postgres(String),
    /// A sink that never returns: stands in for a dead audit database (`benches/load.sh` uses it to show that
    /// a stalled audit store costs requests nothing). Never use it for real.
    Stalled,
}

/// Never returns, like a database that stopped answering.
struct StalledSink;

impl tower_audit::AuditSink for StalledSink {
    async fn write_batch(&self, _batch: &[AuditEvent]) -> Result<(), tower_audit::SinkError> {
        std::future::pending().await
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    /// The user store: `sqlite://…` (default, created on first start) or `postgres://…`.
    pub database_url: String,
    pub db_pool_size: u32,
    pub db_acquire_timeout: Duration,
    pub audit: AuditMode,
    pub audit_sink: AuditSinkKind,
    /// HS256 secret; generated at start when `None` (tokens then die with the process).
    pub jwt_secret: Option<String>,
    pub access_ttl: Duration,
    pub refresh_ttl: Duration,
    pub argon2: Params,
    pub max_body_bytes: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            database_url: "sqlite://auth_server.db?mode=rwc".to_owned(),
            db_pool_size: 5,
            db_acquire_timeout: Duration::from_secs(5),
            audit: AuditMode::Layer,
            audit_sink: AuditSinkKind::Sqlite("sqlite://auth_server_audit.db".to_owned()),
            jwt_secret: None,
            access_ttl: Duration::from_secs(15 * 60),
            refresh_ttl: Duration::from_secs(30 * 24 * 3600),
            argon2: Params::default(),
            max_body_bytes: 16 * 1024,
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
            AuditMode::Layer => Some(audit_pipeline(&config.audit_sink).await?),
            AuditMode::Inline | AuditMode::Off => None,
        };
        Self::start_with(config, audit).await
    }

    /// Like [`start`](Self::start), with an audit pipeline built by the caller (tests use a stalled sink).
    pub async fn start_with(config: Config, audit: Option<(AuditLayer, AuditHandle)>) -> Result<Self, BoxError> {
        sqlx::any::install_default_drivers();
        let users = AnyPoolOptions::new()
            .max_connections(config.db_pool_size)
            .acquire_timeout(config.db_acquire_timeout)
            .connect(&config.database_url)
            .await?;
        let sqlite = config.database_url.starts_with("sqlite:");
        if sqlite {
            sqlx::query("PRAGMA journal_mode = WAL").execute(&users).await?;
        }
        sqlx::raw_sql(
            "CREATE TABLE IF NOT EXISTS users (
                id TEXT PRIMARY KEY,
                email TEXT NOT NULL UNIQUE,
                password_hash TEXT NOT NULL,
                country TEXT NOT NULL,
                annual_income DOUBLE PRECISION NOT NULL,
                timezone TEXT NOT NULL,
                created_at BIGINT NOT NULL
            );
            CREATE TABLE IF NOT EXISTS revoked_tokens (jti TEXT PRIMARY KEY, expires_at BIGINT NOT NULL);
            CREATE TABLE IF NOT EXISTS inline_audit (
                time BIGINT NOT NULL, method TEXT NOT NULL, path TEXT NOT NULL, status INTEGER NOT NULL
            );",
        )
        .execute(&users)
        .await?;

        let secret = config
            .jwt_secret
            .clone()
            .unwrap_or_else(|| format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple()));
        let hasher = Argon2::new(Algorithm::Argon2id, Version::V0x13, config.argon2.clone());
        let dummy_hash = hasher.hash_password(b"not a real password; equalises timing")?.to_string();
        let state = AppState {
            users: users.clone(),
            tokens: Arc::new(Tokens {
                encoding: EncodingKey::from_secret(secret.as_bytes()),
                decoding: DecodingKey::from_secret(secret.as_bytes()),
                access_ttl: config.access_ttl,
                refresh_ttl: config.refresh_ttl,
            }),
            hasher: Arc::new(hasher),
            hashing: Arc::new(tokio::sync::Semaphore::new(
                std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get),
            )),
            dummy_hash: Arc::from(dummy_hash),
            audit: audit.as_ref().map(|(_, handle)| handle.clone()),
            mode: config.audit,
        };
        let (layer, handle) = audit.unzip();
        Ok(Server { router: app(state, config.max_body_bytes, layer), audit: handle, users })
    }
}

/// Builds the audit pipeline for the chosen sink. Audit rows never share the user store's pool.
pub async fn audit_pipeline(kind: &AuditSinkKind) -> Result<(AuditLayer, AuditHandle), BoxError> {
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
        AuditSinkKind::JsonLines(path) => AuditLayer::builder(JsonLinesSink::open(path)?),
        AuditSinkKind::Stalled => AuditLayer::builder(StalledSink),
    };
    Ok(builder.fallback(tower_audit::TracingSink::new()).build()?)
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

#[derive(Clone)]
struct AppState {
    users: AnyPool,
    tokens: Arc<Tokens>,
    hasher: Arc<Argon2<'static>>,
    /// Bounds concurrent hashes (each takes Argon2's memory cost, 19 MiB by default) to the number of CPUs, so a
    /// burst of logins queues instead of exhausting memory.
    hashing: Arc<tokio::sync::Semaphore>,
    dummy_hash: Arc<str>,
    audit: Option<AuditHandle>,
    mode: AuditMode,
}

/// The router. The audit layer (or the inline anti-pattern) wraps every route.
fn app(state: AppState, max_body_bytes: usize, audit: Option<AuditLayer>) -> Router {
    let mode = state.mode;
    let router = Router::new()
        .route("/api/auth/register", post(register))
        .route("/api/auth/login", post(login))
        .route("/api/auth/me", get(me))
        .route("/api/auth/refresh", post(refresh))
        .route("/api/auth/logout", post(logout))
        .route("/api/audit/stats", get(audit_stats))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such endpoint") })
        .layer(DefaultBodyLimit::max(max_body_bytes));
    let router = match (mode, audit) {
        (AuditMode::Layer, Some(layer)) => router.layer(layer),
        (AuditMode::Inline, _) => router.layer(middleware::from_fn_with_state(state.clone(), inline_audit)),
        _ => router,
    };
    router.with_state(state)
}

// ---------- errors and extractors ----------

/// Every error is JSON: `{"error": "…"}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self { status, message: message.into() }
    }

    fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, message)
    }

    fn unauthorized(message: &str) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, message)
    }

    fn internal(error: impl std::fmt::Display) -> Self {
        tracing::error!(%error, "request failed");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(error: sqlx::Error) -> Self {
        match error {
            sqlx::Error::PoolTimedOut => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, "database busy: timed out waiting for a connection")
            }
            other => Self::internal(other),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({ "error": self.message }))).into_response()
    }
}

/// `Json<T>` whose rejections (malformed JSON, missing fields, wrong content type, oversized body) are JSON
/// errors too.
struct JsonBody<T>(T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(value)) => Ok(JsonBody(value)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

fn json_rejection(rejection: JsonRejection) -> ApiError {
    let status = rejection.status();
    let message = match status {
        StatusCode::PAYLOAD_TOO_LARGE => "request body is too large".to_owned(),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "expected a JSON body (content-type: application/json)".to_owned(),
        _ => rejection.body_text(),
    };
    ApiError::new(status, message)
}

/// The request's audit context, when the layer is on (a no-op otherwise).
struct Audit(Option<AuditContext>);

impl<S: Send + Sync> FromRequestParts<S> for Audit {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(Audit(parts.extensions.get::<AuditContext>().cloned()))
    }
}

impl Audit {
    fn actor(&self, actor: &str) {
        if let Some(ctx) = &self.0 {
            ctx.set_actor(actor);
        }
    }

    fn record(&self, event: AuditEvent) {
        if let Some(ctx) = &self.0 {
            ctx.record(event);
        }
    }
}

// ---------- tokens ----------

struct Tokens {
    encoding: EncodingKey,
    decoding: DecodingKey,
    access_ttl: Duration,
    refresh_ttl: Duration,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub email: String,
    pub typ: String,
    pub jti: String,
    pub iat: u64,
    pub exp: u64,
}

#[derive(Serialize)]
struct TokenPair {
    access_token: String,
    refresh_token: String,
    token_type: &'static str,
    expires_in: u64,
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Tokens {
    fn issue(&self, user_id: &str, email: &str) -> Result<TokenPair, ApiError> {
        let sign = |typ: &str, ttl: Duration| {
            let iat = now();
            let claims = Claims {
                sub: user_id.to_owned(),
                email: email.to_owned(),
                typ: typ.to_owned(),
                jti: uuid::Uuid::new_v4().to_string(),
                iat,
                exp: iat + ttl.as_secs(),
            };
            jsonwebtoken::encode(&Header::default(), &claims, &self.encoding).map_err(ApiError::internal)
        };
        Ok(TokenPair {
            access_token: sign("access", self.access_ttl)?,
            refresh_token: sign("refresh", self.refresh_ttl)?,
            token_type: "bearer",
            expires_in: self.access_ttl.as_secs(),
        })
    }

    /// Why a presented token is refused, in words for the audit trail (never shown to the client).
    fn verify(&self, token: &str, typ: &str) -> Result<Claims, &'static str> {
        let mut validation = Validation::new(jsonwebtoken::Algorithm::HS256);
        validation.leeway = 0;
        let claims = jsonwebtoken::decode::<Claims>(token, &self.decoding, &validation)
            .map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => "expired",
                jsonwebtoken::errors::ErrorKind::InvalidSignature => "bad_signature",
                _ => "malformed",
            })?
            .claims;
        if claims.typ != typ {
            return Err("wrong_token_type");
        }
        Ok(claims)
    }
}

async fn is_revoked(users: &AnyPool, jti: &str) -> Result<bool, ApiError> {
    let found: Option<String> =
        sqlx::query_scalar("SELECT jti FROM revoked_tokens WHERE jti = $1").bind(jti).fetch_optional(users).await?;
    Ok(found.is_some())
}

async fn revoke(users: &AnyPool, claims: &Claims) -> Result<(), ApiError> {
    sqlx::query("INSERT INTO revoked_tokens (jti, expires_at) VALUES ($1, $2) ON CONFLICT (jti) DO NOTHING")
        .bind(&claims.jti)
        .bind(claims.exp as i64)
        .execute(users)
        .await?;
    Ok(())
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

fn bearer(parts: &axum::http::HeaderMap) -> Result<&str, ApiError> {
    parts
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| ApiError::unauthorized("missing bearer token"))
}

// ---------- validation ----------

#[derive(Deserialize)]
struct RegisterRequest {
    email: String,
    password: String,
    country: String,
    annual_income: f64,
    timezone: String,
}

fn normalise_email(email: &str) -> Result<String, ApiError> {
    let email = email.trim().to_lowercase();
    let valid = email.len() <= 254
        && email.split_once('@').is_some_and(|(local, domain)| {
            !local.is_empty()
                && !domain.contains('@')
                && domain.contains('.')
                && !domain.starts_with('.')
                && !domain.ends_with('.')
        })
        && !email.chars().any(|c| c.is_whitespace() || c.is_control());
    if valid { Ok(email) } else { Err(ApiError::invalid("email: not a valid email address")) }
}

/// ISO 3166-1 alpha-2 codes.
const COUNTRIES: &str = "AD AE AF AG AI AL AM AO AQ AR AS AT AU AW AX AZ BA BB BD BE BF BG BH BI BJ BL BM BN BO BQ BR BS \
BT BV BW BY BZ CA CC CD CF CG CH CI CK CL CM CN CO CR CU CV CW CX CY CZ DE DJ DK DM DO DZ EC EE EG EH ER ES ET FI FJ FK FM \
FO FR GA GB GD GE GF GG GH GI GL GM GN GP GQ GR GS GT GU GW GY HK HM HN HR HT HU ID IE IL IM IN IO IQ IR IS IT JE JM JO JP \
KE KG KH KI KM KN KP KR KW KY KZ LA LB LC LI LK LR LS LT LU LV LY MA MC MD ME MF MG MH MK ML MM MN MO MP MQ MR MS MT MU MV \
MW MX MY MZ NA NC NE NF NG NI NL NO NP NR NU NZ OM PA PE PF PG PH PK PL PM PN PR PS PT PW PY QA RE RO RS RU RW SA SB SC SD \
SE SG SH SI SJ SK SL SM SN SO SR SS ST SV SX SY SZ TC TD TF TG TH TJ TK TL TM TN TO TR TT TV TW TZ UA UG UM US UY UZ VA VC \
VE VG VI VN VU WF WS YE YT ZA ZM ZW";

fn validate(req: &RegisterRequest) -> Result<String, ApiError> {
    let email = normalise_email(&req.email)?;
    let chars = req.password.chars().count();
    if chars < 8 {
        return Err(ApiError::invalid("password: must be at least 8 characters"));
    }
    if chars > 128 {
        return Err(ApiError::invalid("password: must be at most 128 characters"));
    }
    let country = req.country.trim();
    if country.len() != 2 || !COUNTRIES.split(' ').any(|c| c == country.to_ascii_uppercase()) {
        return Err(ApiError::invalid("country: not an ISO 3166-1 alpha-2 country code"));
    }
    if !req.annual_income.is_finite() || req.annual_income < 0.0 {
        return Err(ApiError::invalid("annual_income: must be a non-negative number"));
    }
    if jiff::tz::TimeZone::get(req.timezone.trim()).is_err() {
        return Err(ApiError::invalid("timezone: not a known IANA time zone (e.g. Europe/Paris)"));
    }
    Ok(email)
}

// ---------- handlers ----------

async fn register(
    State(state): State<AppState>,
    audit: Audit,
    JsonBody(req): JsonBody<RegisterRequest>,
) -> Result<(StatusCode, Json<TokenPair>), ApiError> {
    let email = validate(&req)?;
    audit.actor(&email);
    let exists: Option<String> =
        sqlx::query_scalar("SELECT id FROM users WHERE email = $1").bind(&email).fetch_optional(&state.users).await?;
    if exists.is_some() {
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
    let inserted = sqlx::query(
        "INSERT INTO users (id, email, password_hash, country, annual_income, timezone, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(&id)
    .bind(&email)
    .bind(&hash)
    .bind(req.country.trim().to_ascii_uppercase())
    .bind(req.annual_income)
    .bind(req.timezone.trim())
    .bind(now() as i64)
    .execute(&state.users)
    .await;
    match inserted {
        Ok(_) => {}
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
    let user: Option<(String, String)> = sqlx::query_as("SELECT id, password_hash FROM users WHERE email = $1")
        .bind(&email)
        .fetch_optional(&state.users)
        .await?;
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

#[derive(Serialize)]
struct UserView {
    id: String,
    email: String,
    country: String,
    annual_income: f64,
    timezone: String,
    created_at: i64,
}

async fn me(
    State(state): State<AppState>,
    audit: Audit,
    headers: axum::http::HeaderMap,
) -> Result<Json<UserView>, ApiError> {
    let claims = authenticate(&state, &audit, bearer(&headers)?, "access").await?;
    let user: Option<(String, String, String, f64, String, i64)> =
        sqlx::query_as("SELECT id, email, country, annual_income, timezone, created_at FROM users WHERE id = $1")
            .bind(&claims.sub)
            .fetch_optional(&state.users)
            .await?;
    let (id, email, country, annual_income, timezone, created_at) =
        user.ok_or_else(|| ApiError::unauthorized("invalid or expired token"))?;
    Ok(Json(UserView { id, email, country, annual_income, timezone, created_at }))
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
    headers: axum::http::HeaderMap,
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
    if let Some(refresh) = refresh.as_deref().and_then(|t| state.tokens.verify(t, "refresh").ok()) {
        if refresh.sub == claims.sub {
            revoke(&state.users, &refresh).await?;
        }
    }
    audit.record(AuditEvent::new("auth.logout"));
    Ok(StatusCode::NO_CONTENT)
}

async fn audit_stats(State(state): State<AppState>) -> Json<serde_json::Value> {
    let mode = match state.mode {
        AuditMode::Layer => "layer",
        AuditMode::Inline => "inline",
        AuditMode::Off => "off",
    };
    Json(json!({ "mode": mode, "stats": state.audit.as_ref().map(AuditHandle::stats) }))
}

/// The anti-pattern `--audit=inline` reproduces: a second pooled connection, taken before the handler runs and
/// held across it, to write the audit row on the request path.
async fn inline_audit(State(state): State<AppState>, req: Request, next: Next) -> Response {
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
