//! What producers (services, contexts, the handle) share with the worker: the queue behind its gate, the
//! configuration read on the request path, and the counters.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

use http::HeaderName;
use ipnet::IpNet;
use tokio::sync::Notify;

use crate::durable::Watermark;
use crate::event::AuditEvent;
use crate::intake::{Backlog, Gate, Recycled, Refusal, Slot};
use crate::sanitize::Limits;
use crate::stats::{Counters, Stats, add};

/// Everything a producer needs. One `Arc<Core>` per pipeline; each request clones the `Arc`. When the last one is
/// dropped, the worker learns that every producer is gone.
#[derive(Debug)]
pub(crate) struct Core {
    pub(crate) shared: Arc<Shared>,
    pub(crate) config: RequestConfig,
    pub(crate) batch_size: usize,
}

/// Read on the request path.
#[derive(Debug)]
pub(crate) struct RequestConfig {
    pub(crate) overflow: crate::Overflow,
    pub(crate) limits: Limits,
    pub(crate) redact_query: crate::sanitize::Redact,
    pub(crate) keep_query: bool,
    /// Whether each request's context is put into its extensions too (see `context_in_extensions`).
    pub(crate) context_in_extensions: bool,
    pub(crate) request_id_header: HeaderName,
    pub(crate) capture_headers: Vec<HeaderName>,
    pub(crate) trusted_proxies: Vec<IpNet>,
    pub(crate) client_addr_source: crate::ClientAddrSource,
}

/// Shared by producers, the handle and the worker.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) gate: Gate,
    /// The admitted events, for the worker.
    pub(crate) backlog: Backlog,
    /// The strings of written events, for the texts of requests to come.
    pub(crate) recycled: Recycled,
    pub(crate) counters: Counters,
    /// Wakes the worker early when a batch's worth is waiting.
    pub(crate) wake: Notify,
    pub(crate) wake_pending: AtomicBool,
    /// Room freed up in the queue, or intake closed: wakes requests waiting under `Overflow::Wait`.
    pub(crate) room: Notify,
    /// Where durable requests learn that their events are durable.
    pub(crate) watermark: Watermark,
}

impl Shared {
    pub(crate) fn new(capacity: usize, max_bytes: usize, batch_size: usize) -> Self {
        Self {
            gate: Gate::new(capacity, max_bytes),
            backlog: Backlog::new(batch_size),
            recycled: Recycled::default(),
            counters: Counters::default(),
            wake: Notify::new(),
            wake_pending: AtomicBool::new(false),
            room: Notify::new(),
            watermark: Watermark::default(),
        }
    }

    /// Closes intake at once: every later event is dropped (`dropped_closed`) and every later `FailClosed`
    /// request refused; requests waiting for room stop waiting.
    pub(crate) fn close(&self) {
        self.gate.close();
        self.room.notify_waiters();
    }

    pub(crate) fn stats(&self) -> Stats {
        self.counters.snapshot(self.gate.bytes() as u64)
    }
}

/// Why a full queue refused an event: plain `Drop`, or a request that waited under `Overflow::Wait` in vain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OnFull {
    QueueFull,
    WaitTimeout,
}

impl Core {
    /// Queues an event without waiting, into its reserved `slot` if it has one. A refused event is counted
    /// by reason (`on_full` says which counter a full queue means).
    #[inline]
    pub(crate) fn push(&self, event: AuditEvent, slot: Option<Slot>, on_full: OnFull) -> bool {
        self.push_with(event.heap_size(), slot, on_full, || event)
    }

    /// Queues the event `make` makes, admitted for `bytes` (its [`heap_size`](AuditEvent::heap_size)), like
    /// [`push`](Self::push). It is made only once admitted, straight into the queue.
    #[inline(always)]
    pub(crate) fn push_with(
        &self,
        bytes: usize,
        slot: Option<Slot>,
        on_full: OnFull,
        make: impl FnOnce() -> AuditEvent,
    ) -> bool {
        let queued = self.enqueue(bytes, make, slot, on_full, false).is_ok();
        if queued {
            self.wake_if_batch_waiting();
        }
        queued
    }

    /// Queues a durable event like [`push`](Self::push), and wakes the worker at once. Its ticket, or why it
    /// was not queued.
    pub(crate) fn push_durable(&self, event: AuditEvent, slot: Option<Slot>, on_full: OnFull) -> Result<u64, Refusal> {
        let ticket = self.enqueue(event.heap_size(), || event, slot, on_full, true)?;
        let shared = &*self.shared;
        shared.wake_pending.store(true, Relaxed);
        shared.wake.notify_one();
        Ok(ticket)
    }

    /// Admits and sends the event `make` makes (with a ticket when `durable`). The ticket, or 0.
    #[inline(always)]
    fn enqueue(
        &self,
        bytes: usize,
        make: impl FnOnce() -> AuditEvent,
        slot: Option<Slot>,
        on_full: OnFull,
        durable: bool,
    ) -> Result<u64, Refusal> {
        let counters = &self.shared.counters;
        if let Err(refusal) = self.shared.gate.enter(bytes, slot.is_some()) {
            self.count_refusal(refusal, on_full);
            if refusal != Refusal::Closed && matches!(self.config.overflow, crate::Overflow::Wait(_)) {
                // A refused admission raised and lowered the counts: a waiter that looked meanwhile saw no room.
                self.shared.room.notify_waiters();
            }
            return Err(refusal);
        }
        // Inside the gate: counted as accepted before the worker can see (and settle) it.
        add(&counters.accepted, 1);
        // A durable event's ticket is issued and pushed under one lock: the worker takes them in ticket order.
        let mut issued = durable.then(|| self.shared.watermark.issued.lock().unwrap_or_else(|e| e.into_inner()));
        let ticket = issued.as_deref().map_or(0, |last| last + 1);
        let sent = self.shared.backlog.push(make, bytes, ticket);
        if let Some(issued) = issued.as_deref_mut() {
            *issued = ticket;
        }
        drop(issued);
        self.shared.gate.leave();
        if !sent {
            // The worker's end is gone although the gate was open: it can only have died; count the event.
            self.shared.gate.taken(1, bytes);
            add(&counters.abandoned, 1);
            return Err(Refusal::Closed);
        }
        Ok(ticket)
    }

    /// Queues a custom event (handle or handler): bounded and sanitised like request events, never waiting.
    pub(crate) fn record(&self, mut event: AuditEvent) -> bool {
        event.enforce_limits(&self.config.limits);
        self.push(event, None, OnFull::QueueFull)
    }

    /// Reserves a slot for a request's event, or says why none is free.
    pub(crate) fn reserve(&self) -> Result<Slot, Refusal> {
        self.shared.gate.reserve().map(|()| Slot::new())
    }

    pub(crate) fn count_refusal(&self, refusal: Refusal, on_full: OnFull) {
        let counters = &self.shared.counters;
        add(
            match (refusal, on_full) {
                (Refusal::Full, OnFull::QueueFull) => &counters.dropped_queue_full,
                (Refusal::Full, OnFull::WaitTimeout) => &counters.dropped_wait_timeout,
                (Refusal::Bytes, _) => &counters.dropped_queue_bytes,
                (Refusal::Closed, _) => &counters.dropped_closed,
            },
            1,
        );
    }

    /// Wakes the worker only when a whole batch is waiting, so a request never pays for a cross-core wake-up
    /// otherwise (the worker drains on its own schedule).
    fn wake_if_batch_waiting(&self) {
        let shared = &*self.shared;
        if shared.gate.queued() >= self.batch_size
            && !shared.wake_pending.load(Relaxed)
            && !shared.wake_pending.swap(true, Relaxed)
        {
            shared.wake.notify_one();
        }
    }

    pub(crate) fn stats(&self) -> Stats {
        self.shared.stats()
    }
}

impl Drop for Core {
    fn drop(&mut self) {
        // The last producer: every event it admitted is in the backlog already. The worker is woken to take
        // what is left and shut down now, not at its next flush tick (which may be far off).
        self.shared.backlog.disconnect();
        self.shared.wake_pending.store(true, Relaxed);
        self.shared.wake.notify_one();
    }
}
