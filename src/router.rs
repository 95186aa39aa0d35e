//! The router: Host and path → which handler answers.
//!
//! - a media host (`media_hosts`): every path is a media key (bucket-root layout);
//! - a core host (`[core].hosts`): the media prefix (`url_prefix`) is media, `/api/v1/streaming`
//!   (and below) goes to the streaming upstreams, everything else to the web upstreams;
//! - any other Host, when `[core]` or `media_hosts` is set: 421 Misdirected Request, never
//!   core's answer for another name.
//!
//! With neither `[core]` nor `media_hosts`, every request is a media request, as before the
//! front door.
//!
//! The router in use is a [`SharedRouter`]: a reload (SIGHUP) swaps in one built from the new
//! `[core] hosts` and `media_hosts`; a request is routed by the one in place when it arrives.

use std::sync::Arc;

use http::Request;

/// Where a request goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// The media handler, key after `url_prefix`.
    Media,
    /// The media handler, the whole path is the key (a media host).
    MediaRoot,
    /// The streaming upstreams.
    Streaming,
    /// The web upstreams.
    Core,
    /// A Host this edge does not serve: 421.
    Misdirected,
}

/// The streaming API's path.
const STREAMING: &str = "/api/v1/streaming";

/// Host names and what they serve.
#[derive(Debug, Clone, Default)]
pub struct Router {
    media_hosts: Vec<String>,
    core_hosts: Vec<String>,
    prefix: String,
}

impl Router {
    /// `media_hosts` and `core_hosts` as validated (lower case); `prefix` is `url_prefix`.
    pub fn new(media_hosts: Vec<String>, core_hosts: Vec<String>, prefix: String) -> Router {
        Router {
            media_hosts,
            core_hosts,
            prefix,
        }
    }

    /// The router of a config: its `media_hosts`, `[core] hosts` and `url_prefix`.
    pub fn of(config: &crate::config::Config) -> Router {
        let core_hosts = config
            .core
            .as_ref()
            .map(|c| c.hosts.clone())
            .unwrap_or_default();
        Router::new(
            config.media_hosts.clone(),
            core_hosts,
            config.url_prefix.clone(),
        )
    }

    /// The same `url_prefix` with other hosts (a reload; `url_prefix` applies at restart).
    pub fn with_hosts(&self, media_hosts: Vec<String>, core_hosts: Vec<String>) -> Router {
        Router::new(media_hosts, core_hosts, self.prefix.clone())
    }

    /// The names routed to core.
    pub fn core_hosts(&self) -> &[String] {
        &self.core_hosts
    }

    /// The media hosts.
    pub fn media_hosts(&self) -> &[String] {
        &self.media_hosts
    }

    /// Routes a request by its Host (the `Host` header, or the URI's authority in HTTP/2).
    pub fn route<B>(&self, req: &Request<B>) -> Route {
        let host = req
            .headers()
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| req.uri().authority().map(|a| a.as_str()));
        self.route_to(host, req.uri().path())
    }

    /// Routes a Host (with or without port) and a path.
    pub fn route_to(&self, host: Option<&str>, path: &str) -> Route {
        if self.media_hosts.is_empty() && self.core_hosts.is_empty() {
            return Route::Media;
        }
        // `normalize_host` without a String of its own: the names here are lower case, so
        // comparing without case is comparing with the lower-cased host.
        let Some(host) = host.map(|h| strip_port(h).trim_end_matches('.')) else {
            return Route::Misdirected;
        };
        let named = |names: &[String]| names.iter().any(|n| n.eq_ignore_ascii_case(host));
        if named(&self.media_hosts) {
            return Route::MediaRoot;
        }
        if named(&self.core_hosts) {
            // `url_prefix = "/"` is the bucket-root layout, served on the media hosts: on
            // the instance's own names only a real prefix is media.
            if self.prefix != "/" && path.starts_with(&self.prefix) {
                return Route::Media;
            }
            let streaming = path
                .strip_prefix(STREAMING)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'));
            return if streaming {
                Route::Streaming
            } else {
                Route::Core
            };
        }
        if self.core_hosts.is_empty() {
            // Media hosts but no core: the instance's own names are not known, so the
            // media prefix is served on any other name, as before.
            return Route::Media;
        }
        Route::Misdirected
    }
}

/// The router in use, shared by the front door, the cache buster's media target and the
/// reload that replaces it.
#[derive(Debug, Clone, Default)]
pub struct SharedRouter(Arc<parking_lot::RwLock<Arc<Router>>>);

impl SharedRouter {
    /// Shares `router`.
    pub fn new(router: Router) -> SharedRouter {
        SharedRouter(Arc::new(parking_lot::RwLock::new(Arc::new(router))))
    }

    /// The router in use now.
    pub fn get(&self) -> Arc<Router> {
        self.0.read().clone()
    }

    /// Routes with the router in use now ([`Router::route`]).
    pub fn route<B>(&self, req: &Request<B>) -> Route {
        self.0.read().route(req)
    }

    /// Puts `router` in use for the requests that arrive from now on.
    pub fn set(&self, router: Router) {
        *self.0.write() = Arc::new(router);
    }
}

/// 421 Misdirected Request: this edge does not serve that name.
pub fn misdirected() -> http::Response<crate::listen::Body> {
    use http_body_util::BodyExt;
    let body = http_body_util::Full::new(bytes::Bytes::from_static(
        b"421 Misdirected Request: this server does not serve that name\n",
    ))
    .map_err(|e| match e {})
    .boxed_unsync();
    let mut resp = http::Response::new(body);
    *resp.status_mut() = http::StatusCode::MISDIRECTED_REQUEST;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// `example.social:443` → `example.social`; `[::1]:8080` → `[::1]`.
pub fn strip_port(h: &str) -> &str {
    // Bytes, not `rfind`: a short host is scanned in a few instructions (every request).
    let b = h.as_bytes();
    match b.iter().rposition(|&c| c == b':') {
        Some(i) if !b[i..].contains(&b']') => &h[..i],
        _ => h,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router() -> Router {
        Router::new(
            vec!["files.example.social".into()],
            vec!["example.social".into()],
            "/system/".into(),
        )
    }

    #[test]
    fn routes_by_host_and_path() {
        let r = router();
        let h = Some("example.social");
        assert_eq!(r.route_to(h, "/system/a/b.png"), Route::Media);
        assert_eq!(r.route_to(h, "/api/v1/streaming"), Route::Streaming);
        assert_eq!(r.route_to(h, "/api/v1/streaming/user"), Route::Streaming);
        assert_eq!(r.route_to(h, "/api/v1/streamingx"), Route::Core);
        assert_eq!(r.route_to(h, "/api/v1/timelines/home"), Route::Core);
        assert_eq!(r.route_to(h, "/"), Route::Core);
        assert_eq!(r.route_to(Some("Example.Social.:443"), "/"), Route::Core);
        assert_eq!(
            r.route_to(Some("files.example.social"), "/a/b.png"),
            Route::MediaRoot
        );
        assert_eq!(
            r.route_to(Some("files.example.social"), "/api/v1/streaming"),
            Route::MediaRoot
        );
        assert_eq!(r.route_to(Some("other.social"), "/"), Route::Misdirected);
        assert_eq!(
            r.route_to(Some("other.social"), "/system/a.png"),
            Route::Misdirected
        );
        assert_eq!(r.route_to(None, "/"), Route::Misdirected);
        assert_eq!(r.route_to(Some("[::1]:8080"), "/"), Route::Misdirected);
    }

    #[test]
    fn a_bucket_root_prefix_does_not_take_the_instance_host() {
        let r = Router::new(vec!["files.a".into()], vec!["a".into()], "/".into());
        assert_eq!(r.route_to(Some("a"), "/about"), Route::Core);
        assert_eq!(r.route_to(Some("files.a"), "/x.png"), Route::MediaRoot);
    }

    #[test]
    fn without_front_door_everything_is_media() {
        let r = Router::new(vec![], vec![], "/system/".into());
        assert_eq!(r.route_to(Some("any"), "/api/v1/streaming"), Route::Media);
        assert_eq!(r.route_to(None, "/x"), Route::Media);
        let r = Router::new(vec!["files.a".into()], vec![], "/system/".into());
        assert_eq!(r.route_to(Some("files.a"), "/x"), Route::MediaRoot);
        assert_eq!(r.route_to(Some("other"), "/system/x"), Route::Media);
    }
}
