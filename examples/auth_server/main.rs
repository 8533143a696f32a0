//! An auth service audited with `tower-audit`: the incident's API, done right.
//!
//! ```text
//! cargo run --release --example auth_server --features sqlite,postgres,metrics
//! cargo run --example auth_server --features sqlite,postgres,metrics -- --help
//! ```
//!
//! Flags (each also an environment variable; `--help` lists them with their defaults):
//!
//! | flag | env | default |
//! |---|---|---|
//! | `--addr ADDR` | `ADDR` | `127.0.0.1:3000` |
//! | `--data-dir DIR` | `DATA_DIR` | `data` (created if missing; holds the default databases below) |
//! | `--database-url URL` | `DATABASE_URL` | `sqlite://DIR/auth_server.db?mode=rwc` (created on first start) |
//! | `--db-pool-size N` | `DB_POOL_SIZE` | `5` |
//! | `--audit layer\|inline\|naive\|off` | `AUDIT` | `layer` |
//! | `--audit-sink sqlite\|jsonl\|postgres\|nats\|stalled\|null` | `AUDIT_SINK` | `sqlite`; `nats` needs `--features …,nats`; `stalled` never returns, `null` keeps nothing (benchmarks) |
//! | `--audit-url URL_OR_PATH` | `AUDIT_URL` | per sink: `sqlite://DIR/auth_server_audit.db`, `DIR/auth_server_audit.jsonl`, the user store's URL, `nats://127.0.0.1:4222` |
//! | `--audit-stream NAME` | `AUDIT_STREAM` | `AUDIT` (with `nats`; made on `audit.>` if missing) |
//! | `--spill-dir DIR` | `SPILL_DIR` | off; e.g. `data/spill`: audit batches wait on disk through a sink outage or a crash |
//! | `--spill-sync every-batch\|interval` | `SPILL_SYNC` | `interval` (fdatasync every 200 ms; `every-batch` before each sink call) |
//! | `--durable auth\|auth-intent\|all\|none` | `DURABLE` | `auth`: register, login, refresh and logout answer only once their event is durable; `auth-intent` also makes an intent durable before their handler runs |
//! | `--durable-timeout-ms MS` | `DURABLE_TIMEOUT_MS` | `2000`: then a durable route answers 503 with `Retry-After` |
//! | `--audit-batch-size N` | `AUDIT_BATCH_SIZE` | `128` into SQLite (`SqliteSink::SUGGESTED_BATCH_SIZE`), `512` into the others (`1` turns group commit off) |
//! | `--signing-key PEM_FILE\|generate` | `SIGNING_KEY` | off; signs the trail's checkpoints (Ed25519), also written to `DIR/audit_checkpoints.jsonl` |
//! | — | `JWT_SECRET` | generated at start |
//! | — | `RUST_LOG` | `info` |
//!
//! `GET /metrics` serves every metric in the Prometheus text format, the audit pipeline's
//! (`tower_audit_events_accepted_total`, `tower_audit_events_dropped_total{reason="queue_full"}`, …) among them.
//!
//! The address is bound before anything is created, so a port already in use fails at once, naming the address
//! and the flag to change it.

mod app;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use app::{AuditMode, AuditOptions, AuditSinkKind, Config, DurableRoutes, Server};
use clap::{CommandFactory, Parser, ValueEnum};
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::LevelFilter;

/// The incident's auth API (register, login, me, refresh, logout), every request and security event audited.
#[derive(Debug, Parser)]
#[command(
    name = "auth_server",
    after_help = "Environment only:\n  \
    JWT_SECRET  HS256 signing secret [default: generated at start; tokens then die with the process]\n  \
    RUST_LOG    log filter, e.g. `debug` or `tower_audit=trace,info` [default: info]"
)]
struct Cli {
    /// Address to listen on.
    #[arg(long, env = "ADDR", default_value = "127.0.0.1:3000")]
    addr: String,
    /// Directory for the default databases and JSON-lines file; created if missing.
    #[arg(long, env = "DATA_DIR", default_value = "data")]
    data_dir: PathBuf,
    /// The user store: `sqlite://…` or `postgres://…` [default: sqlite://<DATA_DIR>/auth_server.db?mode=rwc]
    #[arg(long, env = "DATABASE_URL")]
    database_url: Option<String>,
    /// Sign the audit trail's checkpoints with this Ed25519 key (a PKCS#8 PEM file), or `generate` a throwaway
    /// one into <DATA_DIR>/audit_signing_key.pem; checkpoints also go to <DATA_DIR>/audit_checkpoints.jsonl
    /// [default: off]
    #[arg(long, env = "SIGNING_KEY")]
    signing_key: Option<String>,
    /// Connections in the user store's pool.
    #[arg(long, env = "DB_POOL_SIZE", default_value_t = 5)]
    db_pool_size: u32,
    /// How requests are audited.
    #[arg(long, env = "AUDIT", value_enum, default_value_t = AuditMode::Layer)]
    audit: AuditMode,
    /// Where the layer writes audit events.
    #[arg(long, env = "AUDIT_SINK", value_enum, default_value_t = SinkKind::Sqlite)]
    audit_sink: SinkKind,
    /// The sink's database URL or file [default: sqlite://<DATA_DIR>/auth_server_audit.db,
    /// <DATA_DIR>/auth_server_audit.jsonl, or the user store's URL for postgres]
    #[arg(long, env = "AUDIT_URL")]
    audit_url: Option<String>,
    /// The JetStream stream with --audit-sink nats (made on `audit.>` if missing; --audit-url defaults to
    /// nats://127.0.0.1:4222)
    #[cfg(feature = "nats")]
    #[arg(long, env = "AUDIT_STREAM", default_value = "AUDIT")]
    audit_stream: String,
    /// A disk spill for the audit pipeline, in this directory (off when not given): events wait on disk
    /// through a sink outage and survive a crash; a restart replays them
    #[arg(long, env = "SPILL_DIR")]
    spill_dir: Option<PathBuf>,
    /// When the spill syncs its appends to disk (with --spill-dir)
    #[arg(long, env = "SPILL_SYNC", value_enum, default_value_t = SpillSync::Interval)]
    spill_sync: SpillSync,
    /// Which routes answer only once their audit event is durable (committed by the sink, or fsynced in the
    /// spill); the others are audited best effort, and /health not at all
    #[arg(long, env = "DURABLE", value_enum, default_value_t = DurableRoutes::Auth)]
    durable: DurableRoutes,
    /// How long a durable route waits for its event before answering 503 (milliseconds)
    #[arg(long, env = "DURABLE_TIMEOUT_MS", default_value_t = 2000)]
    durable_timeout_ms: u64,
    /// Events per audit batch (1 turns group commit off: one sink write per event) [default: 128 into SQLite,
    /// 512 into the others]
    #[arg(long, env = "AUDIT_BATCH_SIZE")]
    audit_batch_size: Option<usize>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum SpillSync {
    /// fdatasync after every batch, before the sink sees it.
    EveryBatch,
    /// fdatasync at most 200 ms after an append.
    Interval,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum SinkKind {
    /// An SQLite database of its own.
    Sqlite,
    /// A JSON-lines file.
    Jsonl,
    /// A Postgres table, on a pool of its own.
    Postgres,
    /// A NATS JetStream stream (built with the `nats` feature).
    #[cfg(feature = "nats")]
    Nats,
    /// Never returns: stands in for a dead audit database (benchmarks only).
    Stalled,
    /// Takes every batch and keeps nothing: the pipeline's own cost, without a sink's (benchmarks only).
    Null,
}

impl Cli {
    fn config(self) -> Config {
        let in_data_dir = |file: &str| self.data_dir.join(file).display().to_string();
        let audit_sink = match self.audit_sink {
            SinkKind::Sqlite => AuditSinkKind::Sqlite(
                self.audit_url.clone().unwrap_or_else(|| format!("sqlite://{}", in_data_dir("auth_server_audit.db"))),
            ),
            SinkKind::Jsonl => AuditSinkKind::JsonLines(
                self.audit_url.clone().unwrap_or_else(|| in_data_dir("auth_server_audit.jsonl")).into(),
            ),
            SinkKind::Postgres => match self.audit_url.clone().or_else(|| self.database_url.clone()) {
                Some(url) => AuditSinkKind::Postgres(url),
                None => Cli::command()
                    .error(
                        clap::error::ErrorKind::MissingRequiredArgument,
                        "--audit-sink postgres needs --audit-url (AUDIT_URL) or --database-url (DATABASE_URL)",
                    )
                    .exit(),
            },
            #[cfg(feature = "nats")]
            SinkKind::Nats => AuditSinkKind::Nats {
                url: self.audit_url.clone().unwrap_or_else(|| "nats://127.0.0.1:4222".to_owned()),
                stream: self.audit_stream.clone(),
            },
            SinkKind::Stalled => AuditSinkKind::Stalled,
            SinkKind::Null => AuditSinkKind::Null,
        };
        Config {
            database_url: self
                .database_url
                .clone()
                .unwrap_or_else(|| format!("sqlite://{}?mode=rwc", in_data_dir("auth_server.db"))),
            db_pool_size: self.db_pool_size,
            audit: self.audit,
            audit_sink,
            audit_options: AuditOptions {
                spill: self.spill_dir.as_ref().map(|dir| {
                    tower_audit::Spill::new(dir).sync(match self.spill_sync {
                        SpillSync::EveryBatch => tower_audit::SyncPolicy::EveryBatch,
                        SpillSync::Interval => tower_audit::SyncPolicy::default(),
                    })
                }),
                durable: self.durable,
                durable_timeout: Duration::from_millis(self.durable_timeout_ms),
                // SQLite writes on this server's own cores: smaller batches hold a core for less at a time.
                batch_size: self.audit_batch_size.unwrap_or(match self.audit_sink {
                    SinkKind::Sqlite => tower_audit::SqliteSink::SUGGESTED_BATCH_SIZE,
                    _ => tower_audit::DEFAULT_BATCH_SIZE,
                }),
                // Set in `main` once the data directory exists (`--signing-key generate` writes into it).
                integrity: None,
            },
            jwt_secret: std::env::var("JWT_SECRET").ok(),
            ..Config::default()
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), app::BoxError> {
    init_tracing();
    let cli = Cli::parse();
    let (addr, data_dir, cli_signing_key) = (cli.addr.clone(), cli.data_dir.clone(), cli.signing_key.clone());
    // The recorder goes in before the audit pipeline is built, so it gets the metrics' descriptions too.
    let prometheus = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .map_err(|e| format!("cannot install the Prometheus recorder: {e}"))?;
    let config = Config { metrics: Some(prometheus), ..cli.config() };
    // Bind first: a taken port must fail before any directory or database is created.
    let listener = bind(&addr).await;
    std::fs::create_dir_all(&data_dir)
        .map_err(|e| format!("cannot create the data directory {}: {e}", data_dir.display()))?;
    let mut config = config;
    if let Some(key) = &cli_signing_key {
        config.audit_options.integrity = Some(app::integrity(key, &data_dir)?);
    }
    let mode = config.audit;
    let server = Server::start(config).await?;
    println!("auth server listening on http://{} (audit: {mode:?}; metrics at /metrics)", listener.local_addr()?);
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

/// Logs filtered by `RUST_LOG` (`info` when unset), coloured only on a terminal.
fn init_tracing() {
    let filter = EnvFilter::builder().with_default_directive(LevelFilter::INFO.into()).from_env_lossy();
    tracing_subscriber::fmt().with_env_filter(filter).with_ansi(std::io::stdout().is_terminal()).init();
}

/// Binds `addr`, or exits saying which address is taken and how to choose another.
async fn bind(addr: &str) -> TcpListener {
    match TcpListener::bind(addr).await {
        Ok(listener) => listener,
        Err(error) => {
            let why = match error.kind() {
                std::io::ErrorKind::AddrInUse => "is already in use (is another server running?)".to_owned(),
                _ => format!("cannot be bound: {error}"),
            };
            eprintln!("error: {addr} {why}\nchoose another address with --addr HOST:PORT or ADDR=HOST:PORT");
            std::process::exit(1);
        }
    }
}
