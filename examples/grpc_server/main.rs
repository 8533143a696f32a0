//! A Tonic key-value service audited with `tower-audit`: every call becomes a `grpc.call` event with its real
//! gRPC status, streaming calls are timed to the end of the stream, and cancelled calls are recorded once.
//!
//! ```text
//! cargo run --example grpc_server --features tonic
//! ```
//!
//! Events go to `grpc_audit.jsonl` (`AUDIT_FILE` to change); the service listens on `127.0.0.1:50051` (`ADDR`).
//! `Put` needs the metadata `authorization: Bearer <KV_TOKEN>` (default token `dev-token`).

mod kv;

use std::time::Duration;

use tower_audit::{AuditLayer, JsonLinesSink};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt().init();
    let addr = std::env::var("ADDR").unwrap_or_else(|_| "127.0.0.1:50051".to_owned());
    let path = std::env::var("AUDIT_FILE").unwrap_or_else(|_| "grpc_audit.jsonl".to_owned());
    let token = std::env::var("KV_TOKEN").unwrap_or_else(|_| "dev-token".to_owned());
    let (audit, handle) = AuditLayer::builder(JsonLinesSink::open(&path)?).build()?;
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("key-value service on {addr}, auditing into {path}");
    kv::serve(listener, kv::Kv::new(&token), audit, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await?;
    let report = handle.shutdown(Duration::from_secs(10)).await;
    println!("audit pipeline: {report}");
    Ok(())
}
