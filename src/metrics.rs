//! The `metrics` feature: every counter of [`Stats`] and the queue's two gauges, published through the
//! [`metrics`](https://docs.rs/metrics) facade, so whichever recorder the application installs (Prometheus,
//! StatsD, OpenTelemetry…) exports them.
//!
//! A task of its own, spawned next to the worker when the layer is built, publishes one [`Stats`] snapshot every
//! flush interval, and the final counters (the [`ShutdownReport`]'s) once when the pipeline shuts down; then it
//! ends. It sets absolute values (`Counter::absolute`, `Gauge::set`), so the published series always equal
//! [`AuditHandle::stats`](crate::AuditHandle::stats) as of the last tick, whatever a batch or a sink is doing
//! meanwhile: a sink stuck in retries does not hold up the metrics. The request path makes no `metrics` call.
//!
//! Every series carries the label `audit_instance`: the pipeline's [`instance`](crate::AuditHandle::instance).
//! It is not called `instance` because Prometheus sets that label itself on every scraped series (the
//! target's address) and would rename ours `exported_instance`. Give each pipeline of a process its own
//! instance name (the default is shared by the whole process): two pipelines under one name would overwrite each
//! other's values. The [`boot`](crate::AuditHandle::boot) id is not a label: it changes at every start, so each
//! restart would make a new set of series without bound; a restart shows as a counter reset instead, which
//! Prometheus' `rate` and `increase` handle.
//!
//! | metric | type | labels | from [`Stats`] |
//! |---|---|---|---|
//! | `tower_audit_events_accepted_total` | counter | | `accepted` |
//! | `tower_audit_events_dropped_total` | counter | `reason="queue_full"`, `"queue_bytes"`, `"wait_timeout"`, `"closed"` | `dropped_queue_full`, `dropped_queue_bytes`, `dropped_wait_timeout`, `dropped_closed` |
//! | `tower_audit_requests_refused_total` | counter | | `refused` |
//! | `tower_audit_events_written_total` | counter | `trail="primary"`, `"fallback"` | `written`, `fallback_written` |
//! | `tower_audit_events_lost_total` | counter | `reason="sink_failed"`, `"abandoned"`, `"spill_full"`, `"corrupt"` | `lost`, `abandoned`, `spill_full`, `corrupt` |
//! | `tower_audit_events_recovered_total` | counter | | `recovered` |
//! | `tower_audit_events_spilled_total` | counter | | `spilled` |
//! | `tower_audit_events_left_in_spill_total` | counter | | `left_in_spill` |
//! | `tower_audit_sink_batches_total` | counter | | `batches` |
//! | `tower_audit_sink_retries_total` | counter | | `retries` |
//! | `tower_audit_sink_panics_total` | counter | | `sink_panics` |
//! | `tower_audit_sink_timeouts_total` | counter | | `sink_timeouts` |
//! | `tower_audit_gap_events_total` | counter | | `gap_events` |
//! | `tower_audit_requests_unrecorded_total` | counter | `reason="skipped"`, `"sampled_out"` | `skipped`, `sampled_out` |
//! | `tower_audit_durable_responses_total` | counter | `result="confirmed"`, `"withheld"` | `durable_confirmed`, `durable_withheld` |
//! | `tower_audit_checkpoints_total` | counter | `result="signed"`, `"anchor_failed"` | `checkpoints`, `anchor_failed` |
//! | `tower_audit_queued_events` | gauge | | `queued` |
//! | `tower_audit_queued_bytes` | gauge | | `queued_bytes` |
//!
//! Every label set above is published from the first tick on, zeros included, so `rate()` has a starting point.
//! The identity of [`Stats`] holds between the series of one scrape:
//! `accepted + recovered = sum(written) + sum(lost) + left_in_spill + queued_events`.
//!
//! The descriptions (`# HELP` lines) are registered with the recorder once per pipeline, when it starts: install
//! the recorder before building the layer. Values are looked up in the recorder at every tick, so a recorder
//! installed later still gets them.

use std::sync::Arc;
use std::time::Duration;

use metrics::{Unit, counter, describe_counter, describe_gauge, gauge};
use tokio::sync::watch;

use crate::handle::ShutdownReport;
use crate::pipeline::Shared;
use crate::stats::Stats;

/// The label naming the pipeline on every series.
pub(crate) const INSTANCE_LABEL: &str = "audit_instance";

/// One counter series: name, the label that tells it from its siblings (if any), value.
type Series = (&'static str, Option<(&'static str, &'static str)>, u64);

const ACCEPTED: &str = "tower_audit_events_accepted_total";
const DROPPED: &str = "tower_audit_events_dropped_total";
const REFUSED: &str = "tower_audit_requests_refused_total";
const WRITTEN: &str = "tower_audit_events_written_total";
const LOST: &str = "tower_audit_events_lost_total";
const RECOVERED: &str = "tower_audit_events_recovered_total";
const SPILLED: &str = "tower_audit_events_spilled_total";
const LEFT_IN_SPILL: &str = "tower_audit_events_left_in_spill_total";
const BATCHES: &str = "tower_audit_sink_batches_total";
const RETRIES: &str = "tower_audit_sink_retries_total";
const PANICS: &str = "tower_audit_sink_panics_total";
const TIMEOUTS: &str = "tower_audit_sink_timeouts_total";
const GAP_EVENTS: &str = "tower_audit_gap_events_total";
const UNRECORDED: &str = "tower_audit_requests_unrecorded_total";
const DURABLE: &str = "tower_audit_durable_responses_total";
const CHECKPOINTS: &str = "tower_audit_checkpoints_total";
const QUEUED_EVENTS: &str = "tower_audit_queued_events";
const QUEUED_BYTES: &str = "tower_audit_queued_bytes";

/// Every counter series of `s`.
fn counters(s: &Stats) -> [Series; 26] {
    let reason = |r| Some(("reason", r));
    [
        (ACCEPTED, None, s.accepted),
        (DROPPED, reason("queue_full"), s.dropped_queue_full),
        (DROPPED, reason("queue_bytes"), s.dropped_queue_bytes),
        (DROPPED, reason("wait_timeout"), s.dropped_wait_timeout),
        (DROPPED, reason("closed"), s.dropped_closed),
        (REFUSED, None, s.refused),
        (WRITTEN, Some(("trail", "primary")), s.written),
        (WRITTEN, Some(("trail", "fallback")), s.fallback_written),
        (LOST, reason("sink_failed"), s.lost),
        (LOST, reason("abandoned"), s.abandoned),
        (LOST, reason("spill_full"), s.spill_full),
        (LOST, reason("corrupt"), s.corrupt),
        (RECOVERED, None, s.recovered),
        (SPILLED, None, s.spilled),
        (LEFT_IN_SPILL, None, s.left_in_spill),
        (BATCHES, None, s.batches),
        (RETRIES, None, s.retries),
        (PANICS, None, s.sink_panics),
        (TIMEOUTS, None, s.sink_timeouts),
        (GAP_EVENTS, None, s.gap_events),
        (UNRECORDED, reason("skipped"), s.skipped),
        (UNRECORDED, reason("sampled_out"), s.sampled_out),
        (DURABLE, Some(("result", "confirmed")), s.durable_confirmed),
        (DURABLE, Some(("result", "withheld")), s.durable_withheld),
        (CHECKPOINTS, Some(("result", "signed")), s.checkpoints),
        (CHECKPOINTS, Some(("result", "anchor_failed")), s.anchor_failed),
    ]
}

/// Registers every metric's unit and description with the installed recorder.
pub(crate) fn describe() {
    let events = |name: &'static str, text: &'static str| describe_counter!(name, Unit::Count, text);
    events(ACCEPTED, "Audit events admitted into the queue.");
    events(DROPPED, "Audit events that never entered the queue, by reason.");
    describe_counter!(
        REFUSED,
        Unit::Count,
        "Requests answered 503 under Overflow::FailClosed because their audit event could not be queued."
    );
    events(WRITTEN, "Accepted audit events a sink confirmed, by trail (primary sink or fallback).");
    events(LOST, "Accepted audit events that reached no trail, by reason.");
    events(RECOVERED, "Audit events of earlier boots found in the spill at start, to be replayed.");
    events(SPILLED, "Audit events appended to the disk spill.");
    events(LEFT_IN_SPILL, "Audit events left in the spill at shutdown for the next boot to replay.");
    describe_counter!(BATCHES, Unit::Count, "Batches the primary audit sink confirmed.");
    describe_counter!(RETRIES, Unit::Count, "Retry attempts of failed audit batches.");
    describe_counter!(PANICS, Unit::Count, "Audit sink calls that panicked.");
    describe_counter!(TIMEOUTS, Unit::Count, "Audit sink calls that exceeded the sink timeout.");
    events(GAP_EVENTS, "audit.gap events written into a trail.");
    describe_counter!(UNRECORDED, Unit::Count, "Requests the audit policy recorded no event for, by reason.");
    describe_counter!(
        DURABLE,
        Unit::Count,
        "Durable requests' responses released (confirmed) or answered 503 (withheld) by the audit layer."
    );
    describe_counter!(
        CHECKPOINTS,
        Unit::Count,
        "Integrity checkpoints signed into the trail, and those the checkpoint sink did not take (anchor_failed)."
    );
    describe_gauge!(
        QUEUED_EVENTS,
        Unit::Count,
        "Accepted audit events not settled yet (queued, spilled or being written)."
    );
    describe_gauge!(QUEUED_BYTES, Unit::Bytes, "Estimated heap bytes of the audit events waiting in the queue.");
}

/// Sets every series to the values of `stats`.
pub(crate) fn publish(stats: &Stats, instance: &str) {
    for (name, label, value) in counters(stats) {
        match label {
            Some((key, label)) => counter!(name, INSTANCE_LABEL => instance.to_owned(), key => label).absolute(value),
            None => counter!(name, INSTANCE_LABEL => instance.to_owned()).absolute(value),
        }
    }
    gauge!(QUEUED_EVENTS, INSTANCE_LABEL => instance.to_owned()).set(stats.queued as f64);
    gauge!(QUEUED_BYTES, INSTANCE_LABEL => instance.to_owned()).set(stats.queued_bytes as f64);
}

/// The publishing task: a snapshot every `every`, then the final counters once the worker has reported (or
/// the last snapshot, if it ended without a report).
pub(crate) async fn run(
    shared: Arc<Shared>,
    instance: Arc<str>,
    every: Duration,
    mut report: watch::Receiver<Option<ShutdownReport>>,
) {
    describe();
    loop {
        publish(&shared.stats(), &instance);
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            reported = report.wait_for(Option::is_some) => {
                let last = match reported {
                    Ok(report) => report.map_or_else(|| shared.stats(), |r| r.stats),
                    Err(_) => shared.stats(),
                };
                publish(&last, &instance);
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};

    use super::*;

    /// A published series: name, labels, value.
    type Published = (String, Vec<(String, String)>, DebugValue);

    fn published(stats: &Stats) -> Vec<Published> {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        metrics::with_local_recorder(&recorder, || {
            describe();
            publish(stats, "api-1");
        });
        let mut out: Vec<_> = snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .map(|(key, _, _, value)| {
                let key = key.key();
                let labels = key.labels().map(|l| (l.key().to_owned(), l.value().to_owned())).collect();
                (key.name().to_owned(), labels, value)
            })
            .collect();
        out.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        out
    }

    fn labels(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn every_field_is_published_once_under_its_name_and_labels() {
        let stats = Stats {
            accepted: 1,
            dropped_queue_full: 2,
            dropped_queue_bytes: 3,
            dropped_wait_timeout: 4,
            dropped_closed: 5,
            refused: 6,
            written: 7,
            fallback_written: 8,
            lost: 9,
            abandoned: 10,
            recovered: 11,
            spill_full: 12,
            left_in_spill: 13,
            queued: 14,
            queued_bytes: 15,
            batches: 16,
            retries: 17,
            sink_panics: 18,
            sink_timeouts: 19,
            gap_events: 20,
            spilled: 21,
            corrupt: 22,
            skipped: 23,
            sampled_out: 24,
            durable_confirmed: 25,
            durable_withheld: 26,
            checkpoints: 27,
            anchor_failed: 28,
        };
        let got = published(&stats);
        let i = |extra: &[(&str, &str)]| {
            let mut all = vec![(INSTANCE_LABEL, "api-1")];
            all.extend_from_slice(extra);
            labels(&all)
        };
        let c = |name: &str, extra: &[(&str, &str)], v: u64| (name.to_owned(), i(extra), DebugValue::Counter(v));
        let g = |name: &str, v: f64| (name.to_owned(), i(&[]), DebugValue::Gauge(v.into()));
        let mut want = vec![
            c("tower_audit_events_accepted_total", &[], 1),
            c("tower_audit_events_dropped_total", &[("reason", "queue_full")], 2),
            c("tower_audit_events_dropped_total", &[("reason", "queue_bytes")], 3),
            c("tower_audit_events_dropped_total", &[("reason", "wait_timeout")], 4),
            c("tower_audit_events_dropped_total", &[("reason", "closed")], 5),
            c("tower_audit_requests_refused_total", &[], 6),
            c("tower_audit_events_written_total", &[("trail", "primary")], 7),
            c("tower_audit_events_written_total", &[("trail", "fallback")], 8),
            c("tower_audit_events_lost_total", &[("reason", "sink_failed")], 9),
            c("tower_audit_events_lost_total", &[("reason", "abandoned")], 10),
            c("tower_audit_events_recovered_total", &[], 11),
            c("tower_audit_events_lost_total", &[("reason", "spill_full")], 12),
            c("tower_audit_events_left_in_spill_total", &[], 13),
            g("tower_audit_queued_events", 14.0),
            g("tower_audit_queued_bytes", 15.0),
            c("tower_audit_sink_batches_total", &[], 16),
            c("tower_audit_sink_retries_total", &[], 17),
            c("tower_audit_sink_panics_total", &[], 18),
            c("tower_audit_sink_timeouts_total", &[], 19),
            c("tower_audit_gap_events_total", &[], 20),
            c("tower_audit_events_spilled_total", &[], 21),
            c("tower_audit_events_lost_total", &[("reason", "corrupt")], 22),
            c("tower_audit_requests_unrecorded_total", &[("reason", "skipped")], 23),
            c("tower_audit_requests_unrecorded_total", &[("reason", "sampled_out")], 24),
            c("tower_audit_durable_responses_total", &[("result", "confirmed")], 25),
            c("tower_audit_durable_responses_total", &[("result", "withheld")], 26),
            c("tower_audit_checkpoints_total", &[("result", "signed")], 27),
            c("tower_audit_checkpoints_total", &[("result", "anchor_failed")], 28),
        ];
        want.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        assert_eq!(got, want);
    }

    #[test]
    fn counters_are_absolute_values_not_increments() {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        metrics::with_local_recorder(&recorder, || {
            publish(&Stats { accepted: 5, ..Stats::default() }, "api-1");
            publish(&Stats { accepted: 7, ..Stats::default() }, "api-1");
        });
        let accepted: Vec<_> = snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .filter(|(key, ..)| key.key().name() == ACCEPTED)
            .map(|(.., value)| value)
            .collect();
        assert_eq!(accepted, [DebugValue::Counter(7)]);
    }
}
