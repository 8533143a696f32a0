//! A Tonic key-value service audited with `tower-audit`: every call becomes a `grpc.call` event with its real
//! gRPC status, streaming calls are timed to the end of the stream, and cancelled calls are recorded once.
//!
//! ```text
//! cargo run --example grpc_server --features tonic
//! cargo run --example grpc_server --features tonic -- --help
//! ```
//!
//! Events go to `data/grpc_audit.jsonl` (`--data-dir`/`DATA_DIR` or `--audit-file`/`AUDIT_FILE` to change); the
//! service listens on `127.0.0.1:50051` (`--addr`/`ADDR`). `Put` needs the metadata
//! `authorization: Bearer <KV_TOKEN>` (`--kv-token`, default `dev-token`).

mod kv;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use tower_audit::{AuditLayer, JsonLinesSink};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::LevelFilter;

/// A gRPC key-value service audited into a JSON-lines file.
#[derive(Debug, Parser)]
#[command(name = "grpc_server", after_help = "Environment only:\n  RUST_LOG  log filter [default: info]")]
struct Cli {
    /// Address to listen on.
    #[arg(long, env = "ADDR", default_value = "127.0.0.1:50051")]
    addr: String,
    /// Directory for the default audit file; created if missing.
    #[arg(long, env = "DATA_DIR", default_value = "data")]
    data_dir: PathBuf,
    /// The JSON-lines audit file [default: <DATA_DIR>/grpc_audit.jsonl]
    #[arg(long, env = "AUDIT_FILE")]
    audit_file: Option<PathBuf>,
    /// Bearer token that `Put` requires.
    #[arg(long, env = "KV_TOKEN", default_value = "dev-token", hide_env_values = true)]
    kv_token: String,
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
    let path = cli.audit_file.unwrap_or_else(|| cli.data_dir.join("grpc_audit.jsonl"));
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let (audit, handle) = AuditLayer::builder(JsonLinesSink::open(&path)?).build()?;
    println!("key-value service on {}, auditing into {}", listener.local_addr()?, path.display());
    kv::serve(listener, kv::Kv::new(&cli.kv_token), audit, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await?;
    let report = handle.shutdown(Duration::from_secs(10)).await;
    println!("audit pipeline: {report}");
    Ok(())
}
