//! The response future.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use http::{HeaderValue, Response, StatusCode};
use pin_project_lite::pin_project;
use tokio::time::Instant;

use crate::body::ResponseBody;
use crate::durable::Confirmation;
use crate::event::Outcome;
use crate::intake::Refusal;
use crate::pipeline::Core;
use crate::request::{Pending, Polling, Withheld};
use crate::stats::add;

pin_project! {
    /// Response future of [`AuditService`](crate::AuditService).
    ///
    /// Emits the event with outcome `error` when the inner service fails, and with outcome `cancelled` when
    /// dropped before the inner future completes; otherwise hands the event on to the [`ResponseBody`]. For a
    /// [`Durable`](crate::Delivery::Durable) request it emits the event at the response head and holds the
    /// response until the event is durable, or answers `503` at the timeout. For a
    /// [`DurableIntent`](crate::Delivery::DurableIntent) request it first holds the inner future, unpolled,
    /// until the request's intent event is durable, or answers `503` at the timeout without polling it.
    pub struct ResponseFuture<F: Future> {
        #[pin]
        kind: Kind<F>,
        pending: Option<Pending>,
        intent: Option<Intent>,
        // Boxed: only durable requests have one, and the response it holds would make every future larger.
        confirming: Option<Box<Confirming<F::Output>>>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F> {
        Inner { #[pin] future: F },
        Refused,
    }
}

/// A [`DurableIntent`](crate::Delivery::DurableIntent) request's inner future, held unpolled until its
/// intent event is durable.
pub(crate) struct Intent {
    /// The wait for the intent's ticket, or why it could not be queued.
    wait: Result<Pin<Box<dyn Future<Output = Confirmation> + Send>>, &'static str>,
    timeout: Duration,
}

impl Intent {
    /// Waits for the intent queued as `queued` (see [`RequestState::push_intent`]) until `timeout` from now.
    pub(crate) fn new(core: &Arc<Core>, queued: Result<u64, Refusal>, timeout: Duration) -> Self {
        let until = crate::call::after(timeout);
        let wait = match queued {
            Ok(ticket) => Ok(confirm(Arc::clone(core), ticket, until)),
            Err(refusal) => Err(refusal_reason(refusal)),
        };
        Intent { wait, timeout }
    }
}

fn confirm(core: Arc<Core>, ticket: u64, until: Instant) -> Pin<Box<dyn Future<Output = Confirmation> + Send>> {
    Box::pin(async move { core.shared.watermark.confirm(ticket, until).await })
}

fn refusal_reason(refusal: Refusal) -> &'static str {
    if refusal == Refusal::Closed { "closed" } else { "queue_full" }
}

/// A durable request's response, held until its event is durable. Dropped while it waits (the client went
/// away), it records the response as withheld with reason `cancelled`.
struct Confirming<T> {
    held: Option<T>,
    wait: Pin<Box<dyn Future<Output = Confirmation> + Send>>,
    withheld: Option<Withheld>,
    timeout: Duration,
}

impl<T> Drop for Confirming<T> {
    fn drop(&mut self) {
        if let Some(withheld) = self.withheld.take() {
            withheld.record("cancelled", self.timeout);
        }
    }
}

impl<F: Future> ResponseFuture<F> {
    /// `pending` is `None` for a request that records no event (skipped or sampled out).
    pub(crate) fn new(future: F, pending: Option<Pending>, intent: Option<Intent>) -> Self {
        Self { kind: Kind::Inner { future }, pending, intent, confirming: None }
    }

    pub(crate) fn refused() -> Self {
        Self { kind: Kind::Refused, pending: None, intent: None, confirming: None }
    }
}

/// `503 Service Unavailable`, empty, with `Retry-After: 1`.
fn unavailable<B>(retry_after: bool) -> Response<ResponseBody<B>> {
    let mut response = Response::new(ResponseBody::empty());
    *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    if retry_after {
        response.headers_mut().insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

impl<F, ResBody, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<ResBody>, E>>,
    ResBody: http_body::Body,
{
    type Output = Result<Response<ResponseBody<ResBody>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            if let Some(confirming) = this.confirming.as_mut() {
                let answer = ready!(confirming.wait.as_mut().poll(cx));
                let withheld = confirming.withheld.take().expect("confirming");
                let (held, timeout) = (confirming.held.take().expect("confirming"), confirming.timeout);
                *this.confirming = None;
                let Some(reason) = answer.failure() else {
                    add(&withheld.core().shared.counters.durable_confirmed, 1);
                    return Poll::Ready(held.map(|response| response.map(ResponseBody::plain)));
                };
                withheld.record(reason, timeout);
                return Poll::Ready(Ok(unavailable(true)));
            }
            if let Some(intent) = this.intent.as_mut() {
                let failure = match &mut intent.wait {
                    Ok(wait) => ready!(wait.as_mut().poll(cx)).failure(),
                    Err(reason) => Some(*reason),
                };
                let timeout = intent.timeout;
                *this.intent = None;
                if let Some(reason) = failure {
                    // The handler never runs: its future is dropped unpolled.
                    this.kind.set(Kind::Refused);
                    if let Some(mut pending) = this.pending.take() {
                        pending.withhold_intent(reason, timeout);
                    }
                    return Poll::Ready(Ok(unavailable(true)));
                }
            }
            let future = match this.kind.as_mut().project() {
                KindProj::Inner { future } => future,
                KindProj::Refused => return Poll::Ready(Ok(unavailable(false))),
            };
            let polling = Polling::enter(this.pending);
            let result = ready!(future.poll(cx));
            drop(polling);
            let Some(mut pending) = this.pending.take().filter(|pending| pending.records) else {
                // A request that records no event.
                return Poll::Ready(result.map(|response| response.map(ResponseBody::plain)));
            };
            let response = match result {
                Ok(response) => response,
                Err(error) => {
                    pending.finish(Some(Outcome::Error));
                    return Poll::Ready(Err(error));
                }
            };
            pending.status = Some(response.status());
            pending.read_grpc_status(response.headers());
            let Some(timeout) = pending.durable_timeout() else {
                let (parts, body) = response.into_parts();
                return Poll::Ready(Ok(Response::from_parts(parts, ResponseBody::new(body, pending))));
            };
            // The timeout runs from the response head.
            let until = crate::call::after(timeout);
            let (queued, withheld) = pending.finish_durable();
            let Some(withheld) = withheld else { return Poll::Ready(Ok(unavailable(true))) };
            let ticket = match queued {
                Ok(ticket) => ticket,
                Err(refusal) => {
                    withheld.record(refusal_reason(refusal), timeout);
                    return Poll::Ready(Ok(unavailable(true)));
                }
            };
            let wait = confirm(Arc::clone(withheld.core()), ticket, until);
            let confirming = Confirming { held: Some(Ok(response)), wait, withheld: Some(withheld), timeout };
            *this.confirming = Some(Box::new(confirming));
        }
    }
}

impl<F: Future> std::fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}
