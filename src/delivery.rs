//! The sink stage: a batch goes to the primary sink, retried with backoff, then to the fallback sink; every
//! attempt is guarded (see `call`) and nothing is attempted once the shutdown deadline has passed.

use std::time::Duration;

use crate::Retry;
use crate::call::{Called, Deadline, after, call};
use crate::event::AuditEvent;
use crate::sink::DynSink;
use crate::stats::{Counters, add};

/// How a write ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Written {
    Yes,
    /// Failed for good (every retry, or no time left for one before the deadline).
    Failed,
    /// The shutdown deadline passed first: unknown whether the sink committed it.
    Deadline,
}

/// The sinks and how to call them.
pub(crate) struct Sinks {
    pub(crate) primary: Box<dyn DynSink>,
    pub(crate) fallback: Option<Box<dyn DynSink>>,
    pub(crate) retry: Retry,
    pub(crate) timeout: Duration,
}

impl Sinks {
    /// Writes `batch` to the primary sink, retrying with backoff. A retry that could not start before the
    /// shutdown deadline (one known when the retry is planned, or set while waiting for it) is not waited for:
    /// the batch fails at once, while there is still time for the fallback.
    pub(crate) async fn primary(&self, batch: &[AuditEvent], deadline: &Deadline, counters: &Counters) -> Written {
        let mut attempt = 0;
        loop {
            let failure = match call(|| self.primary.write_batch(batch), self.timeout, deadline, counters).await {
                Called::Ok => return Written::Yes,
                Called::Deadline => return Written::Deadline,
                Called::Failed(failure) => failure,
            };
            let retry_at = after(self.retry.delay(attempt + 1));
            let no_time = deadline.get().is_some_and(|d| retry_at >= d);
            if attempt >= self.retry.max_retries || no_time {
                tracing::error!(
                    events = batch.len(),
                    attempts = attempt + 1,
                    error = %failure,
                    "audit sink failed to write a batch; giving up on it (fallback sink next, if any)"
                );
                return Written::Failed;
            }
            tracing::warn!(
                events = batch.len(),
                attempt = attempt + 1,
                retry_in_ms = retry_at.saturating_duration_since(tokio::time::Instant::now()).as_millis() as u64,
                error = %failure,
                "audit sink failed to write a batch; retrying"
            );
            if !deadline.wait_before_it(retry_at).await {
                tracing::error!(
                    events = batch.len(),
                    "shutdown deadline before the next retry; giving up on the batch (fallback sink next, if any)"
                );
                return Written::Failed;
            }
            add(&counters.retries, 1);
            attempt += 1;
        }
    }

    /// One attempt at the fallback sink (`Failed` when there is none).
    pub(crate) async fn fallback(&self, batch: &[AuditEvent], deadline: &Deadline, counters: &Counters) -> Written {
        let Some(fallback) = &self.fallback else { return Written::Failed };
        match call(|| fallback.write_batch(batch), self.timeout, deadline, counters).await {
            Called::Ok => Written::Yes,
            Called::Deadline => Written::Deadline,
            Called::Failed(failure) => {
                tracing::error!(events = batch.len(), error = %failure, "audit fallback sink failed too; events lost");
                Written::Failed
            }
        }
    }

    /// Flushes both sinks; whether both succeeded.
    pub(crate) async fn flush(&self, deadline: &Deadline, counters: &Counters) -> bool {
        let mut flushed = true;
        for sink in std::iter::once(&self.primary).chain(self.fallback.as_ref()) {
            match call(|| sink.flush(), self.timeout, deadline, counters).await {
                Called::Ok => {}
                Called::Deadline => flushed = false,
                Called::Failed(failure) => {
                    tracing::error!(error = %failure, "audit sink failed to flush at shutdown");
                    flushed = false;
                }
            }
        }
        flushed
    }
}
