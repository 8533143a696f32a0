//! A naive audit layer, for benchmarks only: it copies seven fields of each request (time, method, path, status,
//! latency, request id, user agent) and `try_send`s them into a bounded channel that a task drains and discards.
//! No sanitising, no bounds on what it copies, no context for handlers, no loss accounting beyond its counts,
//! no sink. It is the floor that issue 15 measures `AuditLayer` against: the least an audit middleware can do
//! on the request path. `benches/reqcost.rs` includes this very file (`bare | naive | layer …`), and the example
//! server runs it with `--audit naive` (`benches/load.sh`, mode `naive`).

// `pub` for both of the crates that include this file; each uses some of it.
#![allow(unreachable_pub, dead_code)]

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use http::{Request, Response};
use tokio::sync::mpsc;
use tower::{Layer, Service};

/// The naive layer's event: seven fields, nothing sanitised.
#[derive(Debug)]
pub struct NaiveEvent {
    ts_us: u64,
    method: http::Method,
    path: String,
    status: u16,
    latency_us: u64,
    request_id: Option<String>,
    user_agent: Option<String>,
}

/// What the naive layer did: events queued, events refused at a full channel, events the drain took.
#[derive(Debug, Default)]
pub struct NaiveCounts {
    pub queued: AtomicU64,
    pub full: AtomicU64,
    pub drained: AtomicU64,
}

/// The layer: a sender and the counts.
#[derive(Clone)]
pub struct NaiveLayer {
    tx: mpsc::Sender<NaiveEvent>,
    counts: &'static NaiveCounts,
}

impl NaiveLayer {
    /// A layer whose events go into a channel of `capacity`, and the drain to spawn (it ends when every copy of
    /// the layer and of its services is gone).
    pub fn new(capacity: usize) -> (Self, impl Future<Output = ()> + Send + 'static) {
        let (tx, mut rx) = mpsc::channel::<NaiveEvent>(capacity);
        // One per layer, never freed: no reference count to touch per request.
        let counts: &'static NaiveCounts = Box::leak(Box::default());
        let drain = async move {
            let mut buf = Vec::with_capacity(512);
            while rx.recv_many(&mut buf, 512).await > 0 {
                counts.drained.fetch_add(buf.len() as u64, Ordering::Relaxed);
                buf.clear();
            }
        };
        (Self { tx, counts }, drain)
    }

    /// The counts, shared with every service of this layer.
    pub fn counts(&self) -> &'static NaiveCounts {
        self.counts
    }
}

impl<S> Layer<S> for NaiveLayer {
    type Service = Naive<S>;

    fn layer(&self, inner: S) -> Naive<S> {
        Naive { inner, tx: self.tx.clone(), counts: self.counts }
    }
}

/// The naive layer's service.
#[derive(Clone)]
pub struct Naive<S> {
    inner: S,
    tx: mpsc::Sender<NaiveEvent>,
    counts: &'static NaiveCounts,
}

pin_project_lite::pin_project! {
    /// The naive layer's response future: sends the event when the response head is ready.
    pub struct NaiveFuture<F> {
        #[pin]
        inner: F,
        start: Instant,
        ev: Option<NaiveEvent>,
        tx: mpsc::Sender<NaiveEvent>,
        counts: &'static NaiveCounts,
    }
}

impl<S, B, RB> Service<Request<B>> for Naive<S>
where
    S: Service<Request<B>, Response = Response<RB>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = NaiveFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let h = req.headers();
        let get = |n: &str| h.get(n).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let ev = NaiveEvent {
            ts_us: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64),
            method: req.method().clone(),
            path: req.uri().path().to_owned(),
            status: 0,
            latency_us: 0,
            request_id: get("x-request-id"),
            user_agent: get("user-agent"),
        };
        NaiveFuture {
            inner: self.inner.call(req),
            start: Instant::now(),
            ev: Some(ev),
            tx: self.tx.clone(),
            counts: self.counts,
        }
    }
}

impl<F, RB, E> Future for NaiveFuture<F>
where
    F: Future<Output = Result<Response<RB>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let out = std::task::ready!(this.inner.poll(cx));
        if let (Some(mut ev), Ok(res)) = (this.ev.take(), &out) {
            ev.status = res.status().as_u16();
            ev.latency_us = this.start.elapsed().as_micros() as u64;
            let counter = if this.tx.try_send(ev).is_ok() { &this.counts.queued } else { &this.counts.full };
            counter.fetch_add(1, Ordering::Relaxed);
        }
        Poll::Ready(out)
    }
}
