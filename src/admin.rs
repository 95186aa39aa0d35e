//! The admin handler, served on `admin_listen`: `/metrics` (OpenMetrics text), `/healthz`
//! (200, or 503 with the active alerts), and the status page (`/`, its live part at
//! `/status/live`).

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;

use crate::listen::Body;
use crate::metrics::Metrics;
use crate::status::{page, Status};

const HTML: &str = "text/html; charset=utf-8";

/// Answers one admin request: `GET /metrics`, `/healthz`, `/`, `/status/live`, else 404.
pub fn handle(metrics: &Metrics, status: &Status, req: Request<Incoming>) -> Response<Body> {
    let (code, ctype, text) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => (
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.render(),
        ),
        (&Method::GET, "/healthz") => match status.health() {
            Ok(()) => (StatusCode::OK, "text/plain", "ok\n".to_owned()),
            Err(reasons) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("unhealthy\n{}\n", reasons.join("\n")),
            ),
        },
        (&Method::GET, "/") => (StatusCode::OK, HTML, page::page(status, metrics)),
        (&Method::GET, "/status/live") => (StatusCode::OK, HTML, page::live(status, metrics)),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_owned(),
        ),
    };
    let mut resp = Response::new(
        Full::new(Bytes::from(text))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *resp.status_mut() = code;
    let h = resp.headers_mut();
    h.insert(http::header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    h.insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-store"),
    );
    if ctype == HTML {
        // Everything the page needs is inline; nothing may be loaded from elsewhere.
        h.insert(
            http::header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(
                "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; connect-src 'self'; frame-ancestors 'none'",
            ),
        );
        h.insert(
            http::header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        );
    }
    resp
}
