//! `kill -9` under durable load: a child process (this same binary, started with `TOWER_AUDIT_DURABLE_CHILD`
//! set) serves a durable route over loopback, with a spill whose own sync policy would sync only once an hour,
//! so what makes an event durable is the durable request asking for it. The test SIGKILLs it under load from
//! eight clients (once with the sink down, once up), restarts it on the same spill with the sink up, and checks
//! that every request answered 200 has its event in SQLite, exactly once. Then it kills the child while 20
//! `DurableIntent` handlers are running (and never ending), and checks that each has its intent in the trail.
//!
//! A test binary of its own (`harness = false`) so it can be its own child process.

use std::collections::HashMap;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

const CHILD: &str = "TOWER_AUDIT_DURABLE_CHILD";
/// Requests answered 200 in each round before the kill.
const ANSWERED: u32 = 300;
const CLIENTS: usize = 8;
/// Requests killed inside their `DurableIntent` handler.
const INTENTS: usize = 20;

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    match std::env::var(CHILD) {
        Ok(dir) => runtime.block_on(child::serve(Path::new(&dir))),
        Err(_) => {
            let started = Instant::now();
            runtime.block_on(sigkill_loses_no_event_of_a_2xx_durable_response());
            println!("test sigkill_loses_no_event_of_a_2xx_durable_response ... ok ({:.1?})", started.elapsed());
        }
    }
}

mod child {
    use super::*;
    use axum::{Json, Router, http::HeaderMap, routing::get};
    use tower_audit::{AuditEvent, AuditLayer, AuditSink, Policy, Rule, SinkError, Spill, SqliteSink, SyncPolicy};

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
        let down = std::env::var("TOWER_AUDIT_DURABLE_SINK").as_deref() == Ok("down");
        let (layer, handle) = AuditLayer::builder(Switch { sink, down })
            .flush_interval(Duration::from_millis(5))
            .retry(
                tower_audit::Retry::default().base_delay(Duration::from_millis(5)).max_delay(Duration::from_millis(50)),
            )
            .spill(Spill::new(dir.join("spill")).sync(SyncPolicy::Interval(Duration::from_secs(3600))))
            .policy(
                Policy::new()
                    .rule(Rule::route("/act").durable(Duration::from_secs(5)))
                    .rule(Rule::route("/intent").durable_intent(Duration::from_secs(5))),
            )
            .build()
            .unwrap();
        let audited = Router::new()
            .route("/act", get(|| async { "done" }))
            // A handler that says it started, then never ends: the process dies inside it.
            .route(
                "/intent",
                get(|headers: HeaderMap| async move {
                    println!("entered {}", headers["x-request-id"].to_str().unwrap());
                    std::future::pending::<&'static str>().await
                }),
            )
            .layer(layer);
        let app = audited.route("/stats", get(move || async move { Json(handle.stats()) }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        println!("listening {}", listener.local_addr().unwrap());
        axum::serve(listener, app).await.unwrap();
    }
}

struct Running {
    child: Child,
    base: String,
    /// The child's stdout after its first line, kept open so it can go on printing.
    lines: Lines<BufReader<ChildStdout>>,
}

async fn start(dir: &Path, sink_down: bool) -> Running {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .env(CHILD, dir)
        .env("TOWER_AUDIT_DURABLE_SINK", if sink_down { "down" } else { "up" })
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await.unwrap().unwrap().unwrap();
    let addr = line.strip_prefix("listening ").unwrap().to_owned();
    Running { child, base: format!("http://{addr}"), lines }
}

async fn sigkill_loses_no_event_of_a_2xx_durable_response() {
    let dir = tempfile::tempdir().unwrap();
    let client = reqwest::Client::new();
    let mut answered_200 = Vec::new();
    let mut other = 0;
    for (round, sink_down) in [true, false].into_iter().enumerate() {
        let mut run = start(dir.path(), sink_down).await;
        let answered = Arc::new(tokio::sync::Semaphore::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let mut clients = Vec::new();
        for c in 0..CLIENTS {
            let (client, base, answered, stop) = (client.clone(), run.base.clone(), answered.clone(), stop.clone());
            clients.push(tokio::spawn(async move {
                let (mut ok, mut other) = (Vec::new(), 0);
                for i in 0.. {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let id = format!("r{round}-c{c}-{i}");
                    match client.get(format!("{base}/act")).header("x-request-id", &id).send().await {
                        Ok(res) if res.status() == 200 => {
                            ok.push(id);
                            answered.add_permits(1);
                        }
                        Ok(_) => other += 1,
                        // The kill.
                        Err(_) => break,
                    }
                }
                (ok, other)
            }));
        }
        let _ = tokio::time::timeout(Duration::from_secs(60), answered.acquire_many(ANSWERED)).await.unwrap();
        run.child.start_kill().unwrap();
        run.child.wait().await.unwrap();
        stop.store(true, Ordering::SeqCst);
        for client in clients {
            let (ok, n) = client.await.unwrap();
            answered_200.extend(ok);
            other += n;
        }
    }

    // DurableIntent: with the sink down, requests whose handlers have started (and never end) when the process
    // is killed. Each handler started only once its intent was synced in the spill.
    let mut run = start(dir.path(), true).await;
    let mut requests = Vec::new();
    for i in 0..INTENTS {
        let (client, base) = (client.clone(), run.base.clone());
        requests.push(tokio::spawn(async move {
            client.get(format!("{base}/intent")).header("x-request-id", format!("intent-{i}")).send().await
        }));
    }
    let mut entered = Vec::new();
    while entered.len() < INTENTS {
        let line = tokio::time::timeout(Duration::from_secs(30), run.lines.next_line()).await.unwrap().unwrap();
        entered.push(line.unwrap().strip_prefix("entered ").unwrap().to_owned());
    }
    run.child.start_kill().unwrap();
    run.child.wait().await.unwrap();
    for request in requests {
        assert!(request.await.unwrap().is_err(), "a request inside a killed handler got an answer");
    }

    // Restarted with the sink up: everything the spill holds is replayed.
    let run = start(dir.path(), false).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s: serde_json::Value =
            client.get(format!("{}/stats", run.base)).send().await.unwrap().json().await.unwrap();
        if s["recovered"].as_u64() > Some(0) && s["recovered"] == s["written"] && s["queued"] == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the backlog was not replayed in 60 s: {s}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
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
    assert!(answered_200.len() >= 2 * ANSWERED as usize, "{}", answered_200.len());
    let missing: Vec<_> = answered_200.iter().filter(|id| !counts.contains_key(*id)).collect();
    assert!(missing.is_empty(), "{} requests answered 200 are not in the trail: {missing:?}", missing.len());
    assert_eq!(other, 0, "requests answered neither 200 nor cut by the kill");
    // Every handler that started inside the killed process has its intent in the trail, once, and no request
    // event (none ended).
    let intents: Vec<(String, String)> = sqlx::query_as(
        "SELECT kind, request_id FROM audit_events WHERE request_id LIKE 'intent-%' ORDER BY request_id",
    )
    .fetch_all(&sqlite)
    .await
    .unwrap();
    entered.sort();
    let want: Vec<(String, String)> = entered.iter().map(|id| ("http.intent".to_owned(), id.clone())).collect();
    assert_eq!(intents, want);
    println!(
        "{} requests answered 200 before the kills, every one in the trail once ({} events in all)",
        answered_200.len(),
        counts.len()
    );
    drop(run);
}
