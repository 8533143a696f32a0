//! Admission into the queue, as a handful of atomics: how many events (and bytes) the queue holds, how many
//! slots are reserved, whether intake is closed, and how many producers are between admission and publication.
//!
//! The module uses nothing but atomics from `super::atomic`, so the model checker (`tools/model-check`, loom)
//! compiles this very file against loom's atomics and explores every interleaving of producers, reservations
//! and a closer.

use super::atomic::{AtomicU64, AtomicUsize, Ordering::SeqCst};

/// Set in `state` once intake is closed; the low bits count producers inside the gate.
const CLOSED: u64 = 1 << 63;

/// Why an event (or a reservation) was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// `capacity` events are queued or reserved.
    Full,
    /// The queued events hold `max_bytes` already.
    Bytes,
    /// Intake is closed: the pipeline is shutting down, or its worker is gone.
    Closed,
}

/// The admission state shared by producers and the worker.
///
/// A producer calls [`enter`](Self::enter); once admitted it publishes its event into the channel and then calls
/// [`leave`](Self::leave). [`close`](Self::close) refuses every later `enter` and `reserve`; once
/// [`is_quiet`](Self::is_quiet) holds after it, every admitted event is in the channel and none can follow.
#[derive(Debug)]
pub(crate) struct Gate {
    /// `CLOSED` | producers between `enter` and `leave`.
    state: AtomicU64,
    /// Events in the queue plus reserved slots; at most `capacity` (a reserved event is admitted into its slot).
    used: AtomicUsize,
    /// Bytes of the events in the queue.
    bytes: AtomicUsize,
    /// Slots reserved and not yet used (part of `used`).
    reserved: AtomicUsize,
    capacity: usize,
    max_bytes: usize,
}

impl Gate {
    pub(crate) fn new(capacity: usize, max_bytes: usize) -> Self {
        Self {
            state: AtomicU64::new(0),
            used: AtomicUsize::new(0),
            bytes: AtomicUsize::new(0),
            reserved: AtomicUsize::new(0),
            capacity,
            max_bytes,
        }
    }

    /// Admits one event of `bytes`, or refuses it. `reserved`: the event takes a slot reserved earlier with
    /// [`reserve`](Self::reserve), which is consumed either way (it is admitted whatever the byte count, so a
    /// request served under `FailClosed` is always audited unless intake closed meanwhile).
    ///
    /// On `Ok` the caller is inside the gate: it must publish the event, then call [`leave`](Self::leave).
    /// On `Err` it is not inside and must not call `leave`.
    pub(crate) fn enter(&self, bytes: usize, reserved: bool) -> Result<(), Refusal> {
        if reserved {
            self.reserved.fetch_sub(1, SeqCst);
        }
        let state = self.state.fetch_add(1, SeqCst);
        if state & CLOSED != 0 {
            if reserved {
                self.used.fetch_sub(1, SeqCst);
            }
            self.state.fetch_sub(1, SeqCst);
            return Err(Refusal::Closed);
        }
        if !reserved {
            if self.used.fetch_add(1, SeqCst) >= self.capacity {
                self.used.fetch_sub(1, SeqCst);
                self.state.fetch_sub(1, SeqCst);
                return Err(Refusal::Full);
            }
            if self.bytes.fetch_add(bytes, SeqCst).saturating_add(bytes) > self.max_bytes {
                self.bytes.fetch_sub(bytes, SeqCst);
                self.used.fetch_sub(1, SeqCst);
                self.state.fetch_sub(1, SeqCst);
                return Err(Refusal::Bytes);
            }
        } else {
            self.bytes.fetch_add(bytes, SeqCst);
        }
        Ok(())
    }

    /// Leaves the gate after publishing an admitted event.
    pub(crate) fn leave(&self) {
        self.state.fetch_sub(1, SeqCst);
    }

    /// Reserves a slot for an event to come. Refused when intake is closed, the queue is full, or its bytes
    /// are at the budget. The slot is given back by [`enter`](Self::enter) with `reserved`, whatever it
    /// answers.
    pub(crate) fn reserve(&self) -> Result<(), Refusal> {
        if self.state.load(SeqCst) & CLOSED != 0 {
            return Err(Refusal::Closed);
        }
        if self.bytes.load(SeqCst) >= self.max_bytes {
            return Err(Refusal::Bytes);
        }
        if self.used.fetch_add(1, SeqCst) >= self.capacity {
            self.used.fetch_sub(1, SeqCst);
            return Err(Refusal::Full);
        }
        self.reserved.fetch_add(1, SeqCst);
        Ok(())
    }

    /// Whether an event could be admitted now (not a promise: another producer may take the room first).
    pub(crate) fn has_room(&self) -> Result<(), Refusal> {
        if self.is_closed() {
            Err(Refusal::Closed)
        } else if self.used.load(SeqCst) >= self.capacity {
            Err(Refusal::Full)
        } else if self.bytes.load(SeqCst) >= self.max_bytes {
            Err(Refusal::Bytes)
        } else {
            Ok(())
        }
    }

    /// The worker took `events` events holding `bytes` out of the queue.
    pub(crate) fn taken(&self, events: usize, bytes: usize) {
        // Bytes first: a producer that looks in between is refused as `Full` (true until the slot is given back),
        // never as over the byte budget for bytes already leaving.
        self.bytes.fetch_sub(bytes, SeqCst);
        self.used.fetch_sub(events, SeqCst);
    }

    /// Refuses every later `enter` and `reserve`. Idempotent.
    pub(crate) fn close(&self) {
        self.state.fetch_or(CLOSED, SeqCst);
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.state.load(SeqCst) & CLOSED != 0
    }

    /// Closed, and no producer is inside: every admitted event has been published, and no other can be.
    pub(crate) fn is_quiet(&self) -> bool {
        self.state.load(SeqCst) == CLOSED
    }

    /// Events queued or reserved.
    #[allow(dead_code)] // read by the model checker (`tools/model-check`)
    pub(crate) fn used(&self) -> usize {
        self.used.load(SeqCst)
    }

    /// Events in the queue, reservations left out (a moment's estimate: the two counts are read apart).
    pub(crate) fn queued(&self) -> usize {
        self.used.load(SeqCst).saturating_sub(self.reserved.load(SeqCst))
    }

    /// Bytes of the queued events.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes.load(SeqCst)
    }
}
