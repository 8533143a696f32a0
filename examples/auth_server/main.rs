//! An auth service audited with `tower-audit`: the incident's API, done right.
//!
//! ```text
//! cargo run --release --example auth_server --features sqlite,postgres
//! ```
//!
//! Flags (each also an environment variable):
//!
//! | flag | env | default |
//! |---|---|---|
//! | `--addr ADDR` | `ADDR` | `127.0.0.1:3000` |
//! | `--database-url URL` | `DATABASE_URL` | `sqlite://auth_server.db?mode=rwc` (created on first start) |
//! | `--db-pool-size N` | `DB_POOL_SIZE` | `5` |
//! | `--audit layer\|inline\|off` | `AUDIT` | `layer` |
//! | `--audit-sink sqlite\|jsonl\|postgres\|stalled` | `AUDIT_SINK` | `sqlite` (`auth_server_audit.db`); `stalled` never returns (benchmarks) |
//! | `--audit-url URL_OR_PATH` | `AUDIT_URL` | per sink: `sqlite://auth_server_audit.db`, `auth_server_audit.jsonl`, `$DATABASE_URL` |
//! | — | `JWT_SECRET` | generated at start |

mod app;

use std::time::Duration;

use app::{AuditMode, AuditSinkKind, Config, Server};

fn setting(args: &[String], flag: &str, env: &str) -> Option<String> {
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1).cloned())
        .or_else(|| args.iter().find_map(|a| a.strip_prefix(&format!("{flag}=")).map(str::to_owned)))
        .or_else(|| std::env::var(env).ok())
}

fn config(args: &[String]) -> Result<(String, Config), String> {
    let mut config = Config::default();
    if let Some(url) = setting(args, "--database-url", "DATABASE_URL") {
        config.database_url = url;
    }
    if let Some(n) = setting(args, "--db-pool-size", "DB_POOL_SIZE") {
        config.db_pool_size = n.parse().map_err(|_| format!("--db-pool-size: `{n}` is not a number"))?;
    }
    config.audit = match setting(args, "--audit", "AUDIT").as_deref() {
        None | Some("layer") => AuditMode::Layer,
        Some("inline") => AuditMode::Inline,
        Some("off") => AuditMode::Off,
        Some(other) => return Err(format!("--audit: `{other}` is not one of layer, inline, off")),
    };
    let url = setting(args, "--audit-url", "AUDIT_URL");
    config.audit_sink = match setting(args, "--audit-sink", "AUDIT_SINK").as_deref() {
        None | Some("sqlite") => AuditSinkKind::Sqlite(url.unwrap_or_else(|| "sqlite://auth_server_audit.db".into())),
        Some("jsonl") => AuditSinkKind::JsonLines(url.unwrap_or_else(|| "auth_server_audit.jsonl".into()).into()),
        Some("postgres") => AuditSinkKind::Postgres(
            url.or_else(|| std::env::var("DATABASE_URL").ok())
                .ok_or("--audit-sink postgres needs --audit-url or DATABASE_URL")?,
        ),
        Some("stalled") => AuditSinkKind::Stalled,
        Some(other) => return Err(format!("--audit-sink: `{other}` is not one of sqlite, jsonl, postgres, stalled")),
    };
    config.jwt_secret = std::env::var("JWT_SECRET").ok();
    let addr = setting(args, "--addr", "ADDR").unwrap_or_else(|| "127.0.0.1:3000".into());
    Ok((addr, config))
}

#[tokio::main]
async fn main() -> Result<(), app::BoxError> {
    tracing_subscriber::fmt().with_env_filter_or_default();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (addr, config) = config(&args).map_err(|e| {
        eprintln!("error: {e}");
        std::process::exit(2)
    })?;
    let mode = config.audit;
    let server = Server::start(config).await?;
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("auth server listening on http://{addr} (audit: {mode:?})");
    app::serve(listener, server.router, async {
        let _ = tokio::signal::ctrl_c().await;
        println!("shutting down: finishing in-flight requests");
    })
    .await?;
    if let Some(audit) = server.audit {
        let report = audit.shutdown(Duration::from_secs(10)).await;
        println!("audit pipeline: {report}");
    }
    server.users.close().await;
    Ok(())
}

trait InitTracing {
    fn with_env_filter_or_default(self);
}

impl InitTracing for tracing_subscriber::fmt::SubscriberBuilder {
    fn with_env_filter_or_default(self) {
        self.with_max_level(tracing::Level::INFO).init();
    }
}
