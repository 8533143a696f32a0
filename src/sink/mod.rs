//! Where the worker writes batches of events.
//!
//! A sink implements [`AuditSink`]: one async method that writes a whole batch, and an optional `flush`. The
//! worker is the only caller, never the request path, so a sink may take its time, hold a database pool, or fail:
//! a failed batch is retried with backoff and then handed to the fallback sink, and every failure is counted.
//!
//! # Writing your own sink
//!
//! ```
//! use std::sync::atomic::{AtomicU64, Ordering};
//! use tower_audit::{AuditEvent, AuditSink, SinkError};
//!
//! /// Counts denied requests per batch and forwards them to an alerting system.
//! #[derive(Debug, Default)]
//! struct DeniedCounter {
//!     denied: AtomicU64,
//! }
//!
//! impl AuditSink for DeniedCounter {
//!     async fn write_batch(&self, batch: &[AuditEvent]) -> Result<(), SinkError> {
//!         let denied = batch.iter().filter(|e| e.outcome == tower_audit::Outcome::Denied).count();
//!         self.denied.fetch_add(denied as u64, Ordering::Relaxed);
//!         // A real sink would `.await` its I/O here and map its errors with `SinkError::backend`.
//!         Ok(())
//!     }
//! }
//! ```
//!
//! A sink must be idempotent on [`AuditEvent::id`] where it can: a batch whose write failed half-way is retried
//! whole, with the same ids and sequence numbers.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::error::SinkError;
use crate::event::AuditEvent;

mod json_lines;
mod memory;
#[cfg(feature = "nats")]
mod nats;
#[cfg(feature = "postgres")]
mod pg_copy;
#[cfg(feature = "postgres")]
mod postgres;
#[cfg(any(feature = "postgres", feature = "sqlite"))]
pub(crate) mod sql;
#[cfg(feature = "sqlite")]
mod sqlite;
mod tracing;

pub use self::json_lines::JsonLinesSink;
pub use self::memory::MemorySink;
#[cfg(feature = "nats")]
pub use self::nats::NatsSink;
#[cfg(feature = "postgres")]
pub use self::postgres::PostgresSink;
#[cfg(feature = "sqlite")]
pub use self::sqlite::SqliteSink;
pub use self::tracing::TracingSink;

/// A destination for batches of audit events. See the [module docs](self) for an example.
pub trait AuditSink: Send + Sync + 'static {
    /// Writes a whole batch. Called by the worker only, one batch at a time; never concurrently.
    ///
    /// Return an error to have the batch retried (with the same ids) and, after the last retry, passed to the
    /// fallback sink.
    fn write_batch(&self, batch: &[AuditEvent]) -> impl Future<Output = Result<(), SinkError>> + Send;

    /// Makes everything written so far durable. Called once when the pipeline shuts down. Does nothing by
    /// default.
    fn flush(&self) -> impl Future<Output = Result<(), SinkError>> + Send {
        std::future::ready(Ok(()))
    }
}

impl<T: AuditSink> AuditSink for Arc<T> {
    fn write_batch(&self, batch: &[AuditEvent]) -> impl Future<Output = Result<(), SinkError>> + Send {
        (**self).write_batch(batch)
    }

    fn flush(&self) -> impl Future<Output = Result<(), SinkError>> + Send {
        (**self).flush()
    }
}

pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The object-safe form of [`AuditSink`] the worker holds.
pub(crate) trait DynSink: Send + Sync {
    fn write_batch<'a>(&'a self, batch: &'a [AuditEvent]) -> BoxFuture<'a, Result<(), SinkError>>;
    fn flush(&self) -> BoxFuture<'_, Result<(), SinkError>>;
}

impl<T: AuditSink> DynSink for T {
    fn write_batch<'a>(&'a self, batch: &'a [AuditEvent]) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(AuditSink::write_batch(self, batch))
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(AuditSink::flush(self))
    }
}
