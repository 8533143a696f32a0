//! A relative database path stays the same file after the process changes directory (as daemons do): the
//! sink's connections, the writer and the one that checkpoints in the background, open it, and no other.
//! One test in a binary of its own, since it changes the process's working directory.
#![cfg(feature = "sqlite")]

mod common;

use std::time::Duration;

use sqlx::sqlite::SqlitePool;
use tower_audit::{AuditEvent, AuditSink, SqliteSink};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relative_path_is_the_same_file_after_a_change_of_directory() {
    let home = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    std::env::set_current_dir(home.path()).unwrap();
    let sink = SqliteSink::connect("audit.db").await.unwrap();
    sink.ensure_schema().await.unwrap();
    std::env::set_current_dir(elsewhere.path()).unwrap();
    let db = home.path().join("audit.db");
    let db_bytes = || std::fs::metadata(&db).unwrap().len();
    let before = db_bytes();
    let batch: Vec<AuditEvent> = (0..512)
        .map(|_| {
            let mut e = AuditEvent::new("http.request");
            e.id = uuid::Uuid::now_v7();
            e
        })
        .collect();
    // The first batch starts a background checkpoint: it copies the batch into the database file in `home`.
    sink.write_batch(&batch).await.unwrap();
    common::eventually(Duration::from_secs(20), || db_bytes() > before).await;
    assert!(!elsewhere.path().join("audit.db").exists(), "a connection opened audit.db in the new directory");
    let reader = SqlitePool::connect(&format!("sqlite://{}", db.display())).await.unwrap();
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_events").fetch_one(&reader).await.unwrap();
    assert_eq!(stored, 512);
}
