//! Checkpoints: what the worker signs, in the [C2SP signed note](https://c2sp.org/signed-note) format, and the
//! verifier key that checks them.
//!
//! A checkpoint's note text is six lines, then a blank line, then the signature line:
//!
//! ```text
//! tower-audit/checkpoint/v1
//! <instance>
//! <boot, a UUID>
//! <seq of the last event covered>
//! <hash of that event, 64 hex digits>
//! <time of the checkpoint, RFC 3339 with microseconds>
//!
//! — <key name> <base64(key id ‖ Ed25519 signature of the six lines, each ending in a newline)>
//! ```
//!
//! The key id is the first 4 bytes of `SHA-256(key name ‖ "\n" ‖ 0x01 ‖ public key)`, as C2SP specifies for
//! Ed25519. In the trail, a checkpoint is an event (`audit.checkpoint`, or the boot's `audit.shutdown`) whose
//! attributes `checkpoint.seq`, `checkpoint.hash`, `checkpoint.key` (`<name>+<key id>`) and
//! `checkpoint.signature` (base64), with the event's own instance, boot and time, rebuild the note.

use std::fmt;
use std::str::FromStr;
use std::time::SystemTime;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::event::{AuditEvent, Hash};

const ORIGIN: &str = "tower-audit/checkpoint/v1";
const ED25519: u8 = 0x01;

/// The attributes of a checkpoint event.
pub(crate) const SEQ: &str = "checkpoint.seq";
pub(crate) const HASH: &str = "checkpoint.hash";
pub(crate) const KEY: &str = "checkpoint.key";
pub(crate) const SIGNATURE: &str = "checkpoint.signature";
/// The prefix of the attributes by which an `audit.boot` event references the previous boot's last checkpoint.
const PREVIOUS: &str = "previous_checkpoint.";

pub(crate) fn is_key_name(name: &str) -> bool {
    !name.is_empty() && !name.chars().any(|c| c.is_whitespace() || c.is_control() || c == '+')
}

fn key_id(name: &str, key: &VerifyingKey) -> [u8; 4] {
    let digest =
        Sha256::new().chain_update(name).chain_update([b'\n', ED25519]).chain_update(key.as_bytes()).finalize();
    [digest[0], digest[1], digest[2], digest[3]]
}

/// A public key to verify checkpoints with, in the C2SP verifier key form `<name>+<key id, 8 hex digits>+<base64
/// of 0x01 ‖ the 32-byte Ed25519 public key>`.
///
/// ```
/// use tower_audit::integrity::{Integrity, VerifierKey};
///
/// let key = Integrity::from_seed(&[7; 32]).key_name("audit.example.com").verifier_key();
/// let text = key.to_string();
/// assert!(text.starts_with("audit.example.com+"));
/// assert_eq!(text.parse::<VerifierKey>().unwrap(), key);
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct VerifierKey {
    name: String,
    id: [u8; 4],
    key: VerifyingKey,
}

impl VerifierKey {
    /// The verifier key of `key`, named `name`.
    pub fn new(name: &str, key: VerifyingKey) -> Self {
        VerifierKey { name: name.to_owned(), id: key_id(name, &key), key }
    }

    /// `<name>+<key id>`, as a checkpoint event's `checkpoint.key` attribute names its key.
    pub fn label(&self) -> String {
        format!("{}+{}", self.name, const_hex::encode(self.id))
    }
}

impl fmt::Display for VerifierKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut raw = vec![ED25519];
        raw.extend_from_slice(self.key.as_bytes());
        write!(f, "{}+{}", self.label(), BASE64.encode(raw))
    }
}

impl fmt::Debug for VerifierKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VerifierKey({self})")
    }
}

impl FromStr for VerifierKey {
    type Err = CheckpointError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| CheckpointError::BadKey(format!("{why} (want <name>+<key id>+<base64 key>)"));
        let mut parts = s.trim().splitn(3, '+');
        let (Some(name), Some(id), Some(key)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(bad("not three parts"));
        };
        let raw = BASE64.decode(key).map_err(|_| bad("the key is not base64"))?;
        let [ED25519, key @ ..] = raw.as_slice() else { return Err(bad("not an Ed25519 key")) };
        let key = <[u8; 32]>::try_from(key).map_err(|_| bad("an Ed25519 key is 32 bytes"))?;
        let key = VerifyingKey::from_bytes(&key).map_err(|_| bad("not a valid Ed25519 point"))?;
        let parsed = VerifierKey::new(name, key);
        if !is_key_name(name) || const_hex::encode(parsed.id) != id {
            return Err(bad("the key id does not match the name and key"));
        }
        Ok(parsed)
    }
}

/// A signed checkpoint: the chain of one boot, up to `seq`, ends in `hash`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Checkpoint {
    /// The pipeline's instance.
    pub instance: String,
    /// The boot whose chain it covers.
    pub boot: Uuid,
    /// The last event covered.
    pub seq: u64,
    /// That event's hash.
    pub hash: Hash,
    /// When it was signed.
    pub time: SystemTime,
    /// `<key name>+<key id>` of the key that signed it.
    pub key: String,
    /// The Ed25519 signature of [`body`](Self::body).
    pub signature: [u8; 64],
}

/// Why a checkpoint or a verifier key is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CheckpointError {
    /// The text is not a checkpoint note or event.
    #[error("not a tower-audit checkpoint: {0}")]
    Malformed(String),
    /// Not a verifier key.
    #[error("not a verifier key: {0}")]
    BadKey(String),
    /// Signed by another key than the one given.
    #[error("signed by the key {found}, not by {expected}")]
    WrongKey {
        /// The key the checkpoint names.
        found: String,
        /// The key it was checked against.
        expected: String,
    },
    /// The signature does not verify: the checkpoint was altered, or forged.
    #[error("bad signature on the checkpoint of boot {boot} at seq {seq}")]
    BadSignature {
        /// The checkpoint's boot.
        boot: Uuid,
        /// The checkpoint's seq.
        seq: u64,
    },
}

impl Checkpoint {
    /// Signs the chain head `(seq, hash)` of `boot`.
    pub(crate) fn sign(
        instance: &str,
        boot: Uuid,
        seq: u64,
        hash: Hash,
        time: SystemTime,
        name: &str,
        key: &SigningKey,
    ) -> Self {
        let mut checkpoint = Checkpoint {
            instance: instance.to_owned(),
            boot,
            seq,
            hash,
            time: SystemTime::UNIX_EPOCH
                + std::time::Duration::from_micros(u64::try_from(super::canonical::micros(time)).unwrap_or_default()),
            key: VerifierKey::new(name, key.verifying_key()).label(),
            signature: [0; 64],
        };
        checkpoint.signature = key.sign(checkpoint.body().as_bytes()).to_bytes();
        checkpoint
    }

    /// The signed text: six lines, each ending in a newline.
    pub fn body(&self) -> String {
        format!(
            "{ORIGIN}\n{}\n{}\n{}\n{}\n{}\n",
            self.instance,
            self.boot,
            self.seq,
            self.hash,
            humantime::format_rfc3339_micros(self.time)
        )
    }

    /// The whole signed note, as published off-host.
    pub fn to_note(&self) -> String {
        let (name, id) = self.key.rsplit_once('+').unwrap_or((&self.key, ""));
        let mut raw = const_hex::decode(id).unwrap_or_default();
        raw.extend_from_slice(&self.signature);
        format!("{}\n\u{2014} {name} {}\n", self.body(), BASE64.encode(raw))
    }

    /// Parses a signed note made by [`to_note`](Self::to_note).
    pub fn from_note(text: &str) -> Result<Self, CheckpointError> {
        let bad = |why: &str| CheckpointError::Malformed(why.to_owned());
        let (body, signatures) = text.split_once("\n\n").ok_or_else(|| bad("no blank line before the signature"))?;
        let lines: Vec<&str> = body.split('\n').collect();
        let [ORIGIN, instance, boot, seq, hash, time] = lines.as_slice() else {
            return Err(bad("the body is not the six lines of a tower-audit checkpoint"));
        };
        let line = signatures.lines().next().ok_or_else(|| bad("no signature line"))?;
        let rest = line.strip_prefix("\u{2014} ").ok_or_else(|| bad("the signature line does not start with '— '"))?;
        let (name, sig) = rest.split_once(' ').ok_or_else(|| bad("the signature line has no signature"))?;
        let raw = BASE64.decode(sig).map_err(|_| bad("the signature is not base64"))?;
        if raw.len() != 68 {
            return Err(bad("the signature is not a 4-byte key id and 64 bytes"));
        }
        Ok(Checkpoint {
            instance: (*instance).to_owned(),
            boot: boot.parse().map_err(|_| bad("the boot is not a UUID"))?,
            seq: seq.parse().map_err(|_| bad("the seq is not a number"))?,
            hash: hash.parse().map_err(|_| bad("the hash is not 64 hex digits"))?,
            time: humantime::parse_rfc3339(time).map_err(|_| bad("the time is not RFC 3339"))?,
            key: format!("{name}+{}", const_hex::encode(&raw[..4])),
            signature: raw[4..].try_into().expect("64 bytes"),
        })
    }

    /// Reads the checkpoint an `audit.checkpoint` (or `audit.shutdown`) event carries; `None` when it carries
    /// none (integrity off).
    pub fn from_event(event: &AuditEvent) -> Option<Result<Self, CheckpointError>> {
        let signature = event.attributes.get(SIGNATURE)?;
        let bad = |why: &str| CheckpointError::Malformed(format!("event seq {}: {why}", event.seq));
        let attr = |name: &str| event.attributes.get(name).ok_or_else(|| bad(&format!("no {name} attribute")));
        let parse = || -> Result<Self, CheckpointError> {
            let raw = BASE64.decode(signature).map_err(|_| bad("the signature is not base64"))?;
            Ok(Checkpoint {
                instance: event.instance.as_deref().ok_or_else(|| bad("no instance"))?.to_owned(),
                boot: event.boot.ok_or_else(|| bad("no boot"))?,
                seq: attr(SEQ)?.parse().map_err(|_| bad("checkpoint.seq is not a number"))?,
                hash: attr(HASH)?.parse().map_err(|_| bad("checkpoint.hash is not 64 hex digits"))?,
                time: event.time,
                key: attr(KEY)?.clone(),
                signature: raw.try_into().map_err(|_| bad("the signature is not 64 bytes"))?,
            })
        };
        Some(parse())
    }

    /// The previous boot's last checkpoint that an `audit.boot` event references (attributes
    /// `previous_checkpoint.*`), when the pipeline knew it at start: from the spill directory, or given to
    /// [`Integrity::previous_checkpoint`](super::Integrity::previous_checkpoint). A verifier checks it against
    /// that boot's trail, so a boot deleted whole is noticed by the boot after it.
    pub fn previous_of(event: &AuditEvent) -> Option<Result<Self, CheckpointError>> {
        let get = |name: &str| event.attributes.get(&format!("{PREVIOUS}{name}"));
        let note = get("note")?;
        Some(BASE64.decode(note).ok().and_then(|raw| String::from_utf8(raw).ok()).map_or_else(
            || {
                Err(CheckpointError::Malformed(format!(
                    "event seq {}: previous_checkpoint.note is not base64",
                    event.seq
                )))
            },
            |text| Checkpoint::from_note(&text),
        ))
    }

    /// Writes this checkpoint into an `audit.boot` event as the previous boot's (see [`previous_of`](Self::previous_of)).
    pub(crate) fn to_boot_event(&self, event: &mut AuditEvent) {
        let attributes = &mut event.attributes;
        attributes.insert(format!("{PREVIOUS}boot"), self.boot.to_string());
        attributes.insert(format!("{PREVIOUS}seq"), self.seq.to_string());
        attributes.insert(format!("{PREVIOUS}note"), BASE64.encode(self.to_note()));
    }

    /// Writes this checkpoint into the attributes of the event that carries it.
    pub(crate) fn to_event(&self, event: &mut AuditEvent) {
        let attributes = &mut event.attributes;
        attributes.insert(SEQ.to_owned(), self.seq.to_string());
        attributes.insert(HASH.to_owned(), self.hash.to_string());
        attributes.insert(KEY.to_owned(), self.key.clone());
        attributes.insert(SIGNATURE.to_owned(), BASE64.encode(self.signature));
    }

    /// Checks the signature with `key`.
    pub fn verify(&self, key: &VerifierKey) -> Result<(), CheckpointError> {
        if self.key != key.label() {
            return Err(CheckpointError::WrongKey { found: self.key.clone(), expected: key.label() });
        }
        let bad = || CheckpointError::BadSignature { boot: self.boot, seq: self.seq };
        key.key.verify(self.body().as_bytes(), &Signature::from_bytes(&self.signature)).map_err(|_| bad())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signed() -> (Checkpoint, SigningKey) {
        let key = SigningKey::from_bytes(&[9; 32]);
        let time = SystemTime::UNIX_EPOCH + std::time::Duration::from_micros(1_700_000_000_123_456);
        (Checkpoint::sign("web-1", Uuid::from_u128(5), 42, Hash([3; 32]), time, "audit.test", &key), key)
    }

    #[test]
    fn a_checkpoint_round_trips_through_its_note_and_its_event_and_verifies() {
        let (checkpoint, key) = signed();
        let verifier = VerifierKey::new("audit.test", key.verifying_key());
        checkpoint.verify(&verifier).unwrap();
        let note = checkpoint.to_note();
        assert!(note.starts_with(&format!(
            "tower-audit/checkpoint/v1\nweb-1\n{}\n42\n{}\n2023-11-14T22:13:20.123456Z\n\n\u{2014} audit.test ",
            Uuid::from_u128(5),
            "03".repeat(32)
        )));
        assert_eq!(Checkpoint::from_note(&note).unwrap(), checkpoint);
        let mut event = AuditEvent::with_time("audit.checkpoint".into(), checkpoint.time);
        (event.instance, event.boot) = (Some("web-1".into()), Some(Uuid::from_u128(5)));
        checkpoint.to_event(&mut event);
        assert_eq!(Checkpoint::from_event(&event).unwrap().unwrap(), checkpoint);
        let mut boot = AuditEvent::new("audit.boot");
        assert!(Checkpoint::previous_of(&boot).is_none());
        checkpoint.to_boot_event(&mut boot);
        assert_eq!(Checkpoint::previous_of(&boot).unwrap().unwrap(), checkpoint);
        assert_eq!(boot.attributes["previous_checkpoint.seq"], "42");
    }

    #[test]
    fn an_altered_checkpoint_or_another_key_is_refused() {
        let (mut checkpoint, key) = signed();
        let verifier = VerifierKey::new("audit.test", key.verifying_key());
        checkpoint.seq = 41;
        assert_eq!(
            checkpoint.verify(&verifier),
            Err(CheckpointError::BadSignature { boot: Uuid::from_u128(5), seq: 41 })
        );
        let (checkpoint, _) = signed();
        let other = VerifierKey::new("audit.test", SigningKey::from_bytes(&[8; 32]).verifying_key());
        assert!(matches!(checkpoint.verify(&other), Err(CheckpointError::WrongKey { .. })));
        assert!("audit.test+00000000+AQ==".parse::<VerifierKey>().is_err());
    }
}
