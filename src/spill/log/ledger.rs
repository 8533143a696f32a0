//! The ledger: the acknowledged position, kept in two slots written in turn so a torn write can only ever spoil the
//! slot being written, never the last good one.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::Path;

/// `generation: u64 LE` | `acked: u64 LE` | `crc: u32 LE` (CRC32C of the first 16 bytes) | 4 zero bytes.
const SLOT: usize = 24;

/// The open ledger file and what it holds.
#[derive(Debug)]
pub(super) struct Ledger {
    file: File,
    /// Generation of the newest valid slot (0: none yet). The next write uses `generation + 1` in slot
    /// `(generation + 1) % 2`, i.e. the other slot.
    generation: u64,
    acked: u64,
    /// A write went out without an fsync.
    unsynced: bool,
}

impl Ledger {
    /// Opens `path`, creating it when missing (an empty or unreadable ledger means nothing is acknowledged).
    pub(super) fn open(path: &Path) -> io::Result<Ledger> {
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
        let mut bytes = Vec::with_capacity(2 * SLOT);
        (&file).take(2 * SLOT as u64).read_to_end(&mut bytes)?;
        let newest = bytes.chunks_exact(SLOT).filter_map(decode).max_by_key(|&(generation, _)| generation);
        let (generation, acked) = newest.unwrap_or((0, 0));
        Ok(Ledger { file, generation, acked, unsynced: false })
    }

    /// The acknowledged position: every record below it has been acknowledged.
    pub(super) fn acked(&self) -> u64 {
        self.acked
    }

    /// Records `acked` in the older slot, with an fsync when `sync`.
    pub(super) fn write(&mut self, acked: u64, sync: bool) -> io::Result<()> {
        let generation = self.generation + 1;
        self.file.seek(SeekFrom::Start(generation % 2 * SLOT as u64))?;
        self.unsynced = true;
        self.file.write_all(&encode(generation, acked))?;
        // Only a complete write moves on: after a failure the next attempt rewrites the same (spoilt) slot, and
        // the other one still holds the previous position.
        self.generation = generation;
        self.acked = acked;
        if sync {
            self.sync()?;
        }
        Ok(())
    }

    /// Makes the last write durable (no-op when it already is).
    pub(super) fn sync(&mut self) -> io::Result<()> {
        if self.unsynced {
            self.file.sync_data()?;
            self.unsynced = false;
        }
        Ok(())
    }
}

fn encode(generation: u64, acked: u64) -> [u8; SLOT] {
    let mut slot = [0u8; SLOT];
    slot[..8].copy_from_slice(&generation.to_le_bytes());
    slot[8..16].copy_from_slice(&acked.to_le_bytes());
    let crc = crc32c::crc32c(&slot[..16]);
    slot[16..20].copy_from_slice(&crc.to_le_bytes());
    slot
}

/// `(generation, acked)` of a valid slot.
fn decode(slot: &[u8]) -> Option<(u64, u64)> {
    let crc = u32::from_le_bytes(slot[16..20].try_into().expect("4 bytes"));
    if crc32c::crc32c(&slot[..16]) != crc {
        return None;
    }
    let generation = u64::from_le_bytes(slot[..8].try_into().expect("8 bytes"));
    let acked = u64::from_le_bytes(slot[8..16].try_into().expect("8 bytes"));
    Some((generation, acked))
}
