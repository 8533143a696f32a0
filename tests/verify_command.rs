//! The `verify` example as a command, on a real trail: an SQLite table with a JSON lines fallback (the chain spans
//! both), checkpoints from the checkpoint sink's file or a signed note, exit codes 0, 1 and 2, and `--json`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::eventually;
use tower_audit::integrity::{Checkpoint, Integrity};
use tower_audit::{AuditEvent, AuditLayer, AuditSink, JsonLinesSink, Retry, SinkError, SqliteSink, kind};

const LIMIT: Duration = Duration::from_secs(30);

/// The example's binary, which `cargo test` builds beside the tests (`target/<profile>/examples/verify`).
fn verify_command() -> Command {
    let deps = std::env::current_exe().unwrap().parent().unwrap().to_path_buf();
    let binary = deps.parent().unwrap().join("examples").join(format!("verify{}", std::env::consts::EXE_SUFFIX));
    assert!(binary.exists(), "{} not built: run the whole `cargo test`, which builds the examples", binary.display());
    Command::new(binary)
}

/// A primary that fails every batch holding an event marked `fail` (so they go to the fallback).
struct Flaky(SqliteSink);

impl AuditSink for Flaky {
    async fn write_batch(&self, batch: &[AuditEvent]) -> Result<(), SinkError> {
        if batch.iter().any(|e| e.attributes.contains_key("fail")) {
            return Err(SinkError::backend("a marked batch"));
        }
        self.0.write_batch(batch).await
    }
}

struct Trail {
    _dir: tempfile::TempDir,
    db: PathBuf,
    fallback: PathBuf,
    anchor: PathBuf,
    key: String,
}

impl Trail {
    fn url(&self) -> String {
        format!("sqlite://{}", self.db.display())
    }

    fn run(&self, args: &[&str]) -> Output {
        let mut command = verify_command();
        command.arg("--key").arg(&self.key).args(args);
        command.output().unwrap()
    }
}

/// Rounds of 4 events through SQLite, the odd rounds failed there and taken by the fallback file.
async fn write_trail() -> Trail {
    let dir = tempfile::tempdir().unwrap();
    let (db, fallback, anchor) =
        (dir.path().join("audit.db"), dir.path().join("fallback.jsonl"), dir.path().join("checkpoints.jsonl"));
    let sqlite = SqliteSink::connect(&format!("sqlite://{}?mode=rwc", db.display())).await.unwrap();
    sqlite.ensure_schema().await.unwrap();
    let integrity = Integrity::from_seed(&[9; 32])
        .key_name("verify.test")
        .checkpoint_every(10)
        .checkpoint_interval(Duration::from_secs(3600))
        .checkpoint_sink(JsonLinesSink::open(&anchor).unwrap());
    let key = integrity.verifier_key().to_string();
    let (_layer, handle) = AuditLayer::builder(Flaky(sqlite))
        .batch_size(4)
        .flush_interval(Duration::from_millis(10))
        .retry(Retry::none())
        .fallback(JsonLinesSink::open(&fallback).unwrap())
        .integrity(integrity)
        .build()
        .unwrap();
    for round in 0..6u64 {
        for i in 0..4 {
            let mut event = AuditEvent::new("auth.login").actor(format!("user-{round}-{i}"));
            if round % 2 == 1 {
                event = event.attribute("fail", "yes");
            }
            assert!(handle.record(event));
        }
        let settled = |s: tower_audit::Stats| s.written + s.fallback_written + s.lost;
        eventually(LIMIT, || settled(handle.stats()) == 4 * (round + 1)).await;
    }
    let report = handle.shutdown(LIMIT).await;
    assert!(report.drained, "{report}");
    assert_eq!((report.stats.written, report.stats.fallback_written), (12, 12));
    Trail { _dir: dir, db, fallback, anchor, key }
}

fn text(output: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

async fn sqlite(db: &Path, sql: &str) {
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", db.display())).await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_string())).execute(&pool).await.unwrap();
    pool.close().await;
}

#[tokio::test]
async fn the_command_verifies_a_table_and_its_fallback_as_one_and_names_an_edit() {
    let trail = write_trail().await;
    let (url, fallback, anchor) =
        (trail.url(), trail.fallback.display().to_string(), trail.anchor.display().to_string());

    // The table alone verifies (what it lacks is declared by its gap events); with the fallback, nothing is lost.
    let alone = trail.run(&["--checkpoint", &anchor, "--sqlite", &url]);
    assert_eq!(alone.status.code(), Some(0), "{}", text(&alone));
    let both = trail.run(&["--checkpoint", &anchor, "--sqlite", &url, "--jsonl", &fallback, "--json"]);
    assert_eq!(both.status.code(), Some(0), "{}", text(&both));
    let report: serde_json::Value = serde_json::from_slice(&both.stdout).unwrap();
    let boot = &report["boots"][0];
    assert_eq!(report["boots"].as_array().unwrap().len(), 1);
    assert_eq!((boot["lost"].as_array().unwrap().len(), boot["clean_shutdown"].as_bool()), (0, Some(true)));
    assert_eq!(boot["verified_to"].as_u64().unwrap() + 1, boot["last_seq"].as_u64().unwrap(), "{boot}");
    assert!(boot["checkpoints"].as_u64().unwrap() >= 2, "{boot}");

    // The latest checkpoint as a signed note kept out of band (the shutdown's, covering the event before it):
    // deleting the table's two newest rows, that event and the shutdown, is truncation.
    let checkpoints = std::fs::read_to_string(&trail.anchor).unwrap();
    let last: AuditEvent = serde_json::from_str(checkpoints.lines().last().unwrap()).unwrap();
    assert_eq!(last.kind, kind::AUDIT_SHUTDOWN);
    let note_path = trail.anchor.with_file_name("latest.note");
    std::fs::write(&note_path, Checkpoint::from_event(&last).unwrap().unwrap().to_note()).unwrap();
    let note = note_path.display().to_string();
    let ok = trail.run(&["--checkpoint", &note, "--sqlite", &url, "--jsonl", &fallback]);
    assert_eq!(ok.status.code(), Some(0), "{}", text(&ok));
    assert!(String::from_utf8_lossy(&ok.stdout).contains("OK: "), "{}", text(&ok));

    sqlite(&trail.db, "DELETE FROM audit_events WHERE seq >= (SELECT MAX(seq) - 1 FROM audit_events)").await;
    let cut = trail.run(&["--checkpoint", &note, "--sqlite", &url, "--jsonl", &fallback]);
    assert_eq!(cut.status.code(), Some(1), "{}", text(&cut));
    assert!(text(&cut).contains("truncated"), "{}", text(&cut));

    // An edited actor in the table is named at its seq.
    let seq: u64 = 3;
    sqlite(&trail.db, &format!("UPDATE audit_events SET actor = 'mallory' WHERE seq = {seq}")).await;
    let edited = trail.run(&["--sqlite", &url, "--jsonl", &fallback, "--json"]);
    assert_eq!(edited.status.code(), Some(1), "{}", text(&edited));
    let report: serde_json::Value = serde_json::from_slice(&edited.stdout).unwrap();
    let findings = report["boots"][0]["findings"].as_array().unwrap();
    assert!(findings.contains(&serde_json::json!({"finding": "altered", "seq": seq})), "{findings:?}");

    // A trail that cannot be read: exit code 2, and why.
    let missing = trail.run(&["--jsonl", "/nonexistent/audit.jsonl"]);
    assert_eq!(missing.status.code(), Some(2), "{}", text(&missing));
    assert!(text(&missing).contains("/nonexistent/audit.jsonl"), "{}", text(&missing));
}
