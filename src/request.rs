//! The audit state of one in-flight request: what was read from the request, and the guard that emits its
//! event exactly once.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use http::{HeaderMap, HeaderName, Method, Request, StatusCode};

use crate::event::{AuditEvent, Outcome, kind};
use crate::intake::{Refusal, Slot};
use crate::pipeline::{Core, OnFull};
use crate::policy::Delivery;
use crate::sanitize::{bounded, bounded_bytes, bounded_bytes_ref, bounded_ref, redacted_path};

/// What the layer read from the request, and what the handler set. In an `Arc` the handler's
/// [`AuditContext`](crate::AuditContext) shares when it takes one, which goes back to the pipeline's
/// [`Recycled`](crate::intake::recycle::Recycled) for a request to come once nobody else holds it.
#[derive(Debug)]
pub(crate) struct RequestState {
    /// The pipeline the request's events go to. `None` only while the state is kept for reuse: a kept state
    /// holds no reference to its pipeline, which would keep the pipeline alive.
    core: Option<Arc<Core>>,
    pub(crate) info: RequestInfo,
    pub(crate) fields: Mutex<HandlerFields>,
}

#[derive(Debug, Clone)]
pub(crate) struct RequestInfo {
    pub(crate) time: SystemTime,
    pub(crate) start: Instant,
    pub(crate) kind: &'static str,
    pub(crate) method: Cow<'static, str>,
    pub(crate) route: Option<String>,
    pub(crate) path: String,
    pub(crate) request_id: Option<String>,
    pub(crate) client_addr: Option<IpAddr>,
    pub(crate) user_agent: Option<String>,
}

/// What the handler sets.
#[derive(Debug, Default, Clone)]
pub(crate) struct HandlerFields {
    pub(crate) actor: Option<String>,
    /// `None` while empty: what is left behind when the event takes the fields then needs no dropping.
    pub(crate) attributes: Option<BTreeMap<String, String>>,
}

impl HandlerFields {
    pub(crate) fn attributes(&mut self) -> &mut BTreeMap<String, String> {
        self.attributes.get_or_insert_default()
    }
}

impl RequestState {
    /// Reads the request into a state: a kept one when the pipeline has one, else a new one.
    pub(crate) fn capture<B>(req: &Request<B>, core: &Arc<Core>) -> Arc<Self> {
        let config = &core.config;
        let max = config.limits.max_field_len;
        let headers = req.headers();
        // One pass over the headers for the three the layer reads (the first value of each, as `get` gives).
        let (mut content_type, mut request_id, mut user_agent) = (None, None, None);
        let id_header = &config.request_id_header;
        for (name, value) in headers {
            let found = if name == http::header::CONTENT_TYPE {
                &mut content_type
            } else if name == http::header::USER_AGENT {
                &mut user_agent
            } else if name == id_header {
                &mut request_id
            } else {
                continue;
            };
            found.get_or_insert(value);
        }
        // The request id header may be one of the other two (any recordable header may be named).
        if id_header == http::header::CONTENT_TYPE {
            request_id = content_type;
        } else if id_header == http::header::USER_AGENT {
            request_id = user_agent;
        }
        let grpc = content_type.is_some_and(is_grpc_type);
        let uri = req.uri();
        let (target, query_at) = match uri.path_and_query() {
            // `as_str` is never empty when there is a query: it holds the `?`, just before the query.
            Some(pq) => (pq.as_str(), pq.query().map(|query| pq.as_str().len() - query.len() - 1)),
            None => ("/", None),
        };
        let route = if grpc { None } else { matched_path(req) };
        // Into strings of written events where there are some (see `Recycled`).
        let ([mut path, mut matched, id, agent], kept) =
            core.shared.recycled.take([true, route.is_some(), request_id.is_some(), user_agent.is_some()]);
        path.push_str(&redacted_path(
            target,
            query_at,
            &config.redact_query,
            config.keep_query,
            config.limits.max_path_len,
        ));
        // A gRPC call's route is its method path, even behind an Axum router (Tonic's `Routes` is one, whose
        // matched path is `/package.Service/{*rest}`).
        let route = match route {
            _ if grpc => Some(path.clone()),
            Some(route) => {
                matched.push_str(&bounded_ref(route, max));
                Some(matched)
            }
            None => None,
        };
        let header = |value: Option<&http::HeaderValue>, mut string: String| {
            value.map(|value| {
                string.push_str(&bounded_bytes_ref(value.as_bytes(), max));
                string
            })
        };
        let request_id = header(request_id, id);
        let user_agent = header(user_agent, agent);
        let mut attributes = None;
        for name in &config.capture_headers {
            if let Some(value) = headers.get(name) {
                let attributes = attributes.get_or_insert_with(BTreeMap::new);
                attributes.insert(format!("header.{name}"), bounded_bytes(value.as_bytes(), max));
            }
        }
        let kind = if grpc { kind::GRPC_CALL } else { kind::HTTP_REQUEST };
        let method = method_name(req.method(), max);
        let client_addr = crate::client_addr::resolve(req, &config.client_addr_source, &config.trusted_proxies);
        let (time, start) = (SystemTime::now(), Instant::now());
        if let Some(mut state) = kept
            && let Some(reused) = Arc::get_mut(&mut state)
        {
            // Field by field: the kept state's own are empty, so nothing is freed, and nothing is copied twice.
            let info = &mut reused.info;
            (info.time, info.start, info.kind, info.method) = (time, start, kind, method);
            (info.route, info.path, info.request_id) = (route, path, request_id);
            (info.client_addr, info.user_agent) = (client_addr, user_agent);
            let fields = reused.fields.get_mut().unwrap_or_else(|e| e.into_inner());
            (fields.actor, fields.attributes) = (None, attributes);
            reused.core = Some(Arc::clone(core));
            return state;
        }
        let info = RequestInfo { time, start, kind, method, route, path, request_id, client_addr, user_agent };
        let fields = Mutex::new(HandlerFields { actor: None, attributes });
        Arc::new(RequestState { core: Some(Arc::clone(core)), info, fields })
    }

    /// The pipeline the request's events go to.
    pub(crate) fn core(&self) -> &Arc<Core> {
        self.core.as_ref().expect("a state in use has its pipeline (only a kept one has none)")
    }

    pub(crate) fn fields(&self) -> std::sync::MutexGuard<'_, HandlerFields> {
        self.fields.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Queues the intent event of a [`DurableIntent`](Delivery::DurableIntent) request, durable: its ticket,
    /// or why it was not queued. The request's own event gets the same `intent_id` attribute.
    pub(crate) fn push_intent(&self) -> Result<u64, Refusal> {
        let intent_id = format!("{:016x}", fastrand::u64(..));
        let kind = if self.info.kind == kind::GRPC_CALL { kind::GRPC_INTENT } else { kind::HTTP_INTENT };
        let mut event = AuditEvent::with_time(Cow::Borrowed(kind), self.info.time);
        {
            let mut fields = self.fields();
            event.attributes = fields.attributes.clone().unwrap_or_default();
            event.attributes.insert("intent_id".to_owned(), intent_id.clone());
            fields.attributes().insert("intent_id".to_owned(), intent_id);
        }
        self.complete(&mut event);
        self.core().push_durable(event, None, OnFull::QueueFull)
    }

    /// Fills what a custom event recorded during this request left unset.
    pub(crate) fn complete(&self, event: &mut AuditEvent) {
        let info = &self.info;
        event.method.get_or_insert_with(|| info.method.clone());
        if event.route.is_none() {
            event.route.clone_from(&info.route);
        }
        event.path.get_or_insert_with(|| info.path.clone());
        if event.request_id.is_none() {
            event.request_id.clone_from(&info.request_id);
        }
        event.client_addr = event.client_addr.or(info.client_addr);
        if event.user_agent.is_none() {
            event.user_agent.clone_from(&info.user_agent);
        }
        if event.actor.is_none() {
            event.actor.clone_from(&self.fields().actor);
        }
    }
}

/// A request's event, from what the layer read and what the handler set, taking their strings. Every field spelt
/// out (not `..AuditEvent::with_time(…)`), so no whole temporary event is made and copied.
#[inline(always)]
fn request_event(
    info: &mut RequestInfo,
    fields: &mut HandlerFields,
    outcome: Outcome,
    latency_us: u64,
    status: Option<u16>,
    grpc_status: Option<i32>,
) -> AuditEvent {
    AuditEvent {
        version: crate::event::SCHEMA_VERSION,
        id: uuid::Uuid::nil(),
        instance: None,
        boot: None,
        seq: 0,
        time: info.time,
        kind: Cow::Borrowed(info.kind),
        outcome,
        method: Some(std::mem::take(&mut info.method)),
        route: info.route.take(),
        path: Some(std::mem::take(&mut info.path)),
        status,
        grpc_status,
        latency_us: Some(latency_us),
        request_id: info.request_id.take(),
        actor: fields.actor.take(),
        client_addr: info.client_addr,
        user_agent: info.user_agent.take(),
        attributes: fields.attributes.take().unwrap_or_default(),
        prev_hash: None,
        hash: None,
    }
}

/// Whole microseconds, in 64 bits (no 128-bit arithmetic; saturates after 584,000 years).
fn micros(elapsed: Duration) -> u64 {
    elapsed.as_secs().saturating_mul(1_000_000).saturating_add(u64::from(elapsed.subsec_micros()))
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers.get(http::header::CONTENT_TYPE).is_some_and(is_grpc_type)
}

fn is_grpc_type(content_type: &http::HeaderValue) -> bool {
    content_type.as_bytes().starts_with(b"application/grpc")
}

/// What policy rules match a request against: a gRPC call's method path; else Axum's matched path, or the
/// request path without one.
pub(crate) fn policy_route<B>(req: &Request<B>) -> &str {
    if is_grpc(req.headers()) {
        return req.uri().path();
    }
    matched_path(req).unwrap_or_else(|| req.uri().path())
}

fn matched_path<B>(req: &Request<B>) -> Option<&str> {
    #[cfg(feature = "axum")]
    if let Some(path) = req.extensions().get::<axum::extract::MatchedPath>() {
        return Some(path.as_str());
    }
    let _ = req;
    None
}

#[inline]
fn method_name(method: &Method, max: usize) -> Cow<'static, str> {
    Cow::Borrowed(match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => return Cow::Owned(bounded(method.as_str(), max)),
    })
}

/// Emits the request's event exactly once: through [`finish`](Self::finish), or when dropped before that. A
/// silent one (a request skipped or sampled out by the policy) only holds the state for the handler's context.
#[derive(Debug)]
pub(crate) struct Pending {
    state: Option<Arc<RequestState>>,
    slot: Option<Slot>,
    on_full: OnFull,
    pub(crate) status: Option<StatusCode>,
    pub(crate) grpc_status: Option<i32>,
    /// Whether anyone polled the response body: a body dropped unpolled was never wanted (`HEAD`, 204, 304),
    /// which is not a cancellation.
    pub(crate) body_polled: bool,
    /// A panic unwound through the layer while it polled the inner future or body.
    panicked: bool,
    /// Whether the request has an event of its own (not skipped or sampled out).
    pub(crate) records: bool,
    /// Whether it is a gRPC call, whose response carries a `grpc-status`.
    grpc: bool,
    delivery: Delivery,
}

/// Held across a poll of the inner response future. The request's state moves into a thread-local for that
/// time, where [`AuditContext::current`](crate::AuditContext::current) finds it, and back when the guard is
/// dropped (the state before it is current again: layers nest). If a panic unwinds through the poll, the
/// request's event says so, however late it is emitted (a catch-panic middleware outside the layer drops the
/// future only after it has caught the panic).
pub(crate) struct Polling<'a> {
    pending: &'a mut Option<Pending>,
    outer: Option<Arc<RequestState>>,
}

impl<'a> Polling<'a> {
    #[inline]
    pub(crate) fn enter(pending: &'a mut Option<Pending>) -> Polling<'a> {
        let state = pending.as_mut().and_then(|pending| pending.state.take());
        Polling { outer: crate::context::enter(state), pending }
    }
}

impl Drop for Polling<'_> {
    #[inline]
    fn drop(&mut self) {
        let state = crate::context::enter(self.outer.take());
        if let Some(pending) = self.pending.as_mut() {
            pending.state = state;
            if std::thread::panicking() {
                pending.panicked = true;
            }
        }
    }
}

/// Held across a poll of the response body: if a panic unwinds through it, the request's event says so.
pub(crate) struct UnwindGuard<'a>(pub(crate) &'a mut Option<Pending>);

impl Drop for UnwindGuard<'_> {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Some(pending) = self.0.as_mut()
        {
            pending.panicked = true;
        }
    }
}

impl Pending {
    pub(crate) fn new(state: Arc<RequestState>, slot: Option<Slot>, on_full: OnFull, delivery: Delivery) -> Self {
        Pending {
            delivery,
            grpc: state.info.kind == kind::GRPC_CALL,
            state: Some(state),
            slot,
            on_full,
            status: None,
            grpc_status: None,
            body_polled: false,
            panicked: false,
            records: true,
        }
    }

    /// Holds the state of a request that records no event of its own, for its handler's context.
    pub(crate) fn silent(state: Arc<RequestState>) -> Self {
        let mut pending = Pending::new(state, None, OnFull::QueueFull, Delivery::BestEffort);
        pending.records = false;
        pending
    }

    /// Reads the gRPC status from response headers (trailers-only responses) or trailers, of a gRPC call.
    pub(crate) fn read_grpc_status(&mut self, headers: &HeaderMap) {
        const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
        if !self.grpc {
            return;
        }
        if let Some(code) = headers.get(GRPC_STATUS).and_then(|v| v.to_str().ok()?.trim().parse().ok()) {
            self.grpc_status = Some(code);
        }
    }

    /// Emits the event. `outcome` overrides the outcome derived from the status codes.
    pub(crate) fn finish(&mut self, outcome: Option<Outcome>) {
        let Some(mut state) = self.take_state() else { return };
        let outcome = self.outcome(outcome);
        let latency_us = micros(state.info.start.elapsed());
        let (status, grpc_status, slot) = (self.status.map(|s| s.as_u16()), self.grpc_status, self.slot.take());
        let Some(RequestState { core: pipeline @ Some(_), info, fields }) = Arc::get_mut(&mut state) else {
            // A handler still holds the context (it kept a clone, or handed it to a task): copy its texts.
            let event = self.event(&mut state, Some(outcome));
            state.core().push(event, slot, self.on_full);
            return;
        };
        // Taken out: the state is kept for reuse without it.
        let Some(core) = pipeline.take() else { return };
        let fields = fields.get_mut().unwrap_or_else(|e| e.into_inner());
        if self.panicked {
            fields.attributes().insert("panic".to_owned(), "true".to_owned());
        }
        let bytes = crate::event::heap_size(
            [
                crate::event::owned(&info.method),
                info.route.as_ref(),
                Some(&info.path),
                info.request_id.as_ref(),
                fields.actor.as_ref(),
                info.user_agent.as_ref(),
            ],
            fields.attributes.iter().flatten(),
        );
        // Made only once admitted, straight into the queue: the captured strings move in, and no copy of the whole
        // event is made on the way.
        let queued = core.push_with(bytes, slot, self.on_full, || {
            request_event(info, fields, outcome, latency_us, status, grpc_status)
        });
        // Emptied (the event took its strings), and nobody else holds it: kept for a request to come. A refused
        // event's state still holds its strings; it is freed, so no kept state holds more than its emptied self.
        if queued {
            core.shared.recycled.keep(state);
        }
    }

    /// Whether the response waits for the event to be durable, and how long.
    pub(crate) fn durable_timeout(&self) -> Option<Duration> {
        self.delivery.timeout()
    }

    /// Emits the event of a request whose intent was not durable in time (`reason`), with status 503: its
    /// response is withheld and its handler never ran.
    pub(crate) fn withhold_intent(&mut self, reason: &'static str, timeout: Duration) {
        if let Some(state) = &self.state {
            crate::stats::add(&state.core().shared.counters.durable_withheld, 1);
            let mut fields = state.fields();
            let attributes = fields.attributes();
            attributes.insert("withheld".to_owned(), "intent".to_owned());
            attributes.insert("reason".to_owned(), reason.to_owned());
            attributes.insert("timeout_ms".to_owned(), timeout.as_millis().to_string());
        }
        self.status = Some(StatusCode::SERVICE_UNAVAILABLE);
        self.finish(None);
    }

    /// Emits a durable event, now (at the response head): its ticket, or why it was not queued. What the
    /// response was withheld for is recorded by [`Withheld::record`].
    pub(crate) fn finish_durable(&mut self) -> (Result<u64, Refusal>, Option<Withheld>) {
        let Some(mut state) = self.take_state() else {
            return (Err(Refusal::Closed), None);
        };
        let mut event = self.event(&mut state, None);
        let core = Arc::clone(state.core());
        let delivery =
            if matches!(self.delivery, Delivery::DurableIntent { .. }) { "durable_intent" } else { "durable" };
        event.attributes.insert("delivery".to_owned(), delivery.to_owned());
        let mut withheld = AuditEvent::with_time(Cow::Borrowed(kind::AUDIT_RESPONSE_WITHHELD), event.time);
        withheld.outcome = Outcome::ServerError;
        withheld.method.clone_from(&event.method);
        withheld.route.clone_from(&event.route);
        withheld.path.clone_from(&event.path);
        withheld.status = Some(StatusCode::SERVICE_UNAVAILABLE.as_u16());
        withheld.request_id.clone_from(&event.request_id);
        withheld.actor.clone_from(&event.actor);
        withheld.client_addr = event.client_addr;
        withheld.user_agent.clone_from(&event.user_agent);
        if let Some(status) = event.status {
            withheld.attributes.insert("withheld_status".to_owned(), status.to_string());
        }
        let queued = core.push_durable(event, self.slot.take(), self.on_full);
        (queued, Some(Withheld { core, event: withheld }))
    }

    /// The state, to build the event from; `None` once taken, or for a silent request.
    fn take_state(&mut self) -> Option<Arc<RequestState>> {
        if self.records { self.state.take() } else { None }
    }

    /// The outcome: `outcome`, or the one the status codes give.
    fn outcome(&self, outcome: Option<Outcome>) -> Outcome {
        outcome.unwrap_or_else(|| match (self.grpc_status, self.status) {
            (Some(code), _) => Outcome::from_grpc_code(code),
            (None, Some(status)) => Outcome::from_http_status(status),
            (None, None) => Outcome::Error,
        })
    }

    /// The request's event. `outcome` overrides the outcome derived from the status codes.
    fn event(&self, state: &mut Arc<RequestState>, outcome: Option<Outcome>) -> AuditEvent {
        let outcome = self.outcome(outcome);
        let latency_us = micros(state.info.start.elapsed());
        let status = self.status.map(|s| s.as_u16());
        let mark_panic = |fields: &mut HandlerFields| {
            if self.panicked {
                fields.attributes().insert("panic".to_owned(), "true".to_owned());
            }
        };
        match Arc::get_mut(state) {
            // Usually no handler holds the context any more, so the captured strings move into the event.
            Some(state) => {
                let fields = state.fields.get_mut().unwrap_or_else(|e| e.into_inner());
                mark_panic(fields);
                request_event(&mut state.info, fields, outcome, latency_us, status, self.grpc_status)
            }
            // A handler still holds its context: it may record more events, which inherit these fields.
            None => {
                let (mut info, mut fields) = (state.info.clone(), state.fields().clone());
                mark_panic(&mut fields);
                request_event(&mut info, &mut fields, outcome, latency_us, status, self.grpc_status)
            }
        }
    }
}

/// The `audit.response_withheld` event of a durable request, made ready with its event, recorded only if the
/// response is withheld.
pub(crate) struct Withheld {
    core: Arc<Core>,
    event: AuditEvent,
}

impl Withheld {
    /// Records that the response was withheld, and why (`reason`); counts it.
    pub(crate) fn record(mut self, reason: &'static str, timeout: Duration) {
        let counters = &self.core.shared.counters;
        crate::stats::add(&counters.durable_withheld, 1);
        self.event.attributes.insert("reason".to_owned(), reason.to_owned());
        self.event.attributes.insert("timeout_ms".to_owned(), timeout.as_millis().to_string());
        self.core.push(self.event, None, OnFull::QueueFull);
    }

    pub(crate) fn core(&self) -> &Arc<Core> {
        &self.core
    }
}

impl std::fmt::Debug for Withheld {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Withheld").finish_non_exhaustive()
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if self.panicked {
            self.finish(Some(Outcome::Error));
        } else if self.status.is_some() && !self.body_polled {
            self.finish(None);
        } else {
            self.finish(Some(Outcome::Cancelled));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_is_whole_microseconds_and_saturates() {
        assert_eq!(micros(Duration::new(2, 345_678_999)), 2_345_678);
        assert_eq!(micros(Duration::from_nanos(999)), 0);
        assert_eq!(micros(Duration::MAX), u64::MAX);
    }
}
