//! The worker's first stage: each event of a batch gets its sequence number and its id, once, before any
//! sink sees it, so both stay the same across retries and the fallback.

use std::time::SystemTime;

use crate::event::AuditEvent;

/// Numbers events from 1, in the order the worker hands them to the sinks.
#[derive(Debug, Default)]
pub(crate) struct Stamper {
    seq: u64,
}

impl Stamper {
    pub(crate) fn stamp(&mut self, event: &mut AuditEvent) {
        self.seq += 1;
        event.seq = self.seq;
        event.id = new_id(event.time);
    }
}

/// A UUIDv7 from the event's time and random bits (made here on the worker, never on the request path).
pub(crate) fn new_id(time: SystemTime) -> uuid::Uuid {
    let millis = time.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let random: [u8; 16] = fastrand::u128(..).to_le_bytes();
    let mut bytes = [0u8; 10];
    bytes.copy_from_slice(&random[..10]);
    uuid::Builder::from_unix_timestamp_millis(millis, &bytes).into_uuid()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn ids_are_version_7_and_ordered_by_time() {
        let early = new_id(SystemTime::UNIX_EPOCH + Duration::from_secs(1_000));
        let late = new_id(SystemTime::UNIX_EPOCH + Duration::from_secs(2_000));
        assert_eq!(early.get_version_num(), 7);
        assert!(early < late);
    }

    #[test]
    fn sequence_numbers_count_from_one() {
        let mut stamper = Stamper::default();
        let mut events = [AuditEvent::new("a"), AuditEvent::new("b")];
        events.iter_mut().for_each(|e| stamper.stamp(e));
        assert_eq!(events.map(|e| e.seq), [1, 2]);
    }
}
