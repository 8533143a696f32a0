//! What each trail has been told about losses: `audit.gap` events, one ledger per trail.
//!
//! A gap event says what is missing from *its* trail since the trail's previous gap event, by reason; it is
//! never cumulative. Its counts are marked as reported only once the gap event itself is written, so a gap
//! event that fails is carried into the next one. The primary trail also counts the events that went to the
//! fallback sink instead (they are missing from it); the fallback trail does not (they are its contents).
//! Both count the pipeline's own events (boot, gap, checkpoint, shutdown) missing from them the same way
//! (`pipeline_lost`, `pipeline_in_fallback`): with integrity on, every seq absent from a trail is declared.

use std::time::SystemTime;

use crate::event::{AuditEvent, Outcome, kind};
use crate::stats::Stats;

/// Cumulative losses by reason, read off the counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Losses {
    queue_full: u64,
    queue_bytes: u64,
    wait_timeout: u64,
    closed: u64,
    refused: u64,
    sink_failed: u64,
    abandoned: u64,
    spill_full: u64,
    corrupt: u64,
    in_fallback: u64,
    /// The pipeline's own events (boot, gap, checkpoint, shutdown) numbered and then written to no trail.
    pipeline_lost: u64,
    /// The pipeline's own events the primary failed and the fallback took.
    pipeline_in_fallback: u64,
}

/// The pipeline's own events missing from the trails, as the worker counts them (they are not in [`Stats`],
/// which counts what the application offered).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct PipelineLosses {
    pub(crate) lost: u64,
    pub(crate) in_fallback: u64,
}

impl Losses {
    pub(crate) fn of(stats: &Stats) -> Self {
        Losses {
            queue_full: stats.dropped_queue_full,
            queue_bytes: stats.dropped_queue_bytes,
            wait_timeout: stats.dropped_wait_timeout,
            closed: stats.dropped_closed,
            refused: stats.refused,
            sink_failed: stats.lost,
            abandoned: stats.abandoned,
            spill_full: stats.spill_full,
            corrupt: stats.corrupt,
            in_fallback: stats.fallback_written,
            pipeline_lost: 0,
            pipeline_in_fallback: 0,
        }
    }

    /// With the pipeline's own events missing added.
    pub(crate) fn with_pipeline(mut self, pipeline: PipelineLosses) -> Self {
        self.pipeline_lost = pipeline.lost;
        self.pipeline_in_fallback = pipeline.in_fallback;
        self
    }

    pub(crate) fn since(self, earlier: Losses) -> Self {
        Losses {
            queue_full: self.queue_full - earlier.queue_full,
            queue_bytes: self.queue_bytes - earlier.queue_bytes,
            wait_timeout: self.wait_timeout - earlier.wait_timeout,
            closed: self.closed - earlier.closed,
            refused: self.refused - earlier.refused,
            sink_failed: self.sink_failed - earlier.sink_failed,
            abandoned: self.abandoned - earlier.abandoned,
            spill_full: self.spill_full - earlier.spill_full,
            corrupt: self.corrupt - earlier.corrupt,
            in_fallback: self.in_fallback - earlier.in_fallback,
            pipeline_lost: self.pipeline_lost - earlier.pipeline_lost,
            pipeline_in_fallback: self.pipeline_in_fallback - earlier.pipeline_in_fallback,
        }
    }

    /// Events missing from a trail (refused requests are not: they were never served).
    pub(crate) fn missing(self) -> u64 {
        self.queue_full
            + self.queue_bytes
            + self.wait_timeout
            + self.closed
            + self.sink_failed
            + self.abandoned
            + self.spill_full
            + self.corrupt
            + self.in_fallback
            + self.pipeline_lost
            + self.pipeline_in_fallback
    }

    pub(crate) fn by_reason(self) -> [(&'static str, u64); 12] {
        [
            ("queue_full", self.queue_full),
            ("queue_bytes", self.queue_bytes),
            ("wait_timeout", self.wait_timeout),
            ("closed", self.closed),
            ("refused", self.refused),
            ("sink_failed", self.sink_failed),
            ("abandoned", self.abandoned),
            ("spill_full", self.spill_full),
            ("corrupt", self.corrupt),
            ("in_fallback", self.in_fallback),
            ("pipeline_lost", self.pipeline_lost),
            ("pipeline_in_fallback", self.pipeline_in_fallback),
        ]
    }
}

/// Which trail a ledger describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Trail {
    Primary,
    Fallback,
}

/// What one trail has been told so far.
#[derive(Debug)]
pub(crate) struct Ledger {
    trail: Trail,
    reported: Losses,
}

/// A gap event due to a trail, with the counts it settles once written.
#[derive(Debug)]
pub(crate) struct Due {
    pub(crate) upto: Losses,
    pub(crate) event: AuditEvent,
}

impl Ledger {
    pub(crate) fn new(trail: Trail) -> Self {
        Ledger { trail, reported: Losses::default() }
    }

    /// This trail's view of `now`: the fallback's own contents are not missing from it.
    fn view(&self, mut now: Losses) -> Losses {
        if self.trail == Trail::Fallback {
            now.in_fallback = 0;
            now.pipeline_in_fallback = 0;
        }
        now
    }

    /// Whether events are missing from this trail that it has not been told about. Refused requests never
    /// make a gap event due by themselves (nothing is missing); they ride along in the next one. Nor do the
    /// pipeline's own events in the fallback: while the primary is down, the primary's gap events go there, and
    /// each would make the next one due, a gap event per tick without traffic.
    pub(crate) fn is_due(&self, now: Losses) -> bool {
        let new = self.view(now).since(self.reported);
        new.missing() > new.pipeline_in_fallback
    }

    /// What the trail has not been told, as a count of missing events the application offered (the
    /// pipeline's own are left out).
    pub(crate) fn unreported(&self, now: Losses) -> u64 {
        let new = self.view(now).since(self.reported);
        new.missing() - new.pipeline_lost - new.pipeline_in_fallback
    }

    /// The gap event for what this trail has not been told about, if one [is due](Self::is_due).
    pub(crate) fn due(&self, now: Losses) -> Option<Due> {
        self.is_due(now).then(|| self.last(now)).flatten()
    }

    /// The gap event for what this trail has not been told about, if anything: at shutdown, the last chance to
    /// declare even the pipeline's own events in the fallback.
    pub(crate) fn last(&self, now: Losses) -> Option<Due> {
        let upto = self.view(now);
        let new = upto.since(self.reported);
        (new.missing() > 0).then(|| Due { upto, event: gap_event(new, self.trail) })
    }

    /// The gap event made `upto` was written: its counts are reported.
    pub(crate) fn written(&mut self, upto: Losses) {
        self.reported = upto;
    }
}

fn gap_event(new: Losses, trail: Trail) -> AuditEvent {
    let mut event = AuditEvent::with_time(kind::AUDIT_GAP.into(), SystemTime::now()).outcome(Outcome::Error);
    event.attributes.insert("lost".into(), new.missing().to_string());
    event.attributes.insert(
        "trail".into(),
        match trail {
            Trail::Primary => "primary",
            Trail::Fallback => "fallback",
        }
        .into(),
    );
    for (reason, n) in new.by_reason() {
        if n > 0 {
            event.attributes.insert(reason.into(), n.to_string());
        }
    }
    event
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(queue_full: u64, refused: u64, fallback_written: u64) -> Stats {
        Stats { dropped_queue_full: queue_full, refused, fallback_written, ..Stats::default() }
    }

    #[test]
    fn gap_events_are_not_cumulative_and_name_each_reason() {
        let mut ledger = Ledger::new(Trail::Primary);
        assert!(ledger.due(Losses::of(&stats(0, 2, 0))).is_none(), "refused requests alone: nothing is missing");
        let first = ledger.due(Losses::of(&stats(3, 2, 0))).unwrap();
        assert_eq!(first.event.kind, kind::AUDIT_GAP);
        assert_eq!(first.event.attributes["lost"], "3", "refused requests are not missing events");
        assert_eq!(first.event.attributes["queue_full"], "3");
        assert_eq!(first.event.attributes["refused"], "2");
        assert!(!first.event.attributes.contains_key("wait_timeout"));
        ledger.written(first.upto);
        assert!(ledger.due(Losses::of(&stats(3, 2, 0))).is_none());
        let second = ledger.due(Losses::of(&stats(5, 2, 0))).unwrap();
        assert_eq!(second.event.attributes["lost"], "2");
    }

    #[test]
    fn a_gap_event_not_written_is_carried_into_the_next() {
        let ledger = Ledger::new(Trail::Primary);
        let _failed = ledger.due(Losses::of(&stats(3, 0, 0))).unwrap();
        let next = ledger.due(Losses::of(&stats(4, 0, 0))).unwrap();
        assert_eq!(next.event.attributes["queue_full"], "4");
    }

    #[test]
    fn the_fallback_trail_does_not_count_its_own_contents_as_missing() {
        let primary = Ledger::new(Trail::Primary);
        let fallback = Ledger::new(Trail::Fallback);
        let now = Losses::of(&stats(1, 0, 10));
        assert_eq!(primary.due(now).unwrap().event.attributes["lost"], "11");
        let fb = fallback.due(now).unwrap().event;
        assert_eq!(fb.attributes["lost"], "1");
        assert_eq!(fb.attributes["trail"], "fallback");
        assert!(!fallback.is_due(Losses::of(&stats(0, 0, 10))));
    }
}
