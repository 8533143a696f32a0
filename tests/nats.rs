//! The NATS JetStream sink and the `nats_to_postgres` consumer against a real NATS server (JetStream on) and a
//! real Postgres: hostile events through the stream, errors a user can act on, the connection cut mid-run on both
//! sides, a restart of the consumer, and three instances publishing at once. Every event is checked to be in the
//! stream and in Postgres exactly once.
//!
//! Reaches `TOWER_AUDIT_NATS_URL` (default `nats://127.0.0.1:4222`) and `TOWER_AUDIT_PG_URL`; with a variable
//! unset and its server not answering, each test says so and skips. `.ci/run` sets both, so in CI a dead server
//! fails the run. Each test works in a stream (with a subject prefix) and a Postgres schema of its own, deleted at
//! the end.
#![cfg(all(feature = "nats", feature = "postgres"))]

mod common;

#[path = "../examples/nats_to_postgres/mover.rs"]
#[allow(dead_code)]
mod mover;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use common::PgScratch;
use common::*;
use mover::{Mover, Settings};
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, Row as _};
use tokio::net::{TcpListener, TcpStream};
use tower_audit::{AuditEvent, AuditLayer, AuditSink, MemorySink, NatsSink, PostgresSink, Retry, SinkError};

const LIMIT: Duration = Duration::from_secs(60);

fn nats_url() -> String {
    std::env::var("TOWER_AUDIT_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned())
}

/// A client of the test server with quick reconnects, or `None` (after saying why) when the variable is unset and
/// no server answers.
async fn client_of(url: &str) -> Option<async_nats::Client> {
    let options = async_nats::ConnectOptions::new().reconnect_delay_callback(|_| Duration::from_millis(50));
    match options.connect(url).await {
        Ok(client) => Some(client),
        Err(e) if std::env::var_os("TOWER_AUDIT_NATS_URL").is_none() => {
            eprintln!("skipping: no NATS at {url} ({e}); set TOWER_AUDIT_NATS_URL to run this test");
            None
        }
        Err(e) => panic!("TOWER_AUDIT_NATS_URL={url} is set, but the server is unreachable: {e}"),
    }
}

/// Both servers, or `None` when either is missing (see [`client_of`] and `pg_pool`).
async fn servers() -> Option<(async_nats::Client, PgPool)> {
    let client = client_of(&nats_url()).await?;
    let admin = pg_pool(PgPoolOptions::new().max_connections(4).acquire_timeout(Duration::from_secs(5))).await?;
    Some((client, admin))
}

/// A stream of the test's own (random suffix), capturing `<prefix>.>` with a prefix of its own too (streams may
/// not share subjects), deleted at the end, also when the test fails.
struct StreamScratch {
    name: String,
    prefix: String,
}

impl StreamScratch {
    fn new(label: &str) -> Self {
        let suffix = format!("{:08x}", fastrand::u32(..));
        Self { name: format!("T_{label}_{suffix}"), prefix: format!("t_{label}_{suffix}") }
    }

    /// A sink into this stream (made by `ensure_stream` if it does not exist yet).
    async fn sink(&self, client: &async_nats::Client) -> NatsSink {
        let sink = NatsSink::new(client.clone(), &self.name).unwrap().subject_prefix(&self.prefix).unwrap();
        sink.ensure_stream().await.unwrap();
        sink
    }

    async fn messages(&self, client: &async_nats::Client) -> u64 {
        let mut stream = jetstream::new(client.clone()).get_stream(&self.name).await.unwrap();
        stream.info().await.unwrap().state.messages
    }
}

impl Drop for StreamScratch {
    fn drop(&mut self) {
        let name = self.name.clone();
        let deleted = std::thread::spawn(move || -> Result<(), String> {
            let runtime =
                tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
            runtime.block_on(async {
                let client = async_nats::connect(nats_url()).await.map_err(|e| e.to_string())?;
                jetstream::new(client).delete_stream(&name).await.map_err(|e| e.to_string())?;
                Ok(())
            })
        })
        .join();
        match deleted {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("could not delete stream {}: {e}", self.name),
            Err(_) => eprintln!("could not delete stream {}: the cleanup thread panicked", self.name),
        }
    }
}

/// A TCP proxy on loopback in front of `target` that can cut every connection and refuse new ones, then let them
/// through again: a network outage between one client and the server, with nothing else disturbed.
struct Proxy {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
    links: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let links: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let accept = tokio::spawn({
            let (cut, links) = (cut.clone(), links.clone());
            async move {
                loop {
                    let Ok((mut inbound, _)) = listener.accept().await else { continue };
                    if cut.load(Ordering::SeqCst) {
                        continue; // dropped: the client sees its connection refused at once
                    }
                    let link = tokio::spawn(async move {
                        if let Ok(mut outbound) = TcpStream::connect(target).await {
                            let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                    links.lock().unwrap().push(link.abort_handle());
                }
            }
        });
        Self { addr, cut, links, accept }
    }

    fn url(&self) -> String {
        format!("nats://{}", self.addr)
    }

    /// Drops every open connection (mid-message, wherever they are) and refuses new ones.
    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for link in self.links.lock().unwrap().drain(..) {
            link.abort();
        }
    }

    fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

async fn nats_addr() -> SocketAddr {
    let url = nats_url();
    let host = url.trim_start_matches("nats://");
    tokio::net::lookup_host(host).await.unwrap().next().unwrap()
}

/// A Postgres sink writing to the scratch schema's table.
async fn pg_sink(scratch: &PgScratch) -> PostgresSink {
    let sink = PostgresSink::connect(&pg_url()).await.unwrap().table(&scratch.table()).unwrap();
    sink.ensure_schema().await.unwrap();
    sink
}

async fn pg_count(admin: &PgPool, scratch: &PgScratch) -> i64 {
    sqlx::query_scalar(AssertSqlSafe(format!("SELECT count(*) FROM {}", scratch.table())))
        .fetch_one(admin)
        .await
        .unwrap()
}

async fn pg_ids(admin: &PgPool, scratch: &PgScratch) -> BTreeSet<String> {
    sqlx::query_scalar(AssertSqlSafe(format!("SELECT id::text FROM {}", scratch.table())))
        .fetch_all(admin)
        .await
        .unwrap()
        .into_iter()
        .collect()
}

/// Moves batches until `done` holds, tolerating failed batches (an outage in progress); fails after [`LIMIT`].
async fn move_until(mover: &mut Mover, mut done: impl AsyncFnMut() -> bool) -> u64 {
    let deadline = std::time::Instant::now() + LIMIT;
    let mut rows = 0;
    while !done().await {
        assert!(std::time::Instant::now() < deadline, "the consumer did not get there within {LIMIT:?}");
        if let Ok(moved) = mover.move_batch().await {
            assert_eq!(moved.rejected, 0);
            rows += moved.rows as u64;
        }
    }
    rows
}

fn ids(events: &[AuditEvent]) -> BTreeSet<String> {
    events.iter().map(|e| e.id.hyphenated().to_string()).collect()
}

#[tokio::test]
async fn hostile_events_round_trip_through_the_stream_into_postgres() {
    let Some((client, admin)) = servers().await else { return };
    let scratch = StreamScratch::new("hostile");
    let pg = PgScratch::new(&admin, "t_nats_hostile").await;
    let sink = scratch.sink(&client).await;
    let tee = TeeSink { primary: sink.clone(), copy: MemorySink::new() };
    let (_layer, handle) = AuditLayer::builder(tee.clone()).instance("edge.1 *> ünï").build().unwrap();
    let mut events = hostile_events();
    for odd in ["a.b.c", "*", ">", " ", "", "ünï.cödé\u{7}\u{202e}", "tab\there", "x>y*z.", "\u{1F525}.fire"] {
        events.push(AuditEvent::new(odd.to_owned()).actor("ctl\u{0}\u{1b}[31m").attribute("k.*>", "v\r\nw"));
    }
    let offered = events.len();
    for event in events {
        handle.record(event);
    }
    let report = handle.shutdown(LIMIT).await;
    assert!(report.drained, "{report}");
    assert_eq!(report.stats.written, offered as u64);

    // The stream holds exactly what the sink was given, in order: payload, subject and message id.
    let expected = tee.copy.events();
    assert_eq!(ended_cleanly(expected.clone()).len(), offered);
    assert_eq!(scratch.messages(&client).await, expected.len() as u64);
    assert_eq!((sink.stored(), sink.duplicates()), (expected.len() as u64, 0));
    let stream = jetstream::new(client.clone()).get_stream(&scratch.name).await.unwrap();
    for (i, e) in expected.iter().enumerate() {
        let message = stream.get_raw_message(i as u64 + 1).await.unwrap();
        let stored: serde_json::Value = serde_json::from_slice(&message.payload).unwrap();
        assert_eq!(stored, serde_json::to_value(e).unwrap(), "message {}", i + 1);
        let back: AuditEvent = serde_json::from_slice(&message.payload).unwrap();
        assert_eq!((back.id, back.seq, &back.kind, &back.actor), (e.id, e.seq, &e.kind, &e.actor));
        assert_eq!(message.subject.as_str(), sink.subject(e));
        assert_eq!(
            message.headers.get("Nats-Msg-Id").map(|v| v.as_str()),
            Some(e.id.hyphenated().to_string().as_str())
        );
    }
    // Subjects exactly as documented: one token each for instance and kind, nothing but [A-Za-z0-9_-].
    let subjects: Vec<String> = expected.iter().map(|e| sink.subject(e)).collect();
    let p = &scratch.prefix;
    assert_eq!(subjects[0], format!("{p}.edge_1_____n_.audit_boot"));
    assert!(subjects.contains(&format!("{p}.edge_1_____n_.a_b_c")));
    assert!(subjects.contains(&format!("{p}.edge_1_____n_._"))); // "*", ">", " ", "" all become `_`
    assert!(subjects.contains(&format!("{p}.edge_1_____n_.x_y_z_")));
    for s in &subjects {
        let tokens: Vec<&str> = s.strip_prefix(&format!("{p}.")).unwrap().split('.').collect();
        assert_eq!(tokens.len(), 2, "{s}");
        assert!(
            tokens
                .iter()
                .all(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
        );
    }

    // The same batch again: every ack says duplicate, nothing is stored twice.
    sink.write_batch(&expected).await.unwrap();
    assert_eq!((sink.stored(), sink.duplicates()), (expected.len() as u64, expected.len() as u64));
    assert_eq!(scratch.messages(&client).await, expected.len() as u64);

    // Into Postgres: every event once, its fields intact.
    let settings = Settings { batch: 4, ..Settings::new(&scratch.name) };
    let mut mover = Mover::new(&jetstream::new(client.clone()), pg_sink(&pg).await, settings).await.unwrap();
    let total = expected.len() as i64;
    let moved = move_until(&mut mover, async || pg_count(&admin, &pg).await == total).await;
    assert_eq!(moved, expected.len() as u64);
    assert_eq!(mover.lag().await.unwrap(), 0);
    let rows = sqlx::query(AssertSqlSafe(format!(
        "SELECT id::text, seq, kind, actor, instance, attributes::text FROM {} ORDER BY seq",
        pg.table()
    )))
    .fetch_all(&admin)
    .await
    .unwrap();
    assert_eq!(rows.len(), expected.len());
    for (row, e) in rows.iter().zip(&expected) {
        assert_eq!(row.get::<String, _>("id"), e.id.to_string());
        assert_eq!(row.get::<i64, _>("seq"), e.seq as i64);
        assert_eq!(row.get::<String, _>("kind"), e.kind);
        assert_eq!(row.get::<Option<String>, _>("actor"), e.actor);
        assert_eq!(row.get::<Option<String>, _>("instance").as_deref(), e.instance.as_deref());
        let attributes: serde_json::Value = serde_json::from_str(&row.get::<String, _>("attributes")).unwrap();
        assert_eq!(attributes, serde_json::to_value(&e.attributes).unwrap());
    }
}

#[tokio::test]
async fn a_missing_stream_a_misconfigured_one_and_a_server_without_jetstream_say_so() {
    let Some(client) = client_of(&nats_url()).await else { return };
    let scratch = StreamScratch::new("errors");
    let sink = NatsSink::new(client.clone(), &scratch.name).unwrap().subject_prefix(&scratch.prefix).unwrap();

    // The server has JetStream: connecting says so.
    sink.check_jetstream().await.unwrap();
    NatsSink::connect(&nats_url(), &scratch.name).await.unwrap();

    // No stream yet: checking it, and publishing to a subject no stream captures.
    let err = sink.check_stream().await.unwrap_err();
    assert!(
        matches!(&err, SinkError::StreamNotFound { stream, subject } if *stream == scratch.name && *subject == format!("{}.>", scratch.prefix)),
        "{err}"
    );
    assert!(err.to_string().contains("NatsSink::ensure_stream()"), "{err}");
    let mut event = AuditEvent::new("x");
    event.id = uuid::Uuid::now_v7();
    let err = sink.write_batch(&[event.clone()]).await.unwrap_err();
    assert!(matches!(&err, SinkError::StreamNotFound { subject, .. } if *subject == sink.subject(&event)), "{err}");
    assert_eq!((sink.stored(), sink.duplicates()), (0, 0));

    // A stream in memory: ensure_stream refuses it and says what to change; it changes nothing.
    let js = jetstream::new(client.clone());
    js.create_stream(stream::Config {
        name: scratch.name.clone(),
        subjects: vec![sink.subjects()],
        storage: stream::StorageType::Memory,
        ..Default::default()
    })
    .await
    .unwrap();
    let err = sink.ensure_stream().await.unwrap_err();
    assert!(matches!(&err, SinkError::StreamMismatch { problem, .. } if problem.contains("file storage")), "{err}");
    let err = sink.clone().duplicate_window(Duration::from_secs(3600)).check_stream().await.unwrap_err();
    assert!(matches!(&err, SinkError::StreamMismatch { .. }), "{err}");
    let other = NatsSink::new(client.clone(), &scratch.name).unwrap().subject_prefix("elsewhere").unwrap();
    let err = other.check_stream().await.unwrap_err();
    assert!(matches!(&err, SinkError::StreamMismatch { problem, .. } if problem.contains("elsewhere.>")), "{err}");

    // Names NATS cannot take are refused before anything is sent.
    for bad in ["", "a.b", "a b", "a*", "a>", "a/b"] {
        assert!(NatsSink::new(client.clone(), bad).is_err(), "{bad:?}");
    }
    for bad in ["", "a..b", "a.*", ">", "a b", "a."] {
        assert!(NatsSink::new(client.clone(), "S").unwrap().subject_prefix(bad).is_err(), "{bad:?}");
    }

    // A server without JetStream (a second nats-server of our own, without -js).
    let Some(server) = NatsServer::start(false) else { return };
    let plain = client_of(&server.url()).await.unwrap();
    let sink = NatsSink::new(plain, "AUDIT").unwrap();
    let err = sink.check_jetstream().await.unwrap_err();
    assert!(matches!(err, SinkError::NoJetStream { .. }), "{err}");
    assert!(err.to_string().contains("-js"), "{err}");
    let err = sink.ensure_stream().await.unwrap_err();
    assert!(matches!(err, SinkError::NoJetStream { .. }), "{err}");
    let err = NatsSink::connect(&server.url(), "AUDIT").await.unwrap_err();
    assert!(matches!(err, SinkError::NoJetStream { .. }), "{err}");
}

/// A nats-server process of the test's own on a free port, killed when dropped; `None` (after saying so) where
/// there is no `nats-server` binary.
struct NatsServer {
    child: std::process::Child,
    port: u16,
}

impl NatsServer {
    fn start(jetstream: bool) -> Option<Self> {
        let binary = ["/usr/sbin/nats-server", "/usr/bin/nats-server", "/usr/local/bin/nats-server"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists());
        let Some(binary) = binary else {
            eprintln!("no nats-server binary: the server-without-JetStream case is not run");
            return None;
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut command = std::process::Command::new(binary);
        command.args(["-a", "127.0.0.1", "-p", &port.to_string()]);
        if jetstream {
            command.arg("-js");
        }
        let child = command.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).spawn().unwrap();
        let deadline = std::time::Instant::now() + LIMIT;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(std::time::Instant::now() < deadline, "nats-server on port {port} did not start");
            std::thread::yield_now();
        }
        Some(Self { child, port })
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_cut_mid_run_leaves_every_event_once_in_the_stream_and_in_postgres() {
    const EVENTS: usize = 5_000;
    let Some((direct, admin)) = servers().await else { return };
    let scratch = StreamScratch::new("cut");
    let pg = PgScratch::new(&admin, "t_nats_cut").await;
    scratch.sink(&direct).await; // makes the stream

    // Publisher side: the sink reaches the server through a proxy that is cut while batches are in flight.
    let proxy = Proxy::start(nats_addr().await).await;
    let client = client_of(&proxy.url()).await.unwrap();
    let sink = scratch.sink(&client).await.ack_timeout(Duration::from_millis(500));
    let tee = TeeSink { primary: sink.clone(), copy: MemorySink::new() };
    let (_layer, handle) = AuditLayer::builder(tee.clone())
        .batch_size(100)
        .sink_timeout(Duration::from_secs(5))
        .retry(
            Retry::default()
                .max_retries(1_000)
                .base_delay(Duration::from_millis(20))
                .max_delay(Duration::from_millis(100)),
        )
        .build()
        .unwrap();
    for i in 0..EVENTS {
        handle.record(AuditEvent::new("load.event").attribute("i", i.to_string()));
    }
    eventually(LIMIT, || sink.stored() >= 1_000).await;
    proxy.cut();
    eventually(LIMIT, || handle.stats().retries >= 1).await;
    proxy.restore();
    let report = handle.shutdown(LIMIT).await;
    assert!(report.drained, "{report}");
    assert_eq!((report.stats.written, report.stats.lost, report.stats.missing()), (EVENTS as u64, 0, 0));
    assert!(report.stats.retries >= 1);

    // Every event (and the boot's bookends) once in the stream; the retried batches' copies were dropped by id.
    let expected = ids(&tee.copy.events());
    let total = EVENTS as u64 + 2;
    assert_eq!(expected.len() as u64, total);
    assert_eq!(scratch.messages(&direct).await, total);
    // An ack lost in the cut leaves its message counted as a duplicate when the batch is retried, never twice.
    let (stored, duplicates) = (sink.stored(), sink.duplicates());
    assert!(stored <= total && stored + duplicates >= total, "stored {stored}, duplicates {duplicates}");
    eprintln!("acks: {stored} stored, {duplicates} duplicates");

    // Consumer side, through its own proxy, cut mid-run too; then a restart resumes.
    let proxy = Proxy::start(nats_addr().await).await;
    let consumer_client = client_of(&proxy.url()).await.unwrap();
    let settings = Settings { batch: 200, ack_wait: Duration::from_secs(2), ..Settings::new(&scratch.name) };
    let mut mover =
        Mover::new(&jetstream::new(consumer_client.clone()), pg_sink(&pg).await, settings.clone()).await.unwrap();
    // While the mover works, the connection is cut as soon as 1,000 rows are in, and restored once the client
    // has seen it go.
    let cutter = tokio::spawn({
        let (admin, table, watched) = (admin.clone(), pg.table(), consumer_client.clone());
        async move {
            let count = async || -> i64 {
                sqlx::query_scalar(AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
                    .fetch_one(&admin)
                    .await
                    .unwrap()
            };
            let deadline = std::time::Instant::now() + LIMIT;
            while count().await < 1_000 {
                assert!(std::time::Instant::now() < deadline, "the consumer never reached 1,000 rows");
            }
            proxy.cut();
            let connected = || watched.connection_state() == async_nats::connection::State::Connected;
            eventually(LIMIT, || !connected()).await;
            let during = count().await;
            proxy.restore();
            eventually(LIMIT, connected).await;
            (proxy, during)
        }
    });
    move_until(&mut mover, async || pg_count(&admin, &pg).await >= 3_000 && cutter.is_finished()).await;
    let (proxy, during) = cutter.await.unwrap();
    assert!(during < total as i64, "the cut came before the end ({during} rows)");
    drop(proxy);
    drop(mover);
    let mut mover = Mover::new(&jetstream::new(direct.clone()), pg_sink(&pg).await, settings).await.unwrap();
    // Until everything is in and acknowledged (redeliveries of what the cut left unacknowledged included).
    let mut lag = u64::MAX;
    move_until(&mut mover, async || {
        lag = mover_lag(&direct, &scratch.name).await;
        lag == 0
    })
    .await;
    assert_eq!(pg_count(&admin, &pg).await, total as i64);
    assert_eq!(pg_ids(&admin, &pg).await, expected);
}

/// The durable consumer's lag, asked on a connection of its own.
async fn mover_lag(client: &async_nats::Client, stream: &str) -> u64 {
    let stream = jetstream::new(client.clone()).get_stream(stream).await.unwrap();
    let mut consumer: jetstream::consumer::PullConsumer = stream.get_consumer("postgres").await.unwrap();
    let info = consumer.info().await.unwrap();
    info.num_pending + info.num_ack_pending as u64
}

#[tokio::test]
async fn a_restarted_consumer_resumes_where_it_left_off() {
    let Some((client, admin)) = servers().await else { return };
    let scratch = StreamScratch::new("resume");
    let pg = PgScratch::new(&admin, "t_nats_resume").await;
    let sink = scratch.sink(&client).await;
    let (_layer, handle) = AuditLayer::builder(sink.clone()).build().unwrap();
    for i in 0..998 {
        handle.record(AuditEvent::new("resume.event").attribute("i", i.to_string()));
    }
    assert!(handle.shutdown(LIMIT).await.drained);
    assert_eq!(scratch.messages(&client).await, 1_000);

    let settings = Settings { batch: 100, ..Settings::new(&scratch.name) };
    let js = jetstream::new(client.clone());
    let mut first = Mover::new(&js, pg_sink(&pg).await, settings.clone()).await.unwrap();
    for lag in [900, 800, 700] {
        assert_eq!(first.move_batch().await.unwrap(), mover::Moved { rows: 100, rejected: 0, lag });
    }
    assert_eq!(first.lag().await.unwrap(), 700);
    drop(first);
    let mut second = Mover::new(&js, pg_sink(&pg).await, settings).await.unwrap();
    let moved = move_until(&mut second, async || pg_count(&admin, &pg).await == 1_000).await;
    assert_eq!(moved, 700, "the restart neither skipped nor repeated a message");
    assert_eq!(second.move_batch().await.unwrap(), mover::Moved::default());
    assert_eq!(second.lag().await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_publishing_at_once_each_event_once_and_each_instance_contiguous() {
    const EACH: usize = 2_000;
    let Some((client, admin)) = servers().await else { return };
    let scratch = StreamScratch::new("fleet");
    let pg = PgScratch::new(&admin, "t_nats_fleet").await;
    scratch.sink(&client).await;

    let mut runs = Vec::new();
    for n in 1..=3 {
        let own = client_of(&nats_url()).await.unwrap(); // one connection per instance, as separate processes
        let sink = scratch.sink(&own).await;
        let tee = TeeSink { primary: sink, copy: MemorySink::new() };
        let (_layer, handle) =
            AuditLayer::builder(tee.clone()).instance(format!("api-{n}")).batch_size(128).build().unwrap();
        runs.push(tokio::spawn(async move {
            for i in 0..EACH {
                handle.record(AuditEvent::new("fleet.event").attribute("i", i.to_string()));
                if i % 64 == 0 {
                    tokio::task::yield_now().await;
                }
            }
            let report = handle.shutdown(LIMIT).await;
            assert!(report.drained, "{report}");
            assert_eq!(report.stats.written, EACH as u64);
            tee.copy.events()
        }));
    }
    let mut expected = BTreeSet::new();
    for run in runs {
        expected.extend(ids(&run.await.unwrap()));
    }
    let total = 3 * (EACH + 2);
    assert_eq!(expected.len(), total);
    assert_eq!(scratch.messages(&client).await, total as u64);

    let mut mover =
        Mover::new(&jetstream::new(client.clone()), pg_sink(&pg).await, Settings::new(&scratch.name)).await.unwrap();
    let moved = move_until(&mut mover, async || pg_count(&admin, &pg).await == total as i64).await;
    assert_eq!(moved, total as u64);
    assert_eq!(pg_ids(&admin, &pg).await, expected);
    let per_instance: Vec<(String, i64, i64, i64, i64)> = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT instance, count(*), count(DISTINCT seq), min(seq), max(seq) FROM {} GROUP BY instance ORDER BY instance",
        pg.table()
    )))
    .fetch_all(&admin)
    .await
    .unwrap();
    let n = (EACH + 2) as i64;
    assert_eq!(
        per_instance,
        (1..=3).map(|i| (format!("api-{i}"), n, n, 1, n)).collect::<Vec<_>>(),
        "each instance's seq runs 1..={n} with no gap and no repeat"
    );
}
