//! The crate's own errors.

use std::path::PathBuf;

/// A boxed error from a sink's backend.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The layer could not be built as configured.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// `build()` needs a Tokio runtime to spawn the worker on.
    #[error("AuditLayer::builder(..).build() must be called inside a Tokio runtime (the worker is spawned on it)")]
    NoRuntime,
    /// A size setting was zero.
    #[error("`{setting}` must be at least 1")]
    Zero {
        /// The setting's name.
        setting: &'static str,
    },
    /// The batch size is larger than the channel capacity, so a full batch could never be waiting.
    #[error("batch_size ({batch_size}) must not exceed capacity ({capacity})")]
    BatchLargerThanCapacity {
        /// The configured batch size.
        batch_size: usize,
        /// The configured capacity.
        capacity: usize,
    },
    /// A header name is not a valid HTTP header name.
    #[error("`{0}` is not a valid HTTP header name")]
    InvalidHeaderName(String),
    /// A header that carries credentials was asked to be captured.
    #[error("header `{0}` carries credentials and is never recorded in audit events")]
    SensitiveHeader(String),
    /// A header whose name suggests a credential (see
    /// [`SENSITIVE_HEADER_PARTS`](crate::SENSITIVE_HEADER_PARTS)) was asked to be recorded without
    /// [`allow_sensitive_header`](crate::AuditLayerBuilder::allow_sensitive_header).
    #[error(
        "header `{header}` may carry a credential (its name contains `{part}`), so it is not recorded; if its \
         values are safe to keep, allow it with `.allow_sensitive_header(\"{header}\")`"
    )]
    SensitiveHeaderNotAllowed {
        /// The header's (lower-case) name.
        header: String,
        /// The part of the name that made it suspect.
        part: &'static str,
    },
    /// A table name is not a plain lower-case SQL identifier.
    #[error(
        "`{0}` is not a valid table name: use lower-case letters, digits and underscores (at most 48, not starting \
         with a digit), optionally after `schema.` in Postgres"
    )]
    InvalidTableName(String),
    /// The name given to [`instance`](crate::AuditLayerBuilder::instance) cannot be recorded as it is.
    #[error(
        "instance name {name:?} {problem}: name the process with 1 to {max_field_len} bytes (max_field_len) of \
         printable text, such as the host or pod name"
    )]
    InvalidInstance {
        /// The name as given.
        name: String,
        /// What is wrong with it.
        problem: &'static str,
        /// The longest text field allowed ([`max_field_len`](crate::AuditLayerBuilder::max_field_len)).
        max_field_len: usize,
    },
    /// A NATS stream name or subject prefix cannot be used as it is.
    #[cfg(feature = "nats")]
    #[cfg_attr(docsrs, doc(cfg(feature = "nats")))]
    #[error(
        "{what} {name:?} is not valid in NATS: use non-empty tokens without spaces, control characters, `*` or `>` \
         (and for a stream name no `.`, `/` or `\\`)"
    )]
    InvalidNatsName {
        /// What the name is for (`stream name`, `subject prefix`).
        what: &'static str,
        /// The name as given.
        name: String,
    },
    /// A trusted proxy is neither an IP address nor a CIDR network.
    #[error("trusted proxy `{0}` is neither an IP address nor a CIDR network (e.g. 10.0.0.0/8)")]
    InvalidProxy(String),
    /// The client address is to be read from a header, but no proxy is trusted to set it.
    #[error(
        "client_addr_source reads `{header}`, but trusted_proxies is empty, so the header would never be believed: \
         list the proxies that set it with `.trusted_proxies([..])`"
    )]
    ClientAddrSourceWithoutTrustedProxies {
        /// The header the source reads.
        header: String,
    },
    /// Proxies are trusted, but the client address source is the peer, so no header is ever read.
    #[error(
        "trusted_proxies is set, but client_addr_source is `ClientAddrSource::Peer`, which reads no header: name \
         the header your proxy sets with `.client_addr_source(ClientAddrSource::XForwardedFor)` (or `Forwarded`, \
         or `Header(..)`), or drop trusted_proxies"
    )]
    TrustedProxiesWithoutClientAddrSource,
    /// Another pipeline (in this process or another) holds the spill directory's lock file.
    #[error(
        "spill directory {} is in use by another pipeline (lock held on {}): give each pipeline a directory \
         of its own",
        dir.display(),
        dir.join("LOCK").display()
    )]
    SpillLocked {
        /// The directory.
        dir: PathBuf,
    },
    /// The spill directory could not be created, locked, read or recovered.
    #[error("spill directory: cannot use {}: {source}", path.display())]
    SpillIo {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A spill and a fallback sink were both configured; with a spill, batches are retried until the sink
    /// takes them, so a fallback would never be used.
    #[error(
        "a pipeline with a spill retries every batch until the sink takes it and never uses a fallback sink: \
         configure one or the other"
    )]
    SpillWithFallback,
    /// A [`Policy`](crate::Policy) rule has a setting that cannot hold.
    #[error("policy rule {rule} ({matcher}) {problem}")]
    InvalidRule {
        /// The rule's position in the policy, from 0.
        rule: usize,
        /// What the rule matches.
        matcher: String,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// The signing key given to [`Integrity::from_pem`](crate::integrity::Integrity::from_pem) could not be read.
    #[error("cannot read the integrity signing key (want an Ed25519 key in PKCS#8 PEM): {0}")]
    InvalidSigningKey(String),
    /// An [`Integrity`](crate::integrity::Integrity) setting cannot hold.
    #[error("integrity: {0}")]
    InvalidIntegrity(&'static str),
}

/// A sink failed to write or flush a batch.
///
/// The worker retries a failed batch with backoff; what still fails goes to the fallback sink, if any. Every
/// failure is counted in [`Stats`](crate::Stats).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SinkError {
    /// The audit file could not be opened.
    #[error("cannot open audit file {}: {source}", path.display())]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Reading or writing failed.
    #[error("audit sink I/O failed: {0}")]
    Io(#[from] std::io::Error),
    /// An event could not be serialised.
    #[error("audit event could not be serialised: {0}")]
    Serialize(#[from] serde_json::Error),
    /// Any other backend failure.
    #[error("audit sink failed: {0}")]
    Backend(BoxError),
    /// The NATS server answered, but JetStream is not enabled on it (or not for this account).
    #[cfg(feature = "nats")]
    #[cfg_attr(docsrs, doc(cfg(feature = "nats")))]
    #[error(
        "the NATS server has no JetStream for this account ({detail}): start nats-server with `-js` (or \
         `jetstream {{}}` in its configuration) and give the account JetStream limits"
    )]
    NoJetStream {
        /// What the server said.
        detail: String,
    },
    /// No JetStream stream has the configured name, or none captures the subject an event was published to.
    #[cfg(feature = "nats")]
    #[cfg_attr(docsrs, doc(cfg(feature = "nats")))]
    #[error(
        "no JetStream stream `{stream}` captures subject `{subject}`: create it with `NatsSink::ensure_stream()` \
         (or `nats stream add {stream} --subjects '{subject}'`)"
    )]
    StreamNotFound {
        /// The stream the sink was configured with.
        stream: String,
        /// The subject that no stream captured (or the sink's subject filter when checking the stream).
        subject: String,
    },
    /// The stream exists but is not configured as the sink needs (subjects, storage, duplicate window), or an
    /// event was stored in another stream.
    #[cfg(feature = "nats")]
    #[cfg_attr(docsrs, doc(cfg(feature = "nats")))]
    #[error("JetStream stream `{stream}` {problem}")]
    StreamMismatch {
        /// The stream.
        stream: String,
        /// What does not match, and what to change.
        problem: String,
    },
}

impl SinkError {
    /// Wraps any backend error.
    ///
    /// ```
    /// use tower_audit::SinkError;
    /// let err = SinkError::backend("database is read-only");
    /// assert_eq!(err.to_string(), "audit sink failed: database is read-only");
    /// ```
    pub fn backend(error: impl Into<BoxError>) -> Self {
        SinkError::Backend(error.into())
    }
}
