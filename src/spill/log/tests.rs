use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::ops::Range;

use tempfile::TempDir;

use super::*;

fn options(segment_bytes: u64, max_bytes: u64) -> LogOptions {
    LogOptions { segment_bytes, max_bytes }
}

/// A payload that differs with the LSN in content and length (15 to 60 bytes).
fn payload(lsn: u64) -> Vec<u8> {
    let mut bytes = format!("{{\"lsn\":{lsn},\"kind\":\"http.request\",\"pad\":\"").into_bytes();
    bytes.extend(std::iter::repeat_n(b'a' + (lsn % 26) as u8, (lsn * 7 % 23) as usize));
    bytes.extend_from_slice(b"\"}");
    bytes
}

fn open(dir: &Path, options: LogOptions) -> (Log, Recovered) {
    Log::open(dir, options).unwrap_or_else(|e| panic!("open {}: {e}", dir.display()))
}

/// Appends the payloads of `lsns` as one batch, checking they all fit and get those LSNs.
fn append(log: &mut Log, lsns: Range<u64>) {
    assert_eq!(log.end(), lsns.start, "next LSN");
    let payloads: Vec<Vec<u8>> = lsns.clone().map(payload).collect();
    let records: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
    assert_eq!(log.append(&records).unwrap(), records.len(), "appended");
    assert_eq!(log.end(), lsns.end);
}

/// Reads until nothing is left (in small batches, to cross segment boundaries mid-batch); checks every payload and
/// returns the LSNs read and the corrupt records reported.
fn read_all(log: &mut Log) -> (Vec<u64>, u64) {
    let (mut lsns, mut corrupt, mut out) = (Vec::new(), 0, Vec::new());
    loop {
        corrupt += log.read(5, &mut out).unwrap();
        if out.is_empty() {
            return (lsns, corrupt);
        }
        assert!(out.len() <= 5);
        for (lsn, bytes) in &out {
            assert_eq!(*bytes, payload(*lsn), "payload of {lsn}");
            lsns.push(*lsn);
        }
    }
}

fn range_without(range: Range<u64>, missing: &[u64]) -> Vec<u64> {
    range.filter(|lsn| !missing.contains(lsn)).collect()
}

/// First LSNs of the segment files in `dir`, from the file names.
fn segment_files(dir: &Path) -> Vec<u64> {
    let mut names: Vec<u64> = fs::read_dir(dir)
        .unwrap()
        .filter_map(|entry| parse_segment_name(entry.unwrap().file_name().to_str()?))
        .collect();
    names.sort_unstable();
    names
}

fn segment_len(dir: &Path, first: u64) -> u64 {
    fs::metadata(segment_path(dir, first)).unwrap().len()
}

fn total_segment_bytes(dir: &Path) -> u64 {
    segment_files(dir).into_iter().map(|first| segment_len(dir, first)).sum()
}

/// Where each record sits, parsed independently of the scanner from a clean log: (segment, offset, size, lsn).
fn layout(dir: &Path) -> Vec<(u64, u64, u64, u64)> {
    let mut records = Vec::new();
    for first in segment_files(dir) {
        let bytes = fs::read(segment_path(dir, first)).unwrap();
        let mut offset = 0;
        while offset < bytes.len() {
            let len = u32::from_le_bytes(bytes[offset..offset + 4].try_into().unwrap()) as usize;
            let lsn = u64::from_le_bytes(bytes[offset + 8..offset + 16].try_into().unwrap());
            records.push((first, offset as u64, 16 + len as u64, lsn));
            offset += 16 + len;
        }
        assert_eq!(offset, bytes.len(), "segment {first} ends with a whole record");
    }
    records
}

/// Where the record `lsn` sits: (segment, offset, size, lsn).
fn record_of(dir: &Path, lsn: u64) -> (u64, u64, u64, u64) {
    layout(dir).into_iter().find(|record| record.3 == lsn).expect("record present")
}

/// XORs the byte at `offset` of `path` with `mask`.
fn flip(path: &Path, offset: u64, mask: u8) {
    let mut file = OpenOptions::new().read(true).write(true).open(path).unwrap();
    let mut byte = [0u8];
    file.seek(SeekFrom::Start(offset)).unwrap();
    file.read_exact(&mut byte).unwrap();
    byte[0] ^= mask;
    file.seek(SeekFrom::Start(offset)).unwrap();
    file.write_all(&byte).unwrap();
}

/// Three segments of four records each: 0..4, 4..8, 8..12 (a segment_bytes of 1 rotates before every batch).
fn three_segments(dir: &Path) {
    let (mut log, _) = open(dir, options(1, 1 << 20));
    for start in [0, 4, 8] {
        append(&mut log, start..start + 4);
    }
    assert_eq!(segment_files(dir), [0, 4, 8]);
}

#[test]
fn round_trip_over_several_rotations() {
    let dir = TempDir::new().unwrap();
    let (mut log, recovered) = open(dir.path(), options(1024, 1 << 20));
    assert_eq!(recovered, Recovered { unacked: 0, corrupt: 0, torn_bytes: 0 });
    let (mut read, mut out) = (Vec::new(), Vec::new());
    for batch in 0..40 {
        append(&mut log, batch * 7..batch * 7 + 7);
        // Read a little behind the writer, so reads follow appends within the newest segment.
        assert_eq!(log.read(5, &mut out).unwrap(), 0);
        read.extend(out.iter().map(|(lsn, bytes)| {
            assert_eq!(*bytes, payload(*lsn));
            *lsn
        }));
        if batch % 10 == 0 {
            log.sync().unwrap();
        }
    }
    let (rest, corrupt) = read_all(&mut log);
    read.extend(rest);
    assert_eq!((read, corrupt), ((0..280).collect::<Vec<_>>(), 0));
    assert_eq!(log.read_pos(), 280);

    let names = segment_files(dir.path());
    assert!(names.len() >= 10, "rotated into {} segments", names.len());
    let max_batch = (0..280).map(|lsn| record::size(&payload(lsn))).max().unwrap() * 7;
    for (i, &first) in names.iter().enumerate() {
        assert!(segment_len(dir.path(), first) < 1024 + max_batch, "segment {first} too big");
        if let Some(&next) = names.get(i + 1) {
            assert!(segment_len(dir.path(), first) >= 1024, "segment {first} closed early");
            assert_eq!((next - first) % 7, 0, "segments start at batch boundaries");
        }
    }
    assert_eq!(log.disk_bytes(), total_segment_bytes(dir.path()));

    // Acknowledging deletes exactly the segments whose records all lie below the position.
    log.ack(150, true).unwrap();
    let kept: Vec<u64> =
        names.iter().enumerate().filter(|&(i, _)| names.get(i + 1).is_none_or(|&n| n > 150)).map(|(_, &f)| f).collect();
    assert!(kept.len() < names.len());
    assert_eq!(segment_files(dir.path()), kept);
    assert_eq!(log.disk_bytes(), total_segment_bytes(dir.path()));
    // The segment being appended to stays even when wholly acknowledged.
    log.ack(280, false).unwrap();
    assert_eq!(segment_files(dir.path()), [*names.last().unwrap()]);
    assert_eq!(log.disk_bytes(), total_segment_bytes(dir.path()));
    assert_eq!((log.acked(), log.end(), log.read_pos()), (280, 280, 280));
    append(&mut log, 280..290);
    assert_eq!(read_all(&mut log), ((280..290).collect(), 0));
}

#[test]
fn reopen_resumes_lsns_and_the_read_cursor_at_the_ledger() {
    let dir = TempDir::new().unwrap();
    let (mut log, _) = open(dir.path(), options(512, 1 << 20));
    append(&mut log, 0..50);
    let mut out = Vec::new();
    log.read(30, &mut out).unwrap();
    assert_eq!(out.len(), 30);
    log.ack(20, true).unwrap();
    log.sync().unwrap();
    drop(log);

    let (mut log, recovered) = open(dir.path(), options(512, 1 << 20));
    assert_eq!(recovered, Recovered { unacked: 30, corrupt: 0, torn_bytes: 0 });
    assert_eq!((log.acked(), log.read_pos(), log.end()), (20, 20, 50));
    assert_eq!(read_all(&mut log), ((20..50).collect(), 0));
    append(&mut log, 50..53);
    assert_eq!(read_all(&mut log), ((50..53).collect(), 0));
}

#[test]
fn reopen_after_every_ack_state() {
    let dir = TempDir::new().unwrap();
    let (mut log, _) = open(dir.path(), options(200, 1 << 20));
    for start in (0..30).step_by(3) {
        append(&mut log, start..start + 3);
    }
    log.sync().unwrap();
    drop(log);
    let names = segment_files(dir.path());
    assert!(names.len() >= 4, "{names:?}");
    // The LSN after segment `i`'s last record.
    let end_of = |i: usize| names.get(i + 1).copied().unwrap_or(30);

    for acked in 0..=30 {
        let (mut log, _) = open(dir.path(), options(200, 1 << 20));
        log.ack(acked, acked % 2 == 0).unwrap();
        // In the process, the segment being appended to stays.
        let kept: Vec<u64> =
            (0..names.len()).filter(|&i| end_of(i) > acked || i == names.len() - 1).map(|i| names[i]).collect();
        assert_eq!(segment_files(dir.path()), kept, "after ack({acked})");
        drop(log);

        let (mut log, recovered) = open(dir.path(), options(200, 1 << 20));
        assert_eq!(recovered, Recovered { unacked: 30 - acked, corrupt: 0, torn_bytes: 0 }, "ack({acked})");
        assert_eq!((log.acked(), log.read_pos(), log.end()), (acked, acked, 30), "ack({acked})");
        assert_eq!(read_all(&mut log), ((acked..30).collect(), 0), "ack({acked})");
        // On reopen, wholly acknowledged segments go, the last one included.
        let kept: Vec<u64> = (0..names.len()).filter(|&i| end_of(i) > acked).map(|i| names[i]).collect();
        assert_eq!(segment_files(dir.path()), kept, "reopened after ack({acked})");
        assert_eq!(log.disk_bytes(), total_segment_bytes(dir.path()));
    }
}

#[test]
fn torn_tail_at_every_byte_of_the_last_record() {
    // The last record shares its segment with others, or is alone in it (a segment_bytes of 1 rotates before it).
    for segment_bytes in [1 << 20, 1] {
        let last_size = record::size(&payload(9));
        for cut in 0..last_size {
            let dir = TempDir::new().unwrap();
            let (mut log, _) = open(dir.path(), options(segment_bytes, 1 << 20));
            append(&mut log, 0..9);
            append(&mut log, 9..10);
            drop(log);
            let (segment, offset, size, lsn) = *layout(dir.path()).last().unwrap();
            assert_eq!((size, lsn), (last_size, 9));
            let path = segment_path(dir.path(), segment);
            fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(offset + cut).unwrap();

            let context = format!("segment_bytes {segment_bytes}, {cut} bytes of the last record left");
            let (mut log, recovered) = open(dir.path(), options(segment_bytes, 1 << 20));
            assert_eq!(recovered, Recovered { unacked: 9, corrupt: 0, torn_bytes: cut }, "{context}");
            if offset + cut == 0 {
                // Cut to nothing, the last segment is empty: recovery deletes it (it holds nothing).
                assert!(!path.exists(), "{context}");
            } else {
                assert_eq!(fs::metadata(&path).unwrap().len(), offset, "{context}");
            }
            assert_eq!(log.end(), 9, "{context}");
            assert_eq!(read_all(&mut log), ((0..9).collect(), 0), "{context}");
            append(&mut log, 9..10);
            assert_eq!(read_all(&mut log), (vec![9], 0), "{context}");
            drop(log);

            let (mut log, recovered) = open(dir.path(), options(segment_bytes, 1 << 20));
            assert_eq!(recovered, Recovered { unacked: 10, corrupt: 0, torn_bytes: 0 }, "{context}");
            assert_eq!(read_all(&mut log), ((0..10).collect(), 0), "{context}");
        }
    }
}

#[test]
fn a_lost_tail_never_brings_back_acknowledged_lsns() {
    let dir = TempDir::new().unwrap();
    let (mut log, _) = open(dir.path(), options(1 << 20, 1 << 20));
    append(&mut log, 0..10);
    log.ack(10, true).unwrap();
    drop(log);
    // The acknowledgement reached the disk but the last record did not (an OS crash before the segment's fsync).
    let (_, offset, _, _) = record_of(dir.path(), 9);
    fs::OpenOptions::new().write(true).open(segment_path(dir.path(), 0)).unwrap().set_len(offset).unwrap();
    let (mut log, recovered) = open(dir.path(), options(1 << 20, 1 << 20));
    assert_eq!(recovered.unacked, 0);
    assert_eq!((log.end(), log.acked()), (10, 10));
    append(&mut log, 10..11);
    assert_eq!(read_all(&mut log), (vec![10], 0));
}

#[test]
fn empty_payloads_round_trip_and_resynchronise() {
    let dir = TempDir::new().unwrap();
    let (mut log, _) = open(dir.path(), options(1, 1 << 20));
    let empty: [&[u8]; 5] = [b""; 5];
    assert_eq!(log.append(&empty).unwrap(), 5);
    assert_eq!(log.append(&empty).unwrap(), 5);
    drop(log);
    // Records of 16 bytes: damage the next-to-last of the closed segment (the last one then starts exactly 16
    // bytes before the end) and the first of the last segment.
    flip(&segment_path(dir.path(), 0), 3 * 16 + 9, 0x02);
    flip(&segment_path(dir.path(), 5), 5, 0x20);
    let (mut log, recovered) = open(dir.path(), options(1, 1 << 20));
    assert_eq!(recovered, Recovered { unacked: 8, corrupt: 2, torn_bytes: 0 });
    let mut out = Vec::new();
    log.read(100, &mut out).unwrap();
    let expected: Vec<(u64, Vec<u8>)> = [0, 1, 2, 4, 6, 7, 8, 9].into_iter().map(|lsn| (lsn, Vec::new())).collect();
    assert_eq!(out, expected);
}

#[test]
fn a_record_inside_a_payload_is_not_taken_for_a_later_one() {
    let dir = TempDir::new().unwrap();
    let (mut log, _) = open(dir.path(), options(1 << 20, 1 << 20));
    // Record 1's payload holds a well-formed record 5 (a log spilling log bytes, say).
    let mut inner = Vec::new();
    record::encode(&mut inner, 5, b"not really record 5");
    let payloads: Vec<Vec<u8>> = (0..8).map(|lsn| if lsn == 1 { inner.clone() } else { payload(lsn) }).collect();
    let records: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
    assert_eq!(log.append(&records).unwrap(), 8);
    drop(log);
    let (_, offset, _, _) = record_of(dir.path(), 1);
    flip(&segment_path(dir.path(), 0), offset + 4, 0xff);
    // The copy sits 16 bytes after the damaged record's start, too close to stand for 4 lost records.
    let (mut log, recovered) = open(dir.path(), options(1 << 20, 1 << 20));
    assert_eq!(recovered, Recovered { unacked: 7, corrupt: 1, torn_bytes: 0 });
    let mut out = Vec::new();
    log.read(100, &mut out).unwrap();
    assert_eq!(out.iter().map(|(lsn, _)| *lsn).collect::<Vec<_>>(), [0, 2, 3, 4, 5, 6, 7]);
    assert_eq!(out[4], (5, payload(5)));
}

#[test]
fn a_zero_segment_size_gives_each_batch_a_segment() {
    let dir = TempDir::new().unwrap();
    let (mut log, _) = open(dir.path(), options(0, 1 << 20));
    append(&mut log, 0..2);
    append(&mut log, 2..5);
    assert_eq!(segment_files(dir.path()), [0, 2]);
    drop(log);
    // Torn down to nothing, the last segment is empty: it is appended to, not rotated away from.
    fs::OpenOptions::new().write(true).open(segment_path(dir.path(), 2)).unwrap().set_len(10).unwrap();
    let (mut log, recovered) = open(dir.path(), options(0, 1 << 20));
    assert_eq!(recovered, Recovered { unacked: 2, corrupt: 0, torn_bytes: 10 });
    append(&mut log, 2..3);
    append(&mut log, 3..4);
    assert_eq!(segment_files(dir.path()), [0, 2, 3]);
    assert_eq!(read_all(&mut log), ((0..4).collect(), 0));
}

#[test]
fn zeroes_after_the_last_record_are_a_torn_tail() {
    let dir = TempDir::new().unwrap();
    let (mut log, _) = open(dir.path(), options(1 << 20, 1 << 20));
    append(&mut log, 0..5);
    drop(log);
    // What a filesystem may leave when a file's size reached the disk before its data.
    let path = segment_path(dir.path(), 0);
    let len = fs::metadata(&path).unwrap().len();
    fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(len + 4096).unwrap();

    let (mut log, recovered) = open(dir.path(), options(1 << 20, 1 << 20));
    assert_eq!(recovered, Recovered { unacked: 5, corrupt: 0, torn_bytes: 4096 });
    assert_eq!(fs::metadata(&path).unwrap().len(), len);
    assert_eq!(read_all(&mut log), ((0..5).collect(), 0));
}

#[test]
fn a_flipped_byte_anywhere_costs_exactly_its_record() {
    let clean = TempDir::new().unwrap();
    three_segments(clean.path());
    let records = layout(clean.path());
    let (_, _, last_size, _) = *records.last().unwrap();
    let mut cases = 0;
    // Every byte of every record (len, crc, lsn and payload; first, middle and last of each segment) except the
    // last record of the log, whose damage is a torn tail (tested below), with a whole-byte and a one-bit flip.
    for &(segment, offset, size, lsn) in &records[..records.len() - 1] {
        for at in offset..offset + size {
            for mask in [0xff, 0x01] {
                let dir = TempDir::new().unwrap();
                for first in [0, 4, 8] {
                    fs::copy(segment_path(clean.path(), first), segment_path(dir.path(), first)).unwrap();
                }
                flip(&segment_path(dir.path(), segment), at, mask);
                let context = format!("byte {} of record {lsn} (segment {segment}) ^ {mask:#x}", at - offset);
                let (mut log, recovered) = open(dir.path(), options(1, 1 << 20));
                assert_eq!(recovered, Recovered { unacked: 11, corrupt: 1, torn_bytes: 0 }, "{context}");
                assert_eq!(log.end(), 12, "{context}");
                // Already reported by open, so not again.
                assert_eq!(read_all(&mut log), (range_without(0..12, &[lsn]), 0), "{context}");
                append(&mut log, 12..13);
                assert_eq!(read_all(&mut log), (vec![12], 0), "{context}");
                cases += 1;
            }
        }
    }
    assert!(cases > 500 && last_size > 16, "{cases} cases");
}

#[test]
fn damage_to_the_last_record_of_the_log_is_a_torn_tail() {
    let dir = TempDir::new().unwrap();
    three_segments(dir.path());
    let (segment, offset, size, lsn) = *layout(dir.path()).last().unwrap();
    assert_eq!((segment, lsn), (8, 11));
    flip(&segment_path(dir.path(), segment), offset + 20, 0xff);
    let (mut log, recovered) = open(dir.path(), options(1, 1 << 20));
    assert_eq!(recovered, Recovered { unacked: 11, corrupt: 0, torn_bytes: size });
    assert_eq!(log.end(), 11);
    assert_eq!(read_all(&mut log), ((0..11).collect(), 0));
}

#[test]
fn several_damaged_records_are_each_counted() {
    let dir = TempDir::new().unwrap();
    three_segments(dir.path());
    let records = layout(dir.path());
    // Two neighbours (one resynchronisation spanning both) and one in another segment.
    for lsn in [1, 2, 9] {
        let (segment, offset, _, _) = records[lsn];
        flip(&segment_path(dir.path(), segment), offset + 3, 0x40);
    }
    let (mut log, recovered) = open(dir.path(), options(1, 1 << 20));
    assert_eq!(recovered, Recovered { unacked: 9, corrupt: 3, torn_bytes: 0 });
    assert_eq!(read_all(&mut log), (range_without(0..12, &[1, 2, 9]), 0));
}

#[test]
fn corruption_below_the_acknowledged_position_is_not_counted() {
    let dir = TempDir::new().unwrap();
    three_segments(dir.path());
    let (mut log, _) = open(dir.path(), options(1, 1 << 20));
    log.ack(6, true).unwrap();
    drop(log);
    let (segment, offset, _, _) = record_of(dir.path(), 5);
    assert_eq!(segment, 4);
    flip(&segment_path(dir.path(), segment), offset + 18, 0xff);
    let (mut log, recovered) = open(dir.path(), options(1, 1 << 20));
    assert_eq!(recovered, Recovered { unacked: 6, corrupt: 0, torn_bytes: 0 });
    assert_eq!(read_all(&mut log), ((6..12).collect(), 0));
}

#[test]
fn corruption_met_by_the_reader_is_counted_once() {
    let dir = TempDir::new().unwrap();
    let (mut log, recovered) = open(dir.path(), options(1 << 20, 1 << 20));
    assert_eq!(recovered.corrupt, 0);
    append(&mut log, 0..10);
    // Bit rot after the records were written, while the log is open.
    let (segment, offset, _, _) = layout(dir.path())[5];
    flip(&segment_path(dir.path(), segment), offset + 17, 0x10);
    assert_eq!(read_all(&mut log), (range_without(0..10, &[5]), 1));
    log.rewind();
    assert_eq!(read_all(&mut log), (range_without(0..10, &[5]), 0));
    // Acknowledging past it forgets it, and nothing else is reported.
    log.ack(10, false).unwrap();
    append(&mut log, 10..12);
    assert_eq!(read_all(&mut log), ((10..12).collect(), 0));
}

#[test]
fn corruption_at_the_end_of_the_segment_being_appended_to_is_skipped_at_runtime() {
    let dir = TempDir::new().unwrap();
    let (mut log, _) = open(dir.path(), options(1 << 20, 1 << 20));
    append(&mut log, 0..4);
    let (segment, offset, _, _) = layout(dir.path())[3];
    flip(&segment_path(dir.path(), segment), offset, 0x80);
    // No valid record follows the damaged one yet: the reader knows where the appended bytes end.
    assert_eq!(read_all(&mut log), ((0..3).collect(), 1));
    append(&mut log, 4..6);
    assert_eq!(read_all(&mut log), ((4..6).collect(), 0));
}

#[test]
fn a_cut_closed_segment_counts_its_missing_records() {
    let dir = TempDir::new().unwrap();
    three_segments(dir.path());
    let path = segment_path(dir.path(), 4);
    let (_, offset, _, _) = layout(dir.path())[7];
    fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(offset + 5).unwrap();
    let (mut log, recovered) = open(dir.path(), options(1, 1 << 20));
    assert_eq!(recovered, Recovered { unacked: 11, corrupt: 1, torn_bytes: 0 });
    assert_eq!(read_all(&mut log), (range_without(0..12, &[7]), 0));
    // Closed segments are left as they are.
    assert_eq!(fs::metadata(&path).unwrap().len(), offset + 5);
}

#[test]
fn garbage_after_a_closed_segment_costs_nothing() {
    let dir = TempDir::new().unwrap();
    three_segments(dir.path());
    let mut file = fs::OpenOptions::new().append(true).open(segment_path(dir.path(), 4)).unwrap();
    file.write_all(&[0xa5; 100]).unwrap();
    let (mut log, recovered) = open(dir.path(), options(1, 1 << 20));
    assert_eq!(recovered, Recovered { unacked: 12, corrupt: 0, torn_bytes: 0 });
    assert_eq!(read_all(&mut log), ((0..12).collect(), 0));
}

#[test]
fn a_missing_segment_counts_its_records() {
    let dir = TempDir::new().unwrap();
    three_segments(dir.path());
    fs::remove_file(segment_path(dir.path(), 4)).unwrap();
    let (mut log, recovered) = open(dir.path(), options(1, 1 << 20));
    assert_eq!(recovered, Recovered { unacked: 8, corrupt: 4, torn_bytes: 0 });
    assert_eq!(read_all(&mut log), (range_without(0..12, &[4, 5, 6, 7]), 0));
}

#[test]
fn a_torn_ledger_slot_falls_back_to_the_other() {
    let dir = TempDir::new().unwrap();
    three_segments(dir.path());
    let (mut log, _) = open(dir.path(), options(1, 1 << 20));
    log.ack(2, true).unwrap(); // generation 1, slot 1
    log.ack(3, true).unwrap(); // generation 2, slot 0
    drop(log);
    let ledger = dir.path().join(LEDGER);
    assert_eq!(fs::metadata(&ledger).unwrap().len(), 48);

    // A torn write of slot 1 (as if generation 3 were being written): slot 0 still holds 3.
    fs::OpenOptions::new().write(true).open(&ledger).unwrap().set_len(24 + 10).unwrap();
    let (log, recovered) = open(dir.path(), options(1, 1 << 20));
    assert_eq!((log.acked(), recovered.unacked), (3, 9));
    drop(log);

    // The newer slot spoilt: the older one's position.
    let dir = TempDir::new().unwrap();
    three_segments(dir.path());
    let (mut log, _) = open(dir.path(), options(1, 1 << 20));
    log.ack(2, true).unwrap();
    log.ack(3, true).unwrap();
    drop(log);
    flip(&dir.path().join(LEDGER), 9, 0x01);
    let (mut log, recovered) = open(dir.path(), options(1, 1 << 20));
    assert_eq!((log.acked(), recovered.unacked), (2, 10));
    assert_eq!(read_all(&mut log), ((2..12).collect(), 0));
    // The next write goes to the spoilt slot and wins.
    log.ack(5, false).unwrap();
    drop(log);
    let (log, _) = open(dir.path(), options(1, 1 << 20));
    assert_eq!(log.acked(), 5);
}

#[test]
fn without_a_valid_ledger_slot_the_first_segment_is_the_acknowledged_position() {
    let dir = TempDir::new().unwrap();
    three_segments(dir.path());
    let (mut log, _) = open(dir.path(), options(1, 1 << 20));
    log.ack(5, true).unwrap();
    assert_eq!(segment_files(dir.path()), [4, 8]);
    drop(log);
    fs::write(dir.path().join(LEDGER), [0u8; 48]).unwrap();
    let (mut log, recovered) = open(dir.path(), options(1, 1 << 20));
    assert_eq!((log.acked(), recovered.unacked), (4, 8));
    assert_eq!(read_all(&mut log), ((4..12).collect(), 0));

    // A missing ledger acknowledges nothing.
    let dir = TempDir::new().unwrap();
    three_segments(dir.path());
    fs::remove_file(dir.path().join(LEDGER)).unwrap();
    let (log, recovered) = open(dir.path(), options(1, 1 << 20));
    assert_eq!((log.acked(), recovered.unacked), (0, 12));
}

#[test]
fn the_budget_limits_appends_and_room_comes_back_after_acks() {
    let dir = TempDir::new().unwrap();
    let record = [b'x'; 68]; // 84 bytes on disk
    let batch: [&[u8]; 4] = [&record; 4];
    // Ten records' worth of budget; segments close after three records.
    let (mut log, _) = open(dir.path(), options(3 * 84, 10 * 84));
    assert_eq!(log.append(&batch).unwrap(), 4); // segment 0: 4 records, now full
    assert_eq!(log.append(&batch).unwrap(), 4); // segment 4
    assert_eq!(log.append(&batch).unwrap(), 2); // segment 8: only a prefix fits
    assert_eq!(log.append(&batch).unwrap(), 0);
    assert_eq!(log.append(&batch[..1]).unwrap(), 0);
    assert_eq!((log.end(), log.disk_bytes()), (10, 840));
    assert_eq!(segment_files(dir.path()), [0, 4, 8]);
    assert_eq!(total_segment_bytes(dir.path()), 840);

    // Acknowledging segment 0's records deletes it, and its room can be used again.
    log.ack(3, false).unwrap();
    assert_eq!(log.append(&batch).unwrap(), 0, "segment 0 still holds record 3");
    log.ack(4, false).unwrap();
    assert_eq!((segment_files(dir.path()), log.disk_bytes()), (vec![4, 8], 504));
    assert_eq!(log.append(&batch).unwrap(), 4); // into segment 8, not yet full
    assert_eq!((log.end(), log.disk_bytes()), (14, 840));
    assert_eq!(log.append(&batch).unwrap(), 0);

    // The segment being appended to is never deleted, so its records' room only comes back after it is left.
    log.ack(14, false).unwrap();
    assert_eq!((segment_files(dir.path()), log.disk_bytes()), (vec![8], 504));
    assert_eq!(log.append(&batch).unwrap(), 4); // rotates: segment 14
    assert_eq!(segment_files(dir.path()), [8, 14]);
    let mut out = Vec::new();
    log.read(100, &mut out).unwrap();
    assert_eq!(out.iter().map(|(lsn, _)| *lsn).collect::<Vec<_>>(), (14..18).collect::<Vec<_>>());
}

#[test]
fn records_that_can_never_fit_are_refused() {
    let dir = TempDir::new().unwrap();
    let (mut log, _) = open(dir.path(), options(1 << 20, 1000));
    let big = vec![0u8; 1000 - 16 + 1];
    let error = log.append(&[big.as_slice()]).unwrap_err();
    assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
    assert_eq!(log.append(&[&big[..1000 - 16]]).unwrap(), 1);

    let (mut log, _) = {
        drop(log);
        open(dir.path(), options(1 << 20, 1 << 30))
    };
    let huge = vec![0u8; MAX_PAYLOAD];
    assert_eq!(log.append(&[b"ok".as_slice(), huge.as_slice()]).unwrap_err().kind(), io::ErrorKind::InvalidInput);
    assert_eq!(log.end(), 1, "nothing of a refused batch is appended");
    assert_eq!(log.append(&[&huge[1..]]).unwrap(), 1);
    assert_eq!(log.append(&[]).unwrap(), 0);
}

#[test]
fn a_second_open_of_the_same_directory_is_locked() {
    let dir = TempDir::new().unwrap();
    let spill = dir.path().join("spill");
    let (log, _) = open(&spill, options(1 << 20, 1 << 20));
    let error = Log::open(&spill, options(1 << 20, 1 << 20)).unwrap_err();
    assert!(matches!(&error, OpenError::Locked { dir } if *dir == spill), "{error:?}");
    assert_eq!(
        error.to_string(),
        format!(
            "spill directory {} is in use by another pipeline (lock held on {}/LOCK)",
            spill.display(),
            spill.display()
        )
    );
    drop(log);
    open(&spill, options(1 << 20, 1 << 20));
}

#[test]
fn io_errors_name_the_path() {
    let dir = TempDir::new().unwrap();
    let file = dir.path().join("a-file");
    fs::write(&file, b"").unwrap();
    let error = Log::open(&file.join("spill"), options(1, 1)).unwrap_err();
    assert!(matches!(&error, OpenError::Io { path, .. } if *path == file.join("spill")), "{error:?}");
    assert!(error.to_string().starts_with(&format!("spill directory: {}: ", file.join("spill").display())));
}

#[test]
fn when_every_segment_was_acknowledged_and_deleted_lsns_keep_increasing() {
    let dir = TempDir::new().unwrap();
    let (mut log, _) = open(dir.path(), options(100, 1 << 20));
    append(&mut log, 0..10);
    assert_eq!(read_all(&mut log).0.len(), 10);
    log.ack(10, false).unwrap();
    drop(log);

    let (mut log, recovered) = open(dir.path(), options(100, 1 << 20));
    assert_eq!(recovered, Recovered { unacked: 0, corrupt: 0, torn_bytes: 0 });
    assert_eq!(segment_files(dir.path()), Vec::<u64>::new());
    assert_eq!((log.end(), log.acked(), log.read_pos(), log.disk_bytes()), (10, 10, 10, 0));
    assert_eq!(read_all(&mut log), (vec![], 0));
    drop(log);

    // Again with no segment at all, then appending.
    let (mut log, _) = open(dir.path(), options(100, 1 << 20));
    assert_eq!(log.end(), 10);
    append(&mut log, 10..12);
    assert_eq!(segment_files(dir.path()), [10]);
    assert_eq!(read_all(&mut log), ((10..12).collect(), 0));
    drop(log);
    let (mut log, recovered) = open(dir.path(), options(100, 1 << 20));
    assert_eq!(recovered.unacked, 2);
    assert_eq!(read_all(&mut log), ((10..12).collect(), 0));
}

#[test]
fn read_never_returns_more_than_was_appended() {
    let dir = TempDir::new().unwrap();
    let (mut log, _) = open(dir.path(), options(1, 1 << 20));
    let mut out = vec![(99, vec![1])];
    assert_eq!(log.read(100, &mut out).unwrap(), 0);
    assert!(out.is_empty(), "cleared");
    append(&mut log, 0..3);
    log.read(100, &mut out).unwrap();
    assert_eq!(out, (0..3).map(|lsn| (lsn, payload(lsn))).collect::<Vec<_>>());
    log.read(100, &mut out).unwrap();
    assert!(out.is_empty());
    append(&mut log, 3..5); // a new segment
    log.read(1, &mut out).unwrap();
    assert_eq!(out, [(3, payload(3))]);
    log.read(0, &mut out).unwrap();
    assert!(out.is_empty());
    log.read(100, &mut out).unwrap();
    assert_eq!(out, [(4, payload(4))]);
    assert_eq!(log.read_pos(), 5);
    log.read(100, &mut out).unwrap();
    assert!(out.is_empty());
}

#[test]
fn rewind_rereads_from_the_acknowledged_position() {
    let dir = TempDir::new().unwrap();
    let (mut log, _) = open(dir.path(), options(300, 1 << 20));
    append(&mut log, 0..20);
    append(&mut log, 20..40);
    let mut out = Vec::new();
    let lsns = |out: &Vec<(u64, Vec<u8>)>| out.iter().map(|(lsn, _)| *lsn).collect::<Vec<_>>();

    log.read(8, &mut out).unwrap();
    assert_eq!(lsns(&out), (0..8).collect::<Vec<_>>());
    log.read(5, &mut out).unwrap();
    assert_eq!(lsns(&out), (8..13).collect::<Vec<_>>());
    log.rewind();
    assert_eq!(log.read_pos(), 0);
    assert_eq!(read_all(&mut log), ((0..40).collect(), 0));

    // At a batch boundary and in the middle of a batch.
    log.rewind();
    log.read(8, &mut out).unwrap();
    log.read(5, &mut out).unwrap();
    log.ack(8, false).unwrap();
    // Acknowledged at the end of a read: the rewind position is exact, nothing is read twice to get there.
    assert_eq!(log.acked_pos.lsn, 8);
    log.rewind();
    assert_eq!(log.read_pos(), 8);
    log.read(3, &mut out).unwrap();
    assert_eq!(lsns(&out), [8, 9, 10]);
    log.ack(10, false).unwrap();
    log.rewind();
    assert_eq!(log.read_pos(), 10);
    assert_eq!(read_all(&mut log), ((10..40).collect(), 0));

    // Past a deleted segment (segment 20 starts a new file), and past what was read.
    assert!(segment_files(dir.path()).contains(&20));
    log.ack(25, false).unwrap();
    assert_eq!(segment_files(dir.path())[0], 20);
    log.rewind();
    assert_eq!(read_all(&mut log), ((25..40).collect(), 0));
    log.rewind();
    log.read(2, &mut out).unwrap();
    log.ack(33, false).unwrap();
    assert_eq!(log.read_pos(), 33);
    assert_eq!(read_all(&mut log), ((33..40).collect(), 0));
    log.rewind();
    assert_eq!(read_all(&mut log), ((33..40).collect(), 0));
}

#[test]
fn rewind_after_the_reader_crossed_into_a_new_segment() {
    let dir = TempDir::new().unwrap();
    let (mut log, _) = open(dir.path(), options(1, 1 << 20));
    append(&mut log, 0..4);
    append(&mut log, 4..8);
    let mut out = Vec::new();
    log.read(4, &mut out).unwrap(); // ends exactly at the end of segment 0
    log.ack(4, false).unwrap(); // deletes segment 0
    assert_eq!(segment_files(dir.path()), [4]);
    log.rewind();
    assert_eq!(read_all(&mut log), ((4..8).collect(), 0));
}

#[test]
fn ack_is_capped_at_the_end_and_never_goes_back() {
    let dir = TempDir::new().unwrap();
    let (mut log, _) = open(dir.path(), options(1 << 20, 1 << 20));
    append(&mut log, 0..5);
    log.ack(100, true).unwrap();
    assert_eq!((log.acked(), log.read_pos()), (5, 5));
    log.ack(2, true).unwrap();
    assert_eq!(log.acked(), 5);
    append(&mut log, 5..6);
    assert_eq!(read_all(&mut log), (vec![5], 0));
    drop(log);
    let (log, recovered) = open(dir.path(), options(1 << 20, 1 << 20));
    assert_eq!((log.acked(), log.end(), recovered.unacked), (5, 6, 1));
}

#[test]
fn sync_covers_segments_left_and_the_directory() {
    let dir = TempDir::new().unwrap();
    let (mut log, _) = open(dir.path(), options(1, 1 << 20));
    assert!(!log.dirty && !log.dir_dirty && log.unsynced.is_empty());
    append(&mut log, 0..2);
    assert!(log.dirty && log.dir_dirty, "a created segment");
    log.sync().unwrap();
    assert!(!log.dirty && !log.dir_dirty);
    append(&mut log, 2..3);
    append(&mut log, 3..4);
    // Segment 0 was synced before it was left; segment 2 was not.
    assert_eq!(log.unsynced.iter().map(|(first, _)| *first).collect::<Vec<_>>(), [2]);
    log.sync().unwrap();
    assert!(!log.dirty && !log.dir_dirty && log.unsynced.is_empty());
    // Acknowledging drops a deleted segment's pending handle.
    append(&mut log, 4..5);
    append(&mut log, 5..6);
    log.ack(5, false).unwrap();
    assert!(log.unsynced.is_empty());
}

#[test]
fn write_file_atomically_replaces_the_file() {
    let dir = TempDir::new().unwrap();
    write_file_atomically(dir.path(), "state", b"first").unwrap();
    write_file_atomically(dir.path(), "state", b"second").unwrap();
    assert_eq!(fs::read(dir.path().join("state")).unwrap(), b"second");
    let names: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, ["state"]);
    // Files of the caller's in the spill directory are left alone by the log.
    let (log, recovered) = open(dir.path(), options(1, 1 << 20));
    assert_eq!(recovered.unacked, 0);
    drop(log);
    assert_eq!(fs::read(dir.path().join("state")).unwrap(), b"second");
}

#[test]
fn corrupt_set_counts_each_lsn_once() {
    let mut set = CorruptSet::default();
    assert_eq!(set.add(5, 8), 3);
    assert_eq!(set.add(5, 8), 0);
    assert_eq!(set.add(7, 10), 2);
    assert_eq!(set.add(1, 2), 1);
    assert_eq!(set.add(0, 12), 12 - 6);
    assert_eq!(set.ranges, vec![Range { start: 0, end: 12 }]);
    set.forget_below(4);
    assert_eq!(set.ranges, vec![Range { start: 4, end: 12 }]);
    assert_eq!(set.add(3, 5), 1);
    assert_eq!(set.add(9, 9), 0);
}

#[test]
fn segment_names_round_trip() {
    let path = segment_path(Path::new("/x"), 1024);
    assert_eq!(path, Path::new("/x/00000000000000001024.seg"));
    assert_eq!(parse_segment_name("00000000000000001024.seg"), Some(1024));
    assert_eq!(parse_segment_name(&format!("{:020}.seg", u64::MAX)), Some(u64::MAX));
    for name in ["1024.seg", "0000000000000000102a.seg", "00000000000000001024.seg.tmp", "ledger", "LOCK"] {
        assert_eq!(parse_segment_name(name), None, "{name}");
    }
}

#[test]
fn a_log_can_move_to_a_blocking_thread() {
    fn assert_send<T: Send + 'static>() {}
    assert_send::<Log>();
    let dir = TempDir::new().unwrap();
    let (mut log, _) = open(dir.path(), options(1 << 20, 1 << 20));
    append(&mut log, 0..3);
    let mut log = std::thread::spawn(move || {
        assert_eq!(read_all(&mut log), ((0..3).collect(), 0));
        log
    })
    .join()
    .unwrap();
    append(&mut log, 3..4);
}
