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

    #[inline]
    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        // No request is current while the body is polled (a body's stream is no handler's code): not even the one
        // whose handler reads this body inside its own poll; that one is current again after.
        if crate::context::is_active() {
            return self.poll_frame_cleared(cx);
        }
        self.poll_audited(cx)
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

/// What [`Body::poll_frame`] gives.
type PolledFrame<B> = Poll<Option<Result<Frame<<B as Body>::Data>, <B as Body>::Error>>>;

impl<B: Body> ResponseBody<B> {
    /// [`poll_frame`](Body::poll_frame) read inside a request's poll: with no request current.
    #[cold]
    #[inline(never)]
    fn poll_frame_cleared(self: Pin<&mut Self>, cx: &mut Context<'_>) -> PolledFrame<B> {
        let _cleared = crate::context::Cleared::new();
        self.poll_audited(cx)
    }

    #[inline(always)]
    fn poll_audited(self: Pin<&mut Self>, cx: &mut Context<'_>) -> PolledFrame<B> {
        let this = self.project();
        let mut body = match this.kind.project() {
            KindProj::Inner { body } => body,
            KindProj::Empty => return Poll::Ready(None),
        };
        if let Some(pending) = this.pending.as_mut() {
            pending.body_polled = true;
        }
        let guard = UnwindGuard(this.pending);
        let frame = ready!(body.as_mut().poll_frame(cx));
        if let Some(pending) = guard.0 {
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
}

impl<B> std::fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseBody").finish_non_exhaustive()
    }
}
