//! The handle returned with the layer: counters, custom events, shutdown.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::event::AuditEvent;
use crate::pipeline::{Core, Stats};

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
    report: watch::Receiver<Option<ShutdownReport>>,
}

const REPORT_GRACE: Duration = Duration::from_millis(100);

/// What happened to every event, once a pipeline is shut down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct ShutdownReport {
    /// The final counters.
    pub stats: Stats,
    /// `true` when every queued event was handed to a sink and the sinks were flushed before the deadline.
    pub drained: bool,
}

impl AuditHandle {
    pub(crate) fn new(
        core: Arc<Core>,
        deadline: watch::Sender<Option<Instant>>,
        report: watch::Receiver<Option<ShutdownReport>>,
    ) -> Self {
        Self { core, control: Arc::new(Control { deadline, report }) }
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

    /// Closes intake, drains every queued event into the sink, flushes it, and reports what happened.
    ///
    /// Events produced after this call are dropped and counted as `dropped_closed`. Retries stop at the
    /// deadline; what is still queued then is counted as `abandoned` and the report says `drained: false`.
    /// Calling it again (from any clone) returns the same report.
    pub async fn shutdown(&self, timeout: Duration) -> ShutdownReport {
        let deadline = Instant::now() + timeout;
        // The first call sets the deadline; later calls wait for the same report.
        self.control.deadline.send_if_modified(|current| current.is_none() && current.insert(deadline) == &deadline);
        let mut report = self.control.report.clone();
        // The worker obeys the deadline itself; the grace covers its last bookkeeping after it.
        match tokio::time::timeout_at(deadline + REPORT_GRACE, report.wait_for(Option::is_some)).await {
            Ok(Ok(report)) => report.expect("waited for Some"),
            // The worker is gone without a report (its task was aborted) or missed the deadline.
            _ => ShutdownReport { stats: self.stats(), drained: false },
        }
    }
}

impl fmt::Debug for AuditHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditHandle").field("stats", &self.stats()).finish()
    }
}
