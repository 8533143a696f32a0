//! The smallest useful setup: an Axum app audited into a JSON-lines file, shut down gracefully on Ctrl-C.
//!
//! ```text
//! cargo run --example basic                # --help: --addr (ADDR), --data-dir (DATA_DIR), --audit-file (AUDIT_FILE)
//! curl -H 'x-request-id: demo-1' http://127.0.0.1:3001/hello/world
//! tail -n1 data/audit.jsonl
//! ```

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use axum::Router;
use axum::extract::Path;
use axum::routing::get;
use clap::Parser;
use tower_audit::{AuditContext, AuditLayer, JsonLinesSink, TracingSink};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::LevelFilter;

/// An Axum app audited into a JSON-lines file.
#[derive(Debug, Parser)]
#[command(name = "basic", after_help = "Environment only:\n  RUST_LOG  log filter [default: info]")]
struct Cli {
    /// Address to listen on.
    #[arg(long, env = "ADDR", default_value = "127.0.0.1:3001")]
    addr: String,
    /// Directory for the default audit file; created if missing.
    #[arg(long, env = "DATA_DIR", default_value = "data")]
    data_dir: PathBuf,
    /// The JSON-lines audit file [default: <DATA_DIR>/audit.jsonl]
    #[arg(long, env = "AUDIT_FILE")]
    audit_file: Option<PathBuf>,
}

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
    let filter = EnvFilter::builder().with_default_directive(LevelFilter::INFO.into()).from_env_lossy();
    tracing_subscriber::fmt().with_env_filter(filter).with_ansi(std::io::stdout().is_terminal()).init();
    let cli = Cli::parse();
    // Bind first: a taken port must fail before any file is created.
    let listener = match tokio::net::TcpListener::bind(&cli.addr).await {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!("error: cannot listen on {}: {error}\nchoose another address with --addr or ADDR", cli.addr);
            std::process::exit(1);
        }
    };
    let path = cli.audit_file.unwrap_or_else(|| cli.data_dir.join("audit.jsonl"));
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let (audit, handle) = AuditLayer::builder(JsonLinesSink::open(&path)?).fallback(TracingSink::new()).build()?;
    println!("listening on http://{}, auditing into {}", listener.local_addr()?, path.display());
    axum::serve(listener, app(audit).into_make_service_with_connect_info::<SocketAddr>())
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    let report = handle.shutdown(Duration::from_secs(10)).await;
    println!("audit pipeline: {report}");
    Ok(())
}
