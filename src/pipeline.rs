//! What producers (services, contexts, the handle) share with the worker: the channel's sending half, the
//! configuration read on the request path, and the counters.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

use http::HeaderName;
use ipnet::IpNet;
use tokio::sync::{Notify, mpsc};

use crate::event::AuditEvent;
use crate::sanitize::Limits;

/// Everything a producer needs. One `Arc<Core>` per pipeline; each request clones the `Arc`, not the sender.
#[derive(Debug)]
pub(crate) struct Core {
    pub(crate) tx: mpsc::Sender<AuditEvent>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) config: RequestConfig,
    pub(crate) batch_size: usize,
}

/// Read on the request path.
#[derive(Debug)]
pub(crate) struct RequestConfig {
    pub(crate) overflow: crate::Overflow,
    pub(crate) limits: Limits,
    pub(crate) redact_query: Vec<String>,
    pub(crate) keep_query: bool,
    pub(crate) request_id_header: HeaderName,
    pub(crate) capture_headers: Vec<HeaderName>,
    pub(crate) trusted_proxies: Vec<IpNet>,
    pub(crate) client_addr_source: crate::ClientAddrSource,
}

/// Shared by producers and the worker (the worker holds no sender, so dropping every producer closes the channel).
#[derive(Debug, Default)]
pub(crate) struct Shared {
    pub(crate) counters: Counters,
    /// Wakes the worker early when a batch's worth is waiting.
    pub(crate) wake: Notify,
    pub(crate) wake_pending: AtomicBool,
}

/// Why an event was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DropReason {
    QueueFull,
    WaitTimeout,
    Closed,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) taken: AtomicU64,
    pub(crate) dropped_queue_full: AtomicU64,
    pub(crate) dropped_wait_timeout: AtomicU64,
    pub(crate) dropped_closed: AtomicU64,
    pub(crate) refused: AtomicU64,
    pub(crate) abandoned: AtomicU64,
    pub(crate) written: AtomicU64,
    pub(crate) batches: AtomicU64,
    pub(crate) failed: AtomicU64,
    pub(crate) fallback_written: AtomicU64,
    pub(crate) fallback_failed: AtomicU64,
    pub(crate) retries: AtomicU64,
    pub(crate) sink_panics: AtomicU64,
    pub(crate) sink_timeouts: AtomicU64,
    pub(crate) gap_events: AtomicU64,
}

pub(crate) fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Relaxed);
}

impl Core {
    /// Queues an event without waiting; a full or closed queue drops it and counts why.
    pub(crate) fn try_push(&self, event: AuditEvent, on_full: DropReason) -> bool {
        match self.tx.try_send(event) {
            Ok(()) => {
                self.pushed();
                true
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.count_drop(on_full);
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.count_drop(DropReason::Closed);
                false
            }
        }
    }

    /// Queues a custom event (handle or handler): bounded and sanitised like request events, never waiting.
    pub(crate) fn record(&self, mut event: AuditEvent) -> bool {
        event.enforce_limits(&self.config.limits);
        self.try_push(event, DropReason::QueueFull)
    }

    pub(crate) fn count_drop(&self, reason: DropReason) {
        let counters = &self.shared.counters;
        add(
            match reason {
                DropReason::QueueFull => &counters.dropped_queue_full,
                DropReason::WaitTimeout => &counters.dropped_wait_timeout,
                DropReason::Closed => &counters.dropped_closed,
            },
            1,
        );
    }

    /// After an event entered the queue: wake the worker only when a whole batch is waiting, so a request
    /// never pays for a cross-core wake-up otherwise (the worker drains on its own schedule).
    pub(crate) fn pushed(&self) {
        let shared = &*self.shared;
        if self.queue_depth() >= self.batch_size
            && !shared.wake_pending.load(Relaxed)
            && !shared.wake_pending.swap(true, Relaxed)
        {
            shared.wake.notify_one();
        }
    }

    pub(crate) fn queue_depth(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    pub(crate) fn stats(&self) -> Stats {
        self.shared.counters.snapshot(self.queue_depth() as u64)
    }
}

impl Counters {
    pub(crate) fn snapshot(&self, queue_depth: u64) -> Stats {
        Stats {
            enqueued: self.taken.load(Relaxed) + queue_depth,
            dropped_queue_full: self.dropped_queue_full.load(Relaxed),
            dropped_wait_timeout: self.dropped_wait_timeout.load(Relaxed),
            dropped_closed: self.dropped_closed.load(Relaxed),
            refused: self.refused.load(Relaxed),
            abandoned: self.abandoned.load(Relaxed),
            written: self.written.load(Relaxed),
            batches: self.batches.load(Relaxed),
            failed: self.failed.load(Relaxed),
            fallback_written: self.fallback_written.load(Relaxed),
            fallback_failed: self.fallback_failed.load(Relaxed),
            retries: self.retries.load(Relaxed),
            sink_panics: self.sink_panics.load(Relaxed),
            sink_timeouts: self.sink_timeouts.load(Relaxed),
            gap_events: self.gap_events.load(Relaxed),
            queue_depth,
        }
    }
}

/// A snapshot of a pipeline's counters, from [`AuditHandle::stats`](crate::AuditHandle::stats).
///
/// Every event is accounted for: each one queued is eventually `written`, `failed` (then `fallback_written` or
/// `fallback_failed`), or `abandoned` at a shutdown deadline; each one not queued is counted in a `dropped_*`
/// counter or in `refused`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct Stats {
    /// Events accepted into the queue (taken by the worker so far, plus those waiting now).
    pub enqueued: u64,
    /// Events dropped because the queue was full.
    pub dropped_queue_full: u64,
    /// Events dropped under [`Overflow::Wait`](crate::Overflow::Wait) because no slot freed up in time and the
    /// queue was still full at the end of the request.
    pub dropped_wait_timeout: u64,
    /// Events dropped because the pipeline was already shut down.
    pub dropped_closed: u64,
    /// Requests answered with 503 under [`Overflow::FailClosed`](crate::Overflow::FailClosed) (the inner service
    /// was not called, so there is no event for them).
    pub refused: u64,
    /// Queued events left unwritten when a shutdown deadline passed.
    pub abandoned: u64,
    /// Events (including `audit.gap` events) written by the primary sink.
    pub written: u64,
    /// Batches written by the primary sink.
    pub batches: u64,
    /// Events the primary sink did not take after every retry.
    pub failed: u64,
    /// Of the failed events, those the fallback sink wrote.
    pub fallback_written: u64,
    /// Of the failed events, those the fallback sink also failed to write (or that had no fallback): lost.
    pub fallback_failed: u64,
    /// Retry attempts of failed batches.
    pub retries: u64,
    /// Sink calls that panicked (each is also a failed attempt).
    pub sink_panics: u64,
    /// Sink calls that took longer than the sink timeout (each is also a failed attempt).
    pub sink_timeouts: u64,
    /// `audit.gap` events written into the trail.
    pub gap_events: u64,
    /// Events waiting in the queue now (slots reserved by in-flight requests count as waiting).
    pub queue_depth: u64,
}

impl Stats {
    /// All events that never entered the queue or were abandoned in it.
    pub fn dropped(&self) -> u64 {
        self.dropped_queue_full + self.dropped_wait_timeout + self.dropped_closed + self.abandoned
    }
}
