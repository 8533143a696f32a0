//! The handle returned with the layer: counters, custom events, shutdown.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use uuid::Uuid;

use crate::event::AuditEvent;
use crate::pipeline::Core;
use crate::stats::Stats;

/// Controls a pipeline: read its counters, record events outside a request, shut it down.
///
/// Clones control the same pipeline. The pipeline's worker ends after draining the queue when every
/// [`AuditLayer`](crate::AuditLayer), service, [`AuditContext`](crate::AuditContext) and handle is dropped, or
/// when [`shutdown`](Self::shutdown) is called.
#[derive(Clone)]
pub struct AuditHandle {
    core: Arc<Core>,
    control: Arc<Control>,
}

struct Control {
    deadline: watch::Sender<Option<Instant>>,
    grace: Duration,
    report: watch::Receiver<Option<ShutdownReport>>,
    instance: Arc<str>,
    boot: Uuid,
}

const REPORT_GRACE: Duration = Duration::from_millis(100);
/// With a spill, the worker's last steps after the deadline are local disk work (appending `audit.shutdown`, an
/// fsync, the boot file, the ledger), which a busy disk can stretch: it gets this long to report and release the
/// directory.
const SPILL_REPORT_GRACE: Duration = Duration::from_secs(2);

/// What happened to every event, once a pipeline is shut down.
///
/// Its `stats` keep [the accounting identity](Stats#the-accounting-identity) with `queued == 0`: every event
/// offered is written, in the fallback, lost, abandoned, dropped or refused. [`Stats::missing`] says plainly how
/// many reached no trail; `Display` prints it all on one line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct ShutdownReport {
    /// The final counters.
    pub stats: Stats,
    /// `true` when the queue was emptied before the deadline (nothing `abandoned`), the sink took everything in
    /// the spill if there is one (nothing `left_in_spill`), and the sinks were flushed.
    /// It says nothing about events dropped or lost earlier: see [`Stats::missing`].
    pub drained: bool,
    /// Events missing from the primary trail (dropped, lost, abandoned, or written to the fallback instead)
    /// that no `audit.gap` event in the primary trail reports: because the last one could not be written (the
    /// primary sink was down), the deadline came first, or the loss came after the last gap event was written
    /// (events `dropped_closed` while the pipeline shut down, or `abandoned` at the deadline). Zero means the
    /// primary trail accounts for every loss itself. It counts the application's events; the pipeline's own
    /// (boot, gap, checkpoint, shutdown) missing from the trail are declared by gap events as `pipeline_lost`
    /// and `pipeline_in_fallback`, and not counted here.
    pub unreported: u64,
}

impl fmt::Display for ShutdownReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}; {} missing from every trail; {}; {} losses not reported in the primary trail",
            self.stats,
            self.stats.missing(),
            if self.drained { "drained" } else { "NOT drained" },
            self.unreported
        )
    }
}

impl AuditHandle {
    pub(crate) fn new(
        core: Arc<Core>,
        deadline: watch::Sender<Option<Instant>>,
        report: watch::Receiver<Option<ShutdownReport>>,
        instance: Arc<str>,
        boot: Uuid,
        spill: bool,
    ) -> Self {
        let grace = if spill { SPILL_REPORT_GRACE } else { REPORT_GRACE };
        Self { core, control: Arc::new(Control { deadline, grace, report, instance, boot }) }
    }

    /// The name of this process in the trail, on every event the pipeline writes
    /// ([`AuditEvent::instance`]): as given to [`AuditLayerBuilder::instance`](crate::AuditLayerBuilder::instance),
    /// or the per-process default.
    pub fn instance(&self) -> &str {
        &self.control.instance
    }

    /// This pipeline run's id, on every event it writes ([`AuditEvent::boot`]): a UUIDv7 made when the layer was
    /// built, so each build gets its own, and boots sort by when they began. Its events are numbered from 1
    /// ([`AuditEvent::seq`]); `(boot, seq)` names one event.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use std::time::Duration;
    /// use tower_audit::{AuditEvent, AuditLayer, MemorySink};
    ///
    /// let sink = MemorySink::new();
    /// let (_layer, handle) = AuditLayer::builder(sink.clone()).build()?;
    /// handle.record(AuditEvent::new("config.reloaded"));
    /// handle.shutdown(Duration::from_secs(5)).await;
    /// let events = sink.events(); // audit.boot, config.reloaded, audit.shutdown
    /// let event = &events[1];
    /// assert_eq!((event.boot, event.seq), (Some(handle.boot()), 2));
    /// assert_eq!(event.instance.as_deref(), Some(handle.instance()));
    /// # Ok(())
    /// # }
    /// ```
    pub fn boot(&self) -> Uuid {
        self.control.boot
    }

    /// A snapshot of the pipeline's counters.
    pub fn stats(&self) -> Stats {
        self.core.stats()
    }

    /// Queues a custom event without waiting (fields are bounded and sanitised as for request events).
    ///
    /// Returns `false` when the queue is full or the pipeline is shut down; the drop is counted.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// use tower_audit::{AuditEvent, AuditLayer, MemorySink};
    /// let (_layer, handle) = AuditLayer::builder(MemorySink::new()).build().unwrap();
    /// assert!(handle.record(AuditEvent::new("config.reloaded").actor("ops")));
    /// # }
    /// ```
    pub fn record(&self, event: AuditEvent) -> bool {
        self.core.record(event)
    }

    /// Closes intake at once, drains what was queued into the sinks, flushes them, and reports what happened.
    ///
    /// From this call on, new events are dropped and counted as `dropped_closed` (and requests under
    /// [`Overflow::FailClosed`](crate::Overflow::FailClosed) are refused); that includes the events of requests
    /// still in flight, so stop the server gracefully first. A steady stream of producers cannot delay it: it
    /// returns as soon as what was queued at the call is written. Nothing is attempted after the deadline, the
    /// fallback sink included; what it catches is counted as `abandoned` and the report says `drained: false`.
    /// It returns by the deadline plus a short grace for the worker to report (100 ms; 2 s with a spill, whose
    /// last steps are local disk writes that release its directory).
    /// Calling it again (from any clone, at once or later) returns the same report: a later call keeps the first
    /// call's deadline, whatever its own `timeout`.
    pub async fn shutdown(&self, timeout: Duration) -> ShutdownReport {
        let deadline = crate::call::after(timeout);
        self.core.shared.close();
        // The first call sets the deadline; later calls wait for the same report.
        self.control.deadline.send_if_modified(|current| current.is_none() && current.insert(deadline) == &deadline);
        // A later call waits for the first call's deadline, so that every call returns the same report.
        let deadline = self.control.deadline.borrow().unwrap_or(deadline);
        let mut report = self.control.report.clone();
        // The worker obeys the deadline itself; the grace covers its last bookkeeping after it.
        match tokio::time::timeout_at(deadline + self.control.grace, report.wait_for(Option::is_some)).await {
            Ok(Ok(report)) => report.expect("waited for Some"),
            // The worker is gone without a report (its task was aborted) or missed the deadline.
            _ => {
                let stats = self.stats();
                ShutdownReport { stats, drained: false, unreported: stats.missing() + stats.queued }
            }
        }
    }
}

impl fmt::Debug for AuditHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditHandle")
            .field("instance", &self.instance())
            .field("boot", &self.boot())
            .field("stats", &self.stats())
            .finish()
    }
}
