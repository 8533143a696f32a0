//! The disk spill: an append-only, checksummed log between the memory queue and the sink.

#[allow(dead_code)]
pub(crate) mod log;
