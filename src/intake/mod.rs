//! The queue between producers and the worker: a [`Backlog`] of events behind a [`Gate`] that admits events by
//! count and by bytes, reserves slots, and closes at once.
//!
//! Admission is decided by the gate, not by the backlog, so a reserved slot is a count and not a half-sent
//! message: closing never waits for whoever holds one.

mod gate;
mod recycle;

/// The atomics the gate is written against (loom's, in the model checker).
mod atomic {
    pub(super) use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
}

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard};

pub(crate) use self::gate::{Gate, Refusal};
pub(crate) use self::recycle::Recycled;

use crate::event::AuditEvent;

/// Admitted events on their way to the worker, in order, in chunks of up to a batch: a producer pushes its event
/// onto the last chunk, and the worker takes a whole chunk as its batch by swapping vectors, so an event is not
/// moved again between the request and the sink (the queue is unbounded; the gate bounds it).
///
/// The lock is held only to push one event or to take a batch, never across an `await`.
#[derive(Debug)]
pub(crate) struct Backlog {
    chunks: Mutex<Chunks>,
    /// Events per chunk: the batch size.
    chunk_len: usize,
}

#[derive(Debug, Default)]
struct Chunks {
    queue: VecDeque<Chunk>,
    /// Emptied chunks, kept for reuse with their capacity.
    spare: Vec<Chunk>,
    /// Every producer is gone: nothing more will be pushed.
    disconnected: bool,
    /// The worker's end is gone: nothing more will be taken.
    closed: bool,
}

#[derive(Debug, Default)]
struct Chunk {
    events: Vec<AuditEvent>,
    /// For each event: the bytes it was admitted for (given back to the gate when the worker takes it), and a
    /// durable event's ticket (see [`Watermark`](crate::durable::Watermark)), 0 for the others.
    admitted: Vec<(usize, u64)>,
}

/// Spare chunks kept at most.
const SPARE: usize = 2;

/// What one [`Backlog::take`] took.
#[derive(Debug, Default)]
pub(crate) struct Taken {
    pub(crate) events: usize,
    pub(crate) bytes: usize,
    /// The last durable ticket taken.
    pub(crate) ticket: Option<u64>,
    /// Every producer is gone and the backlog is empty.
    pub(crate) disconnected: bool,
}

impl Backlog {
    pub(crate) fn new(batch_size: usize) -> Self {
        Self { chunks: Mutex::default(), chunk_len: batch_size.max(1) }
    }

    fn lock(&self) -> MutexGuard<'_, Chunks> {
        // Nothing panics while holding the lock but a failed allocation; the chunks stay consistent anyway.
        self.chunks.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Appends the event `make` makes, admitted; `false` (and `make` dropped, unused) when the worker's end is gone.
    #[inline(always)]
    pub(crate) fn push(&self, make: impl FnOnce() -> AuditEvent, bytes: usize, ticket: u64) -> bool {
        let mut chunks = self.lock();
        let chunks = &mut *chunks;
        if chunks.closed {
            return false;
        }
        let last = match chunks.queue.back_mut() {
            Some(last) if last.events.len() < self.chunk_len => last,
            _ => {
                let chunk = chunks.spare.pop().unwrap_or_else(|| Chunk {
                    events: Vec::with_capacity(self.chunk_len.min(512)),
                    admitted: Vec::with_capacity(self.chunk_len.min(512)),
                });
                chunks.queue.push_back(chunk);
                chunks.queue.back_mut().expect("just pushed")
            }
        };
        last.events.push(make());
        last.admitted.push((bytes, ticket));
        true
    }

    /// Moves events into `batch` (in order) until it holds `limit`, without waiting. The bytes taken are not
    /// given back to the gate here.
    pub(crate) fn take(&self, batch: &mut Vec<AuditEvent>, limit: usize) -> Taken {
        let mut taken = Taken::default();
        let mut chunks = self.lock();
        let chunks = &mut *chunks;
        while batch.len() < limit {
            let Some(first) = chunks.queue.front_mut() else { break };
            let room = limit - batch.len();
            let n = first.events.len().min(room);
            for &(bytes, ticket) in &first.admitted[..n] {
                taken.bytes += bytes;
                if ticket != 0 {
                    taken.ticket = Some(ticket);
                }
            }
            taken.events += n;
            if n < first.events.len() {
                if batch.is_empty() && n * 2 > first.events.len() {
                    // Most of the chunk (a batch one short, for a gap event): take it whole and put the few
                    // events left back, so that producers wait on the lock for a short copy, not a batch's.
                    std::mem::swap(batch, &mut first.events);
                    first.events = batch.split_off(n);
                } else {
                    batch.extend(first.events.drain(..n));
                }
                first.admitted.drain(..n);
                break;
            }
            if batch.is_empty() {
                // The whole chunk becomes the batch; the batch's empty vector is kept for a chunk to come.
                std::mem::swap(batch, &mut first.events);
            } else {
                batch.append(&mut first.events);
            }
            let mut chunk = chunks.queue.pop_front().expect("the first chunk");
            chunk.admitted.clear();
            if chunks.spare.len() < SPARE {
                chunks.spare.push(chunk);
            }
        }
        taken.disconnected = chunks.disconnected && chunks.queue.is_empty();
        taken
    }

    /// Whether a whole batch is waiting (the first chunk is full).
    pub(crate) fn has_full_batch(&self) -> bool {
        self.lock().queue.front().is_some_and(|first| first.events.len() >= self.chunk_len)
    }

    /// Every producer is gone.
    pub(crate) fn disconnect(&self) {
        self.lock().disconnected = true;
    }

    /// The worker's end is gone: takes every event left (to be dropped) and refuses every later push.
    pub(crate) fn close(&self) -> (Vec<AuditEvent>, Taken) {
        let mut rest = Vec::new();
        let taken = self.take(&mut rest, usize::MAX);
        let mut chunks = self.lock();
        chunks.closed = true;
        chunks.spare = Vec::new();
        (rest, taken)
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn event(n: usize) -> AuditEvent {
        AuditEvent::new(format!("e{n}"))
    }

    fn kinds(batch: &[AuditEvent]) -> Vec<String> {
        batch.iter().map(|e| e.kind.to_string()).collect()
    }

    #[test]
    fn events_come_out_in_order_in_batches_up_to_the_limit() {
        let backlog = Backlog::new(4);
        for n in 0..10 {
            assert!(backlog.push(|| event(n), n, 0));
        }
        let mut batch = Vec::new();
        let taken = backlog.take(&mut batch, 4);
        assert_eq!(kinds(&batch), ["e0", "e1", "e2", "e3"]);
        assert_eq!((taken.events, taken.bytes, taken.ticket, taken.disconnected), (4, 6, None, false));
        // A limit that cuts a chunk, and a batch that already holds events.
        batch.clear();
        let taken = backlog.take(&mut batch, 3);
        assert_eq!(kinds(&batch), ["e4", "e5", "e6"]);
        assert_eq!((taken.events, taken.bytes), (3, 15));
        let taken = backlog.take(&mut batch, 100);
        assert_eq!(kinds(&batch), ["e4", "e5", "e6", "e7", "e8", "e9"]);
        assert_eq!((taken.events, taken.bytes), (3, 24));
        let taken = backlog.take(&mut batch, 100);
        assert_eq!((taken.events, taken.bytes, taken.disconnected), (0, 0, false));
        backlog.disconnect();
        assert!(backlog.take(&mut batch, 100).disconnected);
    }

    #[test]
    fn a_chunk_taken_all_but_one_leaves_the_last_event_first_in_line() {
        let backlog = Backlog::new(4);
        for n in 0..6 {
            assert!(backlog.push(|| event(n), 10 + n, if n == 2 { 7 } else { 0 }));
        }
        let mut batch = Vec::new();
        let taken = backlog.take(&mut batch, 3);
        assert_eq!(kinds(&batch), ["e0", "e1", "e2"]);
        assert_eq!((taken.events, taken.bytes, taken.ticket), (3, 33, Some(7)));
        batch.clear();
        let taken = backlog.take(&mut batch, 100);
        assert_eq!(kinds(&batch), ["e3", "e4", "e5"]);
        assert_eq!((taken.events, taken.bytes, taken.ticket), (3, 42, None));
    }

    #[test]
    fn the_last_ticket_taken_is_reported() {
        let backlog = Backlog::new(2);
        for (n, ticket) in [0, 1, 0, 2, 0].into_iter().enumerate() {
            assert!(backlog.push(|| event(n), 1, ticket));
        }
        let mut batch = Vec::new();
        assert_eq!(backlog.take(&mut batch, 3).ticket, Some(1));
        assert_eq!(backlog.take(&mut batch, 4).ticket, Some(2));
        assert_eq!(backlog.take(&mut batch, 5).ticket, None);
        assert_eq!(batch.len(), 5);
    }

    #[test]
    fn a_disconnected_backlog_is_drained_before_it_says_so_and_a_closed_one_refuses() {
        let backlog = Backlog::new(8);
        assert!(backlog.push(|| event(0), 10, 0));
        backlog.disconnect();
        let mut batch = Vec::new();
        assert!(!backlog.take(&mut batch, 0).disconnected, "one event is left");
        let (rest, taken) = backlog.close();
        assert_eq!((kinds(&rest), taken.events, taken.bytes, taken.disconnected), (vec!["e0".to_owned()], 1, 10, true));
        assert!(!backlog.push(|| event(1), 1, 0));
    }
}
