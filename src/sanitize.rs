//! Bounding and sanitising of everything that comes from the outside.

use std::borrow::Cow;

use percent_encoding::percent_decode_str;

/// What a redacted query value is replaced with.
pub(crate) const REDACTED: &str = "REDACTED";

const ELLIPSIS: char = '…';

#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub(crate) max_field_len: usize,
    pub(crate) max_path_len: usize,
    pub(crate) max_attributes: usize,
}

/// `s` with unsafe characters (see [`is_clean`]) replaced by `U+FFFD`, cut at a character boundary to at most
/// `max` bytes; a cut string ends with `…` (within the bound) so a reader can tell it was cut.
pub(crate) fn bounded(s: &str, max: usize) -> String {
    bounded_ref(s, max).into_owned()
}

/// [`bounded`], borrowing `s` when it is fine as it is (the usual case).
pub(crate) fn bounded_ref(s: &str, max: usize) -> Cow<'_, str> {
    if s.len() <= max && is_clean(s) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len().min(max));
    for c in s.chars() {
        let c = if is_unsafe(c) { char::REPLACEMENT_CHARACTER } else { c };
        if out.len() + c.len_utf8() > max {
            let mut keep = max.saturating_sub(ELLIPSIS.len_utf8()).min(out.len());
            while !out.is_char_boundary(keep) {
                keep -= 1;
            }
            out.truncate(keep);
            if max >= ELLIPSIS.len_utf8() {
                out.push(ELLIPSIS);
            }
            break;
        }
        out.push(c);
    }
    Cow::Owned(out)
}

/// Whether `s` holds no character that [`bounded`] replaces.
pub(crate) fn is_clean(s: &str) -> bool {
    // Fast path, taken by almost every real value: printable ASCII (a word scan, no char decoding).
    printable_ascii(s.as_bytes()) || !s.chars().any(is_unsafe)
}

/// Whether every byte is printable ASCII (`0x20..=0x7e`), checked eight bytes at a time.
pub(crate) fn printable_ascii(bytes: &[u8]) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // Whether a word holds a byte below 0x20 or above 0x7e. Both tests are exact as a yes/no (a borrow or carry
    // only reaches a byte above one that already answers yes).
    let unprintable = |w: u64| (w.wrapping_sub(ONES * 0x20) & !w | (w.wrapping_add(ONES) | w)) & HIGH != 0;
    let word = |eight: &[u8]| u64::from_le_bytes(eight.try_into().expect("eight bytes"));
    if bytes.len() < 8 {
        return bytes.iter().all(|b| (0x20..=0x7e).contains(b));
    }
    // The whole words, then the last eight bytes (which may overlap the last whole word).
    bytes.chunks_exact(8).all(|eight| !unprintable(word(eight))) && !unprintable(word(&bytes[bytes.len() - 8..]))
}

/// Control characters (C0, DEL, C1), which can forge a line or a terminal escape; the Unicode line and
/// paragraph separators, at which some readers break lines; and the bidirectional controls, which reorder how
/// the text around them is displayed (as in the "Trojan Source" attack).
fn is_unsafe(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{2028}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// Like [`bounded`], for raw header bytes that may not be UTF-8.
pub(crate) fn bounded_bytes(bytes: &[u8], max: usize) -> String {
    bounded_bytes_ref(bytes, max).into_owned()
}

/// [`bounded_bytes`], borrowing `bytes` when they are fine as they are (the usual case).
pub(crate) fn bounded_bytes_ref(bytes: &[u8], max: usize) -> Cow<'_, str> {
    if bytes.len() <= max
        && printable_ascii(bytes)
        && let Ok(s) = std::str::from_utf8(bytes)
    {
        return Cow::Borrowed(s);
    }
    match std::str::from_utf8(bytes) {
        Ok(s) => Cow::Owned(bounded(s, max)),
        Err(_) => Cow::Owned(bounded(&String::from_utf8_lossy(bytes), max)),
    }
}

/// What separates query pairs: `&`, and `;` (which some servers and frameworks still accept).
const PAIR_SEPARATORS: [char; 2] = ['&', ';'];

/// The lower-case names of the query parameters to redact, with the set of their lengths, so that most keys are
/// told apart by their length alone.
#[derive(Debug, Clone)]
pub(crate) struct Redact {
    names: Vec<String>,
    /// Bit `n` (bit 63: 63 or more) is set when a name is `n` bytes long.
    lengths: u64,
}

impl Redact {
    pub(crate) fn new(names: Vec<String>) -> Self {
        let lengths = names.iter().fold(0, |lengths, name| lengths | 1 << name.len().min(63));
        Self { names, lengths }
    }

    fn matches(&self, key: &str) -> bool {
        self.lengths & 1 << key.len().min(63) != 0 && self.names.iter().any(|name| same_name(name, key))
    }
}

/// The path with the values of the named query parameters replaced by [`REDACTED`], bounded to `max` bytes;
/// borrowed from `path_and_query` when nothing needs changing (the usual case).
///
/// `path_and_query` is the request target as received (`/path?query`), `query_at` the index of its first `?`.
/// `redact` holds lower-case names. A key is read as a
/// form decoder reads it (`+` is a space, then percent-decoding, then trimmed) and redacted when it, its base
/// name or any bracketed segment (`user[password]`, `token[]`) matches a name, ignoring ASCII case and counting
/// `-` and `_` as the same. With `keep_query == false` the query is dropped altogether.
pub(crate) fn redacted_path<'a>(
    path_and_query: &'a str,
    query_at: Option<usize>,
    redact: &Redact,
    keep_query: bool,
    max: usize,
) -> Cow<'a, str> {
    let (path, query) = match query_at {
        Some(at) => (&path_and_query[..at], &path_and_query[at + 1..]),
        None => return bounded_ref(path_and_query, max),
    };
    if !keep_query || query.is_empty() {
        return bounded_ref(path, max);
    }
    // Usual case: nothing to redact, nothing copied.
    if !pairs(query).any(|pair| is_redacted(key(pair), redact)) {
        return bounded_ref(path_and_query, max);
    }
    let mut out = String::with_capacity(path_and_query.len());
    out.push_str(path);
    out.push('?');
    for piece in query.split_inclusive(PAIR_SEPARATORS) {
        let pair = piece.strip_suffix(PAIR_SEPARATORS).unwrap_or(piece);
        let key = key(pair);
        if is_redacted(key, redact) {
            out.push_str(key);
            out.push('=');
            out.push_str(REDACTED);
        } else {
            out.push_str(pair);
        }
        out.push_str(&piece[pair.len()..]);
    }
    Cow::Owned(bounded(&out, max))
}

/// The pairs of a query, split at [`PAIR_SEPARATORS`] (a byte scan: both are ASCII).
fn pairs(query: &str) -> impl Iterator<Item = &str> {
    let mut rest = Some(query);
    std::iter::from_fn(move || {
        let text = rest?;
        match text.bytes().position(|b| b == b'&' || b == b';') {
            Some(at) => {
                rest = Some(&text[at + 1..]);
                Some(&text[..at])
            }
            None => rest.take(),
        }
    })
}

fn key(pair: &str) -> &str {
    pair.bytes().position(|b| b == b'=').map_or(pair, |at| &pair[..at])
}

fn is_redacted(raw_key: &str, redact: &Redact) -> bool {
    let matches = |key: &str| redact.matches(key);
    // Usual case: a plain name, compared as it is.
    if !raw_key.bytes().any(|b| matches!(b, b'%' | b'+' | b'[' | b']') || b.is_ascii_whitespace()) {
        return matches(raw_key);
    }
    let decoded = percent_decode_str(&raw_key.replace('+', " ")).decode_utf8_lossy().into_owned();
    let key = decoded.trim();
    matches(key) || key.split(['[', ']']).map(str::trim).any(|part| !part.is_empty() && matches(part))
}

/// ASCII case-insensitive equality that also counts `-` and `_` as the same (`access-token`, `Access_Token`).
fn same_name(name: &str, key: &str) -> bool {
    let fold = |b: u8| if b == b'-' { b'_' } else { b.to_ascii_lowercase() };
    name.len() == key.len() && name.bytes().zip(key.bytes()).all(|(a, b)| fold(a) == fold(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redacted(target: &str, redact: &[String], keep_query: bool, max: usize) -> String {
        redacted_path(target, target.find('?'), &Redact::new(redact.to_vec()), keep_query, max).into_owned()
    }

    #[test]
    fn the_word_scan_agrees_with_a_byte_scan() {
        let by_byte = |bytes: &[u8]| bytes.iter().all(|b| (0x20..0x7f).contains(b));
        // Every byte value at every position of strings of 1 to 17 bytes (a whole word, a word and a rest).
        for len in 1..=17 {
            for at in 0..len {
                for b in 0..=255u8 {
                    let mut bytes = vec![b'a'; len];
                    bytes[at] = b;
                    assert_eq!(printable_ascii(&bytes), by_byte(&bytes), "{bytes:?}");
                }
            }
        }
        // Neighbours that a borrow or a carry between bytes could confuse.
        for pair in [[0x20, 0x1f], [0x1f, 0x20], [0x7e, 0x7f], [0x7f, 0x7e], [0xff, 0x00], [0x00, 0xff], [0x80, 0x20]] {
            let mut bytes = [b' '; 16];
            bytes[7..9].copy_from_slice(&pair);
            assert_eq!(printable_ascii(&bytes), by_byte(&bytes), "{pair:?}");
        }
        assert!(printable_ascii(b""));
    }

    #[test]
    fn header_bytes_that_are_printable_ascii_are_copied_as_they_are() {
        assert_eq!(bounded_bytes(b"0191b8a4-7c4e-7a1b-9d2e-3f4a5b6c7d8e", 64), "0191b8a4-7c4e-7a1b-9d2e-3f4a5b6c7d8e");
        assert_eq!(bounded_bytes(b"a\tb", 64), "a\u{fffd}b");
        assert_eq!(bounded_bytes(b"abcdefghij", 8), "abcde\u{2026}");
    }

    #[test]
    fn keys_are_told_apart_by_length_first_but_every_length_is_checked() {
        let redact = ["a".repeat(63), "b".repeat(64), "c".repeat(100), "pin".to_owned()];
        for name in &redact {
            let path = redacted(&format!("/x?{name}=1&{}=2", name.to_uppercase()), &redact, true, 4096);
            assert_eq!(path, format!("/x?{name}=REDACTED&{}=REDACTED", name.to_uppercase()));
        }
        assert_eq!(redacted("/x?pim=1&pins=2&b=3", &redact, true, 4096), "/x?pim=1&pins=2&b=3");
        assert_eq!(
            redacted(&format!("/x?{}=1", "a".repeat(65)), &redact, true, 4096),
            format!("/x?{}=1", "a".repeat(65))
        );
    }

    #[test]
    fn short_clean_text_is_unchanged() {
        assert_eq!(bounded("/api/users", 64), "/api/users");
    }

    #[test]
    fn control_characters_are_replaced() {
        assert_eq!(bounded("a\nb\r\u{7f}c\u{85}", 64), "a\u{fffd}b\u{fffd}\u{fffd}c\u{fffd}");
    }

    #[test]
    fn line_separators_and_bidi_controls_are_replaced() {
        let invisible = [
            '\u{2028}', '\u{2029}', '\u{202a}', '\u{202b}', '\u{202c}', '\u{202d}', '\u{202e}', '\u{2066}', '\u{2067}',
            '\u{2068}', '\u{2069}', '\u{200e}', '\u{200f}', '\u{061c}',
        ];
        for c in invisible {
            assert_eq!(bounded(&format!("a{c}b"), 64), "a\u{fffd}b", "U+{:04X}", c as u32);
        }
        // A right-to-left override (U+202E) that would make `invoice<RLO>fdp.exe` display as `invoiceexe.pdf`.
        assert_eq!(bounded("invoice\u{202e}fdp.exe", 64), "invoice\u{fffd}fdp.exe");
        // Characters that merely look unusual stay.
        assert_eq!(bounded("ünïcödé 👀 \u{200d}", 64), "ünïcödé 👀 \u{200d}");
    }

    #[test]
    fn long_text_is_cut_at_a_char_boundary_with_a_mark() {
        let cut = bounded(&"é".repeat(100), 10);
        assert!(cut.len() <= 10, "{cut}");
        assert_eq!(cut, "ééé…");
        let cut = bounded(&"x".repeat(10_000), 1024);
        assert_eq!(cut.len(), 1024);
        assert!(cut.ends_with('…'));
    }

    #[test]
    fn replacement_that_grows_text_still_respects_bound() {
        // 8 one-byte control characters become 8 three-byte replacement characters.
        let cut = bounded("\n\n\n\n\n\n\n\n", 8);
        assert!(cut.len() <= 8, "{cut:?}");
        assert_eq!(cut, "\u{fffd}…");
    }

    #[test]
    fn invalid_utf8_is_replaced() {
        assert_eq!(bounded_bytes(b"ok\xff\xfe", 64), "ok\u{fffd}\u{fffd}");
    }

    #[test]
    fn query_values_are_redacted_case_insensitively_and_percent_decoded() {
        let redact = vec!["token".to_owned(), "password".to_owned()];
        let path = redacted("/cb?a=1&TOKEN=abc&%74oken=def&password&b=2", &redact, true, 1024);
        assert_eq!(path, "/cb?a=1&TOKEN=REDACTED&%74oken=REDACTED&password=REDACTED&b=2");
    }

    #[test]
    fn query_can_be_dropped() {
        let path = redacted("/cb?a=1", &[], false, 1024);
        assert_eq!(path, "/cb");
        let path = redacted("/cb?a=1&b=2", &["token".to_owned()], true, 1024);
        assert_eq!(path, "/cb?a=1&b=2");
        assert_eq!(redacted("/cb?", &[], true, 1024), "/cb");
    }

    fn defaults() -> Vec<String> {
        crate::config::DEFAULT_REDACTED_QUERY_PARAMS.iter().map(|name| (*name).to_owned()).collect()
    }

    #[test]
    fn bracketed_keys_are_redacted_by_their_base_or_any_segment() {
        let path = redacted("/cb?token[]=S1&user[password]=S2&user[name]=bob", &defaults(), true, 1024);
        assert_eq!(path, "/cb?token[]=REDACTED&user[password]=REDACTED&user[name]=bob");
        let path = redacted("/cb?a[b][secret][]=S&[token]=S&%74oken%5B0%5D=S&list[]=1", &defaults(), true, 1024);
        assert_eq!(path, "/cb?a[b][secret][]=REDACTED&[token]=REDACTED&%74oken%5B0%5D=REDACTED&list[]=1");
    }

    #[test]
    fn semicolon_separates_pairs_like_ampersand() {
        let path = redacted("/cb?a=1;token=S3", &defaults(), true, 1024);
        assert_eq!(path, "/cb?a=1;token=REDACTED");
        let path = redacted("/cb?a=1;b=2&password=S;c=3", &defaults(), true, 1024);
        assert_eq!(path, "/cb?a=1;b=2&password=REDACTED;c=3");
    }

    #[test]
    fn plus_is_a_space_and_keys_are_trimmed() {
        let path = redacted("/cb?token+=S4", &defaults(), true, 1024);
        assert_eq!(path, "/cb?token+=REDACTED");
        let path = redacted("/cb?+password%20=S&%20secret=S&%09token=S&a+b=1", &defaults(), true, 1024);
        assert_eq!(path, "/cb?+password%20=REDACTED&%20secret=REDACTED&%09token=REDACTED&a+b=1");
    }

    #[test]
    fn default_list_covers_sessions_identity_tokens_and_short_password_names() {
        let path = redacted("/cb?session=A&jwt=B&id_token=C&pwd=D&auth=E&q=ok", &defaults(), true, 1024);
        assert_eq!(path, "/cb?session=REDACTED&jwt=REDACTED&id_token=REDACTED&pwd=REDACTED&auth=REDACTED&q=ok");
        let path = redacted("/cb?SessionId=A&passwd=B&credentials=C&private_key=D&otp=E", &defaults(), true, 1024);
        assert_eq!(
            path,
            "/cb?SessionId=REDACTED&passwd=REDACTED&credentials=REDACTED&private_key=REDACTED&otp=REDACTED"
        );
    }

    #[test]
    fn hyphen_and_underscore_are_the_same_in_names() {
        let path = redacted("/cb?access-token=A&Session-ID=B&x_amz_signature=C", &defaults(), true, 1024);
        assert_eq!(path, "/cb?access-token=REDACTED&Session-ID=REDACTED&x_amz_signature=REDACTED");
    }
}
