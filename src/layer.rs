//! The layer and its builder, which also spawns the pipeline's worker. Its settings' types are in `config`.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderName;
use ipnet::IpNet;
use tokio::sync::watch;
use tower_layer::Layer;

use crate::call::Deadline;
use crate::client_addr::ClientAddrSource;
use crate::config::{
    DEFAULT_BATCH_SIZE, DEFAULT_CAPACITY, DEFAULT_FLUSH_INTERVAL, DEFAULT_MAX_QUEUED_BYTES,
    DEFAULT_REDACTED_QUERY_PARAMS, DEFAULT_SINK_TIMEOUT, Overflow, Retry, SENSITIVE_HEADER_PARTS, SENSITIVE_HEADERS,
};
use crate::delivery::Sinks;
use crate::error::ConfigError;
use crate::handle::AuditHandle;
use crate::integrity::Integrity;
use crate::integrity::chain::Chain;
use crate::lifecycle::{Settings, boot_event};
use crate::pipeline::{Core, RequestConfig, Shared};
use crate::policy::Policy;
use crate::sanitize::Limits;
use crate::service::AuditService;
use crate::sink::{AuditSink, DynSink};
use crate::spill::Spill;
use crate::spill::drain::Drain;
use crate::spill::spool;
use crate::stamp::{Stamper, default_instance, instance_name, new_boot};
use crate::stats::add;
use crate::worker::{Output, Queue, SpillOutput, Worker, WorkerConfig};

/// A Tower layer that records one audit event per request, without ever waiting on the sink.
///
/// Built with [`AuditLayer::builder`], which also spawns the pipeline's worker and returns its
/// [`AuditHandle`]. Cheap to clone: clones feed the same pipeline.
#[derive(Clone)]
pub struct AuditLayer {
    core: Arc<Core>,
    policy: Arc<Policy>,
}

impl AuditLayer {
    /// Starts configuring a pipeline that writes into `sink`.
    pub fn builder(sink: impl AuditSink) -> AuditLayerBuilder {
        AuditLayerBuilder {
            sink: Box::new(sink),
            fallback: None,
            capacity: DEFAULT_CAPACITY,
            max_queued_bytes: DEFAULT_MAX_QUEUED_BYTES,
            batch_size: DEFAULT_BATCH_SIZE,
            flush_interval: DEFAULT_FLUSH_INTERVAL,
            overflow: Overflow::Drop,
            retry: Retry::default(),
            sink_timeout: DEFAULT_SINK_TIMEOUT,
            warn_interval: Duration::from_secs(10),
            limits: Limits { max_field_len: 256, max_path_len: 1024, max_attributes: 32 },
            redact_query: DEFAULT_REDACTED_QUERY_PARAMS.iter().map(|s| (*s).to_owned()).collect(),
            keep_query: true,
            context_in_extensions: false,
            request_id_header: "x-request-id".to_owned(),
            capture_headers: Vec::new(),
            allowed_sensitive_headers: Vec::new(),
            trusted_proxies: Vec::new(),
            client_addr_source: ClientAddrSource::Peer,
            instance: None,
            spill: None,
            policy: Policy::new(),
            integrity: None,
        }
    }
}

impl AuditLayer {
    /// A layer over the same pipeline (same queue, worker, sink and handle) that decides by `policy` instead
    /// of the builder's. For a policy per group of routes, e.g. with Axum's `Router::route_layer`, or one
    /// route's `MethodRouter::layer`; apply each request to one layer only, or it is recorded twice.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// use std::time::Duration;
    /// use tower_audit::{AuditLayer, MemorySink, Policy, Rule};
    ///
    /// let (layer, _handle) = AuditLayer::builder(MemorySink::new()).build().unwrap();
    /// let durable = layer.with_policy(Policy::new().rule(Rule::any().durable(Duration::from_secs(2)))).unwrap();
    /// # let _ = durable;
    /// # }
    /// ```
    pub fn with_policy(&self, policy: Policy) -> Result<AuditLayer, ConfigError> {
        policy.check()?;
        Ok(AuditLayer { core: Arc::clone(&self.core), policy: Arc::new(policy) })
    }
}

impl<S> Layer<S> for AuditLayer {
    type Service = AuditService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuditService::new(inner, Arc::clone(&self.core), Arc::clone(&self.policy))
    }
}

impl fmt::Debug for AuditLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditLayer").field("config", &self.core.config).finish_non_exhaustive()
    }
}

/// Configures an [`AuditLayer`]; every setting has a documented default.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use tower_audit::{AuditLayer, ClientAddrSource, JsonLinesSink, Overflow, Retry, TracingSink};
///
/// let path = std::env::temp_dir().join("audit-builder-example.jsonl");
/// let (layer, handle) = AuditLayer::builder(JsonLinesSink::open(path)?)
///     .capacity(16_384)
///     .batch_size(1024)
///     .flush_interval(Duration::from_millis(100))
///     .overflow(Overflow::Drop)
///     .retry(Retry::default().max_retries(3))
///     .fallback(TracingSink::new())
///     .redact_query_params(["token", "session"])
///     .client_addr_source(ClientAddrSource::XForwardedFor)
///     .trusted_proxies(["10.0.0.0/8"])
///     .capture_header("x-tenant-id")
///     .build()?;
/// # drop((layer, handle));
/// # Ok(())
/// # }
/// ```
pub struct AuditLayerBuilder {
    sink: Box<dyn DynSink>,
    fallback: Option<Box<dyn DynSink>>,
    capacity: usize,
    max_queued_bytes: usize,
    batch_size: usize,
    flush_interval: Duration,
    overflow: Overflow,
    retry: Retry,
    sink_timeout: Duration,
    warn_interval: Duration,
    limits: Limits,
    redact_query: Vec<String>,
    keep_query: bool,
    context_in_extensions: bool,
    request_id_header: String,
    capture_headers: Vec<String>,
    allowed_sensitive_headers: Vec<String>,
    trusted_proxies: Vec<String>,
    client_addr_source: ClientAddrSource,
    instance: Option<String>,
    spill: Option<Spill>,
    policy: Policy,
    integrity: Option<Integrity>,
}

impl AuditLayerBuilder {
    /// How many events the queue holds ([`DEFAULT_CAPACITY`]). Memory is bounded by this many events.
    pub fn capacity(mut self, capacity: usize) -> Self {
        self.capacity = capacity;
        self
    }

    /// The most bytes the queued events may hold ([`DEFAULT_MAX_QUEUED_BYTES`]), estimated from their text.
    /// Past it events are dropped and counted (`dropped_queue_bytes`). Besides the queue, the pipeline keeps the
    /// strings of written events for the texts of requests to come (at most 512 KiB), and the states of
    /// finished requests for requests to come (at most 256, about 70 KiB).
    pub fn max_queued_bytes(mut self, bytes: usize) -> Self {
        self.max_queued_bytes = bytes;
        self
    }

    /// The most events handed to the sink at once ([`DEFAULT_BATCH_SIZE`]). A full batch waiting wakes the
    /// worker before the flush interval ends.
    pub fn batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size;
        self
    }

    /// How often the worker drains the queue when fewer than a batch's worth wait ([`DEFAULT_FLUSH_INTERVAL`]).
    /// This bounds how long an event waits before it reaches the sink when traffic is light.
    pub fn flush_interval(mut self, interval: Duration) -> Self {
        self.flush_interval = interval;
        self
    }

    /// What to do when the queue is full ([`Overflow::Drop`]).
    pub fn overflow(mut self, overflow: Overflow) -> Self {
        self.overflow = overflow;
        self
    }

    /// How failed batches are retried ([`Retry::default`]).
    pub fn retry(mut self, retry: Retry) -> Self {
        self.retry = retry;
        self
    }

    /// The longest one sink call may take before it counts as failed ([`DEFAULT_SINK_TIMEOUT`]). A sink that
    /// never returns cannot stall the pipeline for longer than this per attempt.
    pub fn sink_timeout(mut self, timeout: Duration) -> Self {
        self.sink_timeout = timeout;
        self
    }

    /// Where batches go after the primary sink failed them `max_retries + 1` times (none by default: they
    /// are counted as `lost`). A local [`JsonLinesSink`](crate::JsonLinesSink) is a good choice.
    pub fn fallback(mut self, sink: impl AuditSink) -> Self {
        self.fallback = Some(Box::new(sink));
        self
    }

    /// Which requests are recorded and how their events are delivered (see [`Policy`]): skip health checks,
    /// sample noisy reads, make the events of login, logout and the like durable before their response.
    /// Without one, every request is recorded best effort. A rule's setting that cannot hold is refused by
    /// `build` ([`ConfigError::InvalidRule`]).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// use std::time::Duration;
    /// use tower_audit::{AuditLayer, MemorySink, Policy, Rule};
    ///
    /// let policy = Policy::new()
    ///     .rule(Rule::route("/health").skip())
    ///     .rule(Rule::route("/api/auth/*").durable(Duration::from_secs(2)));
    /// let (layer, handle) = AuditLayer::builder(MemorySink::new()).policy(policy).build().unwrap();
    /// # let _ = (layer, handle);
    /// # }
    /// ```
    pub fn policy(mut self, policy: Policy) -> Self {
        self.policy = policy;
        self
    }

    /// Puts a disk [`Spill`] between the queue and the sink: every batch is appended to a checksummed log on
    /// local disk before the sink sees it, so a sink outage (for as long as the disk budget lasts) or a crash
    /// of the process loses no event that reached the disk. Opened (and recovered) by
    /// [`build`](Self::build). Not together with a [`fallback`](Self::fallback).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use std::time::Duration;
    /// use tower_audit::{AuditLayer, MemorySink, Spill, kind};
    ///
    /// let dir = std::env::temp_dir().join(format!("tower-audit-doc-{}", std::process::id()));
    /// let sink = MemorySink::new();
    /// let (_layer, handle) = AuditLayer::builder(sink.clone()).spill(Spill::new(&dir)).build()?;
    /// let report = handle.shutdown(Duration::from_secs(5)).await;
    /// assert!(report.drained);
    /// let kinds: Vec<_> = sink.events().into_iter().map(|e| e.kind).collect();
    /// assert_eq!(kinds, [kind::AUDIT_BOOT, kind::AUDIT_SHUTDOWN]);
    /// # std::fs::remove_dir_all(&dir)?;
    /// # Ok(()) }
    /// ```
    pub fn spill(mut self, spill: Spill) -> Self {
        self.spill = Some(spill);
        self
    }

    /// Makes the trail tamper-evident: the worker links every event it writes into a hash chain per boot
    /// (`prev_hash`, `hash`) and signs checkpoints of the chain (`audit.checkpoint` events, and the
    /// `audit.shutdown` event) with the [`Integrity`]'s Ed25519 key, into the trail and to its checkpoint sink.
    /// The hashing happens on the worker; the request path is unchanged. See the README's "Integrity" section
    /// and the verifier in the [`integrity`](crate::integrity) module.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use std::time::Duration;
    /// use tower_audit::{AuditLayer, MemorySink, integrity::{Checkpoint, Integrity}, kind};
    ///
    /// let integrity = Integrity::from_seed(&[7; 32]);
    /// let key = integrity.verifier_key();
    /// let sink = MemorySink::new();
    /// let (_layer, handle) = AuditLayer::builder(sink.clone()).integrity(integrity).build()?;
    /// handle.shutdown(Duration::from_secs(5)).await;
    /// let events = sink.events();
    /// let shutdown = events.last().unwrap();
    /// assert_eq!(shutdown.kind, kind::AUDIT_SHUTDOWN);
    /// // The shutdown event signs the chain up to the event before it.
    /// let checkpoint = Checkpoint::from_event(shutdown).unwrap()?;
    /// checkpoint.verify(&key)?;
    /// assert_eq!((checkpoint.seq, Some(checkpoint.hash)), (events[0].seq, events[0].hash));
    /// # Ok(()) }
    /// ```
    pub fn integrity(mut self, integrity: Integrity) -> Self {
        self.integrity = Some(integrity);
        self
    }

    /// The shortest time between two `tracing` warnings about lost events (10 s). Losses in between are
    /// summed into the next warning.
    pub fn loss_warning_interval(mut self, interval: Duration) -> Self {
        self.warn_interval = interval;
        self
    }

    /// The longest any text field may be, in bytes (256). Longer values are cut and end with `…`.
    pub fn max_field_len(mut self, len: usize) -> Self {
        self.limits.max_field_len = len;
        self
    }

    /// The longest recorded path (with its query), in bytes (1024).
    pub fn max_path_len(mut self, len: usize) -> Self {
        self.limits.max_path_len = len;
        self
    }

    /// The most custom attributes one event keeps (32).
    pub fn max_attributes(mut self, n: usize) -> Self {
        self.limits.max_attributes = n;
        self
    }

    /// The name of this process in the trail: every event's [`instance`](crate::AuditEvent::instance).
    ///
    /// By default, the host name, `-` and 8 random hex digits (`web-3-5f3a9c1e`), made once per process: every
    /// pipeline of the process shares it, and a restarted process gets a new one. Name it yourself when you
    /// have a better name (a pod or service instance id). [`build`](Self::build) refuses a name that is blank,
    /// longer than [`max_field_len`](Self::max_field_len) or holds a control character
    /// ([`ConfigError::InvalidInstance`]).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), tower_audit::ConfigError> {
    /// use tower_audit::{AuditLayer, MemorySink};
    ///
    /// let (layer, handle) = AuditLayer::builder(MemorySink::new()).instance("checkout-7f9c").build()?;
    /// assert_eq!(handle.instance(), "checkout-7f9c");
    /// # drop(layer);
    /// # Ok(())
    /// # }
    /// ```
    pub fn instance(mut self, name: impl Into<String>) -> Self {
        self.instance = Some(name.into());
        self
    }

    /// Replaces the list of query parameters whose values are recorded as `REDACTED`
    /// ([`DEFAULT_REDACTED_QUERY_PARAMS`]).
    ///
    /// Pairs are split at `&` and `;`. A key is decoded as a form decoder would (`+` is a space, then
    /// percent-decoding, then trimmed) and matches a name when it, its base name or any bracketed segment equals
    /// the name, ignoring ASCII case and counting `-` and `_` as the same: with `"password"` listed,
    /// `?user[password]=…`, `?Password+=…` and `?%70assword[]=…` are all redacted.
    pub fn redact_query_params<I, N>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = N>,
        N: AsRef<str>,
    {
        self.redact_query = names.into_iter().map(|n| n.as_ref().to_ascii_lowercase()).collect();
        self
    }

    /// Whether the query string is recorded at all (yes, with redaction).
    pub fn record_query(mut self, record: bool) -> Self {
        self.keep_query = record;
        self
    }

    /// Also puts each request's [`AuditContext`](crate::AuditContext) into its extensions (off).
    ///
    /// A handler finds its context through [`AuditContext::current`](crate::AuditContext::current) (and the
    /// Axum extractor) while the layer polls it, which costs nothing when the handler does not ask. Turn this
    /// on when the handler runs on another task than the layer's (a service that spawns its work), or when your
    /// code reads the extensions (`req.extensions().get::<AuditContext>()`); every request then pays for
    /// the context, taken or not.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// use tower::{Layer, Service, ServiceExt, service_fn};
    /// use tower_audit::{AuditContext, AuditLayer, MemorySink};
    ///
    /// let (layer, _handle) = AuditLayer::builder(MemorySink::new()).context_in_extensions(true).build().unwrap();
    /// let mut svc = layer.layer(service_fn(|req: http::Request<String>| async move {
    ///     let audit = req.extensions().get::<AuditContext>().expect("put there by the layer");
    ///     audit.set_actor("alice");
    ///     Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
    /// }));
    /// svc.ready().await.unwrap().call(http::Request::new(String::new())).await.unwrap();
    /// # }
    /// ```
    pub fn context_in_extensions(mut self, on: bool) -> Self {
        self.context_in_extensions = on;
        self
    }

    /// The header the request id is read from (`x-request-id`, as set by tower-http's `SetRequestIdLayer`).
    pub fn request_id_header(mut self, name: impl Into<String>) -> Self {
        self.request_id_header = name.into();
        self
    }

    /// Records the value of a request header as the attribute `header.<name>`.
    ///
    /// [`build`](Self::build) refuses credential headers ([`SENSITIVE_HEADERS`]) always, and headers whose name
    /// contains one of [`SENSITIVE_HEADER_PARTS`] unless [`allow_sensitive_header`](Self::allow_sensitive_header)
    /// names them.
    pub fn capture_header(mut self, name: impl Into<String>) -> Self {
        self.capture_headers.push(name.into());
        self
    }

    /// Allows a header whose name contains one of [`SENSITIVE_HEADER_PARTS`] to be recorded (by
    /// [`capture_header`](Self::capture_header) or as the [`request_id_header`](Self::request_id_header)), once
    /// you know its values are no secret. [`SENSITIVE_HEADERS`] stay refused.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// use tower_audit::{AuditLayer, ConfigError, MemorySink};
    ///
    /// // oauth2-proxy passes the signed-in user on; "auth" in the name makes it suspect.
    /// let refused = AuditLayer::builder(MemorySink::new()).capture_header("x-auth-request-user").build();
    /// assert!(matches!(refused, Err(ConfigError::SensitiveHeaderNotAllowed { .. })));
    ///
    /// let allowed = AuditLayer::builder(MemorySink::new())
    ///     .capture_header("x-auth-request-user")
    ///     .allow_sensitive_header("x-auth-request-user")
    ///     .build();
    /// assert!(allowed.is_ok());
    /// # }
    /// ```
    pub fn allow_sensitive_header(mut self, name: impl Into<String>) -> Self {
        self.allowed_sensitive_headers.push(name.into());
        self
    }

    /// Where the client address is read from ([`ClientAddrSource::Peer`]: the connection's peer, no header).
    ///
    /// Name the one header your proxy sets, and list the proxy in [`trusted_proxies`](Self::trusted_proxies):
    /// only that header is read, and only from a trusted peer. [`build`](Self::build) refuses a header source
    /// without trusted proxies (the header would never be believed) and trusted proxies with the `Peer` source
    /// (they would change nothing).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), tower_audit::ConfigError> {
    /// use tower_audit::{AuditLayer, ClientAddrSource, MemorySink};
    ///
    /// // Behind a load balancer in 10.0.0.0/8 that appends to X-Forwarded-For.
    /// let (layer, handle) = AuditLayer::builder(MemorySink::new())
    ///     .client_addr_source(ClientAddrSource::XForwardedFor)
    ///     .trusted_proxies(["10.0.0.0/8"])
    ///     .build()?;
    /// # drop((layer, handle));
    /// # Ok(())
    /// # }
    /// ```
    pub fn client_addr_source(mut self, source: ClientAddrSource) -> Self {
        self.client_addr_source = source;
        self
    }

    /// Proxies (IP addresses or CIDR networks) whose header, as named by
    /// [`client_addr_source`](Self::client_addr_source), is believed. Empty by default.
    ///
    /// A header is read only when the connection's peer is one of them; a list such as `X-Forwarded-For` is
    /// then walked from the right, skipping trusted hops, and the first untrusted address is the client.
    pub fn trusted_proxies<I, P>(mut self, proxies: I) -> Self
    where
        I: IntoIterator<Item = P>,
        P: AsRef<str>,
    {
        self.trusted_proxies = proxies.into_iter().map(|p| p.as_ref().to_owned()).collect();
        self
    }

    /// Validates the configuration and spawns the worker on the current Tokio runtime.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] that names the setting: no Tokio runtime, a zero size, a batch larger than the
    /// queue, an invalid or credential-carrying header name (or one that looks like it and was not allowed), a
    /// trusted proxy that does not parse, a client address source and trusted proxies that do not go together,
    /// an instance name that cannot be recorded.
    pub fn build(self) -> Result<(AuditLayer, AuditHandle), ConfigError> {
        for (setting, value) in [("flush_interval", self.flush_interval), ("sink_timeout", self.sink_timeout)] {
            if value.is_zero() {
                return Err(ConfigError::Zero { setting });
            }
        }
        for (setting, value) in [
            ("capacity", self.capacity),
            ("max_queued_bytes", self.max_queued_bytes),
            ("batch_size", self.batch_size),
            ("max_field_len", self.limits.max_field_len),
            ("max_path_len", self.limits.max_path_len),
        ] {
            if value == 0 {
                return Err(ConfigError::Zero { setting });
            }
        }
        if let Some(spill) = &self.spill {
            for (setting, value) in [("spill max_bytes", spill.max_bytes), ("spill segment_bytes", spill.segment_bytes)]
            {
                if value == 0 {
                    return Err(ConfigError::Zero { setting });
                }
            }
            if let crate::SyncPolicy::Interval(d) = spill.sync
                && d.is_zero()
            {
                return Err(ConfigError::Zero { setting: "spill sync interval" });
            }
            if self.fallback.is_some() {
                return Err(ConfigError::SpillWithFallback);
            }
        }
        self.policy.check()?;
        if let Some(integrity) = &self.integrity {
            integrity.check()?;
        }
        if self.batch_size > self.capacity {
            return Err(ConfigError::BatchLargerThanCapacity { batch_size: self.batch_size, capacity: self.capacity });
        }
        let allowed =
            self.allowed_sensitive_headers.iter().map(|name| header_name(name)).collect::<Result<Vec<_>, _>>()?;
        let request_id_header = recordable_header(&self.request_id_header, &allowed)?;
        let capture_headers =
            self.capture_headers.iter().map(|name| recordable_header(name, &allowed)).collect::<Result<Vec<_>, _>>()?;
        let trusted_proxies = self
            .trusted_proxies
            .iter()
            .map(|p| {
                let p = p.trim();
                p.parse::<IpNet>()
                    .or_else(|_| p.parse::<std::net::IpAddr>().map(IpNet::from))
                    .map_err(|_| ConfigError::InvalidProxy(p.to_owned()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        match (self.client_addr_source.header(), trusted_proxies.is_empty()) {
            (Some(header), true) => {
                return Err(ConfigError::ClientAddrSourceWithoutTrustedProxies { header: header.to_owned() });
            }
            (None, false) => return Err(ConfigError::TrustedProxiesWithoutClientAddrSource),
            _ => {}
        }
        let instance = match &self.instance {
            Some(name) => instance_name(name, self.limits.max_field_len)?,
            None => default_instance(self.limits.max_field_len),
        };
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| ConfigError::NoRuntime)?;
        let boot = new_boot();
        let settings = Settings {
            capacity: self.capacity,
            max_queued_bytes: self.max_queued_bytes,
            batch_size: self.batch_size,
            overflow: self.overflow,
            spill: self.spill.as_ref().map(|s| (s.sync, s.max_bytes)),
        };

        // The gate in `Shared` admits events by count and bytes into an unbounded backlog.
        let shared = Arc::new(Shared::new(self.capacity, self.max_queued_bytes, self.batch_size));
        let (deadline_tx, deadline_rx) = watch::channel(None);
        let (report_tx, report_rx) = watch::channel(None);
        let deadline = Deadline(deadline_rx);
        let mut sinks =
            Sinks { primary: self.sink, fallback: self.fallback, retry: self.retry, timeout: self.sink_timeout };
        let spilling = self.spill.is_some();
        let (output, spilled, boot_event) = match &self.spill {
            None => (Output::Direct(sinks), None, boot_event(&settings, None)),
            Some(spill) => {
                let opened = spool::open(spill, &instance, boot)?;
                add(&shared.counters.recovered, opened.previous.replayed + opened.previous.corrupt);
                add(&shared.counters.corrupt, opened.previous.corrupt);
                // With a spill, a batch is retried until the sink takes it (or shutdown's deadline passes).
                sinks.retry = sinks.retry.max_retries(u32::MAX);
                let (finish_tx, finish_rx) = watch::channel(None);
                let (delivered_tx, delivered_rx) = watch::channel(0);
                let (drain_deadline_tx, drain_deadline_rx) = watch::channel(None);
                let drain = Drain {
                    log: opened.log,
                    progress: Arc::clone(&opened.progress),
                    sinks,
                    shared: Arc::clone(&shared),
                    deadline: Deadline(drain_deadline_rx),
                    batch_size: self.batch_size,
                    finish: finish_rx,
                    delivered: delivered_tx,
                };
                let output = Output::Spill(Box::new(SpillOutput {
                    spool: opened.spool,
                    drain: Some(drain),
                    task: None,
                    finish: finish_tx,
                    delivered: delivered_rx,
                    deadline: drain_deadline_tx,
                }));
                (output, Some(opened.progress), boot_event(&settings, Some(&opened.previous)))
            }
        };
        let worker = Worker {
            queue: Queue { shared: Arc::clone(&shared), spilled },
            shared: Arc::clone(&shared),
            output,
            config: WorkerConfig {
                batch_size: self.batch_size,
                flush_interval: self.flush_interval,
                warn_interval: self.warn_interval,
            },
            deadline,
            report: report_tx,
            stamper: Stamper::new(Arc::clone(&instance), boot),
            chain: self.integrity.map(|integrity| {
                let keep = self.spill.as_ref().map(|spill| spill.dir.clone());
                Chain::start(integrity, Arc::clone(&shared), keep)
            }),
            boot: Some(boot_event),
            pipeline: Default::default(),
            ahead: None,
            closing: false,
        };
        runtime.spawn(worker.run());
        #[cfg(feature = "metrics")]
        runtime.spawn(crate::metrics::run(
            Arc::clone(&shared),
            Arc::clone(&instance),
            self.flush_interval,
            report_rx.clone(),
        ));
        let core = Arc::new(Core {
            shared,
            batch_size: self.batch_size,
            config: RequestConfig {
                overflow: self.overflow,
                limits: self.limits,
                redact_query: crate::sanitize::Redact::new(self.redact_query),
                keep_query: self.keep_query,
                context_in_extensions: self.context_in_extensions,
                request_id_header,
                capture_headers,
                trusted_proxies,
                client_addr_source: self.client_addr_source,
            },
        });
        let handle = AuditHandle::new(Arc::clone(&core), deadline_tx, report_rx, instance, boot, spilling);
        Ok((AuditLayer { core, policy: Arc::new(self.policy) }, handle))
    }
}

fn header_name(name: &str) -> Result<HeaderName, ConfigError> {
    HeaderName::from_bytes(name.as_bytes()).map_err(|_| ConfigError::InvalidHeaderName(name.to_owned()))
}

/// A header the layer may record: a valid name, never a credential header, and a credential-like name only
/// when `allowed` lists it.
fn recordable_header(name: &str, allowed: &[HeaderName]) -> Result<HeaderName, ConfigError> {
    let name = header_name(name)?;
    if SENSITIVE_HEADERS.contains(&name.as_str()) {
        return Err(ConfigError::SensitiveHeader(name.to_string()));
    }
    if let Some(part) = SENSITIVE_HEADER_PARTS.iter().find(|part| name.as_str().contains(*part))
        && !allowed.contains(&name)
    {
        return Err(ConfigError::SensitiveHeaderNotAllowed { header: name.to_string(), part });
    }
    Ok(name)
}

impl fmt::Debug for AuditLayerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditLayerBuilder")
            .field("capacity", &self.capacity)
            .field("max_queued_bytes", &self.max_queued_bytes)
            .field("batch_size", &self.batch_size)
            .field("flush_interval", &self.flush_interval)
            .field("overflow", &self.overflow)
            .field("retry", &self.retry)
            .field("sink_timeout", &self.sink_timeout)
            .field("has_fallback", &self.fallback.is_some())
            .field("instance", &self.instance)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemorySink;

    fn refused(builder: AuditLayerBuilder) -> String {
        builder.build().map(drop).unwrap_err().to_string()
    }

    #[test]
    fn credential_like_headers_are_refused_by_name() {
        for (header, part) in [
            ("X-Api-Key", "key"),
            ("x-auth-request-user", "auth"),
            ("x-csrf-token", "token"),
            ("x-client-secret", "secret"),
            ("x-user-password", "password"),
            ("x-passwd", "passwd"),
            ("x-pwd", "pwd"),
            ("x-session-id", "session"),
            ("x-amz-credential", "credential"),
            ("x-cookie-consent", "cookie"),
        ] {
            let lower = header.to_ascii_lowercase();
            assert_eq!(
                refused(AuditLayer::builder(MemorySink::new()).capture_header(header)),
                format!(
                    "header `{lower}` may carry a credential (its name contains `{part}`), so it is not recorded; if \
                     its values are safe to keep, allow it with `.allow_sensitive_header(\"{lower}\")`"
                )
            );
        }
        let builder = AuditLayer::builder(MemorySink::new()).request_id_header("x-trace-token");
        assert!(refused(builder).starts_with("header `x-trace-token` may carry a credential"));
    }

    #[test]
    fn credential_headers_stay_refused_even_when_allowed() {
        let builder = AuditLayer::builder(MemorySink::new())
            .capture_header("Authorization")
            .allow_sensitive_header("authorization");
        assert_eq!(
            refused(builder),
            "header `authorization` carries credentials and is never recorded in audit events"
        );
        let builder = AuditLayer::builder(MemorySink::new()).allow_sensitive_header("bad header");
        assert_eq!(refused(builder), "`bad header` is not a valid HTTP header name");
    }

    #[test]
    fn client_addr_source_and_trusted_proxies_must_go_together() {
        let header_only = AuditLayer::builder(MemorySink::new()).client_addr_source(ClientAddrSource::Forwarded);
        assert_eq!(
            refused(header_only),
            "client_addr_source reads `forwarded`, but trusted_proxies is empty, so the header would never be \
             believed: list the proxies that set it with `.trusted_proxies([..])`"
        );
        let real_ip = ClientAddrSource::Header(HeaderName::from_static("x-real-ip"));
        let header_only = AuditLayer::builder(MemorySink::new()).client_addr_source(real_ip);
        assert!(refused(header_only).starts_with("client_addr_source reads `x-real-ip`, but trusted_proxies is empty"));
        let proxies_only = AuditLayer::builder(MemorySink::new()).trusted_proxies(["10.0.0.0/8"]);
        assert_eq!(
            refused(proxies_only),
            "trusted_proxies is set, but client_addr_source is `ClientAddrSource::Peer`, which reads no header: name \
             the header your proxy sets with `.client_addr_source(ClientAddrSource::XForwardedFor)` (or \
             `Forwarded`, or `Header(..)`), or drop trusted_proxies"
        );
        // Both together pass validation (and only then need a runtime).
        let both = AuditLayer::builder(MemorySink::new())
            .client_addr_source(ClientAddrSource::XForwardedFor)
            .trusted_proxies(["10.0.0.0/8"]);
        assert!(matches!(both.build(), Err(ConfigError::NoRuntime)));
    }

    #[tokio::test]
    async fn an_allowed_header_is_recorded_and_others_stay_refused() {
        use tower::ServiceExt;

        let refused_too = AuditLayer::builder(MemorySink::new())
            .capture_header("x-auth-request-user")
            .capture_header("x-api-key")
            .allow_sensitive_header("X-Auth-Request-User");
        assert!(refused(refused_too).starts_with("header `x-api-key` may carry a credential"));

        let sink = MemorySink::new();
        let (layer, handle) = AuditLayer::builder(sink.clone())
            .capture_header("x-auth-request-user")
            .allow_sensitive_header("X-Auth-Request-User")
            .build()
            .unwrap();
        let service = layer.layer(tower::service_fn(|_req: http::Request<()>| async {
            Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
        }));
        let request = http::Request::get("/").header("x-auth-request-user", "alice").body(()).unwrap();
        let response = service.oneshot(request).await.unwrap();
        http_body_util::BodyExt::collect(response.into_body()).await.unwrap();
        assert!(handle.shutdown(Duration::from_secs(10)).await.drained);
        let events: Vec<_> = sink.events().into_iter().filter(|e| !e.is_pipeline_event()).collect();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].attributes["header.x-auth-request-user"], "alice");
    }
}
