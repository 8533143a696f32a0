//! The segment log (stub with the agreed interface; replaced by the real one).
use std::path::{Path, PathBuf};

pub(crate) struct LogOptions {
    pub(crate) segment_bytes: u64,
    pub(crate) max_bytes: u64,
}
pub(crate) struct Log;
pub(crate) struct Recovered {
    pub(crate) unacked: u64,
    pub(crate) corrupt: u64,
    pub(crate) torn_bytes: u64,
}
#[derive(Debug, thiserror::Error)]
pub(crate) enum OpenError {
    #[error("locked {}", dir.display())]
    Locked { dir: PathBuf },
    #[error("io {}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
}
impl Log {
    pub(crate) fn open(_dir: &Path, _options: LogOptions) -> Result<(Log, Recovered), OpenError> {
        unimplemented!()
    }
    pub(crate) fn append(&mut self, _records: &[&[u8]]) -> std::io::Result<usize> {
        unimplemented!()
    }
    pub(crate) fn sync(&mut self) -> std::io::Result<()> {
        unimplemented!()
    }
    pub(crate) fn read(&mut self, _max: usize, _out: &mut Vec<(u64, Vec<u8>)>) -> std::io::Result<u64> {
        unimplemented!()
    }
    pub(crate) fn ack(&mut self, _upto: u64, _sync: bool) -> std::io::Result<()> {
        unimplemented!()
    }
    pub(crate) fn end(&self) -> u64 {
        unimplemented!()
    }
    pub(crate) fn acked(&self) -> u64 {
        unimplemented!()
    }
    pub(crate) fn read_pos(&self) -> u64 {
        unimplemented!()
    }
    pub(crate) fn disk_bytes(&self) -> u64 {
        unimplemented!()
    }
    pub(crate) fn rewind(&mut self) {}
}
pub(crate) fn write_file_atomically(_dir: &Path, _name: &str, _bytes: &[u8]) -> std::io::Result<()> {
    unimplemented!()
}
