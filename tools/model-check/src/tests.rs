//! The protocol around the gate, in miniature, and its properties, each checked over every interleaving.
//!
//! * Producers run [`Pipeline::push`], which is `Core::push`: `enter` → (count `accepted`) → send into the
//!   channel → `leave`; or the refusal; or, if the receiver is gone, give the room back and count `abandoned`.
//! * The closer runs [`Pipeline::shut_down`], the worker's `shut_down` + `settle_rest`: `close` → spin
//!   (yielding) until `is_quiet` → drain the channel, giving each event back with `taken` → drop the receiver.
//! * The worker runs [`Pipeline::take`], which is `Queue::take`.
//!
//! Every operation on a shared loom object is a point where loom switches threads, and the state space grows
//! with each one that two threads share; so the model keeps only those the gate's properties depend on: the
//! gate's own atomics, the channel, and the closer's `quiet_seen` flag. The channel is one loom atomic (bit
//! `id` set: producer `id`'s event is queued; `GONE`: the receiver is dropped), so a send is one `fetch_or`
//! and a drain one `swap`, which is what the crate's queue amounts to: its backlog (`intake::Backlog`) pushes
//! one event, or takes events, or closes, each under one lock, so each is one indivisible step (it was an
//! unbounded MPSC channel, whose `send` and `try_recv` loop are the same two steps).
//! A producer's outcome (accepted, refused and why, abandoned) is its thread's return value rather than a
//! shared counter, the pipeline is shared through a `std` `Arc` (loom's counts references with operations of
//! its own), and the shadow accounting of property 3 runs only in its tests.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize as StdAtomicUsize, Ordering::Relaxed};

use loom::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use loom::thread;

use crate::gate::{Gate, Refusal};

/// A producer's event, as `intake::Entry`: which producer, the bytes it is admitted for, and whether it goes
/// into a reserved slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    id: usize,
    bytes: usize,
    reserved: bool,
}

fn event(id: usize, bytes: usize) -> Entry {
    Entry { id, bytes, reserved: false }
}

fn reserved_event(id: usize, bytes: usize) -> Entry {
    Entry { id, bytes, reserved: true }
}

/// What one producer's event came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Admitted and sent (counted `accepted`).
    Accepted,
    /// Refused by `enter`, counted under that reason.
    Refused(Refusal),
    /// Admitted, but the receiver was gone: counted `abandoned`.
    Abandoned,
    /// Its request got no slot from `reserve`, so it never reached `enter`.
    NotReserved(Refusal),
}

/// The channel's bit for "the receiver is dropped".
const GONE: usize = 1 << (usize::BITS - 1);

/// The gate, the channel and what the checks need, shared by producers, the worker and the closer.
struct Pipeline {
    gate: Gate,
    /// The producers' events, by id.
    events: Vec<Entry>,
    /// The unbounded channel: bit `id` set while producer `id`'s event is queued; `GONE` once the worker's
    /// receiver is dropped.
    channel: AtomicUsize,
    /// Set by the closer as soon as it has seen `is_quiet`.
    quiet_seen: AtomicBool,
    /// Property 3 only: shadow accounting of what the gate admitted.
    shadow: Option<Shadow>,
}

/// Slots held (reservations, plus admitted unreserved events not taken yet) and the bytes of the admitted
/// unreserved events not taken yet, with the limits they must stay within. Producers add after admission and
/// the worker subtracts before `taken` gives the room back, so the shadow never runs ahead of the gate; and
/// some interleaving has every producer add right after its admission, so a gate that lets too much in is
/// caught.
struct Shadow {
    held: AtomicUsize,
    bytes: AtomicUsize,
    capacity: usize,
    max_bytes: usize,
}

impl Pipeline {
    /// A gate of `capacity` and `max_bytes`, for producers that will push `events` (`events[id].id == id`).
    fn new(capacity: usize, max_bytes: usize, events: &[Entry]) -> Arc<Self> {
        Self::build(capacity, max_bytes, events, None)
    }

    /// The same, with the shadow accounting of property 3.
    fn with_shadow(capacity: usize, max_bytes: usize, events: &[Entry]) -> Arc<Self> {
        let shadow = Shadow { held: AtomicUsize::new(0), bytes: AtomicUsize::new(0), capacity, max_bytes };
        Self::build(capacity, max_bytes, events, Some(shadow))
    }

    fn build(capacity: usize, max_bytes: usize, events: &[Entry], shadow: Option<Shadow>) -> Arc<Self> {
        assert!(events.iter().enumerate().all(|(id, e)| e.id == id) && events.len() < 8);
        Arc::new(Self {
            gate: Gate::new(capacity, max_bytes),
            events: events.to_vec(),
            channel: AtomicUsize::new(0),
            quiet_seen: AtomicBool::new(false),
            shadow,
        })
    }

    /// `Core::reserve`.
    fn reserve(&self) -> Result<(), Refusal> {
        self.gate.reserve()?;
        if let Some(s) = &self.shadow {
            let held = s.held.fetch_add(1, SeqCst) + 1;
            assert!(held <= s.capacity, "{held} slots held (reserved + queued) > capacity {}", s.capacity);
        }
        Ok(())
    }

    /// `Core::push`, of producer `id`'s event.
    fn push(&self, id: usize) -> Outcome {
        let entry = self.events[id];
        if let Err(refusal) = self.gate.enter(entry.bytes, entry.reserved) {
            return Outcome::Refused(refusal);
        }
        if let (Some(s), false) = (&self.shadow, entry.reserved) {
            // A reserved event fills the slot its reservation already counted, whatever its bytes.
            let held = s.held.fetch_add(1, SeqCst) + 1;
            assert!(held <= s.capacity, "{held} slots held (reserved + queued) > capacity {}", s.capacity);
            let bytes = s.bytes.fetch_add(entry.bytes, SeqCst) + entry.bytes;
            assert!(bytes <= s.max_bytes, "{bytes} bytes admitted, not taken > max_bytes {}", s.max_bytes);
        }
        let sent = self.channel.fetch_or(1 << id, SeqCst) & GONE == 0;
        // Still inside the gate: the closer cannot have seen it quiet (nor before this event was admitted).
        assert!(!self.quiet_seen.load(SeqCst), "producer {id} got in after the closer saw the gate quiet");
        self.gate.leave();
        if !sent {
            self.gate.taken(1, entry.bytes);
            return Outcome::Abandoned;
        }
        Outcome::Accepted
    }

    /// The events in a set of channel bits.
    fn entries(&self, bits: usize) -> Vec<Entry> {
        assert_eq!(bits & GONE, 0, "the receiver is gone");
        self.events.iter().filter(|e| bits & (1 << e.id) != 0).copied().collect()
    }

    /// `Queue::take`: everything queued now, given back to the gate in one `taken`.
    fn take(&self) -> Vec<Entry> {
        let batch = self.entries(self.channel.swap(0, SeqCst));
        if !batch.is_empty() {
            if let Some(s) = &self.shadow {
                s.held.fetch_sub(batch.len(), SeqCst);
                s.bytes.fetch_sub(batch.iter().filter(|e| !e.reserved).map(|e| e.bytes).sum(), SeqCst);
            }
            self.gate.taken(batch.len(), batch.iter().map(|e| e.bytes).sum());
        }
        batch
    }

    /// The worker's shutdown: close, wait for the producers inside to publish, drain (one `taken` per event,
    /// as `settle_rest`), drop the receiver. Returns the drained events, and those found in the channel when
    /// the receiver was dropped (published after the drain: lost).
    fn shut_down(&self) -> Drained {
        self.gate.close();
        while !self.gate.is_quiet() {
            thread::yield_now();
        }
        self.quiet_seen.store(true, SeqCst);
        let drained = self.entries(self.channel.swap(0, SeqCst));
        for entry in &drained {
            self.gate.taken(1, entry.bytes);
        }
        let lost = self.entries(self.channel.swap(GONE, SeqCst));
        Drained { drained, lost }
    }

    /// The end of a model with a closer (after every join): each producer is exactly one of accepted (and
    /// then drained exactly once) or dropped; nothing was lost or abandoned; `used` and `bytes` are back to
    /// zero (every drained event was given back, every reserved slot consumed); and close is final.
    fn check_after_shutdown(&self, outcomes: &[Outcome], Drained { drained, lost }: &Drained) {
        assert_eq!(lost, &[], "events published after the closer's drain ({outcomes:?})");
        assert!(!outcomes.contains(&Outcome::Abandoned), "abandoned: {outcomes:?}");
        assert_eq!(ids(drained), accepted(outcomes), "drained events vs accepted producers ({outcomes:?})");
        assert_eq!(self.channel.load(SeqCst), GONE, "the channel after the joins ({outcomes:?})");
        assert_eq!((self.gate.used(), self.gate.bytes()), (0, 0), "used, bytes after the drain ({outcomes:?})");
        assert!(self.gate.is_quiet(), "not quiet after the joins");
        // Close is final: nothing gets in any more, and trying leaves no trace.
        assert_eq!(self.gate.reserve(), Err(Refusal::Closed));
        assert_eq!(self.gate.enter(1, false), Err(Refusal::Closed));
        assert!(self.gate.is_quiet() && self.gate.used() == 0 && self.gate.bytes() == 0);
    }
}

/// What the closer drained, and what it found in the channel when dropping the receiver.
struct Drained {
    drained: Vec<Entry>,
    lost: Vec<Entry>,
}

/// The producers' ids, sorted.
fn ids(entries: &[Entry]) -> Vec<usize> {
    let mut ids: Vec<usize> = entries.iter().map(|e| e.id).collect();
    ids.sort_unstable();
    ids
}

/// The ids of the producers whose event was accepted.
fn accepted(outcomes: &[Outcome]) -> Vec<usize> {
    (0..outcomes.len()).filter(|&id| outcomes[id] == Outcome::Accepted).collect()
}

/// A producer pushing its event.
fn spawn_push(p: &Arc<Pipeline>, id: usize) -> thread::JoinHandle<Outcome> {
    let p = p.clone();
    thread::spawn(move || p.push(id))
}

fn join_all(handles: Vec<thread::JoinHandle<Outcome>>) -> Vec<Outcome> {
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// `loom::model`, printing how many interleavings it explored (shown with `--nocapture`).
fn model(name: &str, f: impl Fn() + Sync + Send + 'static) {
    let runs = Arc::new(StdAtomicUsize::new(0));
    let counted = runs.clone();
    let start = std::time::Instant::now();
    loom::model(move || {
        counted.fetch_add(1, Relaxed);
        f();
    });
    println!("{name}: {} interleavings in {:.2?}", runs.load(Relaxed), start.elapsed());
}

/// Property 1: close is final, and nothing admitted is lost. Two producers race the closer; room is ample,
/// so the only refusal is `Closed`. The closer drains after `is_quiet`: every event admitted is in the
/// channel by then, and none is admitted or published after (checked inside the producers, by the channel
/// being empty when the receiver is dropped, and by no producer finding the receiver gone).
#[test]
fn close_is_final_and_nothing_admitted_is_lost() {
    model("close_is_final_and_nothing_admitted_is_lost", || {
        let p = Pipeline::new(4, 64, &[event(0, 1), event(1, 2)]);
        let producers = vec![spawn_push(&p, 0), spawn_push(&p, 1)];
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
/// reservation, the two would wait on each other forever (loom then fails the model for exceeding its
/// branch limit). The late event is refused `Closed`, and its slot given back.
#[test]
fn reservation_never_holds_shutdown() {
    model("reservation_never_holds_shutdown", || {
        let p = Pipeline::new(2, 64, &[reserved_event(0, 3)]);
        p.reserve().unwrap();
        let holder = {
            let p = p.clone();
            thread::spawn(move || {
                while !p.quiet_seen.load(SeqCst) {
                    thread::yield_now();
                }
                p.push(0)
            })
        };
        let drained = p.shut_down();
        let outcomes = join_all(vec![holder]);
        assert_eq!(outcomes, [Outcome::Refused(Refusal::Closed)]);
        p.check_after_shutdown(&outcomes, &drained);
    });
}

/// Property 2b: a slot reserved before the race is consumed exactly once, whatever `enter` says, and its
/// event is either drained or dropped `Closed`, never both, never neither. Producer 0 pushes into the slot,
/// producer 1 pushes an unreserved event, the closer races both. The reserved event is admitted whatever its
/// bytes (3 + 2 here, over the budget of 4: only the unreserved one can be refused for bytes).
#[test]
fn reserved_slot_is_consumed_exactly_once() {
    model("reserved_slot_is_consumed_exactly_once", || {
        let p = Pipeline::new(2, 4, &[reserved_event(0, 3), event(1, 2)]);
        p.reserve().unwrap();
        let producers = vec![spawn_push(&p, 0), spawn_push(&p, 1)];
        let drained = p.shut_down();
        let outcomes = join_all(producers);
        assert!(matches!(outcomes[0], Outcome::Accepted | Outcome::Refused(Refusal::Closed)), "{outcomes:?}");
        assert!(
            matches!(outcomes[1], Outcome::Accepted | Outcome::Refused(Refusal::Closed | Refusal::Bytes)),
            "{outcomes:?}"
        );
        p.check_after_shutdown(&outcomes, &drained);
    });
}

/// Property 2c: a reservation made while the closer runs is never leaked either. The producer reserves
/// during the race (refused once intake is closed, but it may also get its slot just before the close and
/// push after it) and pushes into its slot if it got one. (Two threads: with a second producer as well the
/// model grows to millions of interleavings; 2b and 1 cover a second producer.)
#[test]
fn reservation_racing_close_is_consumed_exactly_once() {
    model("reservation_racing_close_is_consumed_exactly_once", || {
        let p = Pipeline::new(2, 64, &[reserved_event(0, 3)]);
        let reserving = {
            let p = p.clone();
            thread::spawn(move || match p.reserve() {
                Ok(()) => p.push(0),
                Err(refusal) => Outcome::NotReserved(refusal),
            })
        };
        let drained = p.shut_down();
        let outcomes = join_all(vec![reserving]);
        assert!(
            matches!(
                outcomes[0],
                Outcome::Accepted | Outcome::Refused(Refusal::Closed) | Outcome::NotReserved(Refusal::Closed)
            ),
            "{outcomes:?}"
        );
        p.check_after_shutdown(&outcomes, &drained);
    });
}

/// Runs a worker on the main thread against `producers` (already running): it takes whatever is queued,
/// twice while they run (each take at any point of their runs), then once more after joining them. Then
/// checks that every admitted event was taken exactly once, that the counters are all back to zero, and that
/// no reservation is left over (`queued` = `used` − reservations).
fn race_with_worker(p: &Arc<Pipeline>, producers: Vec<thread::JoinHandle<Outcome>>) -> Vec<Outcome> {
    let mut taken = p.take();
    taken.extend(p.take());
    let outcomes = join_all(producers);
    taken.extend(p.take());
    assert_eq!(ids(&taken), accepted(&outcomes), "taken events vs accepted producers ({outcomes:?})");
    let s = p.shadow.as_ref().unwrap();
    assert_eq!((s.held.load(SeqCst), s.bytes.load(SeqCst)), (0, 0), "shadow after the last take");
    assert_eq!((p.gate.used(), p.gate.bytes()), (0, 0), "used, bytes after the last take ({outcomes:?})");
    // Every reservation was consumed: one more event counts as one queued event.
    assert_eq!(p.gate.enter(1, false), Ok(()));
    p.gate.leave();
    assert_eq!(p.gate.queued(), 1, "queued events with one in the queue ({outcomes:?})");
    p.gate.taken(1, 1);
    outcomes
}

/// Property 3a: the capacity is never exceeded by admitted events. Capacity 1, two producers and a worker
/// taking concurrently: never more than one event admitted and not taken; and at least one producer gets
/// in (no spurious refusal: the first to try finds the queue empty or makes it so).
#[test]
fn capacity_is_never_exceeded() {
    model("capacity_is_never_exceeded", || {
        let p = Pipeline::with_shadow(1, 64, &[event(0, 1), event(1, 1)]);
        let producers = vec![spawn_push(&p, 0), spawn_push(&p, 1)];
        let outcomes = race_with_worker(&p, producers);
        assert!(outcomes.iter().all(|o| matches!(o, Outcome::Accepted | Outcome::Refused(Refusal::Full))));
        assert!(outcomes.contains(&Outcome::Accepted), "both refused: {outcomes:?}");
    });
}

/// Property 3b: the byte budget is never exceeded by admitted events. Budget 4 and capacity 2, events of 3
/// and 2 bytes (either fits, not both), a worker taking concurrently; at least one gets in.
#[test]
fn byte_budget_is_never_exceeded() {
    model("byte_budget_is_never_exceeded", || {
        let p = Pipeline::with_shadow(2, 4, &[event(0, 3), event(1, 2)]);
        let producers = vec![spawn_push(&p, 0), spawn_push(&p, 1)];
        let outcomes = race_with_worker(&p, producers);
        assert!(outcomes.iter().all(|o| matches!(o, Outcome::Accepted | Outcome::Refused(Refusal::Bytes))));
        assert!(outcomes.contains(&Outcome::Accepted), "both refused: {outcomes:?}");
    });
}

/// Property 3c: a reserved slot counts against the capacity until its event is taken. Capacity 1, the slot
/// reserved: the unreserved producer only gets in once the reserved event has been admitted and taken; the
/// reserved event always gets in, whatever its bytes (over the budget here). The unreserved one may also be
/// refused `Bytes`: `taken` gives the slot back before the bytes, and a producer in between sees the room
/// but not yet the bytes.
#[test]
fn reservations_count_against_capacity() {
    model("reservations_count_against_capacity", || {
        let p = Pipeline::with_shadow(1, 4, &[reserved_event(0, 5), event(1, 1)]);
        p.reserve().unwrap();
        let producers = vec![spawn_push(&p, 0), spawn_push(&p, 1)];
        let outcomes = race_with_worker(&p, producers);
        assert_eq!(outcomes[0], Outcome::Accepted, "{outcomes:?}");
        assert!(matches!(outcomes[1], Outcome::Accepted | Outcome::Refused(_)), "{outcomes:?}");
        assert_ne!(outcomes[1], Outcome::Refused(Refusal::Closed), "{outcomes:?}");
    });
}
