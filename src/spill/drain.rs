//! The spill's delivering half: a task that reads the log oldest first, in batches, hands each batch to the
//! primary sink (retried until it takes it, or shutdown's deadline passes) and acknowledges it. It serves the
//! backlog of earlier boots and this boot's appends alike: every event reaches the sink through the disk.

use std::sync::Arc;
use std::sync::atomic::Ordering::SeqCst;

use tokio::sync::watch;

use super::codec::{self, Origin};
use super::spool::{Progress, SharedLog};
use crate::call::Deadline;
use crate::delivery::{Sinks, Written};
use crate::pipeline::Shared;
use crate::stats::add;

pub(crate) struct Drain {
    pub(crate) log: SharedLog,
    pub(crate) progress: Arc<Progress>,
    pub(crate) sinks: Sinks,
    pub(crate) shared: Arc<Shared>,
    pub(crate) deadline: Deadline,
    pub(crate) batch_size: usize,
    /// The worker's orders: `Some(lsn)` means "stop once everything before `lsn` is delivered".
    pub(crate) finish: watch::Receiver<Option<u64>>,
    /// The first record not yet delivered, for the worker to watch.
    pub(crate) delivered: watch::Sender<u64>,
}

/// How the drain ended.
pub(crate) struct Drained {
    /// Everything up to the worker's finish mark was delivered and the sink flushed after it.
    pub(crate) complete: bool,
}

impl Drain {
    pub(crate) async fn run(mut self) -> Drained {
        let mut records = Vec::with_capacity(self.batch_size);
        let mut events = Vec::with_capacity(self.batch_size);
        let mut origins = Vec::with_capacity(self.batch_size);
        loop {
            let max = self.batch_size;
            let read = self
                .log
                .with(move |log| {
                    let corrupt = log.read(max, &mut records)?;
                    Ok((records, corrupt, log.read_pos()))
                })
                .await;
            let (got, corrupt, next) = match read {
                Ok(read) => read,
                Err(error) => {
                    tracing::error!(%error, "cannot read the audit spill; delivery stops until shutdown");
                    records = Vec::new();
                    if self.wait(None).await {
                        return self.end(false).await;
                    }
                    continue;
                }
            };
            records = got;
            self.skipped(corrupt);
            if records.is_empty() {
                if self.wait(Some(next)).await {
                    let caught_up = self.finish.borrow().is_some_and(|finish| next >= finish);
                    return self.end(caught_up).await;
                }
                continue;
            }
            events.clear();
            origins.clear();
            for (_, payload) in records.drain(..) {
                match codec::decode(&payload) {
                    Ok((origin, event)) => {
                        origins.push(origin);
                        events.push(event);
                    }
                    Err(error) => {
                        tracing::error!(%error, "skipping an audit spill record this version cannot read");
                        self.skipped(1);
                    }
                }
            }
            let counters = &self.shared.counters;
            // Every record of the batch unreadable: nothing to write, but still to acknowledge.
            let written = if events.is_empty() {
                Written::Yes
            } else {
                self.sinks.primary(&events, &self.deadline, counters).await
            };
            if written != Written::Yes {
                // The deadline passed (during the call, or before a retry could start): the batch stays in the
                // spill for the next boot, and the shutdown sees it there.
                return self.end(false).await;
            }
            if let Err(error) = self.log.with(move |log| log.ack(next, false)).await {
                // The sink has the batch; not acknowledging it only means the next boot replays it (by id).
                tracing::warn!(%error, "cannot record delivery in the audit spill's ledger");
            }
            let users = origins.iter().filter(|o| **o == Origin::User).count() as u64;
            let gaps = origins.iter().filter(|o| **o == Origin::Gap).count() as u64;
            add(&counters.written, users);
            add(&counters.gap_events, gaps);
            add(&counters.batches, 1);
            let _ = self.progress.in_spill.fetch_update(SeqCst, SeqCst, |v| Some(v.saturating_sub(users)));
            self.delivered.send_replace(next);
        }
    }

    /// Records skipped as corrupt (or unreadable) while delivering: counted, and no longer in the spill. Their
    /// origin is unknown; they are taken for events (the worker's own are at most one per batch).
    fn skipped(&self, n: u64) {
        if n > 0 {
            add(&self.shared.counters.corrupt, n);
            let _ = self.progress.in_spill.fetch_update(SeqCst, SeqCst, |v| Some(v.saturating_sub(n)));
        }
    }

    /// Waits for an append, or for the order to finish. Returns `true` when the drain is to end: finishing and
    /// everything up to the finish mark (`next` is where reading stopped) delivered, or the deadline passed.
    async fn wait(&mut self, next: Option<u64>) -> bool {
        loop {
            if let Some(finish) = *self.finish.borrow_and_update() {
                if next.is_none_or(|next| next >= finish) || self.deadline.passed() {
                    return true;
                }
                // More to read: go read it.
                return false;
            }
            tokio::select! {
                () = self.progress.appended.notified() => return false,
                changed = self.finish.changed() => if changed.is_err() { return true },
            }
        }
    }

    /// Syncs the ledger (the sink has what it acknowledges) and flushes the sink, if there is time.
    async fn end(self, caught_up: bool) -> Drained {
        if let Err(error) = self.log.with(|log| log.ack(log.acked(), true)).await {
            tracing::warn!(%error, "cannot sync the audit spill's ledger at shutdown");
        }
        let flushed = !self.deadline.passed() && self.sinks.flush(&self.deadline, &self.shared.counters).await;
        Drained { complete: caught_up && flushed }
    }
}
