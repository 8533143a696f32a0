//! A JSON line read without building the event: every text borrowed from the line, for the verifier's common
//! case (a row whose hash matches and that is only a place in the chain). A line with an escaped text cannot
//! be borrowed; the reader then parses it into an [`AuditEvent`](crate::AuditEvent) as before.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::SystemTime;

use serde::Deserialize;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::canonical::{self, Fields};
use crate::event::{Hash, Outcome, kind};

/// The fields of [`AuditEvent`](crate::AuditEvent), as its `Deserialize` reads them (the same names, the same
/// required and defaulted fields, unknown fields ignored, a repeated field refused), with the texts borrowed.
#[derive(Debug, Deserialize)]
pub(crate) struct Line<'a> {
    version: u16,
    id: Uuid,
    #[serde(default, borrow)]
    instance: Option<&'a str>,
    #[serde(default)]
    boot: Option<Uuid>,
    seq: u64,
    #[serde(with = "crate::event::rfc3339")]
    time: SystemTime,
    kind: &'a str,
    outcome: Outcome,
    #[serde(default, borrow)]
    method: Option<&'a str>,
    #[serde(borrow)]
    route: Option<&'a str>,
    #[serde(borrow)]
    path: Option<&'a str>,
    status: Option<u16>,
    grpc_status: Option<i32>,
    latency_us: Option<u64>,
    #[serde(borrow)]
    request_id: Option<&'a str>,
    #[serde(borrow)]
    actor: Option<&'a str>,
    client_addr: Option<IpAddr>,
    #[serde(borrow)]
    user_agent: Option<&'a str>,
    #[serde(borrow)]
    attributes: BTreeMap<&'a str, &'a str>,
    #[serde(default)]
    prev_hash: Option<Hash>,
    #[serde(default)]
    hash: Option<Hash>,
}

impl Line<'_> {
    /// The row's place in the chain, when it is an ordinary row (not a pipeline event, which the verifier reads
    /// whole) with an instance and both hashes, and its stored hash is the hash of its content.
    pub(crate) fn plain(&self, buf: &mut Vec<u8>) -> Option<(Option<Uuid>, u64, Hash, Hash)> {
        let (prev, hash) = (self.prev_hash?, self.hash?);
        if kind::is_pipeline(self.kind) || self.instance.is_none() {
            return None;
        }
        buf.clear();
        buf.extend_from_slice(canonical::EVENT_DOMAIN);
        buf.extend_from_slice(&prev.0);
        self.fields().encode(buf);
        (Hash(Sha256::digest(&buf[..]).into()) == hash).then_some((self.boot, self.seq, prev, hash))
    }

    fn fields(&self) -> Fields<'_, impl ExactSizeIterator<Item = (&str, &str)>> {
        Fields {
            version: self.version,
            id: &self.id,
            instance: self.instance,
            boot: self.boot.as_ref(),
            seq: self.seq,
            time: self.time,
            kind: self.kind,
            outcome: self.outcome.as_str(),
            method: self.method,
            route: self.route,
            path: self.path,
            status: self.status,
            grpc_status: self.grpc_status,
            latency_us: self.latency_us,
            request_id: self.request_id,
            actor: self.actor,
            client_addr: self.client_addr,
            user_agent: self.user_agent,
            attributes: self.attributes.iter().map(|(k, v)| (*k, *v)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::AuditEvent;
    use crate::integrity::hash_with;

    fn chained(mut event: AuditEvent) -> AuditEvent {
        event.instance = Some("host-1".into());
        event.boot = Some(Uuid::from_u128(9));
        event.seq = 12;
        event.prev_hash = Some(Hash([5; 32]));
        event.hash = Some(hash_with(&Hash([5; 32]), &event, &mut Vec::new()));
        event
    }

    /// The borrowed reading hashes exactly as the event does: every field set, IPv4 and IPv6, several
    /// attributes (in a map, so in key order), and a line with fields it does not know.
    #[test]
    fn a_line_hashes_as_its_event() {
        let mut event = AuditEvent::new("auth.login").actor("alice").attribute("b", "2").attribute("a", "é");
        event.method = Some("PATCH".into());
        event.route = Some("/r/{id}".into());
        event.path = Some("/r/7".into());
        event.status = Some(201);
        event.grpc_status = Some(3);
        event.latency_us = Some(99);
        event.request_id = Some("req".into());
        event.user_agent = Some("ua".into());
        for addr in ["203.0.113.9", "2001:db8::1"] {
            event.client_addr = Some(addr.parse().unwrap());
            let event = chained(event.clone());
            let mut json: serde_json::Value = serde_json::to_value(&event).unwrap();
            json["unknown_field"] = "ignored".into();
            let text = serde_json::to_string(&json).unwrap();
            let line: Line<'_> = serde_json::from_str(&text).unwrap();
            let plain = line.plain(&mut Vec::new());
            assert_eq!(plain, Some((event.boot, 12, Hash([5; 32]), event.hash.unwrap())), "{addr}");
        }
        // Sparse: every optional field absent.
        let event = chained(AuditEvent::new("custom"));
        let text = serde_json::to_string(&event).unwrap();
        let line: Line<'_> = serde_json::from_str(&text).unwrap();
        assert_eq!(line.plain(&mut Vec::new()).map(|p| p.3), event.hash);
    }

    #[test]
    fn an_edited_pipeline_or_unchained_line_is_not_plain_and_escapes_are_not_borrowed() {
        let event = chained(AuditEvent::new("auth.login").actor("alice"));
        let text = serde_json::to_string(&event).unwrap().replace("alice", "mallory");
        let line: Line<'_> = serde_json::from_str(&text).unwrap();
        assert_eq!(line.plain(&mut Vec::new()), None, "edited");
        let boot = chained(AuditEvent::new(kind::AUDIT_BOOT));
        let text = serde_json::to_string(&boot).unwrap();
        let line: Line<'_> = serde_json::from_str(&text).unwrap();
        assert_eq!(line.plain(&mut Vec::new()), None, "a pipeline event");
        let mut bare = chained(AuditEvent::new("x"));
        bare.instance = None;
        let text = serde_json::to_string(&bare).unwrap();
        let line: Line<'_> = serde_json::from_str(&text).unwrap();
        assert_eq!(line.plain(&mut Vec::new()), None, "no instance");
        let escaped = serde_json::to_string(&chained(AuditEvent::new("x").actor("a\"b"))).unwrap();
        assert!(serde_json::from_str::<Line<'_>>(&escaped).is_err(), "an escaped text cannot be borrowed");
    }
}
