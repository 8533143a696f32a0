//! Sinks and helpers shared by the integration tests. Each sink here is a mock only because the behaviour it
//! fakes (never returning, failing, panicking) is what the test is about.
#![allow(dead_code, unreachable_pub)]

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame};
use http_body_util::Full;
use tokio::sync::{Notify, mpsc};
use tower_audit::{AuditEvent, AuditLayer, AuditSink, MemorySink, SinkError, kind};

/// Polls `condition` until it holds, yielding to other tasks in between; fails the test after `limit` of real
/// time (so it also works, and stays bounded, under a paused Tokio clock).
pub async fn eventually(limit: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + limit;
    while !condition() {
        assert!(std::time::Instant::now() < deadline, "condition not reached within {limit:?}");
        tokio::task::yield_now().await;
    }
}

/// The kinds of `events`, in order.
pub fn kinds(events: &[AuditEvent]) -> Vec<&str> {
    events.iter().map(|e| e.kind.as_ref()).collect()
}

/// A trail without the worker's bookends. Checks that it starts with the pipeline's `audit.boot` event (seq 1)
/// and holds no other, and that an `audit.shutdown` event, if there is one, is its last event and its only one;
/// returns every other event, `audit.gap` events included (so a test expecting none still sees one appear).
pub fn without_bookends(mut events: Vec<AuditEvent>) -> Vec<AuditEvent> {
    assert_eq!(events.first().map(|e| (e.kind.as_ref(), e.seq)), Some((kind::AUDIT_BOOT, 1)), "{events:?}");
    events.remove(0);
    if events.last().is_some_and(|e| e.kind == kind::AUDIT_SHUTDOWN) {
        events.pop();
    }
    let stray: Vec<_> =
        events.iter().filter(|e| matches!(e.kind.as_ref(), kind::AUDIT_BOOT | kind::AUDIT_SHUTDOWN)).collect();
    assert!(stray.is_empty(), "a boot or shutdown event out of place: {stray:?}");
    events
}

/// What a memory sink holds between the worker's bookends: see [`without_bookends`].
pub fn recorded(sink: &MemorySink) -> Vec<AuditEvent> {
    without_bookends(sink.events())
}

/// The trail of a pipeline that shut down cleanly: checks it ends with its `audit.shutdown` event, and returns
/// what lies between the bookends (see [`without_bookends`]).
pub fn ended_cleanly(events: Vec<AuditEvent>) -> Vec<AuditEvent> {
    assert_eq!(events.last().map(|e| e.kind.as_ref()), Some(kind::AUDIT_SHUTDOWN), "{events:?}");
    without_bookends(events)
}

/// Lets the worker's first batch (its `audit.boot` event, alone) through to `boot`, then hands every call to
/// `inner`: for tests of a sink that misbehaves from its first call on (stalls, fails) whose subject is the
/// request events, not the boot.
#[derive(Clone, Default)]
pub struct PassBoot<S> {
    pub inner: S,
    pub boot: MemorySink,
    passed: Arc<AtomicBool>,
}

impl<S> PassBoot<S> {
    pub fn new(inner: S) -> Self {
        Self { inner, boot: MemorySink::new(), passed: Arc::default() }
    }

    /// Whether the first call held the boot event alone, and went through.
    pub fn booted(&self) -> bool {
        kinds(&self.boot.events()) == [kind::AUDIT_BOOT]
    }
}

impl<S: AuditSink> AuditSink for PassBoot<S> {
    async fn write_batch(&self, batch: &[AuditEvent]) -> Result<(), SinkError> {
        if self.passed.swap(true, Ordering::SeqCst) {
            self.inner.write_batch(batch).await
        } else {
            self.boot.write_batch(batch).await
        }
    }

    async fn flush(&self) -> Result<(), SinkError> {
        self.inner.flush().await
    }
}

/// A sink whose writes wait until the gate opens. `entered` counts calls that started.
#[derive(Clone, Default)]
pub struct GateSink {
    pub entered: Arc<AtomicUsize>,
    pub open: Arc<Notify>,
    pub written: Arc<Mutex<Vec<AuditEvent>>>,
}

impl GateSink {
    pub fn entered(&self) -> usize {
        self.entered.load(Ordering::SeqCst)
    }

    /// Lets the worker's first batch through: its `audit.boot` event, alone. Then `entered() == 1`, `written`
    /// holds that event, and the next call is the first with request or custom events.
    pub async fn pass_boot(&self) {
        eventually(Duration::from_secs(10), || self.entered() == 1).await;
        // Notified until written (the call may not be waiting yet), never after: the next call stays shut.
        eventually(Duration::from_secs(10), || {
            !self.written.lock().unwrap().is_empty() || {
                self.open.notify_waiters();
                false
            }
        })
        .await;
        assert_eq!(kinds(&self.written.lock().unwrap()), [kind::AUDIT_BOOT]);
    }

    /// Shuts the pipeline down while holding the gate open, so every batch goes through.
    pub async fn shutdown_open(&self, handle: &tower_audit::AuditHandle) -> tower_audit::ShutdownReport {
        self.open.notify_waiters();
        let stop = tokio::spawn({
            let handle = handle.clone();
            async move { handle.shutdown(Duration::from_secs(10)).await }
        });
        eventually(Duration::from_secs(10), || {
            self.open.notify_waiters();
            stop.is_finished()
        })
        .await;
        stop.await.unwrap()
    }
}

impl AuditSink for GateSink {
    async fn write_batch(&self, batch: &[AuditEvent]) -> Result<(), SinkError> {
        self.entered.fetch_add(1, Ordering::SeqCst);
        self.open.notified().await;
        self.written.lock().unwrap().extend_from_slice(batch);
        Ok(())
    }
}

/// A sink that never returns: the incident's stalled database.
#[derive(Clone, Default)]
pub struct StalledSink {
    pub entered: Arc<AtomicUsize>,
}

impl AuditSink for StalledSink {
    async fn write_batch(&self, _batch: &[AuditEvent]) -> Result<(), SinkError> {
        self.entered.fetch_add(1, Ordering::SeqCst);
        std::future::pending().await
    }
}

/// What a scripted sink does on one call.
#[derive(Clone, Copy, Debug)]
pub enum Step {
    Fail,
    Panic,
    Ok,
}

/// A sink that follows a script, call by call (then succeeds), and records every batch it was given.
#[derive(Clone, Default)]
pub struct ScriptedSink {
    pub script: Arc<Mutex<Vec<Step>>>,
    pub calls: Arc<Mutex<Vec<Vec<AuditEvent>>>>,
    pub written: tower_audit::MemorySink,
}

impl ScriptedSink {
    pub fn new(script: &[Step]) -> Self {
        let mut steps = script.to_vec();
        steps.reverse();
        Self { script: Arc::new(Mutex::new(steps)), ..Self::default() }
    }

    pub fn calls(&self) -> Vec<Vec<AuditEvent>> {
        self.calls.lock().unwrap().clone()
    }
}

impl AuditSink for ScriptedSink {
    async fn write_batch(&self, batch: &[AuditEvent]) -> Result<(), SinkError> {
        self.calls.lock().unwrap().push(batch.to_vec());
        let step = self.script.lock().unwrap().pop().unwrap_or(Step::Ok);
        match step {
            Step::Fail => Err(SinkError::backend("scripted failure")),
            Step::Panic => panic!("scripted panic"),
            Step::Ok => self.written.write_batch(batch).await,
        }
    }
}

/// A sink that always fails.
#[derive(Clone, Default)]
pub struct FailingSink;

impl AuditSink for FailingSink {
    async fn write_batch(&self, _batch: &[AuditEvent]) -> Result<(), SinkError> {
        Err(SinkError::backend("always fails"))
    }
}

pub type TestResponse = Response<Full<Bytes>>;

/// A plain `tower` service answering `status` with `body`.
pub async fn answer(status: u16, body: &'static str) -> Result<TestResponse, Infallible> {
    Ok(Response::builder().status(status).body(Full::new(Bytes::from_static(body.as_bytes()))).unwrap())
}

pub fn get(uri: &str) -> Request<Full<Bytes>> {
    Request::get(uri).body(Full::default()).unwrap()
}

/// A response body fed through a channel, to test streaming.
pub struct ChannelBody {
    pub rx: mpsc::Receiver<Frame<Bytes>>,
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx.poll_recv(cx).map(|frame| frame.map(Ok))
    }
}

/// A response body that fails after one data frame.
pub struct FailingBody {
    pub sent: bool,
}

impl Body for FailingBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        if self.sent {
            Poll::Ready(Some(Err(std::io::Error::other("connection to upstream lost"))))
        } else {
            self.sent = true;
            Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"partial")))))
        }
    }
}

/// Drives a body to its end, returning its data.
pub async fn read_body<B>(body: B) -> Result<Bytes, B::Error>
where
    B: Body,
{
    use http_body_util::BodyExt;
    Ok(body.collect().await?.to_bytes())
}

pub fn boxed<F: Future + Send + 'static>(f: F) -> Pin<Box<dyn Future<Output = F::Output> + Send>> {
    Box::pin(f)
}

/// Writes every batch to two sinks: the one under test, and a memory sink holding the expected events.
#[derive(Clone)]
pub struct TeeSink<S> {
    pub primary: S,
    pub copy: tower_audit::MemorySink,
}

impl<S: AuditSink> AuditSink for TeeSink<S> {
    async fn write_batch(&self, batch: &[AuditEvent]) -> Result<(), SinkError> {
        self.primary.write_batch(batch).await?;
        self.copy.write_batch(batch).await
    }
}

/// The SQL blocks of the README's query cookbook for `dialect`, by name: each block starts with
/// `-- cookbook: NAME (DIALECT)`.
pub fn cookbook(dialect: &str) -> Vec<(String, String)> {
    let readme = include_str!("../../README.md");
    let mut queries = Vec::new();
    for block in readme.split("```sql").skip(1) {
        let block = block.split("```").next().unwrap();
        let Some(header) = block.trim_start().lines().next() else { continue };
        let Some(rest) = header.strip_prefix("-- cookbook: ") else { continue };
        let (name, tag) = rest.rsplit_once(' ').unwrap();
        if tag == format!("({dialect})") {
            queries.push((name.to_owned(), block.trim().to_owned()));
        }
    }
    queries
}

/// Builds events that exercise every field with hostile and non-ASCII values.
pub fn hostile_events() -> Vec<AuditEvent> {
    let mut events = Vec::new();
    let mut e = AuditEvent::new("auth.login_failed")
        .actor("o'brien \"the\" ünïcödé 👀")
        .outcome(tower_audit::Outcome::Denied)
        .attribute("reason", "quote ' and \" and \\ and ; DROP TABLE x; --")
        .attribute("émoji", "🔥");
    e.method = Some("POST".into());
    e.route = Some("/api/auth/login".into());
    e.path = Some("/api/auth/login?next=%2Fhome".into());
    e.status = Some(401);
    e.grpc_status = Some(16);
    e.latency_us = Some(123_456);
    e.request_id = Some("req-\u{fffd}-1".into());
    e.client_addr = Some("2001:db8::42".parse().unwrap());
    e.user_agent = Some("Mozilla/5.0 (X11; Linux) \u{fffd}\u{fffd}".into());
    events.push(e);
    let mut bare = AuditEvent::new("user.created");
    bare.client_addr = Some("203.0.113.9".parse().unwrap());
    events.push(bare);
    events
}

/// Logins and failures, one failure two hours old (outside "the last hour").
pub fn cookbook_events() -> Vec<AuditEvent> {
    let now = std::time::SystemTime::now();
    let at = |kind: &'static str, actor: &str, addr: &str, ago_secs: u64| {
        let mut e = AuditEvent::new(kind).actor(actor).outcome(if kind.ends_with("failed") {
            tower_audit::Outcome::Denied
        } else {
            tower_audit::Outcome::Success
        });
        e.client_addr = Some(addr.parse().unwrap());
        e.time = now - Duration::from_secs(ago_secs);
        e
    };
    vec![
        at("auth.login_succeeded", "bob@example.com", "203.0.113.5", 300),
        at("auth.login_succeeded", "alice@example.com", "198.51.100.7", 200),
        at("auth.login_succeeded", "alice@example.com", "198.51.100.7", 100),
        at("auth.login_failed", "mallory@example.com", "192.0.2.66", 50),
        at("auth.login_failed", "mallory@example.com", "192.0.2.66", 40),
        at("auth.login_failed", "mallory@example.com", "192.0.2.66", 30),
        at("auth.login_failed", "alice@example.com", "198.51.100.7", 20),
        at("auth.login_failed", "alice@example.com", "198.51.100.7", 7200),
    ]
}

/// Where the Postgres tests find a server: `TOWER_AUDIT_PG_URL`, or the local default.
#[cfg(feature = "postgres")]
pub fn pg_url() -> String {
    std::env::var("TOWER_AUDIT_PG_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// Connects a pool with `options` to [`pg_url`]; `None` (after saying why) when the variable is unset and no
/// server answers. With the variable set, an unreachable server fails the test instead of skipping it.
#[cfg(feature = "postgres")]
pub async fn pg_pool(options: sqlx::postgres::PgPoolOptions) -> Option<sqlx::PgPool> {
    let url = pg_url();
    match options.connect(&url).await {
        Ok(pool) => Some(pool),
        Err(e) if std::env::var_os("TOWER_AUDIT_PG_URL").is_none() => {
            eprintln!("skipping: no Postgres at {url} ({e}); set TOWER_AUDIT_PG_URL to run this test");
            None
        }
        Err(e) => panic!("TOWER_AUDIT_PG_URL={url} is set, but the server is unreachable: {e}"),
    }
}

/// A Postgres schema of the test's own (random suffix, so concurrent runs never collide), dropped at the end,
/// also when the test fails.
#[cfg(feature = "postgres")]
pub struct PgScratch {
    pub schema: String,
}

#[cfg(feature = "postgres")]
impl PgScratch {
    pub async fn new(admin: &sqlx::PgPool, prefix: &str) -> Self {
        let schema = format!("{prefix}_{:08x}", fastrand::u32(..));
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}"))).execute(admin).await.unwrap();
        Self { schema }
    }

    /// The test's audit table, `<schema>.events`.
    pub fn table(&self) -> String {
        self.qualified("events")
    }

    /// `<schema>.<name>`.
    pub fn qualified(&self, name: &str) -> String {
        format!("{}.{name}", self.schema)
    }
}

#[cfg(feature = "postgres")]
impl Drop for PgScratch {
    fn drop(&mut self) {
        drop_pg_schema(&self.schema);
    }
}

/// Drops a test's own Postgres schema, usable from `Drop` (on a thread and runtime of its own, as the test's
/// runtime may be unwinding). Ends first any session still holding a lock in the schema: only that test's
/// sessions can. Says so, without failing, when it cannot.
#[cfg(feature = "postgres")]
pub fn drop_pg_schema(schema: &str) {
    use sqlx::Connection;
    let sql = format!(
        "SELECT pg_terminate_backend(l.pid) FROM pg_locks l \
         JOIN pg_class c ON c.oid = l.relation JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = '{schema}' AND l.pid <> pg_backend_pid(); \
         SET lock_timeout = '10s'; DROP SCHEMA IF EXISTS {schema} CASCADE"
    );
    let dropped = std::thread::spawn(move || -> Result<(), String> {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
        runtime
            .block_on(async {
                let mut conn = sqlx::PgConnection::connect(&pg_url()).await?;
                sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&mut conn).await?;
                conn.close().await
            })
            .map_err(|e| e.to_string())
    })
    .join();
    match dropped {
        Ok(Ok(())) => {}
        Ok(Err(e)) => eprintln!("could not drop schema {schema}: {e}"),
        Err(_) => eprintln!("could not drop schema {schema}: the cleanup thread panicked"),
    }
}

/// Runs two pipelines one after the other into `sink` (3 events, then 2), each shut down cleanly; returns each
/// one's handle and the events it wrote.
pub async fn two_boots<S: AuditSink + Clone>(sink: S) -> Vec<(tower_audit::AuditHandle, Vec<AuditEvent>)> {
    let mut runs = Vec::new();
    for n in [3, 2] {
        let copy = tower_audit::MemorySink::new();
        let (_layer, handle) =
            tower_audit::AuditLayer::builder(TeeSink { primary: sink.clone(), copy: copy.clone() }).build().unwrap();
        for _ in 0..n {
            assert!(handle.record(AuditEvent::new("boot.test")));
        }
        let report = handle.shutdown(Duration::from_secs(10)).await;
        assert!(report.drained && report.stats.written == n, "{report}");
        runs.push((handle, copy.events()));
    }
    runs
}

/// Both lines of the accounting identity (the spill's buckets are 0 without a spill), and the settled side
/// never past the accepted one (`queued` is a saturating difference, which would hide it).
pub fn assert_identity(s: &tower_audit::Stats) {
    assert_eq!(s.offered(), s.accepted + s.dropped() + s.refused, "{s:?}");
    let settled = s.written + s.fallback_written + s.lost + s.abandoned + s.spill_full + s.left_in_spill + s.corrupt;
    assert_eq!(s.accepted + s.recovered, settled + s.queued, "{s:?}");
    assert!(settled <= s.accepted + s.recovered, "{s:?}");
}

/// A pipeline into a memory sink with a long flush interval (nothing is written before [`drained`] drains it).
pub fn pipeline() -> (AuditLayer, tower_audit::AuditHandle, MemorySink) {
    let sink = MemorySink::new();
    let (layer, handle) = AuditLayer::builder(sink.clone()).flush_interval(Duration::from_secs(3600)).build().unwrap();
    (layer, handle, sink)
}

/// Shuts the pipeline down (10 s at most), checks that it drained and that its counts add up, and returns what
/// it wrote between its boot and shutdown events.
pub async fn drained(handle: &tower_audit::AuditHandle, sink: &MemorySink) -> Vec<AuditEvent> {
    let report = handle.shutdown(Duration::from_secs(10)).await;
    assert!(report.drained, "{report:?}");
    assert_identity(&report.stats);
    ended_cleanly(sink.events())
}

/// A memory sink that says when the worker dropped it, i.e. when the worker has ended.
pub struct DropSignal {
    inner: MemorySink,
    dropped: Option<tokio::sync::oneshot::Sender<()>>,
}

impl DropSignal {
    /// The sink, writing into `inner`, and what resolves when it is dropped.
    pub fn new(inner: MemorySink) -> (DropSignal, tokio::sync::oneshot::Receiver<()>) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        (DropSignal { inner, dropped: Some(tx) }, rx)
    }
}

impl AuditSink for DropSignal {
    async fn write_batch(&self, batch: &[AuditEvent]) -> Result<(), SinkError> {
        self.inner.write_batch(batch).await
    }
}

impl Drop for DropSignal {
    fn drop(&mut self) {
        let _ = self.dropped.take().unwrap().send(());
    }
}
