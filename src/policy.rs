//! The audit policy: which requests are recorded, how their events are delivered, declared once, in code.
//!
//! Shaped like a Kubernetes audit policy: an ordered list of rules, the first that matches a request decides,
//! and a request no rule matches is recorded best effort.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use http::{Extensions, HeaderMap, Method, Request, Uri};

use crate::config::Overflow;
use crate::error::ConfigError;

/// How a request's event reaches the trail.
///
/// ```
/// use std::time::Duration;
/// use tower_audit::Delivery;
///
/// assert_eq!(Delivery::default(), Delivery::BestEffort);
/// assert_eq!(Delivery::durable(Duration::from_secs(2)), Delivery::Durable { timeout: Duration::from_secs(2) });
/// assert_eq!(
///     Delivery::durable_intent(Duration::from_secs(2)),
///     Delivery::DurableIntent { timeout: Duration::from_secs(2) }
/// );
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Delivery {
    /// The event is queued without waiting and the response goes out at once. The default.
    #[default]
    BestEffort,
    /// The response head is released only once the request's event is durable: fsynced in the
    /// [`Spill`](crate::Spill) when one is configured, else confirmed by the sink (the primary, or the fallback
    /// after the primary failed). If it is not durable within `timeout` (the queue is full, the pipeline is shut
    /// down, the sink or the disk fails or is slow), the client gets `503 Service Unavailable` with
    /// `Retry-After: 1` instead of the handler's response, and an `audit.response_withheld` event records that.
    ///
    /// The event is completed when the inner service returns the response head: its status is known, and so
    /// is a gRPC status sent in the head (a trailers-only response), but not what comes after the head. A
    /// durable event has no record of the body's end: its `latency_us` is the time to the head, a gRPC status
    /// sent in the trailers is missing, and a client that goes away during the body is not seen (its outcome
    /// stays the status's).
    ///
    /// Durable events wake the worker at once; it writes everything waiting in one batch (one sink call, one
    /// fsync) and releases every response whose event is in it: group commit. A durable request costs its
    /// response about one sink commit (or one fsync), not one per request.
    Durable {
        /// The longest the response waits for its event to be durable (measured from the response head).
        timeout: Duration,
    },
    /// [`Durable`](Delivery::Durable), and before that an *intent*: an `http.intent` (or `grpc.intent`) event
    /// is made durable before the inner service's future is first polled, so the handler cannot act without a
    /// record, even if the process dies inside it (Kubernetes' `RequestReceived` stage, Vault's request log).
    ///
    /// If the intent is not durable within `timeout` (from the start of the request), the inner future is
    /// dropped unpolled and the client gets `503` with `Retry-After: 1`; the request's event then records
    /// status 503 with the attributes `withheld=intent`, `reason` and `timeout_ms`. Otherwise the request
    /// goes on as a `Durable` one, with a second `timeout` from its response head. The intent and the
    /// request's event share an `intent_id` attribute (16 hex digits): an intent without a matching request
    /// event is a request whose handler started and whose end was never recorded.
    ///
    /// The layer calls the inner service at once (`Service::call`) and holds the future it returned until the
    /// intent is durable. Axum handlers, Tonic methods and `service_fn` closures that return an `async` block
    /// all do their work in that future; a service that acts inside `call` itself is not held back.
    DurableIntent {
        /// The longest the request waits for its intent to be durable (from the request), and then its
        /// response for its event (from the response head).
        timeout: Duration,
    },
}

impl Delivery {
    /// [`Delivery::Durable`] with this timeout.
    pub fn durable(timeout: Duration) -> Self {
        Delivery::Durable { timeout }
    }

    /// [`Delivery::DurableIntent`] with this timeout.
    pub fn durable_intent(timeout: Duration) -> Self {
        Delivery::DurableIntent { timeout }
    }

    /// How long a durable response waits for its event; `None` for best effort.
    pub(crate) fn timeout(self) -> Option<Duration> {
        match self {
            Delivery::BestEffort => None,
            Delivery::Durable { timeout } | Delivery::DurableIntent { timeout } => Some(timeout),
        }
    }
}

/// What a request looks like to a [`Rule::when`] predicate: its head, and the route it matched.
#[derive(Debug)]
pub struct RequestHead<'a> {
    method: &'a Method,
    uri: &'a Uri,
    headers: &'a HeaderMap,
    extensions: &'a Extensions,
    route: &'a str,
}

impl<'a> RequestHead<'a> {
    /// The request method.
    pub fn method(&self) -> &'a Method {
        self.method
    }

    /// The request target.
    pub fn uri(&self) -> &'a Uri {
        self.uri
    }

    /// The request headers.
    pub fn headers(&self) -> &'a HeaderMap {
        self.headers
    }

    /// The request extensions (Axum's `MatchedPath`, `ConnectInfo`, …).
    pub fn extensions(&self) -> &'a Extensions {
        self.extensions
    }

    /// What [`Rule::route`] patterns are matched against: for a gRPC call, its method path
    /// (`/package.Service/Method`, also behind an Axum router); else Axum's matched path (with the `axum`
    /// feature, when the layer runs after routing), or the request path without one.
    pub fn route(&self) -> &'a str {
        self.route
    }
}

type Predicate = dyn Fn(&RequestHead<'_>) -> bool + Send + Sync;

enum Matcher {
    Any,
    Exact(String),
    Prefix(String),
    When(Box<Predicate>),
}

impl fmt::Debug for Matcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Matcher::Any => f.write_str("Any"),
            Matcher::Exact(route) => write!(f, "Route({route:?})"),
            Matcher::Prefix(prefix) => write!(f, "Route(\"{prefix}*\")"),
            Matcher::When(_) => f.write_str("When(..)"),
        }
    }
}

/// What a rule does with the requests it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    /// No request event (a handler's own events are still recorded).
    Skip,
    /// Record one request in `every`; the others are counted as `sampled_out`.
    Record { every: u64, delivery: Delivery, overflow: Option<Overflow> },
}

/// One rule of a [`Policy`]: which requests it matches (a route pattern or a predicate, optionally narrowed to
/// some methods) and what it does with them.
///
/// A rule records best effort until told otherwise; its settings combine (`sample(10).durable(..)` makes one
/// request in ten durable).
///
/// ```
/// use std::time::Duration;
/// use http::Method;
/// use tower_audit::Rule;
///
/// let health = Rule::route("/health").skip();
/// let login = Rule::route("/api/auth/login").methods([Method::POST]).durable(Duration::from_secs(2));
/// let reads = Rule::route("/api/items/*").methods([Method::GET]).sample(100);
/// let admin = Rule::when(|req| req.headers().contains_key("x-admin")).durable(Duration::from_secs(2));
/// # let _ = (health, login, reads, admin);
/// ```
#[derive(Debug)]
pub struct Rule {
    matcher: Matcher,
    methods: Vec<Method>,
    action: Action,
    /// Requests this rule decided, for sampling.
    seen: AtomicU64,
}

impl Rule {
    fn new(matcher: Matcher) -> Self {
        Rule {
            matcher,
            methods: Vec::new(),
            action: Action::Record { every: 1, delivery: Delivery::BestEffort, overflow: None },
            seen: AtomicU64::new(0),
        }
    }

    /// Matches requests whose route (see [`RequestHead::route`]) is `pattern`, or starts with what precedes
    /// a final `*` (`"/api/*"` matches `/api/` and everything under it; `"*"` matches every request).
    ///
    /// Match Axum's route syntax (`/users/{id}`) when the layer is applied with `Router::layer` or
    /// `Router::route_layer` (it then sees the matched path); the request path otherwise.
    pub fn route(pattern: impl Into<String>) -> Self {
        let mut pattern = pattern.into();
        Rule::new(if pattern.ends_with('*') {
            pattern.pop();
            Matcher::Prefix(pattern)
        } else {
            Matcher::Exact(pattern)
        })
    }

    /// Matches every request (a catch-all, usually last).
    pub fn any() -> Self {
        Rule::new(Matcher::Any)
    }

    /// Matches the requests for which `predicate` is true. It runs on the request path for every request that
    /// reaches this rule, so keep it cheap.
    pub fn when(predicate: impl Fn(&RequestHead<'_>) -> bool + Send + Sync + 'static) -> Self {
        Rule::new(Matcher::When(Box::new(predicate)))
    }

    /// Narrows the rule to these methods (by default it matches any).
    pub fn methods(mut self, methods: impl IntoIterator<Item = Method>) -> Self {
        self.methods = methods.into_iter().collect();
        self
    }

    /// Records no event for the matched requests (health checks, metrics scrapes): counted as `skipped`,
    /// neither offered nor lost. Handlers still get an [`AuditContext`](crate::AuditContext), and the events
    /// they record with it are kept.
    pub fn skip(mut self) -> Self {
        self.action = Action::Skip;
        self
    }

    /// Records one matched request in `n` (the first, the `n+1`th, …); the others are counted as
    /// `sampled_out`, which is not a loss and not a gap. `n` must be at least 1.
    pub fn sample(mut self, n: u64) -> Self {
        self.record(|every, _, _| *every = n);
        self
    }

    /// Delivers the matched requests' events this way.
    pub fn delivery(mut self, delivery: Delivery) -> Self {
        self.record(|_, d, _| *d = delivery);
        self
    }

    /// Short for `.delivery(Delivery::Durable { timeout })`.
    pub fn durable(self, timeout: Duration) -> Self {
        self.delivery(Delivery::Durable { timeout })
    }

    /// Short for `.delivery(Delivery::DurableIntent { timeout })`.
    pub fn durable_intent(self, timeout: Duration) -> Self {
        self.delivery(Delivery::DurableIntent { timeout })
    }

    /// Short for `.delivery(Delivery::BestEffort)`.
    pub fn best_effort(self) -> Self {
        self.delivery(Delivery::BestEffort)
    }

    /// What a full queue means for the matched requests: [`Overflow::Drop`] or [`Overflow::FailClosed`]
    /// (decided per request, in `call`). [`Overflow::Wait`] acts in `poll_ready`, before any request is seen,
    /// so it can only be set for the whole layer ([`AuditLayerBuilder::overflow`](crate::AuditLayerBuilder::overflow)).
    pub fn overflow(mut self, overflow: Overflow) -> Self {
        self.record(|_, _, o| *o = Some(overflow));
        self
    }

    fn record(&mut self, f: impl FnOnce(&mut u64, &mut Delivery, &mut Option<Overflow>)) {
        if self.action == Action::Skip {
            self.action = Action::Record { every: 1, delivery: Delivery::BestEffort, overflow: None };
        }
        if let Action::Record { every, delivery, overflow } = &mut self.action {
            f(every, delivery, overflow);
        }
    }

    fn matches(&self, head: &RequestHead<'_>) -> bool {
        (self.methods.is_empty() || self.methods.contains(head.method))
            && match &self.matcher {
                Matcher::Any => true,
                Matcher::Exact(route) => head.route == route,
                Matcher::Prefix(prefix) => head.route.starts_with(prefix.as_str()),
                Matcher::When(predicate) => predicate(head),
            }
    }

    fn check(&self, index: usize) -> Result<(), ConfigError> {
        let problem = match self.action {
            Action::Skip => return Ok(()),
            Action::Record { every: 0, .. } => "samples 1 in 0 requests (sample needs n >= 1)",
            Action::Record { delivery, .. } if delivery.timeout().is_some_and(|t| t.is_zero()) => {
                "has a durable timeout of zero"
            }
            Action::Record { overflow: Some(Overflow::Wait(_)), .. } => {
                "sets Overflow::Wait, which only the whole layer can have (it acts in poll_ready)"
            }
            Action::Record { .. } => return Ok(()),
        };
        Err(ConfigError::InvalidRule { rule: index, matcher: format!("{:?}", self.matcher), problem })
    }
}

/// Which requests the layer records, and how: an ordered list of [`Rule`]s, the first match deciding. A
/// request no rule matches is recorded best effort (with the layer's overflow policy).
///
/// Give it to [`AuditLayerBuilder::policy`](crate::AuditLayerBuilder::policy), or make layers with other
/// policies over the same pipeline with [`AuditLayer::with_policy`](crate::AuditLayer::with_policy) (for
/// `Router::route_layer` or one route's `MethodRouter::layer`).
///
/// ```
/// use std::time::Duration;
/// use http::Method;
/// use tower_audit::{Policy, Rule};
///
/// let durable = Duration::from_secs(2);
/// let policy = Policy::new()
///     .rule(Rule::route("/health").skip())
///     .rule(Rule::route("/metrics").skip())
///     .rule(Rule::route("/api/auth/*").methods([Method::POST]).durable(durable))
///     .rule(Rule::route("/api/items/*").methods([Method::GET]).sample(10));
/// ```
#[derive(Debug, Default)]
pub struct Policy {
    rules: Vec<Rule>,
}

impl Policy {
    /// A policy without rules: every request recorded best effort.
    pub fn new() -> Self {
        Policy::default()
    }

    /// Adds a rule after the ones already there.
    pub fn rule(mut self, rule: Rule) -> Self {
        self.rules.push(rule);
        self
    }
}

/// What the policy decided for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decision {
    Skip,
    SampledOut,
    Record { delivery: Delivery, overflow: Overflow },
}

impl Policy {
    pub(crate) fn check(&self) -> Result<(), ConfigError> {
        self.rules.iter().enumerate().try_for_each(|(i, rule)| rule.check(i))
    }

    /// Decides for `req`; `route` is its matched path or, without one, its path.
    pub(crate) fn decide<B>(&self, req: &Request<B>, route: &str, overflow: Overflow) -> Decision {
        let head = RequestHead {
            method: req.method(),
            uri: req.uri(),
            headers: req.headers(),
            extensions: req.extensions(),
            route,
        };
        let Some(rule) = self.rules.iter().find(|rule| rule.matches(&head)) else {
            return Decision::Record { delivery: Delivery::BestEffort, overflow };
        };
        match rule.action {
            Action::Skip => Decision::Skip,
            Action::Record { every, delivery, overflow: own } => {
                if every > 1 && rule.seen.fetch_add(1, Relaxed) % every != 0 {
                    return Decision::SampledOut;
                }
                Decision::Record { delivery, overflow: own.unwrap_or(overflow) }
            }
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }
}
