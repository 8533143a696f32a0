//! What `Log::open` does to the files it finds: verify every record, cut a torn tail, drop acknowledged segments,
//! and work out where reading and appending resume.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io;
use std::path::Path;

use super::ledger::Ledger;
use super::record::HEADER;
use super::scan::{Item, Source, Window};
use super::{CorruptSet, Cursor, OpenError, Recovered, Segment, list_segments, remove_segment, segment_path};

/// The state `Log::open` builds the log from.
#[derive(Debug)]
pub(super) struct Recovery {
    pub(super) segments: VecDeque<Segment>,
    pub(super) next: u64,
    pub(super) acked: u64,
    /// Position of the first unacknowledged record (or of the corrupt bytes hiding it).
    pub(super) start: Cursor,
    pub(super) corrupt: CorruptSet,
    pub(super) recovered: Recovered,
}

/// Scans the segment files in `dir` against the acknowledged position in `ledger`.
pub(super) fn recover(dir: &Path, ledger: &mut Ledger) -> Result<Recovery, OpenError> {
    let names = list_segments(dir)?;
    // An empty segment holds nothing: at most it is the last one, created just before a crash, and then the
    // ledger and the segments before it say where appending resumes. An empty file named like a segment may also
    // not be ours, and trusting its name would hide the records of the segment before it. Delete them all.
    let mut kept = Vec::with_capacity(names.len());
    for first in names {
        let path = segment_path(dir, first);
        if std::fs::metadata(&path).map_err(OpenError::io(path.clone()))?.len() == 0 {
            std::fs::remove_file(&path).map_err(OpenError::io(path))?;
        } else {
            kept.push(first);
        }
    }
    let mut names = kept;
    // Only acknowledged segments are ever deleted, so whatever precedes the oldest segment left was acknowledged,
    // even when the ledger says less (an unsynced ledger write can be lost while the deletion it allowed survives).
    let acked = ledger.acked().max(names.first().copied().unwrap_or(0));
    let wholly_acked = names.windows(2).take_while(|pair| pair[1] <= acked).count();
    for &first in &names[..wholly_acked] {
        remove_segment(dir, first)?;
    }
    names.drain(..wholly_acked);

    let mut scan = Scan { acked, expected: acked, start: None, corrupt: CorruptSet::default(), counted: 0, torn: 0 };
    let mut segments = VecDeque::with_capacity(names.len());
    for (i, &first) in names.iter().enumerate() {
        let bytes = scan.segment(dir, first, names.get(i + 1).copied())?;
        segments.push_back(Segment { first, bytes });
    }

    // The next LSN follows the last valid record, but never falls below the acknowledged position: LSNs must not
    // repeat, and records up to there may have been delivered before the disk lost them.
    let next = ledger.acked().max(scan.expected);
    if let Some(last) = segments.back()
        && ledger.acked() >= scan.expected
    {
        // Everything is acknowledged: leave an empty directory. The ledger then carries the next LSN alone, so
        // it must be durable before the last segment, which also carries it, goes.
        ledger.sync().map_err(OpenError::io(dir.join(super::LEDGER)))?;
        remove_segment(dir, last.first)?;
        segments.clear();
    }
    let start = match (scan.start, segments.back()) {
        (Some(start), _) if !segments.is_empty() => start,
        (_, Some(last)) => Cursor { segment: last.first, offset: last.bytes, lsn: next },
        // No segment: the first one will be named `next`, so the cursor already points at its start.
        (_, None) => Cursor { segment: next, offset: 0, lsn: next },
    };
    let recovered = Recovered { unacked: next - acked - scan.counted, corrupt: scan.counted, torn_bytes: scan.torn };
    Ok(Recovery { segments, next, acked, start, corrupt: scan.corrupt, recovered })
}

/// Progress of the scan over consecutive segments.
#[derive(Debug)]
struct Scan {
    acked: u64,
    /// LSN the next record should have.
    expected: u64,
    /// First position that holds an unacknowledged LSN.
    start: Option<Cursor>,
    corrupt: CorruptSet,
    /// Corrupt records at or after `acked` (those before are of no more interest).
    counted: u64,
    torn: u64,
}

impl Scan {
    /// Verifies segment `first` up to its end, cutting a torn tail when it is the last one (`end_lsn` = `None`),
    /// and returns the bytes it keeps.
    fn segment(&mut self, dir: &Path, first: u64, end_lsn: Option<u64>) -> Result<u64, OpenError> {
        let path = segment_path(dir, first);
        let io_error = OpenError::io(path.clone());
        let last = end_lsn.is_none();
        let mut file = OpenOptions::new().read(true).write(last).open(&path).map_err(&io_error)?;
        let len = file.metadata().map_err(&io_error)?.len();
        let (offset, tail) = self.records(&mut file, first, len, end_lsn).map_err(&io_error)?;
        if tail {
            self.torn += len - offset;
            file.set_len(offset).map_err(&io_error)?;
            file.sync_all().map_err(&io_error)?;
        } else {
            // A crashed writer may have left this segment's last records in the page cache only.
            file.sync_data().map_err(&io_error)?;
        }
        Ok(offset)
    }

    /// Walks the records of one segment; returns where the valid part ends and whether a torn tail follows.
    fn records(&mut self, file: &mut File, first: u64, len: u64, end_lsn: Option<u64>) -> io::Result<(u64, bool)> {
        let mut window = Window::default();
        let mut source = Source { file, window: &mut window, limit: len, end_lsn };
        let (mut offset, mut expected) = (0, first);
        loop {
            let item = source.next(offset, expected)?;
            self.note_start(Cursor { segment: first, offset, lsn: expected }, item);
            match item {
                Item::Record { len } => {
                    offset += HEADER as u64 + u64::from(len);
                    expected += 1;
                }
                Item::Skip { offset: resume, lsn } => {
                    self.counted += self.corrupt.add(expected.max(self.acked), lsn);
                    (offset, expected) = (resume, lsn);
                }
                Item::Torn | Item::End => {
                    self.expected = expected;
                    return Ok((offset, item == Item::Torn));
                }
            }
        }
    }

    /// Remembers the first position at which the reader will meet an unacknowledged LSN.
    fn note_start(&mut self, at: Cursor, item: Item) {
        let unacked = match item {
            Item::Record { .. } => at.lsn >= self.acked,
            Item::Skip { lsn, .. } => lsn > self.acked,
            Item::Torn | Item::End => false,
        };
        if unacked && self.start.is_none() {
            self.start = Some(at);
        }
    }
}
