//! What a spill record's payload holds: one event, as `[format][origin][event]`, where `format` is
//! [`FORMAT`], `origin` says who made the event (the accounting differs), and the event is
//! [postcard](https://docs.rs/postcard)-encoded [`AuditEvent`] (its serde form: fields in declaration order,
//! `time` as an RFC 3339 string, `id` and `boot` as 16 bytes).

use crate::event::AuditEvent;

/// The payload format this version writes. It reads [`FORMAT_V1`] too.
pub(crate) const FORMAT: u8 = 2;

/// Format 1: an event of schema version 2, without the chain fields (`prev_hash`, `hash`) that end version 3.
/// Postcard is positional, and `None` is one zero byte, so such an event decodes as today's with two zero bytes
/// appended.
pub(crate) const FORMAT_V1: u8 = 1;

/// Who made an event: the accounting of a recovered or delivered event depends on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Origin {
    /// A request's event or a custom one: counted in `accepted` (or `recovered`) and then `written`.
    User = 0,
    /// An `audit.gap` event: counted in `gap_events` once written.
    Gap = 1,
    /// An `audit.boot` or `audit.shutdown` event: counted nowhere.
    Lifecycle = 2,
}

impl Origin {
    fn from_byte(byte: u8) -> Option<Self> {
        [Origin::User, Origin::Gap, Origin::Lifecycle].into_iter().find(|o| *o as u8 == byte)
    }
}

/// Appends the payload of `event` to `out`.
pub(crate) fn encode(event: &AuditEvent, origin: Origin, out: &mut Vec<u8>) {
    out.extend_from_slice(&[FORMAT, origin as u8]);
    // Writing into a Vec cannot fail, and every field of an event serialises.
    postcard::to_io(event, &mut *out).expect("an audit event always encodes");
}

/// The origin of a payload, read without decoding the event.
pub(crate) fn origin(payload: &[u8]) -> Option<Origin> {
    match payload {
        [FORMAT | FORMAT_V1, origin, ..] => Origin::from_byte(*origin),
        _ => None,
    }
}

/// Why a payload that passed its checksum still did not decode: written by another (newer) version.
#[derive(Debug, thiserror::Error)]
#[error("spill record in an unknown format (format byte {format}, origin byte {origin}): {detail}")]
pub(crate) struct DecodeError {
    format: u8,
    origin: u8,
    detail: String,
}

pub(crate) fn decode(payload: &[u8]) -> Result<(Origin, AuditEvent), DecodeError> {
    let error = |detail: String| DecodeError {
        format: payload.first().copied().unwrap_or(0),
        origin: payload.get(1).copied().unwrap_or(0),
        detail,
    };
    let origin = origin(payload).ok_or_else(|| error("not a format this version reads".into()))?;
    let event = if payload[0] == FORMAT_V1 {
        postcard::from_bytes(&[&payload[2..], &[0, 0]].concat())
    } else {
        postcard::from_bytes(&payload[2..])
    };
    let event = event.map_err(|e| error(e.to_string()))?;
    Ok((origin, event))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_field_survives_a_round_trip() {
        let mut event = crate::event::tests::every_field();
        event.client_addr = Some("2001:db8::1".parse().unwrap());
        let mut payload = Vec::new();
        encode(&event, Origin::Gap, &mut payload);
        assert_eq!(origin(&payload), Some(Origin::Gap));
        let (origin, decoded) = decode(&payload).unwrap();
        assert_eq!((origin, decoded), (Origin::Gap, event));
    }

    #[test]
    fn a_format_1_record_decodes_without_chain_fields() {
        let mut event = crate::event::tests::every_field();
        event.prev_hash = Some(crate::event::Hash([1; 32]));
        event.hash = Some(crate::event::Hash([2; 32]));
        let mut payload = Vec::new();
        encode(&event, Origin::User, &mut payload);
        // Format 1 is format 2 without the two trailing fields: here both `Some`, 1 + 32 bytes each.
        let v1 = [&[FORMAT_V1], &payload[1..payload.len() - 66]].concat();
        let (origin, decoded) = decode(&v1).unwrap();
        event.prev_hash = None;
        event.hash = None;
        assert_eq!((origin, decoded), (Origin::User, event));
    }

    #[test]
    fn an_unknown_format_is_refused_with_its_bytes_named() {
        let err = decode(&[9, 0, 1, 2]).unwrap_err().to_string();
        assert!(err.contains("format byte 9"), "{err}");
        assert_eq!(origin(&[FORMAT, 7]), None);
        assert!(decode(&[FORMAT, 0, 0xff]).is_err());
    }
}
