//! The response body wrapper: emits the event when the body ends.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::event::Outcome;
use crate::request::{Pending, UnwindGuard};

pin_project! {
    /// Response body of [`AuditService`](crate::AuditService).
    ///
    /// Emits the request's event when the last frame has been yielded (or the inner body reports
    /// `is_end_stream`, which covers empty bodies that a server never polls), with outcome `error` when the body
    /// yields an error or panics, with the status's outcome when dropped without ever being polled (`HEAD`,
    /// 204, 304: a server does not read them), and with outcome `cancelled` when dropped part-way (the client
    /// went away). gRPC trailers are read for `grpc-status` on the way.
    pub struct ResponseBody<B> {
        #[pin]
        kind: Kind<B>,
        pending: Option<Pending>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B> {
        Inner { #[pin] body: B },
        Empty,
    }
}

impl<B> ResponseBody<B> {
    /// The empty body of a refused (503) response.
    pub(crate) fn empty() -> Self {
        Self { kind: Kind::Empty, pending: None }
    }
}

impl<B> ResponseBody<B> {
    /// A body whose request's event is emitted already (a durable request's), or that records none.
    pub(crate) fn plain(body: B) -> Self {
        Self { kind: Kind::Inner { body }, pending: None }
    }
}

impl<B: Body> ResponseBody<B> {
    pub(crate) fn new(body: B, mut pending: Pending) -> Self {
        if body.is_end_stream() {
            pending.finish(None);
        }
        Self { kind: Kind::Inner { body }, pending: Some(pending) }
    }
}

impl<B: Body> Body for ResponseBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let mut body = match this.kind.project() {
            KindProj::Inner { body } => body,
            KindProj::Empty => return Poll::Ready(None),
        };
        if let Some(pending) = this.pending.as_mut() {
            pending.body_polled = true;
        }
        let guard = UnwindGuard::enter(this.pending);
        let frame = ready!(body.as_mut().poll_frame(cx));
        drop(guard);
        if let Some(pending) = this.pending {
            match &frame {
                Some(Ok(frame)) => {
                    if let Some(trailers) = frame.trailers_ref() {
                        pending.read_grpc_status(trailers);
                    }
                    if body.is_end_stream() {
                        pending.finish(None);
                    }
                }
                Some(Err(_)) => pending.finish(Some(Outcome::Error)),
                None => pending.finish(None),
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Inner { body } => body.is_end_stream(),
            Kind::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Inner { body } => body.size_hint(),
            Kind::Empty => SizeHint::with_exact(0),
        }
    }
}

impl<B> std::fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseBody").finish_non_exhaustive()
    }
}
