//! The audit event: one flat, versioned, serde-serialisable record.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::SystemTime;

use http::StatusCode;
use serde::ser::SerializeStruct;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::sanitize::{Limits, bounded, is_clean};

/// Version of the event schema. Bumped whenever a field is added or changes meaning or type.
///
/// 2 added [`AuditEvent::instance`] and [`AuditEvent::boot`]; a version 1 record reads with both `None`.
/// 3 added [`AuditEvent::prev_hash`] and [`AuditEvent::hash`]; an older record reads with both `None`.
pub const SCHEMA_VERSION: u16 = 3;

/// Well-known values of [`AuditEvent::kind`].
pub mod kind {
    /// Whether `kind` is one the worker gives its own events (see
    /// [`AuditEvent::is_pipeline_event`](crate::AuditEvent::is_pipeline_event)).
    pub(crate) fn is_pipeline(kind: &str) -> bool {
        matches!(kind, AUDIT_BOOT | AUDIT_SHUTDOWN | AUDIT_GAP | AUDIT_CHECKPOINT)
    }

    /// One HTTP request, recorded by the layer.
    pub const HTTP_REQUEST: &str = "http.request";
    /// One gRPC call (request content type `application/grpc…`), recorded by the layer.
    pub const GRPC_CALL: &str = "grpc.call";
    /// The intent of an HTTP request under [`DurableIntent`](crate::Delivery::DurableIntent): made durable
    /// before the handler runs. Its outcome is `success` (the request was received) and it has no status,
    /// latency or actor; the request's own `http.request` event follows with the same `intent_id` attribute.
    pub const HTTP_INTENT: &str = "http.intent";
    /// The intent of a gRPC call under [`DurableIntent`](crate::Delivery::DurableIntent), as
    /// [`HTTP_INTENT`] for a `grpc.call`.
    pub const GRPC_INTENT: &str = "grpc.intent";
    /// Written by the worker with [integrity](crate::AuditLayerBuilder::integrity) on: a signed checkpoint of the
    /// boot's hash chain (every N events, every T seconds, traffic or not). See
    /// [`Checkpoint`](crate::integrity::Checkpoint).
    pub const AUDIT_CHECKPOINT: &str = "audit.checkpoint";
    /// Written by the worker into the trail after events were lost: how many and why.
    pub const AUDIT_GAP: &str = "audit.gap";
    /// Written by the worker first, when a pipeline starts: its instance, boot, version and the settings that
    /// matter (and, with a spill, what became of the previous boot).
    pub const AUDIT_BOOT: &str = "audit.boot";
    /// Written by the worker last, at a clean shutdown, with the final counters. A boot without one ended
    /// uncleanly (a crash, a kill, or a shutdown whose deadline passed first).
    pub const AUDIT_SHUTDOWN: &str = "audit.shutdown";
    /// Recorded by the layer when it withheld a [`Durable`](crate::Delivery::Durable) request's response (the
    /// client got `503`) because the request's event was not durable in time. It repeats the request's fields;
    /// `status` is 503, and the attributes say why (`reason`: `timeout`, `failed`, `queue_full`, `closed`, or
    /// `cancelled` when the client went away while the response waited; it then got nothing) and
    /// what was withheld (`withheld_status`). The request's own event (with `delivery=durable`) may still reach
    /// the trail later: the handler did act.
    pub const AUDIT_RESPONSE_WITHHELD: &str = "audit.response_withheld";
}

/// One audit record.
///
/// The layer builds one per request; handlers and [`AuditHandle::record`](crate::AuditHandle::record)
/// add custom ones built with [`AuditEvent::new`]. The worker stamps `instance`, `boot`, `seq` and `id` when it
/// takes the event from the queue, so they are stable across retries of a batch (sinks use `id` for idempotent
/// inserts), and `(boot, seq)` names one event of one pipeline run.
///
/// Every text field is bounded in length and free of control characters, Unicode line separators and bidi
/// controls (they are replaced by `U+FFFD`), so hostile input can neither bloat memory, forge a second line in a
/// line-oriented sink, nor reorder what a reader sees.
///
/// ```
/// use tower_audit::{AuditEvent, Outcome};
///
/// let event = AuditEvent::new("auth.login_failed")
///     .actor("alice@example.com")
///     .outcome(Outcome::Denied)
///     .attribute("reason", "bad_password");
/// assert_eq!(event.kind, "auth.login_failed");
/// assert_eq!(event.attributes["reason"], "bad_password");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[non_exhaustive]
pub struct AuditEvent {
    /// Schema version ([`SCHEMA_VERSION`]).
    pub version: u16,
    /// Unique, time-ordered id (UUIDv7), assigned by the worker.
    pub id: Uuid,
    /// The process that recorded the event, assigned by the worker: the name given to
    /// [`AuditLayerBuilder::instance`](crate::AuditLayerBuilder::instance), or by default the host name and a
    /// random suffix, the same for every pipeline of the process. `None` until stamped, and in a record written
    /// before schema version 2.
    #[serde(default, deserialize_with = "text::opt_arc")]
    pub instance: Option<Arc<str>>,
    /// The pipeline run that recorded the event (a UUIDv7 made when the layer was built, see
    /// [`AuditHandle::boot`](crate::AuditHandle::boot)), assigned by the worker. `None` until stamped, and in a
    /// record written before schema version 2.
    #[serde(default)]
    pub boot: Option<Uuid>,
    /// Sequence number within the [`boot`](Self::boot), assigned by the worker in the order it hands events to
    /// the sinks, starting at 1. `0` until stamped.
    pub seq: u64,
    /// When the request started (or the custom event was created).
    #[serde(with = "rfc3339")]
    pub time: SystemTime,
    /// What happened: [`kind::HTTP_REQUEST`], [`kind::GRPC_CALL`], [`kind::AUDIT_GAP`] or a custom name.
    #[serde(deserialize_with = "text::cow")]
    pub kind: Cow<'static, str>,
    /// How it ended.
    pub outcome: Outcome,
    /// HTTP method.
    #[serde(default, deserialize_with = "text::opt_cow")]
    pub method: Option<Cow<'static, str>>,
    /// Matched route template (`/users/{id}`) when the router provides one, or the gRPC method.
    pub route: Option<String>,
    /// Request path with redacted query parameters, length-bounded.
    pub path: Option<String>,
    /// HTTP status code of the response.
    pub status: Option<u16>,
    /// gRPC status code, from the response headers (trailers-only) or trailers.
    pub grpc_status: Option<i32>,
    /// Time from the request entering the layer to the end of the response body, in microseconds.
    pub latency_us: Option<u64>,
    /// Request id, from the configured header (`x-request-id` by default).
    pub request_id: Option<String>,
    /// Who acted, as set by the handler through [`AuditContext`](crate::AuditContext).
    pub actor: Option<String>,
    /// Client address: the connection's peer, or the forwarded address when it came from a trusted proxy.
    pub client_addr: Option<IpAddr>,
    /// `User-Agent` header.
    pub user_agent: Option<String>,
    /// Custom attributes (bounded in number and length).
    pub attributes: BTreeMap<String, String>,
    /// With [integrity](crate::AuditLayerBuilder::integrity) on: the [`hash`](Self::hash) of the event before
    /// this one in the same boot (all zeros for the first), set by the worker. `None` without integrity, and in
    /// a record written before schema version 3.
    #[serde(default)]
    pub prev_hash: Option<Hash>,
    /// With [integrity](crate::AuditLayerBuilder::integrity) on: the hash that links this event into its boot's
    /// chain, `SHA-256(domain ‖ prev_hash ‖ canonical encoding)` (the encoding is specified in the README's
    /// "Integrity" section), set by the worker.
    #[serde(default)]
    pub hash: Option<Hash>,
}

// Written by hand rather than derived, so that [`Unchained`] shares it: the same fields, in the same order, as
// the derive wrote them (the spill's binary records depend on that order).
impl Serialize for AuditEvent {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut fields = s.serialize_struct("AuditEvent", 21)?;
        self.serialize_unchained(&mut fields)?;
        fields.serialize_field("prev_hash", &self.prev_hash)?;
        fields.serialize_field("hash", &self.hash)?;
        fields.end()
    }
}

impl AuditEvent {
    /// Every field but `prev_hash` and `hash`, which come last.
    fn serialize_unchained<S: SerializeStruct>(&self, fields: &mut S) -> Result<(), S::Error> {
        struct Time<'a>(&'a SystemTime);
        impl Serialize for Time<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                rfc3339::serialize(self.0, s)
            }
        }
        fields.serialize_field("version", &self.version)?;
        fields.serialize_field("id", &self.id)?;
        fields.serialize_field("instance", &self.instance)?;
        fields.serialize_field("boot", &self.boot)?;
        fields.serialize_field("seq", &self.seq)?;
        fields.serialize_field("time", &Time(&self.time))?;
        fields.serialize_field("kind", &self.kind)?;
        fields.serialize_field("outcome", &self.outcome)?;
        fields.serialize_field("method", &self.method)?;
        fields.serialize_field("route", &self.route)?;
        fields.serialize_field("path", &self.path)?;
        fields.serialize_field("status", &self.status)?;
        fields.serialize_field("grpc_status", &self.grpc_status)?;
        fields.serialize_field("latency_us", &self.latency_us)?;
        fields.serialize_field("request_id", &self.request_id)?;
        fields.serialize_field("actor", &self.actor)?;
        fields.serialize_field("client_addr", &self.client_addr)?;
        fields.serialize_field("user_agent", &self.user_agent)?;
        fields.serialize_field("attributes", &self.attributes)
    }
}

/// Appends `event` as JSON, exactly as `serde_json` writes it, but with the chain's two hashes written
/// directly: hex digits need no escaping, which `serde_json` would check them for byte by byte (with integrity on,
/// they are a fifth of a line).
pub(crate) fn write_json(event: &AuditEvent, out: &mut Vec<u8>) -> serde_json::Result<()> {
    if event.prev_hash.is_none() && event.hash.is_none() {
        return serde_json::to_writer(out, event);
    }
    serde_json::to_writer(&mut *out, &Unchained(event))?;
    out.pop(); // its closing brace
    for (key, hash) in [(&b",\"prev_hash\":"[..], event.prev_hash), (b",\"hash\":", event.hash)] {
        out.extend_from_slice(key);
        match hash {
            Some(hash) => {
                out.push(b'"');
                out.extend_from_slice(const_hex::Buffer::<32>::new().format(&hash.0).as_bytes());
                out.push(b'"');
            }
            None => out.extend_from_slice(b"null"),
        }
    }
    out.push(b'}');
    Ok(())
}

/// An event serialised without its chain fields (`prev_hash`, `hash`), for [`write_json`].
struct Unchained<'a>(&'a AuditEvent);

impl Serialize for Unchained<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut fields = s.serialize_struct("AuditEvent", 19)?;
        self.0.serialize_unchained(&mut fields)?;
        fields.end()
    }
}

/// A SHA-256 hash in an event's chain: 32 bytes, written as 64 lowercase hex digits in JSON and text.
///
/// ```
/// use tower_audit::Hash;
///
/// let hash: Hash = "ab".repeat(32).parse().unwrap();
/// assert_eq!(hash.0, [0xab; 32]);
/// assert_eq!(hash.to_string(), "ab".repeat(32));
/// assert_eq!("ab".parse::<Hash>().unwrap_err().to_string(), "a hash is 64 hex digits");
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Hash(pub [u8; 32]);

impl Hash {
    /// All zeros: the `prev_hash` of a boot's first event.
    pub const ZERO: Hash = Hash([0; 32]);
}

impl fmt::Display for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(const_hex::Buffer::<32>::new().format(&self.0))
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hash({self})")
    }
}

/// Why a text is not a [`Hash`](struct@Hash).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a hash is 64 hex digits")]
pub struct ParseHashError;

impl std::str::FromStr for Hash {
    type Err = ParseHashError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let digits = s.as_bytes();
        if digits.len() != 64 {
            return Err(ParseHashError);
        }
        // const-hex decodes with SIMD where the CPU has it (the verifier reads two hashes per event); the length
        // is checked first, so a `0x` prefix, which it would take, is refused.
        const_hex::decode_to_array(digits).map(Hash).map_err(|_| ParseHashError)
    }
}

impl Serialize for Hash {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(const_hex::Buffer::<32>::new().format(&self.0))
        } else {
            self.0.serialize(s)
        }
    }
}

impl<'de> Deserialize<'de> for Hash {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            // A visitor rather than `Cow<str>`, which serde always makes owned: no allocation per hash.
            struct Hex;
            impl serde::de::Visitor<'_> for Hex {
                type Value = Hash;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("64 hexadecimal digits")
                }
                fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Hash, E> {
                    text.parse().map_err(E::custom)
                }
            }
            d.deserialize_str(Hex)
        } else {
            <[u8; 32]>::deserialize(d).map(Hash)
        }
    }
}

impl AuditEvent {
    /// Whether the worker made this event about the pipeline itself ([`kind::AUDIT_BOOT`],
    /// [`kind::AUDIT_SHUTDOWN`], [`kind::AUDIT_GAP`], [`kind::AUDIT_CHECKPOINT`]) rather than a request or a handler recording it.
    ///
    /// ```
    /// use tower_audit::{AuditEvent, kind};
    /// assert!(AuditEvent::new(kind::AUDIT_BOOT).is_pipeline_event());
    /// assert!(!AuditEvent::new("auth.login").is_pipeline_event());
    /// ```
    pub fn is_pipeline_event(&self) -> bool {
        kind::is_pipeline(&self.kind)
    }

    /// A custom event of the given kind, dated now, outcome [`Outcome::Success`].
    pub fn new(kind: impl Into<Cow<'static, str>>) -> Self {
        Self::with_time(kind.into(), SystemTime::now())
    }

    pub(crate) fn with_time(kind: Cow<'static, str>, time: SystemTime) -> Self {
        Self {
            version: SCHEMA_VERSION,
            id: Uuid::nil(),
            instance: None,
            boot: None,
            seq: 0,
            time,
            kind,
            outcome: Outcome::Success,
            method: None,
            route: None,
            path: None,
            status: None,
            grpc_status: None,
            latency_us: None,
            request_id: None,
            actor: None,
            client_addr: None,
            user_agent: None,
            attributes: BTreeMap::new(),
            prev_hash: None,
            hash: None,
        }
    }

    /// Sets who acted.
    pub fn actor(mut self, actor: impl Into<String>) -> Self {
        self.actor = Some(actor.into());
        self
    }

    /// Sets the outcome.
    pub fn outcome(mut self, outcome: Outcome) -> Self {
        self.outcome = outcome;
        self
    }

    /// Adds (or replaces) a custom attribute.
    pub fn attribute(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.attributes.insert(key.into(), value.into());
        self
    }

    /// Bounds and sanitises every text field a user could have set.
    pub(crate) fn enforce_limits(&mut self, limits: &Limits) {
        if needs_bounding(&self.kind, limits.max_field_len) {
            self.kind = Cow::Owned(bounded(&self.kind, limits.max_field_len));
        }
        for field in [&mut self.actor, &mut self.request_id, &mut self.user_agent, &mut self.route] {
            bound_in_place(field, limits.max_field_len);
        }
        bound_in_place(&mut self.path, limits.max_path_len);
        if let Some(method) = &self.method
            && needs_bounding(method, limits.max_field_len)
        {
            self.method = Some(Cow::Owned(bounded(method, limits.max_field_len)));
        }
        let attributes_ok = self.attributes.len() <= limits.max_attributes
            && self
                .attributes
                .iter()
                .all(|(k, v)| !needs_bounding(k, limits.max_field_len) && !needs_bounding(v, limits.max_field_len));
        if !attributes_ok {
            self.attributes = std::mem::take(&mut self.attributes)
                .into_iter()
                .take(limits.max_attributes)
                .map(|(k, v)| (bounded(&k, limits.max_field_len), bounded(&v, limits.max_field_len)))
                .collect();
        }
    }
}

impl AuditEvent {
    /// An estimate of the memory this event holds (its own size plus its text), for the queue's byte budget.
    pub(crate) fn heap_size(&self) -> usize {
        owned(&self.kind).map_or(0, String::len)
            + heap_size(
                [
                    self.method.as_ref().and_then(owned),
                    self.route.as_ref(),
                    self.path.as_ref(),
                    self.request_id.as_ref(),
                    self.actor.as_ref(),
                    self.user_agent.as_ref(),
                ],
                &self.attributes,
            )
    }
}

/// A text the event owns (none when it borrows a `'static` one).
#[allow(clippy::ptr_arg, reason = "which variant it is, is the question")]
pub(crate) fn owned<'a>(text: &'a Cow<'static, str>) -> Option<&'a String> {
    if let Cow::Owned(text) = text { Some(text) } else { None }
}

/// [`AuditEvent::heap_size`] of an event with these owned texts and attributes (and a borrowed kind).
#[inline(always)]
pub(crate) fn heap_size<'a>(
    texts: [Option<&String>; 6],
    attributes: impl IntoIterator<Item = (&'a String, &'a String)>,
) -> usize {
    /// Per attribute: two `String` headers and a share of the tree's node.
    const PER_ATTRIBUTE: usize = 64;
    std::mem::size_of::<AuditEvent>()
        + texts.into_iter().flatten().map(String::len).sum::<usize>()
        + attributes.into_iter().map(|(k, v)| k.len() + v.len() + PER_ATTRIBUTE).sum::<usize>()
}

fn needs_bounding(s: &str, max: usize) -> bool {
    s.len() > max || !is_clean(s)
}

fn bound_in_place(field: &mut Option<String>, max: usize) {
    if let Some(value) = field
        && needs_bounding(value, max)
    {
        *value = bounded(value, max);
    }
}

/// How a request or action ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Outcome {
    /// 1xx, 2xx and 3xx; gRPC `OK`.
    Success,
    /// 401 and 403; gRPC `UNAUTHENTICATED` and `PERMISSION_DENIED`.
    Denied,
    /// Other 4xx; gRPC codes that blame the caller (`INVALID_ARGUMENT`, `NOT_FOUND`, …).
    ClientError,
    /// 5xx; gRPC codes that blame the server (`INTERNAL`, `UNAVAILABLE`, …).
    ServerError,
    /// The inner service or the response body returned an error.
    Error,
    /// The response future or body was dropped before the end (client went away, timeout);
    /// gRPC `CANCELLED`.
    Cancelled,
}

impl Outcome {
    /// The outcome an HTTP status code stands for.
    ///
    /// ```
    /// use http::StatusCode;
    /// use tower_audit::Outcome;
    /// assert_eq!(Outcome::from_http_status(StatusCode::FORBIDDEN), Outcome::Denied);
    /// assert_eq!(Outcome::from_http_status(StatusCode::CONFLICT), Outcome::ClientError);
    /// ```
    pub fn from_http_status(status: StatusCode) -> Self {
        match status.as_u16() {
            401 | 403 => Outcome::Denied,
            400..=499 => Outcome::ClientError,
            500..=599 => Outcome::ServerError,
            _ => Outcome::Success,
        }
    }

    /// The outcome a gRPC status code stands for.
    ///
    /// ```
    /// use tower_audit::Outcome;
    /// assert_eq!(Outcome::from_grpc_code(0), Outcome::Success);
    /// assert_eq!(Outcome::from_grpc_code(16), Outcome::Denied);
    /// assert_eq!(Outcome::from_grpc_code(5), Outcome::ClientError);
    /// assert_eq!(Outcome::from_grpc_code(13), Outcome::ServerError);
    /// ```
    pub fn from_grpc_code(code: i32) -> Self {
        match code {
            0 => Outcome::Success,
            1 => Outcome::Cancelled,
            7 | 16 => Outcome::Denied,
            3 | 5 | 6 | 8 | 9 | 10 | 11 => Outcome::ClientError,
            _ => Outcome::ServerError,
        }
    }

    /// The outcome named `name` (as [`as_str`](Self::as_str) writes it).
    #[cfg(any(feature = "sqlite", feature = "postgres"))]
    pub(crate) fn from_name(name: &str) -> Option<Self> {
        [
            Outcome::Success,
            Outcome::Denied,
            Outcome::ClientError,
            Outcome::ServerError,
            Outcome::Error,
            Outcome::Cancelled,
        ]
        .into_iter()
        .find(|o| o.as_str() == name)
    }

    /// The name used in serialised events (`"success"`, `"denied"`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Denied => "denied",
            Outcome::ClientError => "client_error",
            Outcome::ServerError => "server_error",
            Outcome::Error => "error",
            Outcome::Cancelled => "cancelled",
        }
    }
}

/// Reading text fields with fewer allocations (a trail is read back an event at a time by the verifier): the
/// kinds and methods the pipeline writes are borrowed from constants, an instance name is copied once.
mod text {
    use std::borrow::Cow;
    use std::fmt;
    use std::marker::PhantomData;
    use std::sync::Arc;

    use serde::Deserializer;
    use serde::de::{Error, Visitor};

    use super::kind;

    /// Names the pipeline writes over and over.
    const KNOWN: &[&str] = &[
        kind::HTTP_REQUEST,
        kind::GRPC_CALL,
        kind::AUDIT_GAP,
        kind::AUDIT_BOOT,
        kind::AUDIT_SHUTDOWN,
        kind::AUDIT_CHECKPOINT,
        kind::AUDIT_RESPONSE_WITHHELD,
        kind::HTTP_INTENT,
        kind::GRPC_INTENT,
        "GET",
        "POST",
        "PUT",
        "PATCH",
        "DELETE",
        "HEAD",
        "OPTIONS",
    ];

    /// A text made by `make` from a borrowed `&str`, or `None` for `null`.
    struct Text<T>(fn(&str) -> T, PhantomData<T>);

    impl<'de, T> Visitor<'de> for Text<T> {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a string")
        }
        fn visit_str<E: Error>(self, text: &str) -> Result<T, E> {
            Ok((self.0)(text))
        }
    }

    struct Opt<T>(fn(&str) -> T, PhantomData<T>);

    impl<'de, T> Visitor<'de> for Opt<T> {
        type Value = Option<T>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a string or null")
        }
        fn visit_none<E: Error>(self) -> Result<Option<T>, E> {
            Ok(None)
        }
        fn visit_unit<E: Error>(self) -> Result<Option<T>, E> {
            Ok(None)
        }
        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Option<T>, D::Error> {
            d.deserialize_str(Text(self.0, PhantomData)).map(Some)
        }
    }

    fn known_or_owned(text: &str) -> Cow<'static, str> {
        match KNOWN.iter().find(|known| **known == text) {
            Some(known) => Cow::Borrowed(known),
            None => Cow::Owned(text.to_owned()),
        }
    }

    pub(super) fn cow<'de, D: Deserializer<'de>>(d: D) -> Result<Cow<'static, str>, D::Error> {
        d.deserialize_str(Text(known_or_owned, PhantomData))
    }

    pub(super) fn opt_cow<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Cow<'static, str>>, D::Error> {
        d.deserialize_option(Opt(known_or_owned, PhantomData))
    }

    pub(super) fn opt_arc<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Arc<str>>, D::Error> {
        d.deserialize_option(Opt(|text| Arc::from(text), PhantomData))
    }
}

pub(crate) mod rfc3339 {
    use std::time::SystemTime;

    use serde::{Deserializer, Serializer, de::Error};

    pub(crate) fn serialize<S: Serializer>(time: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_rfc3339_micros(*time))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        // A visitor rather than `Cow<str>`, which serde always makes owned: no allocation per event.
        struct Text;
        impl serde::de::Visitor<'_> for Text {
            type Value = SystemTime;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an RFC 3339 time")
            }
            fn visit_str<E: Error>(self, text: &str) -> Result<SystemTime, E> {
                humantime::parse_rfc3339(text).map_err(E::custom)
            }
        }
        d.deserialize_str(Text)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn text_fields_read_back_borrowed_when_known_and_null_as_none() {
        let mut event = every_field();
        event.instance = Some("host-1".into());
        event.kind = Cow::Borrowed(kind::HTTP_REQUEST);
        event.method = Some(Cow::Borrowed("PATCH"));
        let back: AuditEvent = serde_json::from_str(&serde_json::to_string(&event).unwrap()).unwrap();
        assert_eq!(back, event);
        assert!(matches!(back.kind, Cow::Borrowed(kind::HTTP_REQUEST)));
        assert!(matches!(back.method, Some(Cow::Borrowed("PATCH"))));
        event.kind = Cow::Owned("custom.kind".into());
        event.method = Some(Cow::Owned("PROPFIND".into()));
        event.instance = None;
        let back: AuditEvent = serde_json::from_str(&serde_json::to_string(&event).unwrap()).unwrap();
        assert_eq!(back, event);
        // Absent or null: `None`, as before.
        let mut json = serde_json::to_value(&event).unwrap();
        json["method"] = serde_json::Value::Null;
        json.as_object_mut().unwrap().remove("instance");
        let back: AuditEvent = serde_json::from_value(json.clone()).unwrap();
        assert_eq!((back.method, back.instance), (None, None));
        json.as_object_mut().unwrap().remove("method");
        assert_eq!(serde_json::from_value::<AuditEvent>(json).unwrap().method, None);
    }

    #[test]
    fn hashes_parse_from_hex_and_reject_anything_else() {
        let hash = Hash(std::array::from_fn(|i| (i as u8).wrapping_mul(37)));
        let text = hash.to_string();
        assert_eq!(text.parse::<Hash>(), Ok(hash));
        assert_eq!(text.to_uppercase().parse::<Hash>(), Ok(hash));
        // Every byte that is not a hex digit, at the first and the last place.
        for bad in (0..=255u8).filter(|b| !b.is_ascii_hexdigit()) {
            for at in [0, 63] {
                let mut digits = text.clone().into_bytes();
                digits[at] = bad;
                let digits = String::from_utf8_lossy(&digits).into_owned();
                assert_eq!(digits.parse::<Hash>(), Err(ParseHashError), "byte {bad:#x} at {at}");
            }
        }
        assert_eq!(text[..62].parse::<Hash>(), Err(ParseHashError));
        assert_eq!(format!("{text}0").parse::<Hash>(), Err(ParseHashError));
        // 64 characters with a `0x` prefix are 62 digits, not a hash.
        assert_eq!(format!("0x{}", &text[2..]).parse::<Hash>(), Err(ParseHashError));
        assert_eq!(format!("0X{}", &text[2..]).parse::<Hash>(), Err(ParseHashError));
        // Mixed case reads too.
        let mixed: String =
            text.chars().enumerate().map(|(i, c)| if i % 2 == 0 { c.to_ascii_uppercase() } else { c }).collect();
        assert_eq!(mixed.parse::<Hash>(), Ok(hash));
    }

    /// An event with every field set (and text that needs escaping), for round-trip tests.
    pub(crate) fn every_field() -> AuditEvent {
        let mut event = AuditEvent::new("auth.login")
            .actor("bob")
            .outcome(Outcome::Denied)
            .attribute("reason", "bad_password")
            .attribute("quote", "v\"\n");
        event.id = Uuid::from_u128(42);
        event.instance = Some("web-1-5f3a9c1e".into());
        event.boot = Some(Uuid::from_u128(7));
        event.seq = 7;
        event.method = Some("POST".into());
        event.route = Some("/login".into());
        event.path = Some("/login?x=1".into());
        event.status = Some(401);
        event.grpc_status = Some(16);
        event.latency_us = Some(1234);
        event.request_id = Some("req-1".into());
        event.client_addr = Some("203.0.113.9".parse().unwrap());
        event.user_agent = Some("curl/8".into());
        event.time = SystemTime::UNIX_EPOCH + std::time::Duration::from_micros(1_700_000_000_123_456);
        event
    }

    /// The hand-written `Serialize` writes the fields the derive wrote, in its order, and `write_json` writes
    /// exactly what `serde_json` does, with or without the chain's hashes.
    #[test]
    fn json_is_written_field_for_field_with_or_without_hashes() {
        let mut event = every_field();
        let expected = "version id instance boot seq time kind outcome method route path status grpc_status \
                        latency_us request_id actor client_addr user_agent attributes prev_hash hash";
        let json = serde_json::to_string(&event).unwrap();
        assert!(json.starts_with(r#"{"version":3,"id":"00000000-0000-0000-0000-00000000002a","instance""#), "{json}");
        assert!(json.ends_with(r#""prev_hash":null,"hash":null}"#), "{json}");
        let at: Vec<usize> =
            expected.split_whitespace().map(|key| json.find(&format!(r#""{key}":"#)).unwrap()).collect();
        assert!(at.is_sorted(), "{json}");
        assert_eq!(serde_json::from_str::<serde_json::Map<_, _>>(&json).unwrap().len(), at.len());
        for (prev, hash) in [
            (None, None),
            (Some(Hash([0xa5; 32])), None),
            (None, Some(Hash([1; 32]))),
            (Some(Hash(std::array::from_fn(|i| i as u8 * 8))), Some(Hash([0xff; 32]))),
        ] {
            (event.prev_hash, event.hash) = (prev, hash);
            let mut out = b"before ".to_vec();
            write_json(&event, &mut out).unwrap();
            assert_eq!(std::str::from_utf8(&out[7..]).unwrap(), serde_json::to_string(&event).unwrap());
            assert_eq!(serde_json::from_slice::<AuditEvent>(&out[7..]).unwrap(), event);
        }
        assert!(String::from_utf8(serde_json::to_vec(&event).unwrap()).unwrap().ends_with(&format!(
            r#""prev_hash":"{}","hash":"{}"}}"#,
            "0008101820283038404850586068707880889098a0a8b0b8c0c8d0d8e0e8f0f8",
            "ff".repeat(32)
        )));
    }

    #[test]
    fn json_round_trip_keeps_every_field() {
        let event = every_field();

        let json = serde_json::to_string(&event).unwrap();
        assert!(json.contains(r#""time":"2023-11-14T22:13:20.123456Z""#), "{json}");
        assert!(json.contains(r#""outcome":"denied""#), "{json}");
        assert!(
            json.contains(r#""instance":"web-1-5f3a9c1e","boot":"00000000-0000-0000-0000-000000000007""#),
            "{json}"
        );
        let back: AuditEvent = serde_json::from_str(&json).unwrap();
        assert_eq!(back, event);
    }

    #[test]
    fn a_version_1_record_reads_without_instance_and_boot() {
        let line = r#"{"version":1,"id":"00000000-0000-0000-0000-00000000002a","seq":7,"time":"2023-11-14T22:13:20.123456Z","kind":"auth.login","outcome":"denied","method":"POST","route":null,"path":null,"status":401,"grpc_status":null,"latency_us":null,"request_id":null,"actor":"bob","client_addr":null,"user_agent":null,"attributes":{}}"#;
        let event: AuditEvent = serde_json::from_str(line).unwrap();
        assert_eq!((event.version, event.seq, event.instance, event.boot), (1, 7, None, None));
        assert_eq!((event.id, event.status, event.actor.as_deref()), (Uuid::from_u128(42), Some(401), Some("bob")));
    }

    #[test]
    fn limits_bound_user_supplied_fields() {
        let limits = Limits { max_field_len: 8, max_path_len: 8, max_attributes: 2 };
        let mut event = AuditEvent::new("kind\nwith newline")
            .actor("a".repeat(100))
            .attribute("a", "1")
            .attribute("b", "2")
            .attribute("c", "3");
        event.enforce_limits(&limits);
        assert!(event.kind.len() <= 8 && !event.kind.contains('\n'), "{:?}", event.kind);
        assert!(event.actor.as_ref().unwrap().len() <= 8);
        assert_eq!(event.attributes.len(), 2);
    }

    #[test]
    fn limits_replace_line_separators_and_bidi_controls() {
        let limits = Limits { max_field_len: 64, max_path_len: 64, max_attributes: 4 };
        let mut event = AuditEvent::new("user.renamed\u{2028}forged")
            .actor("eve\u{202e}nimda")
            .attribute("file\u{2066}", "invoice\u{200f}.pdf\u{2029}");
        event.user_agent = Some("agent\u{061c}".into());
        event.enforce_limits(&limits);
        assert_eq!(event.kind, "user.renamed\u{fffd}forged");
        assert_eq!(event.actor.as_deref(), Some("eve\u{fffd}nimda"));
        assert_eq!(event.user_agent.as_deref(), Some("agent\u{fffd}"));
        assert_eq!(event.attributes["file\u{fffd}"], "invoice\u{fffd}.pdf\u{fffd}");
        assert_eq!(event.attributes.len(), 1);
    }

    #[test]
    fn outcome_from_status() {
        assert_eq!(Outcome::from_http_status(StatusCode::OK), Outcome::Success);
        assert_eq!(Outcome::from_http_status(StatusCode::FOUND), Outcome::Success);
        assert_eq!(Outcome::from_http_status(StatusCode::UNAUTHORIZED), Outcome::Denied);
        assert_eq!(Outcome::from_http_status(StatusCode::NOT_FOUND), Outcome::ClientError);
        assert_eq!(Outcome::from_http_status(StatusCode::BAD_GATEWAY), Outcome::ServerError);
        assert_eq!(Outcome::from_grpc_code(7), Outcome::Denied);
        assert_eq!(Outcome::from_grpc_code(1), Outcome::Cancelled);
        assert_eq!(Outcome::from_grpc_code(14), Outcome::ServerError);
    }
}
