//! The NATS sink and the `nats_to_postgres` consumer, each against a same-run ceiling:
//!
//! - `NatsSink::write_batch` at batch 512 (serialise, subject, publish all, await every ack) against publishing
//!   the same bytes (payloads, subjects and `Nats-Msg-Id` headers made beforehand) with async-nats directly,
//!   also all at once and then every ack;
//! - the consumer (`Mover::move_batch`, batches of 512: fetch, decode, insert, ack) against
//!   `PostgresSink::write_batch` of the same events straight from memory.
//!
//! Three rounds, interleaved, each on a fresh stream and table; prints every round and the medians.
//! Needs NATS with JetStream (`TOWER_AUDIT_NATS_URL`, default `nats://127.0.0.1:4222`) and Postgres
//! (`TOWER_AUDIT_PG_URL`). Run it on a quiet machine:
//!
//! `cargo bench --bench nats --features nats,postgres`

#[path = "../examples/nats_to_postgres/mover.rs"]
#[allow(dead_code)]
mod mover;

mod common;

use std::time::Instant;

use async_nats::jetstream::{self, message::PublishMessage};
use sqlx::postgres::PgPoolOptions;
use tower_audit::{AuditEvent, AuditSink, NatsSink, PostgresSink};

const BATCH: usize = 512;
const BATCHES: usize = 200;
const ROUNDS: usize = 3;

fn batch(seq0: usize) -> Vec<AuditEvent> {
    (0..BATCH)
        .map(|i| {
            let mut e = common::request_event();
            e.id = uuid::Uuid::now_v7();
            e.seq = (seq0 + i) as u64 + 1;
            e.instance = Some("bench-1".into());
            e.boot = Some(uuid::Uuid::now_v7());
            e
        })
        .collect()
}

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

struct Round {
    sink: f64,
    direct: f64,
    mover: f64,
    insert: f64,
}

async fn round(client: &async_nats::Client, pg_url: &str, n: usize) -> Round {
    let js = jetstream::new(client.clone());
    let name = format!("BENCH_{n}_{:08x}", fastrand::u32(..));
    let prefix = format!("bench_{n}_{:08x}", fastrand::u32(..));
    let sink = NatsSink::new(client.clone(), &name).unwrap().subject_prefix(&prefix).unwrap();
    sink.ensure_stream().await.unwrap();
    let batches: Vec<Vec<AuditEvent>> = (0..BATCHES).map(|b| batch(b * BATCH)).collect();

    // The sink.
    let start = Instant::now();
    for events in &batches {
        sink.write_batch(events).await.unwrap();
    }
    let sink_rate = (BATCHES * BATCH) as f64 / start.elapsed().as_secs_f64();
    assert_eq!(sink.stored(), (BATCHES * BATCH) as u64);

    // The same bytes, published directly (fresh ids in the header, else the stream would drop them as
    // duplicates; the payloads are the same length).
    let direct_prefix = format!("{prefix}_d");
    let direct: Vec<Vec<(String, String, bytes::Bytes)>> = (0..BATCHES)
        .map(|b| {
            batch(b * BATCH)
                .iter()
                .map(|e| {
                    let subject = sink.subject(e).replacen(&prefix, &direct_prefix, 1);
                    (subject, e.id.hyphenated().to_string(), serde_json::to_vec(e).unwrap().into())
                })
                .collect()
        })
        .collect();
    let mut config = js.get_stream(&name).await.unwrap().cached_info().config.clone();
    config.subjects.push(format!("{direct_prefix}.>"));
    js.update_stream(config).await.unwrap();
    let start = Instant::now();
    for messages in direct {
        let mut acks = Vec::with_capacity(BATCH);
        for (subject, id, payload) in messages {
            let publish = PublishMessage::build().payload(payload).message_id(id);
            acks.push(js.send_publish(subject, publish).await.unwrap());
        }
        for ack in acks {
            assert!(!ack.await.unwrap().duplicate);
        }
    }
    let direct_rate = (BATCHES * BATCH) as f64 / start.elapsed().as_secs_f64();

    // The consumer, over the sink's messages only (a filter on the sink's subjects), into a fresh table.
    let admin = PgPoolOptions::new().max_connections(1).connect(pg_url).await.unwrap();
    let schema = format!("bench_nats_{:08x}", fastrand::u32(..));
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}"))).execute(&admin).await.unwrap();
    let pg = PostgresSink::connect(pg_url).await.unwrap().table(&format!("{schema}.moved")).unwrap();
    pg.ensure_schema().await.unwrap();
    let stream = js.get_stream(&name).await.unwrap();
    let consumer_config = async_nats::jetstream::consumer::pull::Config {
        durable_name: Some("postgres".to_owned()),
        ack_policy: async_nats::jetstream::consumer::AckPolicy::Explicit,
        filter_subject: sink.subjects(),
        max_ack_pending: (BATCH * 4) as i64,
        ..Default::default()
    };
    stream.create_consumer(consumer_config).await.unwrap();
    let settings = mover::Settings { batch: BATCH, ..mover::Settings::new(&name) };
    let mut mover = mover::Mover::new(&js, pg.clone(), settings).await.unwrap();
    let start = Instant::now();
    let mut moved = 0;
    while moved < BATCHES * BATCH {
        moved += mover.move_batch().await.unwrap().rows;
    }
    let mover_rate = moved as f64 / start.elapsed().as_secs_f64();
    assert_eq!(moved, BATCHES * BATCH);

    // The ceiling: the same inserts straight from memory, into a second table.
    let direct_pg = PostgresSink::connect(pg_url).await.unwrap().table(&format!("{schema}.direct")).unwrap();
    direct_pg.ensure_schema().await.unwrap();
    let start = Instant::now();
    for events in &batches {
        direct_pg.write_batch(events).await.unwrap();
    }
    let insert_rate = (BATCHES * BATCH) as f64 / start.elapsed().as_secs_f64();

    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE"))).execute(&admin).await.unwrap();
    js.delete_stream(&name).await.unwrap();
    Round { sink: sink_rate, direct: direct_rate, mover: mover_rate, insert: insert_rate }
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let nats_url = env("TOWER_AUDIT_NATS_URL", "nats://127.0.0.1:4222");
        let pg_url = env("TOWER_AUDIT_PG_URL", "postgres://postgres@127.0.0.1:5432/test");
        let client = match async_nats::connect(&nats_url).await {
            Ok(client) => client,
            Err(e) => {
                eprintln!("skipping: no NATS at {nats_url} ({e})");
                return;
            }
        };
        println!("load average before: {}", std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim());
        let mut rounds = Vec::new();
        for n in 0..ROUNDS {
            let r = round(&client, &pg_url, n).await;
            println!(
                "round {}: sink {:.0} ev/s, direct publish {:.0} ev/s ({:.2}x); consumer {:.0} rows/s, direct insert {:.0} rows/s ({:.2}x)",
                n + 1,
                r.sink,
                r.direct,
                r.sink / r.direct,
                r.mover,
                r.insert,
                r.mover / r.insert
            );
            rounds.push(r);
        }
        let m = |f: fn(&Round) -> f64| median(rounds.iter().map(f).collect());
        println!(
            "median: sink {:.0} ev/s, direct publish {:.0} ev/s, ratio {:.2}x; consumer {:.0} rows/s, direct insert {:.0} rows/s, ratio {:.2}x",
            m(|r| r.sink),
            m(|r| r.direct),
            m(|r| r.sink / r.direct),
            m(|r| r.mover),
            m(|r| r.insert),
            m(|r| r.mover / r.insert)
        );
        println!("load average after: {}", std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim());
    });
}
