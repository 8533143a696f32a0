//! The incident, with a real pool: a handler holds a connection from a pool of one across an await.
//!
//! With `tower-audit` (sink sharing that pool, or on its own) every request completes and every event lands.
//! Beside it, the anti-pattern the crate replaces: a request-path audit INSERT through a second connection from
//! the same pool, which stalls every request until the pool's acquire timeout.
#![cfg(feature = "postgres")]

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use sqlx::postgres::{PgPool, PgPoolOptions};
use tower_audit::{AuditContext, AuditLayer, PostgresSink};

/// The user store's pool: one connection.
async fn user_pool(acquire_timeout: Duration) -> Option<PgPool> {
    common::pg_pool(PgPoolOptions::new().max_connections(1).acquire_timeout(acquire_timeout)).await
}

#[derive(Clone)]
struct App {
    pool: PgPool,
    /// The anti-pattern: write the audit row on the request path through a second pooled connection.
    inline_audit_table: Option<&'static str>,
}

async fn login(State(app): State<App>, audit: Option<AuditContext>) -> Result<&'static str, (StatusCode, String)> {
    let fail = |e: sqlx::Error| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
    // The handler's own connection, held across awaits, as the incident's handler held its session.
    let mut conn = app.pool.acquire().await.map_err(fail)?;
    sqlx::query("SELECT pg_sleep(0.001)").execute(&mut *conn).await.map_err(fail)?;
    if let Some(table) = app.inline_audit_table {
        let mut audit_conn = app.pool.acquire().await.map_err(fail)?;
        sqlx::query(sqlx::AssertSqlSafe(format!("INSERT INTO {table} (what) VALUES ('login')")))
            .execute(&mut *audit_conn)
            .await
            .map_err(fail)?;
    }
    if let Some(audit) = audit {
        audit.set_actor("user@example.com");
    }
    drop(conn);
    Ok("ok")
}

async fn serve(router: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    addr
}

/// Sends `n` concurrent logins; returns each response's status and body.
async fn logins(addr: SocketAddr, n: usize) -> Vec<(u16, String)> {
    let client = reqwest::Client::new();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..n {
        let client = client.clone();
        tasks.spawn(async move {
            let res = client.post(format!("http://{addr}/api/auth/login")).send().await.unwrap();
            (res.status().as_u16(), res.text().await.unwrap())
        });
    }
    tasks.join_all().await
}

async fn layered_run(shared: bool, prefix: &str) {
    const REQUESTS: usize = 200;
    // Far longer than the whole run needs; a request that hits it fails the test.
    let Some(pool) = user_pool(Duration::from_secs(20)).await else { return };
    let scratch = common::PgScratch::new(&pool, prefix).await;
    let table = scratch.table();
    let sink = if shared {
        PostgresSink::from_pool(pool.clone())
    } else {
        PostgresSink::connect(&common::pg_url()).await.unwrap()
    };
    let sink = sink.table(&table).unwrap();
    sink.ensure_schema().await.unwrap();
    let (layer, handle) = AuditLayer::builder(sink).build().unwrap();
    let router = Router::new()
        .route("/api/auth/login", post(login))
        .layer(layer)
        .with_state(App { pool: pool.clone(), inline_audit_table: None });
    let addr = serve(router).await;

    let results = tokio::time::timeout(Duration::from_secs(60), logins(addr, REQUESTS)).await.expect("requests hung");
    let failed: Vec<_> = results.iter().filter(|(status, _)| *status != 200).collect();
    assert!(failed.is_empty(), "{} of {REQUESTS} failed, first: {:?}", failed.len(), failed.first());

    let report = handle.shutdown(Duration::from_secs(30)).await;
    assert!(report.drained, "{report:?}");
    assert_eq!(report.stats.written, REQUESTS as u64);
    let (rows, actors, bookends): (i64, i64, i64) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT count(*), count(*) FILTER (WHERE actor = 'user@example.com' AND status = 200), \
         count(*) FILTER (WHERE kind IN ('audit.boot', 'audit.shutdown')) FROM {table}"
    )))
    .fetch_one(&pool)
    .await
    .unwrap();
    // Every request's event, and the pipeline's boot and shutdown events.
    assert_eq!((rows, actors, bookends), (REQUESTS as i64 + 2, REQUESTS as i64, 2));
}

#[tokio::test]
async fn layer_with_sink_sharing_the_pool_of_one_serves_every_request() {
    layered_run(true, "t_incident_shared").await;
}

#[tokio::test]
async fn layer_with_sink_on_its_own_pool_serves_every_request() {
    layered_run(false, "t_incident_own").await;
}

#[tokio::test]
async fn the_anti_pattern_stalls_every_request_until_the_acquire_timeout() {
    const ACQUIRE_TIMEOUT: Duration = Duration::from_millis(500);
    let Some(pool) = user_pool(ACQUIRE_TIMEOUT).await else { return };
    let scratch = common::PgScratch::new(&pool, "t_inline_audit").await;
    // The handler's state wants a `&'static str`; one short string per test run.
    let inline_table: &'static str = Box::leak(scratch.qualified("inline_audit").into_boxed_str());
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE TABLE {inline_table} (what text)")))
        .execute(&pool)
        .await
        .unwrap();
    let router = Router::new()
        .route("/api/auth/login", post(login))
        .with_state(App { pool: pool.clone(), inline_audit_table: Some(inline_table) });
    let addr = serve(router).await;

    let started = Instant::now();
    let results = tokio::time::timeout(Duration::from_secs(60), logins(addr, 5)).await.expect("requests hung");
    // Each request holds the only connection while it waits for a second one: it can only time out.
    assert!(started.elapsed() >= ACQUIRE_TIMEOUT);
    for (status, body) in &results {
        assert_eq!(*status, 500);
        assert!(body.contains("timed out"), "{body}");
    }
    let rows: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {inline_table}")))
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(rows, 0, "no audit row was written, and no login succeeded");
}
