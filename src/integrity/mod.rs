//! Tamper evidence, opt-in: every event the worker writes is linked into a hash chain per boot, and signed
//! checkpoints of the chain go into the trail and, optionally, to a sink elsewhere (the off-host anchor).
//!
//! - the canonical encoding: the bytes an event's hash covers (specified in the README's "Integrity" section,
//!   versioned);
//! - [`Checkpoint`]: what a checkpoint signs, as a [C2SP signed note](https://c2sp.org/signed-note) with an
//!   Ed25519 key;
//! - `chain`: the worker's stage that links events and signs checkpoints;
//! - [`verify`]: the verifier, which reads a trail back and names every way it was tampered with.

pub(crate) mod canonical;
pub(crate) mod chain;
mod line;
mod note;
mod read;
mod verify;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use ed25519_dalek::{SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

use crate::error::ConfigError;
use crate::event::{AuditEvent, Hash};
use crate::sink::{AuditSink, DynSink};

pub use self::note::{Checkpoint, CheckpointError, VerifierKey};
#[cfg(feature = "postgres")]
pub use self::read::verify_postgres;
#[cfg(feature = "sqlite")]
pub use self::read::verify_sqlite;
pub use self::read::{ReadError, read_json_lines, verify_json_lines};
pub use self::verify::{BootReport, Finding, Rejected, Report, SeqRange, Unreadable, Verifier, verify};
/// The Ed25519 implementation the keys come from ([`ed25519-dalek`](https://docs.rs/ed25519-dalek)), with its
/// PKCS#8 support, for making or encoding keys.
pub use ed25519_dalek as ed25519;

/// Checkpoints are signed every this many events by default…
pub const DEFAULT_CHECKPOINT_EVERY: u64 = 4096;
/// …or after this long, whichever comes first, traffic or not (a heartbeat).
pub const DEFAULT_CHECKPOINT_INTERVAL: Duration = Duration::from_secs(60);

/// The hash that links `event` after `prev` in its boot's chain: `SHA-256("tower-audit/event/v1" ‖ 0x00 ‖
/// prev ‖ canonical encoding of event)`. The event's own `prev_hash` and `hash` fields are not covered.
///
/// ```
/// use tower_audit::{AuditEvent, Hash, integrity::event_hash};
///
/// let event = AuditEvent::new("auth.login");
/// assert_eq!(event_hash(&Hash::ZERO, &event), event_hash(&Hash::ZERO, &event));
/// assert_ne!(event_hash(&Hash::ZERO, &event), event_hash(&Hash([1; 32]), &event));
/// ```
pub fn event_hash(prev: &Hash, event: &AuditEvent) -> Hash {
    let mut buf = Vec::with_capacity(512);
    hash_with(prev, event, &mut buf)
}

/// [`event_hash`] with a buffer to reuse.
pub(crate) fn hash_with(prev: &Hash, event: &AuditEvent, buf: &mut Vec<u8>) -> Hash {
    buf.clear();
    buf.extend_from_slice(canonical::EVENT_DOMAIN);
    buf.extend_from_slice(&prev.0);
    canonical::encode(event, buf);
    Hash(Sha256::digest(&buf[..]).into())
}

/// Integrity for a pipeline: give it to [`AuditLayerBuilder::integrity`](crate::AuditLayerBuilder::integrity).
///
/// ```
/// use std::time::Duration;
/// use tower_audit::{AuditLayer, JsonLinesSink, MemorySink, integrity::Integrity};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let dir = tempfile::tempdir()?;
/// let integrity = Integrity::from_seed(&[7; 32]) // or Integrity::from_pem(&std::fs::read_to_string("audit.pem")?)?
///     .key_name("audit.example.com")
///     .checkpoint_every(1000)
///     .checkpoint_interval(Duration::from_secs(30))
///     .checkpoint_sink(JsonLinesSink::open(dir.path().join("checkpoints.jsonl"))?);
/// println!("verify with {}", integrity.verifier_key());
/// let (layer, handle) = AuditLayer::builder(MemorySink::new()).integrity(integrity).build()?;
/// # let _ = (layer, handle);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Integrity {
    pub(crate) key: SigningKey,
    pub(crate) key_name: String,
    pub(crate) every: u64,
    pub(crate) interval: Duration,
    pub(crate) sink: Option<Arc<dyn DynSink>>,
    pub(crate) previous: Option<Checkpoint>,
}

impl Integrity {
    /// Signs checkpoints with `key`, named `tower-audit` (see [`key_name`](Self::key_name)).
    pub fn new(key: SigningKey) -> Self {
        Integrity {
            key,
            key_name: "tower-audit".to_owned(),
            every: DEFAULT_CHECKPOINT_EVERY,
            interval: DEFAULT_CHECKPOINT_INTERVAL,
            sink: None,
            previous: None,
        }
    }

    /// The Ed25519 key whose 32-byte seed (secret key) is `seed`.
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        Integrity::new(SigningKey::from_bytes(seed))
    }

    /// The Ed25519 key in a PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`, as `openssl genpkey -algorithm ed25519`
    /// writes it).
    pub fn from_pem(pem: &str) -> Result<Self, ConfigError> {
        use ed25519_dalek::pkcs8::DecodePrivateKey;
        SigningKey::from_pkcs8_pem(pem).map(Integrity::new).map_err(|e| ConfigError::InvalidSigningKey(e.to_string()))
    }

    /// The key's name in every checkpoint's signature line (and in the verifier key): usually the service's
    /// host name. Must be non-empty, without spaces, `+` or control characters.
    pub fn key_name(mut self, name: impl Into<String>) -> Self {
        self.key_name = name.into();
        self
    }

    /// Signs a checkpoint every `n` events (default [`DEFAULT_CHECKPOINT_EVERY`]); at least 1.
    pub fn checkpoint_every(mut self, n: u64) -> Self {
        self.every = n;
        self
    }

    /// Signs a checkpoint at least this often, traffic or not (default [`DEFAULT_CHECKPOINT_INTERVAL`]).
    pub fn checkpoint_interval(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self
    }

    /// Also hands every checkpoint (an `audit.checkpoint` or `audit.shutdown` event) to `sink`: a file, another
    /// database, a service elsewhere. A trail's newest rows can only be proven deleted against a checkpoint
    /// kept where whoever can edit the trail cannot. Written from a task of its own, so a slow anchor never
    /// holds up the trail; a failed write is logged and counted in [`Stats::anchor_failed`](crate::Stats::anchor_failed), as is
    /// a checkpoint still unwritten at the shutdown deadline.
    pub fn checkpoint_sink(mut self, sink: impl AuditSink) -> Self {
        self.sink = Some(Arc::new(sink));
        self
    }

    /// The last checkpoint of the boot before this one (e.g. the last line of the checkpoint sink's file), for the
    /// new boot's `audit.boot` event to reference, so that deleting that boot whole is noticed. With a
    /// [`Spill`](crate::Spill), the pipeline keeps its last checkpoint in the spill directory and finds it by
    /// itself; one given here wins.
    pub fn previous_checkpoint(mut self, checkpoint: Checkpoint) -> Self {
        self.previous = Some(checkpoint);
        self
    }

    /// The public half, as a verifier needs it: `<name>+<key id>+<base64 key>`.
    pub fn verifier_key(&self) -> VerifierKey {
        VerifierKey::new(&self.key_name, self.key.verifying_key())
    }

    /// The public key.
    pub fn verifying_key(&self) -> VerifyingKey {
        self.key.verifying_key()
    }

    pub(crate) fn check(&self) -> Result<(), ConfigError> {
        if self.every == 0 {
            return Err(ConfigError::InvalidIntegrity("checkpoint_every must be at least 1"));
        }
        if self.interval.is_zero() {
            return Err(ConfigError::InvalidIntegrity("checkpoint_interval must not be zero"));
        }
        if !note::is_key_name(&self.key_name) {
            return Err(ConfigError::InvalidIntegrity(
                "key_name must be non-empty, without spaces, '+' or control characters",
            ));
        }
        Ok(())
    }
}

impl fmt::Debug for Integrity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Integrity")
            .field("key", &self.verifier_key().to_string())
            .field("every", &self.every)
            .field("interval", &self.interval)
            .field("sink", &self.sink.is_some())
            .field("previous", &self.previous.as_ref().map(|c| (c.boot, c.seq)))
            .finish()
    }
}
