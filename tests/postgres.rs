//! The Postgres sink against a real server: round trips, idempotence, faults, and the incident with a real pool.
//!
//! Reaches `TOWER_AUDIT_PG_URL`, or `postgres://postgres@127.0.0.1:5432/test` when it is unset; with the variable
//! unset and no server answering, each test says so and skips. `.ci/run` sets the variable, so in CI a dead server
//! fails the run.
#![cfg(feature = "postgres")]

mod common;

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::Duration;

use common::PgScratch as Scratch;
use common::*;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, Row as _};
use tower_audit::{AuditEvent, AuditLayer, AuditSink, ConfigError, MemorySink, PostgresSink, Retry, SinkError};
use uuid::Uuid;

const LIMIT: Duration = Duration::from_secs(60);
/// An admin pool, or `None` (after saying why) when no server is configured or answering.
async fn admin() -> Option<PgPool> {
    pg_pool(PgPoolOptions::new().max_connections(4).acquire_timeout(Duration::from_secs(5))).await
}

/// A sink on its own pool writing to the scratch schema's table.
async fn fresh_sink(scratch: &Scratch) -> PostgresSink {
    let sink = PostgresSink::connect(&pg_url()).await.unwrap().table(&scratch.table()).unwrap();
    sink.ensure_schema().await.unwrap();
    sink
}

async fn count(admin: &PgPool, table: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table}"))).fetch_one(admin).await.unwrap()
}

#[tokio::test]
async fn every_field_round_trips_exactly_including_hostile_values() {
    let Some(admin) = admin().await else { return };
    let scratch = Scratch::new(&admin, "t_round_trip").await;
    let sink = fresh_sink(&scratch).await;
    let tee = TeeSink { primary: sink, copy: MemorySink::new() };
    let (layer, handle) = AuditLayer::builder(tee.clone()).max_path_len(1024).build().unwrap();
    for e in hostile_events() {
        handle.record(e);
    }
    let svc = tower::Layer::layer(
        &layer,
        tower::service_fn(|_req: http::Request<http_body_util::Full<bytes::Bytes>>| answer(200, "ok")),
    );
    let res = tower::ServiceExt::oneshot(svc, get(&format!("/{}", "p".repeat(10 * 1024)))).await.unwrap();
    read_body(res.into_body()).await.unwrap();
    assert!(handle.shutdown(LIMIT).await.drained);

    // Every row, the boot and shutdown events' included, against what the sink was given.
    let expected = tee.copy.events();
    let events = ended_cleanly(expected.clone());
    assert_eq!(events.len(), 3);
    let rows = sqlx::query(AssertSqlSafe(format!(
        "SELECT id::text, seq, (EXTRACT(EPOCH FROM time) * 1000000)::int8 AS micros, kind, outcome, method, route, \
         path, status, grpc_status, latency_us, request_id, actor, host(client_addr) AS client_addr, user_agent, \
         attributes::text AS attributes, version, instance, boot::text FROM {} ORDER BY seq",
        scratch.table()
    )))
    .fetch_all(&admin)
    .await
    .unwrap();
    assert_eq!(rows.len(), expected.len());
    for (row, e) in rows.iter().zip(&expected) {
        let micros = e.time.duration_since(std::time::UNIX_EPOCH).unwrap().as_micros() as i64;
        assert_eq!(row.get::<String, _>("id"), e.id.to_string());
        assert_eq!(row.get::<i64, _>("seq"), e.seq as i64);
        assert_eq!(row.get::<i64, _>("micros"), micros);
        assert_eq!(row.get::<String, _>("kind"), e.kind);
        assert_eq!(row.get::<String, _>("outcome"), e.outcome.as_str());
        assert_eq!(row.get::<Option<String>, _>("method").as_deref(), e.method.as_deref());
        assert_eq!(row.get::<Option<String>, _>("route"), e.route);
        assert_eq!(row.get::<Option<String>, _>("path"), e.path);
        assert_eq!(row.get::<Option<i32>, _>("status"), e.status.map(i32::from));
        assert_eq!(row.get::<Option<i32>, _>("grpc_status"), e.grpc_status);
        assert_eq!(row.get::<Option<i64>, _>("latency_us"), e.latency_us.map(|l| l as i64));
        assert_eq!(row.get::<Option<String>, _>("request_id"), e.request_id);
        assert_eq!(row.get::<Option<String>, _>("actor"), e.actor);
        assert_eq!(row.get::<Option<String>, _>("client_addr"), e.client_addr.map(|a| a.to_string()));
        assert_eq!(row.get::<Option<String>, _>("user_agent"), e.user_agent);
        let attributes: BTreeMap<String, String> = serde_json::from_str(&row.get::<String, _>("attributes")).unwrap();
        assert_eq!(attributes, e.attributes);
        assert_eq!(row.get::<i16, _>("version"), e.version as i16);
        assert_eq!(row.get::<Option<String>, _>("instance").as_deref(), e.instance.as_deref());
        assert_eq!(row.get::<Option<String>, _>("boot"), e.boot.map(|b| b.to_string()));
        assert_eq!((e.instance.as_deref(), e.boot), (Some(handle.instance()), Some(handle.boot())));
    }
    assert_eq!(events[2].path.as_deref().unwrap().len(), 1024, "the 10 KiB path is cut to the bound");
}

#[tokio::test]
async fn one_statement_per_batch_and_a_retried_batch_never_duplicates() {
    let Some(admin) = admin().await else { return };
    let scratch = Scratch::new(&admin, "t_batches").await;
    let table = scratch.table();
    let sink = fresh_sink(&scratch).await;
    let (_layer, handle) = AuditLayer::builder(TeeSink { primary: sink.clone(), copy: MemorySink::new() })
        .batch_size(500)
        .build()
        .unwrap();
    for i in 0..1200 {
        handle.record(AuditEvent::new("bulk").attribute("n", i.to_string()));
    }
    let report = handle.shutdown(LIMIT).await;
    // Three batches of events, between the boot batch and the shutdown batch.
    assert_eq!((report.stats.written, report.stats.batches), (1200, 1 + 3 + 1));
    assert_eq!(count(&admin, &table).await, 1 + 1200 + 1);
    // Rows written by one statement share its transaction id: three batches, three transactions (and one
    // each for the boot and the shutdown event).
    let transactions = async |filter: &str| -> i64 {
        sqlx::query_scalar(AssertSqlSafe(format!("SELECT count(DISTINCT xmin::text) FROM {table} WHERE {filter}")))
            .fetch_one(&admin)
            .await
            .unwrap()
    };
    assert_eq!(transactions("kind = 'bulk'").await, 3);
    assert_eq!(transactions("true").await, 5);

    // Send ten stored events again, as a retry would: nothing is duplicated.
    let ids: Vec<String> = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT id::text FROM {table} WHERE kind = 'bulk' ORDER BY seq LIMIT 10"
    )))
    .fetch_all(&admin)
    .await
    .unwrap();
    let again: Vec<AuditEvent> = ids
        .iter()
        .map(|id| {
            let mut e = AuditEvent::new("bulk");
            e.id = id.parse().unwrap();
            e
        })
        .collect();
    sink.write_batch(&again).await.unwrap();
    assert_eq!(count(&admin, &table).await, 1 + 1200 + 1);
    // A batch with stored and new events (a retry that grew): the stored ones are skipped, the new ones land,
    // in one transaction.
    let fresh: Vec<AuditEvent> = (0..5)
        .map(|_| {
            let mut e = AuditEvent::new("mixed");
            e.id = uuid::Uuid::now_v7();
            e
        })
        .collect();
    let mixed: Vec<AuditEvent> = again.iter().take(5).cloned().chain(fresh.iter().cloned()).collect();
    sink.write_batch(&mixed).await.unwrap();
    assert_eq!(count(&admin, &table).await, 1 + 1200 + 1 + 5);
    let landed: Vec<String> =
        sqlx::query_scalar(AssertSqlSafe(format!("SELECT id::text FROM {table} WHERE kind = 'mixed' ORDER BY id")))
            .fetch_all(&admin)
            .await
            .unwrap();
    let mut want: Vec<String> = fresh.iter().map(|e| e.id.to_string()).collect();
    want.sort();
    assert_eq!(landed, want);
    assert_eq!(transactions("kind = 'mixed'").await, 1);
    // And the connection is sound after the refused `COPY`: the next batch goes in by `COPY` again.
    let mut after = AuditEvent::new("after");
    after.id = uuid::Uuid::now_v7();
    sink.write_batch(&[after]).await.unwrap();
    assert_eq!(count(&admin, &table).await, 1 + 1200 + 1 + 5 + 1);
}

#[tokio::test]
async fn schema_is_idempotent_indexed_schema_qualified_and_validated() {
    let Some(admin) = admin().await else { return };
    let scratch = Scratch::new(&admin, "t_audit_schema").await;
    let sink = PostgresSink::connect(&pg_url()).await.unwrap().table(&scratch.qualified("trail")).unwrap();
    sink.ensure_schema().await.unwrap();
    sink.ensure_schema().await.unwrap();
    let indexes: Vec<String> = sqlx::query_scalar(
        "SELECT indexname::text FROM pg_indexes WHERE schemaname = $1 AND tablename = 'trail' ORDER BY 1",
    )
    .bind(&scratch.schema)
    .fetch_all(&admin)
    .await
    .unwrap();
    assert_eq!(
        indexes,
        ["trail_actor_time_idx", "trail_boot_seq_key", "trail_kind_time_idx", "trail_pkey", "trail_time_idx"]
    );
    let attributes_type: String = sqlx::query_scalar(
        "SELECT data_type::text FROM information_schema.columns \
         WHERE table_schema = $1 AND table_name = 'trail' AND column_name = 'attributes'",
    )
    .bind(&scratch.schema)
    .fetch_one(&admin)
    .await
    .unwrap();
    assert_eq!(attributes_type, "jsonb");

    for bad in ["trail; DROP TABLE x", "Trail", "a.b.c", "\"quoted\""] {
        let err = sink.clone().table(bad).unwrap_err();
        assert!(matches!(&err, ConfigError::InvalidTableName(t) if t == bad), "{bad}: {err}");
    }
}

#[tokio::test]
async fn the_readme_cookbook_queries_answer_correctly() {
    let Some(admin) = admin().await else { return };
    let scratch = Scratch::new(&admin, "t_cookbook").await;
    let sink = fresh_sink(&scratch).await;
    let (_layer, handle) = AuditLayer::builder(sink).build().unwrap();
    for e in cookbook_events() {
        handle.record(e);
    }
    assert!(handle.shutdown(LIMIT).await.drained);

    let queries = cookbook("postgres");
    let names: Vec<&str> = queries.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["logins_by_address", "failed_logins_last_hour"]);
    let on_table = |sql: &str| sqlx::AssertSqlSafe(sql.replace("audit_events", &scratch.table()));
    let logins: Vec<(String, String, i64)> = sqlx::query(on_table(&queries[0].1))
        .fetch_all(&admin)
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect();
    assert_eq!(
        logins,
        [("alice@example.com".into(), "198.51.100.7".into(), 2), ("bob@example.com".into(), "203.0.113.5".into(), 1)]
    );
    let failures: Vec<(String, i64)> = sqlx::query_as(on_table(&queries[1].1)).fetch_all(&admin).await.unwrap();
    assert_eq!(failures, [("mallory@example.com".into(), 3), ("alice@example.com".into(), 1)]);
}

/// Kills the sink's connection mid-run, then makes the server refuse connections for a while: the worker
/// retries with backoff, and afterwards the table holds every event exactly once.
#[tokio::test]
async fn connection_killed_and_refused_every_event_lands_exactly_once() {
    const EVENTS: usize = 3000;
    let Some(admin) = admin().await else { return };
    // A database of the test's own (random suffix), dropped at the end.
    let db = &format!("tower_audit_faults_{:08x}", fastrand::u32(..));
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)")))
        .execute(&admin)
        .await
        .unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db}"))).execute(&admin).await.unwrap();
    let options = PgConnectOptions::from_str(&pg_url()).unwrap().database(db);
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_millis(500))
        .test_before_acquire(false)
        .connect_with(options.clone())
        .await
        .unwrap();
    let sink = PostgresSink::from_pool(pool).table("events").unwrap();
    sink.ensure_schema().await.unwrap();
    let (_layer, handle) = AuditLayer::builder(sink)
        .capacity(EVENTS)
        .batch_size(50)
        .flush_interval(Duration::from_millis(20))
        .sink_timeout(Duration::from_secs(5))
        .retry(
            Retry::default()
                .max_retries(100)
                .base_delay(Duration::from_millis(20))
                .max_delay(Duration::from_millis(200)),
        )
        .build()
        .unwrap();

    let sql = |s: String| sqlx::raw_sql(sqlx::AssertSqlSafe(s));
    let kill = format!("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{db}'");
    let mut pace = tokio::time::interval(Duration::from_millis(2));
    for i in 0..EVENTS {
        if i == EVENTS / 3 {
            sql(kill.clone()).execute(&admin).await.unwrap();
        }
        if i == EVENTS / 2 {
            sql(format!("ALTER DATABASE {db} ALLOW_CONNECTIONS false")).execute(&admin).await.unwrap();
            sql(kill.clone()).execute(&admin).await.unwrap();
        }
        if i == 2 * EVENTS / 3 {
            sql(format!("ALTER DATABASE {db} ALLOW_CONNECTIONS true")).execute(&admin).await.unwrap();
        }
        assert!(handle.record(AuditEvent::new("fault.test").attribute("n", i.to_string())));
        if i % 10 == 0 {
            pace.tick().await;
        }
    }
    let report = handle.shutdown(LIMIT).await;
    assert!(report.drained, "{report:?}");
    let stats = report.stats;
    assert_eq!(
        (stats.written, stats.lost + stats.fallback_written, stats.dropped()),
        (EVENTS as u64, 0, 0),
        "{stats:?}"
    );
    eprintln!("fault run: {stats:?}");
    assert!(stats.retries >= 2, "the kill and the refusal were ridden out by retries: {stats:?}");

    let check = PgPoolOptions::new().max_connections(1).connect_with(options).await.unwrap();
    let (rows, ids, ns): (i64, i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT id), count(DISTINCT attributes->>'n') FROM events WHERE kind = 'fault.test'",
    )
    .fetch_one(&check)
    .await
    .unwrap();
    assert_eq!((rows, ids, ns), (EVENTS as i64, EVENTS as i64, EVENTS as i64));
    let (min, max): (i64, i64) =
        sqlx::query_as("SELECT min((attributes->>'n')::int8), max((attributes->>'n')::int8) FROM events")
            .fetch_one(&check)
            .await
            .unwrap();
    assert_eq!((min, max), (0, EVENTS as i64 - 1));
    check.close().await;
    sql(format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)")).execute(&admin).await.unwrap();
}

/// What `ensure_schema` ran before schema version 2: `migrations/postgres/0001` alone, for `<schema>.events`.
fn version_1_ddl(scratch: &Scratch) -> String {
    include_str!("../migrations/postgres/0001_audit_events.sql")
        .replace("audit_events_", "events_")
        .replace("audit_events", &scratch.table())
}

async fn index_names(admin: &PgPool, scratch: &Scratch) -> Vec<String> {
    sqlx::query_scalar("SELECT indexname::text FROM pg_indexes WHERE schemaname = $1 ORDER BY 1")
        .bind(&scratch.schema)
        .fetch_all(admin)
        .await
        .unwrap()
}

/// A version 1 table with rows is upgraded in place: its rows keep a NULL instance and boot, the pipeline's
/// rows carry its own and count from 1. Upgrading again changes nothing, and once upgraded `ensure_schema`
/// leaves the table alone (an `ALTER TABLE` would wait for a reader's lock).
#[tokio::test]
async fn ensure_schema_upgrades_a_version_1_table_in_place() {
    let Some(admin) = admin().await else { return };
    let scratch = Scratch::new(&admin, "t_upgrade").await;
    let table = scratch.table();
    sqlx::raw_sql(AssertSqlSafe(version_1_ddl(&scratch))).execute(&admin).await.unwrap();
    let old_ids = [Uuid::now_v7(), Uuid::now_v7()];
    for (seq, id) in (1i64..).zip(old_ids) {
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {table} (id, seq, time, kind, outcome, actor, version) \
             VALUES ($1::uuid, $2, now(), 'v1.event', 'success', 'old', 1)"
        )))
        .bind(id.to_string())
        .bind(seq)
        .execute(&admin)
        .await
        .unwrap();
    }

    let sink = PostgresSink::connect(&pg_url()).await.unwrap().table(&table).unwrap();
    sink.ensure_schema().await.unwrap();
    sink.ensure_schema().await.unwrap();
    assert_eq!(
        index_names(&admin, &scratch).await,
        ["events_actor_time_idx", "events_boot_seq_key", "events_kind_time_idx", "events_pkey", "events_time_idx"]
    );
    let (_layer, handle) = AuditLayer::builder(sink.clone()).build().unwrap();
    for _ in 0..3 {
        assert!(handle.record(AuditEvent::new("v2.event")));
    }
    let report = handle.shutdown(LIMIT).await;
    assert!(report.drained && report.stats.written == 3, "{report}");

    type Stored = (Option<String>, i64, String, Option<String>, Option<String>, i16);
    let rows: Vec<Stored> = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT CASE WHEN version = 1 THEN id::text END, seq, kind, instance, boot::text, version \
         FROM {table} ORDER BY version, seq"
    )))
    .fetch_all(&admin)
    .await
    .unwrap();
    let old = |i: usize| (Some(old_ids[i].to_string()), i as i64 + 1, "v1.event".to_owned(), None, None, 1);
    let new = |seq, kind: &str| {
        let identity = (Some(handle.instance().to_owned()), Some(handle.boot().to_string()));
        (None, seq, kind.to_owned(), identity.0, identity.1, tower_audit::SCHEMA_VERSION as i16)
    };
    let v2 = "v2.event";
    assert_eq!(
        rows,
        [old(0), old(1), new(1, "audit.boot"), new(2, v2), new(3, v2), new(4, v2), new(5, "audit.shutdown")]
    );

    let mut reader = admin.begin().await.unwrap();
    sqlx::query(AssertSqlSafe(format!("SELECT count(*) FROM {table}"))).execute(&mut *reader).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), sink.ensure_schema())
        .await
        .expect("ensure_schema on an upgraded table waited for a reader's lock")
        .unwrap();
    reader.rollback().await.unwrap();
    assert_eq!(count(&admin, &table).await, 2 + 5);
}

/// Two pipelines built one after the other on one table: the same instance, two boots, each counting from 1.
/// The database keeps `(boot, seq)` unique: a retried event (same id) is skipped as before, but another event
/// under a number already taken is refused, through the sink and directly.
#[tokio::test]
async fn two_boots_count_from_one_and_boot_seq_is_unique() {
    let Some(admin) = admin().await else { return };
    let scratch = Scratch::new(&admin, "t_boots").await;
    let table = scratch.table();
    let sink = PostgresSink::connect(&pg_url()).await.unwrap().table(&table).unwrap();
    sink.ensure_schema().await.unwrap();
    let runs = two_boots(sink.clone()).await;
    let (first, second) = (&runs[0].0, &runs[1].0);
    assert_eq!(first.instance(), second.instance());
    assert_ne!(first.boot(), second.boot());

    let mut rows: Vec<(String, String, i64)> =
        sqlx::query_as(AssertSqlSafe(format!("SELECT instance, boot::text, seq FROM {table}")))
            .fetch_all(&admin)
            .await
            .unwrap();
    rows.sort();
    // Each boot: its boot event, its 3 (then 2) events, its shutdown event.
    let mut expected: Vec<(String, String, i64)> = [(first, 1..=5), (second, 1..=4)]
        .into_iter()
        .flat_map(|(h, seqs)| seqs.map(|seq| (h.instance().to_owned(), h.boot().to_string(), seq)))
        .collect();
    expected.sort();
    assert_eq!(rows, expected);

    // A retry sends the same event again (here the boot event): skipped on its id, nothing added.
    let stored = &runs[0].1[0];
    assert_eq!((stored.kind.as_ref(), stored.boot, stored.seq), ("audit.boot", Some(first.boot()), 1));
    sink.write_batch(std::slice::from_ref(stored)).await.unwrap();
    assert_eq!(count(&admin, &table).await, 9);

    // Another event under (first boot, 1): refused through the sink, and directly.
    let mut forged = stored.clone();
    forged.id = Uuid::now_v7();
    let refused = |err: &sqlx::Error| {
        let db = err.as_database_error().unwrap();
        (db.code().map(|c| c.into_owned()), db.constraint().map(str::to_owned))
    };
    let unique_violation = (Some("23505".to_owned()), Some("events_boot_seq_key".to_owned()));
    let SinkError::Backend(err) = sink.write_batch(&[forged]).await.unwrap_err() else { panic!("not a backend error") };
    assert_eq!(refused(err.downcast_ref().unwrap()), unique_violation, "{err}");
    let err = sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {table} (id, seq, time, kind, outcome, version, instance, boot) \
         VALUES ($1::uuid, 1, now(), 'forged', 'success', 2, $2, $3::uuid)"
    )))
    .bind(Uuid::now_v7().to_string())
    .bind(first.instance())
    .bind(first.boot().to_string())
    .execute(&admin)
    .await
    .unwrap_err();
    assert_eq!(refused(&err), unique_violation, "{err}");
    assert_eq!(count(&admin, &table).await, 9);
}
