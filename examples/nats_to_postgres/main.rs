//! Moves audit events from a NATS JetStream stream (where `NatsSink`s of many instances publish) into one
//! Postgres table, exactly once by event id. Stop it with Ctrl-C and start it again: the durable consumer resumes
//! where it left off.
//!
//! ```text
//! cargo run --example nats_to_postgres --features nats,postgres   # --help lists the flags
//! ```

use std::io::IsTerminal;
use std::time::Duration;

use clap::Parser;
use tower_audit::{NatsSink, PostgresSink};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::LevelFilter;

mod mover;

use mover::{Mover, Settings};

/// Moves audit events from a JetStream stream into a Postgres table, exactly once by event id.
#[derive(Debug, Parser)]
#[command(name = "nats_to_postgres", after_help = "Environment only:\n  RUST_LOG  log filter [default: info]")]
struct Cli {
    /// The NATS server.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    /// The JetStream stream the sinks publish into (created on `audit.>` if missing).
    #[arg(long, env = "AUDIT_STREAM", default_value = "AUDIT")]
    stream: String,
    /// The durable consumer's name: the stream remembers its position under it.
    #[arg(long, env = "AUDIT_DURABLE", default_value = "postgres")]
    durable: String,
    /// The Postgres database.
    #[arg(long, env = "DATABASE_URL", default_value = "postgres://postgres@127.0.0.1:5432/test")]
    database_url: String,
    /// The table (created or upgraded by `ensure_schema`), optionally `schema.table`.
    #[arg(long, env = "AUDIT_TABLE", default_value = "audit_events")]
    table: String,
    /// Events per insert.
    #[arg(long, env = "AUDIT_BATCH_SIZE", default_value_t = 512)]
    batch_size: usize,
}

#[tokio::main]
async fn main() -> Result<(), mover::Error> {
    let filter = EnvFilter::builder().with_default_directive(LevelFilter::INFO.into()).from_env_lossy();
    tracing_subscriber::fmt().with_env_filter(filter).with_ansi(std::io::stdout().is_terminal()).init();
    let cli = Cli::parse();

    // The sink's helper makes the stream as the publishers expect it (or checks it).
    let client = async_nats::connect(&cli.nats_url).await?;
    let publisher = NatsSink::new(client.clone(), &cli.stream)?;
    publisher.check_jetstream().await?;
    publisher.ensure_stream().await?;
    let sink = PostgresSink::connect(&cli.database_url).await?.table(&cli.table)?;
    sink.ensure_schema().await?;

    let settings = Settings { durable: cli.durable, batch: cli.batch_size.max(1), ..Settings::new(&cli.stream) };
    let mut mover = Mover::new(&async_nats::jetstream::new(client), sink, settings).await?;
    tracing::info!(stream = %cli.stream, table = %cli.table, lag = mover.lag().await?, "moving events");
    let stop = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let moved = mover.run(stop, Duration::from_secs(1)).await;
    tracing::info!(moved, lag = mover.lag().await?, "stopped");
    Ok(())
}
