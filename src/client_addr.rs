//! Where the request came from: the connection's peer, or a forwarded address from a trusted proxy.

use std::net::{IpAddr, SocketAddr};

use http::{HeaderMap, Request};
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

/// The client address, believing forwarding headers only from `trusted` peers.
pub(crate) fn resolve<B>(req: &Request<B>, trusted: &[IpNet]) -> Option<IpAddr> {
    let peer = peer(req).map(canonical);
    if trusted.is_empty() {
        return peer;
    }
    // Without a known peer nobody vouches for the headers.
    let peer = peer?;
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !is_trusted(&peer) {
        return Some(peer);
    }
    let chain = forwarded_chain(req.headers());
    // Walk from the nearest hop outwards; each entry was appended by the (trusted) hop after it.
    let mut nearest = peer;
    for hop in chain.iter().rev() {
        match hop {
            Some(ip) if is_trusted(ip) => nearest = *ip,
            Some(ip) => return Some(*ip),
            // An address we cannot read: stop at the last hop we could verify.
            None => return Some(nearest),
        }
    }
    Some(nearest)
}

/// IPv4-mapped IPv6 addresses (`::ffff:1.2.3.4`, as dual-stack listeners report) as plain IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The `for=` addresses of every `Forwarded` header, or else every `X-Forwarded-For` entry, in order.
/// `None` stands for an entry that is not an IP address (`unknown`, an obfuscated name, garbage).
fn forwarded_chain(headers: &HeaderMap) -> Vec<Option<IpAddr>> {
    let forwarded: Vec<_> = headers.get_all(http::header::FORWARDED).iter().collect();
    if !forwarded.is_empty() {
        return forwarded
            .iter()
            .flat_map(|v| v.to_str().unwrap_or("garbage").split(','))
            .filter_map(|element| {
                element.split(';').find_map(|pair| {
                    let (key, value) = pair.split_once('=')?;
                    key.trim().eq_ignore_ascii_case("for").then(|| parse_node(value.trim().trim_matches('"')))
                })
            })
            .collect();
    }
    headers
        .get_all("x-forwarded-for")
        .iter()
        .flat_map(|v| v.to_str().unwrap_or("garbage").split(','))
        .map(|entry| parse_node(entry.trim()))
        .collect()
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

    #[test]
    fn without_trusted_proxies_headers_are_ignored() {
        let req = request("198.51.100.1:4000", &[("x-forwarded-for", "1.1.1.1"), ("forwarded", "for=2.2.2.2")]);
        assert_eq!(resolve(&req, &[]), ip("198.51.100.1"));
    }

    #[test]
    fn untrusted_peer_cannot_forge() {
        let req = request("198.51.100.1:4000", &[("x-forwarded-for", "1.1.1.1")]);
        assert_eq!(resolve(&req, &nets(&["10.0.0.0/8"])), ip("198.51.100.1"));
    }

    #[test]
    fn trusted_chain_is_walked_from_the_right() {
        // The client forged 6.6.6.6; the outer proxy 10.0.0.2 appended the real client 203.0.113.5.
        let req = request("10.0.0.1:4000", &[("x-forwarded-for", "6.6.6.6, 203.0.113.5, 10.0.0.2")]);
        assert_eq!(resolve(&req, &nets(&["10.0.0.0/8"])), ip("203.0.113.5"));
    }

    #[test]
    fn several_xff_headers_form_one_chain() {
        let req = request("10.0.0.1:4000", &[("x-forwarded-for", "203.0.113.5"), ("x-forwarded-for", "10.0.0.2")]);
        assert_eq!(resolve(&req, &nets(&["10.0.0.0/8"])), ip("203.0.113.5"));
    }

    #[test]
    fn forwarded_header_is_preferred_and_parsed() {
        let req = request(
            "10.0.0.1:4000",
            &[
                ("x-forwarded-for", "9.9.9.9"),
                ("forwarded", r#"for="[2001:db8::7]:4711";proto=https, for=10.0.0.2:80"#),
            ],
        );
        assert_eq!(resolve(&req, &nets(&["10.0.0.0/8"])), ip("2001:db8::7"));
    }

    #[test]
    fn garbage_stops_at_last_verified_hop() {
        let req = request("10.0.0.1:4000", &[("x-forwarded-for", "1.1.1.1, not-an-ip, 10.0.0.2")]);
        assert_eq!(resolve(&req, &nets(&["10.0.0.0/8"])), ip("10.0.0.2"));
        let req = request("10.0.0.1:4000", &[("forwarded", "for=unknown")]);
        assert_eq!(resolve(&req, &nets(&["10.0.0.0/8"])), ip("10.0.0.1"));
    }

    #[test]
    fn all_trusted_gives_outermost_and_mapped_v6_is_v4() {
        let req = request("[::ffff:10.0.0.1]:4000", &[("x-forwarded-for", "10.1.1.1")]);
        assert_eq!(resolve(&req, &nets(&["10.0.0.0/8"])), ip("10.1.1.1"));
    }

    #[test]
    fn unknown_peer_with_trusted_proxies_records_nothing() {
        let req = Request::builder().header("x-forwarded-for", "1.1.1.1").body(()).unwrap();
        assert_eq!(resolve(&req, &nets(&["10.0.0.0/8"])), None);
    }
}
