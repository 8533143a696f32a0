//! The canonical encoding of an event, version 1: the bytes an event's chain hash covers. Specified here
//! precisely enough to verify a trail in another language.
//!
//! ```text
//! hash     = SHA-256( "tower-audit/event/v1" ‖ 0x00 ‖ prev_hash ‖ encoding )
//! encoding = u16 version
//!            ‖ 16 bytes id (UUID, big-endian as written)
//!            ‖ opt str instance ‖ opt 16 bytes boot ‖ u64 seq
//!            ‖ i64 time, in microseconds since 1970-01-01T00:00:00Z
//!            ‖ str kind ‖ str outcome ("success", "denied", "client_error", "server_error", "error", "cancelled")
//!            ‖ opt str method ‖ opt str route ‖ opt str path
//!            ‖ opt u16 status ‖ opt i32 grpc_status ‖ opt u64 latency_us
//!            ‖ opt str request_id ‖ opt str actor
//!            ‖ opt str client_addr (Rust's `IpAddr` text: dotted IPv4, RFC 5952 IPv6)
//!            ‖ opt str user_agent
//!            ‖ u32 attribute count ‖ (str key ‖ str value) per attribute, in increasing byte order of the keys
//! str      = u32 length in bytes ‖ the UTF-8 bytes
//! opt X    = 0x00 when absent, or 0x01 ‖ X
//! integers are big-endian, signed ones two's complement
//! ```
//!
//! `prev_hash` is the previous event's hash in the same boot, 32 zero bytes for the boot's first event (seq 1).
//! The event's own `prev_hash` and `hash` fields are not part of the encoding. Time has microsecond precision
//! because that is what every sink stores (RFC 3339 with six decimals, Postgres `timestamptz`).

use std::time::{Duration, SystemTime};

use crate::event::AuditEvent;

/// The domain tag hashed before every event, with its terminating zero byte.
pub(crate) const EVENT_DOMAIN: &[u8] = b"tower-audit/event/v1\0";

/// Appends the canonical encoding (version 1) of `event` to `out`.
pub(crate) fn encode(event: &AuditEvent, out: &mut Vec<u8>) {
    Fields {
        version: event.version,
        id: &event.id,
        instance: event.instance.as_deref(),
        boot: event.boot.as_ref(),
        seq: event.seq,
        time: event.time,
        kind: &event.kind,
        outcome: event.outcome.as_str(),
        method: event.method.as_deref(),
        route: event.route.as_deref(),
        path: event.path.as_deref(),
        status: event.status,
        grpc_status: event.grpc_status,
        latency_us: event.latency_us,
        request_id: event.request_id.as_deref(),
        actor: event.actor.as_deref(),
        client_addr: event.client_addr,
        user_agent: event.user_agent.as_deref(),
        attributes: event.attributes.iter().map(|(k, v)| (k.as_str(), v.as_str())),
    }
    .encode(out);
}

/// An event's fields as the encoding reads them, borrowed from an [`AuditEvent`] or from a line being verified.
pub(crate) struct Fields<'a, A> {
    pub(crate) version: u16,
    pub(crate) id: &'a uuid::Uuid,
    pub(crate) instance: Option<&'a str>,
    pub(crate) boot: Option<&'a uuid::Uuid>,
    pub(crate) seq: u64,
    pub(crate) time: SystemTime,
    pub(crate) kind: &'a str,
    pub(crate) outcome: &'a str,
    pub(crate) method: Option<&'a str>,
    pub(crate) route: Option<&'a str>,
    pub(crate) path: Option<&'a str>,
    pub(crate) status: Option<u16>,
    pub(crate) grpc_status: Option<i32>,
    pub(crate) latency_us: Option<u64>,
    pub(crate) request_id: Option<&'a str>,
    pub(crate) actor: Option<&'a str>,
    pub(crate) client_addr: Option<std::net::IpAddr>,
    pub(crate) user_agent: Option<&'a str>,
    /// In increasing byte order of the keys, each key once.
    pub(crate) attributes: A,
}

impl<'a, A: ExactSizeIterator<Item = (&'a str, &'a str)>> Fields<'a, A> {
    pub(crate) fn encode(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.version.to_be_bytes());
        out.extend_from_slice(self.id.as_bytes());
        opt_str(out, self.instance);
        opt(out, self.boot, |out, boot| out.extend_from_slice(boot.as_bytes()));
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend_from_slice(&micros(self.time).to_be_bytes());
        str(out, self.kind);
        str(out, self.outcome);
        opt_str(out, self.method);
        opt_str(out, self.route);
        opt_str(out, self.path);
        opt(out, self.status, |out, v| out.extend_from_slice(&v.to_be_bytes()));
        opt(out, self.grpc_status, |out, v| out.extend_from_slice(&v.to_be_bytes()));
        opt(out, self.latency_us, |out, v| out.extend_from_slice(&v.to_be_bytes()));
        opt_str(out, self.request_id);
        opt_str(out, self.actor);
        opt(out, self.client_addr, |out, addr| {
            if let std::net::IpAddr::V4(v4) = addr {
                return ipv4(out, v4.octets());
            }
            // The text, written in place (no allocation), after its length once known.
            let at = out.len();
            out.extend_from_slice(&[0; 4]);
            std::io::Write::write_fmt(out, format_args!("{addr}")).expect("writing into a Vec cannot fail");
            let len = (out.len() - at - 4) as u32;
            out[at..at + 4].copy_from_slice(&len.to_be_bytes());
        });
        opt_str(out, self.user_agent);
        out.extend_from_slice(&(self.attributes.len() as u32).to_be_bytes());
        for (key, value) in self.attributes {
            str(out, key);
            str(out, value);
        }
    }
}

/// An IPv4 address as its `Display` text (dotted decimal, no leading zeros), with its length in front: the
/// common case written without the formatting machinery.
fn ipv4(out: &mut Vec<u8>, octets: [u8; 4]) {
    let mut text = [0u8; 15];
    let mut len = 0;
    for (i, octet) in octets.into_iter().enumerate() {
        if i > 0 {
            text[len] = b'.';
            len += 1;
        }
        if octet >= 100 {
            text[len] = b'0' + octet / 100;
            len += 1;
        }
        if octet >= 10 {
            text[len] = b'0' + octet / 10 % 10;
            len += 1;
        }
        text[len] = b'0' + octet % 10;
        len += 1;
    }
    str(out, std::str::from_utf8(&text[..len]).expect("digits and dots are ASCII"));
}

pub(crate) fn micros(time: SystemTime) -> i64 {
    match time.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_micros()).unwrap_or(i64::MAX),
        Err(before) => -i64::try_from(round_up_micros(before.duration())).unwrap_or(i64::MAX),
    }
}

/// A duration before the epoch in whole microseconds, rounded away from it (so truncation is toward the past).
fn round_up_micros(d: Duration) -> u128 {
    d.as_nanos().div_ceil(1000)
}

fn str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn opt_str(out: &mut Vec<u8>, s: Option<&str>) {
    opt(out, s, str);
}

fn opt<T>(out: &mut Vec<u8>, value: Option<T>, write: impl FnOnce(&mut Vec<u8>, T)) {
    match value {
        Some(value) => {
            out.push(1);
            write(out, value);
        }
        None => out.push(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The encoding of a known event, byte for byte: what another implementation must reproduce.
    #[test]
    fn a_known_event_encodes_to_known_bytes() {
        let mut event = AuditEvent::new("auth.login");
        event.version = 3;
        event.id = uuid::Uuid::from_u128(0x0102);
        event.seq = 7;
        event.time = SystemTime::UNIX_EPOCH + Duration::from_nanos(1_500);
        event.status = Some(401);
        event.client_addr = Some("::1".parse().unwrap());
        event.attributes.insert("b".into(), "2".into());
        event.attributes.insert("a".into(), "é".into());
        let mut out = Vec::new();
        encode(&event, &mut out);
        let mut want = vec![0, 3];
        want.extend_from_slice(&[0; 14]);
        want.extend_from_slice(&[1, 2]);
        want.extend_from_slice(&[0, 0]); // no instance, no boot
        want.extend_from_slice(&7u64.to_be_bytes());
        want.extend_from_slice(&1i64.to_be_bytes()); // 1.5 µs, truncated
        want.extend_from_slice(&[0, 0, 0, 10]);
        want.extend_from_slice(b"auth.login");
        want.extend_from_slice(&[0, 0, 0, 7]);
        want.extend_from_slice(b"success");
        want.extend_from_slice(&[0, 0, 0]); // method, route, path
        want.extend_from_slice(&[1, 1, 145]); // status 401
        want.extend_from_slice(&[0, 0, 0, 0]); // grpc_status, latency_us, request_id, actor
        want.extend_from_slice(&[1, 0, 0, 0, 3, b':', b':', b'1']);
        want.push(0); // user_agent
        want.extend_from_slice(&[0, 0, 0, 2, 0, 0, 0, 1, b'a', 0, 0, 0, 2, 0xc3, 0xa9, 0, 0, 0, 1, b'b']);
        want.extend_from_slice(&[0, 0, 0, 1, b'2']);
        assert_eq!(out, want);
    }

    #[test]
    fn ipv4_is_encoded_as_its_display_text() {
        for text in ["0.0.0.0", "9.10.99.100", "255.255.255.255", "203.0.113.9", "10.200.3.45"] {
            let addr: std::net::Ipv4Addr = text.parse().unwrap();
            let mut out = Vec::new();
            ipv4(&mut out, addr.octets());
            assert_eq!(out[..4], (text.len() as u32).to_be_bytes());
            assert_eq!(&out[4..], addr.to_string().as_bytes());
        }
    }

    #[test]
    fn time_before_the_epoch_truncates_toward_the_past() {
        assert_eq!(micros(SystemTime::UNIX_EPOCH - Duration::from_nanos(1)), -1);
        assert_eq!(micros(SystemTime::UNIX_EPOCH - Duration::from_micros(2)), -2);
        assert_eq!(micros(SystemTime::UNIX_EPOCH + Duration::from_nanos(999)), 0);
    }
}
