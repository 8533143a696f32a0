//! Walking a segment record by record: the one piece of code that decides what is a valid record, used both by
//! recovery in `open` and by `read`, so the two can never disagree about a byte.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};

use super::record::{HEADER, Header, MAX_PAYLOAD};

/// How much a [`Window`] reads from the file at a time (unless the segment ends sooner).
const CHUNK: u64 = 1 << 20;

/// A buffered view of one segment file: the bytes `start..start + buf.len()`. Unlike a `BufReader` it hands out
/// slices at any offset, which the byte-by-byte resynchronisation needs, and it never reads past the caller's limit
/// (the end of what was appended).
#[derive(Debug, Default)]
pub(super) struct Window {
    buf: Vec<u8>,
    start: u64,
    /// Where the file's cursor is, when known; saves a seek per refill when reading straight on.
    file_pos: Option<u64>,
}

impl Window {
    /// Forgets the buffered bytes (the window is about to be used with another file).
    pub(super) fn reset(&mut self) {
        self.buf.clear();
        self.start = 0;
        self.file_pos = None;
    }

    /// The `n` bytes at `offset`, reading from `file` as needed. `offset + n` must not pass `limit`.
    fn bytes(&mut self, file: &mut File, limit: u64, offset: u64, n: usize) -> io::Result<&[u8]> {
        let end = offset + n as u64;
        debug_assert!(end <= limit, "read of {offset}+{n} past the limit {limit}");
        if end > self.end() {
            self.fill(file, limit, offset, end)?;
        }
        let at = (offset - self.start) as usize;
        Ok(&self.buf[at..at + n])
    }

    fn end(&self) -> u64 {
        self.start + self.buf.len() as u64
    }

    /// Makes the window cover `offset..end`, keeping no bytes before `offset` (readers only move forward, so what is
    /// behind is dead) and reading ahead up to [`CHUNK`] so small records don't cost a system call each.
    fn fill(&mut self, file: &mut File, limit: u64, offset: u64, end: u64) -> io::Result<()> {
        if offset < self.start || offset > self.end() {
            self.buf.clear();
            self.start = offset;
        } else {
            self.buf.drain(..(offset - self.start) as usize);
            self.start = offset;
        }
        let from = self.end();
        let to = limit.min(end.max(from + CHUNK));
        if self.file_pos != Some(from) {
            file.seek(SeekFrom::Start(from))?;
        }
        let old = self.buf.len();
        self.buf.resize(old + (to - from) as usize, 0);
        if let Err(error) = file.read_exact(&mut self.buf[old..]) {
            self.buf.truncate(old);
            self.file_pos = None;
            return Err(error);
        }
        self.file_pos = Some(to);
        Ok(())
    }
}

/// One segment as the scanner sees it.
#[derive(Debug)]
pub(super) struct Source<'a> {
    pub(super) file: &'a mut File,
    pub(super) window: &'a mut Window,
    /// Bytes of the segment that may be read: the file's length, or for the segment being appended to, the end of
    /// the last whole record written.
    pub(super) limit: u64,
    /// LSN that follows this segment's last record, when known: the next segment's first LSN, or the log's end for
    /// the segment being appended to. `None` only for the last segment during recovery, whose end is what the scan
    /// finds out; there, bytes after the last valid record are a torn tail, elsewhere they are corruption.
    pub(super) end_lsn: Option<u64>,
}

/// What the scanner found at a position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Item {
    /// A valid record with the expected LSN and `len` payload bytes.
    Record { len: u32 },
    /// Corrupt bytes up to `offset`, where a valid record with LSN `lsn` starts (or the end of the segment, with
    /// `lsn` = the segment's end LSN). The records from the expected LSN up to `lsn` are lost.
    Skip { offset: u64, lsn: u64 },
    /// No valid record from here to the end of the last segment: a torn write, to be cut off.
    Torn,
    /// The segment ends here with nothing missing.
    End,
}

impl Source<'_> {
    /// The payload of the record found at `offset`.
    pub(super) fn payload(&mut self, offset: u64, len: u32) -> io::Result<&[u8]> {
        self.window.bytes(self.file, self.limit, offset + HEADER as u64, len as usize)
    }

    /// What is at `offset`, where the record with LSN `expected` should start.
    pub(super) fn next(&mut self, offset: u64, expected: u64) -> io::Result<Item> {
        if offset >= self.limit {
            return Ok(match self.end_lsn {
                Some(end) if expected < end => Item::Skip { offset: self.limit, lsn: end },
                _ => Item::End,
            });
        }
        let room = self.end_lsn.is_none_or(|end| expected < end);
        if room && let Some(header) = self.record_at(offset, |lsn| lsn == expected)? {
            return Ok(Item::Record { len: header.len });
        }
        self.resync(offset, expected)
    }

    /// Searches forward byte by byte from just after `offset` for the next valid record. A candidate needs, besides a
    /// plausible length and a matching CRC, an LSN after `expected` and before the segment's end, and no larger than
    /// the skipped bytes allow (every lost record took at least [`HEADER`] bytes): a payload that happens to contain
    /// a well-formed record from elsewhere is thus very unlikely to be taken for the next one.
    fn resync(&mut self, offset: u64, expected: u64) -> io::Result<Item> {
        let end_lsn = self.end_lsn.unwrap_or(u64::MAX);
        if expected.saturating_add(1) < end_lsn {
            for at in offset + 1..=self.limit.saturating_sub(HEADER as u64) {
                let most_lost = (at - offset) / HEADER as u64;
                let plausible = |lsn: u64| lsn > expected && lsn < end_lsn && lsn - expected <= most_lost;
                if let Some(header) = self.record_at(at, plausible)? {
                    return Ok(Item::Skip { offset: at, lsn: header.lsn });
                }
            }
        }
        Ok(match self.end_lsn {
            Some(end) => Item::Skip { offset: self.limit, lsn: end },
            None => Item::Torn,
        })
    }

    /// The header of a valid record at `offset` whose LSN passes `lsn_ok`. The cheap checks (length, LSN) come first:
    /// during a resynchronisation they reject nearly every position without computing a CRC.
    fn record_at(&mut self, offset: u64, lsn_ok: impl Fn(u64) -> bool) -> io::Result<Option<Header>> {
        let left = self.limit - offset;
        if left < HEADER as u64 {
            return Ok(None);
        }
        let header = Header::parse(self.window.bytes(self.file, self.limit, offset, HEADER)?);
        if header.len as usize >= MAX_PAYLOAD || header.size() > left || !lsn_ok(header.lsn) {
            return Ok(None);
        }
        let payload = self.payload(offset, header.len)?;
        Ok(header.matches(payload).then_some(header))
    }
}
