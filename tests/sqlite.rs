//! The SQLite sink against a real embedded database file.
#![cfg(feature = "sqlite")]

mod common;

use std::time::Duration;

use common::*;
use sqlx::Row as _;
use sqlx::sqlite::SqlitePool;
use tower_audit::{AuditEvent, AuditLayer, AuditSink, ConfigError, MemorySink, SinkError, SqliteSink};
use uuid::Uuid;

const LIMIT: Duration = Duration::from_secs(30);

async fn sink(dir: &tempfile::TempDir) -> (SqliteSink, SqlitePool) {
    let path = dir.path().join("audit.db");
    let sink = SqliteSink::connect_with(path.to_str().unwrap(), 2).await.unwrap();
    sink.ensure_schema().await.unwrap();
    // A second, plain connection to read back what the sink wrote.
    let reader = SqlitePool::connect(&format!("sqlite://{}", path.display())).await.unwrap();
    (sink, reader)
}

#[tokio::test]
async fn every_field_round_trips_exactly_including_hostile_values() {
    let dir = tempfile::tempdir().unwrap();
    let (sqlite, reader) = sink(&dir).await;
    let tee = TeeSink { primary: sqlite, copy: MemorySink::new() };
    let (layer, handle) = AuditLayer::builder(tee.clone()).max_path_len(1024).build().unwrap();
    for e in hostile_events() {
        handle.record(e);
    }
    // A 10 KiB path through the layer is cut to the configured bound.
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
    let rows = read_rows(&reader).await;
    assert_eq!(rows.len(), expected.len());
    for (row, e) in rows.iter().zip(&expected) {
        assert_row(row, e);
        assert_eq!((e.instance.as_deref(), e.boot), (Some(handle.instance()), Some(handle.boot())));
    }
    assert_eq!(events[0].actor.as_deref(), Some("o'brien \"the\" ünïcödé 👀"));
    let long = events[2].path.as_deref().unwrap();
    assert_eq!(long.len(), 1024, "the 10 KiB path is cut to the bound");
}

async fn read_rows(reader: &SqlitePool) -> Vec<sqlx::sqlite::SqliteRow> {
    sqlx::query(
        "SELECT id, seq, time, kind, outcome, method, route, path, status, grpc_status, latency_us, request_id, \
         actor, client_addr, user_agent, attributes, version, instance, boot, prev_hash, hash FROM audit_events \
         ORDER BY seq",
    )
    .fetch_all(reader)
    .await
    .unwrap()
}

/// Every column of `row` holds what `e` says.
fn assert_row(row: &sqlx::sqlite::SqliteRow, e: &AuditEvent) {
    assert_eq!(row.get::<String, _>("id"), e.id.to_string());
    assert_eq!(row.get::<i64, _>("seq"), e.seq as i64);
    assert_eq!(row.get::<String, _>("time"), humantime::format_rfc3339_micros(e.time).to_string());
    assert_eq!(row.get::<String, _>("kind"), e.kind);
    assert_eq!(row.get::<String, _>("outcome"), e.outcome.as_str());
    assert_eq!(row.get::<Option<String>, _>("method").as_deref(), e.method.as_deref());
    assert_eq!(row.get::<Option<String>, _>("route"), e.route);
    assert_eq!(row.get::<Option<String>, _>("path"), e.path);
    assert_eq!(row.get::<Option<i64>, _>("status"), e.status.map(i64::from));
    assert_eq!(row.get::<Option<i64>, _>("grpc_status"), e.grpc_status.map(i64::from));
    assert_eq!(row.get::<Option<i64>, _>("latency_us"), e.latency_us.map(|l| l as i64));
    assert_eq!(row.get::<Option<String>, _>("request_id"), e.request_id);
    assert_eq!(row.get::<Option<String>, _>("actor"), e.actor);
    assert_eq!(row.get::<Option<String>, _>("client_addr"), e.client_addr.map(|a| a.to_string()));
    assert_eq!(row.get::<Option<String>, _>("user_agent"), e.user_agent);
    let attributes: std::collections::BTreeMap<String, String> =
        serde_json::from_str(&row.get::<String, _>("attributes")).unwrap();
    assert_eq!(attributes, e.attributes);
    assert_eq!(row.get::<i64, _>("version"), i64::from(e.version));
    assert_eq!(row.get::<Option<String>, _>("instance").as_deref(), e.instance.as_deref());
    assert_eq!(row.get::<Option<String>, _>("boot"), e.boot.map(|b| b.to_string()));
    assert_eq!(row.get::<Option<String>, _>("prev_hash"), e.prev_hash.map(|h| h.to_string()));
    assert_eq!(row.get::<Option<String>, _>("hash"), e.hash.map(|h| h.to_string()));
}

/// The sink makes each text once per run of equal values down a batch: rows that repeat, change, go absent
/// and come back, column by column, are each stored as given, and a chain's `prev_hash` is the row above's `hash`
/// except where it is not.
#[tokio::test]
async fn repeated_and_changing_texts_down_a_batch_are_each_stored_as_given() {
    let dir = tempfile::tempdir().unwrap();
    let (sqlite, reader) = sink(&dir).await;
    let (boot_a, boot_b) = (Uuid::from_u128(0xa), Uuid::from_u128(0xb));
    let pick = |i: usize, options: &[Option<&str>]| options[i % options.len()].map(str::to_owned);
    let events: Vec<AuditEvent> = (0..12usize)
        .map(|i| {
            let mut e = AuditEvent::new(["http.request", "http.request", "auth.login"][i % 3]);
            e.id = Uuid::from_u128(1000 + i as u128);
            e.seq = i as u64 + 1;
            e.boot = Some(if i < 7 { boot_a } else { boot_b });
            e.instance = Some(if i < 5 { "a" } else { "b" }.into());
            e.method = pick(i / 2, &[Some("GET"), None, Some("POST")]).map(Into::into);
            e.route = pick(i, &[Some("/x"), Some("/x"), Some("/y"), None]);
            e.path = pick(i / 3, &[Some("/x?a=1"), Some("/x?a=2")]);
            e.actor = pick(i, &[Some("alice"), None, None, Some("alice"), Some("bob")]);
            e.client_addr =
                [Some("203.0.113.9"), Some("203.0.113.9"), Some("::1"), None][i % 4].map(|a| a.parse().unwrap());
            e.user_agent = pick(i / 4, &[Some("curl/8"), Some("Mozilla/5.0")]);
            e.request_id = Some(format!("req-{i}"));
            if i % 5 != 4 {
                e.attributes.insert("tenant".into(), if i < 6 { "acme" } else { "globex" }.into());
            }
            e.hash = (i != 9).then(|| tower_audit::Hash([i as u8 + 1; 32]));
            e
        })
        .collect::<Vec<_>>();
    // Each prev_hash is the hash above it, but for the first row, the row after the one without a hash, and row 6.
    let events: Vec<AuditEvent> = events
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let mut e = e.clone();
            e.prev_hash = match i {
                0 => Some(tower_audit::Hash::ZERO),
                6 => Some(tower_audit::Hash([0xee; 32])),
                _ => events[i - 1].hash,
            };
            e
        })
        .collect();
    sqlite.write_batch(&events).await.unwrap();
    let rows = read_rows(&reader).await;
    assert_eq!(rows.len(), events.len());
    for (row, e) in rows.iter().zip(&events) {
        assert_row(row, e);
    }
    assert_eq!(rows[10].get::<Option<String>, _>("prev_hash"), None, "the row after the one without a hash");
    assert_eq!(rows[6].get::<Option<String>, _>("prev_hash"), Some("ee".repeat(32)));
}

/// Columns the whole batch holds one value in (a text, or none) leave the statement's rows: each row is still
/// stored with that value, beside columns that change down the batch; a batch of one row holds every column
/// that way.
#[tokio::test]
async fn values_the_whole_batch_shares_are_stored_in_every_row() {
    let dir = tempfile::tempdir().unwrap();
    let (sqlite, reader) = sink(&dir).await;
    let events: Vec<AuditEvent> = (0..9usize)
        .map(|i| {
            // Shared by all: kind, outcome, actor, client, user agent, attributes, instance, boot (texts);
            // method (none). Changing: route, path (absent in one row).
            let mut e = AuditEvent::new("auth.login").actor("carol");
            e.id = Uuid::from_u128(5000 + i as u128);
            e.seq = i as u64 + 1;
            e.boot = Some(Uuid::from_u128(0xc));
            e.instance = Some("shared-instance".into());
            e.client_addr = Some("198.51.100.7".parse().unwrap());
            e.user_agent = Some("agent/1".into());
            e.attributes.insert("tenant".into(), "initech".into());
            e.route = Some(format!("/r{}", i % 2));
            e.path = (i != 4).then(|| format!("/p{i}"));
            e
        })
        .collect();
    sqlite.write_batch(&events[..8]).await.unwrap();
    sqlite.write_batch(&events[8..]).await.unwrap();
    let rows = read_rows(&reader).await;
    assert_eq!(rows.len(), 9);
    for (row, e) in rows.iter().zip(&events) {
        assert_row(row, e);
    }
    assert_eq!(rows[3].get::<Option<String>, _>("actor").as_deref(), Some("carol"));
    assert_eq!(rows[3].get::<Option<String>, _>("method"), None);
    assert_eq!(rows[4].get::<Option<String>, _>("path"), None);
}

#[tokio::test]
async fn a_batch_over_the_bind_limit_is_chunked_in_one_transaction_and_retries_never_duplicate() {
    let dir = tempfile::tempdir().unwrap();
    let (sqlite, reader) = sink(&dir).await;
    let (_layer, handle) = AuditLayer::builder(TeeSink { primary: sqlite.clone(), copy: MemorySink::new() })
        .capacity(5000)
        .batch_size(5000)
        .build()
        .unwrap();
    for i in 0..5000 {
        handle.record(AuditEvent::new("bulk").attribute("n", i.to_string()));
    }
    let report = handle.shutdown(LIMIT).await;
    // One batch of 5000, between the boot batch and the shutdown batch.
    assert_eq!((report.stats.written, report.stats.batches), (5000, 1 + 1 + 1));
    let count = async || -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM audit_events WHERE kind = 'bulk'").fetch_one(&reader).await.unwrap()
    };
    assert_eq!(count().await, 5000);
    let bookends: i64 =
        sqlx::query_scalar("SELECT count(*) FROM audit_events WHERE kind IN ('audit.boot', 'audit.shutdown')")
            .fetch_one(&reader)
            .await
            .unwrap();
    assert_eq!(bookends, 2);

    // The same events again, as a retry would send them: nothing is duplicated.
    let again: Vec<AuditEvent> =
        sqlx::query_scalar::<_, String>("SELECT id FROM audit_events WHERE kind = 'bulk' ORDER BY seq LIMIT 10")
            .fetch_all(&reader)
            .await
            .unwrap()
            .into_iter()
            .map(|id| {
                let mut e = AuditEvent::new("bulk");
                e.id = id.parse().unwrap();
                e
            })
            .collect();
    sqlite.write_batch(&again).await.unwrap();
    assert_eq!(count().await, 5000);
    let all: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_events").fetch_one(&reader).await.unwrap();
    assert_eq!(all, 5000 + 2);
    let distinct: i64 = sqlx::query_scalar("SELECT count(DISTINCT json_extract(attributes, '$.n')) FROM audit_events")
        .fetch_one(&reader)
        .await
        .unwrap();
    assert_eq!(distinct, 5000);
}

#[tokio::test]
async fn schema_is_idempotent_indexed_and_the_table_name_is_validated() {
    let dir = tempfile::tempdir().unwrap();
    let (sqlite, reader) = sink(&dir).await;
    sqlite.ensure_schema().await.unwrap();
    let custom = sqlite.clone().table("security_trail").unwrap();
    custom.ensure_schema().await.unwrap();
    custom.ensure_schema().await.unwrap();
    let indexes: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'security_trail' AND name NOT LIKE 'sqlite_%' ORDER BY name",
    )
    .fetch_all(&reader)
    .await
    .unwrap();
    assert_eq!(
        indexes,
        [
            "security_trail_actor_time_idx",
            "security_trail_boot_seq_key",
            "security_trail_kind_time_idx",
            "security_trail_time_idx"
        ]
    );

    for bad in ["audit; DROP TABLE audit_events", "Audit", "main.audit", "x\"y"] {
        let err = sqlite.clone().table(bad).unwrap_err();
        assert!(matches!(&err, ConfigError::InvalidTableName(t) if t == bad), "{bad}: {err}");
    }
}

#[tokio::test]
async fn an_unopenable_database_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("no-such-dir").join("audit.db");
    let err = SqliteSink::connect(path.to_str().unwrap()).await.unwrap_err();
    assert!(err.to_string().starts_with("audit sink failed: "), "{err}");
    assert!(err.to_string().contains("unable to open database file"), "{err}");
}

#[tokio::test]
async fn the_readme_cookbook_queries_answer_correctly() {
    let dir = tempfile::tempdir().unwrap();
    let (sqlite, reader) = sink(&dir).await;
    let (_layer, handle) = AuditLayer::builder(sqlite).build().unwrap();
    for e in cookbook_events() {
        handle.record(e);
    }
    assert!(handle.shutdown(LIMIT).await.drained);

    let queries = cookbook("sqlite");
    let names: Vec<&str> = queries.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["logins_by_address", "failed_logins_last_hour"]);
    let logins: Vec<(String, String, i64)> = sqlx::query(sqlx::AssertSqlSafe(queries[0].1.clone()))
        .fetch_all(&reader)
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect();
    assert_eq!(
        logins,
        [("alice@example.com".into(), "198.51.100.7".into(), 2), ("bob@example.com".into(), "203.0.113.5".into(), 1)]
    );
    let failures: Vec<(String, i64)> =
        sqlx::query_as(sqlx::AssertSqlSafe(queries[1].1.clone())).fetch_all(&reader).await.unwrap();
    assert_eq!(failures, [("mallory@example.com".into(), 3), ("alice@example.com".into(), 1)]);
}

async fn index_names(reader: &SqlitePool) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'audit_events' \
         AND name NOT LIKE 'sqlite_%' ORDER BY name",
    )
    .fetch_all(reader)
    .await
    .unwrap()
}

/// A version 1 table with rows is upgraded in place: its rows keep a NULL instance and boot, the pipeline's
/// rows carry its own and count from 1. Upgrading again changes nothing.
#[tokio::test]
async fn ensure_schema_upgrades_a_version_1_table_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.db");
    let reader = SqlitePool::connect(&format!("sqlite://{}?mode=rwc", path.display())).await.unwrap();
    // What `ensure_schema` ran before schema version 2.
    sqlx::raw_sql(include_str!("../migrations/sqlite/0001_audit_events.sql")).execute(&reader).await.unwrap();
    let old_ids = [Uuid::now_v7(), Uuid::now_v7()];
    for (seq, id) in (1i64..).zip(old_ids) {
        sqlx::query(
            "INSERT INTO audit_events (id, seq, time, kind, outcome, actor, version) \
             VALUES (?, ?, '2026-01-02T03:04:05.000006Z', 'v1.event', 'success', 'old', 1)",
        )
        .bind(id.to_string())
        .bind(seq)
        .execute(&reader)
        .await
        .unwrap();
    }

    let sqlite = SqliteSink::connect(path.to_str().unwrap()).await.unwrap();
    sqlite.ensure_schema().await.unwrap();
    sqlite.ensure_schema().await.unwrap();
    let columns: Vec<String> =
        sqlx::query_scalar("SELECT name FROM pragma_table_info('audit_events')").fetch_all(&reader).await.unwrap();
    assert_eq!(columns[columns.len() - 5..], ["version", "instance", "boot", "prev_hash", "hash"]);
    assert_eq!(
        index_names(&reader).await,
        [
            "audit_events_actor_time_idx",
            "audit_events_boot_seq_key",
            "audit_events_kind_time_idx",
            "audit_events_time_idx"
        ]
    );
    let (_layer, handle) = AuditLayer::builder(sqlite).build().unwrap();
    for _ in 0..3 {
        assert!(handle.record(AuditEvent::new("v2.event")));
    }
    let report = handle.shutdown(LIMIT).await;
    assert!(report.drained && report.stats.written == 3, "{report}");

    type Stored = (Option<String>, i64, String, Option<String>, Option<String>, i64);
    let rows: Vec<Stored> = sqlx::query_as(
        "SELECT CASE WHEN version = 1 THEN id END, seq, kind, instance, boot, version FROM audit_events \
         ORDER BY version, seq",
    )
    .fetch_all(&reader)
    .await
    .unwrap();
    let old = |i: usize| (Some(old_ids[i].to_string()), i as i64 + 1, "v1.event".to_owned(), None, None, 1);
    let new = |seq, kind: &str| {
        let identity = (Some(handle.instance().to_owned()), Some(handle.boot().to_string()));
        (None, seq, kind.to_owned(), identity.0, identity.1, i64::from(tower_audit::SCHEMA_VERSION))
    };
    let v2 = "v2.event";
    assert_eq!(
        rows,
        [old(0), old(1), new(1, "audit.boot"), new(2, v2), new(3, v2), new(4, v2), new(5, "audit.shutdown")]
    );
}

/// Two pipelines built one after the other on one table: the same instance, two boots, each counting from 1.
/// The database keeps `(boot, seq)` unique: a retried event (same id) is skipped as before, but another event
/// under a number already taken is refused, through the sink and directly.
#[tokio::test]
async fn two_boots_count_from_one_and_boot_seq_is_unique() {
    let dir = tempfile::tempdir().unwrap();
    let (sqlite, reader) = sink(&dir).await;
    let runs = two_boots(sqlite.clone()).await;
    let (first, second) = (&runs[0].0, &runs[1].0);
    assert_eq!(first.instance(), second.instance());
    assert_ne!(first.boot(), second.boot());

    let mut rows: Vec<(String, String, i64)> =
        sqlx::query_as("SELECT instance, boot, seq FROM audit_events").fetch_all(&reader).await.unwrap();
    rows.sort();
    // Each boot: its boot event, its 3 (then 2) events, its shutdown event.
    let mut expected: Vec<(String, String, i64)> = [(first, 1..=5), (second, 1..=4)]
        .into_iter()
        .flat_map(|(h, seqs)| seqs.map(|seq| (h.instance().to_owned(), h.boot().to_string(), seq)))
        .collect();
    expected.sort();
    assert_eq!(rows, expected);
    let count =
        async || -> i64 { sqlx::query_scalar("SELECT count(*) FROM audit_events").fetch_one(&reader).await.unwrap() };

    // A retry sends the same event again (here the boot event): skipped on its id, nothing added.
    let stored = &runs[0].1[0];
    assert_eq!((stored.kind.as_ref(), stored.boot, stored.seq), ("audit.boot", Some(first.boot()), 1));
    sqlite.write_batch(std::slice::from_ref(stored)).await.unwrap();
    assert_eq!(count().await, 9);

    // Another event under (first boot, 1): refused through the sink, and directly.
    let refused = |err: &sqlx::Error| {
        let db = err.as_database_error().unwrap();
        (db.kind(), db.message().to_owned())
    };
    let unique_violation = (
        sqlx::error::ErrorKind::UniqueViolation,
        "UNIQUE constraint failed: audit_events.boot, audit_events.seq".to_owned(),
    );
    let mut forged = stored.clone();
    forged.id = Uuid::now_v7();
    let SinkError::Backend(err) = sqlite.write_batch(&[forged]).await.unwrap_err() else {
        panic!("not a backend error")
    };
    assert_eq!(refused(err.downcast_ref().unwrap()), unique_violation, "{err}");
    let err = sqlx::query(
        "INSERT INTO audit_events (id, seq, time, kind, outcome, version, instance, boot) \
         VALUES (?, 1, '2026-01-02T03:04:05.000006Z', 'forged', 'success', 2, ?, ?)",
    )
    .bind(Uuid::now_v7().to_string())
    .bind(first.instance())
    .bind(first.boot().to_string())
    .execute(&reader)
    .await
    .unwrap_err();
    assert_eq!(refused(&err), unique_violation, "{err}");
    assert_eq!(count().await, 9);
}

/// A batch that fits one statement is written without `BEGIN`/`COMMIT`: the statement alone must still be all or
/// nothing. The third row breaks the unique `(boot, seq)` index; none of the three is stored, and the error says so.
#[tokio::test]
async fn a_batch_in_one_statement_is_written_whole_or_not_at_all() {
    let dir = tempfile::tempdir().unwrap();
    let (sqlite, reader) = sink(&dir).await;
    let boot = Uuid::now_v7();
    let event = |seq: u64| {
        let mut e = AuditEvent::new("one.statement");
        e.id = Uuid::now_v7();
        e.boot = Some(boot);
        e.seq = seq;
        e
    };
    sqlite.write_batch(&[event(1)]).await.unwrap();
    let batch = [event(2), event(3), event(1)];
    let error = sqlite.write_batch(&batch).await.unwrap_err();
    let chain = format!("{error} {:?}", std::error::Error::source(&error));
    assert!(chain.contains("UNIQUE"), "{chain}");
    let seqs = async || -> Vec<i64> {
        sqlx::query_scalar("SELECT seq FROM audit_events ORDER BY seq").fetch_all(&reader).await.unwrap()
    };
    assert_eq!(seqs().await, [1]);
    // The rows that break nothing go in once sent alone.
    sqlite.write_batch(&batch[..2]).await.unwrap();
    assert_eq!(seqs().await, [1, 2, 3]);
}

/// The sink's WAL guard (README, "`SqliteSink` and slow disks"): past 40 MiB the writer checkpoints itself.
const WAL_GUARD: u64 = 40 << 20;

fn wal_bytes(db: &std::path::Path) -> u64 {
    let mut wal = db.as_os_str().to_owned();
    wal.push("-wal");
    std::fs::metadata(std::path::PathBuf::from(wal)).map_or(0, |m| m.len())
}

/// `rows` events of one batch, each with ~2 KiB of attributes (about one WAL page per two rows).
fn fat_batch(rows: usize) -> Vec<AuditEvent> {
    (0..rows)
        .map(|i| {
            let mut e = AuditEvent::new("http.request").actor("alice");
            e.id = Uuid::now_v7();
            e.attributes.insert("pad".into(), format!("{i:02000}"));
            e
        })
        .collect()
}

/// Writes `batches` fat batches of 250 rows back to back: the WAL file's largest size.
async fn write_fat(sink: &SqliteSink, db: &std::path::Path, batches: usize) -> u64 {
    let mut largest = 0;
    for _ in 0..batches {
        sink.write_batch(&fat_batch(250)).await.unwrap();
        largest = largest.max(wal_bytes(db));
    }
    largest
}

async fn stored(reader: &SqlitePool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM audit_events").fetch_one(reader).await.unwrap()
}

/// Writes without a pause (~150 MiB of rows, far more than background checkpoints every 2 s keep up with): the
/// WAL file stays near the guard, so the WAL started over again and again, and every row is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continuous_writes_keep_the_wal_near_its_guard() {
    let dir = tempfile::tempdir().unwrap();
    let (sink, reader) = sink(&dir).await;
    let db = dir.path().join("audit.db");
    let largest = write_fat(&sink, &db, 300).await;
    assert_eq!(stored(&reader).await, 300 * 250);
    assert!(largest <= WAL_GUARD + (WAL_GUARD / 4), "the WAL file reached {largest} bytes, guard {WAL_GUARD}");
}

/// The database file moved away while the sink writes (a directory put at its path), then back: no batch fails,
/// no row is lost, and the WAL stays bounded. The sink's connections hold the file they opened; none opens the
/// path again (one that did could reach another file and checkpoint this WAL into it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_file_moved_away_and_back_while_the_sink_writes_loses_no_row() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("audit.db");
    let moved = dir.path().join("moved.db");
    let sink = SqliteSink::connect(db.to_str().unwrap()).await.unwrap();
    sink.ensure_schema().await.unwrap();
    std::fs::rename(&db, &moved).unwrap();
    std::fs::create_dir(&db).unwrap();
    let largest = write_fat(&sink, &db, 250).await;
    std::fs::remove_dir(&db).unwrap();
    std::fs::rename(&moved, &db).unwrap();
    let reader = SqlitePool::connect(&format!("sqlite://{}", db.display())).await.unwrap();
    assert_eq!(stored(&reader).await, 250 * 250);
    assert!(largest <= WAL_GUARD + (WAL_GUARD / 4), "the WAL file reached {largest} bytes, guard {WAL_GUARD}");
}
