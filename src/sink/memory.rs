use std::fmt;
use std::sync::Arc;

use tokio::sync::watch;

use crate::error::SinkError;
use crate::event::AuditEvent;
use crate::sink::AuditSink;

/// Keeps events in memory: for tests, and for looking at what a pipeline writes.
///
/// Clones share the same events.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use std::time::Duration;
/// use tower_audit::{AuditEvent, AuditLayer, MemorySink};
///
/// let sink = MemorySink::new();
/// let (_layer, handle) = AuditLayer::builder(sink.clone()).build().unwrap();
/// handle.record(AuditEvent::new("user.created").actor("alice"));
/// handle.shutdown(Duration::from_secs(5)).await;
/// let events = sink.events();
/// assert_eq!(events.len(), 3, "audit.boot, the event, audit.shutdown");
/// assert_eq!(events[1].actor.as_deref(), Some("alice"));
/// # }
/// ```
#[derive(Clone)]
pub struct MemorySink {
    events: Arc<watch::Sender<Vec<AuditEvent>>>,
}

impl MemorySink {
    /// An empty sink.
    pub fn new() -> Self {
        Self { events: Arc::new(watch::Sender::new(Vec::new())) }
    }

    /// A copy of every event written so far, in write order.
    pub fn events(&self) -> Vec<AuditEvent> {
        self.events.borrow().clone()
    }

    /// How many events were written so far.
    pub fn len(&self) -> usize {
        self.events.borrow().len()
    }

    /// Whether nothing was written yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waits until at least `n` events were written. Wrap it in `tokio::time::timeout` to bound the wait.
    pub async fn wait_for(&self, n: usize) {
        let mut rx = self.events.subscribe();
        // The sender lives in `self`, so the channel cannot close while we wait.
        let _ = rx.wait_for(|events| events.len() >= n).await;
    }
}

impl Default for MemorySink {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for MemorySink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemorySink").field("len", &self.len()).finish()
    }
}

impl AuditSink for MemorySink {
    async fn write_batch(&self, batch: &[AuditEvent]) -> Result<(), SinkError> {
        self.events.send_modify(|events| events.extend_from_slice(batch));
        Ok(())
    }
}
