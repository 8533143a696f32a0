//! A batch in Postgres' binary `COPY` format, the cheapest way in for rows: no SQL to parse, no text to cast.
//! <https://www.postgresql.org/docs/current/sql-copy.html#id-1.9.3.55.9.4>: a header, then per row the number
//! of fields and each field as its length (`-1` for `NULL`) and its bytes in the type's binary "send" form, then
//! `-1`. The columns are [`COLUMNS`](super::sql::COLUMNS), in that order.

use std::net::IpAddr;

use crate::event::AuditEvent;
use crate::integrity::canonical::micros;

use super::sql::COLUMN_COUNT;

const SIGNATURE: &[u8; 11] = b"PGCOPY\n\xff\r\n\0";

/// Microseconds from the Unix epoch to Postgres' (2000-01-01 00:00:00 UTC), which `timestamptz` counts from.
const POSTGRES_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// `inet`'s address families on the wire (Postgres' `PGSQL_AF_INET` and `PGSQL_AF_INET6`).
const AF_INET: u8 = 2;
const AF_INET6: u8 = 3;

/// The whole batch as the data of one `COPY … FROM STDIN (FORMAT binary)`.
pub(crate) fn encode(batch: &[AuditEvent]) -> Result<Vec<u8>, serde_json::Error> {
    let mut out = Vec::with_capacity(19 + 2 + batch.len() * 640);
    out.extend_from_slice(SIGNATURE);
    out.extend_from_slice(&0i32.to_be_bytes()); // flags: no OIDs
    out.extend_from_slice(&0i32.to_be_bytes()); // no header extension
    for event in batch {
        row(&mut out, event)?;
    }
    out.extend_from_slice(&(-1i16).to_be_bytes());
    Ok(out)
}

fn row(out: &mut Vec<u8>, e: &AuditEvent) -> Result<(), serde_json::Error> {
    out.extend_from_slice(&(COLUMN_COUNT as i16).to_be_bytes());
    field(out, e.id.as_bytes());
    field(out, &i64::try_from(e.seq).unwrap_or(i64::MAX).to_be_bytes());
    field(out, &micros(e.time).saturating_sub(POSTGRES_EPOCH_MICROS).to_be_bytes());
    field(out, e.kind.as_bytes());
    field(out, e.outcome.as_str().as_bytes());
    opt(out, e.method.as_deref().map(str::as_bytes));
    opt(out, e.route.as_deref().map(str::as_bytes));
    opt(out, e.path.as_deref().map(str::as_bytes));
    opt(out, e.status.map(|s| i32::from(s).to_be_bytes()).as_ref().map(|b| &b[..]));
    opt(out, e.grpc_status.map(i32::to_be_bytes).as_ref().map(|b| &b[..]));
    opt(out, e.latency_us.map(|l| i64::try_from(l).unwrap_or(i64::MAX).to_be_bytes()).as_ref().map(|b| &b[..]));
    opt(out, e.request_id.as_deref().map(str::as_bytes));
    opt(out, e.actor.as_deref().map(str::as_bytes));
    match e.client_addr {
        Some(IpAddr::V4(v4)) => field(out, &[&[AF_INET, 32, 0, 4][..], &v4.octets()].concat()),
        Some(IpAddr::V6(v6)) => field(out, &[&[AF_INET6, 128, 0, 16][..], &v6.octets()].concat()),
        None => null(out),
    }
    opt(out, e.user_agent.as_deref().map(str::as_bytes));
    // jsonb: a version byte (1), then the JSON text, written in place after its length once known.
    let at = out.len();
    out.extend_from_slice(&[0, 0, 0, 0, 1]);
    serde_json::to_writer(&mut *out, &e.attributes)?;
    let len = i32::try_from(out.len() - at - 4).unwrap_or(i32::MAX);
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
    field(out, &i16::try_from(e.version).unwrap_or(i16::MAX).to_be_bytes());
    opt(out, e.instance.as_deref().map(str::as_bytes));
    opt(out, e.boot.as_ref().map(|b| &b.as_bytes()[..]));
    opt(out, e.prev_hash.map(|h| h.to_string()).as_deref().map(str::as_bytes));
    opt(out, e.hash.map(|h| h.to_string()).as_deref().map(str::as_bytes));
    Ok(())
}

fn field(out: &mut Vec<u8>, bytes: &[u8]) {
    // A field is at most what one event holds: bounded far below 2 GiB.
    out.extend_from_slice(&i32::try_from(bytes.len()).unwrap_or(i32::MAX).to_be_bytes());
    out.extend_from_slice(bytes);
}

fn opt(out: &mut Vec<u8>, bytes: Option<&[u8]>) {
    match bytes {
        Some(bytes) => field(out, bytes),
        None => null(out),
    }
}

fn null(out: &mut Vec<u8>) {
    out.extend_from_slice(&(-1i32).to_be_bytes());
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;

    /// The bytes of one small row, field by field: what the server's `recv` functions are given.
    #[test]
    fn a_row_encodes_to_known_bytes() {
        let mut event = AuditEvent::new("k");
        event.id = uuid::Uuid::from_u128(1);
        event.seq = 2;
        event.time = SystemTime::UNIX_EPOCH + Duration::from_micros(POSTGRES_EPOCH_MICROS as u64 + 3);
        event.status = Some(404);
        event.client_addr = Some("10.0.0.1".parse().unwrap());
        event.version = 3;
        let data = encode(&[event]).unwrap();
        let mut want = SIGNATURE.to_vec();
        want.extend_from_slice(&[0; 8]);
        want.extend_from_slice(&21i16.to_be_bytes());
        let f = |want: &mut Vec<u8>, bytes: &[u8]| {
            want.extend_from_slice(&(bytes.len() as i32).to_be_bytes());
            want.extend_from_slice(bytes);
        };
        let null = |want: &mut Vec<u8>| want.extend_from_slice(&[0xff; 4]);
        f(&mut want, &1u128.to_be_bytes());
        f(&mut want, &2i64.to_be_bytes());
        f(&mut want, &3i64.to_be_bytes());
        f(&mut want, b"k");
        f(&mut want, b"success");
        (0..3).for_each(|_| null(&mut want)); // method, route, path
        f(&mut want, &404i32.to_be_bytes());
        (0..4).for_each(|_| null(&mut want)); // grpc_status, latency_us, request_id, actor
        f(&mut want, &[AF_INET, 32, 0, 4, 10, 0, 0, 1]);
        null(&mut want); // user_agent
        f(&mut want, b"\x01{}");
        f(&mut want, &3i16.to_be_bytes());
        (0..4).for_each(|_| null(&mut want)); // instance, boot, prev_hash, hash
        want.extend_from_slice(&[0xff, 0xff]);
        assert_eq!(data, want);
    }
}
