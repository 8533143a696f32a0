//! The smallest useful setup: an Axum app audited into a JSON-lines file, shut down gracefully on Ctrl-C.
//!
//! ```text
//! cargo run --example basic
//! curl -H 'x-request-id: demo-1' http://127.0.0.1:3000/hello/world
//! tail -n1 audit.jsonl
//! ```

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::extract::Path;
use axum::routing::get;
use tower_audit::{AuditContext, AuditLayer, JsonLinesSink, TracingSink};

/// The router, in a function so tests can drive exactly what the example runs.
fn app(audit: AuditLayer) -> Router {
    Router::new().route("/hello/{name}", get(hello)).layer(audit)
}

async fn hello(Path(name): Path<String>, audit: AuditContext) -> String {
    audit.set_actor(&name);
    format!("hello, {name}\n")
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt().init();
    let path = std::env::var("AUDIT_FILE").unwrap_or_else(|_| "audit.jsonl".to_owned());
    let (audit, handle) = AuditLayer::builder(JsonLinesSink::open(&path)?).fallback(TracingSink::new()).build()?;
    let addr = std::env::var("ADDR").unwrap_or_else(|_| "127.0.0.1:3000".to_owned());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("listening on http://{addr}, auditing into {path}");
    axum::serve(listener, app(audit).into_make_service_with_connect_info::<SocketAddr>())
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    let report = handle.shutdown(Duration::from_secs(10)).await;
    println!("audit pipeline: {report}");
    Ok(())
}
