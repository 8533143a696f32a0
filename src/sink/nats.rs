//! The NATS JetStream sink: each event published to a stream, deduplicated by its id.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::ErrorCode;
use async_nats::jetstream::context::{GetStreamErrorKind, PublishErrorKind, RequestErrorKind};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::{Config as StreamConfig, RetentionPolicy, StorageType};
use async_nats::jetstream::{self, Context};

use crate::error::{ConfigError, SinkError};
use crate::event::AuditEvent;
use crate::sink::AuditSink;

/// The longest subject token made from an event's instance or kind; longer ones are cut.
const MAX_TOKEN_LEN: usize = 64;

/// Publishes each event of a batch to a NATS JetStream stream, as JSON (the event's serde form), on the subject
/// `<prefix>.<instance>.<kind>` (default prefix `audit`), with the `Nats-Msg-Id` header set to the event id.
///
/// # One copy per event id
///
/// A batch is published whole without waiting between messages, then every acknowledgement is awaited; the
/// batch succeeds only when the stream acknowledged every message. A batch that failed (a lost connection, an
/// ack that timed out) is retried by the worker with the same ids, and the server drops every message whose id it
/// already stored within the stream's **duplicate window** (its ack says `duplicate`). So as long as a retry
/// comes within that window (2 minutes by default, [`duplicate_window`](Self::duplicate_window)), each event is in
/// the stream once. [`stored`](Self::stored) counts the acks that stored a message, [`duplicates`](Self::duplicates)
/// the acks that said `duplicate`; no event is counted in both. A message stored whose ack was lost (a cut
/// connection) is counted once, as a duplicate, when its batch is retried: so `stored` ≤ messages in the stream
/// ≤ `stored + duplicates`.
///
/// # Subjects
///
/// `instance` and `kind` each become one subject token: every byte but ASCII letters, digits, `-` and `_`
/// (so `.`, `*`, `>`, spaces, control and non-ASCII characters) becomes `_`, an empty token becomes `_`, and a
/// token is cut at 64 bytes. The subject routes; the event in the payload keeps the exact values. So
/// `audit.api-1.http_request` carries the `http.request` events of instance `api-1`, and a consumer can filter
/// on `audit.api-1.>` or `audit.*.auth_login_failed`.
///
/// ```no_run
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use tower_audit::{AuditLayer, NatsSink};
///
/// let sink = NatsSink::connect("nats://127.0.0.1:4222", "AUDIT").await?;
/// sink.ensure_stream().await?; // creates the stream `AUDIT` on `audit.>`, or checks it
/// let (layer, handle) = AuditLayer::builder(sink).build()?;
/// # drop((layer, handle));
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
#[cfg_attr(docsrs, doc(cfg(feature = "nats")))]
pub struct NatsSink {
    jetstream: Context,
    stream: String,
    prefix: String,
    duplicate_window: Duration,
    counters: Arc<Counters>,
}

#[derive(Debug, Default)]
struct Counters {
    stored: AtomicU64,
    duplicates: AtomicU64,
}

impl NatsSink {
    /// The subject prefix unless [`subject_prefix`](Self::subject_prefix) sets another.
    pub const DEFAULT_SUBJECT_PREFIX: &'static str = "audit";

    /// The duplicate window [`ensure_stream`](Self::ensure_stream) gives a stream it creates (the server's
    /// default), and the least it accepts on a stream that exists.
    pub const DEFAULT_DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

    /// Connects to `url` (`nats://host:4222`, or several separated by commas) and checks that the server has
    /// JetStream, to publish into `stream`. The client reconnects by itself after a lost connection; batches
    /// that fail meanwhile are retried by the worker.
    ///
    /// # Errors
    ///
    /// [`SinkError::Backend`] when the server cannot be reached or the stream name is invalid,
    /// [`SinkError::NoJetStream`] when it has no JetStream.
    pub async fn connect(url: &str, stream: &str) -> Result<Self, SinkError> {
        let client = async_nats::connect(url).await.map_err(|e| SinkError::backend(format!("NATS at {url}: {e}")))?;
        let sink = Self::new(client, stream).map_err(SinkError::backend)?;
        sink.check_jetstream().await?;
        Ok(sink)
    }

    /// Publishes into `stream` through a client you connected (with your own options: credentials, TLS,
    /// reconnect delays…). Nothing is checked on the server until [`ensure_stream`](Self::ensure_stream) or
    /// the first batch.
    ///
    /// # Errors
    ///
    /// [`ConfigError::InvalidNatsName`] when `stream` is empty or holds a space, `.`, `*`, `>`, `/`, `\` or a
    /// control character.
    pub fn new(client: async_nats::Client, stream: &str) -> Result<Self, ConfigError> {
        if stream.is_empty()
            || stream.chars().any(|c| c.is_whitespace() || c.is_control() || matches!(c, '.' | '*' | '>' | '/' | '\\'))
        {
            return Err(ConfigError::InvalidNatsName { what: "stream name", name: stream.to_owned() });
        }
        Ok(Self {
            jetstream: jetstream::new(client),
            stream: stream.to_owned(),
            prefix: Self::DEFAULT_SUBJECT_PREFIX.to_owned(),
            duplicate_window: Self::DEFAULT_DUPLICATE_WINDOW,
            counters: Arc::default(),
        })
    }

    /// Publishes on `<prefix>.<instance>.<kind>` instead of `audit.<instance>.<kind>`. The prefix is one or
    /// more tokens separated by `.`.
    ///
    /// # Errors
    ///
    /// [`ConfigError::InvalidNatsName`] when a token is empty or holds a space, `*`, `>` or a control character.
    pub fn subject_prefix(mut self, prefix: &str) -> Result<Self, ConfigError> {
        let bad_token =
            |t: &str| t.is_empty() || t.chars().any(|c| c.is_whitespace() || c.is_control() || matches!(c, '*' | '>'));
        if prefix.split('.').any(bad_token) {
            return Err(ConfigError::InvalidNatsName { what: "subject prefix", name: prefix.to_owned() });
        }
        self.prefix = prefix.to_owned();
        Ok(self)
    }

    /// The duplicate window [`ensure_stream`](Self::ensure_stream) creates a stream with, and the least it
    /// accepts on an existing one (default [`DEFAULT_DUPLICATE_WINDOW`](Self::DEFAULT_DUPLICATE_WINDOW)). A retry
    /// later than this after the first attempt may store an event twice: keep it above the worker's whole retry
    /// schedule (sink timeout × attempts plus backoff).
    pub fn duplicate_window(mut self, window: Duration) -> Self {
        self.duplicate_window = window;
        self
    }

    /// How long a batch waits for each acknowledgement before it fails (and is retried); 5 s unless set. Keep it
    /// below the pipeline's sink timeout.
    pub fn ack_timeout(mut self, timeout: Duration) -> Self {
        self.jetstream.set_timeout(timeout);
        self
    }

    /// The stream's name.
    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// The subject filter of every subject this sink publishes on: `<prefix>.>`.
    pub fn subjects(&self) -> String {
        format!("{}.>", self.prefix)
    }

    /// The subject `event` is published on: `<prefix>.<instance>.<kind>`, each token sanitised (see the type's
    /// docs). An event without an instance (not stamped by a pipeline) gets the token `_`.
    ///
    /// ```no_run
    /// # fn f(sink: tower_audit::NatsSink) {
    /// let event = tower_audit::AuditEvent::new("auth.login failed>*");
    /// assert_eq!(sink.subject(&event), "audit._.auth_login_failed__");
    /// # }
    /// ```
    pub fn subject(&self, event: &AuditEvent) -> String {
        let mut subject = String::with_capacity(self.prefix.len() + 2 + 2 * MAX_TOKEN_LEN);
        subject.push_str(&self.prefix);
        subject.push('.');
        push_token(&mut subject, event.instance.as_deref().unwrap_or(""));
        subject.push('.');
        push_token(&mut subject, &event.kind);
        subject
    }

    /// Messages the stream stored (acknowledged and not a duplicate) since this sink (or the sink it was cloned
    /// from) was made.
    pub fn stored(&self) -> u64 {
        self.counters.stored.load(Ordering::Relaxed)
    }

    /// Acknowledgements that said `duplicate`: messages of a retried batch the stream already held.
    pub fn duplicates(&self) -> u64 {
        self.counters.duplicates.load(Ordering::Relaxed)
    }

    /// Checks that the server has JetStream for this account.
    ///
    /// # Errors
    ///
    /// [`SinkError::NoJetStream`] when it does not; [`SinkError::Backend`] when the server does not answer.
    pub async fn check_jetstream(&self) -> Result<(), SinkError> {
        // The account info, read as plain JSON: its shape changes between server versions.
        let info: Result<serde_json::Value, _> = self.jetstream.request("INFO", &()).await;
        match info {
            Ok(info) => match info.get("error") {
                None => Ok(()),
                Some(error) => {
                    let code = error.get("err_code").and_then(serde_json::Value::as_u64).unwrap_or_default();
                    let detail = error.get("description").and_then(serde_json::Value::as_str).unwrap_or("").to_owned();
                    if is_jetstream_off(ErrorCode(code)) || detail.contains("not enabled") {
                        Err(SinkError::NoJetStream { detail })
                    } else {
                        Err(SinkError::backend(format!("NATS JetStream account info: error {code}: {detail}")))
                    }
                }
            },
            Err(e) if e.kind() == RequestErrorKind::NoResponders => {
                Err(SinkError::NoJetStream { detail: "no JetStream API answered".to_owned() })
            }
            Err(e) => Err(SinkError::backend(format!("NATS JetStream account info: {e}"))),
        }
    }

    /// Creates the stream if it does not exist: subjects `<prefix>.>`, limits retention (messages stay after a
    /// consumer acknowledged them, so the stream can be replayed and read by several consumers), file storage,
    /// and the [duplicate window](Self::duplicate_window). If it exists, checks those four properties instead
    /// and changes nothing.
    ///
    /// # Errors
    ///
    /// [`SinkError::StreamMismatch`] naming what differs on an existing stream, [`SinkError::NoJetStream`],
    /// or [`SinkError::Backend`] when the server refuses or does not answer.
    pub async fn ensure_stream(&self) -> Result<(), SinkError> {
        match self.jetstream.get_stream(&self.stream).await {
            Ok(stream) => self.check_config(&stream.cached_info().config),
            Err(e) => match e.kind() {
                GetStreamErrorKind::JetStream(error) if error.error_code() == ErrorCode::STREAM_NOT_FOUND => {
                    let config = StreamConfig {
                        name: self.stream.clone(),
                        subjects: vec![self.subjects()],
                        retention: RetentionPolicy::Limits,
                        storage: StorageType::File,
                        duplicate_window: self.duplicate_window,
                        description: Some("tower-audit events".to_owned()),
                        ..StreamConfig::default()
                    };
                    self.jetstream
                        .create_stream(config)
                        .await
                        .map_err(|e| SinkError::backend(format!("creating JetStream stream `{}`: {e}", self.stream)))?;
                    Ok(())
                }
                kind => Err(self.stream_error(kind, &e)),
            },
        }
    }

    /// Checks that the stream exists and is configured as [`ensure_stream`](Self::ensure_stream) would make it,
    /// without creating anything.
    ///
    /// # Errors
    ///
    /// [`SinkError::StreamNotFound`], [`SinkError::StreamMismatch`], [`SinkError::NoJetStream`], or
    /// [`SinkError::Backend`].
    pub async fn check_stream(&self) -> Result<(), SinkError> {
        match self.jetstream.get_stream(&self.stream).await {
            Ok(stream) => self.check_config(&stream.cached_info().config),
            Err(e) => Err(self.stream_error(e.kind(), &e)),
        }
    }

    fn stream_error(&self, kind: GetStreamErrorKind, e: &dyn std::error::Error) -> SinkError {
        match kind {
            GetStreamErrorKind::JetStream(error) if error.error_code() == ErrorCode::STREAM_NOT_FOUND => {
                SinkError::StreamNotFound { stream: self.stream.clone(), subject: self.subjects() }
            }
            GetStreamErrorKind::JetStream(error) if is_jetstream_off(error.error_code()) => {
                SinkError::NoJetStream { detail: error.to_string() }
            }
            GetStreamErrorKind::Request if no_responders(e) => {
                SinkError::NoJetStream { detail: "no JetStream API answered".to_owned() }
            }
            _ => SinkError::backend(format!("JetStream stream `{}`: {e}", self.stream)),
        }
    }

    fn check_config(&self, config: &StreamConfig) -> Result<(), SinkError> {
        let mismatch = |problem: String| Err(SinkError::StreamMismatch { stream: self.stream.clone(), problem });
        let wanted = self.subjects();
        if !config.subjects.iter().any(|s| s == &wanted || s == ">") {
            return mismatch(format!(
                "captures {:?}, not `{wanted}`: add `{wanted}` to its subjects (or set the sink's subject_prefix)",
                config.subjects
            ));
        }
        if config.retention != RetentionPolicy::Limits {
            return mismatch(format!(
                "has retention {:?}: an audit stream keeps its messages after they are consumed (limits retention)",
                config.retention
            ));
        }
        if config.storage != StorageType::File {
            return mismatch(format!("has {:?} storage: an audit stream needs file storage", config.storage));
        }
        if config.duplicate_window < self.duplicate_window {
            return mismatch(format!(
                "has a duplicate window of {:?}, less than the {:?} the sink needs to drop retried events: raise it \
                 (`nats stream edit --dupe-window`) or lower the sink's duplicate_window",
                config.duplicate_window, self.duplicate_window
            ));
        }
        Ok(())
    }

    fn publish_error(&self, e: &async_nats::jetstream::context::PublishError, subject: &str) -> SinkError {
        match e.kind() {
            PublishErrorKind::StreamNotFound => {
                SinkError::StreamNotFound { stream: self.stream.clone(), subject: subject.to_owned() }
            }
            _ => SinkError::backend(format!("publishing to JetStream subject `{subject}`: {e}")),
        }
    }
}

fn is_jetstream_off(code: ErrorCode) -> bool {
    code == ErrorCode::JETSTREAM_NOT_ENABLED || code == ErrorCode::JETSTREAM_NOT_ENABLED_FOR_ACCOUNT
}

fn no_responders(e: &dyn std::error::Error) -> bool {
    e.source()
        .and_then(|s| s.downcast_ref::<async_nats::jetstream::context::RequestError>())
        .is_some_and(|r| r.kind() == RequestErrorKind::NoResponders)
}

/// Appends `text` as one subject token: ASCII letters, digits, `-` and `_` kept, every other character `_`,
/// at most [`MAX_TOKEN_LEN`] bytes, `_` if empty.
fn push_token(subject: &mut String, text: &str) {
    let start = subject.len();
    for c in text.chars().take(MAX_TOKEN_LEN) {
        subject.push(if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' });
    }
    if subject.len() == start {
        subject.push('_');
    }
}

impl AuditSink for NatsSink {
    async fn write_batch(&self, batch: &[AuditEvent]) -> Result<(), SinkError> {
        // Publish everything first: the acks come back while the rest is still being sent.
        let mut pending = Vec::with_capacity(batch.len());
        for event in batch {
            let mut payload = Vec::with_capacity(512);
            crate::event::write_json(event, &mut payload)?;
            let subject = self.subject(event);
            let message = PublishMessage::build().payload(payload.into()).message_id(event.id.hyphenated().to_string());
            let ack = self.jetstream.send_publish(subject.clone(), message).await;
            match ack {
                Ok(ack) => pending.push((subject, ack)),
                // Nothing more is sent; the acks of what was sent are still counted below.
                Err(e) => {
                    let error = self.publish_error(&e, &subject);
                    return self.settle(pending, Some(error)).await;
                }
            }
        }
        self.settle(pending, None).await
    }
}

impl NatsSink {
    /// Awaits every acknowledgement and counts them, whatever fails; the first error (`first`, else the first
    /// failed ack) fails the batch.
    async fn settle(
        &self,
        pending: Vec<(String, jetstream::context::PublishAckFuture)>,
        mut first: Option<SinkError>,
    ) -> Result<(), SinkError> {
        let (mut stored, mut duplicates) = (0, 0);
        for (subject, ack) in pending {
            match ack.await {
                Ok(ack) if ack.stream != self.stream => {
                    first.get_or_insert(SinkError::StreamMismatch {
                        stream: self.stream.clone(),
                        problem: format!(
                            "does not capture `{subject}`: stream `{}` stored it; give each stream subjects of its own",
                            ack.stream
                        ),
                    });
                }
                Ok(ack) if ack.duplicate => duplicates += 1,
                Ok(_) => stored += 1,
                Err(e) => {
                    first.get_or_insert_with(|| self.publish_error(&e, &subject));
                }
            }
        }
        self.counters.stored.fetch_add(stored, Ordering::Relaxed);
        self.counters.duplicates.fetch_add(duplicates, Ordering::Relaxed);
        first.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(text: &str) -> String {
        let mut s = String::new();
        push_token(&mut s, text);
        s
    }

    #[test]
    fn tokens_hold_no_separator_or_wildcard() {
        assert_eq!(token("http.request"), "http_request");
        assert_eq!(token("a b\t*>.\u{0}é"), "a_b______");
        assert_eq!(token(""), "_");
        assert_eq!(token("api-1_x"), "api-1_x");
        assert_eq!(token(&"x".repeat(100)).len(), MAX_TOKEN_LEN);
        assert_eq!(token(&"é".repeat(100)), "_".repeat(MAX_TOKEN_LEN));
    }
}
