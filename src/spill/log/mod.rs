//! The segment log: an append-only, checksummed record log in a directory, for the disk spill.
//!
//! # On-disk format
//!
//! A spill directory holds:
//!
//! - `LOCK`: an empty file on which the open [`Log`] holds an exclusive `flock`-style lock ([`File::try_lock`]) for
//!   its whole life; a second `Log` on the same directory, in this process or another, is refused.
//! - `<first lsn>.seg`: segment files, named by the LSN of their first record as 20 decimal digits (e.g.
//!   `00000000000000001024.seg`), so names sort in log order. Other names in the directory are ignored.
//! - `ledger`: the acknowledged position.
//!
//! **LSNs** (log sequence numbers) number records from 0 across all segments of a directory. They never repeat:
//! after a reopen the next LSN is the last valid record's plus one, and never less than the acknowledged position
//! (which carries the count when every segment has been acknowledged and deleted).
//!
//! **Segments** are a plain sequence of records, with no header. Each record is
//!
//! ```text
//! len: u32 LE | crc: u32 LE | lsn: u64 LE | payload: len bytes
//! ```
//!
//! where `len < 16 MiB` and `crc` is CRC32C (Castagnoli) over the 8 `lsn` bytes, then the 4 `len` bytes, then the
//! payload. Records in a segment have consecutive LSNs starting at the one in the file name. A segment is closed,
//! and the next one (named by the next LSN) started, once it holds at least `segment_bytes`; the appender only ever
//! writes at the end of the newest segment.
//!
//! **Reading and corruption.** A reader expecting LSN `e` at offset `p` accepts the record there when its `len`
//! fits in the file, its `lsn` is `e` and its `crc` matches. Otherwise it searches forward from `p + 1`, one byte
//! at a time, for the first offset `q` holding a record with a plausible `len`, a matching `crc` and an LSN `l` with
//! `e < l`, `l` below the next segment's first LSN and `(l - e) * 16 <= q - p`; it resumes there, and the
//! `l - e` records in between are lost (counted as corrupt). Because the CRC covers the LSN and every record
//! carries it, one damaged byte anywhere (even in `len`) costs exactly the record that holds it. When no such
//! record follows, the records up to the next segment's first LSN are lost (trailing garbage in a closed segment).
//! In the last segment at open, bytes after the last valid record with no valid record after them are a *torn
//! tail* (a write cut short by a crash): they are truncated, not counted as corrupt. (So damage to the very last
//! record of the log is indistinguishable from a torn write and is treated as one.)
//!
//! **Ledger**: two slots of 24 bytes at offsets 0 and 24, each `generation: u64 LE | acked: u64 LE | crc: u32 LE |
//! 4 zero bytes`, `crc` being CRC32C over the first 16 bytes of the slot. Writes alternate between the slots
//! (generation `g` goes to slot `g % 2`, generations start at 1), so a torn write spoils at most the slot being
//! written. The valid slot with the higher generation holds the position: every LSN below `acked` is acknowledged.
//! A missing or empty ledger, or one without a valid slot, acknowledges nothing; in any case everything before the
//! oldest segment file is taken as acknowledged, because only acknowledged segments are ever deleted.

mod ledger;
mod record;
mod recover;
mod scan;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{self, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

use ledger::Ledger;
use record::MAX_PAYLOAD;
use scan::{Item, Source, Window};

/// A sensible default for [`LogOptions::segment_bytes`]: big enough that rotations are rare, small enough that
/// acknowledged space comes back in useful steps.
pub(crate) const DEFAULT_SEGMENT_BYTES: u64 = 64 << 20;
/// A sensible default for [`LogOptions::max_bytes`] (16 segments of the default size).
pub(crate) const DEFAULT_MAX_BYTES: u64 = 1 << 30;

const LOCK: &str = "LOCK";
const LEDGER: &str = "ledger";

/// Most read positions remembered for [`Log::rewind`]; past this a rewind just reads a little more to get back.
const MAX_MARKS: usize = 1024;

/// Sizes for a [`Log`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LogOptions {
    /// A segment file is closed and a new one started once it holds at least this many bytes.
    pub(crate) segment_bytes: u64,
    /// Budget for all segment files together (acknowledged segments are deleted, so this bounds the unacknowledged
    /// backlog + the current segment).
    pub(crate) max_bytes: u64,
}

impl Default for LogOptions {
    fn default() -> Self {
        LogOptions { segment_bytes: DEFAULT_SEGMENT_BYTES, max_bytes: DEFAULT_MAX_BYTES }
    }
}

/// What [`Log::open`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Recovered {
    /// Records not yet acknowledged, which the reader will return (in order), i.e. the backlog to replay.
    pub(crate) unacked: u64,
    /// Unacknowledged records skipped because they failed their checksum.
    pub(crate) corrupt: u64,
    /// Bytes cut off the end of the last segment: a torn tail (a record partly written when the process died).
    pub(crate) torn_bytes: u64,
}

/// Why [`Log::open`] failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum OpenError {
    /// Another [`Log`] (in this process or another) has the directory.
    #[error("spill directory {} is in use by another pipeline (lock held on {})", dir.display(), dir.join(LOCK).display())]
    Locked {
        /// The spill directory.
        dir: PathBuf,
    },
    /// A file or directory could not be created, read, written or synced.
    #[error("spill directory: {}: {source}", path.display())]
    Io {
        /// The file or directory concerned.
        path: PathBuf,
        /// What the operating system said.
        source: io::Error,
    },
}

impl OpenError {
    /// Wraps an I/O error about `path` (for `map_err`).
    fn io(path: PathBuf) -> impl Fn(io::Error) -> OpenError {
        move |source| OpenError::Io { path: path.clone(), source }
    }
}

/// A segment file on disk.
#[derive(Debug, Clone, Copy)]
struct Segment {
    /// LSN of its first record, which is also its name.
    first: u64,
    /// Its length: for the segment being appended to, the end of the last record written.
    bytes: u64,
}

/// A place in the log where the record with LSN `lsn` starts (or the corrupt bytes hiding it, or the end).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cursor {
    /// The segment, by its first LSN.
    segment: u64,
    offset: u64,
    lsn: u64,
}

impl Cursor {
    /// Whether this position comes later in the log than `other`. By place, not LSN: the end of one segment and
    /// the start of the next have the same LSN, and only the latter survives the former's deletion.
    fn is_after(&self, other: &Cursor) -> bool {
        (self.segment, self.offset) > (other.segment, other.offset)
    }
}

/// LSNs already reported as corrupt, so that meeting them again (a rewind, or a reader passing corruption that
/// `open` already counted) does not count them twice. Sorted, disjoint ranges; normally empty or tiny.
#[derive(Debug, Default)]
struct CorruptSet {
    ranges: Vec<Range<u64>>,
}

impl CorruptSet {
    /// Marks `from..to` as corrupt; returns how many of these LSNs were not known already.
    fn add(&mut self, from: u64, to: u64) -> u64 {
        if from >= to {
            return 0;
        }
        let known: u64 = self.ranges.iter().map(|r| r.end.min(to).saturating_sub(r.start.max(from))).sum();
        let at = self.ranges.partition_point(|r| r.start < from);
        self.ranges.insert(at, from..to);
        let mut merged: Vec<Range<u64>> = Vec::with_capacity(self.ranges.len());
        for range in self.ranges.drain(..) {
            match merged.last_mut() {
                Some(last) if range.start <= last.end => last.end = last.end.max(range.end),
                _ => merged.push(range),
            }
        }
        self.ranges = merged;
        (to - from) - known
    }

    /// Drops what lies below `lsn` (acknowledged, so never read again).
    fn forget_below(&mut self, lsn: u64) {
        self.ranges.retain(|r| r.end > lsn);
        if let Some(first) = self.ranges.first_mut() {
            first.start = first.start.max(lsn);
        }
    }
}

/// The reader's open segment and its buffer.
#[derive(Debug, Default)]
struct Reader {
    /// The segment (by first LSN) and a read-only handle on it.
    file: Option<(u64, File)>,
    window: Window,
}

/// An append-only log of records in segment files, with a read cursor and an acknowledged position.
///
/// Single-threaded: the caller serialises access (and keeps it off async threads: every method does file I/O).
#[derive(Debug)]
pub(crate) struct Log {
    dir: PathBuf,
    options: LogOptions,
    /// Held for the lock; released when dropped.
    _lock: File,
    ledger: Ledger,
    /// Segment files on disk, oldest first.
    segments: VecDeque<Segment>,
    /// Sum of `segments[..].bytes`.
    disk_bytes: u64,
    /// LSN of the next record appended.
    next: u64,
    /// Every LSN below this is acknowledged.
    acked: u64,
    /// Append handle on the newest segment, opened on the first append into it.
    writer: Option<File>,
    /// The writer has written since its last fsync.
    dirty: bool,
    /// Segments left by a rotation with writes not yet fsynced, by first LSN.
    unsynced: Vec<(u64, File)>,
    /// A segment was created since the directory was last fsynced.
    dir_dirty: bool,
    /// Where the next `read` starts.
    cursor: Cursor,
    /// A position at or before the first unacknowledged record: where `rewind` goes.
    acked_pos: Cursor,
    /// Positions where `read` calls ended, after `acked_pos`, so an acknowledgement at a batch boundary moves
    /// `acked_pos` exactly there and a later rewind re-reads nothing twice.
    marks: VecDeque<Cursor>,
    reader: Reader,
    corrupt: CorruptSet,
    /// Reused for encoding each batch, so appending allocates nothing in the steady state.
    batch: Vec<u8>,
}

impl Log {
    /// Creates `dir` if missing, takes an exclusive lock on `dir/LOCK` (refused with [`OpenError::Locked`] while
    /// another `Log` holds it, in this process or another), reads the ledger, and scans every segment: verifies each
    /// record, skips and counts corrupt ones, truncates a torn tail of the last segment (and fsyncs it), and deletes
    /// segments wholly acknowledged (including the last one, so a drained spill leaves no segment behind). The read
    /// cursor starts at the first unacknowledged record; appends go after the last valid record.
    pub(crate) fn open(dir: &Path, options: LogOptions) -> Result<(Log, Recovered), OpenError> {
        create_dir(dir)?;
        let lock = lock(dir)?;
        let ledger_path = dir.join(LEDGER);
        let ledger_existed = ledger_path.try_exists().map_err(OpenError::io(ledger_path.clone()))?;
        let mut ledger = Ledger::open(&ledger_path).map_err(OpenError::io(ledger_path))?;
        if !ledger_existed {
            // The ledger's name must be durable before an fsynced acknowledgement in it can be relied upon.
            sync_dir(dir).map_err(OpenError::io(dir.to_path_buf()))?;
        }
        let recovery = recover::recover(dir, &mut ledger)?;
        let log = Log {
            dir: dir.to_path_buf(),
            options,
            _lock: lock,
            ledger,
            disk_bytes: recovery.segments.iter().map(|s| s.bytes).sum(),
            segments: recovery.segments,
            next: recovery.next,
            acked: recovery.acked,
            writer: None,
            dirty: false,
            unsynced: Vec::new(),
            dir_dirty: false,
            cursor: recovery.start,
            acked_pos: recovery.start,
            marks: VecDeque::new(),
            reader: Reader::default(),
            corrupt: recovery.corrupt,
            batch: Vec::new(),
        };
        Ok((log, recovery.recovered))
    }

    /// Appends as many of `records` as fit in the budget, in order, with one write; returns how many (a prefix;
    /// 0 when full). Starts a new segment first when the current one has reached `segment_bytes`, so a segment
    /// never exceeds `segment_bytes` + one batch. Does not fsync.
    ///
    /// A payload of 16 MiB or more, or a first record bigger than the whole budget (it could never fit), is an
    /// `InvalidInput` error rather than a 0 the caller would retry forever.
    pub(crate) fn append(&mut self, records: &[&[u8]]) -> io::Result<usize> {
        if let Some(big) = records.iter().find(|r| r.len() >= MAX_PAYLOAD) {
            return Err(invalid_input(format!("a {}-byte record is over the 16 MiB limit", big.len())));
        }
        let mut count = self.fitting(records);
        if count < records.len() && self.reclaim_current()? {
            count = self.fitting(records);
        }
        if count == 0 {
            if let Some(first) = records.first()
                && record::size(first) > self.options.max_bytes
            {
                let budget = self.options.max_bytes;
                return Err(invalid_input(format!(
                    "a {}-byte record never fits the {budget}-byte budget",
                    first.len()
                )));
            }
            return Ok(0);
        }
        self.write_records(&records[..count])?;
        Ok(count)
    }

    /// Appends `records` whatever the budget (the pipeline's own few records, such as a boot's first and last
    /// events, which must not be lost to a full spill). Payloads must be under 16 MiB.
    pub(crate) fn append_beyond_budget(&mut self, records: &[&[u8]]) -> io::Result<()> {
        if let Some(big) = records.iter().find(|r| r.len() >= MAX_PAYLOAD) {
            return Err(invalid_input(format!("a {}-byte record is over the 16 MiB limit", big.len())));
        }
        self.write_records(records)
    }

    /// Whether `payload` could ever be appended: under the 16 MiB limit, and within the whole budget.
    pub(crate) fn could_hold(&self, payload: &[u8]) -> bool {
        payload.len() < MAX_PAYLOAD && record::size(payload) <= self.options.max_bytes
    }

    fn write_records(&mut self, records: &[&[u8]]) -> io::Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        self.batch.clear();
        for (lsn, payload) in (self.next..).zip(records) {
            record::encode(&mut self.batch, lsn, payload);
        }
        self.write_batch()?;
        self.next += records.len() as u64;
        Ok(())
    }

    /// When every record is acknowledged, the segment being appended to holds nothing anyone needs, but it is
    /// only deleted once another follows it: start that one now, so its space comes back. Whether it did.
    fn reclaim_current(&mut self) -> io::Result<bool> {
        let reclaimable = self.acked == self.next && self.segments.back().is_some_and(|s| s.first < self.next);
        if !reclaimable {
            return Ok(false);
        }
        self.rotate()?;
        self.delete_acked_segments()?;
        self.move_acked_pos();
        Ok(true)
    }

    /// How many of `records` (from the first) fit in what is left of the budget.
    fn fitting(&self, records: &[&[u8]]) -> usize {
        let mut room = self.options.max_bytes.saturating_sub(self.disk_bytes);
        records
            .iter()
            .take_while(|payload| {
                let fits = record::size(payload) <= room;
                room = room.saturating_sub(record::size(payload));
                fits
            })
            .count()
    }

    /// Writes `self.batch` at the end of the newest segment, rotating first if it is full.
    fn write_batch(&mut self) -> io::Result<()> {
        self.prepare_writer()?;
        let segment = self.segments.back_mut().expect("prepare_writer leaves a segment");
        let file = self.writer.as_mut().expect("prepare_writer leaves a writer");
        self.dirty = true;
        if let Err(error) = file.write_all(&self.batch) {
            // Part of the batch may be in the file. Cut it off, so the file ends where `bytes` says; if even that
            // fails, the next writer seeks back to `bytes` and overwrites it, and a reopen would truncate it.
            let _ = file.set_len(segment.bytes);
            if file.seek(SeekFrom::Start(segment.bytes)).is_err() {
                self.retire_writer();
            }
            return Err(error);
        }
        segment.bytes += self.batch.len() as u64;
        self.disk_bytes += self.batch.len() as u64;
        Ok(())
    }

    /// Makes `self.writer` an append handle on a segment with room: the newest one, or a new one.
    fn prepare_writer(&mut self) -> io::Result<()> {
        match self.segments.back() {
            // An empty segment is never full, so `segment_bytes` = 0 cannot make the log rotate into a name in use.
            Some(last) if last.bytes < self.options.segment_bytes || last.bytes == 0 => {
                if self.writer.is_none() {
                    let mut file = OpenOptions::new().write(true).open(segment_path(&self.dir, last.first))?;
                    file.seek(SeekFrom::Start(last.bytes))?;
                    self.writer = Some(file);
                }
                Ok(())
            }
            _ => self.rotate(),
        }
    }

    /// Starts segment `self.next`.
    fn rotate(&mut self) -> io::Result<()> {
        let path = segment_path(&self.dir, self.next);
        let file = OpenOptions::new().write(true).create_new(true).open(path)?;
        self.retire_writer();
        self.writer = Some(file);
        self.dir_dirty = true;
        self.segments.push_back(Segment { first: self.next, bytes: 0 });
        Ok(())
    }

    /// Closes the writer, keeping it for the next `sync` if it has unsynced writes.
    fn retire_writer(&mut self) {
        if let Some(file) = self.writer.take()
            && std::mem::take(&mut self.dirty)
        {
            let first = self.segments.back().map_or(0, |s| s.first);
            self.unsynced.push((first, file));
        }
    }

    /// Makes everything appended so far durable: fdatasyncs segments left since the last sync and the current
    /// one, then the directory if a segment was created. No-op when nothing was written since the last sync.
    pub(crate) fn sync(&mut self) -> io::Result<()> {
        while let Some((_, file)) = self.unsynced.first() {
            file.sync_data()?;
            self.unsynced.remove(0);
        }
        if self.dirty {
            if let Some(file) = &self.writer {
                file.sync_data()?;
            }
            self.dirty = false;
        }
        if self.dir_dirty {
            sync_dir(&self.dir)?;
            self.dir_dirty = false;
        }
        Ok(())
    }

    /// Takes what a [`sync`](Self::sync) would do, to be done by [`SyncWork::run`] without holding the log: the
    /// fsyncs then run while appends and reads go on. What is taken counts as synced here; if the work then
    /// fails, the caller must say so (nothing is retried).
    pub(crate) fn sync_work(&mut self) -> io::Result<SyncWork> {
        let mut files: Vec<File> = self.unsynced.drain(..).map(|(_, file)| file).collect();
        if std::mem::take(&mut self.dirty)
            && let Some(file) = &self.writer
        {
            files.push(file.try_clone()?);
        }
        let dir = std::mem::take(&mut self.dir_dirty).then(|| self.dir.clone());
        Ok(SyncWork { files, dir })
    }

    /// Reads up to `max` records from the read cursor into `out` (cleared first) as `(lsn, payload)`, never past
    /// what was appended. Corrupt records met are skipped; returns how many were skipped that had not been reported
    /// before (by `open` or an earlier `read`).
    pub(crate) fn read(&mut self, max: usize, out: &mut Vec<(u64, Vec<u8>)>) -> io::Result<u64> {
        out.clear();
        let mut corrupt = 0;
        while out.len() < max {
            let Some(index) = self.segment_index(self.cursor.segment) else { break };
            let end_lsn = self.segments.get(index + 1).map_or(self.next, |s| s.first);
            let limit = self.segments[index].bytes;
            let mut source = self.reader.source(&self.dir, self.cursor.segment, limit, end_lsn)?;
            let Cursor { offset, lsn, .. } = self.cursor;
            match source.next(offset, lsn)? {
                Item::Record { len } => {
                    // After a rewind to a mark before the acknowledged position, records below it are passed over.
                    if lsn >= self.acked {
                        out.push((lsn, source.payload(offset, len)?.to_vec()));
                    }
                    self.cursor.offset += record::HEADER as u64 + u64::from(len);
                    self.cursor.lsn += 1;
                }
                Item::Skip { offset: resume, lsn: resume_lsn } => {
                    corrupt += self.corrupt.add(lsn.max(self.acked), resume_lsn);
                    (self.cursor.offset, self.cursor.lsn) = (resume, resume_lsn);
                }
                Item::Torn | Item::End => match self.segments.get(index + 1) {
                    Some(next) => self.cursor = Cursor { segment: next.first, offset: 0, lsn: next.first },
                    None => break,
                },
            }
        }
        self.mark();
        Ok(corrupt)
    }

    /// Index in `self.segments` of the segment starting at `first`.
    fn segment_index(&self, first: u64) -> Option<usize> {
        self.segments.binary_search_by_key(&first, |s| s.first).ok()
    }

    /// Remembers where this `read` ended, for `ack` and `rewind`.
    fn mark(&mut self) {
        let last = self.marks.back().unwrap_or(&self.acked_pos);
        if self.cursor.lsn > last.lsn && self.marks.len() < MAX_MARKS {
            self.marks.push_back(self.cursor);
        }
    }

    /// Marks every record with LSN < `upto` as acknowledged (`upto` is capped at [`end`](Self::end)): writes the
    /// ledger (fsynced when `sync`) and deletes segment files all of whose records are acknowledged, except the
    /// one being appended to. When `upto` is not past the acknowledged position, only the fsync is done if asked.
    pub(crate) fn ack(&mut self, upto: u64, sync: bool) -> io::Result<()> {
        let upto = upto.min(self.next);
        if upto <= self.acked {
            return if sync { self.ledger.sync() } else { Ok(()) };
        }
        self.ledger.write(upto, sync)?;
        self.acked = upto;
        self.corrupt.forget_below(upto);
        let deleted = self.delete_acked_segments();
        self.move_acked_pos();
        deleted
    }

    /// Deletes the oldest segments while the next one starts at or before the acknowledged position.
    fn delete_acked_segments(&mut self) -> io::Result<()> {
        while self.segments.len() > 1 && self.segments[1].first <= self.acked {
            let first = self.segments[0].first;
            // Drop handles first: an open file's blocks are not freed by the unlink.
            if self.reader.file.as_ref().is_some_and(|(segment, _)| *segment == first) {
                self.reader.close();
            }
            self.unsynced.retain(|(segment, _)| *segment != first);
            remove_file(&segment_path(&self.dir, first))?;
            let gone = self.segments.pop_front().expect("more than one segment");
            self.disk_bytes -= gone.bytes;
        }
        Ok(())
    }

    /// Moves `acked_pos` (and the cursor, if behind) to the latest known position not after `self.acked`.
    fn move_acked_pos(&mut self) {
        while let Some(mark) = self.marks.front()
            && mark.lsn <= self.acked
        {
            self.acked_pos = *mark;
            self.marks.pop_front();
        }
        // The start of the segment holding `acked` is a known position too, and the only one left once the segment
        // `acked_pos` was in is deleted.
        let holding = self.segments.partition_point(|s| s.first <= self.acked).checked_sub(1);
        if let Some(segment) = holding.map(|i| self.segments[i]) {
            let start = Cursor { segment: segment.first, offset: 0, lsn: segment.first };
            if start.is_after(&self.acked_pos) {
                self.acked_pos = start;
            }
        }
        if self.acked_pos.is_after(&self.cursor) {
            self.cursor = self.acked_pos;
        }
    }

    /// LSN the next appended record will get.
    pub(crate) fn end(&self) -> u64 {
        self.next
    }

    /// LSN of the first unacknowledged record: every LSN below it is acknowledged.
    pub(crate) fn acked(&self) -> u64 {
        self.acked
    }

    /// LSN the next `read` starts at.
    pub(crate) fn read_pos(&self) -> u64 {
        self.cursor.lsn.max(self.acked)
    }

    /// Bytes of all segment files now on disk (the tests and the bench read it).
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn disk_bytes(&self) -> u64 {
        self.disk_bytes
    }

    /// Moves the read cursor back to the first unacknowledged record, so the next `read` returns again what was
    /// read but not acknowledged. O(1); the next read may pass over a few acknowledged records to get there.
    pub(crate) fn rewind(&mut self) {
        self.cursor = self.acked_pos;
        self.marks.clear();
    }
}

impl Reader {
    /// A scanner over segment `first`, reusing the open handle and buffer when it is the same segment as last time.
    fn source(&mut self, dir: &Path, first: u64, limit: u64, end_lsn: u64) -> io::Result<Source<'_>> {
        if self.file.as_ref().is_none_or(|(segment, _)| *segment != first) {
            self.close();
            self.file = Some((first, File::open(segment_path(dir, first))?));
        }
        let (_, file) = self.file.as_mut().expect("just opened");
        Ok(Source { file, window: &mut self.window, limit, end_lsn: Some(end_lsn) })
    }

    fn close(&mut self) {
        self.file = None;
        self.window.reset();
    }
}

/// Writes `dir/name` atomically: writes `dir/name.tmp`, fsyncs it, renames it over `dir/name` and fsyncs `dir`.
/// After a crash the file holds either the old or the new bytes, never a mix.
pub(crate) fn write_file_atomically(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    let mut file = File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    fs::rename(&tmp, dir.join(name))?;
    sync_dir(dir)
}

/// `dir/<first, 20 digits>.seg`.
fn segment_path(dir: &Path, first: u64) -> PathBuf {
    dir.join(format!("{first:020}.seg"))
}

/// The first LSN a segment file name stands for, if it is one.
fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".seg")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// First LSNs of the segment files in `dir`, in order.
fn list_segments(dir: &Path) -> Result<Vec<u64>, OpenError> {
    let io_error = OpenError::io(dir.to_path_buf());
    let mut names = Vec::new();
    for entry in fs::read_dir(dir).map_err(&io_error)? {
        let entry = entry.map_err(&io_error)?;
        if let Some(first) = entry.file_name().to_str().and_then(parse_segment_name) {
            names.push(first);
        }
    }
    names.sort_unstable();
    Ok(names)
}

/// Deletes segment `first` during `open`.
fn remove_segment(dir: &Path, first: u64) -> Result<(), OpenError> {
    let path = segment_path(dir, first);
    remove_file(&path).map_err(OpenError::io(path))
}

/// Deletes a file; one already gone is fine (its deletion is what was wanted).
fn remove_file(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(error) if error.kind() != io::ErrorKind::NotFound => Err(error),
        _ => Ok(()),
    }
}

/// Creates `dir` (and parents) if missing; a new directory's own name is made durable too.
fn create_dir(dir: &Path) -> Result<(), OpenError> {
    let io_error = OpenError::io(dir.to_path_buf());
    if dir.try_exists().map_err(&io_error)? {
        return Ok(());
    }
    fs::create_dir_all(dir).map_err(&io_error)?;
    match dir.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => sync_dir(parent).map_err(OpenError::io(parent.into())),
        _ => sync_dir(Path::new(".")).map_err(&io_error),
    }
}

/// Takes the exclusive lock on `dir/LOCK`.
fn lock(dir: &Path) -> Result<File, OpenError> {
    let path = dir.join(LOCK);
    let io_error = OpenError::io(path.clone());
    let file = OpenOptions::new().write(true).create(true).truncate(false).open(&path).map_err(&io_error)?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(TryLockError::WouldBlock) => Err(OpenError::Locked { dir: dir.to_path_buf() }),
        Err(TryLockError::Error(error)) => Err(io_error(error)),
    }
}

/// fsyncs a directory, making the names created in (or renamed into) it durable. Only Unix can open a directory
/// as a file; elsewhere this is a no-op.
/// Fsyncs taken from a [`Log`] by [`Log::sync_work`].
#[derive(Debug)]
pub(crate) struct SyncWork {
    files: Vec<File>,
    dir: Option<PathBuf>,
}

impl SyncWork {
    pub(crate) fn run(self) -> io::Result<()> {
        for file in &self.files {
            file.sync_data()?;
        }
        if let Some(dir) = &self.dir {
            sync_dir(dir)?;
        }
        Ok(())
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    #[cfg(unix)]
    File::open(dir)?.sync_all()?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

fn invalid_input(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, message)
}
