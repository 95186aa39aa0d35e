//! Header rewriting between client and upstream (RFC 9110 §7.6.1): hop-by-hop headers and
//! those named in `Connection` removed, `Proxy` dropped (httpoxy), `X-Forwarded-For` appended,
//! `X-Forwarded-Proto` and `X-Real-IP` set from the connection unless a trusted proxy sent
//! them. `Host` is kept.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Hop-by-hop headers (RFC 9110 §7.6.1, and the `Proxy-Connection` of old clients), as
/// names made once: removing by a `&str` would parse the name on every request.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("proxy-connection"),
    HeaderName::from_static("keep-alive"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHENTICATE,
];
const PROXY: HeaderName = HeaderName::from_static("proxy");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// Removes the hop-by-hop headers, those named in `Connection`, and `Proxy`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most requests (HTTP/2, and HTTP/1.1 keep-alive) name nothing: no list is made then.
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
            .collect();
        for n in named {
            headers.remove(n);
        }
    }
    for n in &HOP_BY_HOP {
        headers.remove(n);
    }
    headers.remove(&PROXY);
}

/// Rewrites a client's request headers for the upstream. `peer` is the client's address,
/// `tls` whether it came over TLS, `trusted` whether the peer is a trusted proxy.
pub fn forward(headers: &mut HeaderMap, peer: IpAddr, tls: bool, trusted: bool) {
    strip_hop_by_hop(headers);
    let ip = HeaderValue::from_str(&peer.to_string()).expect("an IP is a value");
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
    headers.remove(&X_FORWARDED_FOR);
    if let Some(v) = xff {
        headers.insert(X_FORWARDED_FOR, v);
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
}
