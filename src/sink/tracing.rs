use crate::error::SinkError;
use crate::event::AuditEvent;
use crate::sink::AuditSink;

/// Emits each event as a `tracing` event at `INFO` level with target `tower_audit::audit`, one field per event
/// field (attributes as a JSON object in `attributes`).
///
/// Handy as a fallback sink, or to route the audit trail through an existing log pipeline. A subscriber that
/// blocks (a synchronous writer to a slow disk) blocks the worker, never a request.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use tower_audit::{AuditLayer, TracingSink};
/// let (layer, handle) = AuditLayer::builder(TracingSink::new()).build().unwrap();
/// # drop((layer, handle));
/// # }
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct TracingSink {
    _private: (),
}

impl TracingSink {
    /// The `tracing` target of the events this sink emits.
    pub const TARGET: &'static str = "tower_audit::audit";

    /// A sink that emits through the current `tracing` subscriber.
    pub fn new() -> Self {
        Self { _private: () }
    }
}

impl AuditSink for TracingSink {
    async fn write_batch(&self, batch: &[AuditEvent]) -> Result<(), SinkError> {
        for event in batch {
            let attributes =
                if event.attributes.is_empty() { None } else { Some(serde_json::to_string(&event.attributes)?) };
            tracing::info!(
                target: TracingSink::TARGET,
                id = %event.id,
                instance = event.instance.as_deref(),
                boot = event.boot.map(tracing::field::display),
                seq = event.seq,
                time = %humantime::format_rfc3339_micros(event.time),
                kind = &*event.kind,
                outcome = event.outcome.as_str(),
                method = event.method.as_deref(),
                route = event.route.as_deref(),
                path = event.path.as_deref(),
                status = event.status,
                grpc_status = event.grpc_status,
                latency_us = event.latency_us,
                request_id = event.request_id.as_deref(),
                actor = event.actor.as_deref(),
                client_addr = event.client_addr.map(tracing::field::display),
                user_agent = event.user_agent.as_deref(),
                attributes = attributes.as_deref(),
                "audit event"
            );
        }
        Ok(())
    }
}
