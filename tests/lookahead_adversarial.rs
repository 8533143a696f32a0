//! Adversarial tests of the look-ahead linking (the worker's `Numbering::LookAhead`): many full batches queued,
//! small batches, failures in patterns, panics, retries, failing fallbacks, stalls at shutdown, checkpoints at
//! batch boundaries, durable requests. Every test asserts exact outcomes.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{answer, assert_identity, eventually, get};
use tower::{Layer, ServiceExt, service_fn};
use tower_audit::integrity::{Integrity, Verifier};
use tower_audit::{AuditEvent, AuditLayer, AuditSink, JsonLinesSink, Policy, Retry, Rule, SinkError, kind};

const LIMIT: Duration = Duration::from_secs(20);

/// One sink call: which sink, the seqs and kinds given, and whether it succeeded.
#[derive(Clone, Debug)]
struct Call {
    primary: bool,
    seqs: Vec<u64>,
    kinds: Vec<String>,
    ok: bool,
}

type Log = Arc<Mutex<Vec<Call>>>;

/// A JSON-lines sink that fails (or panics, or fails the first `flaky` tries) batches holding marked events, and
/// logs every call into a log shared by both sinks (so the order of calls across them is known).
#[derive(Clone)]
struct Marked {
    file: Arc<JsonLinesSink>,
    primary: bool,
    log: Log,
    fail_mark: &'static str,
    /// Per batch (its first seq): attempts so far, for `flaky`.
    tries: Arc<Mutex<HashMap<u64, usize>>>,
    flaky: usize,
    stall_mark: Option<&'static str>,
    entered_stall: Arc<AtomicUsize>,
}

impl Marked {
    fn new(path: &Path, primary: bool, log: &Log, fail_mark: &'static str) -> Self {
        Marked {
            file: Arc::new(JsonLinesSink::open(path).unwrap()),
            primary,
            log: Arc::clone(log),
            fail_mark,
            tries: Arc::default(),
            flaky: 0,
            stall_mark: None,
            entered_stall: Arc::default(),
        }
    }
}

impl AuditSink for Marked {
    async fn write_batch(&self, batch: &[AuditEvent]) -> Result<(), SinkError> {
        let has =
            |m: &str| batch.iter().any(|e| e.attributes.get("mark").is_some_and(|v| v.split(',').any(|x| x == m)));
        let mut call = Call {
            primary: self.primary,
            seqs: batch.iter().map(|e| e.seq).collect(),
            kinds: batch.iter().map(|e| e.kind.to_string()).collect(),
            ok: false,
        };
        if let Some(stall) = self.stall_mark
            && has(stall)
        {
            self.log.lock().unwrap().push(call.clone());
            self.entered_stall.fetch_add(1, SeqCst);
            std::future::pending::<()>().await;
        }
        let panic = has(&format!("{}-panic", self.fail_mark));
        let fail = has(self.fail_mark) || panic;
        let flaky = has(&format!("{}-flaky", self.fail_mark)) && {
            let mut tries = self.tries.lock().unwrap();
            let n = tries.entry(batch[0].seq).or_default();
            *n += 1;
            *n <= self.flaky
        };
        if fail || flaky {
            self.log.lock().unwrap().push(call.clone());
            if panic {
                panic!("marked panic");
            }
            return Err(SinkError::backend("marked failure"));
        }
        let r = self.file.write_batch(batch).await;
        call.ok = r.is_ok();
        self.log.lock().unwrap().push(call);
        r
    }

    async fn flush(&self) -> Result<(), SinkError> {
        self.file.flush().await
    }
}

fn read(path: &Path) -> Vec<AuditEvent> {
    if !path.exists() {
        return Vec::new();
    }
    tower_audit::integrity::read_json_lines(path).unwrap().into_iter().map(Result::unwrap).collect()
}

fn ids(events: &[AuditEvent]) -> Vec<u64> {
    let mut v: Vec<u64> =
        events.iter().filter(|e| e.kind == "test.event").map(|e| e.attributes["i"].parse().unwrap()).collect();
    v.sort_unstable();
    v
}

struct Setup {
    batch_size: usize,
    every: u64,
    fallback: bool,
    retry: Retry,
    flaky: usize,
}

struct Run {
    dir: tempfile::TempDir,
    key: tower_audit::integrity::VerifierKey,
    log: Log,
    primary: PathBuf,
    fallback: PathBuf,
}

fn build(s: &Setup) -> (Run, tower_audit::AuditHandle, AuditLayer) {
    let dir = tempfile::tempdir().unwrap();
    let (primary, fallback) = (dir.path().join("primary.jsonl"), dir.path().join("fallback.jsonl"));
    let log: Log = Arc::default();
    let integrity =
        Integrity::from_seed(&[5; 32]).checkpoint_every(s.every).checkpoint_interval(Duration::from_secs(3600));
    let key = integrity.verifier_key();
    let mut p = Marked::new(&primary, true, &log, "p");
    p.flaky = s.flaky;
    let mut b = AuditLayer::builder(p)
        .batch_size(s.batch_size)
        .flush_interval(Duration::from_secs(3600))
        .retry(s.retry)
        .integrity(integrity);
    if s.fallback {
        b = b.fallback(Marked::new(&fallback, false, &log, "f"));
    }
    let (layer, handle) = b.build().unwrap();
    (Run { dir, key, log, primary, fallback }, handle, layer)
}

fn event(i: u64, marks: &[&str]) -> AuditEvent {
    let mut e = AuditEvent::new("test.event").attribute("i", i.to_string());
    if !marks.is_empty() {
        e = e.attribute("mark", marks.join(","));
    }
    e
}

/// Checks every claim on a finished run: accounting, each recorded event written once or counted, seqs 1..=N
/// with no hole nor duplicate across the trails, both verifiers ok, losses declared, the shutdown event last,
/// checkpoints at pace. Returns (primary, fallback).
fn check(
    run: &Run,
    report: &tower_audit::ShutdownReport,
    recorded: u64,
    every: u64,
) -> (Vec<AuditEvent>, Vec<AuditEvent>) {
    let s = report.stats;
    assert_identity(&s);
    assert_eq!(s.accepted, recorded, "{s:?}");
    assert_eq!(s.written + s.fallback_written + s.lost + s.abandoned, recorded, "{s:?}");
    let (p, f) = (read(&run.primary), read(&run.fallback));
    // Each event recorded is in exactly one trail, or counted lost/abandoned.
    let mut in_trails = ids(&p);
    in_trails.extend(ids(&f));
    in_trails.sort_unstable();
    let mut dedup = in_trails.clone();
    dedup.dedup();
    assert_eq!(dedup.len(), in_trails.len(), "an event written twice");
    assert_eq!(in_trails.len() as u64, s.written + s.fallback_written, "{s:?}");
    assert_eq!(ids(&p).len() as u64, s.written, "{s:?}");
    // Seqs.
    let mut seqs: Vec<u64> = p.iter().chain(&f).map(|e| e.seq).collect();
    seqs.sort_unstable();
    if s.lost == 0 && s.abandoned == 0 {
        assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "seqs across the trails");
    } else {
        let mut d = seqs.clone();
        d.dedup();
        assert_eq!(d.len(), seqs.len(), "a seq written twice: {seqs:?}");
    }
    // Shutdown last (when drained).
    if report.drained {
        assert_eq!(p.last().map(|e| e.kind.as_ref()), Some(kind::AUDIT_SHUTDOWN), "shutdown last");
        assert_eq!(p.last().unwrap().seq, *seqs.last().unwrap(), "the shutdown has the last seq");
        let mut v = Verifier::new(&run.key, &[]);
        v.push_json_lines(&run.primary).unwrap();
        if run.fallback.exists() {
            v.push_json_lines(&run.fallback).unwrap();
        }
        let both = v.finish();
        assert!(both.ok(), "both trails: {both}");
        let alone = tower_audit::integrity::verify_json_lines(&run.primary, &run.key, &[]).unwrap();
        assert!(alone.ok(), "primary alone: {alone}");
        // What the primary lacks is exactly what is declared.
        let in_p: std::collections::HashSet<u64> = p.iter().map(|e| e.seq).collect();
        let mut lacking: Vec<u64> = (1..=*seqs.last().unwrap()).filter(|x| !in_p.contains(x)).collect();
        let mut declared: Vec<u64> = alone.boots[0].lost.iter().flat_map(|r| r.from..=r.to).collect();
        lacking.sort_unstable();
        declared.sort_unstable();
        assert_eq!(declared, lacking, "declared losses of the primary");
    }
    check_pace(&run.log.lock().unwrap(), every);
    (p, f)
}

/// Checkpoint pace, from the order of sink calls: the batch after one that brings the events linked since the
/// last checkpoint to `every` or more is a checkpoint (or the shutdown).
fn check_pace(calls: &[Call], every: u64) {
    let mut since = 0u64;
    let mut need = false;
    let mut prev: Option<&Call> = None;
    let mut units = Vec::new();
    for c in calls {
        // The same batch again (a retry, or the fallback taking a failed batch): one unit.
        if prev.is_some_and(|p| p.seqs == c.seqs) {
            prev = Some(c);
            continue;
        }
        prev = Some(c);
        units.push(c);
    }
    for (n, u) in units.iter().enumerate() {
        let starts_checkpoint = matches!(u.kinds[0].as_str(), kind::AUDIT_CHECKPOINT | kind::AUDIT_SHUTDOWN);
        assert!(
            !need || starts_checkpoint,
            "unit {n} {:?} {:?} should be a checkpoint ({since} linked since the last, every {every}); units: {:#?}",
            u.seqs,
            u.kinds,
            units
                .iter()
                .map(|u| (u.primary, u.seqs.clone(), u.kinds.iter().map(|k| &k[..k.len().min(14)]).collect::<Vec<_>>()))
                .collect::<Vec<_>>()
        );
        for k in &u.kinds {
            if matches!(k.as_str(), kind::AUDIT_CHECKPOINT | kind::AUDIT_SHUTDOWN) {
                since = 0;
            } else {
                since += 1;
            }
        }
        need = since >= every;
    }
}

async fn queue_and_drain(
    setup: Setup,
    batches: u64,
    marks: impl Fn(u64) -> Vec<&'static str>,
    expect: (u64, u64, u64),
) -> (Run, Vec<AuditEvent>, Vec<AuditEvent>, tower_audit::ShutdownReport) {
    let (run, handle, _layer) = build(&setup);
    let n = batches * setup.batch_size as u64;
    for i in 0..n {
        let b = i / setup.batch_size as u64;
        assert!(handle.record(event(i, &marks(b))));
    }
    let settled = |s: tower_audit::Stats| s.written + s.fallback_written + s.lost;
    let start = std::time::Instant::now();
    // Batches after a gap are one short (the gap event goes in front): a partial rest may wait for shutdown.
    while settled(handle.stats()) + handle.stats().queued.min(setup.batch_size as u64 - 1) < n
        || handle.stats().queued >= setup.batch_size as u64
    {
        assert!(start.elapsed() < LIMIT, "not settled: {:?}", handle.stats());
        tokio::task::yield_now().await;
    }
    let report = handle.shutdown(LIMIT).await;
    assert!(report.drained, "{report}");
    let s = report.stats;
    if expect.0 != u64::MAX {
        assert_eq!((s.written, s.fallback_written, s.lost), expect, "{s:?}");
    }
    let (p, f) = check(&run, &report, n, setup.every);
    (run, p, f, report)
}

fn plain(batch_size: usize, every: u64, fallback: bool) -> Setup {
    Setup { batch_size, every, fallback, retry: Retry::none(), flaky: 0 }
}

// --------------------------------------------------------------------------------------------------------------

/// No failures: 30 full batches of 2 queued; everything written, checkpoints at pace (every 4 = two batches).
#[tokio::test]
async fn no_failures_small_batches_checkpoints_at_batch_boundaries() {
    for (bs, every) in [(2, 4), (3, 6), (4, 4), (8, 8), (4, 6)] {
        queue_and_drain(plain(bs, every, false), 30, |_| vec![], (30 * bs as u64, 0, 0)).await;
    }
}

/// Every other batch fails at the primary, the fallback takes them.
#[tokio::test]
async fn every_other_batch_fails_with_fallback() {
    for bs in [2usize, 3, 4, 8] {
        queue_and_drain(
            plain(bs, 1000, true),
            20,
            |b| if b % 2 == 1 { vec!["p"] } else { vec![] },
            (10 * bs as u64, 10 * bs as u64, 0),
        )
        .await;
    }
}

/// Every other batch fails and there is no fallback: lost, counted, declared.
#[tokio::test]
async fn every_other_batch_fails_without_fallback() {
    for bs in [2usize, 4, 8] {
        queue_and_drain(
            plain(bs, 1000, false),
            20,
            |b| if b % 2 == 1 { vec!["p"] } else { vec![] },
            (10 * bs as u64, 0, 10 * bs as u64),
        )
        .await;
    }
}

/// Runs of failures; the fallback fails some of them too.
#[tokio::test]
async fn runs_of_failures_fallback_failing_too() {
    let marks = |b: u64| match b {
        3..=6 => vec!["p"],
        7 => vec!["p", "f"],
        10..=12 => vec!["p", "f"],
        13 => vec!["p"],
        _ => vec![],
    };
    // failed at primary: 3..=7, 10..=13 = 9 batches; fallback fails 7, 10, 11, 12 = 4.
    queue_and_drain(plain(4, 1000, true), 20, marks, (11 * 4, 5 * 4, 4 * 4)).await;
}

/// Failures with checkpoint_every landing on batch boundaries (and on the gap event written alone).
#[tokio::test]
async fn failures_with_checkpoints_at_boundaries() {
    for (bs, every) in [(4usize, 6u64), (4, 4), (2, 3), (4, 5), (3, 7)] {
        queue_and_drain(plain(bs, every, false), 16, |b| if b % 3 == 1 { vec!["p"] } else { vec![] }, (u64::MAX, 0, 0))
            .await;
    }
}

/// Same with a fallback.
#[tokio::test]
async fn failures_with_fallback_and_checkpoints_at_boundaries() {
    for (bs, every) in [(4usize, 6u64), (4, 4), (2, 3), (4, 5), (3, 7)] {
        queue_and_drain(plain(bs, every, true), 16, |b| if b % 3 == 1 { vec!["p"] } else { vec![] }, (u64::MAX, 0, 0))
            .await;
    }
}

/// The batch right after a gap fails too (fail, ok, fail-after-gap pattern: batches 2, 3 and then 5).
#[tokio::test]
async fn the_batch_after_a_gap_fails() {
    queue_and_drain(
        plain(4, 1000, false),
        10,
        |b| if [2, 3, 5].contains(&b) { vec!["p"] } else { vec![] },
        (28, 0, 12),
    )
    .await;
    queue_and_drain(plain(4, 1000, true), 10, |b| if [2, 3, 5].contains(&b) { vec!["p"] } else { vec![] }, (28, 12, 0))
        .await;
}

/// Panicking primary on some batches.
#[tokio::test]
async fn panicking_primary() {
    let (_, _, _, r) =
        queue_and_drain(plain(4, 1000, true), 12, |b| if b % 4 == 2 { vec!["p-panic"] } else { vec![] }, (36, 12, 0))
            .await;
    assert_eq!(r.stats.sink_panics, 3);
    queue_and_drain(plain(3, 5, false), 12, |b| if b % 4 == 2 { vec!["p-panic"] } else { vec![] }, (27, 0, 9)).await;
}

/// Panicking fallback too.
#[tokio::test]
async fn panicking_fallback() {
    queue_and_drain(plain(4, 1000, true), 12, |b| if b % 3 == 0 { vec!["p", "f-panic"] } else { vec![] }, (32, 0, 16))
        .await;
}

/// Retries: marked batches fail twice then succeed, with Retry allowing it.
#[tokio::test]
async fn retries_succeed() {
    let setup = Setup {
        batch_size: 4,
        every: 6,
        fallback: true,
        retry: Retry::default().base_delay(Duration::from_millis(5)),
        flaky: 2,
    };
    queue_and_drain(setup, 12, |b| if b % 2 == 0 { vec!["p-flaky"] } else { vec![] }, (48, 0, 0)).await;
}

/// Concurrent producer on a multi-thread runtime, events marked to fail scattered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_producer_scattered_failures() {
    for (bs, every, fallback) in [(3usize, 5u64, true), (2, 4, false), (8, 10, true)] {
        let setup = plain(bs, every, fallback);
        let (run, handle, _layer) = build(&setup);
        let n = 600u64;
        let h = handle.clone();
        let producer = tokio::spawn(async move {
            for i in 0..n {
                let marks: Vec<&str> = if i % 13 == 0 {
                    vec!["p"]
                } else if i % 29 == 0 {
                    vec!["p", "f"]
                } else {
                    vec![]
                };
                while !h.record(event(i, &marks)) {
                    tokio::task::yield_now().await;
                }
                if i % 50 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        });
        producer.await.unwrap();
        // The last partial batch goes at shutdown.
        let report = handle.shutdown(LIMIT).await;
        assert!(report.drained, "{report}");
        check(&run, &report, n, u64::MAX);
        let _ = run.dir;
    }
}

/// Shutdown while a producer keeps full batches coming: starts promptly, drains within the deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_while_full_batches_keep_coming() {
    let setup = plain(4, 10, true);
    let (run, handle, _layer) = build(&setup);
    let h = handle.clone();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = Arc::clone(&stop);
    let producer = tokio::spawn(async move {
        let mut i = 0u64;
        let mut accepted = 0u64;
        while !stop2.load(SeqCst) {
            let marks: Vec<&str> = if i.is_multiple_of(11) { vec!["p"] } else { vec![] };
            if h.record(event(i, &marks)) {
                accepted += 1;
            }
            i += 1;
            if i.is_multiple_of(64) {
                tokio::task::yield_now().await;
            }
        }
        accepted
    });
    eventually(LIMIT, || handle.stats().written > 400).await;
    let start = std::time::Instant::now();
    let report = handle.shutdown(Duration::from_secs(5)).await;
    let took = start.elapsed();
    stop.store(true, SeqCst);
    let accepted = producer.await.unwrap();
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert!(report.drained, "{report}");
    check(&run, &report, accepted, u64::MAX);
}

/// A stall past a short deadline with batches linked ahead, after failures: abandoned exactly, no seq twice.
#[tokio::test]
async fn stall_past_deadline_after_failures() {
    let dir = tempfile::tempdir().unwrap();
    let (primary, fallback) = (dir.path().join("primary.jsonl"), dir.path().join("fallback.jsonl"));
    let log: Log = Arc::default();
    let integrity =
        Integrity::from_seed(&[5; 32]).checkpoint_every(1000).checkpoint_interval(Duration::from_secs(3600));
    let key = integrity.verifier_key();
    let mut p = Marked::new(&primary, true, &log, "p");
    p.stall_mark = Some("stall");
    let stalls = Arc::clone(&p.entered_stall);
    let (_layer, handle) = AuditLayer::builder(p)
        .batch_size(4)
        .flush_interval(Duration::from_secs(3600))
        .retry(Retry::none())
        .fallback(Marked::new(&fallback, false, &log, "f"))
        .integrity(integrity)
        .build()
        .unwrap();
    // Batches: 0 ok, 1 fails, 2 ok (after the gap), 3 stalls, 4..6 queued behind.
    for i in 0..28u64 {
        let b = i / 4;
        let marks: Vec<&str> = match b {
            1 => vec!["p"],
            3 => vec!["stall"],
            _ => vec![],
        };
        assert!(handle.record(event(i, &marks)));
    }
    eventually(LIMIT, || stalls.load(SeqCst) == 1).await;
    let report = handle.shutdown(Duration::from_millis(200)).await;
    let s = report.stats;
    assert!(!report.drained);
    assert_identity(&s);
    assert_eq!((s.written, s.fallback_written, s.lost, s.abandoned), (8, 4, 0, 16), "{s:?}");
    let run = Run { dir, key, log, primary, fallback };
    check(&run, &report, 28, u64::MAX);
}

/// Durable requests behind a queue of full batches: 2xx only once the event is written; 503 when it is lost.
#[tokio::test]
async fn durable_behind_full_batches() {
    for (fail_request, fallback_fails) in [(false, false), (true, false), (true, true)] {
        let dir = tempfile::tempdir().unwrap();
        let (primary, fallback) = (dir.path().join("primary.jsonl"), dir.path().join("fallback.jsonl"));
        let log: Log = Arc::default();
        let integrity =
            Integrity::from_seed(&[5; 32]).checkpoint_every(1000).checkpoint_interval(Duration::from_secs(3600));
        let key = integrity.verifier_key();
        let (layer, handle) = AuditLayer::builder(RequestMarks(Marked::new(&primary, true, &log, "p"), fail_request))
            .batch_size(4)
            .flush_interval(Duration::from_secs(3600))
            .retry(Retry::none())
            .fallback(RequestMarks(Marked::new(&fallback, false, &log, "f"), fail_request && fallback_fails))
            .integrity(integrity)
            .policy(Policy::new().rule(Rule::any().durable(Duration::from_secs(10))))
            .build()
            .unwrap();
        for i in 0..10u64 {
            assert!(handle.record(event(i, &[])));
        }
        let svc = layer.layer(service_fn(|_req| answer(200, "ok")));
        let res = tokio::spawn(svc.oneshot(get("/pay")));
        let res = res.await.unwrap().unwrap();
        let s = handle.stats();
        let written_req =
            read(&primary).iter().chain(read(&fallback).iter()).filter(|e| e.kind == kind::HTTP_REQUEST).count();
        if fail_request && fallback_fails {
            assert_eq!(res.status(), 503, "{s:?}");
            assert_eq!(written_req, 0);
        } else {
            assert_eq!(res.status(), 200, "{s:?}");
            assert_eq!(written_req, 1, "{s:?}");
        }
        let report = handle.shutdown(LIMIT).await;
        assert!(report.drained, "{report}");
        let run = Run { dir, key, log, primary, fallback };
        let s = report.stats;
        assert_identity(&s);
        check_pace(&run.log.lock().unwrap(), 1000);
    }
}

/// Fails the batches that hold the request's event (when `.1`).
#[derive(Clone)]
struct RequestMarks(Marked, bool);

impl AuditSink for RequestMarks {
    async fn write_batch(&self, batch: &[AuditEvent]) -> Result<(), SinkError> {
        if self.1 && batch.iter().any(|e| e.kind == kind::HTTP_REQUEST) {
            self.0.log.lock().unwrap().push(Call {
                primary: self.0.primary,
                seqs: batch.iter().map(|e| e.seq).collect(),
                kinds: batch.iter().map(|e| e.kind.to_string()).collect(),
                ok: false,
            });
            return Err(SinkError::backend("request batch fails"));
        }
        self.0.write_batch(batch).await
    }

    async fn flush(&self) -> Result<(), SinkError> {
        self.0.flush().await
    }
}
