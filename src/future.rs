//! The response future.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::{Response, StatusCode};
use pin_project_lite::pin_project;

use crate::body::ResponseBody;
use crate::event::Outcome;
use crate::request::{Pending, UnwindGuard};

pin_project! {
    /// Response future of [`AuditService`](crate::AuditService).
    ///
    /// Emits the event with outcome `error` when the inner service fails, and with outcome `cancelled` when
    /// dropped before the inner future completes; otherwise hands the event on to the [`ResponseBody`].
    pub struct ResponseFuture<F> {
        #[pin]
        kind: Kind<F>,
        pending: Option<Pending>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F> {
        Inner { #[pin] future: F },
        Refused,
    }
}

impl<F> ResponseFuture<F> {
    pub(crate) fn new(future: F, pending: Pending) -> Self {
        Self { kind: Kind::Inner { future }, pending: Some(pending) }
    }

    pub(crate) fn refused() -> Self {
        Self { kind: Kind::Refused, pending: None }
    }
}

impl<F, ResBody, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<ResBody>, E>>,
    ResBody: http_body::Body,
{
    type Output = Result<Response<ResponseBody<ResBody>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let future = match this.kind.project() {
            KindProj::Inner { future } => future,
            KindProj::Refused => {
                let mut response = Response::new(ResponseBody::empty());
                *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                return Poll::Ready(Ok(response));
            }
        };
        let guard = UnwindGuard(this.pending);
        let result = ready!(future.poll(cx));
        let mut pending = guard.0.take().expect("ResponseFuture polled after completion");
        Poll::Ready(match result {
            Ok(response) => {
                pending.status = Some(response.status());
                pending.read_grpc_status(response.headers());
                let (parts, body) = response.into_parts();
                Ok(Response::from_parts(parts, ResponseBody::new(body, pending)))
            }
            Err(error) => {
                pending.finish(Some(Outcome::Error));
                Err(error)
            }
        })
    }
}

impl<F> std::fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}
