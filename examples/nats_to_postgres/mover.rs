//! Moves audit events from a JetStream stream into the Postgres sink's table: a durable pull consumer, one
//! `PostgresSink::write_batch` per batch, and one acknowledgement per batch once the insert has committed.
//! `tests/nats.rs` includes this file, so the tests drive exactly what the example runs.

use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, PullConsumer, pull};
use async_nats::jetstream::{self, Message};
use tokio_stream::StreamExt as _;
use tower_audit::{AuditEvent, AuditSink as _, PostgresSink};

/// Any error, for the example.
pub(crate) type Error = Box<dyn std::error::Error + Send + Sync>;

/// What the consumer needs to know.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    /// The stream the sinks publish into.
    pub(crate) stream: String,
    /// The durable consumer's name: the stream remembers how far it got, so a restart resumes there.
    pub(crate) durable: String,
    /// Events per insert.
    pub(crate) batch: usize,
    /// How long a fetch waits for a batch to fill before it takes what there is.
    pub(crate) wait: Duration,
    /// How long the server waits for the acknowledgement of a delivered batch before delivering it again.
    pub(crate) ack_wait: Duration,
}

impl Settings {
    /// Defaults for `stream`: the durable `postgres`, batches of 512, 200 ms fetch wait, 30 s ack wait.
    pub(crate) fn new(stream: &str) -> Self {
        Self {
            stream: stream.to_owned(),
            durable: "postgres".to_owned(),
            batch: 512,
            wait: Duration::from_millis(200),
            ack_wait: Duration::from_secs(30),
        }
    }
}

/// What one [`Mover::move_batch`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Moved {
    /// Events inserted (or found already there: the insert is idempotent on the event id).
    pub(crate) rows: usize,
    /// Messages that are not an audit event (not JSON of one), skipped and logged with their stream sequence.
    pub(crate) rejected: usize,
    /// Messages in the stream not yet delivered to this consumer after this batch: how far it is behind.
    pub(crate) lag: u64,
}

/// A durable pull consumer feeding a [`PostgresSink`].
///
/// Exactly once in Postgres, by event id: each message of a batch is acknowledged (the last one with a
/// confirmation from the server) only after the batch's insert committed. If the process dies, or an
/// acknowledgement is lost, between the two, the stream delivers the message again once `ack_wait` passes, and
/// the idempotent insert skips the rows already there. A message that was delivered but never reached the mover
/// (a connection cut mid-fetch) is never acknowledged, so it comes again too. A batch whose insert fails is kept
/// and retried before anything newer is fetched. Several movers may share a durable name: each message is
/// acknowledged on its own.
#[derive(Debug)]
pub(crate) struct Mover {
    consumer: PullConsumer,
    sink: PostgresSink,
    settings: Settings,
    /// A fetched batch whose insert failed, to retry first.
    unsettled: Vec<Message>,
}

impl Mover {
    /// Opens (or creates) the durable consumer on the stream.
    pub(crate) async fn new(
        jetstream: &jetstream::Context,
        sink: PostgresSink,
        settings: Settings,
    ) -> Result<Self, Error> {
        let stream = jetstream.get_stream(&settings.stream).await?;
        let config = pull::Config {
            durable_name: Some(settings.durable.clone()),
            description: Some("tower-audit: events into Postgres".to_owned()),
            ack_policy: AckPolicy::Explicit,
            ack_wait: settings.ack_wait,
            max_ack_pending: i64::try_from(settings.batch * 4).unwrap_or(i64::MAX),
            ..pull::Config::default()
        };
        let consumer = stream.get_or_create_consumer(&settings.durable, config).await?;
        Ok(Self { consumer, sink, settings, unsettled: Vec::new() })
    }

    /// Moves at most one batch: fetches up to `batch` messages (waiting at most `wait` for them), inserts them in
    /// one statement, then acknowledges them. Returns what it did; `rows` is 0 when nothing was waiting.
    pub(crate) async fn move_batch(&mut self) -> Result<Moved, Error> {
        let messages = if self.unsettled.is_empty() {
            let mut fetched =
                self.consumer.fetch().max_messages(self.settings.batch).expires(self.settings.wait).messages().await?;
            let mut messages = Vec::with_capacity(self.settings.batch);
            while let Some(message) = fetched.next().await {
                match message {
                    Ok(message) => messages.push(message),
                    // What arrived is inserted and acknowledged; the rest comes again after `ack_wait`.
                    Err(e) if !messages.is_empty() => {
                        tracing::warn!(error = %e, received = messages.len(), "fetch cut short");
                        break;
                    }
                    Err(e) => return Err(e),
                }
            }
            messages
        } else {
            std::mem::take(&mut self.unsettled)
        };
        let Some(last) = messages.last() else { return Ok(Moved::default()) };
        let lag = last.info()?.pending;

        let mut events = Vec::with_capacity(messages.len());
        let mut rejected = 0;
        for message in &messages {
            match serde_json::from_slice::<AuditEvent>(&message.payload) {
                Ok(event) => events.push(event),
                Err(e) => {
                    rejected += 1;
                    let sequence = message.info().map(|i| i.stream_sequence).unwrap_or_default();
                    tracing::error!(sequence, subject = %message.subject, error = %e, "not an audit event; skipped");
                }
            }
        }
        if let Err(e) = self.sink.write_batch(&events).await {
            self.unsettled = messages;
            return Err(e.into());
        }
        // Committed: now, and only now, acknowledge. A lost acknowledgement costs a redelivery, never a row.
        let (last, rest) = messages.split_last().expect("not empty");
        for message in rest {
            message.ack().await?;
        }
        // Confirmed by the server; it reads this connection's acknowledgements in order.
        last.double_ack().await?;
        Ok(Moved { rows: events.len(), rejected, lag })
    }

    /// Moves batches until `stop` completes, logging each batch with the lag; returns the rows moved. `stop` is
    /// checked between batches, never in the middle of one. A failed batch is logged and retried after
    /// `retry_delay`.
    pub(crate) async fn run(&mut self, stop: impl Future<Output = ()>, retry_delay: Duration) -> u64 {
        let mut stop = std::pin::pin!(stop);
        let mut total = 0;
        while !std::future::poll_fn(|cx| std::task::Poll::Ready(stop.as_mut().poll(cx).is_ready())).await {
            match self.move_batch().await {
                Ok(moved) if moved.rows + moved.rejected > 0 => {
                    total += moved.rows as u64;
                    tracing::info!(rows = moved.rows, rejected = moved.rejected, lag = moved.lag, total, "batch moved");
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "batch not moved; retrying");
                    tokio::time::sleep(retry_delay).await;
                }
            }
        }
        total
    }

    /// The consumer's lag as the server counts it: messages not yet delivered plus delivered and not acknowledged.
    pub(crate) async fn lag(&mut self) -> Result<u64, Error> {
        let info = self.consumer.info().await?;
        Ok(info.num_pending + info.num_ack_pending as u64)
    }
}
