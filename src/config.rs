//! The public settings of a pipeline that are not the builder itself: what to do when the queue is full, how
//! to retry, the defaults, and the headers and query parameters that never reach an event.

use std::time::Duration;

/// Default queue capacity (events): 65,536, about 5 s at 13 k events/s, enough to ride out a disk's `fsync`
/// stall under the sink (8,192 lasted 0.65 s, and on a virtual disk one `fsync` outlasted it). Memory is
/// bounded by [`DEFAULT_MAX_QUEUED_BYTES`] as well, and taken only as events wait.
pub const DEFAULT_CAPACITY: usize = 65_536;
/// Default budget of the bytes queued events may hold (32 MiB): with events of up to ~18 KB each (every text
/// field at its bound), a full queue could otherwise hold over a gigabyte. Typical events (a few hundred bytes)
/// fill the capacity first.
pub const DEFAULT_MAX_QUEUED_BYTES: usize = 32 << 20;
/// Default batch size (events).
pub const DEFAULT_BATCH_SIZE: usize = 512;
/// Default flush interval.
pub const DEFAULT_FLUSH_INTERVAL: Duration = Duration::from_millis(200);
/// Default bound of one sink call.
pub const DEFAULT_SINK_TIMEOUT: Duration = Duration::from_secs(10);
/// Query parameters redacted unless [`AuditLayerBuilder::redact_query_params`](crate::AuditLayerBuilder::redact_query_params) says otherwise: credentials,
/// session ids, one-time codes and signatures, under the names frameworks, OAuth/OIDC and cloud presigned URLs use.
/// A name also matches its spelling with `-` for `_`, and bracketed keys (`user[password]`, `token[]`).
pub const DEFAULT_REDACTED_QUERY_PARAMS: &[&str] = &[
    "access_token",
    "api_key",
    "apikey",
    "assertion",
    "auth",
    "authorization",
    "client_assertion",
    "client_secret",
    "code",
    "code_verifier",
    "credential",
    "credentials",
    "id_token",
    "jsessionid",
    "jwt",
    "key",
    "otp",
    "passcode",
    "passphrase",
    "passwd",
    "password",
    "phpsessid",
    "pin",
    "private_key",
    "pwd",
    "refresh_token",
    "samlresponse",
    "secret",
    "session",
    "session_id",
    "sessionid",
    "sid",
    "sig",
    "signature",
    "token",
    "x_amz_credential",
    "x_amz_security_token",
    "x_amz_signature",
    "x_goog_credential",
    "x_goog_signature",
];
/// Headers that are never recorded, whatever the configuration says.
pub const SENSITIVE_HEADERS: &[&str] = &["authorization", "cookie", "proxy-authorization", "set-cookie"];
/// Parts of a header name that suggest a credential: a header whose lower-case name contains one (`x-api-key`,
/// `x-csrf-token`, `x-auth-request-user`) is recorded only if [`AuditLayerBuilder::allow_sensitive_header`](crate::AuditLayerBuilder::allow_sensitive_header)
/// names it; otherwise [`AuditLayerBuilder::build`](crate::AuditLayerBuilder::build) refuses it.
pub const SENSITIVE_HEADER_PARTS: &[&str] =
    &["auth", "cookie", "credential", "key", "passwd", "password", "pwd", "secret", "session", "token"];

/// What the request path does when the queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Overflow {
    /// Drop the event and count it (`dropped_queue_full`, or `dropped_queue_bytes` past the byte budget). The
    /// request never waits. The default.
    #[default]
    Drop,
    /// When the queue is full (in events or bytes), `poll_ready` waits at most this long for room (the service
    /// is not ready meanwhile; shutdown ends the wait); then the request goes on. Its event is queued at the end
    /// if there is room then, else dropped and counted: `dropped_wait_timeout` when the wait ran out,
    /// `dropped_queue_full` when room was found and taken by others since. Back-pressure, not a guarantee:
    /// nothing is reserved, so the byte budget holds.
    Wait(Duration),
    /// `call` reserves a slot for the request's event before calling the inner service; when none can be had
    /// (queue full, byte budget reached, shutting down, worker gone), it answers `503 Service Unavailable`
    /// without calling it (counted as `refused`). When the queue is already full, `poll_ready` does not wait
    /// for the inner service's readiness to refuse. A reserved event is admitted even past the byte budget.
    ///
    /// Every request served before shutdown began is audited; one still in flight when it begins is counted
    /// as `dropped_closed`. Custom events recorded by handlers have no slot: they can still be dropped (and
    /// counted) when the queue is full.
    FailClosed,
}

/// How the worker retries a batch the sink failed to write.
///
/// Attempt `n` (from 1) waits `min(base_delay * 2^(n-1), max_delay)`, jittered to between half and all of it.
/// After `max_retries` retries the batch goes to the fallback sink.
///
/// ```
/// use std::time::Duration;
/// use tower_audit::Retry;
/// let retry = Retry::default().max_retries(3).base_delay(Duration::from_millis(50));
/// assert!(retry.delay(1) <= Duration::from_millis(50));
/// assert!(retry.delay(3) >= Duration::from_millis(100));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retry {
    pub(crate) max_retries: u32,
    pub(crate) base_delay: Duration,
    pub(crate) max_delay: Duration,
}

impl Default for Retry {
    /// 5 retries, from 100 ms up to 5 s.
    fn default() -> Self {
        Self { max_retries: 5, base_delay: Duration::from_millis(100), max_delay: Duration::from_secs(5) }
    }
}

impl Retry {
    /// No retries: a failed batch goes straight to the fallback sink.
    pub fn none() -> Self {
        Self { max_retries: 0, ..Self::default() }
    }

    /// How many times a failed batch is retried.
    pub fn max_retries(mut self, n: u32) -> Self {
        self.max_retries = n;
        self
    }

    /// The delay before the first retry (before jitter).
    pub fn base_delay(mut self, delay: Duration) -> Self {
        self.base_delay = delay;
        self
    }

    /// The longest delay between two attempts (before jitter).
    pub fn max_delay(mut self, delay: Duration) -> Self {
        self.max_delay = delay;
        self
    }

    /// The jittered delay before retry `attempt` (from 1).
    pub fn delay(&self, attempt: u32) -> Duration {
        let exp = self.base_delay.saturating_mul(1u32.checked_shl(attempt.saturating_sub(1)).unwrap_or(u32::MAX));
        let full = exp.min(self.max_delay);
        let half = full / 2;
        half + half.mul_f64(fastrand::f64())
    }
}
