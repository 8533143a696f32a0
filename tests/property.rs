//! The accounting identity under random faults: a seeded random schedule of producers (custom events and
//! requests under every overflow policy), a chaotic primary and fallback sink (errors, panics while making or
//! polling the future, hangs past the sink timeout, slow writes), a small queue and byte budget, and a shutdown
//! at a random moment with a random deadline. Each run checks the counters against what the sinks really hold.
//!
//! `TOWER_AUDIT_SEEDS=N` runs N schedules (default 1000); a failure names its seed, and
//! `TOWER_AUDIT_SEED=S` replays one.

mod common;

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::{answer, get, read_body};
use http::Request;
use http_body_util::Full;
use tower::{Layer, ServiceExt, service_fn};
use tower_audit::integrity::{Finding, Integrity, Verifier};
use tower_audit::{AuditEvent, AuditLayer, AuditSink, Overflow, Retry, SinkError, Stats, kind};

/// A sink that does something random on every call. It keeps a batch only when it returns `Ok`, so "written"
/// and "not written" are never ambiguous.
#[derive(Clone)]
struct Chaos {
    rng: Arc<Mutex<fastrand::Rng>>,
    kept: Arc<Mutex<Vec<AuditEvent>>>,
    largest_batch: Arc<AtomicUsize>,
}

impl Chaos {
    fn new(seed: u64) -> Self {
        Self {
            rng: Arc::new(Mutex::new(fastrand::Rng::with_seed(seed))),
            kept: Arc::default(),
            largest_batch: Arc::default(),
        }
    }

    fn kept(&self) -> Vec<AuditEvent> {
        self.kept.lock().unwrap().clone()
    }
}

impl AuditSink for Chaos {
    fn write_batch(&self, batch: &[AuditEvent]) -> impl Future<Output = Result<(), SinkError>> + Send {
        self.largest_batch.fetch_max(batch.len(), SeqCst);
        let (roll, pause) = {
            let mut rng = self.rng.lock().unwrap();
            (rng.u8(..100), Duration::from_millis(rng.u64(0..30)))
        };
        if roll < 5 {
            panic!("chaos: panics while making its future");
        }
        let kept = Arc::clone(&self.kept);
        let batch = batch.to_vec();
        async move {
            match roll {
                5..10 => panic!("chaos: panics while polled"),
                10..25 => Err(SinkError::backend("chaos: fails")),
                25..32 => std::future::pending().await,
                _ => {
                    tokio::time::sleep(pause).await;
                    kept.lock().unwrap().extend(batch);
                    Ok(())
                }
            }
        }
    }
}

const COUNTERS: usize = 14;

fn monotonic(s: &Stats) -> [u64; COUNTERS] {
    [
        s.accepted,
        s.dropped_queue_full,
        s.dropped_queue_bytes,
        s.dropped_wait_timeout,
        s.dropped_closed,
        s.refused,
        s.written,
        s.fallback_written,
        s.lost,
        s.abandoned,
        s.batches,
        s.retries,
        s.sink_panics,
        s.gap_events,
    ]
}

fn run(seed: u64) {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().unwrap();
    runtime.block_on(schedule(seed));
}

async fn schedule(seed: u64) {
    // Retry jitter draws from this thread's generator: seeding it makes the run replayable.
    fastrand::seed(seed);
    let mut rng = fastrand::Rng::with_seed(seed);
    let capacity = rng.usize(2..16);
    let batch_size = rng.usize(1..=capacity.min(6));
    let overflow = match rng.u8(..3) {
        0 => Overflow::Drop,
        1 => Overflow::Wait(Duration::from_millis(rng.u64(1..20))),
        _ => Overflow::FailClosed,
    };
    let primary = Chaos::new(rng.u64(..));
    let fallback = rng.bool().then(|| Chaos::new(rng.u64(..)));
    let mut builder = AuditLayer::builder(primary.clone())
        .capacity(capacity)
        .batch_size(batch_size)
        .flush_interval(Duration::from_millis(rng.u64(5..50)))
        .overflow(overflow)
        .sink_timeout(Duration::from_millis(50))
        .retry(Retry::default().max_retries(rng.u32(0..3)).base_delay(Duration::from_millis(5)));
    if rng.bool() {
        builder = builder.max_queued_bytes(rng.usize(1_000..8_000));
    }
    if let Some(fallback) = &fallback {
        builder = builder.fallback(fallback.clone());
    }
    // Every other schedule with the hash chain on (not drawn from `rng`: the schedules stay as they were).
    let integrity = (seed % 2 == 1).then(|| Integrity::from_seed(&[seed as u8; 32]));
    if let Some(integrity) = &integrity {
        builder = builder.integrity(integrity.clone());
    }
    let (layer, handle) = builder.build().unwrap();
    let config = format!(
        "seed {seed}: capacity {capacity}, batch {batch_size}, {overflow:?}, fallback {}, integrity {}",
        fallback.is_some(),
        integrity.is_some()
    );

    let attempts = Arc::new(AtomicU64::new(0));
    let mut producers = tokio::task::JoinSet::new();
    for p in 0..rng.usize(1..5) {
        let (handle, attempts, layer) = (handle.clone(), Arc::clone(&attempts), layer.clone());
        let mut rng = fastrand::Rng::with_seed(rng.u64(..));
        producers.spawn(async move {
            let svc = layer.layer(service_fn(|_req: Request<Full<Bytes>>| answer(200, "ok")));
            for i in 0..rng.usize(1..40) {
                let name = format!("{p}-{i}");
                attempts.fetch_add(1, SeqCst);
                if rng.bool() {
                    handle.record(
                        AuditEvent::new("custom").attribute("id", name).attribute("pad", "x".repeat(rng.usize(..300))),
                    );
                } else {
                    let res = svc.clone().oneshot(get(&format!("/r/{name}"))).await.unwrap();
                    read_body(res.into_body()).await.unwrap();
                }
                tokio::time::sleep(Duration::from_millis(rng.u64(0..5))).await;
            }
        });
    }
    drop(layer);

    // Every counter but the gauges only grows, whatever is happening.
    let sampler = {
        let handle = handle.clone();
        tokio::spawn(async move {
            let mut last = [0; COUNTERS];
            loop {
                let now = monotonic(&handle.stats());
                for (i, (a, b)) in last.iter().zip(now.iter()).enumerate() {
                    assert!(b >= a, "counter {i} went down: {last:?} -> {now:?}");
                }
                last = now;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };

    tokio::time::sleep(Duration::from_millis(rng.u64(0..200))).await;
    let report = handle.shutdown(Duration::from_millis(rng.u64(10..300))).await;
    while let Some(done) = producers.join_next().await {
        done.unwrap();
    }
    sampler.abort();
    let stopped = sampler.await.unwrap_err();
    assert!(stopped.is_cancelled(), "{config}: the sampler failed: {stopped}");

    // The report keeps the identity with nothing queued, and so do the final counters.
    let r = report.stats;
    assert_eq!(r.queued, 0, "{config}: {r:?}");
    assert_eq!(r.accepted, r.written + r.fallback_written + r.lost + r.abandoned, "{config}: {r:?}");
    assert!(!report.drained || r.abandoned == 0, "{config}: {report:?}");
    let s = handle.stats();
    assert_eq!(s.offered(), attempts.load(SeqCst), "{config}: every attempt is counted once: {s:?}");
    assert_eq!(s.offered(), s.accepted + s.dropped() + s.refused, "{config}: {s:?}");
    assert_eq!(s.accepted, s.written + s.fallback_written + s.lost + s.abandoned + s.queued, "{config}: {s:?}");
    let settled = |s: &Stats| [s.accepted, s.written, s.fallback_written, s.lost, s.abandoned];
    assert_eq!(settled(&s), settled(&r), "{config}: after the report, producers can only be dropped");

    // The counters say what the sinks hold.
    let kept = primary.kept();
    let kept_fallback = fallback.as_ref().map(Chaos::kept).unwrap_or_default();
    let events = |trail: &[AuditEvent]| trail.iter().filter(|e| !e.is_pipeline_event()).count() as u64;
    assert_eq!(events(&kept), r.written, "{config}");
    assert_eq!(events(&kept_fallback), r.fallback_written, "{config}");
    // A gap event says which trail it describes; the primary's can be in the fallback, with the batch it led.
    let gaps = |trail: &[AuditEvent], of: &str| {
        trail.iter().filter(|e| e.kind == kind::AUDIT_GAP && e.attributes["trail"] == of).cloned().collect::<Vec<_>>()
    };
    let (primary_gaps, fallback_gaps) = (gaps(&kept, "primary"), gaps(&kept_fallback, "fallback"));
    assert_eq!(gaps(&kept, "fallback").len(), 0, "{config}");
    assert_eq!((primary_gaps.len() + fallback_gaps.len()) as u64, r.gap_events, "{config}");

    // Every written sequence number once, across both trails; every event in one trail at most.
    let seqs: Vec<u64> = kept.iter().chain(&kept_fallback).map(|e| e.seq).collect();
    assert_eq!(seqs.iter().collect::<BTreeSet<_>>().len(), seqs.len(), "{config}: a seq written twice");
    let ids: Vec<_> = kept.iter().chain(&kept_fallback).map(|e| e.id).collect();
    assert_eq!(ids.iter().collect::<BTreeSet<_>>().len(), ids.len(), "{config}: an event written twice");

    // The boot event, if a trail holds it, is there once, first, as seq 1. The shutdown event, if a trail holds
    // it, is there once, last, with the highest seq, only when nothing was abandoned, with the counters that were
    // settled by then and can no longer change. Each trail is in seq order.
    let all = || kept.iter().chain(&kept_fallback);
    let of_kind = |kind: &str| all().filter(|e| e.kind == kind).cloned().collect::<Vec<_>>();
    let boots = of_kind(kind::AUDIT_BOOT);
    assert!(boots.len() <= 1 && boots.iter().all(|e| e.seq == 1), "{config}: {boots:?}");
    assert!(boots.iter().all(|e| e.boot == Some(handle.boot())), "{config}: {boots:?}");
    assert!(kept.is_sorted_by_key(|e| e.seq) && kept_fallback.is_sorted_by_key(|e| e.seq), "{config}");
    let first = [kept.first(), kept_fallback.first()];
    assert!(boots.iter().all(|boot| first.contains(&Some(boot))), "{config}: the boot event is not first");
    let shutdowns = of_kind(kind::AUDIT_SHUTDOWN);
    assert!(shutdowns.len() <= 1, "{config}: {shutdowns:?}");
    if let Some(end) = shutdowns.first() {
        let last = [kept.last(), kept_fallback.last()];
        assert!(last.contains(&Some(end)), "{config}: the shutdown event is not last in its trail");
        let latest = all().map(|e| e.seq).max();
        assert_eq!(Some(end.seq), latest, "{config}: an event stamped after the shutdown event");
        let counter = |name: &str| end.attributes[name].parse::<u64>().unwrap();
        assert_eq!(
            [
                counter("accepted"),
                counter("written"),
                counter("fallback_written"),
                counter("lost"),
                counter("abandoned")
            ],
            [r.accepted, r.written, r.fallback_written, r.lost, 0],
            "{config}: {end:?} {report:?}"
        );
        assert!(counter("dropped_closed") <= r.dropped_closed && counter("refused") <= r.refused, "{config}");
    }

    // Gap events are not cumulative: what the primary trail was told, plus what it could not be told, is
    // exactly what is missing from it.
    // Of the application's events: the pipeline's own missing are counted apart.
    let count = |e: &AuditEvent, reason: &str| e.attributes.get(reason).map_or(0, |n| n.parse::<u64>().unwrap());
    let told = |gaps: &[AuditEvent]| {
        gaps.iter()
            .map(|e| count(e, "lost") - count(e, "pipeline_lost") - count(e, "pipeline_in_fallback"))
            .sum::<u64>()
    };
    let missing_from_primary = r.dropped() + r.lost + r.abandoned + r.fallback_written;
    assert_eq!(told(&primary_gaps) + report.unreported, missing_from_primary, "{config}: {report:?}");
    assert!(told(&fallback_gaps) <= r.dropped() + r.lost + r.abandoned, "{config}");

    // No sink ever got more than a batch.
    assert!(primary.largest_batch.load(SeqCst) <= batch_size, "{config}");
    if let Some(fallback) = &fallback {
        assert!(fallback.largest_batch.load(SeqCst) <= batch_size, "{config}");
    }

    // With the chain on, both trails verify as one, and the primary's alone: every seq missing is declared by a
    // gap event after it, but for what went missing after the last gap event written (the boot ended before the
    // trail could be told: a gap event that fails is carried into the next).
    if let Some(integrity) = &integrity {
        let key = integrity.verifier_key();
        let show = |t: &[AuditEvent]| t.iter().map(|e| format!("{}:{}", e.seq, e.kind)).collect::<Vec<_>>();
        let check = |report: tower_audit::integrity::Report, gaps_in: &[&[AuditEvent]], what: &str| {
            let last_gap = gaps_in.iter().flat_map(|t| t.iter()).filter(|e| e.kind == kind::AUDIT_GAP).map(|e| e.seq);
            let last_gap = last_gap.max().unwrap_or(0);
            for (_, finding) in report.findings() {
                let after_the_last_gap = matches!(finding, Finding::Missing { from, .. } if *from > last_gap);
                assert!(
                    after_the_last_gap,
                    "{config}: {what}: {report}\n{:?}\n{:?}\n{r:?}",
                    show(&kept),
                    show(&kept_fallback)
                );
            }
        };
        let mut verifier = Verifier::new(&key, &[]);
        kept.iter().for_each(|e| verifier.push(e));
        verifier.next_source();
        kept_fallback.iter().for_each(|e| verifier.push(e));
        check(verifier.finish(), &[&kept, &kept_fallback], "both trails");
        check(tower_audit::integrity::verify(kept.iter().cloned(), &key, &[]), &[&kept], "the primary's trail");
    }
}

#[test]
fn the_accounting_identity_holds_under_random_faults_and_shutdowns() {
    // The chaos sink's panics are expected; keep the output readable.
    std::panic::set_hook(Box::new(|info| {
        let chaos = info.payload().downcast_ref::<&str>().is_some_and(|m| m.starts_with("chaos"));
        if !chaos {
            eprintln!("{info}");
        }
    }));
    let seeds: Vec<u64> = match std::env::var("TOWER_AUDIT_SEED") {
        Ok(seed) => vec![seed.parse().unwrap()],
        Err(_) => (0..std::env::var("TOWER_AUDIT_SEEDS").map_or(1000, |n| n.parse().unwrap())).collect(),
    };
    for seed in seeds {
        if let Err(panic) = std::panic::catch_unwind(|| run(seed)) {
            let _ = std::panic::take_hook();
            panic!("schedule {seed} failed (replay with TOWER_AUDIT_SEED={seed}): {panic:?}");
        }
    }
}
