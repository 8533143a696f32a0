//! Instructions per request, for callgrind (`benches/reqcost.sh` runs it at two run lengths and prints the
//! slope, so that setup cancels out):
//!
//! ```sh
//! reqcost MODE N        # MODE: bare | naive | layer | trace | sqlite
//! ```
//!
//! N requests through a bare `service_fn` answering "hello" (`bare`); through a naive audit layer that copies
//! seven fields and `try_send`s them into a channel drained by a task, without sanitising (`naive`); through
//! `AuditLayer` into a sink that discards (`layer`); through tower-http's `TraceLayer` at INFO with a JSON
//! formatter writing through `tracing-appender`'s non-blocking writer to `io::sink()` (`trace`); through
//! `AuditLayer` into the SQLite sink, in a file of its own (`sqlite`: SQLite's own work, on sqlx's thread,
//! included; `valgrind --tool=callgrind --separate-threads=yes` splits it by thread). Everything runs
//! on one current-thread runtime, so the audit worker's share (stamping, batching, the sink call, dropping the
//! events) is counted too. The same program as the issue's `reqcost` tool, built with this crate's
//! dev-dependencies (`tokio/test-util` among them, which makes `tokio::time::Instant::now()` look at the
//! runtime's clock first).
//!
//! Run without a mode (as `cargo bench` does) it only says how to use it.

mod common;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use common::{NullSink, hello, request};
use http::{Request, Response};
use http_body::Body;
use http_body_util::{BodyExt, Full};
use tokio::sync::mpsc;
use tower::{Layer, Service, ServiceExt, service_fn};
use tower_audit::AuditLayer;

async fn run<S, B>(mut svc: S, n: usize)
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
    B: Body,
    B::Error: std::fmt::Debug,
{
    for i in 0..n {
        let res = svc.ready().await.unwrap().call(request()).await.unwrap();
        std::hint::black_box(res.into_body().collect().await.unwrap());
        if i % 256 == 0 {
            tokio::task::yield_now().await; // let the worker drain
        }
    }
}

/// The naive layer's event: seven fields, nothing sanitised.
#[allow(dead_code)]
#[derive(Debug)]
struct NaiveEvent {
    ts_us: u64,
    method: http::Method,
    path: String,
    status: u16,
    latency_us: u64,
    request_id: Option<String>,
    user_agent: Option<String>,
}

#[derive(Clone)]
struct Naive<S> {
    inner: S,
    tx: mpsc::Sender<NaiveEvent>,
}

pin_project_lite::pin_project! {
    struct NaiveFuture<F> { #[pin] inner: F, start: Instant, ev: Option<NaiveEvent>, tx: mpsc::Sender<NaiveEvent> }
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
            ts_us: SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_micros() as u64,
            method: req.method().clone(),
            path: req.uri().path().to_owned(),
            status: 0,
            latency_us: 0,
            request_id: get("x-request-id"),
            user_agent: get("user-agent"),
        };
        NaiveFuture { inner: self.inner.call(req), start: Instant::now(), ev: Some(ev), tx: self.tx.clone() }
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
            let _ = this.tx.try_send(ev);
        }
        Poll::Ready(out)
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    // `cargo bench` passes `--bench`; only the positional arguments count.
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let Some(mode) = args.first().map(String::as_str) else {
        eprintln!(
            "usage: reqcost MODE N (MODE: bare | naive | layer | trace | sqlite), under callgrind: bash benches/reqcost.sh"
        );
        return;
    };
    let n: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(100_000);
    match mode {
        "bare" => run(service_fn(hello), n).await,
        "layer" => {
            let sink = NullSink::default();
            let (layer, handle) = AuditLayer::builder(sink.clone()).capacity(1 << 16).build().unwrap();
            run(layer.layer(service_fn(hello)), n).await;
            drop(layer);
            let report = handle.shutdown(std::time::Duration::from_secs(10)).await;
            eprintln!("written {} (sink saw {})", report.stats.written, sink.0.load(Ordering::Relaxed));
        }
        "sqlite" => {
            let dir = tempfile::tempdir().unwrap();
            let sink = tower_audit::SqliteSink::connect(dir.path().join("audit.db").to_str().unwrap()).await.unwrap();
            sink.ensure_schema().await.unwrap();
            let (layer, handle) = AuditLayer::builder(sink).capacity(1 << 16).build().unwrap();
            run(layer.layer(service_fn(hello)), n).await;
            drop(layer);
            let report = handle.shutdown(std::time::Duration::from_secs(60)).await;
            eprintln!("written {}", report.stats.written);
        }
        "naive" => {
            let (tx, mut rx) = mpsc::channel::<NaiveEvent>(1 << 16);
            let drain = tokio::spawn(async move {
                let mut buf = Vec::with_capacity(512);
                let mut seen = 0usize;
                while rx.recv_many(&mut buf, 512).await > 0 {
                    seen += buf.len();
                    buf.clear();
                }
                seen
            });
            run(Naive { inner: service_fn(hello), tx }, n).await;
            eprintln!("naive drained {}", drain.await.unwrap());
        }
        "trace" => {
            let (writer, _guard) =
                tracing_appender::non_blocking::NonBlockingBuilder::default().lossy(true).finish(std::io::sink());
            let subscriber = tracing_subscriber::fmt().json().with_writer(writer).finish();
            let _default = tracing::subscriber::set_default(subscriber);
            let traced = tower_http::trace::TraceLayer::new_for_http()
                .make_span_with(tower_http::trace::DefaultMakeSpan::new().level(tracing::Level::INFO))
                .on_response(tower_http::trace::DefaultOnResponse::new().level(tracing::Level::INFO));
            run(traced.layer(service_fn(hello)), n).await;
        }
        other => panic!("unknown mode {other} (bare | naive | layer | trace | sqlite)"),
    }
}
