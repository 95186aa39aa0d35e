//! Header rewriting between client and upstream (RFC 9110 §7.6.1): hop-by-hop headers and
//! those named in `Connection` removed, `Proxy` dropped (httpoxy), `X-Forwarded-For` appended,
//! `X-Forwarded-Proto` and `X-Real-IP` set from the connection unless a trusted proxy sent
//! them (a request of the core cache then gets the scheme it was keyed by, [`tell_proto`]).
//! `Host` is kept.

use std::cell::RefCell;
use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// The hop-by-hop headers (RFC 9110 §7.6.1, and the `Proxy-Connection` of old clients), and
/// `Proxy` (httpoxy).
static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("proxy-connection"),
    HeaderName::from_static("keep-alive"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHENTICATE,
    HeaderName::from_static("proxy"),
];

/// The headers [`forward`] sets, by their bit in [`Found::names`] (after those of
/// [`HOP_BY_HOP`]).
const XFF: u16 = 1 << 9;
const REAL_IP: u16 = 1 << 10;
const PROTO: u16 = 1 << 11;

/// Its bit among [`HOP_BY_HOP`] (bits 0 to 8) and [`XFF`], [`REAL_IP`], [`PROTO`], if it
/// has one. By length first: most names (`host`, `date`, `content-type`...) have a length
/// none of these has and are passed by one jump, where a `match` on the text compares them
/// with each name in turn.
fn bit(name: &HeaderName) -> u16 {
    let s = name.as_str();
    let (bit, ours) = match s.len() {
        2 => (1 << 3, "te"),
        5 => (1 << 8, "proxy"),
        7 if s == "upgrade" => (1 << 6, s),
        7 => (1 << 4, "trailer"),
        9 => (REAL_IP, "x-real-ip"),
        10 if s == "connection" => (1, s),
        10 => (1 << 2, "keep-alive"),
        15 => (XFF, "x-forwarded-for"),
        16 => (1 << 1, "proxy-connection"),
        17 if s == "transfer-encoding" => (1 << 5, s),
        17 => (PROTO, "x-forwarded-proto"),
        18 => (1 << 7, "proxy-authenticate"),
        _ => return 0,
    };
    if s == ours {
        bit
    } else {
        0
    }
}

/// What one pass over a map's headers found.
struct Found {
    /// The bits ([`bit`]) of the names there.
    names: u16,
    /// Whether a `Connection` names more than `keep-alive` (the usual value, hop-by-hop
    /// itself): only then is its value split into names.
    names_others: bool,
}

/// One walk over the headers (hyper's maps are small: no hash lookups).
fn scan(headers: &HeaderMap) -> Found {
    let mut found = Found {
        names: 0,
        names_others: false,
    };
    for (name, value) in headers.iter() {
        let b = bit(name);
        if b != 0 {
            found.names |= b;
            found.names_others |= b == 1 && !value.as_bytes().eq_ignore_ascii_case(b"keep-alive");
        }
    }
    found
}

/// Removes the hop-by-hop headers, those named in `Connection`, and `Proxy`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let found = scan(headers);
    strip(headers, &found);
}

/// Removes the end-to-end headers a client named in `Connection` (they are for that hop
/// only, RFC 9110 §7.6.1), at the front door, before anything reads the request: so that
/// what core is sent is what the core cache keys, varies and judges, and what the
/// idempotency fingerprint reads. (A client sending `Accept: application/activity+json` and
/// `Connection: accept` would otherwise get core's HTML stored as the ActivityPub variant.)
/// `Upgrade` stays for the WebSocket handshake (the proxy removes it, and asks again).
/// One lookup when `Connection` is absent or only `keep-alive`/`close`.
pub fn strip_connection_named(headers: &mut HeaderMap) {
    remove_named(headers, &["keep-alive", "close", "upgrade"]);
}

/// Removes the headers `Connection` names, but those in `kept` (options, not headers to
/// remove) and `Host` (the request was routed, and is keyed, by it).
fn remove_named(headers: &mut HeaderMap, kept: &[&str]) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|n| !kept.iter().any(|k| n.eq_ignore_ascii_case(k)))
        .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
        .filter(|n| *n != header::HOST)
        .collect();
    for name in named {
        headers.remove(name);
    }
}

/// Joins several `Cookie` fields into one, with `; ` (RFC 9113 §8.2.3: HTTP/2 clients may
/// send each cookie as a field of its own, and a proxy to HTTP/1.1 must join them). Left
/// apart, puma joins them with `, ` as for any field, and Rack reads everything after the
/// first cookie as part of its value: a signed-in user would look signed out. One lookup
/// when there is one field or none.
pub fn join_cookies(headers: &mut HeaderMap) {
    let mut fields = headers.get_all(header::COOKIE).iter();
    if fields.nth(1).is_none() {
        return;
    }
    let joined: Vec<u8> = headers
        .get_all(header::COOKIE)
        .iter()
        .map(HeaderValue::as_bytes)
        .collect::<Vec<_>>()
        .join(&b"; "[..]);
    if let Ok(v) = HeaderValue::from_bytes(&joined) {
        headers.insert(header::COOKIE, v);
    }
}

/// Removes what [`scan`] found: usually nothing, or a response's `Connection: keep-alive`;
/// each removal is a hash lookup. Never `Host`, whatever `Connection` names.
fn strip(headers: &mut HeaderMap, found: &Found) {
    if found.names & 0x1ff == 0 {
        return;
    }
    if found.names_others {
        remove_named(headers, &["keep-alive"]);
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if found.names & (1 << i) != 0 {
            headers.remove(name);
        }
    }
}

thread_local! {
    /// The last peer's address as a value, on this worker thread. A keep-alive client's
    /// requests come from one address (and every request through a load balancer): cloning
    /// the value is a reference count, where making it is a format and an allocation, and
    /// sharing it with both `X-Forwarded-For` and `X-Real-IP` a second allocation.
    static LAST_PEER: RefCell<Option<(IpAddr, HeaderValue)>> = const { RefCell::new(None) };
}

/// `peer` as a header value, from [`LAST_PEER`] when it is the same peer.
fn peer_value(peer: IpAddr) -> HeaderValue {
    LAST_PEER.with_borrow_mut(|last| match last {
        Some((ip, value)) if *ip == peer => value.clone(),
        _ => last.insert((peer, ip_value(peer))).1.clone(),
    })
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
    let mut found = scan(headers);
    strip(headers, &found);
    if found.names_others {
        // `Connection` may have named (and so removed) one of ours.
        let there = |name, b| if headers.contains_key(name) { b } else { 0 };
        found.names = there(&X_FORWARDED_FOR, XFF)
            | there(&X_REAL_IP, REAL_IP)
            | there(&X_FORWARDED_PROTO, PROTO);
    }
    let ip = peer_value(peer);
    // The common case (no prior hop) shares the address's value.
    let mut xff = Some(ip.clone());
    if found.names & XFF != 0 {
        let prior: Vec<&str> = headers
            .get_all(&X_FORWARDED_FOR)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .collect();
        if !prior.is_empty() {
            let ip = ip.to_str().expect("an IP is ASCII");
            xff = HeaderValue::from_str(&format!("{}, {ip}", prior.join(", "))).ok();
        }
    }
    // `insert` replaces every prior value.
    match xff {
        Some(v) => drop(headers.insert(X_FORWARDED_FOR, v)),
        None => drop(headers.remove(&X_FORWARDED_FOR)),
    }
    if !(trusted && found.names & REAL_IP != 0) {
        headers.insert(X_REAL_IP, ip);
    }
    if !(trusted && found.names & PROTO != 0) {
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(own_scheme(tls)));
    }
}

/// Sets the `X-Forwarded-Proto` the upstream is told to `scheme` (after [`forward`]: the
/// scheme the core cache keyed the request by, `super::KeyedScheme`).
pub fn tell_proto(headers: &mut HeaderMap, scheme: &'static str) {
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(scheme));
}

/// The scheme of a connection, as `X-Forwarded-Proto` says it.
fn own_scheme(tls: bool) -> &'static str {
    if tls {
        "https"
    } else {
        "http"
    }
}

/// The `X-Forwarded-Proto` that [`forward`] leaves for the upstream, when it is one field
/// saying `http` or `https`: the connection's scheme, or the one a trusted proxy sent (unless
/// its `Connection` names the header, which removes it). None when a trusted proxy's value
/// goes on and is anything else (several fields, a list, another word): core's answer then
/// depends on a value the core cache does not key ([`crate::corecache`] keys by scheme).
/// `trusted` is asked only when the request has the header.
pub fn proto_sent(
    headers: &HeaderMap,
    tls: bool,
    trusted: impl FnOnce() -> bool,
) -> Option<&'static str> {
    let mut sent = headers.get_all(&X_FORWARDED_PROTO).iter();
    let Some(first) = sent.next() else {
        return Some(own_scheme(tls));
    };
    let removed = || {
        headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|n| n.trim().eq_ignore_ascii_case("x-forwarded-proto"))
    };
    if !trusted() || removed() {
        return Some(own_scheme(tls));
    }
    if sent.next().is_some() {
        return None;
    }
    match first.as_bytes() {
        b"https" => Some("https"),
        b"http" => Some("http"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::header_map as map;

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

    /// Each hop-by-hop name goes, a `Connection` of only `keep-alive` (any case) takes nothing
    /// else with it, and one naming a header takes that one.
    #[test]
    fn every_hop_by_hop_header_goes_and_keep_alive_names_nothing_else() {
        let mut pairs: Vec<(&str, &str)> = HOP_BY_HOP.iter().map(|n| (n.as_str(), "x")).collect();
        pairs[0] = ("connection", "Keep-Alive");
        pairs.push(("accept", "*/*"));
        pairs.push(("close", "1"));
        let mut h = map(&pairs);
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 2, "{h:?}");
        assert_eq!(h["close"], "1");
        let mut h = map(&[("connection", "close"), ("close", "1"), ("accept", "*/*")]);
        strip_hop_by_hop(&mut h);
        assert_eq!(h.keys().collect::<Vec<_>>(), ["accept"]);
    }

    /// At the front door: what `Connection` names goes, but not `Host` (the route and the
    /// core cache's key) nor `Upgrade` (a WebSocket handshake); `Connection` itself stays
    /// for the proxy.
    #[test]
    fn the_front_door_strips_what_connection_names_but_host_and_upgrade() {
        let mut h = map(&[
            ("connection", "Upgrade, accept, HOST"),
            ("connection", "cookie"),
            ("upgrade", "websocket"),
            ("accept", "application/activity+json"),
            ("cookie", "_session=1"),
            ("host", "example.social"),
            ("accept-language", "de"),
        ]);
        strip_connection_named(&mut h);
        for gone in ["accept", "cookie"] {
            assert!(!h.contains_key(gone), "{gone}");
        }
        for kept in ["connection", "upgrade", "host", "accept-language"] {
            assert!(h.contains_key(kept), "{kept}");
        }
        forward(&mut h, "192.0.2.7".parse().unwrap(), true, false);
        assert_eq!(h["host"], "example.social");
    }

    #[test]
    fn cookie_fields_are_joined_into_one() {
        let mut h = map(&[
            ("cookie", "theme=dark"),
            ("cookie", "_mastodon_session=abc"),
        ]);
        join_cookies(&mut h);
        let all: Vec<_> = h.get_all("cookie").iter().collect();
        assert_eq!(all, ["theme=dark; _mastodon_session=abc"]);
        let mut h = map(&[("cookie", "a=1; b=2")]);
        join_cookies(&mut h);
        assert_eq!(h["cookie"], "a=1; b=2");
    }

    #[test]
    fn proto_sent_is_what_forward_leaves_or_none() {
        let cases: [&[(&str, &str)]; 7] = [
            &[],
            &[("x-forwarded-proto", "https")],
            &[("x-forwarded-proto", "http")],
            &[("x-forwarded-proto", "HTTPS")],
            &[
                ("x-forwarded-proto", "https"),
                ("x-forwarded-proto", "http"),
            ],
            &[("x-forwarded-proto", "https, http")],
            &[
                ("connection", "close, X-Forwarded-Proto"),
                ("x-forwarded-proto", "http"),
            ],
        ];
        for pairs in cases {
            for tls in [false, true] {
                for trusted in [false, true] {
                    let mut h = map(pairs);
                    let said = proto_sent(&h, tls, || trusted);
                    forward(&mut h, "10.0.0.5".parse().unwrap(), tls, trusted);
                    let left: Vec<&str> = h
                        .get_all("x-forwarded-proto")
                        .iter()
                        .filter_map(|v| v.to_str().ok())
                        .collect();
                    match said {
                        Some(p) => assert_eq!(left, [p], "{pairs:?} tls {tls} trusted {trusted}"),
                        None => assert!(
                            trusted && (left.len() > 1 || !["http", "https"].contains(&left[0])),
                            "{pairs:?} tls {tls}: {left:?} is keyable"
                        ),
                    }
                }
            }
        }
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

    /// Each name of ours has its own bit; other names, of the same lengths or not, none.
    #[test]
    fn bits_are_each_names_own() {
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(bit(name), 1 << i, "{name}");
        }
        for (name, b) in [
            (X_FORWARDED_FOR, XFF),
            (X_REAL_IP, REAL_IP),
            (X_FORWARDED_PROTO, PROTO),
        ] {
            assert_eq!(bit(&name), b, "{name}");
        }
        for other in [
            "tf",
            "proxx",
            "trailex",
            "upgradf",
            "x-real-iq",
            "connectiom",
            "keep-alivf",
            "x-forwarded-foo",
            "proxy-connectiom",
            "transfer-encodinf",
            "x-forwarded-prot0",
            "proxy-authenticatf",
            "host",
            "content-type",
        ] {
            let name = HeaderName::from_bytes(other.as_bytes()).unwrap();
            assert_eq!(bit(&name), 0, "{other}");
        }
    }

    /// A `Connection` naming our headers removes what a trusted proxy sent in them: they are
    /// then set from the connection, as if never sent.
    #[test]
    fn headers_named_in_connection_are_set_from_the_connection() {
        let mut h = map(&[
            (
                "connection",
                "x-real-ip, X-Forwarded-Proto, x-forwarded-for",
            ),
            ("x-forwarded-for", "203.0.113.9"),
            ("x-real-ip", "203.0.113.9"),
            ("x-forwarded-proto", "https"),
        ]);
        forward(&mut h, "10.0.0.5".parse().unwrap(), false, true);
        assert_eq!(h.len(), 3, "{h:?}");
        assert_eq!(h["x-forwarded-for"], "10.0.0.5");
        assert_eq!(h["x-real-ip"], "10.0.0.5");
        assert_eq!(h["x-forwarded-proto"], "http");
    }

    /// The value kept for the last peer is that peer's only.
    #[test]
    fn each_peer_gets_its_own_address() {
        for ip in [
            "192.0.2.7",
            "192.0.2.7",
            "192.0.2.8",
            "2001:db8::7",
            "192.0.2.7",
        ] {
            let mut h = map(&[("accept", "*/*")]);
            forward(&mut h, ip.parse().unwrap(), true, false);
            assert_eq!(h["x-forwarded-for"], ip);
            assert_eq!(h["x-real-ip"], ip);
        }
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
