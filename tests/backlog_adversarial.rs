//! Adversarial tests of the queue between producers and the worker (`intake::Backlog`), written by a reviewer who
//! had not seen the other tests: shutdown during a storm of records, partial takes, durable and best-effort
//! events interleaved, failing and panicking sinks, and every producer dropped with events queued.
mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::Full;
use tower::{Layer, ServiceExt, service_fn};
use tower_audit::{AuditEvent, AuditLayer, MemorySink, Overflow, Policy, Retry, Rule, kind};

const LIMIT: Duration = Duration::from_secs(20);

fn too_big() -> AuditEvent {
    (0..16).fold(AuditEvent::new("too big"), |e, i| e.attribute(format!("a{i:02}"), "v".repeat(250)))
}

fn users(events: &[AuditEvent]) -> Vec<String> {
    events
        .iter()
        .filter(|e| !matches!(e.kind.as_ref(), kind::AUDIT_GAP | kind::AUDIT_BOOT | kind::AUDIT_SHUTDOWN))
        .map(|e| e.kind.to_string())
        .collect()
}

/// Many OS threads record while shutdown begins; batch sizes 1/2/3/8, capacities below and above the batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn record_storm_while_shutdown_begins() {
    for bs in [1usize, 2, 3, 8] {
        for cap in [bs, bs + 1, 64] {
            let sink = MemorySink::new();
            let (_layer, handle) = AuditLayer::builder(sink.clone())
                .batch_size(bs)
                .capacity(cap)
                .flush_interval(Duration::from_millis(1))
                .build()
                .unwrap();
            let barrier = Arc::new(std::sync::Barrier::new(7));
            let threads: Vec<_> = (0..6)
                .map(|t| {
                    let (h, b) = (handle.clone(), barrier.clone());
                    std::thread::spawn(move || {
                        b.wait();
                        let mut accepted = Vec::new();
                        for n in 0..1500 {
                            let k = format!("t{t}-{n}");
                            if h.record(AuditEvent::new(k.clone())) {
                                accepted.push(k);
                            }
                        }
                        accepted
                    })
                })
                .collect();
            barrier.wait();
            tokio::task::yield_now().await;
            let report = handle.shutdown(LIMIT).await;
            let accepted: Vec<Vec<String>> = threads.into_iter().map(|t| t.join().unwrap()).collect();
            let s = handle.stats();
            assert_identity(&s);
            assert!(report.drained, "bs={bs} cap={cap} {report}");
            let total: usize = accepted.iter().map(Vec::len).sum();
            assert_eq!(
                (s.accepted, s.written, s.abandoned, s.queued),
                (total as u64, total as u64, 0, 0),
                "bs={bs} cap={cap} {s}"
            );
            assert_eq!(s.offered(), 6 * 1500, "bs={bs} cap={cap} {s}");
            let trail = users(&ended_cleanly(sink.events()));
            for (t, acc) in accepted.iter().enumerate() {
                let prefix = format!("t{t}-");
                let got: Vec<&String> = trail.iter().filter(|k| k.starts_with(&prefix)).collect();
                let want: Vec<&String> = acc.iter().collect();
                assert_eq!(got, want, "bs={bs} cap={cap}: thread {t}'s events in order, exactly once");
            }
        }
    }
}

/// A loss before every batch: the worker takes batch_size-1 (the partial take paths: drain for bs=2, swap +
/// split_off for bs>=3) round after round; order and counts must hold and each round's gap event be written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_due_every_round_forces_partial_takes() {
    for bs in [2usize, 3, 4, 5] {
        let sink = ScriptedSink::new(&[]);
        let (_layer, handle) = AuditLayer::builder(sink.clone())
            .batch_size(bs)
            .capacity(256)
            .max_queued_bytes(3800)
            .flush_interval(Duration::from_millis(2))
            .build()
            .unwrap();
        let rounds = 25;
        let mut expected = Vec::new();
        let mut n = 0;
        for _ in 0..rounds {
            assert!(!handle.record(too_big()));
            // more than a batch so the backlog holds a full chunk plus a partial one
            for _ in 0..bs + 1 {
                let k = format!("e{n}");
                n += 1;
                assert!(handle.record(AuditEvent::new(k.clone())), "bs={bs} {}", handle.stats());
                expected.push(k);
            }
            let want = expected.len() as u64;
            eventually(LIMIT, || handle.stats().written == want).await;
        }
        let report = handle.shutdown(LIMIT).await;
        assert!(report.drained, "bs={bs} {report}");
        let s = report.stats;
        assert_identity(&s);
        assert_eq!(
            (s.accepted, s.written, s.dropped_queue_bytes, s.gap_events),
            (n, n, rounds, rounds),
            "bs={bs} {s:?}"
        );
        assert_eq!(report.unreported, 0);
        let all: Vec<AuditEvent> = sink.calls().into_iter().flatten().collect();
        assert_eq!(users(&all), expected, "bs={bs}");
        for call in sink.calls() {
            assert!(call.len() <= bs, "bs={bs}: a batch of {} > batch size", call.len());
        }
    }
}

/// Every layer, service and the handle dropped with events queued (no shutdown): the worker must end on its own
/// and write them all, in order, with a long flush interval (real time: must not wait for the tick).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_everything_with_events_queued_writes_them_without_waiting_for_the_tick() {
    for overflow in [Overflow::Drop, Overflow::Wait(Duration::from_secs(1)), Overflow::FailClosed] {
        for bs in [1usize, 2, 3] {
            let sink = MemorySink::new();
            let (layer, handle) = AuditLayer::builder(sink.clone())
                .batch_size(bs)
                .capacity(64)
                .overflow(overflow)
                .flush_interval(Duration::from_secs(3600))
                .build()
                .unwrap();
            eventually(LIMIT, || sink.events().len() == 1).await; // boot
            let svc = layer.layer(service_fn(|_req: Request<Full<Bytes>>| answer(200, "ok")));
            let mut expected = Vec::new();
            // bs*2+1 events: never a multiple of the batch, so some wait for the tick
            for i in 0..(2 * bs + 1) {
                let r = svc.clone().oneshot(get(&format!("/r{i}"))).await.unwrap();
                read_body(r.into_body()).await.unwrap();
                expected.push(format!("/r{i}"));
            }
            drop(svc);
            drop(layer);
            drop(handle);
            // Every producer gone: the worker is woken, takes the rest and shuts down, not at its (hour-long) tick.
            eventually(Duration::from_secs(5), || sink.events().last().is_some_and(|e| e.kind == kind::AUDIT_SHUTDOWN))
                .await;
            let trail = ended_cleanly(sink.events());
            let paths: Vec<String> = trail.iter().filter_map(|e| e.path.clone()).collect();
            assert_eq!(paths, expected, "{overflow:?} bs={bs}");
            let end = sink.events().pop().unwrap();
            let n = expected.len().to_string();
            assert_eq!(
                (end.attributes.get("accepted"), end.attributes.get("written"), end.attributes.get("abandoned")),
                (Some(&n), Some(&n), Some(&"0".to_owned())),
                "{overflow:?} bs={bs} {:?}",
                end.attributes
            );
        }
    }
}

/// Durable and best-effort requests interleaved from many tasks, batch sizes 1/2/3: a durable 200 means its event
/// is already in the sink; at the end, everything written exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn durable_interleaved_with_best_effort_is_in_the_sink_when_answered() {
    for bs in [1usize, 2, 3] {
        let sink = MemorySink::new();
        let policy = Policy::new().rule(Rule::route("/d/*").durable(Duration::from_secs(10)));
        let (layer, handle) = AuditLayer::builder(sink.clone())
            .batch_size(bs)
            .capacity(1024)
            .flush_interval(Duration::from_millis(50))
            .policy(policy)
            .build()
            .unwrap();
        let svc = layer.layer(service_fn(|_req: Request<Full<Bytes>>| answer(200, "ok")));
        let mut tasks = Vec::new();
        for t in 0..8 {
            let (svc, sink) = (svc.clone(), sink.clone());
            tasks.push(tokio::spawn(async move {
                for i in 0..40 {
                    let durable = (i + t) % 3 == 0;
                    let path = if durable { format!("/d/{t}-{i}") } else { format!("/b/{t}-{i}") };
                    let r = svc.clone().oneshot(get(&path)).await.unwrap();
                    assert_eq!(r.status(), 200, "{path}");
                    read_body(r.into_body()).await.unwrap();
                    if durable {
                        assert!(
                            sink.events().iter().any(|e| e.path.as_deref() == Some(path.as_str())),
                            "bs={bs}: durable {path} answered before its event reached the sink"
                        );
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        drop(svc);
        let report = handle.shutdown(LIMIT).await;
        assert!(report.drained, "bs={bs} {report}");
        let s = report.stats;
        assert_identity(&s);
        let durables = (0..8).flat_map(|t| (0..40).filter(move |i| (i + t) % 3 == 0)).count() as u64;
        assert_eq!(
            (s.accepted, s.written, s.durable_confirmed, s.durable_withheld),
            (320, 320, durables, 0),
            "bs={bs} {s}"
        );
        let trail = ended_cleanly(sink.events());
        for t in 0..8 {
            let mine: Vec<String> = trail
                .iter()
                .filter_map(|e| e.path.clone())
                .filter(|p| {
                    p.ends_with(&format!("/{t}-{}", p.rsplit('-').next().unwrap()))
                        && p[3..].starts_with(&format!("{t}-"))
                })
                .collect();
            let want: Vec<String> =
                (0..40).map(|i| if (i + t) % 3 == 0 { format!("/d/{t}-{i}") } else { format!("/b/{t}-{i}") }).collect();
            assert_eq!(mine, want, "bs={bs}: task {t}'s events in order");
        }
    }
}

/// A sink that fails and panics, with a fallback, a gap due (partial takes), capacity below the batch: every
/// accepted event lands once (primary or fallback) or is counted lost; the identity holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_and_panicking_sink_with_partial_takes_settles_every_event_once() {
    for (bs, cap) in [(1usize, 1usize), (2, 2), (3, 4), (4, 64), (8, 8)] {
        let script =
            [Step::Ok, Step::Panic, Step::Fail, Step::Ok, Step::Panic, Step::Ok, Step::Fail, Step::Fail, Step::Panic];
        let primary = ScriptedSink::new(&script);
        let fallback = ScriptedSink::new(&[Step::Fail, Step::Ok, Step::Panic]);
        let (_layer, handle) = AuditLayer::builder(primary.clone())
            .batch_size(bs)
            .capacity(cap)
            .max_queued_bytes(2048)
            .retry(Retry::none())
            .fallback(fallback.clone())
            .flush_interval(Duration::from_millis(1))
            .build()
            .unwrap();
        let mut accepted = Vec::new();
        for i in 0..300 {
            if i % 17 == 0 {
                assert!(!handle.record(too_big()));
            }
            let k = format!("e{i}");
            if handle.record(AuditEvent::new(k.clone())) {
                accepted.push(k);
            }
            if i % 7 == 0 {
                tokio::task::yield_now().await;
            }
        }
        let report = handle.shutdown(LIMIT).await;
        let s = report.stats;
        assert_identity(&s);
        assert_eq!(s.queued, 0, "bs={bs} cap={cap} {s}");
        assert_eq!(s.abandoned, 0, "bs={bs} cap={cap} {s}");
        assert_eq!(s.accepted, accepted.len() as u64, "bs={bs} cap={cap} {s}");
        let ok_primary: Vec<String> = users(&primary.written.events());
        let ok_fallback: Vec<String> = users(&fallback.written.events());
        assert_eq!(
            (s.written, s.fallback_written),
            (ok_primary.len() as u64, ok_fallback.len() as u64),
            "bs={bs} cap={cap} {s}"
        );
        assert_eq!(s.written + s.fallback_written + s.lost, s.accepted, "bs={bs} cap={cap} {s}");
        // Everything offered to the primary, in order of first offer, is the accepted sequence (no reorder/dup
        // across attempts: retries are off, so each batch is offered to the primary exactly once).
        let offered: Vec<String> = users(&primary.calls().into_iter().flatten().collect::<Vec<_>>());
        assert_eq!(offered, accepted, "bs={bs} cap={cap}: events offered to the primary in order, once each");
    }
}
