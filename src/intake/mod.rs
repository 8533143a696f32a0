//! The queue between producers and the worker: an unbounded channel behind a [`Gate`] that admits events by
//! count and by bytes, reserves slots, and closes at once.
//!
//! Admission is decided by the gate, not by the channel, so a reserved slot is a count and not a half-sent
//! message: closing never waits for whoever holds one.

mod gate;

/// The atomics the gate is written against (loom's, in the model checker).
mod atomic {
    pub(super) use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
}

pub(crate) use self::gate::{Gate, Refusal};

use crate::event::AuditEvent;

/// An admitted event with the bytes it was admitted for (given back to the gate when the worker takes it).
#[derive(Debug)]
pub(crate) struct Entry {
    pub(crate) event: AuditEvent,
    pub(crate) bytes: usize,
    /// A durable event's ticket (see [`Watermark`](crate::durable::Watermark)); 0 for the others.
    pub(crate) ticket: u64,
}

/// A slot reserved for the event of one request (under `Overflow::Wait` and `Overflow::FailClosed`).
///
/// It goes back through [`Core::push`](crate::pipeline::Core::push), which the request's pending event always
/// reaches (it emits its event when dropped, if not before).
#[derive(Debug)]
#[must_use]
pub(crate) struct Slot(());

impl Slot {
    pub(crate) fn new() -> Self {
        Slot(())
    }
}
