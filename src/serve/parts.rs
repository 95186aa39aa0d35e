//! The pieces [`super::start`] assembles that take more than a line: the flights' directories,
//! the backfill job, the TLS listeners, the core cache, the purge targets, and the front
//! door's handler that routes each request to them.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;

use crate::cache::Cache;
use crate::config::Config;
use crate::edge::Edge;
use crate::flight::{Dirs, DiskHealth};
use crate::ledger::Ledger;
use crate::listen;
use crate::listen::redirect::Redirect;
use crate::listen::tls::Certificates;
use crate::metrics::Metrics;
use crate::store;

/// Where fetches write bodies: the cache's temp dir (data_dir's without a cache) and
/// data_dir's staging, each with the health of its disk. Bodies being fetched when the
/// process stopped are incomplete: data_dir/tmp is cleared (a full disk must not stop the
/// start, so a failure there only means less room).
pub(super) fn flight_dirs(cache: Option<&Arc<Cache>>, data_dir: &Path, metrics: &Metrics) -> Dirs {
    let data_tmp = data_dir.join("tmp");
    crate::cache::clear_dir(&data_tmp);
    let data_health = Arc::new(DiskHealth::new("data_dir", metrics.clone()));
    match cache {
        Some(c) => Dirs {
            tmp: c.tmp_dir(),
            tmp_health: Arc::new(DiskHealth::new("cache", metrics.clone())),
            data_tmp,
            data_health,
        },
        None => Dirs {
            tmp: data_tmp.clone(),
            tmp_health: data_health.clone(),
            data_tmp,
            data_health,
        },
    }
}

/// The `[backfill]` job over the edge's own store handles (`chain`: primary first), so that
/// the fallback's `max_concurrency` is one limit for live reads and the backfill together.
pub(super) fn backfill_job(
    backfill: &crate::config::BackfillConfig,
    chain: &[store::StoreHandle],
    destination: &str,
    ledger: &Ledger,
    data_dir: &Path,
) -> anyhow::Result<crate::migrate::Job> {
    let source = chain
        .iter()
        .skip(1)
        .find(|s| s.name() == backfill.from)
        .cloned()
        .context("backfill.from names no fallback")?;
    let mut job = crate::migrate::Job::new(
        source,
        chain[0].clone(),
        destination.to_owned(),
        ledger.clone(),
        data_dir,
    );
    job.keys = backfill.keys.clone();
    job.concurrency = backfill.concurrency as usize;
    job.max_ops_per_sec = Some(backfill.max_ops_per_sec);
    job.max_bytes_per_sec = Some(backfill.max_bytes_per_sec);
    Ok(job)
}

/// `[tls]`'s listeners, bound, and its certificates, read.
pub(super) struct TlsListeners {
    pub(super) https: (tokio::net::TcpListener, Arc<rustls::ServerConfig>),
    /// `redirect_listen`: plain HTTP → https, and ACME challenges.
    pub(super) redirect: Option<(tokio::net::TcpListener, Arc<Redirect>)>,
    pub(super) certificates: Arc<Certificates>,
}

pub(super) async fn bind_tls(tls: &crate::config::TlsConfig) -> anyhow::Result<TlsListeners> {
    let (certificates, server_config) =
        listen::tls::setup(tls).context("cannot set up TLS ([tls].certificates)")?;
    let listener = listen::bind(tls.listen, "tls.listen").await?;
    let https_port = listener.local_addr()?.port();
    let redirect = match tls.redirect_listen {
        Some(r) => Some((
            listen::bind(r, "tls.redirect_listen").await?,
            Arc::new(Redirect {
                https_port,
                acme_dir: tls.acme_challenge_dir.clone(),
            }),
        )),
        None => None,
    };
    Ok(TlsListeners {
        https: (listener, server_config),
        redirect,
        certificates,
    })
}

/// `[core.cache]`, opened (its index loads in the background), if configured.
pub(super) fn open_core_cache(
    config: &Config,
    metrics: &Metrics,
    flight_memory: crate::flight::MemoryBudget,
) -> anyhow::Result<Option<Arc<crate::corecache::CoreCache>>> {
    let Some((core, c)) = config
        .core
        .as_ref()
        .and_then(|core| core.cache.as_ref().map(|c| (core, c)))
    else {
        return Ok(None);
    };
    let cache = crate::corecache::CoreCache::open(
        c,
        core.first_byte_timeout,
        metrics.clone(),
        flight_memory,
    )
    .with_context(|| format!("cannot open core.cache.dir {}", c.dir.display()))?;
    Ok(Some(cache))
}

/// What a purge from Mastodon (`[cache_buster]`) evicts a URL from: the media cache and the
/// core cache, those that are configured.
pub(super) fn purge_targets(
    config: &Config,
    cache: Option<&Arc<Cache>>,
    core_cache: Option<&Arc<crate::corecache::CoreCache>>,
    routes: &crate::router::SharedRouter,
) -> Vec<Arc<dyn crate::purge::Purge>> {
    let mut targets: Vec<Arc<dyn crate::purge::Purge>> = Vec::new();
    if let Some(c) = cache {
        targets.push(Arc::new(crate::purge::MediaPurge {
            router: routes.clone(),
            prefix: config.url_prefix.clone(),
            cache: c.clone(),
        }));
    }
    if let Some(c) = core_cache {
        targets.push(c.clone());
    }
    targets
}

/// The handler of the `listen` and `[tls]` listeners: the [`crate::router`] sends each
/// request to the media handler or to the [`crate::proxy`] (or answers 421). With
/// `[cache_buster]`, a purge request to a media or core route is answered first
/// ([`crate::purge`]): it never reaches the media handler or core.
pub(super) fn front_door(
    router: crate::router::SharedRouter,
    edge: Arc<Edge>,
    edge_root: Arc<Edge>,
    proxy: Option<Arc<crate::proxy::Proxy>>,
    buster: Option<Arc<crate::purge::CacheBuster>>,
    core_cache: Option<Arc<crate::corecache::CoreCache>>,
) -> listen::Handler {
    use crate::router::Route;
    listen::handler(move |mut req, info| {
        let (edge, edge_root, proxy) = (edge.clone(), edge_root.clone(), proxy.clone());
        let buster = buster.clone();
        let core_cache = core_cache.clone();
        let route = router.route(&req);
        if let Route::Core | Route::Streaming = route {
            // The proxy reads who sent the request (X-Forwarded-For, X-Forwarded-Proto) here.
            req.extensions_mut().insert(info);
            crate::proxy::strip_connection_named(req.headers_mut());
            crate::proxy::join_cookies(req.headers_mut());
            if !req.headers().contains_key(http::header::HOST) {
                // HTTP/2 (or an absolute-form request without `Host`): the name is the URI's
                // authority. Made the `Host` header once, for all that reads it: core (which
                // is sent it), the core cache's key and policy (and so its revalidations,
                // made from the stored request), the idempotency fingerprint.
                let host = req.uri().authority().map(|a| a.as_str());
                if let Some(v) = host.and_then(|h| http::HeaderValue::from_str(h).ok()) {
                    req.headers_mut().insert(http::header::HOST, v);
                }
            }
        }
        async move {
            use crate::proxy::Kind;
            if let (Some(b), Route::Media | Route::MediaRoot | Route::Core) = (&buster, route) {
                // Boxed, as the proxy's futures below: this future is moved whole on every
                // request, and sized by its largest part.
                if let Some(resp) = Box::pin(b.intercept(&req)).await {
                    return resp;
                }
            }
            match (route, proxy) {
                (Route::Media, _) => edge.handle(req).await,
                (Route::MediaRoot, _) => edge_root.handle(req).await,
                (Route::Core, Some(p)) => {
                    // Read before the request goes: compressed on the way back (`compress`).
                    use crate::compress::Mode;
                    let gzip = Mode::of(p.gzip(), req.headers());
                    let head = req.method() == http::Method::HEAD;
                    let resp = match core_cache {
                        // Its memory tier's answers come gzipped already where they may.
                        Some(c) => c.handle(&p, req, gzip).await,
                        None => Box::pin(p.handle(Kind::Web, req)).await,
                    };
                    match gzip {
                        Mode::Off => resp,
                        _ => crate::compress::response(resp, gzip == Mode::Takes, head),
                    }
                }
                (Route::Streaming, Some(p)) => Box::pin(p.handle(Kind::Streaming, req)).await,
                (Route::Core | Route::Streaming | Route::Misdirected, _) => {
                    crate::router::misdirected()
                }
            }
        }
    })
}
