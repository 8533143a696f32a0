//! What one request pays, in the same run:
//!
//! - (a) a bare `service_fn` (the baseline every other figure is divided by);
//! - (b) the same behind `AuditLayer`, into a sink that discards;
//! - (c) the same behind tower-http's `TraceLayer`, logging one JSON line per request through
//!   `tracing-appender`'s non-blocking writer (the usual "log every request" setup);
//! - (d) the anti-pattern: the request awaits an SQLite insert of its audit row.
//!
//! `cargo bench --bench request --features sqlite`

mod common;

use std::convert::Infallible;
use std::hint::black_box;
use std::time::Duration;

use bytes::Bytes;
use common::{NullSink, hello, request};
use criterion::{Criterion, criterion_group, criterion_main};
use http::{Request, Response};
use http_body::Body;
use http_body_util::{BodyExt, Full};
use tower::{Service, ServiceExt, service_fn};
use tower_audit::AuditLayer;

async fn one<S, B>(mut svc: S)
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
    B: Body,
    B::Error: std::fmt::Debug,
{
    let res = svc.ready().await.unwrap().call(request()).await.unwrap();
    black_box(res.into_body().collect().await.unwrap());
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

fn per_request(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("request");
    group.measurement_time(Duration::from_secs(5));

    let bare = service_fn(hello);
    group.bench_function("a_bare", |b| b.to_async(&rt).iter(|| one(bare)));

    let sink = NullSink::default();
    let (layer, handle) = {
        let _rt = rt.enter();
        AuditLayer::builder(sink.clone()).build().unwrap()
    };
    let audited = tower::Layer::layer(&layer, service_fn(hello));
    group.bench_function("b_audit_layer", |b| b.to_async(&rt).iter(|| one(audited.clone())));

    let (writer, guard) =
        tracing_appender::non_blocking::NonBlockingBuilder::default().lossy(true).finish(std::io::sink());
    let subscriber = tracing_subscriber::fmt().json().with_writer(writer).finish();
    let dispatch = tracing::Dispatch::new(subscriber);
    let traced = tower_http::trace::TraceLayer::new_for_http()
        .make_span_with(tower_http::trace::DefaultMakeSpan::new().level(tracing::Level::INFO))
        .on_response(tower_http::trace::DefaultOnResponse::new().level(tracing::Level::INFO));
    let traced = tower::Layer::layer(&traced, service_fn(hello));
    group.bench_function("c_trace_layer_json", |b| {
        let _default = tracing::dispatcher::set_default(&dispatch);
        b.to_async(&rt).iter(|| one(traced.clone()))
    });
    drop(guard);

    let dir = tempfile::tempdir().unwrap();
    let pool = rt.block_on(async {
        let options = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(dir.path().join("inline.db"))
            .create_if_missing(true)
            .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
            .synchronous(sqlx::sqlite::SqliteSynchronous::Normal);
        let pool = sqlx::sqlite::SqlitePoolOptions::new().max_connections(1).connect_with(options).await.unwrap();
        sqlx::query("CREATE TABLE inline_audit (time INTEGER, method TEXT, path TEXT, status INTEGER)")
            .execute(&pool)
            .await
            .unwrap();
        pool
    });
    let inline = service_fn(move |req: Request<Full<Bytes>>| {
        let pool = pool.clone();
        async move {
            let path = req.uri().path().to_owned();
            let res = hello(req).await?;
            sqlx::query("INSERT INTO inline_audit (time, method, path, status) VALUES (?, 'GET', ?, ?)")
                .bind(1_i64)
                .bind(path)
                .bind(i64::from(res.status().as_u16()))
                .execute(&pool)
                .await
                .unwrap();
            Ok::<_, Infallible>(res)
        }
    });
    group.bench_function("d_inline_sqlite_insert", |b| b.to_async(&rt).iter(|| one(inline.clone())));
    group.finish();

    let stats = rt.block_on(handle.shutdown(Duration::from_secs(10))).stats;
    eprintln!(
        "audit layer pipeline: {} events accepted, {} written ({} seen by the sink), {} dropped (a drop would \
         flatter (b))",
        stats.accepted,
        stats.written,
        sink.count(),
        stats.dropped()
    );
}

criterion_group!(benches, per_request);
criterion_main!(benches);
