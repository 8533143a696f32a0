//! Verifies an audit trail's hash chain and signed checkpoints, and names every way it was tampered with.
//!
//! ```text
//! cargo run --example verify --features sqlite,postgres -- --key <verifier key> \
//!     [--checkpoint FILE]... (--jsonl FILE | --sqlite URL | --postgres URL)... [--table T] [--json]
//! ```
//!
//! Several trails are verified as one: a pipeline with a fallback sink chains across both, so give the primary's
//! table and the fallback's file together (`--postgres URL --jsonl audit-fallback.jsonl`).
//!
//! `--checkpoint` names a file kept out of band: a signed note (`Checkpoint::to_note`) or the JSON lines of a
//! checkpoint sink (every checkpoint in it is used). Prints a summary per boot (or the report as JSON), and
//! exits 0 only when everything holds, 1 when something does not, 2 when the trail cannot be read.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{ArgGroup, Parser};
use tower_audit::AuditEvent;
use tower_audit::integrity::{Checkpoint, Report, Verifier, VerifierKey};

#[derive(Debug, Parser)]
#[command(about = "Verify a tower-audit trail", group(ArgGroup::new("trail").required(true).multiple(true)))]
struct Args {
    /// The verifier key: `<name>+<key id>+<base64 key>` (`Integrity::verifier_key`).
    #[arg(long, env = "TOWER_AUDIT_VERIFIER_KEY")]
    key: VerifierKey,
    /// A trusted checkpoint file: a signed note, or JSON lines of checkpoint events. Repeatable.
    #[arg(long)]
    checkpoint: Vec<PathBuf>,
    /// A JSON lines file written by `JsonLinesSink`. Repeatable.
    #[arg(long, group = "trail")]
    jsonl: Vec<PathBuf>,
    /// An SQLite database written by `SqliteSink` (`sqlite://audit.db`). Repeatable.
    #[arg(long, group = "trail")]
    sqlite: Vec<String>,
    /// A Postgres database written by `PostgresSink` (`postgres://user@host/db`). Repeatable.
    #[arg(long, group = "trail")]
    postgres: Vec<String>,
    /// The table, for `--sqlite` and `--postgres` (default `audit_events`).
    #[arg(long)]
    table: Option<String>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// The checkpoints in a file: a signed note, or JSON lines of checkpoint events.
fn read_checkpoints(path: &Path) -> Result<Vec<Checkpoint>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if !text.trim_start().starts_with('{') {
        return Checkpoint::from_note(&text).map(|c| vec![c]).map_err(|e| format!("{}: {e}", path.display()));
    }
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let event: AuditEvent = serde_json::from_str(line).map_err(|e| format!("{}:{}: {e}", path.display(), n + 1))?;
        if let Some(checkpoint) = Checkpoint::from_event(&event) {
            out.push(checkpoint.map_err(|e| format!("{}:{}: {e}", path.display(), n + 1))?);
        }
    }
    Ok(out)
}

async fn run(args: &Args) -> Result<Report, String> {
    let mut trusted = Vec::new();
    for path in &args.checkpoint {
        trusted.extend(read_checkpoints(path)?);
    }
    let table = args.table.as_deref();
    let mut verifier = Verifier::new(&args.key, &trusted);
    for url in &args.sqlite {
        let options = url.parse::<sqlx::sqlite::SqliteConnectOptions>().map_err(|e| e.to_string())?.read_only(true);
        let pool = sqlx::SqlitePool::connect_with(options).await.map_err(|e| e.to_string())?;
        verifier.push_sqlite(&pool, table).await.map_err(|e| format!("{url}: {e}"))?;
    }
    for url in &args.postgres {
        let pool = sqlx::PgPool::connect(url).await.map_err(|e| e.to_string())?;
        verifier.push_postgres(&pool, table).await.map_err(|e| e.to_string())?;
    }
    for path in &args.jsonl {
        verifier.push_json_lines(path).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(verifier.finish())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args).await {
        Ok(report) => {
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report).expect("a report serialises"));
            } else {
                println!("{report}");
            }
            if report.ok() { ExitCode::SUCCESS } else { ExitCode::from(1) }
        }
        Err(error) => {
            eprintln!("verify: {error}");
            ExitCode::from(2)
        }
    }
}
