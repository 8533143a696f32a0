//! Shared by the benchmarks.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tower_audit::{AuditEvent, AuditSink, SinkError};

/// Counts the events it is given and discards them: the pipeline's cost without any sink's.
#[derive(Clone, Default)]
pub(crate) struct NullSink(pub(crate) Arc<AtomicU64>);

impl NullSink {
    pub(crate) fn count(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

impl AuditSink for NullSink {
    async fn write_batch(&self, batch: &[AuditEvent]) -> Result<(), SinkError> {
        self.0.fetch_add(batch.len() as u64, Ordering::Relaxed);
        Ok(())
    }
}
