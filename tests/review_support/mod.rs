//! Deterministic test data shared by tests/review_adversarial.rs and the generator of its fixtures (run once
//! against the previous version, 160a4ca, see tests/data/review/README.md).
#![allow(dead_code, unreachable_pub)]

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tower_audit::{AuditEvent, Hash, Outcome};
use uuid::Uuid;

/// A deterministic xorshift generator.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn hash(&mut self) -> Hash {
        let mut bytes = [0u8; 32];
        for b in &mut bytes {
            *b = self.next() as u8;
        }
        Hash(bytes)
    }
}

/// Texts that stress JSON escaping and UTF-8.
pub const NASTY: &[&str] = &[
    "",
    "plain",
    "quote \" backslash \\ slash / ",
    "control \u{0} \u{1} \u{1f} \u{7f} \t \n \r \u{8} \u{c}",
    "unicode é 👀 \u{2028} \u{2029} \u{feff} \u{fffd}",
    "</script><!-- ' ; DROP TABLE audit_events; --",
    "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
];

/// A varied population of events: every option present and absent, every nasty text in every text field,
/// every hash combination.
pub fn varied_events() -> Vec<AuditEvent> {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut events = Vec::new();
    for i in 0..400u64 {
        let pick = |rng: &mut Rng| -> Option<String> {
            match rng.below(NASTY.len() as u64 + 1) {
                0 => None,
                n => Some(NASTY[n as usize - 1].to_owned()),
            }
        };
        let kind = NASTY[rng.below(NASTY.len() as u64) as usize];
        let mut e =
            AuditEvent::new(if i % 2 == 0 { Cow::Borrowed("http.request") } else { Cow::Owned(kind.to_owned()) });
        e.version = [1, 2, 3, u16::MAX][rng.below(4) as usize];
        e.id = Uuid::from_u128(u128::from(rng.next()) << 64 | u128::from(rng.next()));
        e.instance = pick(&mut rng).map(Arc::from);
        e.boot = (rng.below(2) == 0).then(|| Uuid::from_u128(u128::from(rng.next())));
        e.seq = [0, 1, u64::MAX, rng.next()][rng.below(4) as usize];
        e.time = SystemTime::UNIX_EPOCH + Duration::from_micros(rng.below(4_000_000_000_000_000));
        e.outcome = [
            Outcome::Success,
            Outcome::Denied,
            Outcome::ClientError,
            Outcome::ServerError,
            Outcome::Error,
            Outcome::Cancelled,
        ][rng.below(6) as usize];
        e.method = pick(&mut rng).map(Cow::Owned);
        e.route = pick(&mut rng);
        e.path = pick(&mut rng);
        e.status = [None, Some(0), Some(200), Some(u16::MAX)][rng.below(4) as usize];
        e.grpc_status = [None, Some(0), Some(-1), Some(i32::MIN)][rng.below(4) as usize];
        e.latency_us = [None, Some(0), Some(u64::MAX)][rng.below(3) as usize];
        e.request_id = pick(&mut rng);
        e.actor = pick(&mut rng);
        e.client_addr = match rng.below(3) {
            0 => None,
            1 => Some("203.0.113.9".parse().unwrap()),
            _ => Some("2001:db8::42".parse().unwrap()),
        };
        e.user_agent = pick(&mut rng);
        for _ in 0..rng.below(4) {
            let (k, v) = (pick(&mut rng).unwrap_or_default(), pick(&mut rng).unwrap_or_default());
            e.attributes.insert(k, v);
        }
        e.prev_hash = match rng.below(4) {
            0 => None,
            1 => Some(Hash::ZERO),
            2 => Some(Hash([0xff; 32])),
            _ => Some(rng.hash()),
        };
        e.hash = match rng.below(3) {
            0 => None,
            _ => Some(rng.hash()),
        };
        events.push(e);
    }
    events
}
