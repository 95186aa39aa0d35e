//! The plain-HTTP listener of `[tls]`: every request is sent to https with the same host and
//! path (308, which keeps the method), except ACME http-01 challenges, which are served from
//! `tls.acme_challenge_dir` so that a certificate can be issued or renewed while the edge runs.

use std::path::PathBuf;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};

use super::Body;

/// Where ACME http-01 challenges are asked for.
const ACME_PREFIX: &str = "/.well-known/acme-challenge/";

/// What the redirect listener needs to answer.
#[derive(Debug, Clone)]
pub struct Redirect {
    /// Port of the https listener; left out of the `Location` when it is 443.
    pub https_port: u16,
    /// Directory holding the challenge files, if challenges are served.
    pub acme_dir: Option<PathBuf>,
}

impl Redirect {
    /// Answers one plain-HTTP request: an ACME challenge file, or a redirect to https.
    pub async fn handle<B>(&self, req: Request<B>) -> Response<Body> {
        let path = req.uri().path();
        if let (Some(dir), Some(token)) = (&self.acme_dir, path.strip_prefix(ACME_PREFIX)) {
            return challenge(dir.join(token), token).await;
        }
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .and_then(|h| h.parse::<http::uri::Authority>().ok())
            .or_else(|| req.uri().authority().cloned());
        let Some(host) = host else {
            return text(StatusCode::BAD_REQUEST, "a Host header is required\n");
        };
        let port = match self.https_port {
            443 => String::new(),
            p => format!(":{p}"),
        };
        let path_and_query = req.uri().path_and_query().map_or("/", |p| p.as_str());
        let location = format!("https://{}{port}{path_and_query}", host.host());
        let Ok(location) = HeaderValue::from_str(&location) else {
            return text(StatusCode::BAD_REQUEST, "bad Host header\n");
        };
        let mut resp = text(StatusCode::PERMANENT_REDIRECT, "");
        resp.headers_mut().insert(header::LOCATION, location);
        resp
    }
}

/// Serves one challenge file. A token is base64url (RFC 8555 §8.3): anything else, `..` or
/// `/` included, is refused, so no path leaves the directory.
async fn challenge(file: PathBuf, token: &str) -> Response<Body> {
    let valid = !token.is_empty()
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !valid {
        return text(StatusCode::NOT_FOUND, "not found\n");
    }
    match tokio::fs::read(&file).await {
        Ok(body) => {
            let mut resp = Response::new(full(Bytes::from(body)));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            resp
        }
        Err(e) => {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(file = %file.display(), error = %e, "cannot read an ACME challenge");
            }
            text(StatusCode::NOT_FOUND, "not found\n")
        }
    }
}

fn full(b: Bytes) -> Body {
    Full::new(b).map_err(|never| match never {}).boxed_unsync()
}

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut resp = Response::new(full(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    resp
}
