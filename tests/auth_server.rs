//! The example auth server, driven over a real loopback socket with a real HTTP client. The router is the very
//! one `cargo run --example auth_server` serves (`examples/auth_server/app/`).
#![cfg(all(feature = "sqlite", feature = "postgres"))]

#[path = "../examples/auth_server/app/mod.rs"]
mod app;
mod common;

use std::time::Duration;

use app::{AuditMode, AuditOptions, AuditSinkKind, Claims, Config, DurableRoutes, Server, audit_policy};
use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::sqlite::SqlitePool;
use tower_audit::{AuditHandle, AuditLayer};

const SECRET: &str = "test-secret-of-reasonable-length";

struct Running {
    base: String,
    client: reqwest::Client,
    audit: Option<AuditHandle>,
    audit_url: String,
    users: sqlx::AnyPool,
    _dir: tempfile::TempDir,
}

async fn start(
    mode: AuditMode,
    pool_size: u32,
    acquire: Duration,
    audit: Option<(AuditLayer, AuditHandle)>,
) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let audit_url = format!("sqlite://{}", dir.path().join("audit.db").display());
    let config = Config {
        database_url: format!("sqlite://{}?mode=rwc", dir.path().join("users.db").display()),
        db_pool_size: pool_size,
        db_acquire_timeout: acquire,
        audit: mode,
        audit_sink: AuditSinkKind::Sqlite(audit_url.clone()),
        jwt_secret: Some(SECRET.to_owned()),
        // Cheap hashing keeps the tests fast; the server's default is Argon2id's recommended cost.
        argon2: argon2::Params::new(1024, 1, 1, None).unwrap(),
        ..Config::default()
    };
    let server = match audit {
        Some(prebuilt) => Server::start_with(config, Some(prebuilt)).await.unwrap(),
        None => Server::start(config).await.unwrap(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(app::serve(listener, server.router, std::future::pending()));
    Running { base, client: reqwest::Client::new(), audit: server.audit, audit_url, users: server.users, _dir: dir }
}

impl Running {
    async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        let res = self.client.post(format!("{}{path}", self.base)).json(&body).send().await.unwrap();
        read(res).await
    }

    async fn get_with(&self, path: &str, token: &str) -> (StatusCode, Value) {
        let res = self.client.get(format!("{}{path}", self.base)).bearer_auth(token).send().await.unwrap();
        read(res).await
    }

    /// Shuts the audit pipeline down and reads back every row between the pipeline's boot and shutdown events
    /// (checked to be the first and the last): (kind, outcome, actor, status, path).
    async fn audit_rows(&self) -> Vec<AuditRow> {
        let report = self.audit.as_ref().unwrap().shutdown(Duration::from_secs(30)).await;
        assert!(report.drained, "{report:?}");
        let pool = SqlitePool::connect(&self.audit_url).await.unwrap();
        let mut rows: Vec<AuditRow> =
            sqlx::query_as("SELECT kind, outcome, actor, status, path FROM audit_events ORDER BY seq")
                .fetch_all(&pool)
                .await
                .unwrap();
        let boot = rows.remove(0);
        let shutdown = rows.pop().unwrap();
        assert_eq!((boot.0.as_str(), shutdown.0.as_str()), ("audit.boot", "audit.shutdown"));
        assert!(rows.iter().all(|r| !r.0.starts_with("audit.")), "{rows:?}");
        rows
    }
}

/// (kind, outcome, actor, status, path)
type AuditRow = (String, String, Option<String>, Option<i64>, Option<String>);

async fn read(res: reqwest::Response) -> (StatusCode, Value) {
    let status = res.status();
    let text = res.text().await.unwrap();
    (status, if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap() })
}

fn alice() -> Value {
    json!({"email": "Alice@Example.com", "password": "correct horse battery", "country": "fr",
           "annual_income": 52000.5, "timezone": "Europe/Paris"})
}

fn token(claims: &Claims, secret: &str) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

#[tokio::test]
async fn the_whole_flow_answers_right_and_is_audited_exactly() {
    let s = start(AuditMode::Layer, 5, Duration::from_secs(5), None).await;

    let (status, registered) = s.post("/api/auth/register", alice()).await;
    assert_eq!(status, StatusCode::CREATED, "{registered}");
    assert_eq!(registered["token_type"], "bearer");
    assert_eq!(registered["expires_in"], 900);
    assert!(registered["access_token"].as_str().unwrap().len() > 20);
    assert!(registered["refresh_token"].as_str().unwrap().len() > 20);

    let (status, body) = s.post("/api/auth/register", alice()).await;
    assert_eq!((status, body), (StatusCode::CONFLICT, json!({"error": "email: already registered"})));

    let (status, login) =
        s.post("/api/auth/login", json!({"email": "alice@example.com", "password": "correct horse battery"})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(login["token_type"], "bearer");
    let access = login["access_token"].as_str().unwrap().to_owned();
    let refresh = login["refresh_token"].as_str().unwrap().to_owned();

    let denied = json!({"error": "invalid email or password"});
    let (status, body) =
        s.post("/api/auth/login", json!({"email": "alice@example.com", "password": "wrong password"})).await;
    assert_eq!((status, &body), (StatusCode::UNAUTHORIZED, &denied));
    let (status, body) =
        s.post("/api/auth/login", json!({"email": "nobody@example.com", "password": "whatever1"})).await;
    assert_eq!((status, &body), (StatusCode::UNAUTHORIZED, &denied), "no hint whether the email exists");

    let (status, user) = s.get_with("/api/auth/me", &access).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(user["email"], "alice@example.com");
    assert_eq!(user["country"], "FR");
    assert_eq!(user["annual_income"], 52000.5);
    assert_eq!(user["timezone"], "Europe/Paris");

    let claims: Claims = {
        let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
        v.validate_exp = true;
        jsonwebtoken::decode(&access, &jsonwebtoken::DecodingKey::from_secret(SECRET.as_bytes()), &v).unwrap().claims
    };
    let invalid = json!({"error": "invalid or expired token"});
    let forged = token(&claims, "some other secret");
    let (status, body) = s.get_with("/api/auth/me", &forged).await;
    assert_eq!((status, &body), (StatusCode::UNAUTHORIZED, &invalid));
    let expired = token(&Claims { iat: now() - 3600, exp: now() - 60, ..claims }, SECRET);
    let (status, body) = s.get_with("/api/auth/me", &expired).await;
    assert_eq!((status, &body), (StatusCode::UNAUTHORIZED, &invalid));

    let (status, pair) = s.post("/api/auth/refresh", json!({"refresh_token": refresh})).await;
    assert_eq!(status, StatusCode::OK);
    assert_ne!(pair["access_token"], access);
    let (status, body) = s.post("/api/auth/refresh", json!({"refresh_token": refresh})).await;
    assert_eq!((status, &body), (StatusCode::UNAUTHORIZED, &invalid), "a refresh token works once");

    let res = s.client.post(format!("{}/api/auth/logout", s.base)).bearer_auth(&access).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    let (status, body) = s.get_with("/api/auth/me", &access).await;
    assert_eq!((status, &body), (StatusCode::UNAUTHORIZED, &invalid), "revoked by logout");

    let (status, stats) = s.get_with("/api/audit/stats", "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(stats["mode"], "layer");
    assert_eq!(stats["stats"]["dropped_queue_full"], 0);
    assert_eq!(stats.get("naive"), None, "the naive layer's counts only with --audit naive");

    let a = Some("alice@example.com".to_owned());
    let row = |kind: &str, outcome: &str, actor: &Option<String>, status: Option<i64>, path: &str| {
        (kind.to_owned(), outcome.to_owned(), actor.clone(), status, Some(path.to_owned()))
    };
    let (reg, log, me, rf) = ("/api/auth/register", "/api/auth/login", "/api/auth/me", "/api/auth/refresh");
    let nobody = Some("nobody@example.com".to_owned());
    let expected = vec![
        row("auth.register_succeeded", "success", &a, None, reg),
        row("http.request", "success", &a, Some(201), reg),
        row("auth.register_conflict", "client_error", &a, None, reg),
        row("http.request", "client_error", &a, Some(409), reg),
        row("auth.login_succeeded", "success", &a, None, log),
        row("http.request", "success", &a, Some(200), log),
        row("auth.login_failed", "denied", &a, None, log),
        row("http.request", "denied", &a, Some(401), log),
        row("auth.login_failed", "denied", &nobody, None, log),
        row("http.request", "denied", &nobody, Some(401), log),
        row("http.request", "success", &a, Some(200), me),
        row("auth.token_invalid", "denied", &None, None, me),
        row("http.request", "denied", &None, Some(401), me),
        row("auth.token_invalid", "denied", &None, None, me),
        row("http.request", "denied", &None, Some(401), me),
        row("auth.token_refreshed", "success", &a, None, rf),
        row("http.request", "success", &a, Some(200), rf),
        row("auth.token_invalid", "denied", &a, None, rf),
        row("http.request", "denied", &a, Some(401), rf),
        row("auth.logout", "success", &a, None, "/api/auth/logout"),
        row("http.request", "success", &a, Some(204), "/api/auth/logout"),
        row("auth.token_invalid", "denied", &a, None, me),
        row("http.request", "denied", &a, Some(401), me),
        row("http.request", "success", &None, Some(200), "/api/audit/stats"),
    ];
    let rows = s.audit_rows().await;
    assert_eq!(rows, expected);

    // The reasons are in the trail, never in the responses.
    let pool = SqlitePool::connect(&s.audit_url).await.unwrap();
    let reasons: Vec<(String, String)> = sqlx::query_as(
        "SELECT kind, json_extract(attributes, '$.reason') FROM audit_events WHERE attributes LIKE '%reason%' ORDER BY seq",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let reasons: Vec<(&str, &str)> = reasons.iter().map(|(k, r)| (k.as_str(), r.as_str())).collect();
    assert_eq!(
        reasons,
        [
            ("auth.login_failed", "bad_password"),
            ("auth.login_failed", "unknown_email"),
            ("auth.token_invalid", "bad_signature"),
            ("auth.token_invalid", "expired"),
            ("auth.token_invalid", "revoked"),
            ("auth.token_invalid", "revoked"),
        ]
    );
    // Every request event has the client's address (the pipeline's own events have none).
    let addresses: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT client_addr FROM audit_events WHERE kind NOT IN ('audit.boot', 'audit.shutdown')",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(addresses, ["127.0.0.1"]);
}

#[tokio::test]
async fn bad_input_gets_a_json_error_and_the_server_keeps_serving() {
    let s = start(AuditMode::Layer, 5, Duration::from_secs(5), None).await;
    let with = |field: &str, value: Value| {
        let mut body = alice();
        body[field] = value;
        body
    };
    let cases = [
        (with("email", json!("not-an-email")), 422, "email: not a valid email address"),
        (with("email", json!("two@@example.com")), 422, "email: not a valid email address"),
        (with("password", json!("short")), 422, "password: must be at least 8 characters"),
        (with("password", json!("x".repeat(129))), 422, "password: must be at most 128 characters"),
        (with("country", json!("XX")), 422, "country: not an ISO 3166-1 alpha-2 country code"),
        (with("country", json!("FRA")), 422, "country: not an ISO 3166-1 alpha-2 country code"),
        (with("annual_income", json!(-1)), 422, "annual_income: must be a non-negative number"),
        (with("timezone", json!("Mars/Olympus_Mons")), 422, "timezone: not a known IANA time zone (e.g. Europe/Paris)"),
    ];
    for (body, status, error) in cases {
        let (got, json) = s.post("/api/auth/register", body.clone()).await;
        assert_eq!((got.as_u16(), &json), (status, &json!({ "error": error })), "{body}");
    }

    let raw = |body: &'static str, content_type: &'static str| {
        s.client.post(format!("{}/api/auth/register", s.base)).header("content-type", content_type).body(body).send()
    };
    let (status, body) = read(raw("{not json", "application/json").await.unwrap()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body["error"].as_str().unwrap().starts_with("Failed to parse the request body as JSON"), "{body}");
    let (status, body) = read(raw(r#"{"email": "x@example.com"}"#, "application/json").await.unwrap()).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(body["error"].as_str().unwrap().contains("missing field `password`"), "{body}");
    let (status, body) = read(raw(r#"{"email": 5}"#, "application/json").await.unwrap()).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(body["error"].as_str().unwrap().contains("invalid type"), "{body}");
    let (status, body) = read(raw("{}", "text/plain").await.unwrap()).await;
    assert_eq!(
        (status, body),
        (StatusCode::UNSUPPORTED_MEDIA_TYPE, json!({"error": "expected a JSON body (content-type: application/json)"}))
    );
    let huge = Box::leak(format!(r#"{{"email": "{}"}}"#, "a".repeat(20 * 1024)).into_boxed_str());
    let (status, body) = read(raw(huge, "application/json").await.unwrap()).await;
    assert_eq!((status, body), (StatusCode::PAYLOAD_TOO_LARGE, json!({"error": "request body is too large"})));
    let (status, body) = s.get_with("/api/nowhere", "").await;
    assert_eq!((status, body), (StatusCode::NOT_FOUND, json!({"error": "no such endpoint"})));
    let res = s.client.get(format!("{}/api/auth/me", s.base)).send().await.unwrap();
    assert_eq!(read(res).await, (StatusCode::UNAUTHORIZED, json!({"error": "missing bearer token"})));

    // Still serving.
    let (status, _) = s.post("/api/auth/register", alice()).await;
    assert_eq!(status, StatusCode::CREATED);
    let users: i64 = sqlx::query_scalar("SELECT count(*) FROM users").fetch_one(&s.users).await.unwrap();
    assert_eq!(users, 1);
    let rows = s.audit_rows().await;
    let requests = rows.iter().filter(|r| r.0 == "http.request").count();
    assert_eq!(requests, 8 + 5 + 3, "every request, good or bad, is audited once");
}

fn registration(i: usize) -> Value {
    json!({"email": format!("user{i}@example.com"), "password": "password123", "country": "DE",
           "annual_income": 1000 + i, "timezone": "Europe/Berlin"})
}

async fn register_concurrently(s: &Running, n: usize) -> Vec<(StatusCode, Value)> {
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let (client, url) = (s.client.clone(), format!("{}/api/auth/register", s.base));
        tasks.spawn(async move { read(client.post(url).json(&registration(i)).send().await.unwrap()).await });
    }
    tasks.join_all().await
}

/// The incident: a user-store pool of one connection, 50 concurrent registrations.
#[tokio::test]
async fn with_a_pool_of_one_inline_auditing_stalls_while_the_layer_serves_everyone() {
    const ACQUIRE: Duration = Duration::from_secs(2);

    let inline = start(AuditMode::Inline, 1, ACQUIRE, None).await;
    let results = register_concurrently(&inline, 50).await;
    let busy = json!({"error": "database busy: timed out waiting for a connection"});
    let stalled =
        results.iter().filter(|(status, body)| *status == StatusCode::SERVICE_UNAVAILABLE && *body == busy).count();
    assert_eq!(stalled, 50, "every request waited for the acquire timeout: {:?}", results.first());
    let users: i64 = sqlx::query_scalar("SELECT count(*) FROM users").fetch_one(&inline.users).await.unwrap();
    assert_eq!(users, 0);

    let layered = start(AuditMode::Layer, 1, ACQUIRE, None).await;
    let results = register_concurrently(&layered, 50).await;
    assert!(
        results.iter().all(|(status, _)| *status == StatusCode::CREATED),
        "{:?}",
        results.iter().find(|r| r.0 != 201)
    );
    let users: i64 = sqlx::query_scalar("SELECT count(*) FROM users").fetch_one(&layered.users).await.unwrap();
    assert_eq!(users, 50);
    let rows = layered.audit_rows().await;
    assert_eq!(rows.iter().filter(|r| r.0 == "http.request" && r.3 == Some(201)).count(), 50);
    assert_eq!(rows.iter().filter(|r| r.0 == "auth.register_succeeded").count(), 50);
    assert_eq!(rows.len(), 100);
}

#[tokio::test]
async fn a_stalled_audit_sink_neither_slows_nor_fails_any_auth_request() {
    let stalled = common::StalledSink::default();
    let prebuilt = AuditLayer::builder(stalled.clone())
        .capacity(16)
        .batch_size(4)
        .sink_timeout(Duration::from_secs(3600))
        .build()
        .unwrap();
    let handle = prebuilt.1.clone();
    let s = start(AuditMode::Layer, 5, Duration::from_secs(5), Some(prebuilt)).await;
    for i in 0..20 {
        let (status, body) = s.post("/api/auth/register", registration(i)).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let (status, _) = s
            .post("/api/auth/login", json!({"email": format!("user{i}@example.com"), "password": "password123"}))
            .await;
        assert_eq!(status, StatusCode::OK);
    }
    let stats = handle.stats();
    // Two events per request (the request and its security event), 40 requests: every one queued or counted.
    assert_eq!(stats.accepted + stats.dropped_queue_full, 80, "{stats:?}");
    assert!(stats.dropped_queue_full > 0);
    assert_eq!(stats.written, 0);
}

/// `--audit naive` (the benchmarks' floor): every request's event is counted, queued or refused, and drained;
/// the server keeps no trail.
#[tokio::test]
async fn the_naive_benchmark_mode_counts_every_request_and_keeps_no_trail() {
    let s = start(AuditMode::Naive, 5, Duration::from_secs(5), None).await;
    assert!(s.audit.is_none());
    assert_eq!(s.post("/api/auth/register", alice()).await.0, StatusCode::CREATED);
    let login = json!({"email": "alice@example.com", "password": "correct horse battery"});
    let (status, tokens) = s.post("/api/auth/login", login).await;
    assert_eq!(status, StatusCode::OK);
    for _ in 0..8 {
        assert_eq!(s.get_with("/api/auth/me", tokens["access_token"].as_str().unwrap()).await.0, StatusCode::OK);
    }
    // Each stats request is counted after it has read the counts: the n-th sees the 10 requests and n - 1 stats.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut reads = 0;
    let naive = loop {
        let (status, body) = s.get_with("/api/audit/stats", "").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!((&body["mode"], &body["stats"]), (&json!("naive"), &Value::Null), "{body}");
        let naive = body["naive"].clone();
        assert_eq!((&naive["queued"], &naive["full"]), (&json!(10 + reads), &json!(0)), "{body}");
        reads += 1;
        if naive["drained"] == naive["queued"] {
            break naive;
        }
        assert!(tokio::time::Instant::now() < deadline, "the drain never caught up: {body}");
        tokio::task::yield_now().await;
    };
    assert!(naive["drained"].as_u64().unwrap() >= 10, "{naive}");
    assert!(!std::path::Path::new(s.audit_url.trim_start_matches("sqlite://")).exists(), "no audit database");
}

/// `--audit-sink null` (benchmarks): the pipeline runs whole, and every event reaches the sink, which keeps none.
#[tokio::test]
async fn the_null_benchmark_sink_takes_every_event() {
    let options = AuditOptions { durable: DurableRoutes::None, batch_size: 4, ..AuditOptions::default() };
    let prebuilt = app::audit_pipeline(&AuditSinkKind::Null, options).await.unwrap();
    let handle = prebuilt.1.clone();
    let s = start(AuditMode::Layer, 5, Duration::from_secs(5), Some(prebuilt)).await;
    assert_eq!(s.post("/api/auth/register", alice()).await.0, StatusCode::CREATED);
    for _ in 0..9 {
        assert_eq!(s.get_with("/api/auth/me", "not a token").await.0, StatusCode::UNAUTHORIZED);
    }
    let report = handle.shutdown(Duration::from_secs(30)).await;
    assert!(report.drained, "{report}");
    // 10 requests, the registration's security event and 9 `auth.token_invalid`: 20, all written, none lost.
    let stats = report.stats;
    assert_eq!((stats.accepted, stats.written, stats.dropped_queue_full, stats.lost), (20, 20, 0, 0), "{stats:?}");
}

#[tokio::test]
async fn with_the_audit_sink_frozen_auth_actions_answer_503_in_time_and_the_rest_keeps_serving() {
    let timeout = Duration::from_millis(300);
    let stalled = common::StalledSink::default();
    let prebuilt =
        AuditLayer::builder(stalled.clone()).policy(audit_policy(DurableRoutes::Auth, timeout)).build().unwrap();
    let handle = prebuilt.1.clone();
    let s = start(AuditMode::Layer, 5, Duration::from_secs(5), Some(prebuilt)).await;
    let started = std::time::Instant::now();
    let res = s.client.post(format!("{}/api/auth/register", s.base)).json(&alice()).send().await.unwrap();
    let waited = started.elapsed();
    assert_eq!((res.status(), res.headers()["retry-after"].to_str().unwrap()), (StatusCode::SERVICE_UNAVAILABLE, "1"));
    assert!(waited >= timeout && waited < timeout + Duration::from_secs(2), "{waited:?}");
    // The handler did act (the user exists): the 503 says the outcome is not known to the trail, not that nothing
    // happened; the trail will have the request (when the sink comes back) and an audit.response_withheld event.
    let (status, _) =
        s.post("/api/auth/login", json!({"email": "alice@example.com", "password": "correct horse battery"})).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let id: String =
        sqlx::query_scalar("SELECT id FROM users WHERE email = 'alice@example.com'").fetch_one(&s.users).await.unwrap();
    let claims = Claims {
        sub: id,
        email: "alice@example.com".to_owned(),
        typ: "access".to_owned(),
        jti: "j-1".to_owned(),
        iat: now(),
        exp: now() + 600,
    };
    // Best effort and skipped routes answer as usual.
    for _ in 0..20 {
        let (status, body) = s.get_with("/api/auth/me", &token(&claims, SECRET)).await;
        assert_eq!((status, body["email"].as_str()), (StatusCode::OK, Some("alice@example.com")));
        let res = s.client.get(format!("{}/health", s.base)).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
    }
    let stats = handle.stats();
    assert_eq!((stats.durable_withheld, stats.durable_confirmed, stats.skipped), (2, 0, 20));
}

#[tokio::test]
async fn with_intents_a_frozen_audit_sink_stops_auth_actions_before_they_act() {
    let timeout = Duration::from_millis(300);
    let prebuilt = AuditLayer::builder(common::StalledSink::default())
        .policy(audit_policy(DurableRoutes::AuthIntent, timeout))
        .build()
        .unwrap();
    let handle = prebuilt.1.clone();
    let s = start(AuditMode::Layer, 5, Duration::from_secs(5), Some(prebuilt)).await;
    let res = s.client.post(format!("{}/api/auth/register", s.base)).json(&alice()).send().await.unwrap();
    assert_eq!((res.status(), res.headers()["retry-after"].to_str().unwrap()), (StatusCode::SERVICE_UNAVAILABLE, "1"));
    // Unlike `Durable`, the handler never ran: no user was created.
    let users: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM users").fetch_one(&s.users).await.unwrap();
    assert_eq!(users, 0);
    assert_eq!((handle.stats().durable_withheld, handle.stats().durable_confirmed), (1, 0));
}

#[tokio::test]
async fn with_intents_each_auth_action_has_its_intent_before_its_request_in_the_trail() {
    let dir = tempfile::tempdir().unwrap();
    let audit_url = format!("sqlite://{}", dir.path().join("intents.db").display());
    let options = AuditOptions { durable: DurableRoutes::AuthIntent, ..AuditOptions::default() };
    let prebuilt = app::audit_pipeline(&AuditSinkKind::Sqlite(audit_url.clone()), options).await.unwrap();
    let handle = prebuilt.1.clone();
    let s = start(AuditMode::Layer, 5, Duration::from_secs(5), Some(prebuilt)).await;
    assert_eq!(s.post("/api/auth/register", alice()).await.0, StatusCode::CREATED);
    let login = json!({"email": "alice@example.com", "password": "correct horse battery"});
    let (status, tokens) = s.post("/api/auth/login", login).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(s.get_with("/api/auth/me", tokens["access_token"].as_str().unwrap()).await.0, StatusCode::OK);
    let report = handle.shutdown(Duration::from_secs(30)).await;
    assert!(report.drained, "{report}");
    assert_eq!((report.stats.durable_confirmed, report.stats.durable_withheld), (2, 0));
    let pool = SqlitePool::connect(&audit_url).await.unwrap();
    let rows: Vec<(String, Option<String>, Option<i64>)> = sqlx::query_as(
        "SELECT kind, path, status FROM audit_events WHERE kind NOT LIKE 'audit.%' AND kind NOT LIKE 'auth.%' \
         ORDER BY seq",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let row = |kind: &str, path: &str, status: Option<i64>| (kind.to_owned(), Some(path.to_owned()), status);
    assert_eq!(
        rows,
        [
            row("http.intent", "/api/auth/register", None),
            row("http.request", "/api/auth/register", Some(201)),
            row("http.intent", "/api/auth/login", None),
            row("http.request", "/api/auth/login", Some(200)),
            // `/me` is best effort: no intent.
            row("http.request", "/api/auth/me", Some(200)),
        ]
    );
}

/// `DATABASE_URL` switches the user store to Postgres (a fresh database, so reruns start clean).
#[tokio::test]
async fn the_user_store_also_runs_on_postgres() {
    let Some(admin) = common::pg_pool(sqlx::postgres::PgPoolOptions::new()).await else { return };
    let url = common::pg_url();
    sqlx::raw_sql("DROP DATABASE IF EXISTS tower_audit_auth WITH (FORCE)").execute(&admin).await.unwrap();
    sqlx::raw_sql("CREATE DATABASE tower_audit_auth").execute(&admin).await.unwrap();
    let options: sqlx::postgres::PgConnectOptions = url.parse().unwrap();
    let store_url =
        format!("postgres://{}@{}:{}/tower_audit_auth", options.get_username(), options.get_host(), options.get_port());

    let dir = tempfile::tempdir().unwrap();
    let audit_url = format!("sqlite://{}", dir.path().join("audit.db").display());
    let config = Config {
        database_url: store_url,
        audit_sink: AuditSinkKind::Sqlite(audit_url.clone()),
        jwt_secret: Some(SECRET.to_owned()),
        argon2: argon2::Params::new(1024, 1, 1, None).unwrap(),
        ..Config::default()
    };
    let server = Server::start(config).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(app::serve(listener, server.router, std::future::pending()));
    let s = Running {
        base,
        client: reqwest::Client::new(),
        audit: server.audit,
        audit_url,
        users: server.users,
        _dir: dir,
    };

    let (status, _) = s.post("/api/auth/register", alice()).await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, body) = s.post("/api/auth/register", alice()).await;
    assert_eq!((status, body), (StatusCode::CONFLICT, json!({"error": "email: already registered"})));
    let (status, login) =
        s.post("/api/auth/login", json!({"email": "alice@example.com", "password": "correct horse battery"})).await;
    assert_eq!(status, StatusCode::OK);
    let access = login["access_token"].as_str().unwrap().to_owned();
    let (status, user) = s.get_with("/api/auth/me", &access).await;
    assert_eq!(
        (status, &user["email"], &user["annual_income"]),
        (StatusCode::OK, &json!("alice@example.com"), &json!(52000.5))
    );
    let res = s.client.post(format!("{}/api/auth/logout", s.base)).bearer_auth(&access).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    let (status, _) = s.get_with("/api/auth/me", &access).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let rows = s.audit_rows().await;
    assert_eq!(rows.iter().filter(|r| r.0 == "http.request").count(), 6);
    s.users.close().await;
    sqlx::raw_sql("DROP DATABASE IF EXISTS tower_audit_auth WITH (FORCE)").execute(&admin).await.unwrap();
}
