//! The disk spill: an append-only, checksummed log between the memory queue and the sink, so an outage of
//! the sink or a crash of the process loses no event that reached the disk.

use std::path::{Path, PathBuf};
use std::time::Duration;

pub(crate) mod codec;
pub(crate) mod drain;
pub(crate) mod log;
pub(crate) mod spool;

/// A disk spill for a pipeline, given to [`AuditLayerBuilder::spill`](crate::AuditLayerBuilder::spill).
///
/// With a spill, the worker appends every batch (stamped: ids, `instance`, `boot` and `seq` assigned) to a log
/// in `dir` before it hands the batch to the sink, and marks it acknowledged once the sink confirms it. So:
///
/// - **The sink can be down for as long as the disk budget lasts.** The worker keeps moving events from the
///   memory queue into the log, so the queue does not overflow; when the sink is back, the backlog is replayed
///   oldest first, in full batches, while new events keep being appended. Memory stays bounded: the backlog is
///   on disk. Past [`max_bytes`](Self::max_bytes), events are dropped, counted in
///   [`Stats::spill_full`](crate::Stats::spill_full) and reported by an `audit.gap` event.
/// - **A crash loses only what was not on disk yet.** A pipeline built on the same directory later recovers
///   the log (a torn tail is cut, a record that fails its checksum is skipped and counted as `corrupt`) and
///   replays everything not acknowledged; its `audit.boot` event names the previous boot and whether it ended
///   cleanly. Sinks write by event id idempotently (Postgres, SQLite), so a batch the sink took just before a
///   crash, but whose acknowledgement did not reach the disk, is not written twice there. (A JSON-lines sink
///   is append-only: it can hold such a batch twice.)
/// - **Retries do not end**: a batch is retried (with the [`Retry`](crate::Retry) backoff) until the sink
///   takes it or shutdown's deadline passes; what is left then stays in the spill for the next boot
///   ([`Stats::left_in_spill`](crate::Stats::left_in_spill)). A fallback sink would never be used, so a
///   pipeline cannot have both.
///
/// What each [`SyncPolicy`] loses on a crash of the process and on a power loss is said there.
///
/// One pipeline owns a directory at a time: a lock file (`dir/LOCK`) makes a second
/// [`build`](crate::AuditLayerBuilder::build) on it fail with [`ConfigError::SpillLocked`](crate::ConfigError::SpillLocked).
///
/// ```no_run
/// # #[tokio::main]
/// # async fn main() -> Result<(), tower_audit::ConfigError> {
/// use std::time::Duration;
/// use tower_audit::{AuditLayer, MemorySink, Spill, SyncPolicy};
///
/// let (layer, handle) = AuditLayer::builder(MemorySink::new())
///     .spill(Spill::new("/var/lib/my-service/audit-spill").sync(SyncPolicy::EveryBatch).max_bytes(256 << 20))
///     .build()?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Spill {
    pub(crate) dir: PathBuf,
    pub(crate) sync: SyncPolicy,
    pub(crate) max_bytes: u64,
    pub(crate) segment_bytes: u64,
}

/// When the spill's appends are made durable with `fdatasync`.
///
/// A process crash (a panic that aborts, `kill -9`, an OOM kill) loses nothing that was appended, under
/// either policy: the operating system still holds the written pages. What can be lost on a crash is only
/// what had not reached the spill yet: events in the memory queue (at most a batch interval's worth, see
/// [`flush_interval`](crate::AuditLayerBuilder::flush_interval)). A power loss (or a kernel crash) also loses
/// what was appended but not yet synced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncPolicy {
    /// Sync after every append, before the sink is called: on a power loss nothing the sink has seen is lost
    /// from the spill. Costs one `fdatasync` per batch.
    EveryBatch,
    /// Sync at most this long after an append (and at shutdown): on a power loss, up to this much of the most
    /// recent appends can be lost.
    Interval(Duration),
}

impl Default for SyncPolicy {
    /// `Interval(200 ms)`.
    fn default() -> Self {
        SyncPolicy::Interval(DEFAULT_SYNC_INTERVAL)
    }
}

/// The default [`SyncPolicy::Interval`].
pub const DEFAULT_SYNC_INTERVAL: Duration = Duration::from_millis(200);
/// The default [`Spill::max_bytes`]: 1 GiB.
pub const DEFAULT_SPILL_MAX_BYTES: u64 = log::DEFAULT_MAX_BYTES;
/// The default [`Spill::segment_bytes`]: 64 MiB.
pub const DEFAULT_SEGMENT_BYTES: u64 = log::DEFAULT_SEGMENT_BYTES;

impl Spill {
    /// A spill in `dir` (created if missing), with [`SyncPolicy::default`], [`DEFAULT_SPILL_MAX_BYTES`] and
    /// [`DEFAULT_SEGMENT_BYTES`].
    pub fn new(dir: impl AsRef<Path>) -> Self {
        Spill {
            dir: dir.as_ref().to_owned(),
            sync: SyncPolicy::default(),
            max_bytes: DEFAULT_SPILL_MAX_BYTES,
            segment_bytes: DEFAULT_SEGMENT_BYTES,
        }
    }

    /// When appends are synced to disk.
    pub fn sync(mut self, policy: SyncPolicy) -> Self {
        self.sync = policy;
        self
    }

    /// The disk budget: the segment files together (the unacknowledged backlog and the segment being written)
    /// never hold more; past it, events are dropped and counted.
    pub fn max_bytes(mut self, bytes: u64) -> Self {
        self.max_bytes = bytes;
        self
    }

    /// A segment file is closed and a new one started once it holds this many bytes (at most a quarter of
    /// [`max_bytes`](Self::max_bytes), so that deleting acknowledged segments gives room back in time); a
    /// segment is deleted once the sink has confirmed every record in it.
    pub fn segment_bytes(mut self, bytes: u64) -> Self {
        self.segment_bytes = bytes;
        self
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}
