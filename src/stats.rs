//! The pipeline's counters, and the public snapshot of them with the identity they keep.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};

/// Monotonic counters, shared by producers and the worker.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) accepted: AtomicU64,
    pub(crate) dropped_queue_full: AtomicU64,
    pub(crate) dropped_queue_bytes: AtomicU64,
    pub(crate) dropped_wait_timeout: AtomicU64,
    pub(crate) dropped_closed: AtomicU64,
    pub(crate) refused: AtomicU64,
    pub(crate) written: AtomicU64,
    pub(crate) fallback_written: AtomicU64,
    pub(crate) lost: AtomicU64,
    pub(crate) abandoned: AtomicU64,
    pub(crate) batches: AtomicU64,
    pub(crate) retries: AtomicU64,
    pub(crate) sink_panics: AtomicU64,
    pub(crate) sink_timeouts: AtomicU64,
    pub(crate) gap_events: AtomicU64,
    pub(crate) recovered: AtomicU64,
    pub(crate) spilled: AtomicU64,
    pub(crate) spill_full: AtomicU64,
    pub(crate) left_in_spill: AtomicU64,
    pub(crate) corrupt: AtomicU64,
    pub(crate) skipped: AtomicU64,
    pub(crate) sampled_out: AtomicU64,
    pub(crate) durable_confirmed: AtomicU64,
    pub(crate) durable_withheld: AtomicU64,
    pub(crate) checkpoints: AtomicU64,
    pub(crate) anchor_failed: AtomicU64,
}

pub(crate) fn add(counter: &AtomicU64, n: u64) {
    if n > 0 {
        counter.fetch_add(n, SeqCst);
    }
}

impl Counters {
    /// A snapshot. Settled counters are read before `accepted`: an event is accepted before it can settle, so
    /// `queued` (the difference) is never negative.
    pub(crate) fn snapshot(&self, queued_bytes: u64) -> Stats {
        let load = |c: &AtomicU64| c.load(SeqCst);
        let written = load(&self.written);
        let fallback_written = load(&self.fallback_written);
        let lost = load(&self.lost);
        let abandoned = load(&self.abandoned);
        let spill_full = load(&self.spill_full);
        let left_in_spill = load(&self.left_in_spill);
        let recovered = load(&self.recovered);
        let corrupt = load(&self.corrupt);
        let accepted = load(&self.accepted);
        Stats {
            accepted,
            dropped_queue_full: load(&self.dropped_queue_full),
            dropped_queue_bytes: load(&self.dropped_queue_bytes),
            dropped_wait_timeout: load(&self.dropped_wait_timeout),
            dropped_closed: load(&self.dropped_closed),
            refused: load(&self.refused),
            written,
            fallback_written,
            lost,
            abandoned,
            recovered,
            spill_full,
            left_in_spill,
            queued: (accepted + recovered)
                .saturating_sub(written + fallback_written + lost + abandoned + spill_full + left_in_spill + corrupt),
            queued_bytes,
            batches: load(&self.batches),
            retries: load(&self.retries),
            sink_panics: load(&self.sink_panics),
            sink_timeouts: load(&self.sink_timeouts),
            gap_events: load(&self.gap_events),
            spilled: load(&self.spilled),
            corrupt,
            skipped: load(&self.skipped),
            sampled_out: load(&self.sampled_out),
            durable_confirmed: load(&self.durable_confirmed),
            durable_withheld: load(&self.durable_withheld),
            checkpoints: load(&self.checkpoints),
            anchor_failed: load(&self.anchor_failed),
        }
    }
}

/// A snapshot of a pipeline's counters, from [`AuditHandle::stats`](crate::AuditHandle::stats).
///
/// # The accounting identity
///
/// Every event offered to the pipeline (a request's event, or one recorded by a handler or the handle) ends up
/// in exactly one place, so at every moment:
///
/// ```text
/// offered  = accepted + dropped_queue_full + dropped_queue_bytes + dropped_wait_timeout + dropped_closed + refused
/// accepted + recovered = written + fallback_written + lost + abandoned + spill_full + left_in_spill + corrupt
///                        + queued
/// ```
///
/// The spill's buckets (`recovered`, `spill_full`, `left_in_spill`, `corrupt`) stay 0 without a
/// [`Spill`](crate::Spill): then `accepted = written + fallback_written + lost + abandoned + queued`.
///
/// Every field but `queued` and `queued_bytes` only ever grows. The worker's own events (`audit.gap`,
/// `audit.boot`, `audit.shutdown`) are counted on neither side (gap events in `gap_events`). A refused request (`Overflow::FailClosed`) was not served, so
/// its event is counted as offered and refused.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use std::time::Duration;
/// use tower_audit::{AuditEvent, AuditLayer, MemorySink};
///
/// let (_layer, handle) = AuditLayer::builder(MemorySink::new()).build().unwrap();
/// handle.record(AuditEvent::new("config.reloaded"));
/// let report = handle.shutdown(Duration::from_secs(5)).await;
/// let s = report.stats;
/// assert_eq!(s.offered(), s.accepted + s.dropped() + s.refused);
/// assert_eq!(
///     s.accepted + s.recovered,
///     s.written + s.fallback_written + s.lost + s.abandoned + s.spill_full + s.left_in_spill + s.corrupt + s.queued
/// );
/// assert_eq!((s.offered(), s.written, s.queued), (1, 1, 0));
/// # }
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct Stats {
    /// Events admitted into the queue.
    pub accepted: u64,
    /// Events dropped because the queue held `capacity` events.
    pub dropped_queue_full: u64,
    /// Events dropped because the queued events held `max_queued_bytes`.
    pub dropped_queue_bytes: u64,
    /// Events dropped under [`Overflow::Wait`](crate::Overflow::Wait): no slot freed up in time and the queue
    /// was still full when the request ended.
    pub dropped_wait_timeout: u64,
    /// Events dropped because intake was closed: produced after [`shutdown`](crate::AuditHandle::shutdown)
    /// began (including requests still in flight then), or after the worker ended.
    pub dropped_closed: u64,
    /// Requests answered `503` under [`Overflow::FailClosed`](crate::Overflow::FailClosed) without calling the
    /// inner service, because their event could not be queued.
    pub refused: u64,
    /// Accepted events the primary sink confirmed.
    pub written: u64,
    /// Accepted events the primary sink failed after every retry and the fallback sink confirmed.
    pub fallback_written: u64,
    /// Accepted events that neither the primary sink nor the fallback confirmed (or there was no fallback).
    pub lost: u64,
    /// Accepted events the shutdown deadline caught before a sink confirmed them: still queued, or inside a
    /// sink call cut short by the deadline (such a call may have committed some of them).
    pub abandoned: u64,
    /// Events of earlier boots found unacknowledged in the [`Spill`](crate::Spill) when this pipeline started
    /// (records that failed their checksum included: they are also counted in `corrupt`); they are replayed
    /// into the sink (and then counted as `written`) like this boot's own.
    pub recovered: u64,
    /// Accepted events dropped because the spill's disk budget (`Spill::max_bytes`) had no room for them.
    pub spill_full: u64,
    /// Events still in the spill, not yet confirmed by the sink, when the pipeline shut down: not lost, the
    /// next pipeline on the same directory replays them.
    pub left_in_spill: u64,
    /// Accepted (or recovered) events not settled yet: waiting in the queue, in the spill, or being written.
    /// A gauge.
    pub queued: u64,
    /// Bytes held by the events waiting in the queue (an estimate of their heap size). A gauge.
    pub queued_bytes: u64,
    /// Batches the primary sink confirmed.
    pub batches: u64,
    /// Retry attempts of failed batches.
    pub retries: u64,
    /// Sink calls that panicked (each is also a failed attempt).
    pub sink_panics: u64,
    /// Sink calls that took longer than the sink timeout (each is also a failed attempt).
    pub sink_timeouts: u64,
    /// `audit.gap` events written into a trail (primary or fallback).
    pub gap_events: u64,
    /// Events appended to the spill (this boot's, the worker's own included). Not part of the identity.
    pub spilled: u64,
    /// Spill records skipped because they failed their checksum or could not be decoded (at start, or read back
    /// later): events that reached no trail, reported by a gap event. A record's origin is unknown once it is
    /// corrupt: it is taken for an event (one of the worker's own, at most one per batch, would make the
    /// identity's right side one too high).
    pub corrupt: u64,
    /// Requests a [`Policy`](crate::Policy) rule skipped: no event was made for them. Not part of the identity.
    pub skipped: u64,
    /// Requests a sampling rule left out ([`Rule::sample`](crate::Rule::sample)): no event was made for them,
    /// which is not a loss. Not part of the identity.
    pub sampled_out: u64,
    /// Durable responses released because their event was durable in time.
    pub durable_confirmed: u64,
    /// Durable responses withheld (the client got `503`) because their event was not durable in time: the
    /// queue refused it, its batch failed, or the timeout passed; or never released because the client went
    /// away while it waited (`reason=cancelled`). Each is recorded by an `audit.response_withheld` event (a
    /// refused [`DurableIntent`](crate::Delivery::DurableIntent) by its request's event). So every durable
    /// request that reached its response head (or its intent) counts once, here or in `durable_confirmed`.
    pub durable_withheld: u64,
    /// Checkpoints signed into the trail (`audit.checkpoint` events and the `audit.shutdown` event), with
    /// [integrity](crate::AuditLayerBuilder::integrity) on. Not part of the identity.
    pub checkpoints: u64,
    /// Checkpoints the checkpoint sink did not take (every try failed, or it was too far behind). The trail
    /// still has them; only the off-host copy is missing.
    pub anchor_failed: u64,
}

impl Stats {
    /// Every event offered: accepted, dropped or refused.
    pub fn offered(&self) -> u64 {
        self.accepted + self.dropped() + self.refused
    }

    /// Events that never entered the queue (every `dropped_*` counter).
    pub fn dropped(&self) -> u64 {
        self.dropped_queue_full + self.dropped_queue_bytes + self.dropped_wait_timeout + self.dropped_closed
    }

    /// Events that reached no trail: dropped before the queue, lost by the sinks, dropped at the spill's disk
    /// budget, corrupt in the spill, or abandoned at shutdown. Refused requests are not in it (they were not
    /// served), nor is `left_in_spill` (the next boot replays it).
    pub fn missing(&self) -> u64 {
        self.dropped() + self.lost + self.spill_full + self.corrupt + self.abandoned
    }
}

impl fmt::Display for Stats {
    /// One line: `offered 10: written 7, fallback 1, lost 0, abandoned 0, queued 0; dropped 2 (queue full 2, …)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "offered {}: written {}, fallback {}, lost {}, abandoned {}, queued {}; dropped {} (queue full {}, \
             queue bytes {}, wait timeout {}, closed {}); refused {}",
            self.offered(),
            self.written,
            self.fallback_written,
            self.lost,
            self.abandoned,
            self.queued,
            self.dropped(),
            self.dropped_queue_full,
            self.dropped_queue_bytes,
            self.dropped_wait_timeout,
            self.dropped_closed,
            self.refused
        )?;
        if self.skipped + self.sampled_out > 0 {
            write!(f, "; skipped {}, sampled out {}", self.skipped, self.sampled_out)?;
        }
        if self.durable_confirmed + self.durable_withheld > 0 {
            write!(f, "; durable: confirmed {}, withheld {}", self.durable_confirmed, self.durable_withheld)?;
        }
        if self.recovered + self.spilled + self.spill_full + self.left_in_spill + self.corrupt > 0 {
            write!(
                f,
                "; spill: recovered {}, spilled {}, full {}, left {}, corrupt {}",
                self.recovered, self.spilled, self.spill_full, self.left_in_spill, self.corrupt
            )?;
        }
        Ok(())
    }
}
