//! The worker's chain stage: links every stamped event to the one before it in the boot (`prev_hash`, `hash`),
//! and signs a checkpoint into each `audit.checkpoint` and `audit.shutdown` event as it links it. Copies of the
//! signed events go to the checkpoint sink, from a task of its own.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::note::Checkpoint;
use super::{Integrity, hash_with};
use crate::event::{AuditEvent, Hash, kind};
use crate::pipeline::Shared;
use crate::sink::DynSink;
use crate::spill::log::write_file_atomically;
use crate::stats::add;

/// Checkpoints waiting for the checkpoint sink; past this, the oldest wait is not worth keeping a newer one
/// out: a newer checkpoint covers everything an older one of the same boot does.
const ANCHOR_QUEUE: usize = 16;
/// How long the checkpoint sink gets per checkpoint, and how many tries.
const ANCHOR_TIMEOUT: Duration = Duration::from_secs(10);
const ANCHOR_TRIES: u32 = 3;

pub(crate) struct Chain {
    integrity: Integrity,
    head: Hash,
    head_seq: u64,
    /// Events linked since the last checkpoint.
    since: u64,
    last: Instant,
    buf: Vec<u8>,
    anchor: Option<Anchor>,
    shared: Arc<Shared>,
    /// With a spill: the directory where the last checkpoint is kept for the next boot.
    keep: Option<PathBuf>,
}

/// The checkpoint sink's task, what feeds it, and how many checkpoints it was given and has not finished with.
struct Anchor {
    tx: mpsc::Sender<AuditEvent>,
    task: JoinHandle<()>,
    pending: Arc<AtomicU64>,
}

/// The file in a spill directory that holds the last checkpoint signed there (a signed note).
pub(crate) const CHECKPOINT_FILE: &str = "checkpoint.note";

impl Chain {
    /// A chain for a new boot; spawns the checkpoint sink's task if there is one.
    /// With a spill directory (`keep`), the previous boot's last checkpoint is read from it (unless one was
    /// given), and each new checkpoint is kept there.
    pub(crate) fn start(mut integrity: Integrity, shared: Arc<Shared>, keep: Option<PathBuf>) -> Self {
        if integrity.previous.is_none()
            && let Some(dir) = &keep
        {
            integrity.previous = std::fs::read_to_string(dir.join(CHECKPOINT_FILE))
                .ok()
                .and_then(|note| Checkpoint::from_note(&note).ok());
        }
        let anchor = integrity.sink.clone().map(|sink| {
            let (tx, rx) = mpsc::channel(ANCHOR_QUEUE);
            let pending = Arc::new(AtomicU64::new(0));
            let task = tokio::spawn(anchor(rx, sink, Arc::clone(&shared), Arc::clone(&pending)));
            Anchor { tx, task, pending }
        });
        Chain {
            integrity,
            head: Hash::ZERO,
            head_seq: 0,
            since: 0,
            last: Instant::now(),
            buf: Vec::with_capacity(1024),
            anchor,
            shared,
            keep,
        }
    }

    /// Whether a checkpoint is due: `every` events linked since the last one, or `interval` passed (a heartbeat,
    /// with traffic or without).
    pub(crate) fn due(&self) -> bool {
        self.since >= self.integrity.every || self.last.elapsed() >= self.integrity.interval
    }

    /// A checkpoint event to write; it is signed when linked (it covers the chain up to the event before it).
    pub(crate) fn checkpoint_event() -> AuditEvent {
        AuditEvent::with_time(kind::AUDIT_CHECKPOINT.into(), SystemTime::now())
    }

    /// Links a stamped event; signs it first if it is a checkpoint (`audit.checkpoint`, `audit.shutdown`).
    pub(crate) fn link(&mut self, event: &mut AuditEvent) {
        let checkpoint = matches!(&*event.kind, kind::AUDIT_CHECKPOINT | kind::AUDIT_SHUTDOWN);
        if &*event.kind == kind::AUDIT_BOOT
            && let Some(previous) = self.integrity.previous.take()
        {
            previous.to_boot_event(event);
        }
        if checkpoint {
            let signed = Checkpoint::sign(
                event.instance.as_deref().unwrap_or_default(),
                event.boot.unwrap_or_default(),
                self.head_seq,
                self.head,
                event.time,
                &self.integrity.key_name,
                &self.integrity.key,
            );
            signed.to_event(event);
            if let Some(dir) = &self.keep
                && let Err(error) = write_file_atomically(dir, CHECKPOINT_FILE, signed.to_note().as_bytes())
            {
                tracing::warn!(%error, "cannot keep the last checkpoint in the spill directory");
            }
            (self.since, self.last) = (0, Instant::now());
            add(&self.shared.counters.checkpoints, 1);
        } else {
            self.since += 1;
        }
        self.head = link_after(self.head, event, &mut self.buf);
        self.head_seq = event.seq;
        if checkpoint && let Some(anchor) = &self.anchor {
            // A full queue means the sink is far behind: this checkpoint is counted as not anchored (a later one
            // covers what it covers).
            anchor.pending.fetch_add(1, Relaxed);
            if anchor.tx.try_send(event.clone()).is_err() {
                anchor.pending.fetch_sub(1, Relaxed);
                add(&self.shared.counters.anchor_failed, 1);
            }
        }
    }
}

/// Links `event` after `head` (`prev_hash`, `hash`); returns its hash, the new head.
fn link_after(head: Hash, event: &mut AuditEvent, buf: &mut Vec<u8>) -> Hash {
    event.prev_hash = Some(head);
    let hash = hash_with(&head, event, buf);
    event.hash = Some(hash);
    hash
}

/// A batch of the application's events linked after `head` away from the chain (on another thread, while the
/// sink writes the batch before it), to be taken into it with [`Chain::advance`] once that batch is written.
pub(crate) struct LinkedAhead {
    pub(crate) events: Vec<AuditEvent>,
    head: Hash,
}

impl LinkedAhead {
    /// Links `events` (none of them the pipeline's own) after `head`.
    pub(crate) fn link(head: Hash, mut events: Vec<AuditEvent>) -> Self {
        let mut buf = Vec::with_capacity(1024);
        let head = events.iter_mut().fold(head, |head, event| link_after(head, event, &mut buf));
        LinkedAhead { events, head }
    }
}

impl Chain {
    /// The hash of the last event linked.
    pub(crate) fn head(&self) -> Hash {
        self.head
    }

    /// Takes a batch linked ahead from [`head`](Self::head) into the chain: it was linked as if by
    /// [`link`](Self::link), one event after the other. Its events are handed back.
    pub(crate) fn advance(&mut self, ahead: LinkedAhead) -> Vec<AuditEvent> {
        if let Some(last) = ahead.events.last() {
            (self.head, self.head_seq) = (ahead.head, last.seq);
            self.since += ahead.events.len() as u64;
        }
        ahead.events
    }
}

impl Chain {
    /// At shutdown: lets the checkpoint sink take what it was given, the shutdown's checkpoint included, until
    /// `deadline` (or [`ANCHOR_TIMEOUT`] without one). What it has not taken by then is counted in
    /// `anchor_failed`.
    pub(crate) async fn finish(mut self, deadline: Option<Instant>) {
        let Some(Anchor { tx, task, pending }) = self.anchor.take() else { return };
        drop(tx);
        let until = deadline.unwrap_or_else(|| Instant::now() + ANCHOR_TIMEOUT);
        let abort = task.abort_handle();
        if tokio::time::timeout_at(until, task).await.is_err() {
            abort.abort();
            let left = pending.swap(0, Relaxed);
            tracing::error!(left, "checkpoint sink still writing at the shutdown deadline; those are not anchored");
            add(&self.shared.counters.anchor_failed, left);
        }
    }
}

/// Writes each checkpoint to the checkpoint sink, a few tries each, bounded in time; counts what failed.
async fn anchor(
    mut rx: mpsc::Receiver<AuditEvent>,
    sink: Arc<dyn DynSink>,
    shared: Arc<Shared>,
    pending: Arc<AtomicU64>,
) {
    while let Some(event) = rx.recv().await {
        let mut written = false;
        for _ in 0..ANCHOR_TRIES {
            match tokio::time::timeout(ANCHOR_TIMEOUT, sink.write_batch(std::slice::from_ref(&event))).await {
                Ok(Ok(())) => {
                    written = true;
                    break;
                }
                Ok(Err(error)) => tracing::warn!(%error, seq = event.seq, "checkpoint sink failed"),
                Err(_) => tracing::warn!(seq = event.seq, "checkpoint sink timed out"),
            }
        }
        if !written {
            tracing::error!(seq = event.seq, "checkpoint not anchored: the checkpoint sink failed every try");
            add(&shared.counters.anchor_failed, 1);
        }
        pending.fetch_sub(1, Relaxed);
    }
    let _ = sink.flush().await;
}
