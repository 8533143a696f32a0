//! One record: how the writer lays it out and how the scanner checks it (the layout is in the module docs).

/// Bytes before the payload: `len: u32`, `crc: u32`, `lsn: u64`, all little-endian.
pub(super) const HEADER: usize = 16;

/// Payloads are shorter than this. A larger `len` in a header can only come from corruption, and refusing it keeps a
/// flipped high bit in `len` from making the scanner read megabytes for one candidate.
pub(super) const MAX_PAYLOAD: usize = 16 << 20;

/// A record header as read from disk; nothing in it is trusted until [`checksum`] matches.
#[derive(Debug, Clone, Copy)]
pub(super) struct Header {
    pub(super) len: u32,
    pub(super) crc: u32,
    pub(super) lsn: u64,
}

impl Header {
    /// Reads the header at the start of `bytes` (at least [`HEADER`] long).
    pub(super) fn parse(bytes: &[u8]) -> Header {
        let word = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
        let lsn = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
        Header { len: word(0), crc: word(4), lsn }
    }

    /// Header and payload together.
    pub(super) fn size(&self) -> u64 {
        HEADER as u64 + u64::from(self.len)
    }

    /// Whether `payload` (the `len` bytes after this header) is what the writer wrote for this header.
    pub(super) fn matches(&self, payload: &[u8]) -> bool {
        checksum(self.lsn, self.len, payload) == self.crc
    }
}

/// CRC32C over `lsn ‖ len ‖ payload`. Covering the LSN ties a record to its place in the log, so a stale or
/// misplaced copy of a record cannot pass for the one expected there.
pub(super) fn checksum(lsn: u64, len: u32, payload: &[u8]) -> u32 {
    let mut head = [0u8; 12];
    head[..8].copy_from_slice(&lsn.to_le_bytes());
    head[8..].copy_from_slice(&len.to_le_bytes());
    crc32c::crc32c_append(crc32c::crc32c(&head), payload)
}

/// Bytes a record with this payload takes on disk.
pub(super) fn size(payload: &[u8]) -> u64 {
    (HEADER + payload.len()) as u64
}

/// Appends the record for `payload` (shorter than [`MAX_PAYLOAD`], checked by the caller) at `lsn` to `out`.
pub(super) fn encode(out: &mut Vec<u8>, lsn: u64, payload: &[u8]) {
    debug_assert!(payload.len() < MAX_PAYLOAD);
    let len = payload.len() as u32; // < 16 MiB, so it fits
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&checksum(lsn, len, payload).to_le_bytes());
    out.extend_from_slice(&lsn.to_le_bytes());
    out.extend_from_slice(payload);
}
