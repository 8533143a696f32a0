//! `kill -9` under load, with a spill synced after every batch: a child process (this same binary, started
//! with `TOWER_AUDIT_CRASH_CHILD` set) serves audited requests over loopback into a SQLite sink; the test
//! SIGKILLs it mid-load, restarts it on the same spill directory, and checks that every event synced before
//! the kill is in SQLite exactly once and that each new boot's `audit.boot` event says the last one crashed.
//!
//! A test binary of its own (`harness = false`) so it can be its own child process.

use std::collections::HashMap;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const CHILD: &str = "TOWER_AUDIT_CRASH_CHILD";
/// Requests made before the sync point in each round, and at least this many made (concurrently) after it.
const BEFORE: usize = 100;
const AFTER: usize = 200;

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    match std::env::var(CHILD) {
        Ok(dir) => runtime.block_on(child::serve(Path::new(&dir))),
        Err(_) => {
            let started = Instant::now();
            runtime.block_on(sigkill_under_load_loses_no_synced_event());
            println!("test sigkill_under_load_loses_no_synced_event ... ok ({:.1?})", started.elapsed());
        }
    }
}

/// The child: an audited route and an unaudited stats route; the sink is SQLite, refusing writes while
/// `TOWER_AUDIT_CRASH_SINK=down`.
mod child {
    use super::*;
    use axum::{Json, Router, routing::get};
    use tower_audit::{AuditEvent, AuditLayer, AuditSink, SinkError, Spill, SqliteSink, SyncPolicy};

    struct Switch {
        sink: SqliteSink,
        down: bool,
    }

    impl AuditSink for Switch {
        async fn write_batch(&self, batch: &[AuditEvent]) -> Result<(), SinkError> {
            if self.down {
                return Err(SinkError::backend("down for the test"));
            }
            self.sink.write_batch(batch).await
        }
    }

    pub(super) async fn serve(dir: &Path) {
        let sink = SqliteSink::connect(&format!("sqlite://{}", dir.join("audit.db").display())).await.unwrap();
        sink.ensure_schema().await.unwrap();
        let down = std::env::var("TOWER_AUDIT_CRASH_SINK").as_deref() == Ok("down");
        let (layer, handle) = AuditLayer::builder(Switch { sink, down })
            .flush_interval(Duration::from_millis(5))
            .retry(
                tower_audit::Retry::default().base_delay(Duration::from_millis(5)).max_delay(Duration::from_millis(50)),
            )
            .spill(Spill::new(dir.join("spill")).sync(SyncPolicy::EveryBatch))
            .build()
            .unwrap();
        let audited = Router::new().route("/act", get(|| async { "done" })).layer(layer);
        let app = audited.route("/stats", get(move || async move { Json(handle.stats()) }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        println!("listening {}", listener.local_addr().unwrap());
        axum::serve(listener, app).await.unwrap();
    }
}

struct Running {
    child: Child,
    base: String,
}

async fn start(dir: &Path, sink_down: bool) -> Running {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .env(CHILD, dir)
        .env("TOWER_AUDIT_CRASH_SINK", if sink_down { "down" } else { "up" })
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await.unwrap().unwrap().unwrap();
    let addr = line.strip_prefix("listening ").unwrap().to_owned();
    Running { child, base: format!("http://{addr}") }
}

async fn stats(client: &reqwest::Client, run: &Running) -> serde_json::Value {
    client.get(format!("{}/stats", run.base)).send().await.unwrap().json().await.unwrap()
}

/// Polls the child's stats until `condition` holds (bounded).
async fn until(client: &reqwest::Client, run: &Running, what: &str, condition: impl Fn(&serde_json::Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = stats(client, run).await;
        if condition(&s) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: not reached in 60 s; stats {s}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn act(client: &reqwest::Client, base: &str, id: &str) -> bool {
    let response = client.get(format!("{base}/act")).header("x-request-id", id).send().await;
    response.is_ok_and(|r| r.status() == 200)
}

async fn sigkill_under_load_loses_no_synced_event() {
    let dir = tempfile::tempdir().unwrap();
    let client = reqwest::Client::new();
    let mut synced = Vec::new();
    let mut after_sync = Vec::new();
    // Round 0 and 2 with the sink down (every event only in the spill at the kill), round 1 with it up (the
    // kill lands among deliveries and acknowledgements).
    for (round, sink_down) in [true, false, true].into_iter().enumerate() {
        let mut run = start(dir.path(), sink_down).await;
        for i in 0..BEFORE {
            let id = format!("r{round}-a{i}");
            assert!(act(&client, &run.base, &id).await, "{id}");
            synced.push(id);
        }
        // Every one of them is appended (and, under EveryBatch, synced) once `spilled` counts them with the
        // boot event; with the sink up, the replay of earlier rounds may still be going on.
        until(&client, &run, "the first requests synced", |s| s["accepted"] == BEFORE && s["spilled"] == BEFORE + 1)
            .await;
        // Then load from four clients, and SIGKILL once AFTER more requests were answered.
        let answered = Arc::new(tokio::sync::Semaphore::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let mut clients = Vec::new();
        for c in 0..4 {
            let (client, base, answered, stop) = (client.clone(), run.base.clone(), answered.clone(), stop.clone());
            clients.push(tokio::spawn(async move {
                let mut ok = Vec::new();
                for i in 0.. {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let id = format!("r{round}-b{c}-{i}");
                    if act(&client, &base, &id).await {
                        ok.push(id);
                        answered.add_permits(1);
                    } else {
                        break;
                    }
                }
                ok
            }));
        }
        let _ = tokio::time::timeout(Duration::from_secs(60), answered.acquire_many(AFTER as u32)).await.unwrap();
        run.child.start_kill().unwrap();
        run.child.wait().await.unwrap();
        stop.store(true, Ordering::SeqCst);
        for client in clients {
            after_sync.extend(client.await.unwrap());
        }
    }

    // Last boot, sink up: everything the spill holds is replayed.
    let run = start(dir.path(), false).await;
    until(&client, &run, "the backlog replayed", |s| {
        s["recovered"].as_u64() > Some(0) && s["recovered"] == s["written"] && s["queued"] == 0
    })
    .await;
    let sqlite =
        sqlx::SqlitePool::connect(&format!("sqlite://{}", dir.path().join("audit.db").display())).await.unwrap();
    let rows: Vec<(Option<String>, i64)> =
        sqlx::query_as("SELECT request_id, COUNT(*) FROM audit_events WHERE kind = 'http.request' GROUP BY request_id")
            .fetch_all(&sqlite)
            .await
            .unwrap();
    let counts: HashMap<String, i64> = rows.into_iter().map(|(id, n)| (id.unwrap(), n)).collect();
    for (id, n) in &counts {
        assert_eq!(*n, 1, "{id} is in the trail {n} times");
    }
    for id in &synced {
        assert!(counts.contains_key(id), "{id} was synced before the kill but is not in the trail");
    }
    // Answered after the sync point: in the trail at most once (checked above), and most of them there.
    let kept = after_sync.iter().filter(|id| counts.contains_key(*id)).count();
    assert!(after_sync.len() >= 3 * AFTER, "{}", after_sync.len());
    assert!(kept > 0, "none of the {} later requests reached the trail", after_sync.len());

    // Four boots; each after the first says the one before it crashed, and names it.
    let boots: Vec<(String, String)> =
        sqlx::query_as("SELECT boot, attributes FROM audit_events WHERE kind = 'audit.boot' ORDER BY id")
            .fetch_all(&sqlite)
            .await
            .unwrap();
    assert_eq!(boots.len(), 4, "{boots:?}");
    for pair in boots.windows(2) {
        let attributes: serde_json::Value = serde_json::from_str(&pair[1].1).unwrap();
        assert_eq!(attributes["previous_boot"], pair[0].0.as_str(), "{attributes}");
        assert_eq!(attributes["previous_ended"], "crashed", "{attributes}");
    }
    assert_eq!(
        sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM audit_events WHERE kind = 'audit.shutdown'")
            .fetch_one(&sqlite)
            .await
            .unwrap(),
        0,
        "no boot ended cleanly"
    );
    println!(
        "{} synced requests all in the trail once; {kept} of {} requests answered after the sync point kept",
        synced.len(),
        after_sync.len()
    );
    drop(run);
}
