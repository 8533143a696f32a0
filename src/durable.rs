//! The durable watermark: how a durable request learns that its event is durable (or will not be).
//!
//! Each durable event gets a ticket, 1, 2, 3, … in the order it enters the queue (the ticket is issued and
//! the event sent under one lock, so the worker takes durable events in ticket order). The worker settles
//! tickets in that order, a batch at a time: `settled` says every ticket up to it is decided, and the
//! ranges of tickets whose batch failed are kept beside it. A waiting request watches `settled`: no task,
//! channel or allocation per event on the worker's side, one `notify_waiters` per batch.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{
    AtomicU64,
    Ordering::{Acquire, Release},
};

use tokio::sync::Notify;
use tokio::time::Instant;

/// Failed ranges kept; older ones are forgotten, and a ticket from before them is answered "not durable" (a
/// safe answer: a response is withheld, never released without its event). A waiter has long timed out by
/// then: each range needs a failed batch of its own.
const KEPT_FAILURES: usize = 1024;

#[derive(Debug, Default)]
pub(crate) struct Watermark {
    /// The last ticket issued. Held while the ticket's event is sent into the queue.
    pub(crate) issued: Mutex<u64>,
    /// Every ticket up to this one is settled (durable or failed).
    settled: AtomicU64,
    /// The highest failed ticket: tickets above it that are settled are durable (no lock to check).
    last_failed: AtomicU64,
    failed: Mutex<Failed>,
    /// Woken at every settlement.
    settles: Notify,
}

#[derive(Debug, Default)]
struct Failed {
    /// Inclusive ranges of failed tickets, oldest first, not overlapping.
    ranges: VecDeque<(u64, u64)>,
    /// Tickets up to this one are taken for failed (their ranges were forgotten).
    forgotten: u64,
}

/// What became of a durable event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Confirmation {
    Durable,
    /// Its batch was not made durable (sink or disk failure, disk budget, shutdown).
    Failed,
    /// Still not settled when the timeout passed.
    Timeout,
}

impl Watermark {
    /// Settles every ticket after the last settled one up to `upto`, durable or not. Called by the worker
    /// once per batch, in ticket order.
    pub(crate) fn settle(&self, upto: u64, durable: bool) {
        let settled = self.settled.load(Acquire);
        if upto <= settled {
            return; // also when closed already (settled is u64::MAX): `settled + 1` would overflow
        }
        let from = settled + 1;
        if !durable {
            let mut failed = self.failed.lock().unwrap_or_else(|e| e.into_inner());
            match failed.ranges.back_mut() {
                Some((_, end)) if *end + 1 == from => *end = upto,
                _ => failed.ranges.push_back((from, upto)),
            }
            if failed.ranges.len() > KEPT_FAILURES
                && let Some((_, end)) = failed.ranges.pop_front()
            {
                failed.forgotten = end;
            }
            self.last_failed.store(upto, Release);
        }
        self.settled.store(upto, Release);
        self.settles.notify_waiters();
    }

    /// Settles every ticket, issued or to come, as failed: the worker has ended.
    pub(crate) fn close(&self) {
        self.settle(u64::MAX, false);
    }

    /// `None` while `ticket` is not settled.
    fn check(&self, ticket: u64) -> Option<Confirmation> {
        if self.settled.load(Acquire) < ticket {
            return None;
        }
        if ticket > self.last_failed.load(Acquire) {
            return Some(Confirmation::Durable);
        }
        let failed = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        let lost = ticket <= failed.forgotten || failed.ranges.iter().any(|&(a, b)| (a..=b).contains(&ticket));
        Some(if lost { Confirmation::Failed } else { Confirmation::Durable })
    }

    /// Waits until `ticket` is settled, or `until`.
    pub(crate) async fn confirm(&self, ticket: u64, until: Instant) -> Confirmation {
        let settled = async {
            loop {
                let notified = self.settles.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if let Some(answer) = self.check(ticket) {
                    return answer;
                }
                notified.await;
            }
        };
        tokio::time::timeout_at(until, settled).await.unwrap_or(Confirmation::Timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tickets_settle_in_ranges_and_failures_are_remembered() {
        let w = Watermark::default();
        assert_eq!(w.check(1), None);
        w.settle(3, true);
        w.settle(5, false);
        w.settle(6, false);
        w.settle(9, true);
        let got: Vec<_> = (1..=10).map(|t| w.check(t)).collect();
        let (d, f) = (Some(Confirmation::Durable), Some(Confirmation::Failed));
        assert_eq!(got, [d, d, d, f, f, f, d, d, d, None]);
        // One range for the two failed batches in a row.
        assert_eq!(w.failed.lock().unwrap().ranges, [(4, 6)]);
        // A settlement that goes back is ignored.
        w.settle(2, false);
        assert_eq!(w.check(2), d);
        w.close();
        assert_eq!((w.check(10), w.check(u64::MAX)), (f, f));
    }

    #[test]
    fn forgotten_failures_answer_failed() {
        let w = Watermark::default();
        for i in 0..=KEPT_FAILURES as u64 {
            w.settle(2 * i + 1, false);
            w.settle(2 * i + 2, true);
        }
        // Ticket 1's range is forgotten, and still answers failed; the others are as settled.
        assert_eq!(w.failed.lock().unwrap().forgotten, 1);
        let got: Vec<_> = (1..=4).map(|t| w.check(t)).collect();
        let (d, f) = (Some(Confirmation::Durable), Some(Confirmation::Failed));
        assert_eq!(got, [f, d, f, d]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_is_woken_by_its_settlement_or_times_out() {
        let w = std::sync::Arc::new(Watermark::default());
        let start = Instant::now();
        let waiter = tokio::spawn({
            let w = std::sync::Arc::clone(&w);
            async move { w.confirm(2, start + std::time::Duration::from_secs(5)).await }
        });
        tokio::task::yield_now().await;
        w.settle(1, true);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        w.settle(2, true);
        assert_eq!(waiter.await.unwrap(), Confirmation::Durable);
        assert_eq!(start.elapsed(), std::time::Duration::ZERO);
        let timeout = w.confirm(3, start + std::time::Duration::from_secs(5)).await;
        assert_eq!((timeout, start.elapsed()), (Confirmation::Timeout, std::time::Duration::from_secs(5)));
    }
}
