//! Header rewriting between client and upstream (RFC 9110 §7.6.1): hop-by-hop headers and
//! those named in `Connection` removed, `Proxy` dropped (httpoxy), `X-Forwarded-For` appended,
//! `X-Forwarded-Proto` and `X-Real-IP` set from the connection unless a trusted proxy sent
//! them. `Host` is kept.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Hop-by-hop headers (RFC 9110 §7.6.1, and the `Proxy-Connection` of old clients).
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "proxy-connection",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authenticate",
];

/// Removes the hop-by-hop headers, those named in `Connection`, and `Proxy`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
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
    for n in HOP_BY_HOP {
        headers.remove(n);
    }
    headers.remove("proxy");
}

/// Rewrites a client's request headers for the upstream. `peer` is the client's address,
/// `tls` whether it came over TLS, `trusted` whether the peer is a trusted proxy.
pub fn forward(headers: &mut HeaderMap, peer: IpAddr, tls: bool, trusted: bool) {
    strip_hop_by_hop(headers);
    let ip = peer.to_string();
    let prior: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .collect();
    let xff = match prior.is_empty() {
        true => ip.clone(),
        false => format!("{}, {ip}", prior.join(", ")),
    };
    headers.remove("x-forwarded-for");
    if let Ok(v) = HeaderValue::from_str(&xff) {
        headers.insert("x-forwarded-for", v);
    }
    if !(trusted && headers.contains_key("x-real-ip")) {
        headers.insert(
            "x-real-ip",
            HeaderValue::from_str(&ip).expect("an IP is a value"),
        );
    }
    if !(trusted && headers.contains_key("x-forwarded-proto")) {
        let proto = if tls { "https" } else { "http" };
        headers.insert("x-forwarded-proto", HeaderValue::from_static(proto));
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
