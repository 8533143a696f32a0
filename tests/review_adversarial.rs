//! Adversarial review of: the hand-written `Serialize`/`write_json`/const-hex `Hash`, the SQLite sink's shared
//! `Arc<str>` texts, and the worker's recycled request strings.
#![allow(clippy::too_many_lines)]

mod common;
mod review_support;

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::*;
use review_support::*;
use serde::Serialize;
use tower_audit::{AuditEvent, AuditLayer, AuditSink, Hash, MemorySink, Outcome};
use uuid::Uuid;

const LIMIT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------------------------
// 1. Serialize / write_json / Hash
// ---------------------------------------------------------------------------------------------------------------

/// The previous version's `Hash` serde form, written out as it was (hand-made lowercase hex; bytes otherwise).
#[derive(Clone, Copy)]
struct LegacyHash([u8; 32]);

impl Serialize for LegacyHash {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            const DIGITS: &[u8; 16] = b"0123456789abcdef";
            let mut out = [0u8; 64];
            for (i, b) in self.0.iter().enumerate() {
                out[2 * i] = DIGITS[usize::from(b >> 4)];
                out[2 * i + 1] = DIGITS[usize::from(b & 0x0f)];
            }
            s.serialize_str(std::str::from_utf8(&out).unwrap())
        } else {
            self.0.serialize(s)
        }
    }
}

fn legacy_time<S: serde::Serializer>(time: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_micros(*time))
}

/// `AuditEvent` as the previous version declared it, with `#[derive(Serialize)]` (same fields, same order, same
/// serde attributes that affect serialisation).
#[derive(Serialize)]
#[serde(rename = "AuditEvent")]
struct Legacy<'a> {
    version: u16,
    id: Uuid,
    instance: &'a Option<Arc<str>>,
    boot: Option<Uuid>,
    seq: u64,
    #[serde(serialize_with = "legacy_time")]
    time: SystemTime,
    kind: &'a Cow<'static, str>,
    outcome: Outcome,
    method: &'a Option<Cow<'static, str>>,
    route: &'a Option<String>,
    path: &'a Option<String>,
    status: Option<u16>,
    grpc_status: Option<i32>,
    latency_us: Option<u64>,
    request_id: &'a Option<String>,
    actor: &'a Option<String>,
    client_addr: Option<IpAddr>,
    user_agent: &'a Option<String>,
    attributes: &'a BTreeMap<String, String>,
    prev_hash: Option<LegacyHash>,
    hash: Option<LegacyHash>,
}

/// Schema version 2 (spill payload format 1): no chain fields.
#[derive(Serialize)]
#[serde(rename = "AuditEvent")]
struct LegacyV2<'a> {
    version: u16,
    id: Uuid,
    instance: &'a Option<Arc<str>>,
    boot: Option<Uuid>,
    seq: u64,
    #[serde(serialize_with = "legacy_time")]
    time: SystemTime,
    kind: &'a Cow<'static, str>,
    outcome: Outcome,
    method: &'a Option<Cow<'static, str>>,
    route: &'a Option<String>,
    path: &'a Option<String>,
    status: Option<u16>,
    grpc_status: Option<i32>,
    latency_us: Option<u64>,
    request_id: &'a Option<String>,
    actor: &'a Option<String>,
    client_addr: Option<IpAddr>,
    user_agent: &'a Option<String>,
    attributes: &'a BTreeMap<String, String>,
}

fn legacy(e: &AuditEvent) -> Legacy<'_> {
    Legacy {
        version: e.version,
        id: e.id,
        instance: &e.instance,
        boot: e.boot,
        seq: e.seq,
        time: e.time,
        kind: &e.kind,
        outcome: e.outcome,
        method: &e.method,
        route: &e.route,
        path: &e.path,
        status: e.status,
        grpc_status: e.grpc_status,
        latency_us: e.latency_us,
        request_id: &e.request_id,
        actor: &e.actor,
        client_addr: e.client_addr,
        user_agent: &e.user_agent,
        attributes: &e.attributes,
        prev_hash: e.prev_hash.map(|h| LegacyHash(h.0)),
        hash: e.hash.map(|h| LegacyHash(h.0)),
    }
}

fn legacy_v2(e: &AuditEvent) -> LegacyV2<'_> {
    LegacyV2 {
        version: e.version,
        id: e.id,
        instance: &e.instance,
        boot: e.boot,
        seq: e.seq,
        time: e.time,
        kind: &e.kind,
        outcome: e.outcome,
        method: &e.method,
        route: &e.route,
        path: &e.path,
        status: e.status,
        grpc_status: e.grpc_status,
        latency_us: e.latency_us,
        request_id: &e.request_id,
        actor: &e.actor,
        client_addr: e.client_addr,
        user_agent: &e.user_agent,
        attributes: &e.attributes,
    }
}

/// Attack 1a: the hand-written `Serialize` against the previous version's derive, byte for byte, in JSON
/// (compact and pretty), as a `serde_json::Value`, and in postcard (the spill's records).
#[test]
fn serialize_is_byte_for_byte_the_legacy_derive_in_json_and_postcard() {
    for e in varied_events() {
        let old = legacy(&e);
        assert_eq!(serde_json::to_string(&e).unwrap(), serde_json::to_string(&old).unwrap(), "{e:?}");
        assert_eq!(serde_json::to_string_pretty(&e).unwrap(), serde_json::to_string_pretty(&old).unwrap());
        assert_eq!(serde_json::to_value(&e).unwrap(), serde_json::to_value(&old).unwrap());
        let bytes = postcard::to_allocvec(&e).unwrap();
        assert_eq!(bytes, postcard::to_allocvec(&old).unwrap(), "{e:?}");
        // A record the previous version wrote decodes to the same event.
        let back: AuditEvent = postcard::from_bytes(&postcard::to_allocvec(&old).unwrap()).unwrap();
        assert_eq!(back, e);
        let back: AuditEvent = serde_json::from_str(&serde_json::to_string(&old).unwrap()).unwrap();
        assert_eq!(back, e);
    }
}

/// Attack 1b: a schema-2 (spill format 1) record, which has no chain fields, still decodes as postcard does for
/// format 1 (two zero bytes appended) to the event without hashes.
#[test]
fn schema_2_records_without_chain_fields_still_decode() {
    for mut e in varied_events() {
        let mut bytes = postcard::to_allocvec(&legacy_v2(&e)).unwrap();
        bytes.extend_from_slice(&[0, 0]);
        let back: AuditEvent = postcard::from_bytes(&bytes).unwrap();
        (e.prev_hash, e.hash) = (None, None);
        assert_eq!(back, e);
        // And the new encoding of that event is exactly the old one with the two zero bytes.
        assert_eq!(postcard::to_allocvec(&e).unwrap(), bytes);
    }
}

/// Attack 1c: `write_json` (through the JSON lines sink, its Native encoding) against the legacy derive's
/// `serde_json::to_writer`, line for line, every hash combination included.
#[tokio::test]
async fn json_lines_sink_writes_exactly_the_legacy_json() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let sink = tower_audit::JsonLinesSink::open(&path).unwrap();
    let events = varied_events();
    for chunk in events.chunks(37) {
        sink.write_batch(chunk).await.unwrap();
    }
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), events.len());
    for (line, e) in lines.iter().zip(&events) {
        assert_eq!(*line, serde_json::to_string(&legacy(e)).unwrap());
        assert_eq!(&serde_json::from_str::<AuditEvent>(line).unwrap(), e);
    }
    assert!(text.ends_with('\n'));
}

/// The previous version's parser: exactly 64 ASCII hex digits, either case.
fn reference_parse(s: &str) -> Option<[u8; 32]> {
    let b = s.as_bytes();
    if b.len() != 64 || !b.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in b.chunks(2).enumerate() {
        out[i] = u8::from_str_radix(std::str::from_utf8(pair).unwrap(), 16).unwrap();
    }
    Some(out)
}

/// Attack 1d: every ASCII byte at every one of the 64 positions; non-ASCII characters of 2, 3 and 4 bytes in
/// every place they fit; prefixes, whitespace, signs, lengths around 64.
#[test]
fn hash_from_str_accepts_exactly_64_hex_digits() {
    let mut rng = Rng(42);
    let base = "0123456789abcdefABCDEF0123456789abcdef0123456789ABCDEF0123456789";
    assert_eq!(base.len(), 64);
    let expected = reference_parse(base).unwrap();
    assert_eq!(base.parse::<Hash>().map(|h| h.0), Ok(expected));
    for pos in 0..64 {
        for c in 0u8..128 {
            let mut bytes = base.as_bytes().to_vec();
            bytes[pos] = c;
            let s = String::from_utf8(bytes).unwrap();
            assert_eq!(s.parse::<Hash>().ok().map(|h| h.0), reference_parse(&s), "{s:?} at {pos}");
        }
        // Non-ASCII: 'é' (2 bytes), '０' fullwidth zero and '€' (3), '😀' (4), each replacing as many digits.
        for c in ['é', '\u{0660}', '０', '€', '😀', '\u{a0}'] {
            let width = c.len_utf8();
            if pos + width > 64 {
                continue;
            }
            let s = format!("{}{c}{}", &base[..pos], &base[pos + width..]);
            assert_eq!(s.len(), 64);
            assert!(s.parse::<Hash>().is_err(), "{s:?} was accepted");
        }
    }
    let digits62 = &base[..62];
    for bad in [
        format!("0x{digits62}"),
        format!("0X{digits62}"),
        format!("0x{base}"),
        format!("0X{base}"),
        format!(" {}", &base[1..]),
        format!("{} ", &base[..63]),
        format!("\t{}", &base[1..]),
        format!("{}\n", &base[..63]),
        format!("+{}", &base[1..]),
        format!("-{}", &base[1..]),
        format!("{}\0", &base[..63]),
        format!("{}_{}", &base[..31], &base[32..]),
        String::new(),
        base[..63].to_owned(),
        format!("{base}0"),
        format!("{base}{base}"),
        "0x".to_owned(),
    ] {
        assert!(bad.parse::<Hash>().is_err(), "{bad:?} was accepted");
        // Also inside an event's JSON (the verifier reads hashes that way).
        let mut e = AuditEvent::new("x");
        e.hash = Some(Hash::ZERO);
        let json = serde_json::to_string(&e).unwrap().replace(&"0".repeat(64), &bad.replace('\\', "\\\\"));
        let json = json.replace('\n', "\\n").replace('\t', "\\t").replace('\0', "\\u0000");
        assert!(serde_json::from_str::<AuditEvent>(&json).is_err(), "{json}");
    }
    // Random hashes: Display is 64 lowercase digits, and it, its upper-case and mixed-case forms parse back.
    for _ in 0..2000 {
        let h = rng.hash();
        let text = h.to_string();
        assert_eq!(text.len(), 64);
        assert!(text.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)), "{text}");
        assert_eq!(text, LegacyHashDisplay(h.0).to_string());
        assert_eq!(text.parse::<Hash>(), Ok(h));
        assert_eq!(text.to_ascii_uppercase().parse::<Hash>(), Ok(h));
        let mixed: String = text.chars().map(|c| if rng.below(2) == 0 { c.to_ascii_uppercase() } else { c }).collect();
        assert_eq!(mixed.parse::<Hash>(), Ok(h));
        assert_eq!(serde_json::to_string(&h).unwrap(), format!("\"{text}\""));
        assert_eq!(serde_json::from_str::<Hash>(&format!("\"{mixed}\"")).unwrap(), h);
    }
}

struct LegacyHashDisplay([u8; 32]);

impl std::fmt::Display for LegacyHashDisplay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------------------------
// 2. SQLite: shared Arc<str> texts
// ---------------------------------------------------------------------------------------------------------------

#[cfg(feature = "sqlite")]
mod sqlite {
    use sqlx::Row as _;
    use sqlx::sqlite::SqlitePool;
    use tower_audit::SqliteSink;

    use super::*;

    async fn sink(dir: &tempfile::TempDir) -> (SqliteSink, SqlitePool) {
        let path = dir.path().join("audit.db");
        let sink = SqliteSink::connect_with(path.to_str().unwrap(), 2).await.unwrap();
        sink.ensure_schema().await.unwrap();
        let reader = SqlitePool::connect(&format!("sqlite://{}", path.display())).await.unwrap();
        (sink, reader)
    }

    async fn read_rows(reader: &SqlitePool) -> Vec<sqlx::sqlite::SqliteRow> {
        sqlx::query(
            "SELECT id, seq, time, kind, outcome, method, route, path, status, grpc_status, latency_us, request_id, \
             actor, client_addr, user_agent, attributes, version, instance, boot, prev_hash, hash, \
             typeof(path) AS path_type, length(CAST(path AS BLOB)) AS path_len FROM audit_events ORDER BY seq",
        )
        .fetch_all(reader)
        .await
        .unwrap()
    }

    /// Every column of `row` holds what `e` says (texts as read back, and as byte lengths).
    fn assert_row(row: &sqlx::sqlite::SqliteRow, e: &AuditEvent, at: usize) {
        let ctx = format!("row {at}: {e:?}");
        assert_eq!(row.get::<String, _>("id"), e.id.to_string(), "{ctx}");
        assert_eq!(row.get::<i64, _>("seq"), e.seq as i64, "{ctx}");
        assert_eq!(row.get::<String, _>("time"), humantime::format_rfc3339_micros(e.time).to_string(), "{ctx}");
        assert_eq!(row.get::<String, _>("kind"), e.kind, "{ctx}");
        assert_eq!(row.get::<String, _>("outcome"), e.outcome.as_str(), "{ctx}");
        assert_eq!(row.get::<Option<String>, _>("method").as_deref(), e.method.as_deref(), "{ctx}");
        assert_eq!(row.get::<Option<String>, _>("route"), e.route, "{ctx}");
        assert_eq!(row.get::<Option<String>, _>("path"), e.path, "{ctx}");
        assert_eq!(
            (row.get::<String, _>("path_type"), row.get::<Option<i64>, _>("path_len")),
            match &e.path {
                Some(p) => ("text".to_owned(), Some(p.len() as i64)),
                None => ("null".to_owned(), None),
            },
            "{ctx}"
        );
        assert_eq!(row.get::<Option<i64>, _>("status"), e.status.map(i64::from), "{ctx}");
        assert_eq!(row.get::<Option<i64>, _>("grpc_status"), e.grpc_status.map(i64::from), "{ctx}");
        assert_eq!(row.get::<Option<i64>, _>("latency_us"), e.latency_us.map(|l| l as i64), "{ctx}");
        assert_eq!(row.get::<Option<String>, _>("request_id"), e.request_id, "{ctx}");
        assert_eq!(row.get::<Option<String>, _>("actor"), e.actor, "{ctx}");
        assert_eq!(row.get::<Option<String>, _>("client_addr"), e.client_addr.map(|a| a.to_string()), "{ctx}");
        assert_eq!(row.get::<Option<String>, _>("user_agent"), e.user_agent, "{ctx}");
        let attributes: BTreeMap<String, String> = serde_json::from_str(&row.get::<String, _>("attributes")).unwrap();
        assert_eq!(attributes, e.attributes, "{ctx}");
        assert_eq!(row.get::<i64, _>("version"), i64::from(e.version), "{ctx}");
        assert_eq!(row.get::<Option<String>, _>("instance").as_deref(), e.instance.as_deref(), "{ctx}");
        assert_eq!(row.get::<Option<String>, _>("boot"), e.boot.map(|b| b.to_string()), "{ctx}");
        assert_eq!(row.get::<Option<String>, _>("prev_hash"), e.prev_hash.map(|h| h.to_string()), "{ctx}");
        assert_eq!(row.get::<Option<String>, _>("hash"), e.hash.map(|h| h.to_string()), "{ctx}");
    }

    /// A text column's next value: mostly the value above (repeats), sometimes absent, empty, a near miss of
    /// the value above (a prefix, one more byte, another case), a hostile text, or new.
    fn next_text(rng: &mut Rng, above: &Option<String>, i: usize) -> Option<String> {
        match rng.below(12) {
            0..=4 => above.clone(),
            5 => None,
            6 => Some(String::new()),
            7 => above.as_ref().map(|a| a.chars().take(a.chars().count().saturating_sub(1)).collect()),
            8 => above.as_ref().map(|a| format!("{a}x")),
            9 => above.as_ref().map(|a| a.to_uppercase()),
            10 => Some(NASTY[rng.below(NASTY.len() as u64) as usize].replace('\0', "")),
            _ => Some(format!("text-{i}-{}", rng.next())),
        }
    }

    fn chained_events(n: usize, seed: u64) -> Vec<AuditEvent> {
        let mut rng = Rng(seed);
        let mut events: Vec<AuditEvent> = Vec::with_capacity(n);
        let boots = [Uuid::from_u128(1), Uuid::from_u128(2)];
        for i in 0..n {
            let above = events.last().cloned().unwrap_or_else(|| AuditEvent::new("k"));
            let kind = next_text(&mut rng, &Some(above.kind.to_string()), i).unwrap_or_else(|| "k".to_owned());
            let mut e = AuditEvent::new(kind);
            e.id = Uuid::from_u128(0x1000_0000 + i as u128);
            e.seq = i as u64 + 1;
            e.time = if rng.below(2) == 0 {
                above.time
            } else {
                SystemTime::UNIX_EPOCH + Duration::from_micros(1_700_000_000_000_000 + rng.below(1 << 40))
            };
            e.outcome = if rng.below(3) == 0 { Outcome::Denied } else { above.outcome };
            e.method = next_text(&mut rng, &above.method.as_ref().map(|m| m.to_string()), i).map(Cow::Owned);
            e.route = next_text(&mut rng, &above.route, i);
            e.path = next_text(&mut rng, &above.path, i);
            e.request_id = next_text(&mut rng, &above.request_id, i);
            e.actor = next_text(&mut rng, &above.actor, i);
            e.user_agent = next_text(&mut rng, &above.user_agent, i);
            e.instance = next_text(&mut rng, &above.instance.as_ref().map(|s| s.to_string()), i).map(Arc::from);
            e.status = [None, Some(200), above.status][rng.below(3) as usize];
            e.client_addr = match rng.below(4) {
                0 => None,
                1 => Some(IpAddr::from([10, 0, 0, rng.below(3) as u8])),
                _ => above.client_addr,
            };
            e.boot = match rng.below(6) {
                0 => None,
                1 => Some(boots[rng.below(2) as usize]),
                _ => above.boot,
            };
            e.attributes = match rng.below(4) {
                0 => BTreeMap::new(),
                1 => BTreeMap::from([("k".to_owned(), format!("v{}", rng.below(3)))]),
                _ => above.attributes.clone(),
            };
            // Hashes: a chain, with every way of breaking it.
            let (prev, hash) = match rng.below(8) {
                0..=2 => (above.hash, Some(rng.hash())), // the chain
                3 => (None, Some(rng.hash())),           // no prev
                4 => (above.hash, None),                 // no hash
                5 => (above.hash, above.hash),           // hash repeats the row above's
                6 => {
                    let h = rng.hash();
                    (Some(h), Some(h)) // prev equal to its own hash
                }
                _ => (above.prev_hash, Some(rng.hash())), // prev is the row above's prev
            };
            (e.prev_hash, e.hash) = (prev, hash);
            events.push(e);
        }
        events
    }

    /// Attack 2a: 3,400 rows (three statements: 1,559 rows each at most) with random runs of repeats, absences,
    /// empties, near misses and hostile texts in every column, and a hash chain broken every possible way; also
    /// as many small batches. Every row must read back exactly its own values.
    #[tokio::test]
    async fn every_row_stores_exactly_its_own_texts_whatever_the_pattern() {
        for (seed, batch) in [(7u64, 3400usize), (8, 1561), (9, 1560), (11, 1559), (10, 3)] {
            let dir = tempfile::tempdir().unwrap();
            let (sqlite, reader) = sink(&dir).await;
            let events = chained_events(3400.min(batch * 4), seed);
            for chunk in events.chunks(batch) {
                sqlite.write_batch(chunk).await.unwrap();
            }
            let rows = read_rows(&reader).await;
            assert_eq!(rows.len(), events.len());
            for (at, (row, e)) in rows.iter().zip(&events).enumerate() {
                assert_row(row, e, at);
            }
        }
    }

    /// Attack 2b: hostile texts that differ only after an embedded NUL, or only in a byte SQLite or a C string
    /// would stop at, stored row after row: the comparison with the row above must not treat them as equal.
    #[tokio::test]
    async fn texts_equal_up_to_a_nul_or_in_a_prefix_are_not_shared() {
        let dir = tempfile::tempdir().unwrap();
        let (sqlite, reader) = sink(&dir).await;
        let texts = ["a", "a\0", "a\0b", "a\0c", "a", "", "", "a", "é", "e\u{301}", "e\u{301}", "A", "a"];
        let mut events = Vec::new();
        for (i, t) in texts.iter().enumerate() {
            let mut e = AuditEvent::new(*t);
            e.id = Uuid::from_u128(i as u128 + 1);
            e.seq = i as u64 + 1;
            e.path = Some((*t).to_owned());
            e.route = Some((*t).to_owned());
            e.user_agent = Some((*t).to_owned());
            events.push(e);
        }
        sqlite.write_batch(&events).await.unwrap();
        let rows = read_rows(&reader).await;
        assert_eq!(rows.len(), events.len());
        for (at, (row, e)) in rows.iter().zip(&events).enumerate() {
            assert_row(row, e, at);
        }
    }

    /// Attack 2c: the sink's batches retried as the worker retries them (same slice again after a failure to
    /// commit, here: the same batch twice), and a long text (1 MiB) between repeats.
    #[tokio::test]
    async fn a_repeated_batch_and_huge_texts_change_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (sqlite, reader) = sink(&dir).await;
        let mut events = chained_events(50, 99);
        events[10].path = Some("p".repeat(1 << 20));
        events[11].path = Some("p".repeat(1 << 20));
        events[12].path = Some("p".repeat((1 << 20) - 1));
        sqlite.write_batch(&events).await.unwrap();
        sqlite.write_batch(&events).await.unwrap();
        let rows = read_rows(&reader).await;
        assert_eq!(rows.len(), events.len());
        for (at, (row, e)) in rows.iter().zip(&events).enumerate() {
            assert_row(row, e, at);
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// 3. Recycled request strings
// ---------------------------------------------------------------------------------------------------------------

/// What request `i` sends, and what its event must hold: (target, request id, user agent, expected path,
/// expected route).
struct Req {
    target: String,
    request_id: Option<String>,
    user_agent: Option<String>,
    path: String,
    route: Option<&'static str>,
}

fn request(i: usize) -> Req {
    // Lengths that straddle the 256-byte capacity kept, and texts shorter and longer than the one before.
    let pad = |n: usize| "z".repeat(n);
    let (target, path, route) = match i % 5 {
        0 => (format!("/items/{i}"), format!("/items/{i}"), Some("/items/{id}")),
        1 => (format!("/items/{i}?token=secret{i}&a=b"), format!("/items/{i}?token=REDACTED&a=b"), Some("/items/{id}")),
        2 => {
            let long = format!("/deep/{i}/{}", pad(300 + i % 7));
            (long.clone(), long, Some("/deep/{a}/{b}"))
        }
        3 => (format!("/nowhere/{i}"), format!("/nowhere/{i}"), None),
        _ => {
            let mid = format!("/deep/{i}/{}", pad(200 + i % 50));
            (mid.clone(), mid, Some("/deep/{a}/{b}"))
        }
    };
    Req {
        target,
        request_id: (!i.is_multiple_of(3)).then(|| format!("rid-{i}-{}", pad(i % 11 * 30))),
        user_agent: (i % 4 != 1).then(|| format!("agent-{i}/{}", pad((i * 7) % 290))),
        path,
        route,
    }
}

async fn ok() -> &'static str {
    "ok"
}

async fn serve(layer: AuditLayer) -> SocketAddr {
    use axum::routing::get;
    let app = axum::Router::new().route("/items/{id}", get(ok)).route("/deep/{a}/{b}", get(ok)).layer(layer);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>()).await.unwrap();
    });
    addr
}

/// Sends requests `range` from `tasks` concurrent clients over loopback.
async fn send_all(addr: SocketAddr, range: std::ops::Range<usize>, tasks: usize) {
    let client = reqwest::Client::new();
    let mut joins = Vec::new();
    for t in 0..tasks {
        let client = client.clone();
        let ids: Vec<usize> = range.clone().filter(|i| i % tasks == t).collect();
        joins.push(tokio::spawn(async move {
            for i in ids {
                let r = request(i);
                let mut req = client.get(format!("http://{addr}{}", r.target));
                if let Some(id) = &r.request_id {
                    req = req.header("x-request-id", id);
                }
                if let Some(agent) = &r.user_agent {
                    req = req.header("user-agent", agent);
                }
                let res = req.send().await.unwrap();
                let status = res.status().as_u16();
                assert_eq!(status, if r.route.is_some() { 200 } else { 404 });
                res.bytes().await.unwrap();
            }
        }));
    }
    for j in joins {
        j.await.unwrap();
    }
}

/// The request each event came from (by the number in its path), and that the event holds exactly its texts.
fn assert_own_texts(events: &[AuditEvent], range: std::ops::Range<usize>) {
    let mut seen = vec![0usize; range.end];
    for e in events {
        let path = e.path.as_deref().unwrap();
        let i: usize = path.split('/').nth(2).unwrap().split('?').next().unwrap().parse().unwrap();
        let r = request(i);
        seen[i] += 1;
        assert_eq!(
            (path, e.route.as_deref(), e.request_id.as_deref(), e.user_agent.as_deref()),
            (r.path.as_str(), r.route, r.request_id.as_deref(), r.user_agent.as_deref()),
            "request {i}"
        );
        assert_eq!(e.method.as_deref(), Some("GET"));
    }
    for i in range {
        assert_eq!(seen[i], 1, "request {i} recorded {} times", seen[i]);
    }
}

/// Attack 3a: 1,500 requests (three times the 512 strings kept) from 12 concurrent clients over loopback, with
/// route, request id and user agent present or absent in turn, texts longer and shorter than the strings they
/// land in, and small batches so strings come back while requests are in flight: every event holds exactly its
/// own request's texts.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_never_see_each_others_texts() {
    let sink = MemorySink::new();
    let (layer, handle) = AuditLayer::builder(sink.clone())
        .batch_size(7)
        .flush_interval(Duration::from_millis(1))
        .max_path_len(4096)
        .max_field_len(4096)
        .build()
        .unwrap();
    let addr = serve(layer).await;
    send_all(addr, 0..1500, 12).await;
    let report = handle.shutdown(LIMIT).await;
    assert!(report.drained, "{report}");
    let events = ended_cleanly(sink.events());
    assert_eq!(events.len(), 1500);
    assert_own_texts(&events, 0..1500);
    let s = handle.stats();
    assert_eq!((s.accepted, s.written, s.lost, s.fallback_written), (1500, 1500, 0, 0), "{s:?}");
    assert_identity(&s);
}

/// Attack 3b: a failing primary (no retries) and a fallback: every event reaches the fallback with its own
/// texts, counted once in `fallback_written`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallback_events_hold_their_own_texts_and_count_once() {
    let fallback = MemorySink::new();
    let (layer, handle) = AuditLayer::builder(FailingSink)
        .fallback(fallback.clone())
        .retry(tower_audit::Retry::none())
        .batch_size(5)
        .flush_interval(Duration::from_millis(1))
        .max_path_len(4096)
        .max_field_len(4096)
        .build()
        .unwrap();
    let addr = serve(layer).await;
    send_all(addr, 0..600, 6).await;
    let report = handle.shutdown(LIMIT).await;
    let events: Vec<AuditEvent> =
        fallback.events().into_iter().filter(|e| e.kind == tower_audit::kind::HTTP_REQUEST).collect();
    assert_eq!(events.len(), 600, "{report}");
    assert_own_texts(&events, 0..600);
    let s = handle.stats();
    assert_eq!((s.accepted, s.written, s.fallback_written, s.lost), (600, 0, 600, 0), "{s:?}");
    assert_identity(&s);
}

/// Attack 3c: a sink that fails, panics, then succeeds, with retries: the worker retries the same batch, whose
/// strings must not have been handed back to requests in between: every attempt at a batch holds the same
/// events, and the trail is exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_batches_keep_their_texts_across_failures_and_panics() {
    use common::Step::*;
    let script = [Ok, Fail, Panic, Ok, Fail, Ok, Panic, Ok];
    let sink = ScriptedSink::new(&script);
    let (layer, handle) = AuditLayer::builder(sink.clone())
        .retry(tower_audit::Retry::default().max_retries(3).base_delay(Duration::from_millis(1)))
        .batch_size(4)
        .flush_interval(Duration::from_millis(1))
        .max_path_len(4096)
        .max_field_len(4096)
        .build()
        .unwrap();
    let addr = serve(layer).await;
    send_all(addr, 0..300, 8).await;
    let report = handle.shutdown(LIMIT).await;
    assert!(report.drained, "{report}");
    // Every attempt with an event's id holds that same event.
    let mut by_id: BTreeMap<Uuid, AuditEvent> = BTreeMap::new();
    for call in sink.calls() {
        for e in call {
            if let Some(seen) = by_id.get(&e.id) {
                assert_eq!(seen, &e, "an event changed between attempts");
            } else {
                by_id.insert(e.id, e);
            }
        }
    }
    let events = ended_cleanly(sink.written.events());
    assert_eq!(events.len(), 300);
    assert_own_texts(&events, 0..300);
    let s = handle.stats();
    assert_eq!((s.accepted, s.written, s.lost, s.fallback_written, s.sink_panics), (300, 300, 0, 0, 2), "{s:?}");
    assert_eq!(s.retries, 4, "{s:?}");
    assert_identity(&s);
}

/// Attack 3d: with a spill, events are appended and their strings recycled at once, then replayed from the
/// spill to the sink: the replayed events hold their own texts, each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spilled_events_replay_with_their_own_texts() {
    let dir = tempfile::tempdir().unwrap();
    let sink = MemorySink::new();
    let (layer, handle) = AuditLayer::builder(sink.clone())
        .spill(tower_audit::Spill::new(dir.path()))
        .batch_size(6)
        .flush_interval(Duration::from_millis(1))
        .max_path_len(4096)
        .max_field_len(4096)
        .build()
        .unwrap();
    let addr = serve(layer).await;
    send_all(addr, 0..700, 8).await;
    let report = handle.shutdown(LIMIT).await;
    assert!(report.drained, "{report}");
    let events = ended_cleanly(sink.events());
    assert_eq!(events.len(), 700);
    assert_own_texts(&events, 0..700);
    let s = handle.stats();
    assert_eq!((s.accepted, s.written, s.lost, s.spill_full, s.left_in_spill), (700, 700, 0, 0, 0), "{s:?}");
    assert_identity(&s);
}

/// Attack 3e: durable delivery (every request waits until its event is written) with a sink that fails its
/// first attempts: each request is answered once its own event is written, the events hold their own texts,
/// and `durable_confirmed` counts each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_requests_hold_their_own_texts() {
    use common::Step::*;
    let sink = ScriptedSink::new(&[Ok, Fail, Ok, Fail]);
    let policy = tower_audit::Policy::new().rule(tower_audit::Rule::any().durable(LIMIT));
    let (layer, handle) = AuditLayer::builder(sink.clone())
        .policy(policy)
        .retry(tower_audit::Retry::default().max_retries(2).base_delay(Duration::from_millis(1)))
        .batch_size(3)
        .max_path_len(4096)
        .max_field_len(4096)
        .build()
        .unwrap();
    let addr = serve(layer).await;
    send_all(addr, 0..200, 5).await;
    // Every request was answered 200/404 (not 503) only after its event was written.
    eventually(LIMIT, || handle.stats().durable_confirmed == 200).await;
    let report = handle.shutdown(LIMIT).await;
    assert!(report.drained, "{report}");
    let events = ended_cleanly(sink.written.events());
    assert_eq!(events.len(), 200);
    assert_own_texts(&events, 0..200);
    let s = handle.stats();
    assert_eq!((s.accepted, s.written, s.durable_confirmed, s.durable_withheld), (200, 200, 200, 0), "{s:?}");
    assert_identity(&s);
}

// ---------------------------------------------------------------------------------------------------------------
// 1 (continued). Against bytes the previous version (160a4ca) really wrote: tests/data/review/, made by
// tests/review_support/generate_fixtures.rs.
// ---------------------------------------------------------------------------------------------------------------

fn fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/review").join(name)
}

/// Attack 1e: the same 400 events, written by the JSON lines sink of the new version, are byte for byte the
/// file the old version wrote; and each event's postcard encoding is byte for byte the old one (so a spill
/// record of either version decodes in the other).
#[tokio::test]
async fn output_is_byte_for_byte_what_the_previous_version_wrote() {
    let events = varied_events();
    let old_jsonl = std::fs::read(fixture("events.jsonl")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("new.jsonl");
    let sink = tower_audit::JsonLinesSink::open(&path).unwrap();
    for chunk in events.chunks(37) {
        sink.write_batch(chunk).await.unwrap();
    }
    let new_jsonl = std::fs::read(&path).unwrap();
    let old_lines: Vec<&[u8]> = old_jsonl.split(|b| *b == b'\n').collect();
    let new_lines: Vec<&[u8]> = new_jsonl.split(|b| *b == b'\n').collect();
    assert_eq!(old_lines.len(), new_lines.len());
    for (i, (old, new)) in old_lines.iter().zip(&new_lines).enumerate() {
        assert_eq!(String::from_utf8_lossy(new), String::from_utf8_lossy(old), "line {i}");
    }
    assert_eq!(new_jsonl, old_jsonl);

    let old_bin = std::fs::read(fixture("events.postcard")).unwrap();
    let mut at = 0;
    for (i, e) in events.iter().enumerate() {
        let len = u32::from_le_bytes(old_bin[at..at + 4].try_into().unwrap()) as usize;
        let old = &old_bin[at + 4..at + 4 + len];
        at += 4 + len;
        assert_eq!(postcard::to_allocvec(e).unwrap(), old, "event {i}");
        assert_eq!(&postcard::from_bytes::<AuditEvent>(old).unwrap(), e, "event {i}");
    }
    assert_eq!(at, old_bin.len());
}

/// Attack 1f: a spill directory the old version left behind (sink stalled at shutdown, integrity on: 122
/// records of one boot, every one with `prev_hash` and `hash`) is replayed by the new version: exactly the
/// events the old version itself replayed from it, JSON byte for byte, counted once in `recovered` and
/// `written`; and the replayed trail, written by the new JSON lines sink, verifies against the old boot's key
/// and its checkpoint note.
#[tokio::test]
async fn a_spill_left_by_the_previous_version_replays_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let spill = dir.path().join("spill");
    std::fs::create_dir_all(&spill).unwrap();
    for entry in std::fs::read_dir(fixture("spill")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), spill.join(entry.file_name())).unwrap();
    }
    let old_boot = "01a24ecf-98a4-790a-989d-d49fa3a35af6";
    let memory = MemorySink::new();
    let jsonl = dir.path().join("replayed.jsonl");
    let tee = TeeSink { primary: tower_audit::JsonLinesSink::open(&jsonl).unwrap(), copy: memory.clone() };
    let (_layer, handle) = AuditLayer::builder(tee).spill(tower_audit::Spill::new(&spill)).build().unwrap();
    let report = handle.shutdown(LIMIT).await;
    assert!(report.drained, "{report}");
    let s = handle.stats();
    assert_eq!((s.recovered, s.written, s.corrupt, s.lost, s.accepted), (120, 120, 0, 0, 0), "{s:?}");
    assert_identity(&s);

    let expected: Vec<String> = std::fs::read_to_string(fixture("replayed_by_old.jsonl"))
        .unwrap()
        .lines()
        .filter(|l| l.contains(&format!("\"boot\":\"{old_boot}\"")))
        .map(str::to_owned)
        .collect();
    assert_eq!(expected.len(), 122);
    let replayed: Vec<AuditEvent> =
        memory.events().into_iter().filter(|e| e.boot.is_some_and(|b| b.to_string() == old_boot)).collect();
    assert_eq!(replayed.len(), 122);
    for (i, (e, old)) in replayed.iter().zip(&expected).enumerate() {
        assert_eq!(&serde_json::to_string(e).unwrap(), old, "event {i}");
        assert_eq!(&serde_json::from_str::<AuditEvent>(old).unwrap(), e, "event {i}");
        assert!(e.prev_hash.is_some() && e.hash.is_some());
    }
    // The user events are the 120 recorded, in order (texts were sanitised on record, so compare the rest).
    let originals = varied_events();
    for (e, original) in replayed[1..121].iter().zip(&originals) {
        assert_eq!(
            (e.time, e.status, e.grpc_status, e.latency_us, e.client_addr),
            (original.time, original.status, original.grpc_status, original.latency_us, original.client_addr)
        );
    }
    // The file the new sink wrote (write_json's hashes) verifies against the old boot's key and checkpoint.
    let key = tower_audit::integrity::Integrity::from_seed(&[7; 32]).verifier_key();
    let note = std::fs::read_to_string(spill.join("checkpoint.note"))
        .unwrap_or_else(|_| std::fs::read_to_string(fixture("spill/checkpoint.note")).unwrap());
    let checkpoint = tower_audit::integrity::Checkpoint::from_note(&note).unwrap();
    checkpoint.verify(&key).unwrap();
    let old_only = dir.path().join("old_boot.jsonl");
    let text = std::fs::read_to_string(&jsonl).unwrap();
    let lines: Vec<&str> = text.lines().filter(|l| l.contains(&format!("\"boot\":\"{old_boot}\""))).collect();
    assert_eq!(lines, expected);
    std::fs::write(&old_only, lines.join("\n") + "\n").unwrap();
    let verified = tower_audit::integrity::verify_json_lines(&old_only, &key, &[checkpoint]).unwrap();
    assert!(verified.ok(), "{verified}");
    assert_eq!(verified.boots.len(), 1);
    assert_eq!(verified.boots[0].events, 122);
}
