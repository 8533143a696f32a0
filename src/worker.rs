//! The background task: batches events from the channel into the sink, retries, falls back, reports losses.

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use pin_project_lite::pin_project;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::Retry;
use crate::event::{AuditEvent, Outcome, kind};
use crate::handle::ShutdownReport;
use crate::pipeline::{Shared, Stats, add};
use crate::sink::DynSink;

pub(crate) struct WorkerConfig {
    pub(crate) batch_size: usize,
    pub(crate) flush_interval: Duration,
    pub(crate) retry: Retry,
    pub(crate) sink_timeout: Duration,
    pub(crate) warn_interval: Duration,
}

pub(crate) struct Worker {
    pub(crate) rx: mpsc::Receiver<AuditEvent>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) sink: Box<dyn DynSink>,
    pub(crate) fallback: Option<Box<dyn DynSink>>,
    pub(crate) config: WorkerConfig,
    /// The shutdown deadline, once a handle asked for shutdown.
    pub(crate) deadline: watch::Receiver<Option<Instant>>,
    pub(crate) report: watch::Sender<Option<ShutdownReport>>,
}

/// Losses by reason, as written into `audit.gap` events.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Losses {
    queue_full: u64,
    wait_timeout: u64,
    refused: u64,
    sink_failed: u64,
}

impl Losses {
    fn now(stats: &Stats) -> Self {
        Losses {
            queue_full: stats.dropped_queue_full,
            wait_timeout: stats.dropped_wait_timeout,
            refused: stats.refused,
            sink_failed: stats.failed,
        }
    }

    fn since(self, earlier: Losses) -> Self {
        Losses {
            queue_full: self.queue_full - earlier.queue_full,
            wait_timeout: self.wait_timeout - earlier.wait_timeout,
            refused: self.refused - earlier.refused,
            sink_failed: self.sink_failed - earlier.sink_failed,
        }
    }

    fn total(self) -> u64 {
        self.queue_full + self.wait_timeout + self.refused + self.sink_failed
    }
}

enum Failure {
    Sink(crate::SinkError),
    Timeout,
    Panic(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Sink(e) => write!(f, "{e}"),
            Failure::Timeout => f.write_str("timed out"),
            Failure::Panic(msg) => write!(f, "panicked: {msg}"),
        }
    }
}

/// State the loop keeps between batches.
struct Progress {
    seq: u64,
    /// Losses already written into the trail by a gap event.
    reported: Losses,
    /// Losses already warned about through `tracing`, and when.
    warned: Losses,
    last_warn: Option<Instant>,
}

impl Worker {
    pub(crate) async fn run(mut self) {
        let mut batch = Vec::with_capacity(self.config.batch_size);
        let mut progress = Progress { seq: 0, reported: Losses::default(), warned: Losses::default(), last_warn: None };
        let mut requests = self.deadline.clone();
        let mut listening = true;
        let mut tick = Instant::now() + self.config.flush_interval;
        loop {
            let ticked = tokio::select! {
                biased;
                changed = requests.changed(), if listening => {
                    match changed {
                        Ok(()) => return self.shut_down(batch, progress).await,
                        // Every handle is gone; the worker now ends when every producer is gone.
                        Err(_) => listening = false,
                    }
                    continue;
                }
                _ = self.shared.wake.notified() => false,
                _ = tokio::time::sleep_until(tick) => {
                    tick = Instant::now() + self.config.flush_interval;
                    true
                }
            };
            self.shared.wake_pending.store(false, Relaxed);
            // Full batches go out as soon as they are there; a partial one waits for the tick.
            loop {
                let (full, disconnected) = self.take(&mut batch);
                if disconnected {
                    return self.shut_down(batch, progress).await;
                }
                if full || (ticked && (!batch.is_empty() || self.losses_to_report(&progress))) {
                    self.deliver(&mut batch, &mut progress).await;
                }
                if !full {
                    break;
                }
            }
            self.warn_about_losses(&mut progress);
        }
    }

    /// Takes up to a batch's worth without waiting. Returns whether the batch is full and whether every
    /// producer is gone and the queue is empty.
    fn take(&mut self, batch: &mut Vec<AuditEvent>) -> (bool, bool) {
        while batch.len() < self.config.batch_size {
            match self.rx.try_recv() {
                Ok(event) => {
                    add(&self.shared.counters.taken, 1);
                    batch.push(event);
                }
                Err(mpsc::error::TryRecvError::Empty) => return (false, false),
                Err(mpsc::error::TryRecvError::Disconnected) => return (false, true),
            }
        }
        (true, false)
    }

    fn stats(&self) -> Stats {
        self.shared.counters.snapshot(0)
    }

    fn losses_to_report(&self, progress: &Progress) -> bool {
        Losses::now(&self.stats()) != progress.reported
    }

    /// Writes `batch` (preceded by an `audit.gap` event when events were lost since the last one) to the sink,
    /// retrying with backoff, then to the fallback. Leaves `batch` empty.
    async fn deliver(&mut self, batch: &mut Vec<AuditEvent>, progress: &mut Progress) {
        let losses = Losses::now(&self.stats());
        let lost = losses.since(progress.reported);
        if lost.total() > 0 {
            batch.insert(0, gap_event(lost));
        }
        for event in batch.iter_mut() {
            progress.seq += 1;
            event.seq = progress.seq;
            event.id = new_id(event.time);
        }
        let counters = &self.shared.counters;
        let mut attempt = 0;
        loop {
            match self.attempt(self.sink.write_batch(batch)).await {
                Ok(()) => {
                    add(&counters.written, batch.len() as u64);
                    add(&counters.batches, 1);
                    if lost.total() > 0 {
                        add(&counters.gap_events, 1);
                        progress.reported = losses;
                    }
                    break;
                }
                Err(failure) => {
                    let delay = self.config.retry.delay(attempt + 1);
                    let deadline = *self.deadline.borrow();
                    let out_of_time = deadline.is_some_and(|d| Instant::now() + delay >= d);
                    if attempt >= self.config.retry.max_retries || out_of_time {
                        tracing::error!(
                            events = batch.len(),
                            attempts = attempt + 1,
                            error = %failure,
                            "audit sink failed to write a batch; handing it to the fallback sink"
                        );
                        add(&counters.failed, batch.len() as u64);
                        self.fall_back(batch).await;
                        break;
                    }
                    tracing::warn!(
                        events = batch.len(),
                        attempt = attempt + 1,
                        retry_in_ms = delay.as_millis() as u64,
                        error = %failure,
                        "audit sink failed to write a batch; retrying"
                    );
                    add(&counters.retries, 1);
                    attempt += 1;
                    // A shutdown deadline that falls inside the wait cuts it short (and ends the retries).
                    if within(&self.deadline, None, tokio::time::sleep(delay)).await.is_none() {
                        add(&counters.failed, batch.len() as u64);
                        self.fall_back(batch).await;
                        break;
                    }
                }
            }
        }
        batch.clear();
    }

    async fn fall_back(&self, batch: &[AuditEvent]) {
        let counters = &self.shared.counters;
        let Some(fallback) = &self.fallback else {
            add(&counters.fallback_failed, batch.len() as u64);
            return;
        };
        match self.attempt(fallback.write_batch(batch)).await {
            Ok(()) => add(&counters.fallback_written, batch.len() as u64),
            Err(failure) => {
                tracing::error!(events = batch.len(), error = %failure, "audit fallback sink failed too; events lost");
                add(&counters.fallback_failed, batch.len() as u64);
            }
        }
    }

    /// One sink call, bounded by the sink timeout and the shutdown deadline, with a panic turned into a
    /// counted failure.
    async fn attempt<F>(&self, write: F) -> Result<(), Failure>
    where
        F: Future<Output = Result<(), crate::SinkError>>,
    {
        match within(&self.deadline, Some(self.config.sink_timeout), CatchUnwind { inner: write }).await {
            Some(Ok(Ok(()))) => Ok(()),
            Some(Ok(Err(e))) => Err(Failure::Sink(e)),
            Some(Err(panic)) => {
                add(&self.shared.counters.sink_panics, 1);
                Err(Failure::Panic(panic_message(&*panic)))
            }
            None => {
                add(&self.shared.counters.sink_timeouts, 1);
                Err(Failure::Timeout)
            }
        }
    }

    fn warn_about_losses(&self, progress: &mut Progress) {
        let now_losses = Losses::now(&self.stats());
        let new = now_losses.since(progress.warned);
        if new.total() == 0 || progress.last_warn.is_some_and(|t| t.elapsed() < self.config.warn_interval) {
            return;
        }
        tracing::warn!(
            lost = new.total(),
            queue_full = new.queue_full,
            wait_timeout = new.wait_timeout,
            refused = new.refused,
            sink_failed = new.sink_failed,
            "audit events were lost since the last report"
        );
        progress.warned = now_losses;
        progress.last_warn = Some(Instant::now());
    }

    /// Closes intake, drains every queued event (until the shutdown deadline, if one was given), flushes, and
    /// publishes the report.
    async fn shut_down(mut self, mut batch: Vec<AuditEvent>, mut progress: Progress) {
        self.rx.close();
        let mut drained = true;
        loop {
            if batch.len() < self.config.batch_size {
                let limit = self.config.batch_size - batch.len();
                let received = within(&self.deadline, None, self.rx.recv_many(&mut batch, limit)).await;
                match received {
                    Some(0) if batch.is_empty() => break,
                    Some(n) => add(&self.shared.counters.taken, n as u64),
                    None => {
                        drained = false;
                        break;
                    }
                }
            }
            if self.deadline.borrow().is_some_and(|d| Instant::now() >= d) {
                drained = false;
                break;
            }
            self.deliver(&mut batch, &mut progress).await;
        }
        if drained && self.losses_to_report(&progress) {
            self.deliver(&mut batch, &mut progress).await;
        }
        let left_in_queue = self.rx.len() as u64;
        let abandoned = batch.len() as u64 + left_in_queue;
        add(&self.shared.counters.abandoned, abandoned);
        // Counted as taken so that `enqueued` (taken + waiting) stays whole once the queue is gone.
        add(&self.shared.counters.taken, left_in_queue);
        let mut flushed = true;
        for sink in std::iter::once(&self.sink).chain(self.fallback.as_ref()) {
            if let Err(failure) = self.attempt(sink.flush()).await {
                tracing::error!(error = %failure, "audit sink failed to flush at shutdown");
                flushed = false;
            }
        }
        self.warn_about_losses(&mut Progress { last_warn: None, ..progress });
        let stats = self.shared.counters.snapshot(0);
        let report = ShutdownReport { stats, drained: drained && flushed && abandoned == 0 };
        tracing::info!(
            written = stats.written,
            dropped = stats.dropped(),
            failed = stats.failed,
            drained = report.drained,
            "audit pipeline shut down"
        );
        self.report.send_replace(Some(report));
    }
}

fn gap_event(lost: Losses) -> AuditEvent {
    let mut event = AuditEvent::with_time(kind::AUDIT_GAP.into(), SystemTime::now()).outcome(Outcome::Error);
    event.attributes.insert("lost".into(), lost.total().to_string());
    for (reason, n) in [
        ("queue_full", lost.queue_full),
        ("wait_timeout", lost.wait_timeout),
        ("refused", lost.refused),
        ("sink_failed", lost.sink_failed),
    ] {
        if n > 0 {
            event.attributes.insert(reason.into(), n.to_string());
        }
    }
    event
}

/// A UUIDv7 from the event's time and random bits (made here on the worker, never on the request path).
fn new_id(time: SystemTime) -> uuid::Uuid {
    let millis = time.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let random: [u8; 16] = fastrand::u128(..).to_le_bytes();
    let mut bytes = [0u8; 10];
    bytes.copy_from_slice(&random[..10]);
    uuid::Builder::from_unix_timestamp_millis(millis, &bytes).into_uuid()
}

/// Runs `future` until it completes (`Some`), or until `limit` or the shutdown deadline passes (`None`).
/// A deadline set while it runs is obeyed too.
async fn within<F: Future>(
    deadline: &watch::Receiver<Option<Instant>>,
    limit: Option<Duration>,
    future: F,
) -> Option<F::Output> {
    let mut deadline = deadline.clone();
    let until = limit.map(|limit| Instant::now() + limit);
    tokio::pin!(future);
    loop {
        let end = match (until, *deadline.borrow_and_update()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let expired = async {
            match end {
                Some(end) => tokio::time::sleep_until(end).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            output = &mut future => return Some(output),
            () = expired => return None,
            Ok(()) = deadline.changed() => {}
        }
    }
}

fn panic_message(panic: &(dyn Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-string panic payload".to_owned())
}

pin_project! {
    struct CatchUnwind<F> {
        #[pin]
        inner: F,
    }
}

impl<F: Future> Future for CatchUnwind<F> {
    type Output = Result<F::Output, Box<dyn Any + Send>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = self.project().inner;
        match std::panic::catch_unwind(AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(output)) => Poll::Ready(Ok(output)),
            Err(panic) => Poll::Ready(Err(panic)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gap_event_names_each_reason_that_lost_events() {
        let event = gap_event(Losses { queue_full: 3, wait_timeout: 0, refused: 2, sink_failed: 0 });
        assert_eq!(event.kind, kind::AUDIT_GAP);
        assert_eq!(event.attributes.get("lost").map(String::as_str), Some("5"));
        assert_eq!(event.attributes.get("queue_full").map(String::as_str), Some("3"));
        assert_eq!(event.attributes.get("refused").map(String::as_str), Some("2"));
        assert!(!event.attributes.contains_key("wait_timeout"));
    }

    #[test]
    fn ids_are_version_7_and_ordered_by_time() {
        let early = new_id(SystemTime::UNIX_EPOCH + Duration::from_secs(1_000));
        let late = new_id(SystemTime::UNIX_EPOCH + Duration::from_secs(2_000));
        assert_eq!(early.get_version_num(), 7);
        assert!(early < late);
    }
}
