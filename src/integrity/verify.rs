//! The verifier: reads a trail back and names every way it was tampered with (the rules are on [`verify`]).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;

use serde::Serialize;
use uuid::Uuid;

use super::hash_with;
use super::note::{Checkpoint, CheckpointError, VerifierKey};
use crate::event::{AuditEvent, Hash, kind};

/// Pairs of suspicious rows tried as swapped contents, at most, per boot (the check is quadratic).
const MAX_SWAP_CANDIDATES: usize = 256;

/// Reasons an `audit.gap` event counts that drop an event before the worker numbers it: they leave no hole in
/// the seqs.
const UNNUMBERED_LOSSES: [&str; 4] = ["queue_full", "queue_bytes", "wait_timeout", "closed"];

/// One way a boot's trail is not intact. See [`verify`](verify()) for the exact rule behind each.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "finding", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Finding {
    /// The row's stored hash does not match its content (or its hash was recomputed after an edit, or its
    /// `prev_hash` was edited).
    Altered {
        /// The row.
        seq: u64,
    },
    /// No row holds these seqs, and no `audit.gap` event declares them lost.
    Missing {
        /// The first seq missing.
        from: u64,
        /// The last seq missing.
        to: u64,
    },
    /// A row that does not belong to the chain.
    Inserted {
        /// The seq it claims.
        seq: u64,
    },
    /// Rows whose places were swapped.
    Reordered {
        /// The seqs of the rows out of place, ascending.
        seqs: Vec<u64>,
    },
    /// The chain is consistent, but a checkpoint signs another hash at `to`: something in `from..=to` was edited
    /// and the hashes after it recomputed.
    Rewritten {
        /// One past the last seq a checkpoint vouched for.
        from: u64,
        /// The seq whose hash the checkpoint signs.
        to: u64,
    },
    /// The boot's rows end before the seq a trusted checkpoint covers: the newest rows were deleted.
    Truncated {
        /// The last seq left (0 when none is).
        after: u64,
        /// The seq the trusted checkpoint covers.
        expected: u64,
    },
    /// A checkpoint event whose signature does not verify: it was altered or forged.
    BadSignature {
        /// The checkpoint event's seq.
        seq: u64,
    },
    /// A checkpoint event signed by another key than the verifier's.
    WrongKey {
        /// The checkpoint event's seq.
        seq: u64,
        /// The key it names (`<name>+<key id>`).
        key: String,
    },
    /// A checkpoint event that cannot be read, or signs another seq than the one before it.
    BadCheckpoint {
        /// The checkpoint event's seq.
        seq: u64,
        /// What is wrong with it.
        reason: String,
    },
    /// A copy of an event of another boot.
    ReplayedFromOtherBoot {
        /// The seq it holds in this boot.
        seq: u64,
        /// The boot it was copied from.
        boot: Uuid,
    },
    /// Rows without a hash: nothing about them can be verified.
    Unchained {
        /// The first seq of the range.
        from: u64,
        /// The last.
        to: u64,
    },
}

impl Finding {
    /// The first seq the finding concerns (for [`Truncated`](Finding::Truncated), the first seq missing).
    pub fn seq(&self) -> u64 {
        match self {
            Finding::Altered { seq }
            | Finding::Inserted { seq }
            | Finding::BadSignature { seq }
            | Finding::WrongKey { seq, .. }
            | Finding::BadCheckpoint { seq, .. }
            | Finding::ReplayedFromOtherBoot { seq, .. } => *seq,
            Finding::Missing { from, .. } | Finding::Rewritten { from, .. } | Finding::Unchained { from, .. } => *from,
            Finding::Reordered { seqs } => seqs.first().copied().unwrap_or_default(),
            Finding::Truncated { after, .. } => after + 1,
        }
    }
}

impl Finding {
    /// The order of findings at one seq: the declaration order.
    fn rank(&self) -> u8 {
        match self {
            Finding::Altered { .. } => 0,
            Finding::Missing { .. } => 1,
            Finding::Inserted { .. } => 2,
            Finding::Reordered { .. } => 3,
            Finding::Rewritten { .. } => 4,
            Finding::Truncated { .. } => 5,
            Finding::BadSignature { .. } => 6,
            Finding::WrongKey { .. } => 7,
            Finding::BadCheckpoint { .. } => 8,
            Finding::ReplayedFromOtherBoot { .. } => 9,
            Finding::Unchained { .. } => 10,
        }
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Finding::Altered { seq } => {
                write!(f, "altered: seq {seq} does not hash to its stored hash, or its link was edited")
            }
            Finding::Missing { from, to } if from == to => write!(f, "missing: seq {from} is absent"),
            Finding::Missing { from, to } => write!(f, "missing: seqs {from}..={to} are absent"),
            Finding::Inserted { seq } => write!(f, "inserted: a row at seq {seq} does not belong to the chain"),
            Finding::Reordered { seqs } => write!(f, "reordered: seqs {seqs:?} are out of place"),
            Finding::Rewritten { from, to } => write!(
                f,
                "rewritten: a signed checkpoint disagrees with the hash at seq {to}; an event in {from}..={to} was \
                 edited and the hashes recomputed"
            ),
            Finding::Truncated { after, expected } => {
                write!(f, "truncated: the trail ends at seq {after}, a trusted checkpoint covers up to seq {expected}")
            }
            Finding::BadSignature { seq } => write!(f, "bad signature: the checkpoint at seq {seq} does not verify"),
            Finding::WrongKey { seq, key } => write!(f, "wrong key: the checkpoint at seq {seq} is signed by {key}"),
            Finding::BadCheckpoint { seq, reason } => write!(f, "bad checkpoint at seq {seq}: {reason}"),
            Finding::ReplayedFromOtherBoot { seq, boot } => {
                write!(f, "replayed: seq {seq} is a copy of an event of boot {boot}")
            }
            Finding::Unchained { from, to } => write!(f, "unchained: seqs {from}..={to} carry no hash"),
        }
    }
}

/// A range of seqs, both ends included.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct SeqRange {
    /// The first seq.
    pub from: u64,
    /// The last seq.
    pub to: u64,
}

/// What the verifier found about one boot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct BootReport {
    /// The boot (`None` for rows without one: written before schema version 2).
    pub boot: Option<Uuid>,
    /// Its instance, as its first row names it.
    pub instance: Option<String>,
    /// Rows read, duplicates dropped.
    pub events: u64,
    /// Identical rows dropped (a retried batch).
    pub duplicates: u64,
    /// The lowest and the highest seq read (0 when no row is left).
    pub first_seq: u64,
    /// See [`first_seq`](Self::first_seq).
    pub last_seq: u64,
    /// The highest seq a checkpoint that verifies and matches the trail covers (0 when none).
    pub signed_to: u64,
    /// Every event from seq 1 up to this one is proven intact: covered by [`signed_to`](Self::signed_to), and
    /// no finding lies at or before it.
    pub verified_to: u64,
    /// Checkpoints in the trail that verify and match it.
    pub checkpoints: u64,
    /// Whether the boot ends with its `audit.shutdown` event, verified.
    pub clean_shutdown: bool,
    /// Seqs absent from the trail that an `audit.gap` event declares lost (not a finding).
    pub lost: Vec<SeqRange>,
    /// Everything wrong, by ascending seq.
    pub findings: Vec<Finding>,
}

impl BootReport {
    /// Whether nothing is wrong with this boot.
    pub fn ok(&self) -> bool {
        self.findings.is_empty()
    }
}

/// A trusted checkpoint that does not verify with the key (so it was not used).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rejected {
    /// The boot it names.
    pub boot: Uuid,
    /// The seq it covers.
    pub seq: u64,
    /// Why it was rejected.
    pub reason: String,
}

/// A record that could not be read as an event (a malformed line, an unreadable row).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Unreadable {
    /// Where: the line number of a file (from 1), or the row's position.
    pub at: u64,
    /// Why.
    pub error: String,
}

/// What [`verify`] found: one report per boot, ordered by boot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Report {
    /// The verifier key's label (`<name>+<key id>`).
    pub key: String,
    /// Per boot, ordered by boot id (time-ordered UUIDv7, so by start); rows without a boot first.
    pub boots: Vec<BootReport>,
    /// Trusted checkpoints that did not verify.
    pub rejected: Vec<Rejected>,
    /// Records that could not be read.
    pub unreadable: Vec<Unreadable>,
}

impl Report {
    /// True only when everything holds: no finding in any boot, no rejected checkpoint, no unreadable record.
    pub fn ok(&self) -> bool {
        self.boots.iter().all(BootReport::ok) && self.rejected.is_empty() && self.unreadable.is_empty()
    }

    /// Every finding with its boot.
    pub fn findings(&self) -> impl Iterator<Item = (Option<Uuid>, &Finding)> {
        self.boots.iter().flat_map(|b| b.findings.iter().map(move |f| (b.boot, f)))
    }

    /// Events read, over every boot.
    pub fn events(&self) -> u64 {
        self.boots.iter().map(|b| b.events).sum()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for boot in &self.boots {
            let name = boot.boot.map_or_else(|| "(no boot)".to_owned(), |b| b.to_string());
            writeln!(
                f,
                "boot {name} ({}): {} events, seq {}..={}; verified to seq {}, signed to seq {} by {} checkpoints{}{}",
                boot.instance.as_deref().unwrap_or("no instance"),
                boot.events,
                boot.first_seq,
                boot.last_seq,
                boot.verified_to,
                boot.signed_to,
                boot.checkpoints,
                if boot.clean_shutdown { ", ended cleanly" } else { ", no clean shutdown" },
                if boot.ok() { ": OK" } else { ": NOT OK" },
            )?;
            if boot.duplicates > 0 {
                writeln!(f, "  {} duplicate rows ignored", boot.duplicates)?;
            }
            for lost in &boot.lost {
                writeln!(f, "  declared lost by an audit.gap event: seqs {}..={}", lost.from, lost.to)?;
            }
            for finding in &boot.findings {
                writeln!(f, "  - {finding}")?;
            }
        }
        for rejected in &self.rejected {
            writeln!(
                f,
                "trusted checkpoint of boot {} at seq {} rejected: {}",
                rejected.boot, rejected.seq, rejected.reason
            )?;
        }
        for unreadable in &self.unreadable {
            writeln!(f, "unreadable record at {}: {}", unreadable.at, unreadable.error)?;
        }
        let findings = self.findings().count();
        if self.ok() {
            write!(f, "OK: {} events in {} boots verified with {}", self.events(), self.boots.len(), self.key)
        } else {
            write!(
                f,
                "NOT OK: {findings} findings, {} rejected checkpoints, {} unreadable records",
                self.rejected.len(),
                self.unreadable.len()
            )
        }
    }
}

/// The verifier: reads a trail back (any order, any number of boots) and says, per boot, up to which seq it is
/// proven intact, and names each way it is not.
///
/// # What is checked, and how each attack is named
///
/// Events are grouped by `boot` and ordered by `seq`. Within a boot, the verifier walks the seqs from 1 and
/// keeps the hash of the event before (the *head*, all zeros before seq 1). For every event it checks that its
/// stored `hash` is `SHA-256(domain ‖ prev_hash ‖ canonical encoding)` of its own stored `prev_hash` and
/// content (*self-consistent*), and that its `prev_hash` is the head (*linked*). Signed checkpoints in the trail
/// (`audit.checkpoint`, the boot's final `audit.shutdown`) and the trusted checkpoints given from out of band
/// must verify with the key, and sign the hash the trail holds at the seq they cover.
///
/// The rules, in the order they are applied:
///
/// 1. **Duplicates**: a row identical to one already read (same seq, `prev_hash` and `hash`, self-consistent)
///    is dropped and counted in [`BootReport::duplicates`]: a sink retrying a batch may write it twice.
/// 2. **[`Missing`](Finding::Missing) `{ from, to }`**: no row holds these seqs. After a missing range the
///    walk resumes at the next row that is self-consistent. A range is not a finding but a *declared loss*
///    ([`BootReport::lost`]) when an `audit.gap` event after it, before the next gap event, reports at least
///    that many events lost after they were numbered (its `lost` count less the reasons that drop an event
///    before the worker numbers it: `queue_full`, `queue_bytes`, `wait_timeout`, `closed`).
/// 3. **[`Inserted`](Finding::Inserted) `{ seq }`**: a row that does not belong. Of several rows with one seq,
///    the one that is self-consistent and linked (and, failing that, the one the next seq links to) is the
///    boot's; every other is inserted. So is a row with seq 0, a row after the boot's verified `audit.shutdown`,
///    and a row whose hash does not match its content and that neither links to the head nor is linked to by
///    the next seq.
/// 4. **[`ReplayedFromOtherBoot`](Finding::ReplayedFromOtherBoot) `{ seq, boot }`**: a row that would be
///    altered or inserted, whose stored hash (or `prev_hash`) is that of an event (or of the event before it) of
///    another boot in the trail, and whose content, given that boot's instance, boot and seq back, hashes to it:
///    a copy of that event, or the event itself moved.
/// 5. **[`Reordered`](Finding::Reordered) `{ seqs }`**: two rows that each hash correctly only under the other's
///    seq (their contents were swapped, seq column kept); or rows stored out of seq order (a JSON lines file
///    whose lines were swapped: read in storage order, the links are out of order though every row hashes
///    correctly). `seqs` names the rows out of place.
/// 6. **[`Altered`](Finding::Altered) `{ seq }`**: a row whose stored hash does not match its content (a field,
///    or the hash, was edited), in its place in the chain (it links to the head, or the next seq links to it);
///    or a row that is self-consistent but that the next seq does not link to (edited, and its hash recomputed:
///    the break shows at the link after it); or a row whose `prev_hash` alone was edited.
/// 7. **[`Rewritten`](Finding::Rewritten) `{ from, to }`**: the chain is consistent, but a verified checkpoint
///    (in the trail or trusted) signs another hash at `to` than the trail holds: some event in `from..=to`
///    was edited and every hash after it recomputed. `from` is one past the last checkpoint that matched.
/// 8. **[`Truncated`](Finding::Truncated) `{ after, expected }`**: a trusted checkpoint covers up to `expected`,
///    but the boot's rows end at `after` (0 when no row of the boot is left). Only a trusted checkpoint, kept
///    where whoever can edit the trail cannot, can show that the newest rows were deleted.
/// 9. **[`BadSignature`](Finding::BadSignature) `{ seq }`**, **[`WrongKey`](Finding::WrongKey) `{ seq, key }`**,
///    **[`BadCheckpoint`](Finding::BadCheckpoint) `{ seq, reason }`**: a checkpoint event whose signature does
///    not verify, that names another key, or that cannot be read (or signs another seq than the one before
///    it). A trusted checkpoint that does not verify is [rejected](Report::rejected) instead.
/// 10. **[`Unchained`](Finding::Unchained) `{ from, to }`**: rows without a hash (integrity off, or written
///     before it was on, or a hash removed). Nothing about them can be verified.
///
/// [`BootReport::verified_to`] is the highest seq such that every event up to it is covered by a checkpoint
/// that verifies and matches, and no finding lies at or before it. The events after the last checkpoint are
/// chained but unsigned: whoever can write the trail can rewrite them undetectably until the next checkpoint, or
/// delete them undetectably but for a trusted checkpoint. After a finding, the walk resumes at the next row that
/// is self-consistent, so one edit is named once.
///
/// Verifies a trail, by the rules above.
///
/// `events` in the order they are stored (a file's lines, a table's rows); `trusted`, checkpoints kept out of
/// band (a checkpoint sink), which alone can show the newest rows deleted.
///
/// ```
/// use tower_audit::integrity::{Integrity, verify};
///
/// let key = Integrity::from_seed(&[7; 32]).verifier_key();
/// let report = verify(Vec::new(), &key, &[]);
/// assert!(report.ok() && report.boots.is_empty());
/// ```
pub fn verify(events: impl IntoIterator<Item = AuditEvent>, key: &VerifierKey, trusted: &[Checkpoint]) -> Report {
    let mut verifier = Verifier::new(key, trusted);
    for event in events {
        verifier.push(&event);
    }
    verifier.finish()
}

/// [`verify`], one event at a time, keeping about 100 bytes per event (and the whole event only for the few
/// that do not hash correctly): for trails read as a stream.
///
/// ```
/// use tower_audit::integrity::{Integrity, Verifier};
///
/// let key = Integrity::from_seed(&[7; 32]).verifier_key();
/// let mut verifier = Verifier::new(&key, &[]);
/// verifier.unreadable(3, "not JSON");
/// assert!(!verifier.finish().ok());
/// ```
#[derive(Debug)]
pub struct Verifier {
    key: VerifierKey,
    trusted: Vec<Checkpoint>,
    boots: HashMap<Option<Uuid>, Boot>,
    unreadable: Vec<Unreadable>,
    position: u64,
    /// The position of the first row of each source after the first.
    sources: Vec<u64>,
    buf: Vec<u8>,
}

/// A row as a reader thread hands it to the verifier: most rows are only a place in the chain, so only that
/// crosses threads, and the event is dropped where it was parsed.
#[derive(Debug)]
pub(crate) enum Row {
    /// A self-consistent row of no special kind, of a boot whose instance a [`Row::Full`] before it gave.
    Plain { boot: Option<Uuid>, seq: u64, prev: Hash, hash: Hash },
    /// Any other row, whole, with whether it hashes to its stored hash.
    Full(Box<AuditEvent>, bool),
    /// A line (counted from the start of its part) that is not an event, and why.
    Unreadable(u64, String),
}

/// The boots a reader thread has handed over a row naming their instance: later rows of theirs can be plain.
pub(crate) type Known = Vec<Option<Uuid>>;

impl Row {
    pub(crate) fn of(event: AuditEvent, own_ok: bool, known: &mut Known) -> Row {
        match (event.prev_hash, event.hash) {
            (Some(prev), Some(hash)) if own_ok && !event.is_pipeline_event() && known.contains(&event.boot) => {
                Row::Plain { boot: event.boot, seq: event.seq, prev, hash }
            }
            _ => {
                if event.instance.is_some() && !known.contains(&event.boot) {
                    known.push(event.boot);
                }
                Row::Full(Box::new(event), own_ok)
            }
        }
    }
}

/// What the verifier keeps of one row.
#[derive(Debug)]
struct Rec {
    seq: u64,
    pos: u64,
    prev: Option<Hash>,
    hash: Option<Hash>,
    /// `hash == H(prev, content)`.
    own_ok: bool,
    mark: Mark,
}

#[derive(Debug)]
enum Mark {
    Plain,
    /// An `audit.gap` event, with the number of numbered events it declares lost.
    Gap(u64),
    /// A checkpoint event: the head it signs, or what is wrong with it.
    Checkpoint {
        shutdown: bool,
        signed: Result<(u64, Hash), Finding>,
    },
}

#[derive(Debug, Default)]
struct Boot {
    instance: Option<Arc<str>>,
    recs: Vec<Rec>,
    /// Rows that do not hash to their stored hash, kept whole to name what they are.
    suspects: HashMap<u64, AuditEvent>,
}

impl Verifier {
    /// A verifier checking signatures with `key`, and the trail against `trusted` checkpoints.
    pub fn new(key: &VerifierKey, trusted: &[Checkpoint]) -> Self {
        Verifier {
            key: key.clone(),
            trusted: trusted.to_vec(),
            boots: HashMap::new(),
            unreadable: Vec::new(),
            position: 0,
            sources: Vec::new(),
            buf: Vec::with_capacity(1024),
        }
    }

    /// Reads the next row of the trail, in storage order.
    pub fn push(&mut self, event: &AuditEvent) {
        let own_ok = self_consistent(event, &mut self.buf);
        self.push_hashed(event, own_ok);
    }

    /// A row a reader thread parsed and hashed.
    pub(crate) fn push_row(&mut self, row: Row) {
        match row {
            Row::Plain { boot, seq, prev, hash } => {
                let pos = self.position;
                self.position += 1;
                let recs = &mut self.boots.get_mut(&boot).expect("a plain row's boot was pushed before").recs;
                recs.push(Rec { seq, pos, prev: Some(prev), hash: Some(hash), own_ok: true, mark: Mark::Plain });
            }
            Row::Full(event, own_ok) => self.push_hashed(&event, own_ok),
            Row::Unreadable(at, error) => self.unreadable(at, error),
        }
    }

    /// [`push`](Self::push) with the self-consistency already computed (by a reader that hashes in parallel).
    pub(crate) fn push_hashed(&mut self, event: &AuditEvent, own_ok: bool) {
        let pos = self.position;
        self.position += 1;
        let mark = match &*event.kind {
            kind::AUDIT_CHECKPOINT | kind::AUDIT_SHUTDOWN if event.hash.is_some() => {
                Mark::Checkpoint { shutdown: event.kind == kind::AUDIT_SHUTDOWN, signed: self.check_checkpoint(event) }
            }
            kind::AUDIT_GAP => Mark::Gap(numbered_losses(event)),
            _ => Mark::Plain,
        };
        if event.kind == kind::AUDIT_BOOT
            && let Some(Ok(previous)) = Checkpoint::previous_of(event)
        {
            // The previous boot's last checkpoint, as this boot's first event names it: checked like one kept out
            // of band, so a previous boot deleted whole (or cut short) is found.
            self.trusted.push(previous);
        }
        let boot = self.boots.entry(event.boot).or_default();
        if boot.instance.is_none() {
            boot.instance.clone_from(&event.instance);
        }
        if !own_ok && event.hash.is_some() {
            boot.suspects.insert(pos, event.clone());
        }
        boot.recs.push(Rec { seq: event.seq, pos, prev: event.prev_hash, hash: event.hash, own_ok, mark });
    }

    /// The rows pushed from now on come from another storage: the fallback sink's file after the primary's
    /// table, say, when the pipeline had both (its chain spans them, so they are verified as one trail). Rows
    /// are checked for storage order only against rows of the same source.
    ///
    /// ```
    /// use tower_audit::integrity::{Integrity, Verifier};
    ///
    /// let key = Integrity::from_seed(&[7; 32]).verifier_key();
    /// let mut verifier = Verifier::new(&key, &[]);
    /// // verifier.push(..) for each row of the primary trail, then:
    /// verifier.next_source();
    /// // verifier.push(..) for each row of the fallback trail.
    /// assert!(verifier.finish().ok());
    /// ```
    pub fn next_source(&mut self) {
        if self.position > 0 && self.sources.last() != Some(&self.position) {
            self.sources.push(self.position);
        }
    }

    /// Records a row that could not be read, at `at` (a line number, a row position).
    pub fn unreadable(&mut self, at: u64, error: impl fmt::Display) {
        self.unreadable.push(Unreadable { at, error: error.to_string() });
    }

    fn check_checkpoint(&self, event: &AuditEvent) -> Result<(u64, Hash), Finding> {
        let seq = event.seq;
        let checkpoint = match Checkpoint::from_event(event) {
            None => return Err(Finding::BadCheckpoint { seq, reason: "it carries no signature".into() }),
            Some(Err(e)) => return Err(Finding::BadCheckpoint { seq, reason: e.to_string() }),
            Some(Ok(checkpoint)) => checkpoint,
        };
        match checkpoint.verify(&self.key) {
            Ok(()) if checkpoint.seq + 1 != seq => Err(Finding::BadCheckpoint {
                seq,
                reason: format!("it signs seq {}, not the event before it", checkpoint.seq),
            }),
            Ok(()) => Ok((checkpoint.seq, checkpoint.hash)),
            Err(CheckpointError::WrongKey { found, .. }) => Err(Finding::WrongKey { seq, key: found }),
            Err(CheckpointError::BadSignature { .. }) => Err(Finding::BadSignature { seq }),
            Err(e) => Err(Finding::BadCheckpoint { seq, reason: e.to_string() }),
        }
    }

    /// Checks everything read and reports.
    pub fn finish(mut self) -> Report {
        let mut rejected = Vec::new();
        let mut trusted: HashMap<Uuid, Vec<(u64, Hash)>> = HashMap::new();
        for checkpoint in &self.trusted {
            match checkpoint.verify(&self.key) {
                Ok(()) => trusted.entry(checkpoint.boot).or_default().push((checkpoint.seq, checkpoint.hash)),
                Err(e) => rejected.push(Rejected { boot: checkpoint.boot, seq: checkpoint.seq, reason: e.to_string() }),
            }
        }
        for boot in trusted.keys() {
            self.boots.entry(Some(*boot)).or_default();
        }
        let mut walks: BTreeMap<Option<Uuid>, Walk> = BTreeMap::new();
        for (id, boot) in &mut self.boots {
            let walk = walk(boot, trusted.get(&id.unwrap_or_default()).map_or(&[][..], Vec::as_slice), &self.sources);
            walks.insert(*id, walk);
        }
        // Naming the rows that do not belong needs every boot: a replayed row is found by its hash elsewhere.
        let wanted: HashMap<Hash, ()> = walks
            .values()
            .flat_map(|w| w.suspects.iter().chain(&w.misfits))
            .flat_map(|s| [s.hash, s.prev])
            .flatten()
            .filter(|h| *h != Hash::ZERO)
            .map(|h| (h, ()))
            .collect();
        let mut origin: HashMap<Hash, (Uuid, u64)> = HashMap::new();
        if !wanted.is_empty() {
            for (id, boot) in &self.boots {
                let Some(id) = id else { continue };
                for rec in boot.recs.iter().filter(|r| r.own_ok) {
                    if let Some(hash) = rec.hash
                        && wanted.contains_key(&hash)
                    {
                        origin.insert(hash, (*id, rec.seq));
                    }
                }
            }
        }
        let instances: HashMap<Uuid, Option<Arc<str>>> =
            self.boots.iter().filter_map(|(id, b)| id.map(|id| (id, b.instance.clone()))).collect();
        let mut boots = Vec::new();
        for (id, mut walk) in walks {
            let boot = self.boots.get(&id).expect("walked");
            name_suspects(id, boot, &mut walk, &origin, &instances, &mut self.buf);
            boots.push(walk.report(id, boot.instance.as_deref()));
        }
        Report { key: self.key.label(), boots, rejected, unreadable: self.unreadable }
    }
}

/// Whether `event` has a hash, and it is the hash of its own `prev_hash` and content.
pub(crate) fn self_consistent(event: &AuditEvent, buf: &mut Vec<u8>) -> bool {
    match (event.prev_hash, event.hash) {
        (Some(prev), Some(hash)) => hash_with(&prev, event, buf) == hash,
        _ => false,
    }
}

/// The number of numbered events an `audit.gap` event declares lost.
fn numbered_losses(event: &AuditEvent) -> u64 {
    let count = |name: &str| event.attributes.get(name).and_then(|n| n.parse::<u64>().ok()).unwrap_or(0);
    count("lost").saturating_sub(UNNUMBERED_LOSSES.iter().map(|r| count(r)).sum())
}

/// A row the walk could not place: its seq, position, hashes, and whether it stands where the chain expects it.
#[derive(Debug, Clone, Copy)]
struct Suspect {
    seq: u64,
    pos: u64,
    prev: Option<Hash>,
    hash: Option<Hash>,
    in_place: bool,
}

/// The walk of one boot, before the suspects are named.
#[derive(Debug, Default)]
struct Walk {
    events: u64,
    duplicates: u64,
    first_seq: u64,
    last_seq: u64,
    signed_to: u64,
    checkpoints: u64,
    clean_shutdown: bool,
    lost: Vec<SeqRange>,
    findings: Vec<Finding>,
    /// Rows chosen for their seq that do not hash correctly.
    suspects: Vec<Suspect>,
    /// Extra rows under a seq already taken, or that cannot belong.
    misfits: Vec<Suspect>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Head {
    Known(Hash),
    /// After a gap or a suspect: the next self-consistent row is taken as is.
    Unknown,
}

fn walk(boot: &mut Boot, trusted: &[(u64, Hash)], sources: &[u64]) -> Walk {
    let mut w = Walk::default();
    let recs = &mut boot.recs;
    if !recs.is_sorted_by_key(|r| r.seq) {
        recs.sort_by_key(|r| (r.seq, r.pos));
    }
    // Identical rows: a retried batch.
    let before = recs.len();
    recs.dedup_by(|later, earlier| {
        later.seq == earlier.seq
            && later.own_ok
            && earlier.own_ok
            && later.prev == earlier.prev
            && later.hash == earlier.hash
    });
    w.duplicates = (before - recs.len()) as u64;
    w.events = recs.len() as u64;
    let recs = &boot.recs;
    if recs.iter().all(|r| r.hash.is_none()) {
        if let (Some(first), Some(last)) = (recs.first(), recs.last()) {
            (w.first_seq, w.last_seq) = (first.seq, last.seq);
            w.findings.push(Finding::Unchained { from: first.seq, to: last.seq });
        }
        for &(seq, _) in trusted {
            w.findings.push(Finding::Truncated { after: w.last_seq, expected: seq });
        }
        return w;
    }

    let groups: Vec<&[Rec]> = recs.chunk_by(|a, b| a.seq == b.seq).collect();
    let mut head = Head::Known(Hash::ZERO);
    let mut expected = 1u64;
    // Accepted rows by seq: (seq, stored hash, position).
    let mut chosen: Vec<(u64, Option<Hash>, u64)> = Vec::with_capacity(groups.len());
    let mut pending: Vec<SeqRange> = Vec::new();
    let mut unchained: Option<SeqRange> = None;
    let mut shutdown: Option<u64> = None;
    let mut matched: Vec<u64> = Vec::new();
    for (g, group) in groups.iter().enumerate() {
        let seq = group[0].seq;
        let misfit = |r: &Rec| Suspect { seq: r.seq, pos: r.pos, prev: r.prev, hash: r.hash, in_place: false };
        if seq == 0 || shutdown.is_some() {
            w.misfits.extend(group.iter().map(misfit));
            continue;
        }
        if seq > expected {
            pending.push(SeqRange { from: expected, to: seq - 1 });
            head = Head::Unknown;
        }
        let next_prev = groups.get(g + 1).filter(|n| n[0].seq == seq + 1).and_then(|n| n[0].prev);
        let linked = |r: &Rec| match head {
            Head::Known(h) => r.prev == Some(h),
            Head::Unknown => true,
        };
        let linked_out = |r: &Rec| r.hash.is_some() && r.hash == next_prev;
        let pick = group
            .iter()
            .position(|r| r.own_ok && linked(r) && linked_out(r))
            .or_else(|| group.iter().position(|r| r.own_ok && linked(r)))
            .or_else(|| group.iter().position(linked_out))
            .or_else(|| group.iter().position(|r| r.hash.is_some() && linked(r)))
            .unwrap_or(0);
        for (i, rec) in group.iter().enumerate() {
            if i != pick {
                w.misfits.push(misfit(rec));
            }
        }
        let rec = &group[pick];
        chosen.push((seq, rec.hash, rec.pos));
        expected = seq + 1;
        let Some(hash) = rec.hash else {
            match &mut unchained {
                Some(range) if range.to + 1 == seq => range.to = seq,
                _ => {
                    if let Some(range) = unchained.take() {
                        w.findings.push(Finding::Unchained { from: range.from, to: range.to });
                    }
                    unchained = Some(SeqRange { from: seq, to: seq });
                }
            }
            head = Head::Unknown;
            continue;
        };
        if rec.own_ok && linked(rec) {
            head = Head::Known(hash);
        } else if rec.own_ok {
            // Both ends hash correctly but do not link: the row before was edited and its hash recomputed
            // (or, for seq 1, the row claims a predecessor the boot cannot have).
            let blamed = if seq == 1 { 1 } else { seq - 1 };
            if !w.suspects.iter().any(|s| s.seq == blamed) {
                w.findings.push(Finding::Altered { seq: blamed });
            }
            head = Head::Known(hash);
        } else {
            let in_place = linked(rec) && head != Head::Unknown || linked_out(rec);
            w.suspects.push(Suspect { seq, pos: rec.pos, prev: rec.prev, hash: rec.hash, in_place });
            head = Head::Unknown;
        }
        match &rec.mark {
            Mark::Plain => {}
            Mark::Gap(capacity) => {
                let mut capacity = *capacity;
                for range in pending.drain(..) {
                    let n = range.to - range.from + 1;
                    if n <= capacity {
                        capacity -= n;
                        w.lost.push(range);
                    } else {
                        w.findings.push(Finding::Missing { from: range.from, to: range.to });
                    }
                }
            }
            Mark::Checkpoint { shutdown: is_shutdown, signed } => match signed {
                Err(finding) => w.findings.push(finding.clone()),
                Ok((covered, signed_hash)) => {
                    let before = chosen.len().checked_sub(2).map(|i| chosen[i]);
                    match before {
                        Some((s, stored, _)) if s == *covered && stored == Some(*signed_hash) => {
                            w.checkpoints += 1;
                            w.signed_to = w.signed_to.max(*covered);
                            matched.push(*covered);
                            if *is_shutdown {
                                shutdown = Some(seq);
                                w.clean_shutdown = true;
                            }
                        }
                        Some((s, Some(_), _)) if s == *covered => {
                            let from = matched.last().map_or(1, |m| m + 1);
                            w.findings.push(Finding::Rewritten { from, to: *covered });
                        }
                        // The seq it covers is missing or unchained: already reported.
                        _ => {}
                    }
                }
            },
        }
    }
    if let Some(range) = unchained {
        w.findings.push(Finding::Unchained { from: range.from, to: range.to });
    }
    for range in pending {
        w.findings.push(Finding::Missing { from: range.from, to: range.to });
    }
    w.first_seq = chosen.first().map_or(0, |c| c.0);
    w.last_seq = chosen.last().map_or(0, |c| c.0);

    // Trusted checkpoints: the trail must reach them, and hold the hash they sign.
    for &(covered, signed_hash) in trusted {
        match chosen.binary_search_by_key(&covered, |c| c.0) {
            Ok(i) if chosen[i].1 == Some(signed_hash) => {
                w.signed_to = w.signed_to.max(covered);
                matched.push(covered);
            }
            Ok(_) => {
                let from = matched.iter().filter(|&&m| m < covered).max().map_or(1, |m| m + 1);
                w.findings.push(Finding::Rewritten { from, to: covered });
            }
            Err(_) if covered > w.last_seq => {}
            Err(_) => {} // inside a missing range: already reported
        }
    }
    if let Some(&(expected, _)) = trusted.iter().filter(|(s, _)| *s > w.last_seq).max_by_key(|(s, _)| *s) {
        w.findings.push(Finding::Truncated { after: w.last_seq, expected });
    }

    // Rows stored out of seq order (lines swapped in a file), within each source.
    if sources.is_empty() {
        reordered(chosen.iter().map(|c| (c.0, c.2)), &mut w.findings);
    } else {
        let source = |pos: u64| sources.partition_point(|&start| start <= pos);
        for s in 0..=sources.len() {
            reordered(chosen.iter().filter(|c| source(c.2) == s).map(|c| (c.0, c.2)), &mut w.findings);
        }
    }
    w
}

/// Names the rows of one source, given in seq order as `(seq, position)`, that are not in storage order.
fn reordered(rows: impl Iterator<Item = (u64, u64)> + Clone, findings: &mut Vec<Finding>) {
    if rows.clone().is_sorted_by_key(|r| r.1) {
        return;
    }
    let mut sorted: Vec<u64> = rows.clone().map(|r| r.1).collect();
    sorted.sort_unstable();
    let mut max = 0;
    let mut out = Vec::new();
    for (i, (seq, pos)) in rows.enumerate() {
        max = max.max(pos);
        if pos != sorted[i] {
            out.push(seq);
        }
        if max == sorted[i] && !out.is_empty() {
            findings.push(Finding::Reordered { seqs: std::mem::take(&mut out) });
        }
    }
}

impl Walk {
    fn report(mut self, boot: Option<Uuid>, instance: Option<&str>) -> BootReport {
        self.findings.sort_by_key(|f| (f.seq(), f.rank()));
        self.findings.dedup();
        let first_bad =
            self.findings.iter().filter(|f| !matches!(f, Finding::Truncated { .. })).map(Finding::seq).min();
        let verified_to = first_bad.map_or(self.signed_to, |s| self.signed_to.min(s.saturating_sub(1)));
        BootReport {
            boot,
            instance: instance.map(str::to_owned),
            events: self.events,
            duplicates: self.duplicates,
            first_seq: self.first_seq,
            last_seq: self.last_seq,
            signed_to: self.signed_to,
            verified_to,
            checkpoints: self.checkpoints,
            clean_shutdown: self.clean_shutdown,
            lost: self.lost,
            findings: self.findings,
        }
    }
}

/// Names what each suspect row of a boot is: replayed from another boot, half of a swap, altered in place, or
/// inserted.
fn name_suspects(
    id: Option<Uuid>,
    boot: &Boot,
    walk: &mut Walk,
    origin: &HashMap<Hash, (Uuid, u64)>,
    instances: &HashMap<Uuid, Option<Arc<str>>>,
    buf: &mut Vec<u8>,
) {
    let rehashes = |event: &AuditEvent, prev: Option<Hash>, hash: Hash, buf: &mut Vec<u8>| {
        hash_with(&prev.unwrap_or(Hash::ZERO), event, buf) == hash
    };
    let replayed = |s: &Suspect, buf: &mut Vec<u8>| -> Option<Uuid> {
        // The event it copies: the one with its hash, or the one after the event its prev_hash names (when
        // the original was moved rather than copied).
        let hash = s.hash?;
        let by_hash = origin.get(&hash).copied();
        let by_prev = s.prev.and_then(|p| origin.get(&p)).map(|&(boot, seq)| (boot, seq + 1));
        [by_hash, by_prev].into_iter().flatten().filter(|(from, _)| Some(*from) != id).find_map(|(from, seq)| {
            let mut copy = boot.suspects.get(&s.pos)?.clone();
            copy.boot = Some(from);
            copy.seq = seq;
            copy.instance = instances.get(&from).cloned().flatten();
            rehashes(&copy, s.prev, hash, buf).then_some(from)
        })
    };
    let mut left = Vec::new();
    for s in std::mem::take(&mut walk.suspects) {
        match replayed(&s, buf) {
            Some(from) => walk.findings.push(Finding::ReplayedFromOtherBoot { seq: s.seq, boot: from }),
            None => left.push(s),
        }
    }
    // Swapped contents: each hashes correctly under the other's seq.
    let mut swapped = vec![false; left.len()];
    if left.len() <= MAX_SWAP_CANDIDATES {
        let under = |s: &Suspect, seq: u64, buf: &mut Vec<u8>| {
            let (Some(event), Some(hash)) = (boot.suspects.get(&s.pos), s.hash) else { return false };
            let mut moved = event.clone();
            moved.seq = seq;
            rehashes(&moved, s.prev, hash, buf)
        };
        for i in 0..left.len() {
            for j in i + 1..left.len() {
                if !swapped[i] && !swapped[j] && under(&left[i], left[j].seq, buf) && under(&left[j], left[i].seq, buf)
                {
                    (swapped[i], swapped[j]) = (true, true);
                    walk.findings.push(Finding::Reordered { seqs: vec![left[i].seq, left[j].seq] });
                }
            }
        }
    }
    for (s, _) in left.iter().zip(&swapped).filter(|(_, swapped)| !**swapped) {
        walk.findings.push(if s.in_place { Finding::Altered { seq: s.seq } } else { Finding::Inserted { seq: s.seq } });
    }
    for s in std::mem::take(&mut walk.misfits) {
        walk.findings.push(match replayed(&s, buf) {
            Some(from) => Finding::ReplayedFromOtherBoot { seq: s.seq, boot: from },
            None => Finding::Inserted { seq: s.seq },
        });
    }
}
