//! Instructions per request, for callgrind (`benches/reqcost.sh` runs it at two run lengths and prints the
//! slope, so that setup cancels out):
//!
//! ```sh
//! reqcost MODE N        # MODE: bare | naive | layer | trace | sqlite
//! ```
//!
//! N requests through a bare `service_fn` answering "hello" (`bare`); through a naive audit layer that copies
//! seven fields and `try_send`s them into a channel drained by a task, without sanitising (`naive`, the example
//! server's `--audit naive`, whose file this bench includes); through
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
#[path = "../examples/auth_server/app/naive.rs"]
mod naive;

use std::sync::atomic::Ordering;

use bytes::Bytes;
use common::{NullSink, hello, request};
use http::{Request, Response};
use http_body::Body;
use http_body_util::{BodyExt, Full};
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
            let (layer, drain) = naive::NaiveLayer::new(1 << 16);
            let drain = tokio::spawn(drain);
            let counts = layer.counts();
            run(layer.layer(service_fn(hello)), n).await;
            drop(layer);
            drain.await.unwrap();
            eprintln!("naive drained {}", counts.drained.load(Ordering::Relaxed));
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
