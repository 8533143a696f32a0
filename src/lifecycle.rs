//! The worker's own bookends of a boot: `audit.boot`, written first, says who started with which settings
//! (and, with a spill, what became of the boot before); `audit.shutdown`, written last at a clean shutdown,
//! carries the final counters. A boot without a shutdown event ended uncleanly.

use std::time::SystemTime;

use uuid::Uuid;

use crate::event::{AuditEvent, Outcome, kind};
use crate::spill::SyncPolicy;
use crate::{Overflow, Stats};

/// The settings an auditor needs to read a boot's trail.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) capacity: usize,
    pub(crate) max_queued_bytes: usize,
    pub(crate) batch_size: usize,
    pub(crate) overflow: Overflow,
    pub(crate) spill: Option<(SyncPolicy, u64)>,
}

/// The last boot on a spill directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Last {
    /// No boot had used it.
    None,
    /// Some boot had (records are there), but the file that names it is missing or unreadable.
    Unknown,
    /// This boot, and whether it ended cleanly.
    Boot(Uuid, bool),
}

/// What a spill knew, at start, about the boots before this one.
#[derive(Debug, Clone)]
pub(crate) struct Previous {
    pub(crate) boot: Last,
    /// Events of earlier boots found unacknowledged, to be replayed (the worker's own events not counted).
    pub(crate) replayed: u64,
    /// Records skipped because they failed their checksum: known lost.
    pub(crate) corrupt: u64,
    /// Bytes of a torn tail cut off the log (a record being written when the process died).
    pub(crate) torn_bytes: u64,
}

pub(crate) fn boot_event(settings: &Settings, previous: Option<&Previous>) -> AuditEvent {
    let mut event = AuditEvent::with_time(kind::AUDIT_BOOT.into(), SystemTime::now());
    let overflow = match settings.overflow {
        Overflow::Drop => "drop".to_owned(),
        Overflow::Wait(d) => format!("wait {}", humantime::format_duration(d)),
        Overflow::FailClosed => "fail_closed".to_owned(),
    };
    let mut attributes = vec![
        ("version", env!("CARGO_PKG_VERSION").to_owned()),
        ("capacity", settings.capacity.to_string()),
        ("max_queued_bytes", settings.max_queued_bytes.to_string()),
        ("batch_size", settings.batch_size.to_string()),
        ("overflow", overflow),
        ("spill", if settings.spill.is_some() { "on" } else { "off" }.to_owned()),
    ];
    if let Some((sync, max_bytes)) = settings.spill {
        attributes.push((
            "spill_sync",
            match sync {
                SyncPolicy::EveryBatch => "every_batch".to_owned(),
                SyncPolicy::Interval(d) => format!("interval {}", humantime::format_duration(d)),
            },
        ));
        attributes.push(("spill_max_bytes", max_bytes.to_string()));
    }
    if let Some(previous) = previous {
        match previous.boot {
            Last::Boot(boot, clean) => {
                attributes.push(("previous_boot", boot.to_string()));
                attributes.push(("previous_ended", if clean { "clean" } else { "crashed" }.to_owned()));
            }
            Last::None => attributes.push(("previous_boot", "none".to_owned())),
            Last::Unknown => {
                attributes.push(("previous_boot", "unknown".to_owned()));
                attributes.push(("previous_ended", "unknown".to_owned()));
            }
        }
        attributes.push(("replayed", previous.replayed.to_string()));
        attributes.push(("corrupt", previous.corrupt.to_string()));
        attributes.push(("torn_bytes", previous.torn_bytes.to_string()));
    }
    event.attributes.extend(attributes.into_iter().map(|(k, v)| (k.to_owned(), v)));
    event
}

/// The last event of a clean boot: every counter of `stats` as an attribute (with `offered` and `missing`).
pub(crate) fn shutdown_event(stats: &Stats) -> AuditEvent {
    let mut event = AuditEvent::with_time(kind::AUDIT_SHUTDOWN.into(), SystemTime::now())
        .outcome(if stats.missing() == 0 { Outcome::Success } else { Outcome::Error });
    if let Ok(serde_json::Value::Object(fields)) = serde_json::to_value(stats) {
        event.attributes.extend(fields.into_iter().map(|(k, v)| (k, v.to_string())));
    }
    event.attributes.insert("offered".into(), stats.offered().to_string());
    event.attributes.insert("missing".into(), stats.missing().to_string());
    event
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn the_boot_event_names_the_settings_and_the_previous_boot() {
        let settings = Settings {
            capacity: 64,
            max_queued_bytes: 1024,
            batch_size: 8,
            overflow: Overflow::Wait(Duration::from_millis(5)),
            spill: Some((SyncPolicy::EveryBatch, 4096)),
        };
        let previous = Previous { boot: Last::Boot(Uuid::from_u128(3), false), replayed: 7, corrupt: 1, torn_bytes: 9 };
        let event = boot_event(&settings, Some(&previous));
        assert_eq!(event.kind, kind::AUDIT_BOOT);
        let got: Vec<_> = event.attributes.iter().map(|(k, v)| format!("{k}={v}")).collect();
        assert_eq!(
            got,
            [
                "batch_size=8",
                "capacity=64",
                "corrupt=1",
                "max_queued_bytes=1024",
                "overflow=wait 5ms",
                "previous_boot=00000000-0000-0000-0000-000000000003",
                "previous_ended=crashed",
                "replayed=7",
                "spill=on",
                "spill_max_bytes=4096",
                "spill_sync=every_batch",
                "torn_bytes=9",
                &format!("version={}", env!("CARGO_PKG_VERSION")),
            ]
        );
        let plain = boot_event(&Settings { spill: None, overflow: Overflow::Drop, ..settings }, None);
        assert_eq!((plain.attributes["spill"].as_str(), plain.attributes["overflow"].as_str()), ("off", "drop"));
        assert!(!plain.attributes.contains_key("previous_boot"));
    }

    #[test]
    fn the_shutdown_event_carries_every_counter() {
        let stats = Stats { accepted: 5, written: 4, dropped_queue_full: 2, queued: 1, ..Stats::default() };
        let event = shutdown_event(&stats);
        assert_eq!(event.kind, kind::AUDIT_SHUTDOWN);
        assert_eq!(event.outcome, Outcome::Error, "2 events are missing");
        for (k, v) in [("accepted", "5"), ("written", "4"), ("offered", "7"), ("missing", "2"), ("left_in_spill", "0")]
        {
            assert_eq!(event.attributes[k], v, "{k}");
        }
        assert_eq!(shutdown_event(&Stats::default()).outcome, Outcome::Success);
    }
}
