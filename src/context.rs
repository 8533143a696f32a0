//! The handler's view of its request's audit event.

use std::cell::Cell;
use std::sync::Arc;

use crate::event::AuditEvent;
use crate::request::RequestState;
use crate::sanitize::bounded;

/// Lets a handler set the actor and attributes of its request's event and record extra security events, all
/// without waiting.
///
/// With the `axum` feature it is an extractor. Elsewhere (a Tonic method, a `service_fn`) call
/// [`AuditContext::current`] from the handler's code. [`AuditService`](crate::AuditService) makes its request
/// current on the thread while it polls the inner service's response future, where handlers run (as `tracing`'s
/// `Instrumented` enters its span on each poll). Nothing is put into the request's extensions for it, so a
/// request whose handler never asks pays nothing for it. Code that runs elsewhere finds no current request (not
/// even an outer request's, when it runs inside that request's handler): a task the handler spawns, a service
/// that spawns its work, the inner service's `call` itself, the stream of a response body. Take the context in
/// the handler and move it there, or turn on
/// [`context_in_extensions`](crate::AuditLayerBuilder::context_in_extensions) and read it from the request's
/// extensions (`req.extensions().get::<AuditContext>()`).
///
/// The current request is the one whose handler is being polled on this thread. A handler that serves a
/// sub-request inline through a service *without* an `AuditLayer` (an internal `Router::oneshot`) runs that
/// service's handlers inside its own poll: they find the outer request's context. Put the layer on that service
/// too if its requests are to be recorded as their own.
///
/// ```
/// use tower_audit::{AuditContext, AuditEvent, Outcome};
///
/// async fn login(audit: AuditContext /* , Json(body): Json<Login> */) -> http::StatusCode {
///     let email = "mallory@example.com";
///     let password_ok = false;
///     audit.set_actor(email);
///     if !password_ok {
///         audit.record(AuditEvent::new("auth.login_failed").outcome(Outcome::Denied).attribute("reason", "bad_password"));
///         return http::StatusCode::UNAUTHORIZED;
///     }
///     http::StatusCode::OK
/// }
/// ```
#[derive(Debug, Clone)]
pub struct AuditContext {
    state: Arc<RequestState>,
}

thread_local! {
    /// The state of the request whose inner response future is being polled on this thread, while it is.
    static CURRENT: Cell<Option<Arc<RequestState>>> = const { Cell::new(None) };
    /// Whether `CURRENT` holds a state: a plain flag, read without the checks a thread-local with a destructor
    /// takes, so code that clears the current request pays one load when there is none (the usual case).
    static ACTIVE: Cell<bool> = const { Cell::new(false) };
}

/// Makes `state` current on this thread; returns the state that was (see [`Polling`](crate::request::Polling)).
#[inline]
pub(crate) fn enter(state: Option<Arc<RequestState>>) -> Option<Arc<RequestState>> {
    ACTIVE.set(state.is_some());
    CURRENT.replace(state)
}

/// Whether a request is current on this thread (one load of a plain flag).
#[inline]
pub(crate) fn is_active() -> bool {
    ACTIVE.get()
}

/// Makes no request current on this thread until dropped, then the one before again. Held across code that is
/// no handler's but runs inside a handler's poll (an inner service's `call`, a response body's poll), only when
/// a request is current ([`is_active`]): otherwise there is nothing to clear.
pub(crate) struct Cleared(Option<Arc<RequestState>>);

impl Cleared {
    pub(crate) fn new() -> Cleared {
        Cleared(enter(None))
    }
}

impl Drop for Cleared {
    fn drop(&mut self) {
        // Whatever ran meanwhile left nothing current (each guard restores what it found).
        enter(self.0.take());
    }
}

impl AuditContext {
    pub(crate) fn new(state: Arc<RequestState>) -> Self {
        Self { state }
    }

    /// The context of the request whose handler runs now, on this thread; `None` outside one (see above).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// use tower::{Layer, Service, ServiceExt, service_fn};
    /// use tower_audit::{AuditContext, AuditLayer, MemorySink};
    ///
    /// let (layer, _handle) = AuditLayer::builder(MemorySink::new()).build().unwrap();
    /// let mut svc = layer.layer(service_fn(|_req: http::Request<String>| async {
    ///     let audit = AuditContext::current().expect("called behind AuditLayer");
    ///     audit.set_actor("alice");
    ///     Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
    /// }));
    /// svc.ready().await.unwrap().call(http::Request::new(String::new())).await.unwrap();
    /// assert!(AuditContext::current().is_none());
    /// # }
    /// ```
    pub fn current() -> Option<AuditContext> {
        // `try_with`: during the thread's teardown there is no current request, rather than a panic.
        let shared = CURRENT.try_with(|current| {
            let state = current.take();
            let shared = state.clone();
            current.set(state);
            shared
        });
        shared.ok().flatten().map(AuditContext::new)
    }

    /// Sets who acts in this request (a user id, an email, a service name). Bounded like every text field.
    pub fn set_actor(&self, actor: impl AsRef<str>) {
        let actor = bounded(actor.as_ref(), self.state.core().config.limits.max_field_len);
        self.state.fields().actor = Some(actor);
    }

    /// The actor set so far.
    pub fn actor(&self) -> Option<String> {
        self.state.fields().actor.clone()
    }

    /// Adds (or replaces) an attribute of this request's event. Past the attribute limit, new keys are ignored.
    pub fn set_attribute(&self, key: impl AsRef<str>, value: impl AsRef<str>) {
        let limits = &self.state.core().config.limits;
        let key = bounded(key.as_ref(), limits.max_field_len);
        let value = bounded(value.as_ref(), limits.max_field_len);
        let mut fields = self.state.fields();
        let attributes = fields.attributes();
        if attributes.len() < limits.max_attributes || attributes.contains_key(&key) {
            attributes.insert(key, value);
        }
    }

    /// Queues an extra event without waiting. Method, route, path, request id, client address, user agent and
    /// actor that the event leaves unset are taken from this request.
    ///
    /// Returns `false` when the queue is full or the pipeline is shut down; the drop is counted (and reported
    /// by the next `audit.gap` event).
    pub fn record(&self, mut event: AuditEvent) -> bool {
        self.state.complete(&mut event);
        self.state.core().record(event)
    }
}

#[cfg(feature = "axum")]
impl AuditContext {
    /// The request's context for an extractor: the current one, else one put into the extensions.
    fn found(parts: &http::request::Parts) -> Option<AuditContext> {
        AuditContext::current().or_else(|| parts.extensions.get::<AuditContext>().cloned())
    }
}

#[cfg(feature = "axum")]
#[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
impl<S: Send + Sync> axum::extract::FromRequestParts<S> for AuditContext {
    type Rejection = (http::StatusCode, &'static str);

    async fn from_request_parts(parts: &mut http::request::Parts, _state: &S) -> Result<Self, Self::Rejection> {
        AuditContext::found(parts).ok_or((
            http::StatusCode::INTERNAL_SERVER_ERROR,
            "AuditContext is missing: add tower_audit::AuditLayer to this route (Router::layer), or turn on \
             context_in_extensions when the handler runs on another task",
        ))
    }
}

/// `Option<AuditContext>`: `None` when no [`AuditLayer`](crate::AuditLayer) serves the route, for a handler
/// that runs with and without one.
#[cfg(feature = "axum")]
#[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
impl<S: Send + Sync> axum::extract::OptionalFromRequestParts<S> for AuditContext {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut http::request::Parts, _state: &S) -> Result<Option<Self>, Self::Rejection> {
        Ok(AuditContext::found(parts))
    }
}
