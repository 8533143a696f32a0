//! The worker's side of the spill: opening (with recovery) when the layer is built, and appending stamped
//! batches. The log's file I/O runs on Tokio's blocking pool, never on the runtime's workers.

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use uuid::Uuid;

use super::codec::{self, Origin};
use super::log::{Log, LogOptions, OpenError, write_file_atomically};
use super::{Spill, SyncPolicy};
use crate::error::ConfigError;
use crate::event::AuditEvent;
use crate::lifecycle::{Last, Previous};

/// The file that says which boot last used the directory and whether it ended cleanly.
const BOOT_FILE: &str = "boot.json";

/// Appends `records` in order: the `forced` ones whatever the budget, the others while the budget allows
/// (one no budget could ever hold is skipped). Which were appended.
/// An I/O error ends it: what was appended before it is still said.
fn append_records(log: &mut Log, records: &[&[u8]], forced: &[bool]) -> (Vec<bool>, Option<io::Error>) {
    let mut appended = vec![false; records.len()];
    let (mut i, mut full) = (0, false);
    while i < records.len() {
        if forced[i] {
            if let Err(error) = log.append_beyond_budget(&records[i..=i]) {
                return (appended, Some(error));
            }
            appended[i] = true;
            i += 1;
            continue;
        }
        // A run of ordinary records that could fit, up to the next forced one.
        let run = i + records[i..].iter().zip(&forced[i..]).take_while(|(r, f)| !**f && log.could_hold(r)).count();
        if run > i && !full {
            match log.append(&records[i..run]) {
                Ok(n) => {
                    appended[i..i + n].iter_mut().for_each(|a| *a = true);
                    full = i + n < run;
                }
                Err(error) => return (appended, Some(error)),
            }
        }
        // Past the run: a record no budget could hold (skipped), or a forced one.
        i = if run > i { run } else { i + 1 };
    }
    (appended, None)
}

/// The log, shared by the appending worker and the draining task (each call holds the lock briefly).
#[derive(Clone)]
pub(crate) struct SharedLog(Arc<Mutex<Log>>);

impl SharedLog {
    fn lock(&self) -> MutexGuard<'_, Log> {
        // A panic inside a log call leaves the log as consistent as an I/O error would; go on.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `f` on the log on the blocking pool.
    pub(crate) async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Log) -> io::Result<T> + Send + 'static,
    ) -> io::Result<T> {
        let log = self.clone();
        match tokio::task::spawn_blocking(move || f(&mut log.lock())).await {
            Ok(result) => result,
            Err(join) => Err(io::Error::other(format!("spill I/O task failed: {join}"))),
        }
    }
}

/// What the worker and the drain share besides the log.
#[derive(Debug, Default)]
pub(crate) struct Progress {
    /// Appended: wakes the drain.
    pub(crate) appended: Notify,
    /// Events (the worker's own not counted) in the spill that the sink has not confirmed yet.
    pub(crate) in_spill: AtomicU64,
}

/// The spill as opened by `build`: the appending half, the drain's share, and what recovery found.
pub(crate) struct Opened {
    pub(crate) spool: Spool,
    pub(crate) log: SharedLog,
    pub(crate) progress: Arc<Progress>,
    pub(crate) previous: Previous,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct BootFile {
    boot: Uuid,
    instance: String,
    clean: bool,
}

/// Opens (and recovers) the spill for the boot `boot`: takes the directory's lock, cuts a torn tail, counts
/// what is to be replayed, and records that `boot` now uses the directory (not cleanly ended, yet).
pub(crate) fn open(spill: &Spill, instance: &str, boot: Uuid) -> Result<Opened, ConfigError> {
    // Segments at most a quarter of the budget, so acknowledged ones give room back before the budget is reached.
    let segment_bytes = spill.segment_bytes.min((spill.max_bytes / 4).max(1));
    let options = LogOptions { segment_bytes, max_bytes: spill.max_bytes };
    let (mut log, recovered) = Log::open(&spill.dir, options).map_err(|e| match e {
        OpenError::Locked { dir } => ConfigError::SpillLocked { dir },
        OpenError::Io { path, source } => ConfigError::SpillIo { path, source },
    })?;
    let io_error = |path: PathBuf| move |source| ConfigError::SpillIo { path, source };
    // Count the events to replay (one read through the backlog, which recovery has just read: page cache). The
    // log reports each corrupt record once, at open or at the first read that meets it.
    let (mut replayed, mut corrupt, mut records) = (0, recovered.corrupt, Vec::new());
    loop {
        corrupt += log.read(4096, &mut records).map_err(io_error(spill.dir.clone()))?;
        if records.is_empty() {
            break;
        }
        replayed += records.iter().filter(|(_, payload)| codec::origin(payload) == Some(Origin::User)).count() as u64;
    }
    log.rewind();

    let boot_path = spill.dir.join(BOOT_FILE);
    let last = match std::fs::read(&boot_path) {
        Ok(bytes) => match serde_json::from_slice::<BootFile>(&bytes) {
            Ok(b) => Last::Boot(b.boot, b.clean),
            Err(_) => Last::Unknown,
        },
        // No boot file: no boot used the directory, unless records say otherwise.
        Err(e) if e.kind() == io::ErrorKind::NotFound && replayed + corrupt == 0 => Last::None,
        Err(e) if e.kind() == io::ErrorKind::NotFound => Last::Unknown,
        Err(e) => return Err(io_error(boot_path)(e)),
    };
    let spool = Spool {
        log: SharedLog(Arc::new(Mutex::new(log))),
        policy: spill.sync,
        dir: spill.dir.clone(),
        state: BootFile { boot, instance: instance.to_owned(), clean: false },
        buf: Vec::new(),
        ends: Vec::new(),
        sync_at: None,
        syncing: None,
        progress: Arc::new(Progress { in_spill: AtomicU64::new(replayed), ..Progress::default() }),
    };
    spool.write_boot_file().map_err(io_error(boot_path))?;
    Ok(Opened {
        log: spool.log.clone(),
        progress: Arc::clone(&spool.progress),
        previous: Previous { boot: last, replayed, corrupt, torn_bytes: recovered.torn_bytes },
        spool,
    })
}

/// The appending half of the spill, owned by the worker.
pub(crate) struct Spool {
    log: SharedLog,
    policy: SyncPolicy,
    dir: PathBuf,
    state: BootFile,
    /// The encoded batch, reused: payloads back to back, `ends[i]` where payload `i` ends.
    buf: Vec<u8>,
    ends: Vec<usize>,
    /// When the appends not yet synced are to be (under `SyncPolicy::Interval`).
    sync_at: Option<Instant>,
    /// An interval sync running on the blocking pool, without the log's lock.
    syncing: Option<tokio::task::JoinHandle<io::Result<()>>>,
    pub(crate) progress: Arc<Progress>,
}

impl Spool {
    /// Appends `events` (the first `origins.len()` of them the worker's own, of those origins; the rest users')
    /// and syncs under [`SyncPolicy::EveryBatch`]. Says which were appended. Lifecycle events (a boot's first
    /// and last) are appended whatever the disk budget; the others in order as long as the budget allows, except
    /// one that no budget could hold (skipped).
    /// An I/O error is returned with what was appended before it (a failed sync leaves all of it appended).
    pub(crate) async fn append(
        &mut self,
        events: &[AuditEvent],
        origins: &[Origin],
    ) -> io::Result<(Vec<bool>, Option<io::Error>)> {
        let (mut buf, mut ends) = (std::mem::take(&mut self.buf), std::mem::take(&mut self.ends));
        buf.clear();
        ends.clear();
        let origin = |i: usize| origins.get(i).copied().unwrap_or(Origin::User);
        for (i, event) in events.iter().enumerate() {
            codec::encode(event, origin(i), &mut buf);
            ends.push(buf.len());
        }
        let forced: Vec<bool> = (0..events.len()).map(|i| origin(i) == Origin::Lifecycle).collect();
        let users: Vec<bool> = (0..events.len()).map(|i| origin(i) == Origin::User).collect();
        let sync_now = self.policy == SyncPolicy::EveryBatch;
        let progress = Arc::clone(&self.progress);
        let (result, buf, ends) = self
            .log
            .with(move |log| {
                let mut start = 0;
                let records: Vec<&[u8]> = ends
                    .iter()
                    .map(|&end| {
                        let record = &buf[start..end];
                        start = end;
                        record
                    })
                    .collect();
                let (appended, mut error) = append_records(log, &records, &forced);
                // Counted under the log's lock, so the drain cannot deliver (and subtract) them first.
                let n = appended.iter().zip(&users).filter(|(a, u)| **a && **u).count();
                progress.in_spill.fetch_add(n as u64, SeqCst);
                if error.is_none() && sync_now && appended.contains(&true) {
                    error = log.sync().err();
                }
                drop(records);
                Ok(((appended, error), buf, ends))
            })
            .await?;
        (self.buf, self.ends) = (buf, ends);
        let (appended, error) = result;
        if appended.contains(&true) {
            if let (SyncPolicy::Interval(d), None) = (self.policy, self.sync_at) {
                // `Interval(Duration::MAX)` means "at shutdown"; a year is as good.
                self.sync_at = Some(Instant::now() + d.min(Duration::from_secs(365 * 24 * 3600)));
            }
            self.progress.appended.notify_one();
        }
        Ok((appended, error))
    }

    /// When the appends not yet synced must be (under [`SyncPolicy::Interval`]).
    pub(crate) fn sync_due(&self) -> Option<Instant> {
        self.sync_at
    }

    /// Starts syncing what was appended, in the background: the fsyncs run without the log's lock, so the
    /// worker keeps appending meanwhile (a slow fsync must not hold up the memory queue). While the last one
    /// still runs, tries again shortly.
    pub(crate) async fn start_sync(&mut self) {
        if self.syncing.as_ref().is_some_and(|task| !task.is_finished()) {
            self.sync_at = Some(Instant::now() + Duration::from_millis(10));
            return;
        }
        self.sync_at = None;
        self.finish_sync().await;
        match self.log.with(Log::sync_work).await {
            Ok(work) => self.syncing = Some(tokio::task::spawn_blocking(move || work.run())),
            Err(error) => tracing::error!(%error, "cannot sync the audit spill"),
        }
    }

    /// Waits for a background sync, and says if it failed.
    async fn finish_sync(&mut self) {
        if let Some(task) = self.syncing.take() {
            match task.await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => tracing::error!(%error, "cannot sync the audit spill"),
                Err(error) => tracing::error!(%error, "the audit spill's sync task failed"),
            }
        }
    }

    /// The position the next appended record gets.
    pub(crate) async fn end(&self) -> u64 {
        self.log.with(|log| Ok(log.end())).await.unwrap_or(0)
    }

    /// Syncs everything appended, waiting for it (at shutdown).
    pub(crate) async fn sync(&mut self) -> io::Result<()> {
        self.sync_at = None;
        self.finish_sync().await;
        self.log.with(Log::sync).await
    }

    /// Makes what was appended durable: nothing to do under [`SyncPolicy::EveryBatch`] (`append` synced),
    /// a sync otherwise.
    pub(crate) async fn sync_for_durable(&mut self) -> io::Result<()> {
        if self.policy == SyncPolicy::EveryBatch { Ok(()) } else { self.sync().await }
    }

    /// Records that this boot ended cleanly: its `audit.shutdown` event is in the spill.
    pub(crate) async fn mark_clean(&mut self) -> io::Result<()> {
        self.state.clean = true;
        let (dir, bytes) = (self.dir.clone(), serde_json::to_vec(&self.state).map_err(io::Error::other)?);
        self.log.with(move |_| write_file_atomically(&dir, BOOT_FILE, &bytes)).await
    }

    fn write_boot_file(&self) -> io::Result<()> {
        write_file_atomically(&self.dir, BOOT_FILE, &serde_json::to_vec(&self.state).map_err(io::Error::other)?)
    }
}
