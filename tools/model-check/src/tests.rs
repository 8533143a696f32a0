//! The protocol around the gate, in miniature, and its properties, each checked over every interleaving.
//!
//! * Producers run [`Pipeline::push`], which is `Core::push`: `enter` → count `accepted` → send into the
//!   channel → `leave` (or count the refusal; or, if the receiver is gone, give the room back and count
//!   `abandoned`).
//! * The closer runs [`Pipeline::shut_down`], which is the worker's `shut_down` + `settle_rest`: `close` → spin
//!   (yielding) until `is_quiet` → drain the channel, giving each event back with `taken` → drop the receiver.
//! * The worker runs [`Pipeline::take`], which is `Queue::take`.
//!
//! The channel is a loom `Mutex<Option<Vec<Entry>>>` (`None` once the receiver is dropped), the counters are
//! loom atomics. Threads are kept to three (main included) so that each model explores in seconds.

use loom::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use loom::sync::{Arc, Mutex};
use loom::thread;

use crate::gate::{Gate, Refusal};

/// An admitted event, as `intake::Entry`: the producer that sent it and the bytes it was admitted for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    id: usize,
    bytes: usize,
}

/// What one producer's event came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Admitted and sent.
    Accepted,
    /// Refused by `enter` (and counted under that reason).
    Refused(Refusal),
    /// Admitted, but the receiver was gone: counted `abandoned`.
    Abandoned,
    /// Its request got no slot from `reserve` (so it never reached `enter`).
    NotReserved(Refusal),
}

/// The gate, the channel and the counters shared by producers, the worker and the closer.
struct Pipeline {
    gate: Gate,
    /// The unbounded channel; `None` once the worker's receiver is dropped.
    channel: Mutex<Option<Vec<Entry>>>,
    accepted: AtomicUsize,
    dropped_full: AtomicUsize,
    dropped_bytes: AtomicUsize,
    dropped_closed: AtomicUsize,
    abandoned: AtomicUsize,
    /// Events that were still in the channel when the closer dropped the receiver (published after its drain).
    lost: AtomicUsize,
    /// Set by the closer as soon as it has seen `is_quiet`.
    quiet_seen: AtomicBool,
    /// Shadow accounting for property 3: slots held by reservations plus admitted events not taken yet, and
    /// the bytes of the admitted (unreserved) events not taken yet. Producers add after admission, the worker
    /// subtracts before `taken` gives the room back, so the shadow never runs ahead of what the gate lets in.
    held: AtomicUsize,
    held_bytes: AtomicUsize,
    /// Producers (spawned by `spawn_push`) done pushing: the worker of property 3 takes until all are.
    finished: AtomicUsize,
    capacity: usize,
    max_bytes: usize,
}

impl Pipeline {
    fn new(capacity: usize, max_bytes: usize) -> Arc<Self> {
        Arc::new(Self {
            gate: Gate::new(capacity, max_bytes),
            channel: Mutex::new(Some(Vec::new())),
            accepted: AtomicUsize::new(0),
            dropped_full: AtomicUsize::new(0),
            dropped_bytes: AtomicUsize::new(0),
            dropped_closed: AtomicUsize::new(0),
            abandoned: AtomicUsize::new(0),
            lost: AtomicUsize::new(0),
            quiet_seen: AtomicBool::new(false),
            held: AtomicUsize::new(0),
            held_bytes: AtomicUsize::new(0),
            finished: AtomicUsize::new(0),
            capacity,
            max_bytes,
        })
    }

    /// `Core::reserve`, with the shadow count of held slots.
    fn reserve(&self) -> Result<(), Refusal> {
        self.gate.reserve()?;
        let held = self.held.fetch_add(1, SeqCst) + 1;
        assert!(held <= self.capacity, "{held} slots held (reservations + queued) > capacity {}", self.capacity);
        Ok(())
    }

    /// `Core::push`: the event goes into its reserved slot if `reserved`.
    fn push(&self, entry: Entry, reserved: bool) -> Outcome {
        if let Err(refusal) = self.gate.enter(entry.bytes, reserved) {
            let counter = match refusal {
                Refusal::Full => &self.dropped_full,
                Refusal::Bytes => &self.dropped_bytes,
                Refusal::Closed => &self.dropped_closed,
            };
            counter.fetch_add(1, SeqCst);
            return Outcome::Refused(refusal);
        }
        // Inside the gate: the closer cannot have seen it quiet, nor see it so before `leave`.
        assert!(!self.quiet_seen.load(SeqCst), "producer {} admitted after the closer saw the gate quiet", entry.id);
        if !reserved {
            let held = self.held.fetch_add(1, SeqCst) + 1;
            assert!(held <= self.capacity, "{held} events held (reservations + queued) > capacity {}", self.capacity);
            let bytes = self.held_bytes.fetch_add(entry.bytes, SeqCst) + entry.bytes;
            assert!(bytes <= self.max_bytes, "{bytes} bytes admitted and not taken > max_bytes {}", self.max_bytes);
        }
        self.accepted.fetch_add(1, SeqCst);
        let sent = match &mut *self.channel.lock().unwrap() {
            Some(queue) => {
                queue.push(entry);
                true
            }
            None => false,
        };
        assert!(!self.quiet_seen.load(SeqCst), "producer {} published after the closer saw the gate quiet", entry.id);
        self.gate.leave();
        if !sent {
            self.gate.taken(1, entry.bytes);
            self.abandoned.fetch_add(1, SeqCst);
            return Outcome::Abandoned;
        }
        Outcome::Accepted
    }

    /// `Queue::take`: everything queued now, given back to the gate in one `taken`.
    fn take(&self) -> Vec<Entry> {
        let batch = std::mem::take(self.channel.lock().unwrap().as_mut().expect("the receiver is gone"));
        if !batch.is_empty() {
            let bytes = batch.iter().map(|e| e.bytes).sum();
            self.held.fetch_sub(batch.len(), SeqCst);
            self.held_bytes.fetch_sub(bytes, SeqCst);
            self.gate.taken(batch.len(), bytes);
        }
        batch
    }

    /// The worker's shutdown: close, wait for the producers inside to publish, drain (one `taken` per event,
    /// as `settle_rest`), drop the receiver. Returns the drained events.
    fn shut_down(&self) -> Vec<Entry> {
        self.gate.close();
        while !self.gate.is_quiet() {
            thread::yield_now();
        }
        self.quiet_seen.store(true, SeqCst);
        let drained = std::mem::take(self.channel.lock().unwrap().as_mut().expect("the receiver is gone"));
        for entry in &drained {
            self.gate.taken(1, entry.bytes);
        }
        let rest = self.channel.lock().unwrap().take().expect("the receiver is gone");
        self.lost.fetch_add(rest.len(), SeqCst);
        drained
    }

    /// The end of a model in which the closer ran: every producer is exactly one of accepted (and then drained,
    /// exactly once) or dropped; nothing was lost or abandoned; the gate's counters are back to zero; and
    /// close is final.
    fn check_after_shutdown(&self, outcomes: &[Outcome], drained: &[Entry]) {
        let mut drained_ids: Vec<usize> = drained.iter().map(|e| e.id).collect();
        drained_ids.sort_unstable();
        let accepted_ids: Vec<usize> = (0..outcomes.len()).filter(|&id| outcomes[id] == Outcome::Accepted).collect();
        assert_eq!(drained_ids, accepted_ids, "drained events vs accepted producers ({outcomes:?})");
        assert_eq!(self.accepted.load(SeqCst), drained.len(), "accepted count vs drained count");
        let refused = outcomes.iter().filter(|o| matches!(o, Outcome::Refused(_))).count();
        let dropped = self.dropped_full.load(SeqCst) + self.dropped_bytes.load(SeqCst) + self.dropped_closed.load(SeqCst);
        assert_eq!(dropped, refused, "dropped counters vs refused producers ({outcomes:?})");
        assert_eq!(self.abandoned.load(SeqCst), 0, "events abandoned ({outcomes:?})");
        assert_eq!(self.lost.load(SeqCst), 0, "events published after the closer's drain ({outcomes:?})");
        assert!(self.channel.lock().unwrap().is_none(), "the receiver should be gone");
        assert_eq!(self.gate.used(), 0, "used after the drain ({outcomes:?})");
        assert_eq!(self.gate.bytes(), 0, "bytes after the drain ({outcomes:?})");
        assert!(self.gate.is_quiet(), "not quiet after the joins");
        // Close is final: nothing gets in any more, and trying leaves no trace.
        assert_eq!(self.gate.reserve(), Err(Refusal::Closed));
        assert_eq!(self.gate.enter(1, false), Err(Refusal::Closed));
        assert!(self.gate.is_quiet() && self.gate.used() == 0 && self.gate.bytes() == 0);
    }
}

fn spawn_push(p: &Arc<Pipeline>, entry: Entry, reserved: bool) -> thread::JoinHandle<Outcome> {
    let p = p.clone();
    thread::spawn(move || {
        let outcome = p.push(entry, reserved);
        p.finished.fetch_add(1, SeqCst);
        outcome
    })
}

fn join_all(handles: Vec<thread::JoinHandle<Outcome>>) -> Vec<Outcome> {
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// Property 1: close is final, and nothing admitted is lost. Two producers race the closer; room is ample,
/// so the only refusal is `Closed`.
#[test]
fn close_is_final_and_nothing_admitted_is_lost() {
    loom::model(|| {
        let p = Pipeline::new(4, 64);
        let producers = (0..2).map(|id| spawn_push(&p, Entry { id, bytes: 1 + id }, false)).collect();
        let drained = p.shut_down();
        let outcomes = join_all(producers);
        for outcome in &outcomes {
            assert!(matches!(outcome, Outcome::Accepted | Outcome::Refused(Refusal::Closed)), "{outcomes:?}");
        }
        p.check_after_shutdown(&outcomes, &drained);
    });
}

/// Property 2a: a reservation never holds shutdown. A request holds a slot (reserved in `call`) and only
/// pushes its event once the closer has seen the gate quiet; if the closer's wait depended on the
/// reservation, the two would wait on each other forever (loom reports the model exceeding its branch limit).
/// The late event is refused `Closed`, and its slot is given back.
#[test]
fn reservation_never_holds_shutdown() {
    loom::model(|| {
        let p = Pipeline::new(2, 64);
        p.reserve().unwrap();
        let holder = {
            let p = p.clone();
            thread::spawn(move || {
                while !p.quiet_seen.load(SeqCst) {
                    thread::yield_now();
                }
                p.push(Entry { id: 0, bytes: 3 }, true)
            })
        };
        let drained = p.shut_down();
        let outcomes = join_all(vec![holder]);
        assert_eq!(outcomes, [Outcome::Refused(Refusal::Closed)]);
        p.check_after_shutdown(&outcomes, &drained);
    });
}

/// Property 2b: a reserved slot is consumed exactly once, whatever `enter` says, and its event is either
/// drained or dropped `Closed`, never both, never neither. Producer 0 pushes into a slot reserved before the
/// race; producer 1 reserves during the race and pushes into its slot if it got one; the closer races both.
#[test]
fn reservation_is_consumed_exactly_once() {
    loom::model(|| {
        let p = Pipeline::new(2, 4);
        p.reserve().unwrap();
        // Reserved events are admitted whatever their bytes (here over the budget of 4 together).
        let first = spawn_push(&p, Entry { id: 0, bytes: 3 }, true);
        let second = {
            let p = p.clone();
            thread::spawn(move || match p.reserve() {
                Ok(()) => p.push(Entry { id: 1, bytes: 2 }, true),
                Err(refusal) => Outcome::NotReserved(refusal),
            })
        };
        let drained = p.shut_down();
        let outcomes = join_all(vec![first, second]);
        assert!(matches!(outcomes[0], Outcome::Accepted | Outcome::Refused(Refusal::Closed)), "{outcomes:?}");
        assert!(
            matches!(
                outcomes[1],
                Outcome::Accepted | Outcome::Refused(Refusal::Closed) | Outcome::NotReserved(Refusal::Closed)
            ),
            "{outcomes:?}"
        );
        p.check_after_shutdown(&outcomes, &drained);
    });
}

/// Runs a worker on the main thread against `producers` (already running): it takes whatever is queued,
/// yielding in between, until every producer has finished and the queue is empty. Then checks that every
/// admitted event was taken exactly once and that the gate's counters match the shadow ones.
fn race_with_worker(p: &Arc<Pipeline>, producers: Vec<thread::JoinHandle<Outcome>>) -> Vec<Outcome> {
    let mut taken = Vec::new();
    loop {
        // Whatever a finished producer published is in the channel by the take that follows.
        let finished = p.finished.load(SeqCst) == producers.len();
        taken.extend(p.take());
        if finished {
            break;
        }
        thread::yield_now();
    }
    let outcomes = join_all(producers);
    let mut taken_ids: Vec<usize> = taken.iter().map(|e| e.id).collect();
    taken_ids.sort_unstable();
    let accepted_ids: Vec<usize> = (0..outcomes.len()).filter(|&id| outcomes[id] == Outcome::Accepted).collect();
    assert_eq!(taken_ids, accepted_ids, "taken events vs accepted producers ({outcomes:?})");
    assert_eq!(p.accepted.load(SeqCst), taken.len());
    assert_eq!((p.gate.used(), p.gate.bytes()), (p.held.load(SeqCst), p.held_bytes.load(SeqCst)), "{outcomes:?}");
    outcomes
}

/// Property 3a: the count capacity is never exceeded by admitted events. Capacity 1, two producers and a
/// worker taking concurrently: at most one event is ever admitted and not taken, and the first producer to
/// try is admitted (no spurious refusal).
#[test]
fn capacity_is_never_exceeded() {
    loom::model(|| {
        let p = Pipeline::new(1, 64);
        let producers = (0..2).map(|id| spawn_push(&p, Entry { id, bytes: 1 }, false)).collect();
        let outcomes = race_with_worker(&p, producers);
        assert!(outcomes.iter().all(|o| matches!(o, Outcome::Accepted | Outcome::Refused(Refusal::Full))));
        assert!(outcomes.contains(&Outcome::Accepted), "both refused: {outcomes:?}");
        assert_eq!((p.gate.used(), p.gate.bytes()), (0, 0));
    });
}

/// Property 3b: the byte budget is never exceeded by admitted events. Budget 4, events of 3 and 2 bytes
/// (either fits, not both), a worker taking concurrently.
#[test]
fn byte_budget_is_never_exceeded() {
    loom::model(|| {
        let p = Pipeline::new(2, 4);
        let producers = [3, 2].into_iter().enumerate().map(|(id, bytes)| spawn_push(&p, Entry { id, bytes }, false)).collect();
        let outcomes = race_with_worker(&p, producers);
        assert!(outcomes.iter().all(|o| matches!(o, Outcome::Accepted | Outcome::Refused(Refusal::Bytes))));
        assert!(outcomes.contains(&Outcome::Accepted), "both refused: {outcomes:?}");
        assert_eq!((p.gate.used(), p.gate.bytes()), (0, 0));
    });
}

/// Property 3c: a reserved slot counts against the capacity until its event is taken. Capacity 1 with the
/// slot reserved: the unreserved producer can only get in once the reserved event was admitted and taken.
#[test]
fn reservations_count_against_capacity() {
    loom::model(|| {
        let p = Pipeline::new(1, 64);
        p.reserve().unwrap();
        let reserved = spawn_push(&p, Entry { id: 0, bytes: 5 }, true);
        let plain = spawn_push(&p, Entry { id: 1, bytes: 1 }, false);
        let outcomes = race_with_worker(&p, vec![reserved, plain]);
        assert_eq!(outcomes[0], Outcome::Accepted, "{outcomes:?}");
        assert!(matches!(outcomes[1], Outcome::Accepted | Outcome::Refused(Refusal::Full)), "{outcomes:?}");
        assert_eq!((p.gate.used(), p.gate.bytes()), (0, 0));
    });
}
