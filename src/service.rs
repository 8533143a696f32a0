//! The middleware service.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use http::{Request, Response};
use sync_wrapper::SyncWrapper;
use tower_service::Service;

use crate::Overflow;
use crate::body::ResponseBody;
use crate::context::AuditContext;
use crate::future::{Intent, ResponseFuture};
use crate::intake::{Refusal, Slot};
use crate::pipeline::{Core, OnFull, Shared};
use crate::policy::{Decision, Delivery, Policy};
use crate::request::{Pending, RequestState, policy_route};
use crate::stats::add;

/// Records one audit event per request. Made by [`AuditLayer`](crate::AuditLayer).
///
/// `call` reads what it needs from the request, puts an [`AuditContext`] into its extensions and calls the inner
/// service. The event is emitted exactly once:
///
/// - when the response body ends (its last frame, or `is_end_stream` is true), with the outcome from the HTTP
///   status or, when present, the gRPC status from the headers or trailers; so streaming responses are timed to
///   their last byte;
/// - when the body is dropped before it was ever polled (a `HEAD` response, a `204` or `304`, whose body a
///   server never reads), with the outcome from the status;
/// - when the inner service returns `Err` (outcome `error`, no status), or the body yields an error;
/// - when the inner service or the body panics (outcome `error`, attribute `panic`);
/// - when the response future is dropped, or the body dropped part-way (outcome `cancelled`).
///
/// With [`Overflow::Drop`] (the default) `poll_ready` is the inner service's. Under `Wait` it first waits for
/// room in the queue, under `FailClosed` it answers at once when the queue is full and `call` reserves the
/// request's slot (see [`Overflow`]).
pub struct AuditService<S> {
    inner: S,
    core: Arc<Core>,
    policy: Arc<Policy>,
    ready: Ready,
}

/// `SyncWrapper` keeps the service `Sync` (Axum requires it) around a future that is only `Send`.
type WaitForRoom = SyncWrapper<Pin<Box<dyn Future<Output = Result<(), Refusal>> + Send>>>;

/// Where `poll_ready` got to (under `Wait` and `FailClosed`); reset by `call`.
enum Ready {
    Unchecked,
    /// `FailClosed` found the queue full: the next `call` answers 503 without the inner service.
    Refuse,
    /// `Wait`: waiting for room, at most the policy's limit.
    Waiting(WaitForRoom),
    /// `Wait` is over; what a full queue at the end of the request counts as.
    Waited(OnFull),
}

impl<S> AuditService<S> {
    pub(crate) fn new(inner: S, core: Arc<Core>, policy: Arc<Policy>) -> Self {
        Self { inner, core, policy, ready: Ready::Unchecked }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

/// Resolves when the queue has room (`Ok`), intake closes (`Closed`), or `limit` passes (`Full`).
fn wait_for_room(shared: Arc<Shared>, limit: std::time::Duration) -> WaitForRoom {
    SyncWrapper::new(Box::pin(async move {
        let room = async {
            loop {
                let notified = shared.room.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                match shared.gate.has_room() {
                    Err(Refusal::Full | Refusal::Bytes) => notified.await,
                    answer => return answer,
                }
            }
        };
        tokio::time::timeout(limit, room).await.unwrap_or(Err(Refusal::Full))
    }))
}

impl<S> AuditService<S> {
    /// Reads the request's state; with `context_in_extensions`, shares it with the handler at once.
    fn capture<B>(&self, req: &mut Request<B>) -> Arc<RequestState> {
        let state = RequestState::capture(req, &self.core);
        if self.core.config.context_in_extensions {
            req.extensions_mut().insert(AuditContext::new(Arc::clone(&state)));
        }
        state
    }

    /// Answers 503 without calling the inner service: the request's event could not be queued.
    fn refuse<F: Future>(&self) -> ResponseFuture<F> {
        add(&self.core.shared.counters.refused, 1);
        ResponseFuture::refused()
    }
}

impl<S: Clone> Clone for AuditService<S> {
    /// A clone starts unchecked: it has not been polled ready.
    fn clone(&self) -> Self {
        Self::new(self.inner.clone(), Arc::clone(&self.core), Arc::clone(&self.policy))
    }
}

impl<S: fmt::Debug> fmt::Debug for AuditService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditService").field("inner", &self.inner).finish_non_exhaustive()
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for AuditService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: http_body::Body,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        loop {
            match (&mut self.ready, self.core.config.overflow) {
                (_, Overflow::Drop) | (Ready::Waited(_), _) => return self.inner.poll_ready(cx),
                (Ready::Refuse, _) => return Poll::Ready(Ok(())),
                (Ready::Unchecked, Overflow::FailClosed) => {
                    // No room now: refuse at once rather than wait for the inner service to be ready (unless a
                    // policy may exempt the request; then `call` refuses when it cannot reserve).
                    if self.policy.is_empty() && self.core.shared.gate.has_room().is_err() {
                        self.ready = Ready::Refuse;
                        return Poll::Ready(Ok(()));
                    }
                    return self.inner.poll_ready(cx);
                }
                (Ready::Unchecked, Overflow::Wait(limit)) => {
                    self.ready = match self.core.shared.gate.has_room() {
                        Err(Refusal::Full | Refusal::Bytes) => {
                            Ready::Waiting(wait_for_room(Arc::clone(&self.core.shared), limit))
                        }
                        _ => Ready::Waited(OnFull::QueueFull),
                    };
                }
                (Ready::Waiting(wait), _) => {
                    let waited = ready!(wait.get_mut().as_mut().poll(cx));
                    self.ready = Ready::Waited(match waited {
                        Err(Refusal::Full | Refusal::Bytes) => OnFull::WaitTimeout,
                        Ok(()) | Err(Refusal::Closed) => OnFull::QueueFull,
                    });
                }
            }
        }
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        let ready = std::mem::replace(&mut self.ready, Ready::Unchecked);
        let layer_overflow = self.core.config.overflow;
        let decision = if self.policy.is_empty() {
            Decision::Record { delivery: Delivery::BestEffort, overflow: layer_overflow }
        } else {
            self.policy.decide(&req, policy_route(&req), layer_overflow)
        };
        let (delivery, overflow) = match decision {
            Decision::Record { delivery, overflow } => (delivery, overflow),
            Decision::Skip | Decision::SampledOut => {
                let counters = &self.core.shared.counters;
                add(if decision == Decision::Skip { &counters.skipped } else { &counters.sampled_out }, 1);
                // No request event; the handler's own events are still recorded.
                let pending = Pending::silent(self.capture(&mut req));
                return ResponseFuture::new(call_cleared(&mut self.inner, req), Some(pending), None);
            }
        };
        let (slot, on_full): (Option<Slot>, OnFull) = match (overflow, ready) {
            (Overflow::FailClosed, Ready::Refuse) => return self.refuse(),
            (Overflow::FailClosed, _) => match self.core.reserve() {
                Ok(slot) => (Some(slot), OnFull::QueueFull),
                Err(_) => return self.refuse(),
            },
            (_, Ready::Waited(on_full)) => (None, on_full),
            // `Drop`, or `call` without `poll_ready` (a contract breach).
            _ => (None, OnFull::QueueFull),
        };
        let state = self.capture(&mut req);
        let intent = match delivery {
            Delivery::DurableIntent { timeout } => Some(Intent::new(&self.core, state.push_intent(), timeout)),
            Delivery::BestEffort | Delivery::Durable { .. } => None,
        };
        let pending = Pending::new(state, slot, on_full, delivery);
        ResponseFuture::new(call_cleared(&mut self.inner, req), Some(pending), intent)
    }
}

/// Calls `inner` with no request current on the thread: a service that takes a context in `call` (not in its
/// response future, where handlers run) finds none, rather than the request of a handler it is called from.
#[inline]
fn call_cleared<S: Service<R>, R>(inner: &mut S, req: R) -> S::Future {
    if crate::context::is_active() {
        return call_inside_a_request(inner, req);
    }
    inner.call(req)
}

/// [`call_cleared`] inside another request's poll.
#[cold]
#[inline(never)]
fn call_inside_a_request<S: Service<R>, R>(inner: &mut S, req: R) -> S::Future {
    let _cleared = crate::context::Cleared::new();
    inner.call(req)
}
