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
/// current on the thread while it calls the inner service and while it polls its response future, where
/// handlers run (as `tracing`'s `Instrumented` enters its span on each poll). Nothing is put into the request's
/// extensions for it, so a request whose handler never asks pays nothing for it. Code that runs elsewhere finds no current request: a
/// task the handler spawns, a service that spawns its work, the stream of a response body. Take the context in
/// the handler and move it there, or turn on
/// [`context_in_extensions`](crate::AuditLayerBuilder::context_in_extensions) and read it from the request's
/// extensions (`req.extensions().get::<AuditContext>()`).
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
    /// The state of the request whose inner service is being called or polled on this thread, while it is.
    static CURRENT: Cell<Option<Arc<RequestState>>> = const { Cell::new(None) };
}

/// Makes `state` current on this thread; returns the state that was (see [`Polling`](crate::request::Polling)).
#[inline]
pub(crate) fn enter(state: Option<Arc<RequestState>>) -> Option<Arc<RequestState>> {
    CURRENT.replace(state)
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
        let state = CURRENT.take();
        let shared = state.clone();
        CURRENT.set(state);
        shared.map(AuditContext::new)
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
#[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
impl<S: Send + Sync> axum::extract::FromRequestParts<S> for AuditContext {
    type Rejection = (http::StatusCode, &'static str);

    async fn from_request_parts(parts: &mut http::request::Parts, _state: &S) -> Result<Self, Self::Rejection> {
        AuditContext::current().or_else(|| parts.extensions.get::<AuditContext>().cloned()).ok_or((
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
        Ok(AuditContext::current().or_else(|| parts.extensions.get::<AuditContext>().cloned()))
    }
}
