//! Header rewriting between client and upstream (RFC 9110 §7.6.1): hop-by-hop headers and
//! those named in `Connection` removed, `Proxy` dropped (httpoxy), `X-Forwarded-For` appended,
//! `X-Forwarded-Proto` and `X-Real-IP` set from the connection unless a trusted proxy sent
//! them. `Host` is kept.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// Whether a header is hop-by-hop (RFC 9110 §7.6.1, and the `Proxy-Connection` of old
/// clients), or `Proxy` (httpoxy). A match on the name's text: no hashing.
fn hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "proxy-connection"
            | "keep-alive"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "proxy-authenticate"
            | "proxy"
    )
}

/// Removes the hop-by-hop headers, those named in `Connection`, and `Proxy`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names finds what is there (usually nothing, or a response's
    // `Connection: keep-alive`); only those are removed, each removal being a hash lookup.
    let mut found: [Option<HeaderName>; 9] = Default::default();
    let mut n = 0;
    for name in headers.keys() {
        if hop_by_hop(name) && n < found.len() {
            found[n] = Some(name.clone());
            n += 1;
        }
    }
    if n == 0 {
        return;
    }
    if found.contains(&Some(header::CONNECTION)) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            // `keep-alive` (the usual value) is hop-by-hop, so in `found` if it is there.
            .filter(|n| !n.eq_ignore_ascii_case("keep-alive"))
            .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for name in found.into_iter().flatten() {
        headers.remove(name);
    }
}

/// An address as a header value. IPv4 (nearly every peer) is written by hand into a buffer:
/// `IpAddr`'s `Display` goes through `core::fmt` and a `String`, on every request.
fn ip_value(peer: IpAddr) -> HeaderValue {
    let IpAddr::V4(v4) = peer else {
        return HeaderValue::from_str(&peer.to_string()).expect("an IP is a value");
    };
    let mut buf = [0u8; 15];
    let mut len = 0;
    for (i, octet) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            buf[len] = b'.';
            len += 1;
        }
        if octet >= 100 {
            buf[len] = b'0' + octet / 100;
            len += 1;
        }
        if octet >= 10 {
            buf[len] = b'0' + octet / 10 % 10;
            len += 1;
        }
        buf[len] = b'0' + octet % 10;
        len += 1;
    }
    HeaderValue::from_bytes(&buf[..len]).expect("digits and dots are a value")
}

/// Rewrites a client's request headers for the upstream. `peer` is the client's address,
/// `tls` whether it came over TLS, `trusted` whether the peer is a trusted proxy.
pub fn forward(headers: &mut HeaderMap, peer: IpAddr, tls: bool, trusted: bool) {
    strip_hop_by_hop(headers);
    let ip = ip_value(peer);
    let prior: Vec<&str> = headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .collect();
    // The common case (no prior hop) shares the address's value, made once.
    let xff = match prior.is_empty() {
        true => Some(ip.clone()),
        false => HeaderValue::from_str(&format!(
            "{}, {}",
            prior.join(", "),
            ip.to_str().expect("an IP is ASCII")
        ))
        .ok(),
    };
    // `insert` replaces every prior value.
    match xff {
        Some(v) => drop(headers.insert(X_FORWARDED_FOR, v)),
        None => drop(headers.remove(&X_FORWARDED_FOR)),
    }
    if !(trusted && headers.contains_key(&X_REAL_IP)) {
        headers.insert(X_REAL_IP, ip);
    }
    if !(trusted && headers.contains_key(&X_FORWARDED_PROTO)) {
        let proto = if tls { "https" } else { "http" };
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_go() {
        let mut h = map(&[
            ("connection", "keep-alive, X-Secret"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy", "http://evil"),
            ("te", "trailers"),
            ("host", "example.social"),
            ("accept", "*/*"),
        ]);
        forward(&mut h, "192.0.2.7".parse().unwrap(), true, false);
        for gone in ["connection", "x-secret", "keep-alive", "proxy", "te"] {
            assert!(!h.contains_key(gone), "{gone}");
        }
        assert_eq!(h["host"], "example.social");
        assert_eq!(h["x-forwarded-for"], "192.0.2.7");
        assert_eq!(h["x-real-ip"], "192.0.2.7");
        assert_eq!(h["x-forwarded-proto"], "https");
    }

    #[test]
    fn only_a_trusted_proxy_passes_on_real_ip_and_proto() {
        let sent = [
            ("x-forwarded-for", "203.0.113.9"),
            ("x-real-ip", "203.0.113.9"),
            ("x-forwarded-proto", "https"),
        ];
        let mut h = map(&sent);
        forward(&mut h, "10.0.0.5".parse().unwrap(), false, false);
        assert_eq!(h["x-forwarded-for"], "203.0.113.9, 10.0.0.5");
        assert_eq!(h["x-real-ip"], "10.0.0.5");
        assert_eq!(h["x-forwarded-proto"], "http");
        let mut h = map(&sent);
        forward(&mut h, "10.0.0.5".parse().unwrap(), false, true);
        assert_eq!(h["x-forwarded-for"], "203.0.113.9, 10.0.0.5");
        assert_eq!(h["x-real-ip"], "203.0.113.9");
        assert_eq!(h["x-forwarded-proto"], "https");
    }

    #[test]
    fn addresses_are_written_as_display_writes_them() {
        for ip in [
            "0.0.0.0",
            "1.2.3.4",
            "10.0.100.9",
            "192.168.255.255",
            "::1",
            "2001:db8::7",
        ] {
            let peer: IpAddr = ip.parse().unwrap();
            assert_eq!(ip_value(peer), peer.to_string().as_str());
        }
    }
}
