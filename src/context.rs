//! The handler's view of its request's audit event.

use std::sync::Arc;

use crate::event::AuditEvent;
use crate::request::RequestState;
use crate::sanitize::bounded;

/// Placed in the request extensions by [`AuditService`](crate::AuditService): lets a handler set the actor and
/// attributes of its request's event and record extra security events, all without waiting.
///
/// With the `axum` feature it is an extractor; otherwise take it from the extensions
/// (`req.extensions().get::<AuditContext>()`).
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

impl AuditContext {
    pub(crate) fn new(state: Arc<RequestState>) -> Self {
        Self { state }
    }

    /// Sets who acts in this request (a user id, an email, a service name). Bounded like every text field.
    pub fn set_actor(&self, actor: impl AsRef<str>) {
        let actor = bounded(actor.as_ref(), self.state.core.config.limits.max_field_len);
        self.state.fields().actor = Some(actor);
    }

    /// The actor set so far.
    pub fn actor(&self) -> Option<String> {
        self.state.fields().actor.clone()
    }

    /// Adds (or replaces) an attribute of this request's event. Past the attribute limit, new keys are ignored.
    pub fn set_attribute(&self, key: impl AsRef<str>, value: impl AsRef<str>) {
        let limits = &self.state.core.config.limits;
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
        self.state.core.record(event)
    }
}

#[cfg(feature = "axum")]
#[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
impl<S: Send + Sync> axum::extract::FromRequestParts<S> for AuditContext {
    type Rejection = (http::StatusCode, &'static str);

    async fn from_request_parts(parts: &mut http::request::Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts.extensions.get::<AuditContext>().cloned().ok_or((
            http::StatusCode::INTERNAL_SERVER_ERROR,
            "AuditContext is missing: add tower_audit::AuditLayer to this route (Router::layer)",
        ))
    }
}
