//! The decisions around the `http-cache-semantics` policy: what may be stored (its rules plus
//! this edge's privacy rules), what may be served stale, and the header work it leaves to us.

use std::time::{Duration, SystemTime};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::StatusCode;
use http_cache_semantics::{CacheOptions, CachePolicy};

use super::store::{Meta, Scheme};

/// The `Signature` request header (authorized fetch).
const SIGNATURE: HeaderName = HeaderName::from_static("signature");

/// Cookies that carry a Mastodon (Rails/Devise) session.
const SESSION_COOKIES: [&str; 3] = ["_session_id", "_mastodon_session", "remember_user_token"];

/// Statuses the policy crate stores by its own rules; others are stored only with explicit
/// freshness (RFC 9111 §3: any final status the cache understands), see [`build`].
const CRATE_STATUSES: [u16; 14] = [
    200, 203, 204, 300, 301, 302, 303, 307, 308, 404, 405, 410, 414, 501,
];

/// Response headers never updated from a 304 (the body is the stored one).
const KEEP_ON_304: [&str; 6] = [
    "etag",
    "content-length",
    "content-encoding",
    "transfer-encoding",
    "content-range",
    "content-md5",
];

/// This edge's name as a surrogate (Edge Architecture 1.0): `Surrogate-Control`
/// directives targeted at it (`;fediedge`) or at no one apply; it announces itself to core
/// with `Surrogate-Capability` ([`SURROGATE_CAPABILITY`]).
pub const SURROGATE: &str = "fediedge";
/// The `Surrogate-Capability` value sent to core.
pub const SURROGATE_CAPABILITY: &str = "fediedge=\"Surrogate/1.0\"";

/// An `Age` the policy takes as "older than anything": malformed `Age` values make a
/// response stale rather than fresh (the safe reading).
const AGE_INVALID: &str = "2147483648";

/// The response headers as the policy judges them: Cache-Control directive names in lower
/// case (the crate compares them as written), a malformed `Age` taken as very old, and
/// `Surrogate-Control` (for this surrogate) overriding Cache-Control and Expires. None when
/// `Surrogate-Control: no-store` forbids storing.
fn judged_headers(headers: &HeaderMap) -> Option<HeaderMap> {
    let mut h = headers.clone();
    let cc: Vec<String> = headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|d| match d.split_once('=') {
            Some((k, v)) => format!("{}={}", k.trim().to_ascii_lowercase(), v.trim()),
            None => d.trim().to_ascii_lowercase(),
        })
        .filter(|d| !d.is_empty())
        .collect();
    h.remove(header::CACHE_CONTROL);
    if !cc.is_empty() {
        if let Ok(v) = cc.join(", ").parse() {
            h.insert(header::CACHE_CONTROL, v);
        }
    }
    let ages: Vec<&HeaderValue> = headers.get_all(header::AGE).iter().collect();
    let valid = matches!(ages.as_slice(), [one] if !one.is_empty() && one.as_bytes().iter().all(u8::is_ascii_digit));
    if !ages.is_empty() && !valid {
        h.insert(header::AGE, HeaderValue::from_static(AGE_INVALID));
    }
    let mut surrogate_max_age = None;
    for d in headers
        .get_all("surrogate-control")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
    {
        let (d, target) = match d.split_once(';') {
            Some((d, t)) => (d, Some(t.trim())),
            None => (d, None),
        };
        if target.is_some_and(|t| !t.eq_ignore_ascii_case(SURROGATE)) {
            continue;
        }
        let d = d.trim().to_ascii_lowercase();
        if d == "no-store" {
            return None;
        }
        if let Some(v) = d.strip_prefix("max-age=") {
            if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
                surrogate_max_age = Some(v.parse::<u64>().unwrap_or(u64::MAX).min(1 << 31));
            }
        }
    }
    if let Some(n) = surrogate_max_age {
        h.insert(header::CACHE_CONTROL, format!("max-age={n}").parse().ok()?);
        h.remove(header::EXPIRES);
    }
    Some(h)
}

/// Why a request is not answered from another requester's entry, if it is not.
pub fn private_request(headers: &HeaderMap) -> Option<&'static str> {
    if headers.contains_key(header::AUTHORIZATION) {
        return Some("authorization");
    }
    if headers.contains_key(SIGNATURE) {
        return Some("signature");
    }
    session_cookie(headers).then_some("session cookie")
}

/// Whether the request carries a Mastodon session cookie (in any of its `Cookie` fields).
pub fn session_cookie(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.split('=').next())
        .any(|name| SESSION_COOKIES.contains(&name.trim()))
}

/// Query parameters Doorkeeper (Mastodon's OAuth) takes as a bearer token, as `Authorization`.
const TOKEN_PARAMS: [&str; 2] = ["access_token", "bearer_token"];

/// Whether a path's query carries an OAuth token (`?access_token=…`, RFC 6750 §2.3): such a
/// request is as private as one with `Authorization`, and its URL (with the token) is never
/// written to disk. Names are read as Rack reads them: fields split on `&` and on `;` (Rack
/// 2; Rack 3 only `&`: the wider reading is the safe one), spaces after a separator
/// skipped, percent-decoded, and `access_token[]` or `access_token[x]` taken as the same
/// parameter. Hand-written because `form_urlencoded` splits on `&` only.
pub fn token_in_query(path: &str) -> bool {
    let Some((_, query)) = path.split_once('?') else {
        return false;
    };
    query.split(['&', ';']).any(|field| {
        let name = field
            .trim_start_matches(' ')
            .split('=')
            .next()
            .unwrap_or("");
        let name = percent_encoding::percent_decode_str(name).decode_utf8_lossy();
        let base = name.split('[').next().unwrap_or("");
        TOKEN_PARAMS.contains(&base)
    })
}

/// Request headers that change the URL core sees (Rails builds `request.host`, `port` and
/// `ssl?` from them, and so its redirects and links) but are not part of the cache key: an
/// answer to such a request would be stored for every client of the URL (cache poisoning).
/// Also more than one `Host` field (core joins them; the policy compares the first).
/// `X-Forwarded-Host` equal to `Host` (a proxy in front naming the same host) is harmless.
/// `X-Forwarded-Proto` is set by the proxy itself (`proxy::headers`).
pub fn unkeyed(headers: &HeaderMap) -> Option<&'static str> {
    let mut hosts = headers.get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Some("host");
    }
    // Every field: Rack joins them and takes the last name of the list.
    let same = |forwarded: &HeaderValue| {
        host.is_some_and(|h| h.as_bytes().eq_ignore_ascii_case(forwarded.as_bytes()))
    };
    if !headers.get_all("x-forwarded-host").iter().all(same) {
        return Some("x-forwarded-host");
    }
    [
        "x-forwarded-port",
        "x-forwarded-scheme",
        "x-forwarded-ssl",
        "forwarded",
    ]
    .into_iter()
    .find(|name| headers.contains_key(*name))
}

/// A Cache-Control directive's presence and value.
pub fn directive<'a>(headers: &'a HeaderMap, name: &str) -> Option<Option<&'a str>> {
    headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|d| {
            let mut kv = d.splitn(2, '=');
            let k = kv.next()?.trim();
            k.eq_ignore_ascii_case(name)
                .then(|| kv.next().map(|v| v.trim().trim_matches('"')))
        })
}

fn seconds(headers: &HeaderMap, name: &str) -> Option<Duration> {
    directive(headers, name)
        .flatten()
        .and_then(|v| v.parse::<u64>().ok())
        .map(Duration::from_secs)
}

/// The request as the policy sees it: `GET` (a HEAD is answered from a GET's entry), the
/// scheme and path (the policy compares the URI: an entry answers requests of its scheme
/// only), the client's headers. The URI's authority is a fixed name: the policy compares
/// the `Host` header on its own, as sent.
pub fn policy_request(scheme: Scheme, path: &str, headers: &HeaderMap) -> http::request::Parts {
    let uri = http::Uri::builder()
        .scheme(scheme.as_str())
        .authority("core")
        .path_and_query(path)
        .build()
        .unwrap_or_default();
    let mut headers = headers.clone();
    // The client's own validators are answered from the stored entry (`answer`), never sent
    // with a revalidation: the crate would merge them with the stored ones, and core's 304
    // could then be about the client's copy, not the stored one (which it would refresh).
    headers.remove(header::IF_NONE_MATCH);
    headers.remove(header::IF_MODIFIED_SINCE);
    request_for(uri, headers)
}

/// A policy request for `uri` (made by [`policy_request`]) and `headers`.
pub fn request_for(uri: http::Uri, headers: HeaderMap) -> http::request::Parts {
    let (mut parts, ()) = http::Request::new(()).into_parts();
    parts.uri = uri;
    parts.headers = headers;
    parts
}

/// The meta of a response to store, or None when it may not be stored.
/// `private`: the request carried a session cookie or a `Signature` (its response is stored
/// only when it says `public` or `s-maxage`; `Authorization` follows RFC 9111 §3.5 in the
/// crate).
pub fn build(
    host: &str,
    path: &str,
    req: &http::request::Parts,
    private: Option<&str>,
    status: StatusCode,
    headers: &HeaderMap,
    now: SystemTime,
) -> Option<Meta> {
    let code = status.as_u16();
    if code < 200 || code == 206 || code == 304 {
        return None;
    }
    // Never shared: it would hand one client's cookie to others.
    if headers.contains_key(header::SET_COOKIE) {
        return None;
    }
    let explicit_public =
        directive(headers, "public").is_some() || directive(headers, "s-maxage").is_some();
    if matches!(private, Some("signature" | "session cookie")) && !explicit_public {
        return None;
    }
    if private == Some("access token") {
        // Its URL names the token: never written to disk, never shared.
        return None;
    }

    // The crate stores only the statuses it lists; RFC 9111 lets a cache store any final
    // status with explicit freshness. Such a response is judged as a 200 (the heuristics
    // for default-cacheable statuses never apply: it has explicit freshness) and served
    // with its own status, kept in the meta.
    let judged = if CRATE_STATUSES.contains(&code) {
        status
    } else {
        let explicit = directive(headers, "max-age").is_some()
            || directive(headers, "s-maxage").is_some()
            || headers.contains_key(header::EXPIRES);
        if !explicit || directive(headers, "must-understand").is_some() {
            return None;
        }
        StatusCode::OK
    };
    let (mut resp, ()) = http::Response::new(()).into_parts();
    resp.status = judged;
    resp.headers = judged_headers(headers)?;
    let policy = CachePolicy::new_options(req, &resp, now, CacheOptions::default());
    if !policy.is_storable() {
        return None;
    }
    // Only what matching needs is kept of the request (Host and the headers `Vary` names),
    // never credentials or the client's addresses: the policy is made again from that. A
    // stored response with `Vary` on a credential then matches only requests without one.
    let mut kept = HeaderMap::new();
    let vary: Vec<String> = headers
        .get_all(header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|n| n.trim().to_ascii_lowercase())
        .collect();
    for (name, value) in &req.headers {
        let n = name.as_str();
        let secret = matches!(n, "authorization" | "cookie" | "signature");
        let named = vary.iter().any(|v| v == n);
        if secret && named {
            // The response depends on this requester's credential: never shared.
            return None;
        }
        if (named || n == "host") && req.headers.get_all(name).iter().nth(1).is_some() {
            // Several fields of a selecting header: core reads them joined, the policy
            // compares only the first, so a request sending the usual value first and
            // another after would store core's answer to both for everyone sending the
            // usual one.
            return None;
        }
        if n == "host" || named {
            kept.append(name.clone(), value.clone());
        }
    }
    // The scheme is part of the URI (`policy_request`); a request without one is not stored.
    let scheme = Scheme::parse(req.uri.scheme_str()?)?;
    let clean = request_for(req.uri.clone(), kept);
    let policy = CachePolicy::new_options(&clean, &resp, now, CacheOptions::default());
    let mut headers = headers.clone();
    headers.remove("surrogate-control");
    Some(Meta {
        scheme: Some(scheme),
        host: host.to_owned(),
        raw_host: req
            .headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        path: path.to_owned(),
        status: code,
        headers,
        fresh_until: now + policy.time_to_live(now),
        policy,
        len: 0,
        hot: Default::default(),
        used: Default::default(),
    })
}

/// Whether a response from core, to a request that a stored entry would answer, says that
/// entry may not be shared any more: an answer about the resource itself (a status cacheable
/// by default, RFC 9110 §15.1, other than 206 and 5xx: a 200 now private, Mastodon's 404 for
/// a deleted post) marked `no-store` or `private`. Not one about this request (400, 401, 403,
/// 429…): an anonymous client rate-limited or refused must not empty the cache for others.
pub fn forbids_sharing(status: StatusCode, headers: &HeaderMap) -> bool {
    if !matches!(
        status.as_u16(),
        200 | 203 | 204 | 300 | 301 | 308 | 404 | 405 | 410 | 414
    ) {
        return false;
    }
    directive(headers, "no-store").is_some() || directive(headers, "private").is_some()
}

/// What a 304 does to the stored entry it revalidated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Update {
    /// The updated entry replaces the stored one.
    Store,
    /// The 304 sets a cookie: that is for its requester only; the stored entry stays as it was.
    Keep,
    /// The updated response may not be shared any more (`private`, `no-store`, a `Vary` on
    /// a credential…): the stored entry goes, so that it is neither served under
    /// `stale-while-revalidate` / `stale-if-error` nor revalidated for others again.
    Evict,
}

/// The stored meta after a 304: the 304's headers replace the stored ones of the same name
/// (RFC 9111 §3.2), and the policy is made again from the result, which answers this
/// request in any case; [`Update`] says what becomes of the stored entry.
pub fn updated(
    meta: &Meta,
    req: &http::request::Parts,
    not_modified: &HeaderMap,
    now: SystemTime,
) -> (Meta, Update) {
    let mut headers = meta.headers.clone();
    headers.remove(header::AGE);
    let names: Vec<HeaderName> = not_modified.keys().cloned().collect();
    for name in names {
        if KEEP_ON_304.contains(&name.as_str()) {
            continue;
        }
        headers.remove(&name);
        for v in not_modified.get_all(&name) {
            headers.append(name.clone(), v.clone());
        }
    }
    let status = StatusCode::from_u16(meta.status).unwrap_or(StatusCode::OK);
    // The body is the stored one, which this request matched on the first field of each
    // header `Vary` names: only those are read, so that a request repeating a header (which
    // `build` refuses for a new body) does not take the shared entry out.
    let mut first = HeaderMap::with_capacity(req.headers.keys_len());
    for name in req.headers.keys() {
        if let Some(v) = req.headers.get(name) {
            first.insert(name.clone(), v.clone());
        }
    }
    let req = &request_for(req.uri.clone(), first);
    if let Some(m) = build(&meta.host, &meta.path, req, None, status, &headers, now) {
        return (m, Update::Store);
    }
    let mut without_cookie = headers.clone();
    without_cookie.remove(header::SET_COOKIE);
    let shareable = without_cookie.len() < headers.len()
        && build(
            &meta.host,
            &meta.path,
            req,
            None,
            status,
            &without_cookie,
            now,
        )
        .is_some();
    let mut m = meta.clone();
    m.headers = headers;
    m.fresh_until = SystemTime::UNIX_EPOCH;
    (
        m,
        if shareable {
            Update::Keep
        } else {
            Update::Evict
        },
    )
}

impl Meta {
    /// How long past its freshness the entry is at `now` (zero while fresh).
    pub fn staleness(&self, now: SystemTime) -> Duration {
        now.duration_since(self.fresh_until).unwrap_or_default()
    }

    /// Whether a stored response may ever be served stale (RFC 9111 §4.2.4, §5.2.2:
    /// `must-revalidate`, `proxy-revalidate`, `no-cache` and `s-maxage` forbid it).
    fn may_serve_stale(&self) -> bool {
        [
            "must-revalidate",
            "proxy-revalidate",
            "no-cache",
            "s-maxage",
        ]
        .iter()
        .all(|d| directive(&self.headers, d).is_none())
    }

    /// `stale-while-revalidate` allows serving it now, revalidating in the background.
    pub fn stale_while_revalidate(&self, now: SystemTime) -> bool {
        self.may_serve_stale()
            && seconds(&self.headers, "stale-while-revalidate")
                .is_some_and(|w| self.staleness(now) <= w)
    }

    /// `stale-if-error` allows serving it now that core failed.
    pub fn stale_if_error(&self, now: SystemTime) -> bool {
        self.may_serve_stale()
            && seconds(&self.headers, "stale-if-error").is_some_and(|w| self.staleness(now) <= w)
    }
}

/// Whether a client's conditional request is satisfied by the stored response (RFC 9110
/// §13.1.2, §13.1.3; weak comparison for If-None-Match).
pub fn not_modified(req: &HeaderMap, stored: &HeaderMap) -> bool {
    if let Some(inm) = req.get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok()) {
        let Some(etag) = stored.get(header::ETAG).and_then(|v| v.to_str().ok()) else {
            return false;
        };
        let bare = |t: &str| t.trim().trim_start_matches("W/").to_owned();
        return inm.trim() == "*" || inm.split(',').any(|t| bare(t) == bare(etag));
    }
    let Some(since) = req
        .get(header::IF_MODIFIED_SINCE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| httpdate::parse_http_date(v).ok())
    else {
        return false;
    };
    let modified = stored
        .get(header::LAST_MODIFIED)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| httpdate::parse_http_date(v).ok());
    modified.is_some_and(|m| m <= since)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::header_map as map;

    #[test]
    fn only_an_answer_about_the_resource_takes_the_stored_one_back() {
        let private = HeaderMap::from_iter([(
            header::CACHE_CONTROL,
            HeaderValue::from_static("private, no-store"),
        )]);
        for code in [200, 404, 410] {
            let status = StatusCode::from_u16(code).unwrap();
            assert!(forbids_sharing(status, &private), "{code}");
            assert!(!forbids_sharing(status, &HeaderMap::new()), "{code} shared");
        }
        for code in [206, 304, 400, 401, 403, 429, 500, 503] {
            let status = StatusCode::from_u16(code).unwrap();
            assert!(!forbids_sharing(status, &private), "{code}");
        }
    }

    #[test]
    fn credentials_make_a_request_private() {
        assert_eq!(
            private_request(&map(&[("authorization", "Bearer x")])),
            Some("authorization")
        );
        assert_eq!(
            private_request(&map(&[("signature", "keyId=\"a\"")])),
            Some("signature")
        );
        assert_eq!(
            private_request(&map(&[("cookie", "theme=dark; _mastodon_session=abc")])),
            Some("session cookie")
        );
        assert_eq!(private_request(&map(&[("cookie", "theme=dark")])), None);
    }

    #[test]
    fn tokens_in_the_query_are_found_as_rack_reads_them() {
        for path in [
            "/api/v1/timelines/home?access_token=t",
            "/x?limit=5&bearer_token=t",
            "/x?limit=5;access_token=t",
            "/x?limit=5& access_token=t",
            "/x?access%5Ftoken=t",
            "/x?access_token[]=t",
        ] {
            assert!(token_in_query(path), "{path}");
        }
        for path in [
            "/x",
            "/x?access_tokens=t",
            "/x?my_access_token=t",
            "/access_token",
        ] {
            assert!(!token_in_query(path), "{path}");
        }
    }

    #[test]
    fn forwarding_headers_other_than_the_host_itself_are_unkeyed() {
        let host = ("host", "a.example");
        assert_eq!(unkeyed(&map(&[host])), None);
        assert_eq!(
            unkeyed(&map(&[host, ("x-forwarded-host", "A.example")])),
            None
        );
        for bad in [
            map(&[host, ("x-forwarded-host", "evil.example")]),
            map(&[
                host,
                ("x-forwarded-host", "a.example"),
                ("x-forwarded-host", "evil.example"),
            ]),
            map(&[host, ("host", "evil.example")]),
            map(&[("x-forwarded-host", "a.example")]),
            map(&[host, ("x-forwarded-ssl", "on")]),
        ] {
            assert!(unkeyed(&bad).is_some(), "{bad:?}");
        }
    }

    #[test]
    fn a_304_to_a_request_repeating_a_selecting_header_keeps_the_entry() {
        let now = SystemTime::now();
        let resp = map(&[("cache-control", "public, max-age=0"), ("vary", "Accept")]);
        let html = policy_request(Scheme::Https, "/x", &map(&[("accept", "text/html")]));
        let meta = build("h", "/x", &html, None, StatusCode::OK, &resp, now).unwrap();
        let twice = policy_request(
            Scheme::Https,
            "/x",
            &map(&[
                ("accept", "text/html"),
                ("accept", "application/activity+json"),
            ]),
        );
        assert!(build("h", "/x", &twice, None, StatusCode::OK, &resp, now).is_none());
        let fresh = map(&[("cache-control", "public, max-age=60")]);
        assert_eq!(updated(&meta, &twice, &fresh, now).1, Update::Store);
        let private = map(&[("cache-control", "private")]);
        assert_eq!(updated(&meta, &twice, &private, now).1, Update::Evict);
        let cookie = map(&[("set-cookie", "a=b")]);
        assert_eq!(updated(&meta, &html, &cookie, now).1, Update::Keep);
    }

    #[test]
    fn set_cookie_private_and_no_store_are_not_stored() {
        let now = SystemTime::now();
        let req = policy_request(Scheme::Https, "/x", &HeaderMap::new());
        let ok = map(&[("cache-control", "public, max-age=60")]);
        assert!(build("h", "/x", &req, None, StatusCode::OK, &ok, now).is_some());
        for bad in [
            map(&[("cache-control", "max-age=60"), ("set-cookie", "a=b")]),
            map(&[("cache-control", "private, max-age=60")]),
            map(&[("cache-control", "no-store, max-age=60")]),
        ] {
            assert!(build("h", "/x", &req, None, StatusCode::OK, &bad, now).is_none());
        }
        let plain = map(&[("cache-control", "max-age=60")]);
        assert!(build(
            "h",
            "/x",
            &req,
            Some("session cookie"),
            StatusCode::OK,
            &plain,
            now
        )
        .is_none());
        assert!(build("h", "/x", &req, Some("signature"), StatusCode::OK, &ok, now).is_some());
        // Public, but varying on the credential the request carried: not shared.
        let signed = policy_request(Scheme::Https, "/x", &map(&[("signature", "keyId=\"k\"")]));
        let vary = map(&[
            ("cache-control", "public, max-age=60"),
            ("vary", "Accept, Signature"),
        ]);
        assert!(build(
            "h",
            "/x",
            &signed,
            Some("signature"),
            StatusCode::OK,
            &vary,
            now
        )
        .is_none());
        // Other statuses only with explicit freshness.
        let code = StatusCode::from_u16(599).unwrap();
        assert!(build("h", "/x", &req, None, code, &plain, now).is_some());
        assert!(build("h", "/x", &req, None, code, &HeaderMap::new(), now).is_none());
    }
}
