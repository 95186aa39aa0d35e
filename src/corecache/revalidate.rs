//! Stale entries: revalidated for a client (a 304 updates the stored headers: REVALIDATED;
//! core failing within `stale-if-error`: STALE) or in the background under
//! `stale-while-revalidate`.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::answer::Asked;
use super::fill::FlightGuard;
use super::store::Entry;
use super::{policy, status_only, upstream_request, CoreCache, Ctx};
use crate::compress::Mode;
use crate::listen::{Body, ConnInfo};
use crate::metrics::CacheStatus;
use crate::proxy::{Kind, Proxy};

impl CoreCache {
    /// Revalidates a stale entry for a client.
    pub(super) async fn revalidate(
        self: &Arc<Self>,
        proxy: &Arc<Proxy>,
        ctx: Ctx<'_>,
        req: Request<Incoming>,
        e: Entry,
        request: http::request::Parts,
        guard: Option<FlightGuard>,
    ) -> Response<Body> {
        let head = req.method() == Method::HEAD;
        let asked = Asked {
            head,
            gzip: ctx.gzip,
        };
        let conn = req.extensions().get::<ConnInfo>().copied();
        let result = proxy.send(Kind::Web, upstream_request(request, conn)).await;
        let now = SystemTime::now();
        match result {
            Ok(resp) if resp.status() == StatusCode::NOT_MODIFIED => {
                // Only the stored validators were sent (`policy::policy_request` leaves the
                // client's out): the 304 is about the stored response. (Its own `ETag`, if
                // another, is not taken: `policy::updated`; the suite's
                // `304-etag-update-response-ETag` asks exactly that.)
                let (updated, evict) = self.update(&e, ctx.preq, resp.headers(), now).await;
                // Its body read (or its file open) first: then the entry may go.
                let answer = self
                    .serve(&updated, req.headers(), asked, CacheStatus::Revalidated)
                    .await;
                if evict {
                    self.evict(vec![e.id.clone()]);
                }
                drop(guard);
                match answer {
                    Some(r) => r,
                    None => self.finish(status_only(StatusCode::BAD_GATEWAY), CacheStatus::Miss),
                }
            }
            Ok(resp) if resp.status().is_server_error() && e.meta.stale_if_error(now) => {
                drop(guard);
                self.serve_stale_or(&e, &req, asked, resp).await
            }
            Ok(resp) if head => {
                // Core answered the stored GET: its body is stored, the HEAD's client gets
                // the head.
                let (parts, mut body) = self.keep(ctx, resp, guard, CacheStatus::Miss).into_parts();
                // Read to its end for the store, nothing of it kept here.
                tokio::spawn(async move { while let Some(Ok(_)) = body.frame().await {} });
                Response::from_parts(parts, crate::listen::empty())
            }
            Ok(resp) => self.keep(ctx, resp, guard, CacheStatus::Miss),
            Err(err) if e.meta.stale_if_error(now) => {
                tracing::debug!(error = %err, path = %e.meta.path, "core cache: serving stale, core failed");
                drop(guard);
                let resp = proxy.answer(Err(err));
                self.serve_stale_or(&e, &req, asked, resp).await
            }
            Err(err) => self.finish(proxy.answer(Err(err)), CacheStatus::Miss),
        }
    }

    async fn serve_stale_or(
        &self,
        e: &Entry,
        req: &Request<Incoming>,
        asked: Asked,
        otherwise: Response<Body>,
    ) -> Response<Body> {
        match self
            .serve(e, req.headers(), asked, CacheStatus::Stale)
            .await
        {
            Some(r) => r,
            None => self.finish(otherwise, CacheStatus::Miss),
        }
    }

    /// Revalidates a stale entry served under `stale-while-revalidate`.
    pub(super) async fn revalidate_in_background(
        self: &Arc<Self>,
        proxy: &Arc<Proxy>,
        e: Entry,
        request: http::request::Parts,
        conn: Option<ConnInfo>,
        guard: FlightGuard,
    ) {
        // The stored request's URI: its scheme.
        let preq = policy::request_for(request.uri.clone(), request.headers.clone());
        let sent = Instant::now();
        let result = proxy.send(Kind::Web, upstream_request(request, conn)).await;
        let now = SystemTime::now();
        match result {
            Ok(resp) if resp.status() == StatusCode::NOT_MODIFIED => {
                // Only the stored validators were sent: the 304 is about the stored entry.
                let (_, evict) = self.update(&e, &preq, resp.headers(), now).await;
                if evict {
                    self.evict(vec![e.id.clone()]);
                }
            }
            Ok(resp) if !resp.status().is_server_error() => {
                let ctx = Ctx {
                    host: &e.meta.host,
                    path: &e.meta.path,
                    preq: &preq,
                    private: None,
                    sent,
                    gzip: Mode::Off,
                };
                let resp = self.keep(ctx, resp, Some(guard), CacheStatus::Miss);
                let _ = resp.into_body().collect().await;
            }
            _ => {}
        }
    }

    /// Updates a stored entry from a 304; returns it as updated (for this response only if
    /// the update made it unstorable), and whether the stored entry must go
    /// ([`policy::Update::Evict`]; left to the caller, once it has read the body).
    async fn update(
        &self,
        e: &Entry,
        preq: &http::request::Parts,
        headers: &HeaderMap,
        now: SystemTime,
    ) -> (Entry, bool) {
        let (mut meta, update) = policy::updated(&e.meta, preq, headers, now);
        meta.len = e.meta.len;
        match update {
            policy::Update::Store => {
                let store = self.store.clone();
                let (id, m) = (e.id.clone(), meta.clone());
                let _ = tokio::task::spawn_blocking(move || store.update(&id, m)).await;
            }
            policy::Update::Keep | policy::Update::Evict => {}
        }
        let updated = Entry {
            id: e.id.clone(),
            meta: Arc::new(meta),
        };
        (updated, update == policy::Update::Evict)
    }
}
