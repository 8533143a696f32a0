//! The verifier against real trails: honest ones verify, and each attack by someone with write access to the
//! trail (a JSON lines file, an SQLite or Postgres table) is caught and named exactly.

mod common;

use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

use common::eventually;
use tower_audit::integrity::{
    Checkpoint, Finding, Integrity, Report, VerifierKey, event_hash, verify, verify_json_lines,
};
use tower_audit::{AuditEvent, AuditLayer, AuditSink, JsonLinesSink, kind};
use uuid::Uuid;

const LIMIT: Duration = Duration::from_secs(120);
const SEED: [u8; 32] = [42; 32];
/// Events in the big boot of the JSON lines trail.
const BIG: u64 = 100_000;
/// Events in the small boot (the one a row is replayed from).
const SMALL: u64 = 50;

fn integrity(anchor: &Path) -> Integrity {
    Integrity::from_seed(&SEED)
        .key_name("audit.test")
        .checkpoint_every(1000)
        .checkpoint_interval(Duration::from_secs(3600))
        .checkpoint_sink(JsonLinesSink::open(anchor).unwrap())
}

fn key() -> VerifierKey {
    Integrity::from_seed(&SEED).key_name("audit.test").verifier_key()
}

/// An event of about 450 bytes in JSON, as a login handler would record it.
fn login(i: u64) -> AuditEvent {
    let mut event = AuditEvent::new("auth.login")
        .actor(format!("user-{i}@example.com"))
        .attribute("method", "password")
        .attribute("tenant", "acme");
    event.method = Some("POST".into());
    event.route = Some("/v1/sessions".into());
    event.path = Some("/v1/sessions".into());
    event.status = Some(200);
    event.latency_us = Some(1234 + i % 1000);
    event.request_id = Some(format!("req-{i:016x}"));
    event.client_addr = Some("203.0.113.9".parse().unwrap());
    event.user_agent = Some("Mozilla/5.0 (X11; Linux x86_64) tower-audit-test/1.0".into());
    event
}

/// Runs a real pipeline with integrity on into `sink`, records `n` events through the handle (in rounds, each
/// drained before the next, so none is dropped), shuts it down cleanly, and returns its boot.
async fn run_pipeline(sink: impl AuditSink, anchor: &Path, n: u64) -> Uuid {
    let (_layer, handle) =
        AuditLayer::builder(sink).capacity(4096).batch_size(512).integrity(integrity(anchor)).build().unwrap();
    let mut recorded = 0;
    while recorded < n {
        let round = (n - recorded).min(2000);
        for i in recorded..recorded + round {
            assert!(handle.record(login(i)), "event {i} refused");
        }
        recorded += round;
        eventually(LIMIT, || handle.stats().written == recorded).await;
    }
    let report = handle.shutdown(LIMIT).await;
    assert!(report.drained);
    assert_eq!(report.stats.written, n);
    handle.boot()
}

/// The last checkpoint the checkpoint sink got for `boot`, its shutdown's: what an auditor keeps out of band.
/// The checkpoint sink is written from a task of its own, which may still be writing it when `shutdown`
/// returns: polled, bounded.
async fn anchored(anchor: &Path, boot: Uuid) -> Checkpoint {
    let read = || -> Vec<AuditEvent> {
        std::fs::read_to_string(anchor)
            .unwrap()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .filter(|e: &AuditEvent| e.boot == Some(boot))
            .collect()
    };
    eventually(LIMIT, || read().last().is_some_and(|e| e.kind == kind::AUDIT_SHUTDOWN)).await;
    Checkpoint::from_event(read().last().unwrap()).unwrap().unwrap()
}

/// The JSON lines trail: a small boot, then a big one, in one file, written by real pipelines.
struct JsonTrail {
    lines: Vec<String>,
    small: Uuid,
    big: Uuid,
    anchor: Checkpoint,
    _dir: tempfile::TempDir,
}

fn json_trail() -> &'static JsonTrail {
    static TRAIL: OnceLock<JsonTrail> = OnceLock::new();
    TRAIL.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let (path, anchor) = (dir.path().join("audit.jsonl"), dir.path().join("checkpoints.jsonl"));
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let (small, big, anchor) = runtime.block_on(async {
            let small = run_pipeline(JsonLinesSink::open(&path).unwrap(), &anchor, SMALL).await;
            let big = run_pipeline(JsonLinesSink::open(&path).unwrap(), &anchor, BIG).await;
            (small, big, anchored(&anchor, big).await)
        });
        let lines = std::fs::read_to_string(&path).unwrap().lines().map(str::to_owned).collect();
        JsonTrail { lines, small, big, anchor, _dir: dir }
    })
}

impl JsonTrail {
    fn events(&self) -> Vec<AuditEvent> {
        self.lines.iter().map(|l| serde_json::from_str(l).unwrap()).collect()
    }

    /// The line index of `(boot, seq)`.
    fn index(&self, boot: Uuid, seq: u64) -> usize {
        self.events().iter().position(|e| e.boot == Some(boot) && e.seq == seq).unwrap()
    }

    fn last_seq(&self, boot: Uuid) -> u64 {
        self.events().iter().filter(|e| e.boot == Some(boot)).map(|e| e.seq).max().unwrap()
    }

    /// The seq of the first `auth.login` event of the big boot at or after `seq`.
    fn login_at_or_after(&self, seq: u64) -> u64 {
        self.events().iter().find(|e| e.boot == Some(self.big) && e.seq >= seq && e.kind == "auth.login").unwrap().seq
    }

    /// Verifies `lines` written to a file, through the JSON lines reader.
    fn verify(&self, lines: &[String], trusted: &[Checkpoint]) -> Report {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tampered.jsonl");
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();
        verify_json_lines(&path, &key(), trusted).unwrap()
    }

    /// The findings of the big boot, checking that the small one is untouched.
    fn big_findings(&self, report: &Report) -> Vec<Finding> {
        assert_eq!(report.boots.len(), 2, "{report}");
        let small = report.boots.iter().find(|b| b.boot == Some(self.small)).unwrap();
        assert!(small.ok(), "{report}");
        report.boots.iter().find(|b| b.boot == Some(self.big)).unwrap().findings.clone()
    }
}

fn edit(line: &str, f: impl FnOnce(&mut AuditEvent)) -> String {
    let mut event: AuditEvent = serde_json::from_str(line).unwrap();
    f(&mut event);
    serde_json::to_string(&event).unwrap()
}

#[test]
fn an_honest_trail_of_100_000_events_from_a_real_pipeline_verifies() {
    let trail = json_trail();
    let report = trail.verify(&trail.lines, std::slice::from_ref(&trail.anchor));
    assert!(report.ok(), "{report}");
    let events = trail.events();
    for (boot, n) in [(trail.small, SMALL), (trail.big, BIG)] {
        let b = report.boots.iter().find(|b| b.boot == Some(boot)).unwrap();
        let of_boot: Vec<&AuditEvent> = events.iter().filter(|e| e.boot == Some(boot)).collect();
        let checkpoints = of_boot.iter().filter(|e| e.kind == kind::AUDIT_CHECKPOINT).count() as u64;
        // The boot event, the recorded ones, the checkpoints and the shutdown: every seq from 1, none twice.
        assert_eq!(b.events, 1 + n + checkpoints + 1);
        assert_eq!((b.first_seq, b.last_seq), (1, b.events));
        assert_eq!(b.checkpoints, checkpoints + 1, "every checkpoint and the shutdown verify");
        // Checkpoints are due every 1000 events and written when the worker has drained its queue: at least once
        // per round of 2000 recorded.
        assert!(checkpoints >= n / 2000, "{checkpoints} checkpoints");
        // The shutdown signs the event before it; the shutdown itself is covered by nothing.
        assert_eq!((b.signed_to, b.verified_to), (b.last_seq - 1, b.last_seq - 1));
        assert!(b.clean_shutdown && b.lost.is_empty() && b.duplicates == 0);
    }
    // The same events through `verify`, and with every line twice (a retried batch): still OK.
    assert_eq!(verify(events.clone(), &key(), &[]).boots, report.boots);
    let doubled: Vec<AuditEvent> = events.iter().flat_map(|e| [e.clone(), e.clone()]).collect();
    let twice = verify(doubled, &key(), &[]);
    assert!(twice.ok(), "{twice}");
    assert_eq!(twice.boots.iter().map(|b| b.duplicates).sum::<u64>(), events.len() as u64);
}

#[test]
fn an_edited_field_is_altered_at_that_seq() {
    let trail = json_trail();
    let seq = trail.login_at_or_after(500);
    let mut lines = trail.lines.clone();
    let i = trail.index(trail.big, seq);
    lines[i] = edit(&lines[i], |e| e.actor = Some("mallory@example.com".into()));
    let report = trail.verify(&lines, &[]);
    assert_eq!(trail.big_findings(&report), [Finding::Altered { seq }]);
    assert!(!report.ok());
    let big = report.boots.iter().find(|b| b.boot == Some(trail.big)).unwrap();
    assert_eq!(big.verified_to, seq - 1);
}

#[test]
fn an_edit_with_every_hash_after_it_recomputed_is_caught_by_the_next_checkpoint() {
    let trail = json_trail();
    let events = trail.events();
    let big: Vec<&AuditEvent> = events.iter().filter(|e| e.boot == Some(trail.big)).collect();
    let seq = trail.login_at_or_after(5000);
    // The checkpoints around it: the one before covers up to `from - 1`, the one after signs `to`.
    let before = big.iter().rfind(|e| e.kind == kind::AUDIT_CHECKPOINT && e.seq < seq).unwrap().seq;
    let after = big.iter().find(|e| e.kind == kind::AUDIT_CHECKPOINT && e.seq > seq).unwrap().seq;
    let mut prev = big[seq as usize - 2].hash.unwrap();
    let mut lines = trail.lines.clone();
    for (line, e) in lines.iter_mut().zip(&events) {
        if e.boot != Some(trail.big) || e.seq < seq {
            continue;
        }
        *line = edit(line, |e| {
            if e.seq == seq {
                e.actor = Some("mallory@example.com".into());
            }
            e.prev_hash = Some(prev);
            e.hash = Some(event_hash(&prev, e));
            prev = e.hash.unwrap();
        });
    }
    let report = trail.verify(&lines, &[]);
    // The first checkpoint after the edit no longer matches; every later one does not either.
    let findings = trail.big_findings(&report);
    assert_eq!(findings[0], Finding::Rewritten { from: before, to: after - 1 });
    assert!(findings.iter().all(|f| matches!(f, Finding::Rewritten { .. })), "{findings:?}");
}

#[test]
fn a_deleted_middle_row_is_missing() {
    let trail = json_trail();
    let mut lines = trail.lines.clone();
    lines.remove(trail.index(trail.big, 700));
    let report = trail.verify(&lines, &[]);
    assert_eq!(trail.big_findings(&report), [Finding::Missing { from: 700, to: 700 }]);
}

#[test]
fn deleted_newest_rows_are_truncated_against_the_anchored_checkpoint() {
    let trail = json_trail();
    let last = trail.last_seq(trail.big);
    let kept = last - 10;
    let mut lines = trail.lines.clone();
    lines.retain(|l| {
        let e: AuditEvent = serde_json::from_str(l).unwrap();
        e.boot != Some(trail.big) || e.seq <= kept
    });
    // In the trail alone, a truncation looks like a boot that is still running (or crashed).
    let alone = trail.verify(&lines, &[]);
    assert!(alone.ok(), "{alone}");
    assert!(!alone.boots.iter().find(|b| b.boot == Some(trail.big)).unwrap().clean_shutdown);
    // Against the checkpoint kept out of band, it is caught.
    assert_eq!(trail.anchor.seq, last - 1);
    let report = trail.verify(&lines, std::slice::from_ref(&trail.anchor));
    assert_eq!(trail.big_findings(&report), [Finding::Truncated { after: kept, expected: last - 1 }]);
    // Every row deleted, the boot with them: still caught.
    lines.retain(|l| serde_json::from_str::<AuditEvent>(l).unwrap().boot != Some(trail.big));
    let report = trail.verify(&lines, std::slice::from_ref(&trail.anchor));
    assert_eq!(trail.big_findings(&report), [Finding::Truncated { after: 0, expected: last - 1 }]);
}

#[test]
fn a_forged_row_is_inserted() {
    let trail = json_trail();
    let seq = trail.login_at_or_after(800);
    let mut lines = trail.lines.clone();
    // A second row under a seq already taken, its hash correctly computed from the real predecessor's.
    let forged = edit(&lines[trail.index(trail.big, seq)], |e| {
        e.id = Uuid::now_v7();
        e.actor = Some("mallory@example.com".into());
        e.hash = Some(event_hash(&e.prev_hash.unwrap(), e));
    });
    lines.push(forged);
    let report = trail.verify(&lines, &[]);
    assert_eq!(trail.big_findings(&report), [Finding::Inserted { seq }]);
    // A row after the boot's clean shutdown, chained to it.
    let last = trail.last_seq(trail.big);
    let mut lines = trail.lines.clone();
    let after = edit(&lines[trail.index(trail.big, seq)], |e| {
        e.id = Uuid::now_v7();
        e.seq = last + 1;
        e.prev_hash = trail.events().iter().find(|x| x.boot == Some(trail.big) && x.seq == last).unwrap().hash;
        e.hash = Some(event_hash(&e.prev_hash.unwrap(), e));
    });
    lines.push(after);
    let report = trail.verify(&lines, &[]);
    assert_eq!(trail.big_findings(&report), [Finding::Inserted { seq: last + 1 }]);
}

#[test]
fn swapped_rows_are_reordered() {
    let trail = json_trail();
    // Two lines swapped in the file.
    let mut lines = trail.lines.clone();
    lines.swap(trail.index(trail.big, 300), trail.index(trail.big, 310));
    let report = trail.verify(&lines, &[]);
    assert_eq!(trail.big_findings(&report), [Finding::Reordered { seqs: vec![300, 310] }]);
    // Two rows' contents swapped, each keeping its seq (as an UPDATE of a table would).
    let mut lines = trail.lines.clone();
    let (i, j) = (trail.index(trail.big, 400), trail.index(trail.big, 420));
    let (a, b) = (lines[i].clone(), lines[j].clone());
    lines[i] = edit(&b, |e| e.seq = 400);
    lines[j] = edit(&a, |e| e.seq = 420);
    let report = trail.verify(&lines, &[]);
    assert_eq!(trail.big_findings(&report), [Finding::Reordered { seqs: vec![400, 420] }]);
}

#[test]
fn a_row_replayed_from_another_boot_is_named_with_its_boot() {
    let trail = json_trail();
    let mut lines = trail.lines.clone();
    let copy = edit(&lines[trail.index(trail.small, 10)], |e| {
        e.boot = Some(trail.big);
        e.seq = 900;
    });
    lines[trail.index(trail.big, 900)] = copy;
    let report = trail.verify(&lines, &[]);
    assert_eq!(trail.big_findings(&report), [Finding::ReplayedFromOtherBoot { seq: 900, boot: trail.small }]);
}

#[test]
fn checkpoints_signed_by_another_key_or_forged_are_refused() {
    let trail = json_trail();
    // The whole trail checked with another key: every checkpoint names a key that is not the verifier's.
    let other = Integrity::from_seed(&[7; 32]).key_name("audit.test").verifier_key();
    let report = verify(trail.events(), &other, &[]);
    let signed: Vec<(Option<Uuid>, u64)> = trail
        .events()
        .iter()
        .filter(|e| matches!(&*e.kind, kind::AUDIT_CHECKPOINT | kind::AUDIT_SHUTDOWN))
        .map(|e| (e.boot, e.seq))
        .collect();
    let found: Vec<(Option<Uuid>, u64)> = report
        .findings()
        .map(|(boot, f)| match f {
            Finding::WrongKey { seq, key } if *key == key_label() => (boot, *seq),
            other => panic!("{other:?}"),
        })
        .collect();
    let (mut found, mut signed_sorted) = (found, signed.clone());
    found.sort();
    signed_sorted.sort();
    assert_eq!(found, signed_sorted);
    assert!(report.boots.iter().all(|b| b.verified_to == 0 && b.signed_to == 0));
    // One checkpoint's signature forged: a bad signature there (and the event no longer hashes to its hash).
    let seq = signed.iter().find(|(b, _)| *b == Some(trail.big)).unwrap().1;
    let mut lines = trail.lines.clone();
    let i = trail.index(trail.big, seq);
    lines[i] = edit(&lines[i], |e| {
        let sig = e.attributes.get_mut("checkpoint.signature").unwrap();
        *sig = format!("{}{}", if sig.starts_with('A') { "B" } else { "A" }, &sig[1..]);
    });
    let report = trail.verify(&lines, &[]);
    assert_eq!(trail.big_findings(&report), [Finding::Altered { seq }, Finding::BadSignature { seq }]);
    // A trusted checkpoint signed by another key is rejected, not used.
    let other = Integrity::from_seed(&[7; 32]).key_name("audit.test");
    let report = trail.verify(&trail.lines, std::slice::from_ref(&trail.anchor));
    assert!(report.ok());
    let report = verify(trail.events(), &other.verifier_key(), std::slice::from_ref(&trail.anchor));
    assert_eq!(report.rejected.len(), 1);
    assert_eq!((report.rejected[0].boot, report.rejected[0].seq), (trail.big, trail.anchor.seq));
}

fn key_label() -> String {
    key().label()
}

#[test]
fn unchained_events_and_unreadable_lines_are_reported_not_fatal() {
    let trail = json_trail();
    let mut lines = trail.lines.clone();
    let seq = trail.login_at_or_after(1200);
    let i = trail.index(trail.big, seq);
    lines[i] = edit(&lines[i], |e| (e.prev_hash, e.hash) = (None, None));
    lines.insert(5, "{not json".into());
    let report = trail.verify(&lines, &[]);
    assert_eq!(trail.big_findings(&report), [Finding::Unchained { from: seq, to: seq }]);
    assert_eq!(report.unreadable.len(), 1);
    assert_eq!(report.unreadable[0].at, 6);
    // A trail written without integrity: one unchained range per boot.
    let plain: Vec<AuditEvent> = trail
        .events()
        .into_iter()
        .map(|mut e| {
            (e.prev_hash, e.hash) = (None, None);
            e
        })
        .collect();
    let report = verify(plain, &key(), &[]);
    let last = trail.last_seq(trail.big);
    let big = report.boots.iter().find(|b| b.boot == Some(trail.big)).unwrap();
    assert_eq!(big.findings, [Finding::Unchained { from: 1, to: last }]);
    // The report serialises, each finding tagged with its name.
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["boots"][0]["findings"][0]["finding"], "unchained");
}

/// The same attacks on the SQL sinks' tables, with fewer events (the JSON lines trail covers the volume).
#[cfg(any(feature = "sqlite", feature = "postgres"))]
mod sql {
    use super::*;
    use tower_audit::integrity::Report;

    /// Events in the big boot of an SQL trail.
    const EVENTS: u64 = 2_000;
    const COLUMNS: &str = "id, seq, time, kind, outcome, method, route, path, status, grpc_status, latency_us, \
                           request_id, actor, client_addr, user_agent, attributes, version, instance, boot, \
                           prev_hash, hash";

    pub(super) enum Db {
        #[cfg(feature = "sqlite")]
        Sqlite(sqlx::SqlitePool),
        #[cfg(feature = "postgres")]
        Postgres(sqlx::PgPool, String),
    }

    impl Db {
        /// The table the pipelines wrote.
        fn base(&self) -> String {
            match self {
                #[cfg(feature = "sqlite")]
                Db::Sqlite(_) => "audit_events".into(),
                #[cfg(feature = "postgres")]
                Db::Postgres(_, schema) => format!("{schema}.events"),
            }
        }

        /// The scratch copy each attack edits.
        fn work(&self) -> String {
            match self {
                #[cfg(feature = "sqlite")]
                Db::Sqlite(_) => "work".into(),
                #[cfg(feature = "postgres")]
                Db::Postgres(_, schema) => format!("{schema}.work"),
            }
        }

        fn uuid(&self, id: Uuid) -> String {
            match self {
                #[cfg(feature = "sqlite")]
                Db::Sqlite(_) => format!("'{id}'"),
                #[cfg(feature = "postgres")]
                Db::Postgres(..) => format!("'{id}'::uuid"),
            }
        }

        async fn exec(&self, sql: &str) {
            match self {
                #[cfg(feature = "sqlite")]
                Db::Sqlite(pool) => {
                    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned())).execute(pool).await.unwrap();
                }
                #[cfg(feature = "postgres")]
                Db::Postgres(pool, _) => {
                    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned())).execute(pool).await.unwrap();
                }
            }
        }

        async fn verify(&self, table: &str, key: &VerifierKey, trusted: &[Checkpoint]) -> Report {
            match self {
                #[cfg(feature = "sqlite")]
                Db::Sqlite(pool) => {
                    tower_audit::integrity::verify_sqlite(pool, Some(table), key, trusted).await.unwrap()
                }
                #[cfg(feature = "postgres")]
                Db::Postgres(pool, _) => {
                    tower_audit::integrity::verify_postgres(pool, Some(table), key, trusted).await.unwrap()
                }
            }
        }

        /// Copies the trail, runs `attack` on the copy (`{t}` stands for its name), and verifies the copy.
        async fn attacked(&self, attack: &str, trusted: &[Checkpoint]) -> Report {
            let work = self.work();
            self.exec(&format!("DROP TABLE IF EXISTS {work}; CREATE TABLE {work} AS SELECT * FROM {}", self.base()))
                .await;
            if !attack.is_empty() {
                self.exec(&attack.replace("{t}", &work)).await;
            }
            self.verify(&work, &key(), trusted).await
        }
    }

    /// Writes two boots into `db` through real pipelines (`sink` makes each one's sink), then checks the honest
    /// trail verifies and that each attack is named exactly.
    pub(super) async fn honest_then_attacked<S: AuditSink, F: std::future::Future<Output = S>>(
        db: Db,
        sink: impl Fn() -> F,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let anchor = dir.path().join("checkpoints.jsonl");
        let small = run_pipeline(sink().await, &anchor, SMALL).await;
        let big = run_pipeline(sink().await, &anchor, EVENTS).await;
        let anchor = anchored(&anchor, big).await;
        let (b, a) = (db.uuid(big), db.uuid(small));
        let findings = |report: &Report, boot: Uuid| {
            report.boots.iter().find(|r| r.boot == Some(boot)).map(|r| r.findings.clone()).unwrap_or_default()
        };

        // Honest: read back exactly as written, every event verifies.
        let report = db.verify(&db.base(), &key(), std::slice::from_ref(&anchor)).await;
        assert!(report.ok(), "{report}");
        let last = report.boots.iter().find(|r| r.boot == Some(big)).unwrap().last_seq;
        assert_eq!(anchor.seq, last - 1);
        for boot in &report.boots {
            assert_eq!((boot.first_seq, boot.events, boot.verified_to), (1, boot.last_seq, boot.last_seq - 1));
            assert!(boot.clean_shutdown);
        }
        assert_eq!(report.events(), report.boots.iter().map(|b| b.last_seq).sum::<u64>());

        // One field edited.
        let report =
            db.attacked(&format!("UPDATE {{t}} SET actor = 'mallory' WHERE boot = {b} AND seq = 500"), &[]).await;
        assert_eq!(findings(&report, big), [Finding::Altered { seq: 500 }]);
        assert!(findings(&report, small).is_empty());
        // A middle row deleted.
        let report = db.attacked(&format!("DELETE FROM {{t}} WHERE boot = {b} AND seq = 700"), &[]).await;
        assert_eq!(findings(&report, big), [Finding::Missing { from: 700, to: 700 }]);
        // The newest rows deleted: caught against the anchored checkpoint only.
        let truncate = format!("DELETE FROM {{t}} WHERE boot = {b} AND seq > {}", last - 10);
        assert!(db.attacked(&truncate, &[]).await.ok());
        let report = db.attacked(&truncate, std::slice::from_ref(&anchor)).await;
        assert_eq!(findings(&report, big), [Finding::Truncated { after: last - 10, expected: last - 1 }]);
        // A forged row under a seq already taken (the copy has no unique index; an attacker can drop it).
        let forged = format!(
            "INSERT INTO {{t}} ({COLUMNS}) SELECT {}, seq, time, kind, outcome, method, route, path, status, \
             grpc_status, latency_us, request_id, 'mallory', client_addr, user_agent, attributes, version, \
             instance, boot, prev_hash, hash FROM {{t}} WHERE boot = {b} AND seq = 800",
            db.uuid(Uuid::now_v7())
        );
        let report = db.attacked(&forged, &[]).await;
        assert_eq!(findings(&report, big), [Finding::Inserted { seq: 800 }]);
        // Two rows swapped (their seqs exchanged).
        let swap = format!(
            "UPDATE {{t}} SET seq = -1 WHERE boot = {b} AND seq = 400; \
             UPDATE {{t}} SET seq = 400 WHERE boot = {b} AND seq = 420; \
             UPDATE {{t}} SET seq = 420 WHERE boot = {b} AND seq = -1"
        );
        let report = db.attacked(&swap, &[]).await;
        assert_eq!(findings(&report, big), [Finding::Reordered { seqs: vec![400, 420] }]);
        // A row of the small boot moved into the big one, in place of one deleted.
        let replay = format!(
            "DELETE FROM {{t}} WHERE boot = {b} AND seq = 900; \
             UPDATE {{t}} SET boot = {b}, seq = 900 WHERE boot = {a} AND seq = 10"
        );
        let report = db.attacked(&replay, &[]).await;
        assert_eq!(findings(&report, big), [Finding::ReplayedFromOtherBoot { seq: 900, boot: small }]);
        assert_eq!(findings(&report, small), [Finding::Missing { from: 10, to: 10 }]);
        // Checked with another key: every checkpoint of both boots names the real one.
        let other = Integrity::from_seed(&[7; 32]).key_name("audit.test").verifier_key();
        let report = db.verify(&db.base(), &other, &[]).await;
        let wrong =
            report.findings().filter(|(_, f)| matches!(f, Finding::WrongKey { key, .. } if *key == key_label()));
        assert_eq!(wrong.count(), report.findings().count());
        assert!(report.findings().count() >= 2, "{report}");
        assert_eq!(report.rejected.len(), 0);
        db.exec(&format!("DROP TABLE IF EXISTS {}", db.work())).await;
    }
}

#[cfg(feature = "sqlite")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_attacks_are_named_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("audit.db").display());
    let sink = || async {
        let sink = tower_audit::SqliteSink::connect(&url).await.unwrap();
        sink.ensure_schema().await.unwrap();
        sink
    };
    sink().await;
    let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
    sql::honest_then_attacked(sql::Db::Sqlite(pool), sink).await;
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_attacks_are_named_on_postgres() {
    let options = sqlx::postgres::PgPoolOptions::new().max_connections(2).acquire_timeout(Duration::from_secs(5));
    let Some(admin) = common::pg_pool(options).await else { return };
    let scratch = common::PgScratch::new(&admin, "t_audit_verify").await;
    let table = scratch.table();
    let sink = || async {
        let sink = tower_audit::PostgresSink::connect(&common::pg_url()).await.unwrap().table(&table).unwrap();
        sink.ensure_schema().await.unwrap();
        sink
    };
    sql::honest_then_attacked(sql::Db::Postgres(admin.clone(), scratch.schema.clone()), sink).await;
    admin.close().await;
}
