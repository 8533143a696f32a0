//! The background task. It only orchestrates the stages, in order: take a batch from the queue, stamp it
//! (`stamp`), put the `audit.gap` event due to the trail in front (`gap`), write it to the primary sink with
//! retries and then the fallback (`delivery`), and count what became of every event (`stats`).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::call::{Deadline, after};
use crate::delivery::{Sinks, Written};
use crate::event::AuditEvent;
use crate::gap::{Due, Ledger, Losses, Trail};
use crate::handle::ShutdownReport;
use crate::intake::Entry;
use crate::pipeline::Shared;
use crate::stamp::Stamper;
use crate::stats::add;

pub(crate) struct WorkerConfig {
    pub(crate) batch_size: usize,
    pub(crate) flush_interval: Duration,
    pub(crate) warn_interval: Duration,
}

pub(crate) struct Worker {
    /// First field, so that when the worker ends in any way its `Drop` settles what is left before the report
    /// sender is dropped.
    pub(crate) queue: Queue,
    pub(crate) shared: Arc<Shared>,
    pub(crate) sinks: Sinks,
    pub(crate) config: WorkerConfig,
    pub(crate) deadline: Deadline,
    pub(crate) report: watch::Sender<Option<ShutdownReport>>,
    /// The stamping stage as built with the layer (its identity, no event stamped yet); `run` stamps with a copy.
    pub(crate) stamper: Stamper,
}

/// What the loop keeps between batches.
struct State {
    primary: Ledger,
    fallback: Ledger,
    /// Losses already warned about through `tracing`, and when.
    warned: Losses,
    last_warn: Option<Instant>,
}

impl Worker {
    pub(crate) async fn run(mut self) {
        let mut state = State {
            primary: Ledger::new(Trail::Primary),
            fallback: Ledger::new(Trail::Fallback),
            warned: Losses::default(),
            last_warn: None,
        };
        let mut batch = Vec::with_capacity(self.config.batch_size);
        let mut requests = self.deadline.0.clone();
        let mut listening = true;
        let mut tick = after(self.config.flush_interval);
        loop {
            let ticked = tokio::select! {
                biased;
                changed = requests.changed(), if listening => {
                    match changed {
                        Ok(()) => return self.shut_down(batch, state).await,
                        // Every handle is gone; the worker now ends when every producer is gone.
                        Err(_) => listening = false,
                    }
                    continue;
                }
                _ = self.shared.wake.notified() => false,
                _ = tokio::time::sleep_until(tick) => {
                    tick = after(self.config.flush_interval);
                    true
                }
            };
            self.shared.wake_pending.store(false, std::sync::atomic::Ordering::Relaxed);
            // Full batches go out as soon as they are there; a partial one waits for the tick.
            loop {
                let limit = self.limit(&state);
                let took = self.queue.take(&mut batch, limit);
                if took.disconnected {
                    return self.shut_down(batch, state).await;
                }
                let gap_due = state.primary.is_due(self.losses());
                // `deliver` is `true` when the shutdown deadline passed during the write (shutdown began meanwhile).
                if (took.full || (ticked && (!batch.is_empty() || gap_due)))
                    && self.deliver(&mut batch, &mut state).await
                {
                    return self.shut_down(batch, state).await;
                }
                if !took.full {
                    break;
                }
            }
            self.warn_about_losses(&mut state);
        }
    }

    fn losses(&self) -> Losses {
        Losses::of(&self.shared.stats())
    }

    /// How many events to take: one fewer than a batch when a gap event is due, so it fits in front.
    fn limit(&self, state: &State) -> usize {
        let batch_size = self.config.batch_size;
        if batch_size > 1 && state.primary.is_due(self.losses()) { batch_size - 1 } else { batch_size }
    }

    /// Writes `batch` (with the gap event due, if any) and settles its events. Returns `true` when the
    /// shutdown deadline passed first; the events left in `batch` are then unsettled.
    async fn deliver(&mut self, batch: &mut Vec<AuditEvent>, state: &mut State) -> bool {
        match state.primary.due(self.losses()) {
            // No room in front (events taken before the losses happened): the gap event goes alone first.
            Some(due) if batch.len() >= self.config.batch_size => {
                self.write(&mut Vec::new(), Some(due), state).await || self.write(batch, None, state).await
            }
            due => self.write(batch, due, state).await,
        }
    }

    /// Writes `[gap] + events` to the primary sink, or failing that the events to the fallback (after its own
    /// gap event, if one is due), and counts what became of them.
    async fn write(&mut self, events: &mut Vec<AuditEvent>, gap: Option<Due>, state: &mut State) -> bool {
        let n = events.len() as u64;
        let reported = gap.as_ref().map(|due| due.upto);
        if let Some(due) = gap {
            events.insert(0, due.event);
        }
        events.iter_mut().for_each(|e| self.stamper.stamp(e));
        let counters = &self.shared.counters;
        let written = self.sinks.primary(events, &self.deadline, counters).await;
        if reported.is_some() {
            events.remove(0);
        }
        match written {
            Written::Yes => {
                add(&counters.written, n);
                add(&counters.batches, 1);
                if let Some(upto) = reported {
                    add(&counters.gap_events, 1);
                    state.primary.written(upto);
                }
            }
            Written::Deadline => return true,
            Written::Failed if self.sinks.fallback.is_none() => add(&counters.lost, n),
            Written::Failed => {
                if let Some(mut due) = state.fallback.due(self.losses()) {
                    self.stamper.stamp(&mut due.event);
                    match self.sinks.fallback(std::slice::from_ref(&due.event), &self.deadline, counters).await {
                        Written::Yes => {
                            add(&counters.gap_events, 1);
                            state.fallback.written(due.upto);
                        }
                        Written::Failed => {}
                        Written::Deadline => return true,
                    }
                }
                if n > 0 {
                    match self.sinks.fallback(events, &self.deadline, counters).await {
                        Written::Yes => add(&counters.fallback_written, n),
                        Written::Failed => add(&counters.lost, n),
                        Written::Deadline => return true,
                    }
                }
            }
        }
        events.clear();
        false
    }

    fn warn_about_losses(&self, state: &mut State) {
        let now = self.losses();
        let new = now.since(state.warned);
        if new.missing() == 0 || state.last_warn.is_some_and(|t| t.elapsed() < self.config.warn_interval) {
            return;
        }
        let [queue_full, queue_bytes, wait_timeout, closed, _, sink_failed, abandoned, in_fallback] =
            new.by_reason().map(|(_, n)| n);
        tracing::warn!(
            lost = new.missing(),
            queue_full,
            queue_bytes,
            wait_timeout,
            closed,
            sink_failed,
            abandoned,
            in_fallback,
            "audit events were lost (or written to the fallback sink) since the last report"
        );
        state.warned = now;
        state.last_warn = Some(Instant::now());
    }

    /// Intake is closed at once (by the handle, or here); what was queued is drained until the deadline, the
    /// trails are told about the losses, the sinks flushed, and the report published. Nothing is attempted
    /// after the deadline; what it catches is `abandoned`.
    async fn shut_down(mut self, mut batch: Vec<AuditEvent>, mut state: State) {
        self.shared.close();
        self.queue.quiesce().await;
        let mut out_of_time = false;
        loop {
            if self.deadline.passed() {
                out_of_time = true;
                break;
            }
            let limit = self.limit(&state);
            self.queue.take(&mut batch, limit);
            if batch.is_empty() {
                break;
            }
            if self.deliver(&mut batch, &mut state).await {
                out_of_time = true;
                break;
            }
        }
        if !out_of_time {
            if let Some(due) = state.primary.due(self.losses()) {
                out_of_time = self.write(&mut Vec::new(), Some(due), &mut state).await;
            }
        }
        let flushed = !out_of_time && self.sinks.flush(&self.deadline, &self.shared.counters).await;
        drop(batch);
        self.queue.settle_rest();
        state.last_warn = None;
        self.warn_about_losses(&mut state);
        let stats = self.shared.stats();
        let report = ShutdownReport {
            stats,
            drained: stats.abandoned == 0 && flushed,
            unreported: state.primary.unreported(Losses::of(&stats)),
        };
        tracing::info!(%stats, drained = report.drained, unreported = report.unreported, "audit pipeline shut down");
        self.report.send_replace(Some(report));
    }
}

/// The worker's end of the queue.
pub(crate) struct Queue {
    pub(crate) rx: mpsc::UnboundedReceiver<Entry>,
    pub(crate) shared: Arc<Shared>,
}

/// What one `take` saw.
pub(crate) struct Took {
    full: bool,
    /// Every producer is gone and the queue is empty.
    disconnected: bool,
}

impl Queue {
    /// Moves events into `batch` until it holds `limit`, without waiting.
    fn take(&mut self, batch: &mut Vec<AuditEvent>, limit: usize) -> Took {
        let (start, mut bytes, mut disconnected) = (batch.len(), 0, false);
        while batch.len() < limit {
            match self.rx.try_recv() {
                Ok(entry) => {
                    bytes += entry.bytes;
                    batch.push(entry.event);
                }
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    disconnected = true;
                    break;
                }
            }
        }
        if batch.len() > start {
            self.shared.gate.taken(batch.len() - start, bytes);
            self.shared.room.notify_waiters();
        }
        Took { full: batch.len() >= limit, disconnected }
    }

    /// Once intake is closed, waits for the producers inside the gate to publish (they never wait in there,
    /// so this is a matter of instructions); then the queue holds every event it ever will.
    async fn quiesce(&self) {
        while !self.shared.gate.is_quiet() {
            tokio::task::yield_now().await;
        }
    }

    /// Closes intake and counts every accepted event not settled yet (still queued, or in the worker's hands)
    /// as abandoned. Runs at the end of every shutdown, and from `Drop` if the worker ends any other way.
    fn settle_rest(&mut self) {
        self.shared.close();
        while !self.shared.gate.is_quiet() {
            std::thread::yield_now();
        }
        while let Ok(entry) = self.rx.try_recv() {
            self.shared.gate.taken(1, entry.bytes);
        }
        add(&self.shared.counters.abandoned, self.shared.stats().queued);
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        self.settle_rest();
    }
}
