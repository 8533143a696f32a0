//! Where the request came from: the connection's peer, or the address a trusted proxy forwarded in the one
//! header it is configured to set.

use std::net::{IpAddr, SocketAddr};

use http::{HeaderMap, HeaderName, Request};
use ipnet::IpNet;

/// The connection's peer address, for servers that provide neither Axum's `ConnectInfo` (feature `axum`) nor
/// Tonic's `TcpConnectInfo` (feature `tonic`).
///
/// Insert it into the request extensions before the audit layer (for example in your accept loop, or with
/// `tower::util::MapRequestLayer`) and the layer records it as the client address.
///
/// ```
/// use tower_audit::ClientAddr;
/// let mut request = http::Request::new(());
/// request.extensions_mut().insert(ClientAddr("192.0.2.7:50000".parse().unwrap()));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientAddr(pub SocketAddr);

/// Where the client address is read from: the connection's peer, or one header that your proxy sets.
///
/// Set with [`AuditLayerBuilder::client_addr_source`](crate::AuditLayerBuilder::client_addr_source). Only the
/// configured source is read; every other forwarding header is ignored, so a client cannot slip in one your
/// proxy passes through untouched. A header is believed only when the connection's peer is one of the
/// [`trusted_proxies`](crate::AuditLayerBuilder::trusted_proxies); otherwise the peer is the client.
///
/// ```
/// use tower_audit::ClientAddrSource;
///
/// // nginx with `proxy_set_header X-Real-IP $remote_addr;`
/// let source = ClientAddrSource::Header(http::HeaderName::from_static("x-real-ip"));
/// assert_ne!(source, ClientAddrSource::default());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ClientAddrSource {
    /// The connection's peer (Axum's `ConnectInfo`, Tonic's `TcpConnectInfo`, or [`ClientAddr`]); no header is
    /// read. The default, and the only safe choice without a proxy in front.
    #[default]
    Peer,
    /// `X-Forwarded-For`, to which each proxy appends the address it received the request from. The list (all
    /// such headers, in order) is walked from the right, skipping trusted proxies; the first untrusted address
    /// is the client. An entry that is not an IP address stops the walk at the last trusted hop.
    XForwardedFor,
    /// `Forwarded` (RFC 7239): its `for=` parameters, walked like [`XForwardedFor`](Self::XForwardedFor). An
    /// element without a usable `for=` address (`unknown`, an obfuscated name, none at all) stops the walk.
    Forwarded,
    /// A header holding the client address alone, which your proxy sets and overwrites: `X-Real-IP` (nginx),
    /// `CF-Connecting-IP`, `Fly-Client-IP`, `True-Client-IP`. When it is absent, repeated or not one IP address
    /// (a port is allowed), the peer (the trusted proxy) is recorded.
    Header(HeaderName),
}

impl ClientAddrSource {
    /// The header this source reads, if any.
    pub(crate) fn header(&self) -> Option<&str> {
        match self {
            ClientAddrSource::Peer => None,
            ClientAddrSource::XForwardedFor => Some("x-forwarded-for"),
            ClientAddrSource::Forwarded => Some("forwarded"),
            ClientAddrSource::Header(name) => Some(name.as_str()),
        }
    }
}

fn peer<B>(req: &Request<B>) -> Option<IpAddr> {
    if let Some(ClientAddr(addr)) = req.extensions().get::<ClientAddr>() {
        return Some(addr.ip());
    }
    #[cfg(feature = "axum")]
    if let Some(axum::extract::ConnectInfo(addr)) = req.extensions().get::<axum::extract::ConnectInfo<SocketAddr>>() {
        return Some(addr.ip());
    }
    #[cfg(feature = "tonic")]
    if let Some(addr) =
        req.extensions().get::<tonic::transport::server::TcpConnectInfo>().and_then(|info| info.remote_addr())
    {
        return Some(addr.ip());
    }
    None
}

/// The client address: the peer, or what `source` says when the peer is one of the `trusted` proxies.
pub(crate) fn resolve<B>(req: &Request<B>, source: &ClientAddrSource, trusted: &[IpNet]) -> Option<IpAddr> {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    let peer = match peer(req).map(canonical) {
        Some(ip) if is_trusted(&ip) => ip,
        // An untrusted peer, or none known: nobody vouches for a header.
        other => return other,
    };
    let headers = req.headers();
    let (name, parse): (_, fn(&str) -> Option<IpAddr>) = match source {
        ClientAddrSource::Peer => return Some(peer),
        ClientAddrSource::Header(name) => return Some(single(headers, name).unwrap_or(peer)),
        ClientAddrSource::XForwardedFor => (X_FORWARDED_FOR, parse_node),
        ClientAddrSource::Forwarded => (http::header::FORWARDED, forwarded_for),
    };
    // Walk from the nearest hop outwards; each entry was appended by the (trusted) hop after it.
    let entries = headers.get_all(&name).iter().rev().flat_map(|value| value.as_bytes().rsplit(|&b| b == b','));
    let mut nearest = peer;
    for entry in entries {
        match std::str::from_utf8(entry).ok().and_then(|entry| parse(entry.trim())) {
            Some(ip) if is_trusted(&ip) => nearest = ip,
            Some(ip) => return Some(ip),
            // An address we cannot read: stop at the last hop we could verify.
            None => return Some(nearest),
        }
    }
    Some(nearest)
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// The address in a header that must occur once and hold one address.
fn single(headers: &HeaderMap, name: &HeaderName) -> Option<IpAddr> {
    let mut values = headers.get_all(name).iter();
    let value = values.next()?;
    if values.next().is_some() {
        return None;
    }
    parse_node(std::str::from_utf8(value.as_bytes()).ok()?.trim())
}

/// IPv4-mapped IPv6 addresses (`::ffff:1.2.3.4`, as dual-stack listeners report) as plain IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The `for=` address of one `Forwarded` element (`for=192.0.2.1;proto=https`, `For="[2001:db8::1]:443"`).
fn forwarded_for(element: &str) -> Option<IpAddr> {
    element.split(';').find_map(|pair| {
        let (key, value) = pair.split_once('=')?;
        key.trim().eq_ignore_ascii_case("for").then(|| parse_node(value.trim().trim_matches('"')))
    })?
}

/// `1.2.3.4`, `1.2.3.4:80`, `2001:db8::1`, `[2001:db8::1]`, `[2001:db8::1]:443`.
fn parse_node(node: &str) -> Option<IpAddr> {
    if let Some(rest) = node.strip_prefix('[') {
        return rest.split_once(']').and_then(|(ip, _)| ip.parse().ok()).map(canonical);
    }
    if let Ok(ip) = node.parse::<IpAddr>() {
        return Some(canonical(ip));
    }
    node.parse::<SocketAddr>().ok().map(|s| canonical(s.ip()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(peer: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut builder = Request::builder();
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        let mut req = builder.body(()).unwrap();
        req.extensions_mut().insert(ClientAddr(peer.parse().unwrap()));
        req
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    const XFF: ClientAddrSource = ClientAddrSource::XForwardedFor;
    const FWD: ClientAddrSource = ClientAddrSource::Forwarded;

    fn x_real_ip() -> ClientAddrSource {
        ClientAddrSource::Header(HeaderName::from_static("x-real-ip"))
    }

    #[test]
    fn peer_source_reads_no_header() {
        let req = request(
            "10.0.0.1:4000",
            &[("x-forwarded-for", "1.1.1.1"), ("forwarded", "for=2.2.2.2"), ("x-real-ip", "3.3.3.3")],
        );
        assert_eq!(resolve(&req, &ClientAddrSource::Peer, &[]), ip("10.0.0.1"));
        assert_eq!(resolve(&req, &ClientAddrSource::Peer, &nets(&["10.0.0.0/8"])), ip("10.0.0.1"));
    }

    #[test]
    fn untrusted_peer_cannot_forge() {
        let req = request(
            "198.51.100.1:4000",
            &[("x-forwarded-for", "1.1.1.1"), ("forwarded", "for=2.2.2.2"), ("x-real-ip", "3.3.3.3")],
        );
        for source in [XFF, FWD, x_real_ip()] {
            assert_eq!(resolve(&req, &source, &nets(&["10.0.0.0/8"])), ip("198.51.100.1"), "{source:?}");
            assert_eq!(resolve(&req, &source, &[]), ip("198.51.100.1"), "{source:?}");
        }
    }

    #[test]
    fn only_the_configured_header_is_read() {
        // The proxy appends X-Forwarded-For and sets X-Real-IP; the client forged a Forwarded header.
        let req = request(
            "10.0.0.1:4000",
            &[("forwarded", "for=6.6.6.6"), ("x-forwarded-for", "203.0.113.5"), ("x-real-ip", "203.0.113.9")],
        );
        let trusted = nets(&["10.0.0.0/8"]);
        assert_eq!(resolve(&req, &XFF, &trusted), ip("203.0.113.5"));
        assert_eq!(resolve(&req, &x_real_ip(), &trusted), ip("203.0.113.9"));
        assert_eq!(resolve(&req, &FWD, &trusted), ip("6.6.6.6"), "what the configured header says");
        // The configured header is missing: the trusted peer, never another header.
        let req = request("10.0.0.1:4000", &[("forwarded", "for=6.6.6.6"), ("x-real-ip", "6.6.6.7")]);
        assert_eq!(resolve(&req, &XFF, &trusted), ip("10.0.0.1"));
        let req = request("10.0.0.1:4000", &[("x-forwarded-for", "6.6.6.6")]);
        assert_eq!(resolve(&req, &FWD, &trusted), ip("10.0.0.1"));
        assert_eq!(resolve(&req, &x_real_ip(), &trusted), ip("10.0.0.1"));
    }

    #[test]
    fn trusted_chain_is_walked_from_the_right() {
        // The client forged 6.6.6.6; the outer proxy 10.0.0.2 appended the real client 203.0.113.5.
        let req = request("10.0.0.1:4000", &[("x-forwarded-for", "6.6.6.6, 203.0.113.5, 10.0.0.2")]);
        assert_eq!(resolve(&req, &XFF, &nets(&["10.0.0.0/8"])), ip("203.0.113.5"));
        let req = request("10.0.0.1:4000", &[("forwarded", "for=6.6.6.6, for=203.0.113.5, for=10.0.0.2")]);
        assert_eq!(resolve(&req, &FWD, &nets(&["10.0.0.0/8"])), ip("203.0.113.5"));
    }

    #[test]
    fn several_headers_form_one_chain() {
        let req = request("10.0.0.1:4000", &[("x-forwarded-for", "203.0.113.5"), ("x-forwarded-for", "10.0.0.2")]);
        assert_eq!(resolve(&req, &XFF, &nets(&["10.0.0.0/8"])), ip("203.0.113.5"));
        let req = request("10.0.0.1:4000", &[("forwarded", "for=203.0.113.5"), ("forwarded", "for=10.0.0.2")]);
        assert_eq!(resolve(&req, &FWD, &nets(&["10.0.0.0/8"])), ip("203.0.113.5"));
    }

    #[test]
    fn forwarded_for_parameters_are_parsed() {
        let req =
            request("10.0.0.1:4000", &[("forwarded", r#"for="[2001:db8::7]:4711";proto=https, For=10.0.0.2:80"#)]);
        assert_eq!(resolve(&req, &FWD, &nets(&["10.0.0.0/8"])), ip("2001:db8::7"));
        let req = request("10.0.0.1:4000", &[("forwarded", "proto=https;FOR=203.0.113.5;by=10.0.0.1")]);
        assert_eq!(resolve(&req, &FWD, &nets(&["10.0.0.0/8"])), ip("203.0.113.5"));
    }

    #[test]
    fn an_entry_without_an_address_stops_at_the_last_verified_hop() {
        let trusted = nets(&["10.0.0.0/8"]);
        let req = request("10.0.0.1:4000", &[("x-forwarded-for", "1.1.1.1, not-an-ip, 10.0.0.2")]);
        assert_eq!(resolve(&req, &XFF, &trusted), ip("10.0.0.2"));
        let req = request("10.0.0.1:4000", &[("x-forwarded-for", "1.1.1.1,,10.0.0.2")]);
        assert_eq!(resolve(&req, &XFF, &trusted), ip("10.0.0.2"));
        for element in ["for=unknown", "for=_hidden", "proto=https", "for=\"\"", "garbage"] {
            let req = request("10.0.0.1:4000", &[("forwarded", &format!("for=1.1.1.1, {element}, for=10.0.0.2"))]);
            assert_eq!(resolve(&req, &FWD, &trusted), ip("10.0.0.2"), "{element}");
        }
    }

    #[test]
    fn bytes_that_are_not_utf8_spoil_only_their_own_entry() {
        let mut req = request("10.0.0.1:4000", &[]);
        let forged = http::HeaderValue::from_bytes(b"\xff\xfe, 203.0.113.5").unwrap();
        req.headers_mut().insert("x-forwarded-for", forged);
        assert_eq!(resolve(&req, &XFF, &nets(&["10.0.0.0/8"])), ip("203.0.113.5"));
    }

    #[test]
    fn single_value_header_must_hold_one_address() {
        let trusted = nets(&["10.0.0.0/8"]);
        for (value, expected) in [
            ("203.0.113.9", "203.0.113.9"),
            (" [2001:db8::9]:443 ", "2001:db8::9"),
            ("203.0.113.9:5000", "203.0.113.9"),
            ("203.0.113.9, 6.6.6.6", "10.0.0.1"),
            ("unknown", "10.0.0.1"),
        ] {
            let req = request("10.0.0.1:4000", &[("x-real-ip", value)]);
            assert_eq!(resolve(&req, &x_real_ip(), &trusted), ip(expected), "{value}");
        }
        let req = request("10.0.0.1:4000", &[("x-real-ip", "6.6.6.6"), ("x-real-ip", "203.0.113.9")]);
        assert_eq!(resolve(&req, &x_real_ip(), &trusted), ip("10.0.0.1"), "repeated: ambiguous");
    }

    #[test]
    fn all_trusted_gives_outermost_and_mapped_v6_is_v4() {
        let req = request("[::ffff:10.0.0.1]:4000", &[("x-forwarded-for", "10.1.1.1")]);
        assert_eq!(resolve(&req, &XFF, &nets(&["10.0.0.0/8"])), ip("10.1.1.1"));
        let req = request("[::ffff:198.51.100.1]:4000", &[]);
        assert_eq!(resolve(&req, &ClientAddrSource::Peer, &[]), ip("198.51.100.1"));
    }

    #[test]
    fn unknown_peer_with_a_header_source_records_nothing() {
        let req = Request::builder().header("x-forwarded-for", "1.1.1.1").body(()).unwrap();
        assert_eq!(resolve(&req, &XFF, &nets(&["10.0.0.0/8"])), None);
        assert_eq!(resolve(&req, &ClientAddrSource::Peer, &[]), None);
    }
}
