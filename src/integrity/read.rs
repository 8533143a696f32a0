//! Reading a trail back for the verifier: a JSON lines file, or the table of the SQLite and Postgres sinks,
//! each row becoming the [`AuditEvent`] that was written, exactly.

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;
use std::sync::mpsc;

use super::line::Line;
use super::note::{Checkpoint, VerifierKey};
use super::verify::{Known, Report, Row, Verifier};
use crate::event::AuditEvent;

/// Why a trail could not be read at all (a record that cannot be read is [reported](Report::unreadable)
/// instead).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReadError {
    /// The file could not be opened or read.
    #[error("cannot read the trail: {0}")]
    Io(#[from] io::Error),
    /// The table name is not valid.
    #[error(transparent)]
    Config(#[from] crate::error::ConfigError),
    /// The database query failed.
    #[cfg(any(feature = "sqlite", feature = "postgres"))]
    #[cfg_attr(docsrs, doc(cfg(any(feature = "sqlite", feature = "postgres"))))]
    #[error("cannot read the audit table: {0}")]
    Sql(#[from] sqlx::Error),
}

/// Verifies a JSON lines file as [`JsonLinesSink`](crate::JsonLinesSink) writes it (one event per line, in the
/// native encoding). A line that is not an event is reported [unreadable](Report::unreadable) with its line
/// number; blank lines are skipped.
///
/// # Errors
///
/// [`ReadError::Io`] when the file cannot be opened or read.
pub fn verify_json_lines(
    path: impl AsRef<Path>,
    key: &VerifierKey,
    trusted: &[Checkpoint],
) -> Result<Report, ReadError> {
    let mut verifier = Verifier::new(key, trusted);
    verifier.push_json_lines(path)?;
    Ok(verifier.finish())
}

impl Verifier {
    /// Reads a JSON lines file into the verifier as one [source](Verifier::next_source), as
    /// [`verify_json_lines`] does: to verify it with other trails of the same pipeline (a fallback file beside
    /// the primary's table).
    ///
    /// # Errors
    ///
    /// [`ReadError::Io`] when the file cannot be opened or read.
    pub fn push_json_lines(&mut self, path: impl AsRef<Path>) -> Result<(), ReadError> {
        self.next_source();
        let threads = std::thread::available_parallelism().map_or(1, usize::from).min(MAX_THREADS);
        let file = File::open(path)?;
        // A pipeline: one thread reads blocks of whole lines and deals them out in turn to `threads` threads that
        // parse and hash them; this one takes their rows back in the same turn (file order) into the verifier,
        // and hands each block back to be read into again.
        std::thread::scope(|scope| {
            let (give_back, spare) = mpsc::channel::<Vec<u8>>();
            let (mut to_parsers, mut parsed) = (Vec::new(), Vec::new());
            for _ in 0..threads {
                let (tx, blocks) = mpsc::sync_channel::<Vec<u8>>(1);
                let (done, rx) = mpsc::sync_channel(1);
                scope.spawn(move || {
                    for block in blocks {
                        let (rows, lines) = parse(&block);
                        if done.send((block, rows, lines)).is_err() {
                            return;
                        }
                    }
                });
                to_parsers.push(tx);
                parsed.push(rx);
            }
            let reader = scope.spawn(move || {
                let mut turn = 0;
                read_blocks(
                    file,
                    BLOCK,
                    || spare.try_recv().ok(),
                    |block| {
                        turn += 1;
                        to_parsers[turn % threads].send(block).is_ok()
                    },
                )
            });
            let mut line = 0u64;
            for turn in 1.. {
                // Ends after the last block: its parser's channel closes once the reader is done.
                let Ok((block, rows, lines)) = parsed[turn % threads].recv() else { break };
                for row in rows {
                    match row {
                        Row::Unreadable(at, error) => self.unreadable(line + at, error),
                        row => self.push_row(row),
                    }
                }
                line += lines;
                let _ = give_back.send(block);
            }
            Ok(reader.join().expect("reading does not panic")?)
        })
    }
}

/// Threads that parse and hash at most, and the bytes of lines handed to them at a time.
const MAX_THREADS: usize = 8;
const BLOCK: usize = 2 << 20;

/// Parses and hashes every line of `part`, and counts its lines (blank ones included).
fn parse(part: &[u8]) -> (Vec<Row>, u64) {
    let mut buf = Vec::with_capacity(1024);
    let mut rows = Vec::with_capacity(part.len() / 256);
    let mut known = Known::default();
    let lines = for_each_line_of(part, 0, |line, bytes| {
        // Most rows: read borrowed, hashed, and handed over as their place in the chain, no event built.
        if let Ok(borrowed) = serde_json::from_slice::<Line<'_>>(bytes)
            && let Some((boot, seq, prev, hash)) = borrowed.plain(&mut buf)
            && known.contains(&boot)
        {
            rows.push(Row::Plain { boot, seq, prev, hash });
            return;
        }
        rows.push(match serde_json::from_slice::<AuditEvent>(bytes) {
            Ok(event) => {
                let own_ok = super::verify::self_consistent(&event, &mut buf);
                Row::of(event, own_ok, &mut known)
            }
            Err(e) => Row::Unreadable(line, e.to_string()),
        });
    });
    (rows, lines)
}

/// Reads every event of a JSON lines file, in file order, with the number (from 1) and error of each line that
/// is not one.
///
/// # Errors
///
/// When the file cannot be opened or read.
pub fn read_json_lines(path: impl AsRef<Path>) -> io::Result<Vec<Result<AuditEvent, (u64, serde_json::Error)>>> {
    let mut out = Vec::new();
    let mut line = 0;
    read_blocks(
        File::open(path)?,
        BLOCK,
        || None,
        |block| {
            line = for_each_line_of(&block, line, |line, bytes| {
                out.push(serde_json::from_slice(bytes).map_err(|e| (line, e)));
            });
            true
        },
    )?;
    Ok(out)
}

/// Calls `f` with each non-blank line of `block` and its number (counted on from `line`); returns the number of
/// the last line.
fn for_each_line_of(block: &[u8], mut line: u64, mut f: impl FnMut(u64, &[u8])) -> u64 {
    let block = block.strip_suffix(b"\n").unwrap_or(block);
    if block.is_empty() {
        return line;
    }
    let mut start = 0;
    for end in memchr::memchr_iter(b'\n', block).chain(std::iter::once(block.len())) {
        let bytes = &block[start..end];
        start = end + 1;
        line += 1;
        // An event starts with `{`: only other lines are looked at whole.
        if bytes.first() == Some(&b'{') || !bytes.iter().all(u8::is_ascii_whitespace) {
            f(line, bytes);
        }
    }
    line
}

/// Reads `input` in blocks of whole lines of about `size` bytes (more when a line is longer), handing each to
/// `f` until it returns `false`; a block is read into a buffer `spare` gives back when it has one.
fn read_blocks(
    mut input: impl Read,
    size: usize,
    mut spare: impl FnMut() -> Option<Vec<u8>>,
    mut f: impl FnMut(Vec<u8>) -> bool,
) -> io::Result<()> {
    let mut fresh = |len: usize| {
        let mut buf = spare().unwrap_or_default();
        buf.resize(len.max(size), 0);
        buf
    };
    let mut buf = fresh(size);
    let mut filled = 0usize;
    loop {
        if filled == buf.len() {
            // A line longer than the block: grow it.
            buf.resize(buf.len() * 2, 0);
        }
        let n = input.read(&mut buf[filled..])?;
        if n == 0 {
            if filled > 0 {
                buf.truncate(filled);
                f(buf);
            }
            return Ok(());
        }
        filled += n;
        if filled < buf.len() {
            continue;
        }
        let Some(last) = buf.iter().rposition(|&b| b == b'\n') else { continue };
        // The block ends with its last whole line; the rest starts the next one.
        let mut next = fresh(filled - last - 1);
        next[..filled - last - 1].copy_from_slice(&buf[last + 1..filled]);
        filled -= last + 1;
        buf.truncate(last + 1);
        if !f(std::mem::replace(&mut buf, next)) {
            return Ok(());
        }
    }
}

#[cfg(any(feature = "sqlite", feature = "postgres"))]
mod sql {
    use std::borrow::Cow;
    use std::collections::BTreeMap;
    use std::pin::Pin;
    use std::time::{Duration, SystemTime};

    use futures_core::Stream;

    use crate::event::{AuditEvent, Hash, Outcome};
    use crate::integrity::Verifier;

    /// One row as stored: the columns `src/sink/sql.rs` writes, as text and integers.
    #[derive(Debug)]
    pub(super) struct Stored {
        pub(super) id: String,
        pub(super) seq: i64,
        /// `None` when the stored time cannot be read.
        pub(super) time_micros: Option<i64>,
        pub(super) kind: String,
        pub(super) outcome: String,
        pub(super) method: Option<String>,
        pub(super) route: Option<String>,
        pub(super) path: Option<String>,
        pub(super) status: Option<i64>,
        pub(super) grpc_status: Option<i64>,
        pub(super) latency_us: Option<i64>,
        pub(super) request_id: Option<String>,
        pub(super) actor: Option<String>,
        pub(super) client_addr: Option<String>,
        pub(super) user_agent: Option<String>,
        pub(super) attributes: String,
        pub(super) version: i64,
        pub(super) instance: Option<String>,
        pub(super) boot: Option<String>,
        pub(super) prev_hash: Option<String>,
        pub(super) hash: Option<String>,
    }

    impl Stored {
        /// Reads the columns of the verifiers' query (time excepted: each database stores it its own way, so the
        /// caller reads it as `time_micros`).
        pub(super) fn from_row<R>(row: &R, time_micros: Option<i64>) -> Result<Self, sqlx::Error>
        where
            R: sqlx::Row,
            usize: sqlx::ColumnIndex<R>,
            for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
            for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
        {
            Ok(Stored {
                id: row.try_get(0)?,
                seq: row.try_get(1)?,
                time_micros,
                kind: row.try_get(3)?,
                outcome: row.try_get(4)?,
                method: row.try_get(5)?,
                route: row.try_get(6)?,
                path: row.try_get(7)?,
                status: row.try_get(8)?,
                grpc_status: row.try_get(9)?,
                latency_us: row.try_get(10)?,
                request_id: row.try_get(11)?,
                actor: row.try_get(12)?,
                client_addr: row.try_get(13)?,
                user_agent: row.try_get(14)?,
                attributes: row.try_get(15)?,
                version: row.try_get(16)?,
                instance: row.try_get(17)?,
                boot: row.try_get(18)?,
                prev_hash: row.try_get(19)?,
                hash: row.try_get(20)?,
            })
        }

        /// The event as it was written; what cannot be read back names its column.
        pub(super) fn into_event(self) -> Result<AuditEvent, String> {
            let bad = |column: &str, value: &dyn std::fmt::Debug| format!("row {}: bad {column} {value:?}", self.id);
            let hash = |column: &str, v: &Option<String>| {
                v.as_deref().map(|h| h.parse::<Hash>().map_err(|_| bad(column, &h))).transpose()
            };
            let micros = self.time_micros.ok_or_else(|| bad("time", &"unreadable"))?;
            let time = match u64::try_from(micros) {
                Ok(after) => SystemTime::UNIX_EPOCH.checked_add(Duration::from_micros(after)),
                Err(_) => SystemTime::UNIX_EPOCH.checked_sub(Duration::from_micros(micros.unsigned_abs())),
            }
            .ok_or_else(|| bad("time", &micros))?;
            let mut event = AuditEvent::with_time(Cow::Owned(self.kind.clone()), time);
            event.version = self.version.try_into().map_err(|_| bad("version", &self.version))?;
            event.id = self.id.parse().map_err(|_| bad("id", &self.id))?;
            event.instance = self.instance.as_deref().map(Into::into);
            event.boot = self.boot.as_deref().map(|b| b.parse().map_err(|_| bad("boot", &b))).transpose()?;
            event.seq = self.seq.try_into().map_err(|_| bad("seq", &self.seq))?;
            event.outcome = Outcome::from_name(&self.outcome).ok_or_else(|| bad("outcome", &self.outcome))?;
            event.method = self.method.clone().map(Cow::Owned);
            event.route.clone_from(&self.route);
            event.path.clone_from(&self.path);
            event.status = int(&self.id, "status", self.status)?;
            event.grpc_status = int(&self.id, "grpc_status", self.grpc_status)?;
            event.latency_us = int(&self.id, "latency_us", self.latency_us)?;
            event.request_id.clone_from(&self.request_id);
            event.actor.clone_from(&self.actor);
            event.client_addr =
                self.client_addr.as_deref().map(|a| a.parse().map_err(|_| bad("client_addr", &a))).transpose()?;
            event.user_agent.clone_from(&self.user_agent);
            event.attributes = serde_json::from_str::<BTreeMap<String, String>>(&self.attributes)
                .map_err(|_| bad("attributes", &self.attributes))?;
            event.prev_hash = hash("prev_hash", &self.prev_hash)?;
            event.hash = hash("hash", &self.hash)?;
            Ok(event)
        }
    }

    /// An integer column in the field's type.
    fn int<T: TryFrom<i64>>(id: &str, column: &str, value: Option<i64>) -> Result<Option<T>, String> {
        value.map(|v| T::try_from(v).map_err(|_| format!("row {id}: bad {column} {v}"))).transpose()
    }

    /// Feeds every row of `rows` to `verifier`, in order.
    pub(super) async fn feed<R, E>(
        mut rows: Pin<Box<dyn Stream<Item = Result<R, E>> + Send + '_>>,
        verifier: &mut Verifier,
        decode: impl Fn(&R) -> Result<Stored, E>,
    ) -> Result<(), E> {
        let mut position = 0u64;
        while let Some(row) = std::future::poll_fn(|cx| rows.as_mut().poll_next(cx)).await {
            position += 1;
            match decode(&row?).map(Stored::into_event) {
                Ok(Ok(event)) => verifier.push(&event),
                Ok(Err(why)) => verifier.unreadable(position, why),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// Verifies the table an [`SqliteSink`](crate::SqliteSink) writes (`audit_events`, or `table`), read in
/// `ORDER BY boot, seq` order. A row that cannot be read back is reported [unreadable](Report::unreadable) with
/// its position.
///
/// # Errors
///
/// [`ReadError::Config`] for an invalid table name, [`ReadError::Sql`] when the query fails.
#[cfg(feature = "sqlite")]
#[cfg_attr(docsrs, doc(cfg(feature = "sqlite")))]
pub async fn verify_sqlite(
    pool: &sqlx::SqlitePool,
    table: Option<&str>,
    key: &VerifierKey,
    trusted: &[Checkpoint],
) -> Result<Report, ReadError> {
    let mut verifier = Verifier::new(key, trusted);
    verifier.push_sqlite(pool, table).await?;
    Ok(verifier.finish())
}

/// Verifies the table a [`PostgresSink`](crate::PostgresSink) writes (`audit_events`, or `table`, optionally
/// `schema.table`), read in `ORDER BY boot, seq` order: `time` in microseconds, `client_addr` through
/// `host()`, `attributes` as JSON text. A row that cannot be read back is reported
/// [unreadable](Report::unreadable) with its position.
///
/// # Errors
///
/// [`ReadError::Config`] for an invalid table name, [`ReadError::Sql`] when the query fails.
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub async fn verify_postgres(
    pool: &sqlx::PgPool,
    table: Option<&str>,
    key: &VerifierKey,
    trusted: &[Checkpoint],
) -> Result<Report, ReadError> {
    let mut verifier = Verifier::new(key, trusted);
    verifier.push_postgres(pool, table).await?;
    Ok(verifier.finish())
}

#[cfg(any(feature = "sqlite", feature = "postgres"))]
impl Verifier {
    /// Reads an SQLite sink's table into the verifier as one [source](Verifier::next_source), as
    /// [`verify_sqlite`] does.
    ///
    /// # Errors
    ///
    /// [`ReadError::Config`] for an invalid table name, [`ReadError::Sql`] when the query fails.
    #[cfg(feature = "sqlite")]
    #[cfg_attr(docsrs, doc(cfg(feature = "sqlite")))]
    pub async fn push_sqlite(&mut self, pool: &sqlx::SqlitePool, table: Option<&str>) -> Result<(), ReadError> {
        use sqlx::Row as _;
        let table = crate::sink::sql::Table::parse(table.unwrap_or(crate::sink::sql::DEFAULT_TABLE), false)?;
        let query = format!(
            "SELECT id, seq, time, kind, outcome, method, route, path, status, grpc_status, latency_us, request_id, \
                    actor, client_addr, user_agent, attributes, version, instance, boot, prev_hash, hash \
             FROM {} ORDER BY boot, seq",
            table.qualified()
        );
        self.next_source();
        let rows = sqlx::query(sqlx::AssertSqlSafe(query)).fetch(pool);
        sql::feed(rows, self, |row: &sqlx::sqlite::SqliteRow| {
            let time: String = row.try_get(2)?;
            sql::Stored::from_row(row, humantime::parse_rfc3339(&time).ok().map(super::canonical::micros))
        })
        .await?;
        Ok(())
    }

    /// Reads a Postgres sink's table into the verifier as one [source](Verifier::next_source), as
    /// [`verify_postgres`] does.
    ///
    /// # Errors
    ///
    /// [`ReadError::Config`] for an invalid table name, [`ReadError::Sql`] when the query fails.
    #[cfg(feature = "postgres")]
    #[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
    pub async fn push_postgres(&mut self, pool: &sqlx::PgPool, table: Option<&str>) -> Result<(), ReadError> {
        use sqlx::Row as _;
        let table = crate::sink::sql::Table::parse(table.unwrap_or(crate::sink::sql::DEFAULT_TABLE), true)?;
        let query = format!(
            "SELECT id::text, seq, (EXTRACT(EPOCH FROM time) * 1000000)::int8, kind, outcome, method, route, path, \
                    status::int8, grpc_status::int8, latency_us, request_id, actor, host(client_addr), user_agent, \
                    attributes::text, version::int8, instance, boot::text, prev_hash, hash \
             FROM {} ORDER BY boot, seq",
            table.qualified()
        );
        self.next_source();
        let rows = sqlx::query(sqlx::AssertSqlSafe(query)).fetch(pool);
        sql::feed(rows, self, |row: &sqlx::postgres::PgRow| sql::Stored::from_row(row, Some(row.try_get(2)?))).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_split_across_reads_numbered_and_blank_ones_skipped() {
        // A reader handing out 3 bytes at a time splits every line across reads.
        struct Trickle<'a>(&'a [u8]);
        impl Read for Trickle<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                let n = self.0.len().min(3).min(buf.len());
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let mut seen = Vec::new();
        let mut line = 0;
        // Blocks of 4 bytes: every line longer than that grows one.
        read_blocks(
            Trickle(b"first\n\n  \nsecond line\nlast"),
            4,
            || None,
            |block| {
                line = for_each_line_of(&block, line, |n, l| seen.push((n, l.to_vec())));
                true
            },
        )
        .unwrap();
        assert_eq!(seen, [(1, b"first".to_vec()), (4, b"second line".to_vec()), (5, b"last".to_vec())]);
        assert_eq!(line, 5);
    }

    #[test]
    fn line_numbers_hold_across_blocks_and_parser_threads() {
        // Several blocks' worth of lines that are not events, every seventh one blank: each is reported once,
        // in file order, with its own line number.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("junk.jsonl");
        let lines = 3 * BLOCK / 10;
        let text: String =
            (1..=lines).map(|n| if n % 7 == 0 { "\n".to_owned() } else { format!("{:08}\n", n % 1000) }).collect();
        std::fs::write(&path, text).unwrap();
        let key = crate::integrity::Integrity::from_seed(&[1; 32]).verifier_key();
        let report = verify_json_lines(&path, &key, &[]).unwrap();
        let at: Vec<u64> = report.unreadable.iter().map(|u| u.at).collect();
        let want: Vec<u64> = (1..=lines as u64).filter(|n| n % 7 != 0).collect();
        assert_eq!(at.len(), want.len());
        assert!(at == want, "first difference at {:?}", at.iter().zip(&want).position(|(a, w)| a != w));
        assert!(report.boots.is_empty() && !report.ok());
    }
}
