//! The middleware service.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use http::{Request, Response};
use sync_wrapper::SyncWrapper;
use tokio::sync::mpsc::{OwnedPermit, error::SendError, error::TrySendError};
use tokio::time::Sleep;
use tower_service::Service;

use crate::Overflow;
use crate::body::ResponseBody;
use crate::context::AuditContext;
use crate::event::AuditEvent;
use crate::future::ResponseFuture;
use crate::pipeline::{Core, DropReason, add};
use crate::request::{Pending, RequestState};

/// Records one audit event per request. Made by [`AuditLayer`](crate::AuditLayer).
///
/// `call` reads what it needs from the request, puts an [`AuditContext`] into its extensions and calls the inner
/// service. The event is emitted exactly once:
///
/// - when the response body ends (its last frame, or `is_end_stream` is true), with the outcome from the HTTP
///   status or, when present, the gRPC status from the headers or trailers; so streaming responses are timed to
///   their last byte;
/// - when the inner service returns `Err` (outcome `error`, no status), or the body yields an error;
/// - when the response future or the body is dropped before that (outcome `cancelled`).
///
/// With [`Overflow::Drop`] (the default) `poll_ready` is the inner service's; with `Wait` and `FailClosed` it
/// first reserves a slot in the queue (see [`Overflow`]).
pub struct AuditService<S> {
    inner: S,
    core: Arc<Core>,
    slot: Slot,
}

/// `SyncWrapper` keeps the service `Sync` (Axum requires it) around a future that is only `Send`.
type Reserve = SyncWrapper<Pin<Box<dyn Future<Output = Result<OwnedPermit<AuditEvent>, SendError<()>>> + Send>>>;

/// A queue slot obtained in `poll_ready` for the next `call` (only under `Wait` and `FailClosed`).
enum Slot {
    None,
    Reserved(OwnedPermit<AuditEvent>),
    Waiting {
        reserve: Reserve,
        deadline: Pin<Box<Sleep>>,
    },
    /// No slot could be had; `call` goes on without one and counts a drop for this reason if the queue is still
    /// full at the end.
    GaveUp(DropReason),
    /// `FailClosed` with a full queue: `call` answers 503.
    Refuse,
}

impl<S> AuditService<S> {
    pub(crate) fn new(inner: S, core: Arc<Core>) -> Self {
        Self { inner, core, slot: Slot::None }
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

    fn poll_slot(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            match (&mut self.slot, self.core.config.overflow) {
                (Slot::None, Overflow::Drop) | (Slot::Reserved(_) | Slot::GaveUp(_) | Slot::Refuse, _) => {
                    return Poll::Ready(());
                }
                (Slot::None, overflow) => {
                    self.slot = match self.core.tx.clone().try_reserve_owned() {
                        Ok(permit) => Slot::Reserved(permit),
                        Err(TrySendError::Closed(_)) => Slot::GaveUp(DropReason::Closed),
                        Err(TrySendError::Full(tx)) => match overflow {
                            Overflow::Wait(limit) => Slot::Waiting {
                                reserve: SyncWrapper::new(Box::pin(tx.reserve_owned())),
                                deadline: Box::pin(tokio::time::sleep(limit)),
                            },
                            _ => Slot::Refuse,
                        },
                    };
                }
                (Slot::Waiting { reserve, deadline }, _) => {
                    self.slot = match reserve.get_mut().as_mut().poll(cx) {
                        Poll::Ready(Ok(permit)) => Slot::Reserved(permit),
                        Poll::Ready(Err(_)) => Slot::GaveUp(DropReason::Closed),
                        Poll::Pending => {
                            ready!(deadline.as_mut().poll(cx));
                            Slot::GaveUp(DropReason::WaitTimeout)
                        }
                    };
                }
            }
        }
    }
}

impl<S: Clone> Clone for AuditService<S> {
    /// A clone has no reserved slot of its own.
    fn clone(&self) -> Self {
        Self::new(self.inner.clone(), Arc::clone(&self.core))
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
        ready!(self.poll_slot(cx));
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        let (permit, on_full) = match std::mem::replace(&mut self.slot, Slot::None) {
            Slot::Reserved(permit) => (Some(permit), DropReason::QueueFull),
            Slot::GaveUp(reason) => (None, reason),
            Slot::Refuse => {
                add(&self.core.shared.counters.refused, 1);
                return ResponseFuture::refused();
            }
            // `call` without `poll_ready` (a contract breach) or under `Overflow::Drop`.
            Slot::None | Slot::Waiting { .. } => (None, DropReason::QueueFull),
        };
        let state = Arc::new(RequestState::capture(&req, Arc::clone(&self.core)));
        req.extensions_mut().insert(AuditContext::new(Arc::clone(&state)));
        let pending = Pending::new(state, permit, on_full);
        ResponseFuture::new(self.inner.call(req), pending)
    }
}
