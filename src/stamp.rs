//! The worker's first stage: each event of a batch gets the pipeline's identity (`instance`, `boot`), its
//! sequence number and its id, once, before any sink sees it, so all stay the same across retries and the
//! fallback. The identity itself is made here too, when the layer is built.

use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use uuid::Uuid;

use crate::error::ConfigError;
use crate::event::AuditEvent;
use crate::sanitize::{bounded, is_clean};

/// Stamps events with one pipeline run's identity and numbers them from 1, in the order the worker hands them
/// to the sinks. Cheap per event: a reference count, a copy of 16 bytes, a counter and a new id.
#[derive(Debug)]
pub(crate) struct Stamper {
    instance: Arc<str>,
    boot: Uuid,
    seq: u64,
}

impl Stamper {
    /// A stamper for the run `boot` (see [`new_boot`]) of a pipeline in the process `instance`.
    pub(crate) fn new(instance: Arc<str>, boot: Uuid) -> Self {
        Self { instance, boot, seq: 0 }
    }

    /// The seq of the last event stamped.
    pub(crate) fn seq(&self) -> u64 {
        self.seq
    }

    /// Numbers on from `seq` again: the events stamped after it were not handed to any sink (see the worker's
    /// look-ahead), and are stamped anew when they go out.
    pub(crate) fn rewind(&mut self, seq: u64) {
        self.seq = seq;
    }

    pub(crate) fn stamp(&mut self, event: &mut AuditEvent) {
        self.seq += 1;
        event.instance = Some(Arc::clone(&self.instance));
        event.boot = Some(self.boot);
        event.seq = self.seq;
        event.id = new_id(event.time);
    }
}

/// A new boot id, made when a pipeline starts: a UUIDv7 of now, so boots sort by when they began.
pub(crate) fn new_boot() -> Uuid {
    new_id(SystemTime::now())
}

/// Hex digits of the random suffix of the default instance name.
const SUFFIX_LEN: usize = 8;
/// The host name is cut to this many bytes in the default instance name (Linux allows 64).
const MAX_HOST_LEN: usize = 64;

/// The default instance name, `<host name>-<8 random hex digits>`, made once per process, so every pipeline of
/// the process shares it while two processes on one host differ. When it is longer than `max` bytes, the host
/// name is cut (the suffix is what tells processes apart).
pub(crate) fn default_instance(max: usize) -> Arc<str> {
    static NAME: OnceLock<Arc<str>> = OnceLock::new();
    let name = NAME.get_or_init(|| {
        let host = gethostname::gethostname();
        let host = bounded(host.to_string_lossy().trim(), MAX_HOST_LEN);
        let suffix = format!("{:08x}", fastrand::u32(..));
        Arc::from(if host.is_empty() { suffix } else { format!("{host}-{suffix}") })
    });
    if name.len() <= max {
        return Arc::clone(name);
    }
    let suffix = &name[name.len() - SUFFIX_LEN..];
    if max <= SUFFIX_LEN + 1 {
        return Arc::from(&suffix[..max.min(SUFFIX_LEN)]);
    }
    let mut keep = max - SUFFIX_LEN - 1;
    while !name.is_char_boundary(keep) {
        keep -= 1;
    }
    Arc::from(format!("{}-{suffix}", &name[..keep]))
}

/// A configured instance name, held to the rules of other text: 1 to `max` bytes, not blank, and none of the
/// characters that [`bounded`] would replace.
pub(crate) fn instance_name(name: &str, max: usize) -> Result<Arc<str>, ConfigError> {
    let problem = if name.trim().is_empty() {
        "is empty or blank"
    } else if name.len() > max {
        "is longer than max_field_len"
    } else if !is_clean(name) {
        "holds a control character, a line or paragraph separator, or a bidi control"
    } else {
        return Ok(Arc::from(name));
    };
    Err(ConfigError::InvalidInstance { name: name.to_owned(), problem, max_field_len: max })
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
    fn events_get_the_identity_and_sequence_numbers_from_one() {
        let boot = new_boot();
        let mut stamper = Stamper::new("web-1".into(), boot);
        let mut events = [AuditEvent::new("a"), AuditEvent::new("b")];
        events.iter_mut().for_each(|e| stamper.stamp(e));
        assert_eq!(events.each_ref().map(|e| e.seq), [1, 2]);
        for e in &events {
            assert_eq!((e.instance.as_deref(), e.boot), (Some("web-1"), Some(boot)));
        }
        assert_eq!(boot.get_version_num(), 7);
        assert_ne!(new_boot(), boot);
    }

    #[test]
    fn the_default_instance_is_the_host_and_a_suffix_made_once_per_process() {
        let host = bounded(gethostname::gethostname().to_string_lossy().trim(), MAX_HOST_LEN);
        let name = default_instance(256);
        assert_eq!(name, default_instance(256), "made once per process");
        let (head, suffix) = name.rsplit_once('-').unwrap_or(("", &name));
        assert_eq!(head, host);
        assert_eq!(suffix.len(), SUFFIX_LEN);
        assert!(suffix.bytes().all(|b| b.is_ascii_hexdigit()), "{suffix}");

        // Under a tight bound the host name is cut and the suffix kept.
        let cut = default_instance(SUFFIX_LEN + 3);
        assert!(cut.len() <= SUFFIX_LEN + 3 && cut.ends_with(&format!("-{suffix}")), "{cut}");
        assert_eq!(&*default_instance(4), &suffix[..4]);
    }

    #[test]
    fn a_configured_instance_is_held_to_the_text_rules() {
        assert_eq!(&*instance_name("api-eu-1", 8).unwrap(), "api-eu-1");
        for (name, problem) in [
            ("", "is empty or blank"),
            (" \t", "is empty or blank"),
            ("api-eu-12", "is longer than max_field_len"),
            ("api\nx", "holds a control character, a line or paragraph separator, or a bidi control"),
            ("api\u{202e}", "holds a control character, a line or paragraph separator, or a bidi control"),
        ] {
            let err = instance_name(name, 8).unwrap_err();
            assert!(
                matches!(&err, ConfigError::InvalidInstance { name: n, problem: p, max_field_len: 8 } if n == name && *p == problem),
                "{name:?}: {err}"
            );
        }
    }
}
