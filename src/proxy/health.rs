//! Active health checks of the upstreams (Mastodon answers `/health` on web and
//! `/api/v1/streaming/health` on streaming), and the per-upstream series on `/metrics`.
//!
//! An upstream whose check fails (no 2xx within the time allowed) gets no requests until a
//! check passes again, unless every upstream of its pool fails (then the breakers decide).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, NoLabelSet};
use prometheus_client::metrics::MetricType;
use tokio_util::sync::CancellationToken;

use super::breaker::BreakerState;
use super::live::Live;
use super::{Kind, Proxy};

impl Kind {
    /// The pool's name in metrics and logs.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Web => "web",
            Kind::Streaming => "streaming",
        }
    }

    /// The path Mastodon answers health checks on.
    pub fn health_path(self) -> &'static str {
        match self {
            Kind::Web => "/health",
            Kind::Streaming => "/api/v1/streaming/health",
        }
    }
}

impl Proxy {
    /// The proxy's background work until `stop` (shutdown): health checks every
    /// `health_check_interval` (unless zero) of the upstreams in use (a reload's new ones from
    /// its next round), and idle upstream connections too old to use dropped; then the WebSocket tunnels are closed (their clients reconnect, to
    /// another edge or after the restart).
    pub async fn background(self: Arc<Self>, stop: CancellationToken) {
        let upstreams = || {
            let live = self.live();
            let mut all = live.pool(Kind::Web).upstreams.clone();
            all.extend(live.pool(Kind::Streaming).upstreams.iter().cloned());
            all
        };
        tokio::select! {
            _ = self.check_health_until(&stop) => {}
            _ = super::conns::reap(upstreams) => {}
        }
        self.tunnels.cancel();
    }

    async fn check_health_until(&self, stop: &CancellationToken) {
        loop {
            let live = self.live();
            let interval = live.health_check_interval;
            if !interval.is_zero() {
                check_health(&live).await;
            }
            drop(live);
            let wait = async {
                match interval.is_zero() {
                    true => std::future::pending().await,
                    false => tokio::time::sleep(interval).await,
                }
            };
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = self.changed.notified() => {}
                _ = wait => {}
            }
        }
    }
}

/// Checks every upstream of `live` once.
async fn check_health(live: &Live) {
    for kind in [Kind::Web, Kind::Streaming] {
        for u in &live.pool(kind).upstreams {
            let uri = format!("http://{}{}", u.addr, kind.health_path());
            let req = http::Request::get(uri)
                .body(Empty::new().map_err(|e| match e {}).boxed_unsync())
                .expect("a valid request");
            let limit = live.first_byte_timeout.min(Duration::from_secs(5));
            let up = match tokio::time::timeout(limit, live.client.request(req)).await {
                Ok(Ok(resp)) => resp.status().is_success(),
                _ => false,
            };
            if up != u.healthy() {
                match up {
                    true => {
                        tracing::info!(pool = kind.name(), upstream = %u.addr, "health check passes again")
                    }
                    false => {
                        tracing::warn!(pool = kind.name(), upstream = %u.addr, "health check fails: no requests until it passes")
                    }
                }
            }
            u.set_healthy(up);
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabels {
    pool: &'static str,
    upstream: String,
}

/// Renders `fediedge_upstream_*` at each scrape: requests, errors and stale retries
/// (counters), health, breaker state (0 closed, 1 open, 2 half-open) and requests in flight.
pub struct UpstreamCollector(pub Arc<Proxy>);

impl std::fmt::Debug for UpstreamCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UpstreamCollector")
    }
}

impl Collector for UpstreamCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let live = self.0.live();
        let rows: Vec<_> = [Kind::Web, Kind::Streaming]
            .into_iter()
            .flat_map(|k| {
                live.pool(k).upstreams.iter().map(move |u| {
                    let labels = UpstreamLabels {
                        pool: k.name(),
                        upstream: u.addr.to_string(),
                    };
                    (labels, u.clone())
                })
            })
            .collect();
        for (name, help, f) in [
            (
                "upstream_requests",
                "Requests sent to an upstream",
                (|u| u.requests.load(Ordering::Relaxed)) as fn(&super::upstream::Upstream) -> u64,
            ),
            (
                "upstream_errors",
                "Requests an upstream failed (refused, reset, timed out, 502/503/504)",
                |u| u.errors.load(Ordering::Relaxed),
            ),
            (
                "upstream_stale_retries",
                "Safe bodiless requests sent once more on a new connection after a kept one \
                 closed before answering (the keep-alive race; not errors)",
                |u| u.stale_retries.load(Ordering::Relaxed),
            ),
        ] {
            let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (l, u) in &rows {
                m.encode_family(l)?
                    .encode_counter::<NoLabelSet, u64, u64>(&f(u), None)?;
            }
        }
        for (name, help, f) in [
            (
                "upstream_up",
                "1 while the upstream's health check passes",
                (|u| i64::from(u.healthy())) as fn(&super::upstream::Upstream) -> i64,
            ),
            (
                "upstream_breaker_state",
                "Circuit breaker: 0 closed, 1 open, 2 half-open",
                |u| match u.breaker.state() {
                    BreakerState::Closed => 0,
                    BreakerState::Open => 1,
                    BreakerState::HalfOpen => 2,
                },
            ),
            (
                "upstream_in_flight",
                "Requests in flight to the upstream (open WebSockets included)",
                |u| u.in_flight() as i64,
            ),
        ] {
            let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for (l, u) in &rows {
                m.encode_family(l)?.encode_gauge(&f(u))?;
            }
        }
        if let Some((memory, temp)) = self.0.buffered() {
            for (name, help, value) in [
                (
                    "proxy_buffer_memory_bytes",
                    "Bytes of buffered answers and request bodies in memory (of [core] max_buffer_memory)",
                    memory,
                ),
                (
                    "proxy_temp_bytes",
                    "Bytes of buffered answers and request bodies in temp files (of [core] max_temp_bytes)",
                    temp,
                ),
            ] {
                enc.encode_descriptor(name, help, None, MetricType::Gauge)?
                    .encode_gauge(&(value as i64))?;
            }
        }
        Ok(())
    }
}
