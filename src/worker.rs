//! The background task. It only orchestrates the stages, in order: write the `audit.boot` event
//! (`lifecycle`); then for each batch taken from the queue, put the `audit.gap` event due to the trail in front
//! (`gap`), stamp it (`stamp`), and either write it to the primary sink with retries and then the fallback
//! (`delivery`), or append it to the disk spill (`spill::spool`), from which a task of its own delivers it
//! (`spill::drain`); count what became of every event (`stats`); at shutdown, end with `audit.shutdown`.
//!
//! With integrity on and full batches waiting, the worker links the next batch on another thread while the sink
//! writes the current one ([`Numbering::LookAhead`]), so the hashing is off its critical path; a batch linked
//! ahead goes out next, and if the current one is not written it is numbered anew after what that makes due.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::call::{Deadline, after};
use crate::delivery::{Sinks, Written};
use crate::event::{AuditEvent, kind};
use crate::gap::{Due, Ledger, Losses, PipelineLosses, Trail};
use crate::handle::ShutdownReport;
use crate::integrity::chain::{Chain, LinkedAhead};
use crate::lifecycle::shutdown_event;
use crate::pipeline::Shared;
use crate::spill::codec::Origin;
use crate::spill::drain::{Drain, Drained};
use crate::spill::spool::{Progress, Spool};
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
    pub(crate) output: Output,
    pub(crate) config: WorkerConfig,
    pub(crate) deadline: Deadline,
    pub(crate) report: watch::Sender<Option<ShutdownReport>>,
    /// The stamping stage as built with the layer (its identity, no event stamped yet); `run` stamps with a copy.
    pub(crate) stamper: Stamper,
    /// With integrity on: the chain stage, right after stamping.
    pub(crate) chain: Option<Chain>,
    /// The `audit.boot` event, written first.
    pub(crate) boot: Option<AuditEvent>,
    /// The worker's own events that did not reach the primary trail (the gap events declare them).
    pub(crate) pipeline: PipelineLosses,
    /// With integrity on: the full batch taken from the queue while the one before it was being written (see
    /// [`Numbering::LookAhead`]); it goes out next, before anything else is numbered.
    pub(crate) ahead: Option<Ahead>,
    /// Shutting down: no batch is taken ahead (the drain takes the queue batch by batch).
    pub(crate) closing: bool,
}

/// A batch taken ahead.
pub(crate) struct Ahead {
    events: Vec<AuditEvent>,
    /// The last durable ticket among them.
    ticket: Option<u64>,
    /// Numbered and linked, and the chain advanced past them (the batch before them was written); otherwise
    /// the stamper was rewound and they are numbered anew when they go out.
    linked: bool,
}

/// How [`Worker::write`] numbers what it writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Numbering {
    /// Stamps and links every event here.
    Fresh,
    /// As `Fresh`; and, with integrity on, when another full batch is waiting and nothing else is due to be
    /// numbered first (a gap event, a checkpoint), takes that batch too, numbers it after this one, and links it
    /// on another thread while the sink writes this one: the hashing is then off the worker's critical path.
    /// Once this batch is written the chain takes the linked batch in ([`Worker::ahead`]); if it is not, the
    /// stamper is rewound, so the gap and fallback events due are numbered right after this batch, as always.
    LookAhead,
    /// Stamped and linked already (taken ahead); may look ahead in turn.
    Linked,
}

/// Where stamped batches go.
pub(crate) enum Output {
    /// Straight to the sinks, from the worker.
    Direct(Sinks),
    /// Into the spill; a drain task delivers from there.
    Spill(Box<SpillOutput>),
    /// Shut down: the spill (and its lock) released.
    Closed,
}

pub(crate) struct SpillOutput {
    pub(crate) spool: Spool,
    /// Spawned when the worker starts; `None` once it has ended.
    pub(crate) drain: Option<Drain>,
    pub(crate) task: Option<JoinHandle<Drained>>,
    pub(crate) finish: watch::Sender<Option<u64>>,
    pub(crate) delivered: watch::Receiver<u64>,
    /// The drain's deadline: the handle's, once shutdown begins, or [`DISCONNECT_GRACE`] from when every
    /// handle and producer went away without one.
    pub(crate) deadline: watch::Sender<Option<Instant>>,
}

/// With a spill, when every handle and producer is gone without a shutdown, the sink gets this long to take
/// the backlog; the rest stays on disk for the next boot, and the directory is released.
pub(crate) const DISCONNECT_GRACE: Duration = Duration::from_secs(1);

/// What the loop keeps between batches.
struct State {
    primary: Ledger,
    fallback: Ledger,
    /// Losses already warned about through `tracing`, and when.
    warned: Losses,
    last_warn: Option<Instant>,
    /// Whether the last lifecycle event written to the spill is in it.
    lifecycle_spilled: bool,
    /// The last durable ticket taken and not settled yet (its batch is not written).
    ticket: Option<u64>,
    /// Whether the user events of the last batch written are durable: in the sink, or synced in the spill.
    users_durable: bool,
    /// The batch being written holds durable events: with a spill, sync it now whatever the policy.
    sync_now: bool,
}

impl Worker {
    pub(crate) async fn run(mut self) {
        let mut state = State {
            primary: Ledger::new(Trail::Primary),
            fallback: Ledger::new(Trail::Fallback),
            warned: Losses::default(),
            last_warn: None,
            lifecycle_spilled: false,
            ticket: None,
            users_durable: false,
            sync_now: false,
        };
        let mut batch = Vec::with_capacity(self.config.batch_size);
        let mut requests = self.deadline.0.clone();
        let mut listening = true;
        let mut tick = after(self.config.flush_interval);
        if let Output::Spill(spill) = &mut self.output {
            let drain = spill.drain.take().expect("the drain starts once");
            spill.task = Some(tokio::spawn(drain.run()));
        }
        if let Some(boot) = self.boot.take()
            && self.write(&mut Vec::new(), None, Some((Origin::Lifecycle, boot)), Numbering::Fresh, &mut state).await
        {
            return self.shut_down(batch, state).await;
        }
        loop {
            let sync_due = self.sync_due();
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
                _ = tokio::time::sleep_until(sync_due.unwrap_or(tick)), if sync_due.is_some() => {
                    self.sync_spill().await;
                    continue;
                }
            };
            self.shared.wake_pending.store(false, std::sync::atomic::Ordering::Relaxed);
            // Full batches go out as soon as they are there; a partial one waits for the tick.
            loop {
                let (full, out_of_time) = if let Some(ahead) = self.ahead.take() {
                    // Taken during the last write: it goes out before anything else is numbered.
                    debug_assert!(batch.is_empty(), "a batch is taken ahead only while the one before is written");
                    batch = ahead.events;
                    state.ticket = ahead.ticket.or(state.ticket);
                    let out_of_time = if ahead.linked {
                        self.deliver_linked(&mut batch, &mut state).await
                    } else {
                        self.deliver(&mut batch, &mut state).await
                    };
                    (true, out_of_time)
                } else {
                    let limit = self.limit(&state);
                    let took = self.queue.take(&mut batch, limit);
                    state.ticket = took.ticket.or(state.ticket);
                    if took.disconnected {
                        return self.shut_down(batch, state).await;
                    }
                    let gap_due = state.primary.is_due(self.losses());
                    // Durable events go out at once (with whatever is waiting: group commit).
                    let due = took.full || state.ticket.is_some() || (ticked && (!batch.is_empty() || gap_due));
                    (took.full, due && self.deliver(&mut batch, &mut state).await)
                };
                // `true` when the shutdown deadline passed during the write (shutdown began meanwhile).
                if out_of_time {
                    return self.shut_down(batch, state).await;
                }
                let shutdown_asked = listening && requests.has_changed().unwrap_or(false);
                if self.ahead.is_some() {
                    // A batch taken ahead is numbered: it goes out before a checkpoint is numbered, or the
                    // shutdown begins (which then takes none ahead).
                    self.closing |= shutdown_asked;
                    continue;
                }
                // Also between full batches: under load that never drains the queue, checkpoints keep their pace.
                if self.checkpoint_if_due(&mut state).await {
                    return self.shut_down(batch, state).await;
                }
                if !full {
                    break;
                }
                // Shutdown asked for while full batches kept coming: it starts now, not once the queue is empty.
                if shutdown_asked {
                    return self.shut_down(batch, state).await;
                }
            }
            self.warn_about_losses(&mut state);
        }
    }

    /// With integrity on, writes an `audit.checkpoint` event when one is due (checked after every batch, and at
    /// every tick: a heartbeat without traffic). `true` when the shutdown deadline passed during the write.
    async fn checkpoint_if_due(&mut self, state: &mut State) -> bool {
        if !self.chain.as_ref().is_some_and(Chain::due) {
            return false;
        }
        self.write(&mut Vec::new(), None, Some((Origin::Lifecycle, Chain::checkpoint_event())), Numbering::Fresh, state)
            .await
    }

    fn losses(&self) -> Losses {
        Losses::of(&self.shared.stats()).with_pipeline(self.pipeline)
    }

    /// How many events to take: one fewer than a batch when a gap event is due, so it fits in front.
    fn limit(&self, state: &State) -> usize {
        let batch_size = self.config.batch_size;
        if batch_size > 1 && state.primary.is_due(self.losses()) { batch_size - 1 } else { batch_size }
    }

    /// Writes `batch` (with the gap event due, if any) and settles its events, durable ones included (they
    /// wake their requests). Returns `true` when the shutdown deadline passed first; the events left in
    /// `batch` are then unsettled.
    async fn deliver(&mut self, batch: &mut Vec<AuditEvent>, state: &mut State) -> bool {
        let ticket = state.ticket.take();
        (state.users_durable, state.sync_now) = (false, ticket.is_some());
        let out_of_time = match state.primary.due(self.losses()) {
            // No room in front (events taken before the losses happened): the gap event goes alone first.
            // A checkpoint the gap event makes due comes before the batch, so checkpoints keep their pace.
            Some(due) if batch.len() >= self.config.batch_size => {
                self.write(&mut Vec::new(), Some(due), None, Numbering::Fresh, state).await
                    || self.checkpoint_if_due(state).await
                    || self.write(batch, None, None, Numbering::LookAhead, state).await
            }
            due => self.write(batch, due, None, Numbering::LookAhead, state).await,
        };
        if let (Some(ticket), false) = (ticket, out_of_time) {
            self.shared.watermark.settle(ticket, state.users_durable);
        }
        out_of_time
    }

    /// [`deliver`](Self::deliver) for a batch taken ahead and linked already: no gap event goes in front of it
    /// (its events are numbered); one due now goes in front of the next batch.
    async fn deliver_linked(&mut self, batch: &mut Vec<AuditEvent>, state: &mut State) -> bool {
        let ticket = state.ticket.take();
        (state.users_durable, state.sync_now) = (false, ticket.is_some());
        let out_of_time = self.write(batch, None, None, Numbering::Linked, state).await;
        if let (Some(ticket), false) = (ticket, out_of_time) {
            self.shared.watermark.settle(ticket, state.users_durable);
        }
        out_of_time
    }

    fn sync_due(&self) -> Option<Instant> {
        match &self.output {
            Output::Spill(spill) => spill.spool.sync_due(),
            Output::Direct(_) | Output::Closed => None,
        }
    }

    async fn sync_spill(&mut self) {
        if let Output::Spill(spill) = &mut self.output {
            spill.spool.start_sync().await;
        }
    }

    /// Writes `[gap] + [lifecycle event] + events`: to the primary sink, or failing that all of it, as numbered,
    /// to the fallback, then the fallback's own gap event if one is due; or, with a spill, appends them to it. Counts what became of them. Returns `true` when the shutdown deadline passed first; the
    /// events are then unsettled.
    async fn write(
        &mut self,
        events: &mut Vec<AuditEvent>,
        gap: Option<Due>,
        lifecycle: Option<(Origin, AuditEvent)>,
        numbering: Numbering,
        state: &mut State,
    ) -> bool {
        let n = events.len() as u64;
        // Says what became of this call's events only: a lone gap event written before a batch must not vouch
        // for the batch.
        state.users_durable = false;
        let reported = gap.as_ref().map(|due| due.upto);
        let mut origins = Vec::new();
        let mut front = Vec::new();
        let lifecycle_given = lifecycle.is_some();
        if let Some(due) = gap {
            front.push(due.event);
            origins.push(Origin::Gap);
        }
        if let Some((origin, event)) = lifecycle {
            front.push(event);
            origins.push(origin);
        }
        events.splice(0..0, front);
        if numbering != Numbering::Linked {
            for event in events.iter_mut() {
                self.stamper.stamp(event);
                if let Some(chain) = &mut self.chain {
                    chain.link(event);
                }
            }
        }
        // Only with integrity on: the losses are read for it alone.
        let look_ahead = numbering != Numbering::Fresh && self.chain.is_some() && !state.primary.is_due(self.losses());
        let counters = &self.shared.counters;
        let sinks = match &mut self.output {
            Output::Spill(spill) => {
                let (meta, lifecycle) = (origins.len(), lifecycle_given);
                let (appended, error) = match spill.spool.append(events, &origins).await {
                    Ok(appended) => appended,
                    Err(error) => (vec![false; events.len()], Some(error)),
                };
                add(&counters.spilled, appended.iter().filter(|a| **a).count() as u64);
                self.pipeline.lost += appended[..meta].iter().filter(|a| !**a).count() as u64;
                let users = appended[meta..].iter().filter(|a| **a).count() as u64;
                if let Some(error) = &error {
                    tracing::error!(%error, events = n - users, "cannot append to the audit spill; events lost");
                    add(&counters.lost, n - users);
                } else if users < n {
                    tracing::error!(events = n - users, "the audit spill is full (max_bytes); events dropped");
                    add(&counters.spill_full, n - users);
                }
                if let (Some(upto), Some(true)) = (reported, appended.first()) {
                    state.primary.written(upto);
                }
                state.lifecycle_spilled = lifecycle && appended.get(meta - 1).copied().unwrap_or(false);
                state.users_durable = users == n && error.is_none();
                self.shared.recycled.recycle(events);
                if state.sync_now && state.users_durable {
                    // Durable events: synced before their requests are released, whatever the sync policy.
                    if let Err(error) = spill.spool.sync_for_durable().await {
                        tracing::error!(%error, "cannot sync the audit spill; durable requests are answered 503");
                        state.users_durable = false;
                    }
                }
                return false;
            }
            Output::Direct(sinks) => sinks,
            Output::Closed => unreachable!("nothing is written after shutdown"),
        };
        let meta = origins.len() as u64;
        // With integrity on, the next full batch is linked on another thread while the sink writes this one.
        let ahead = match &self.chain {
            Some(chain) if look_ahead && !self.closing && self.ahead.is_none() && !chain.due() => {
                self.queue.take_full(self.config.batch_size).map(|(mut next, ticket)| {
                    let before = self.stamper.seq();
                    next.iter_mut().for_each(|event| self.stamper.stamp(event));
                    let head = chain.head();
                    (before, ticket, tokio::task::spawn_blocking(move || LinkedAhead::link(head, next)))
                })
            }
            _ => None,
        };
        let primary = sinks.primary(events, &self.deadline, counters).await;
        if let Some((before, ticket, linking)) = ahead {
            self.ahead = match linking.await {
                Ok(linked) if primary == Written::Yes => {
                    let chain = self.chain.as_mut().expect("a batch is linked ahead only with integrity on");
                    Some(Ahead { events: chain.advance(linked), ticket, linked: true })
                }
                // Not written: what is due after this batch (a gap event, the fallback's) is numbered right after
                // it, and the batch taken ahead anew after that.
                Ok(linked) => {
                    self.stamper.rewind(before);
                    Some(Ahead { events: linked.events, ticket, linked: false })
                }
                // Only when the runtime is shutting down (the blocking pool refuses the task): the events are
                // counted as abandoned when the worker ends.
                Err(error) => {
                    tracing::error!(%error, "cannot link a batch ahead; its events are abandoned");
                    self.stamper.rewind(before);
                    None
                }
            };
        }
        match primary {
            Written::Yes => {
                state.users_durable = true;
                add(&counters.written, n);
                add(&counters.batches, 1);
                if let Some(upto) = reported {
                    add(&counters.gap_events, 1);
                    state.primary.written(upto);
                }
            }
            Written::Deadline => return true,
            Written::Failed => {
                // The batch goes to the fallback as numbered, the primary's gap event and the lifecycle event
                // included: they hold seqs of the chain, and the primary's next gap event declares them.
                let fell_back = sinks.fallback(events, &self.deadline, counters).await;
                match fell_back {
                    Written::Yes => {
                        state.users_durable = true;
                        add(&counters.fallback_written, n);
                        self.pipeline.in_fallback += meta;
                    }
                    Written::Failed => {
                        add(&counters.lost, n);
                        self.pipeline.lost += meta;
                    }
                    Written::Deadline => return true,
                }
                // Then the fallback's own gap event: numbered after the batch, so written after it (and only when
                // the fallback took the batch: one that just failed is not called again at once; nor after the
                // shutdown event, which ends the boot's chain).
                if fell_back == Written::Yes
                    && events.last().is_none_or(|e| e.kind != kind::AUDIT_SHUTDOWN)
                    && let Some(mut due) =
                        state.fallback.due(Losses::of(&self.shared.stats()).with_pipeline(self.pipeline))
                {
                    self.stamper.stamp(&mut due.event);
                    if let Some(chain) = &mut self.chain {
                        chain.link(&mut due.event);
                    }
                    match sinks.fallback(std::slice::from_ref(&due.event), &self.deadline, counters).await {
                        Written::Yes => {
                            add(&counters.gap_events, 1);
                            state.fallback.written(due.upto);
                            self.pipeline.in_fallback += 1;
                        }
                        Written::Failed => self.pipeline.lost += 1,
                        Written::Deadline => return true,
                    }
                }
            }
        }
        self.shared.recycled.recycle(events);
        false
    }

    fn warn_about_losses(&self, state: &mut State) {
        let now = self.losses();
        let new = now.since(state.warned);
        if new.missing() == 0 || state.last_warn.is_some_and(|t| t.elapsed() < self.config.warn_interval) {
            return;
        }
        let by_reason: Vec<String> =
            new.by_reason().iter().filter(|(_, n)| *n > 0).map(|(reason, n)| format!("{reason}={n}")).collect();
        tracing::warn!(
            lost = new.missing(),
            by_reason = %by_reason.join(" "),
            "audit events were lost (or written to the fallback sink) since the last report"
        );
        state.warned = now;
        state.last_warn = Some(Instant::now());
    }

    /// Intake is closed at once (by the handle, or here); what was queued is drained until the deadline (into
    /// the spill, if there is one), the trail is told about
    /// the losses and given the `audit.shutdown` event, the sinks flushed, and the report published. Nothing
    /// is attempted at a sink after the deadline; what it catches is `abandoned` (or, with a spill,
    /// `left_in_spill`).
    async fn shut_down(mut self, mut batch: Vec<AuditEvent>, mut state: State) {
        if let Some(ahead) = self.ahead.take() {
            // Taken ahead and not written (the deadline passed while the batch before it was written): they go
            // out after what is left of that one, numbered anew.
            debug_assert!(!ahead.linked, "a linked batch goes out before the worker does anything else");
            state.ticket = ahead.ticket.or(state.ticket);
            batch.extend(ahead.events);
        }
        self.closing = true;
        self.shared.close();
        self.queue.quiesce().await;
        let mut out_of_time = false;
        loop {
            if self.deadline.passed() {
                out_of_time = true;
                break;
            }
            let limit = self.limit(&state);
            state.ticket = self.queue.take(&mut batch, limit).ticket.or(state.ticket);
            if batch.is_empty() {
                break;
            }
            if self.deliver(&mut batch, &mut state).await {
                out_of_time = true;
                break;
            }
        }
        drop(batch);
        let flushed = match &self.output {
            Output::Direct(_) => !out_of_time && self.end_direct(&mut state).await,
            Output::Spill(_) => self.end_spill(&mut state).await,
            Output::Closed => false,
        };
        // The spill's directory is free for another pipeline once the report says the shutdown is over.
        self.output = Output::Closed;
        if let Some(chain) = self.chain.take() {
            // The checkpoint sink gets the shutdown's checkpoint before the report says the shutdown is over.
            chain.finish(self.deadline.get()).await;
        }
        self.queue.settle_rest();
        state.last_warn = None;
        self.warn_about_losses(&mut state);
        let stats = self.shared.stats();
        let report = ShutdownReport {
            stats,
            drained: stats.abandoned == 0 && stats.left_in_spill == 0 && flushed,
            unreported: state.primary.unreported(Losses::of(&stats).with_pipeline(self.pipeline)),
        };
        tracing::info!(%stats, drained = report.drained, unreported = report.unreported, "audit pipeline shut down");
        self.report.send_replace(Some(report));
    }

    /// The last batch (the gap event due, and `audit.shutdown`), then a flush. Whether all of it succeeded.
    async fn end_direct(&mut self, state: &mut State) -> bool {
        let due = state.primary.last(self.losses());
        let last = shutdown_event(&self.shared.stats());
        if self.write_last(due, last, state).await {
            return false;
        }
        let Output::Direct(sinks) = &self.output else { unreachable!("end_direct without a spill") };
        sinks.flush(&self.deadline, &self.shared.counters).await
    }

    /// The last batch: the gap event due and `audit.shutdown`, in one batch unless `batch_size` is 1.
    async fn write_last(&mut self, due: Option<Due>, shutdown: AuditEvent, state: &mut State) -> bool {
        let last = Some((Origin::Lifecycle, shutdown));
        if due.is_some() && self.config.batch_size < 2 {
            return self.write(&mut Vec::new(), due, None, Numbering::Fresh, state).await
                || self.write(&mut Vec::new(), None, last, Numbering::Fresh, state).await;
        }
        self.write(&mut Vec::new(), due, last, Numbering::Fresh, state).await
    }

    /// Lets the drain catch up (until the deadline), appends the gap event due and `audit.shutdown` (its counts
    /// as of then, what is still in the spill as `left_in_spill`), syncs, marks the boot clean, and lets the
    /// drain deliver that too if there is time. Whether the drain ended with the sink flushed.
    async fn end_spill(&mut self, state: &mut State) -> bool {
        let Output::Spill(spill) = &mut self.output else { unreachable!("end_spill with a spill") };
        spill.deadline.send_replace(Some(self.deadline.get().unwrap_or_else(|| after(DISCONNECT_GRACE))));
        let deadline = Deadline(spill.deadline.subscribe());
        let end = spill.spool.end().await;
        let mut delivered = spill.delivered.clone();
        let _ = deadline.within(None, delivered.wait_for(|d| *d >= end)).await;
        let mut stats = self.shared.stats();
        let left = spill.spool.progress.in_spill.load(std::sync::atomic::Ordering::SeqCst);
        stats.left_in_spill += left;
        stats.queued = stats.queued.saturating_sub(left);
        let due = state.primary.last(Losses::of(&stats).with_pipeline(self.pipeline));
        self.write_last(due, shutdown_event(&stats), state).await;
        let Output::Spill(spill) = &mut self.output else { unreachable!("end_spill with a spill") };
        if let Err(error) = spill.spool.sync().await {
            tracing::error!(%error, "cannot sync the audit spill at shutdown");
        } else if !state.lifecycle_spilled {
            tracing::error!(
                "the audit.shutdown event did not reach the spill; the next boot will say this one crashed"
            );
        } else if let Err(error) = spill.spool.mark_clean().await {
            tracing::error!(%error, "cannot record the clean shutdown in the audit spill");
        }
        spill.finish.send_replace(Some(spill.spool.end().await));
        let drained = match spill.task.take() {
            Some(task) => task.await.ok(),
            None => None,
        };
        let left = spill.spool.progress.in_spill.swap(0, std::sync::atomic::Ordering::SeqCst);
        add(&self.shared.counters.left_in_spill, left);
        drained.is_some_and(|d| d.complete)
    }
}

/// The worker's end of the queue.
pub(crate) struct Queue {
    pub(crate) shared: Arc<Shared>,
    /// With a spill: what is in it is not abandoned when the worker ends, but left for the next boot.
    pub(crate) spilled: Option<Arc<Progress>>,
}

/// What one `take` saw.
pub(crate) struct Took {
    full: bool,
    /// The last durable ticket taken.
    ticket: Option<u64>,
    /// Every producer is gone and the queue is empty.
    disconnected: bool,
}

impl Queue {
    /// Moves events into `batch` until it holds `limit`, without waiting.
    fn take(&mut self, batch: &mut Vec<AuditEvent>, limit: usize) -> Took {
        let taken = self.shared.backlog.take(batch, limit);
        if taken.events > 0 {
            self.shared.gate.taken(taken.events, taken.bytes);
            self.shared.room.notify_waiters();
        }
        Took { full: batch.len() >= limit, ticket: taken.ticket, disconnected: taken.disconnected }
    }

    /// A whole batch of `limit` events, if one is waiting (and its last durable ticket); nothing otherwise.
    fn take_full(&mut self, limit: usize) -> Option<(Vec<AuditEvent>, Option<u64>)> {
        if !self.shared.backlog.has_full_batch() {
            return None;
        }
        let mut batch = Vec::with_capacity(limit);
        let took = self.take(&mut batch, limit);
        Some((batch, took.ticket))
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
        let (rest, taken) = self.shared.backlog.close();
        self.shared.gate.taken(taken.events, taken.bytes);
        drop(rest);
        if let Some(progress) = &self.spilled {
            add(&self.shared.counters.left_in_spill, progress.in_spill.swap(0, std::sync::atomic::Ordering::SeqCst));
        }
        add(&self.shared.counters.abandoned, self.shared.stats().queued);
        // Durable events not settled by now never will be: their requests are answered 503 at once.
        self.shared.watermark.close();
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        self.settle_rest();
    }
}
