//! What `[core]` sets and a reload (SIGHUP) may change while requests are under way: the
//! pools, the client and the limits. The proxy holds the current [`Live`] behind a lock and
//! each request takes an `Arc` of it when it starts, so a request under way ends on the pools
//! it began with while new requests use the new ones.
//!
//! A reload carries over what did not change: an upstream whose address stays (and whose cap
//! and breaker settings stay) keeps its in-flight count, breaker, health and idle keep-alive
//! connections (`conns`); hyper-util's client (WebSocket handshakes, health checks) is kept
//! unless `connect_timeout` or `max_idle_per_upstream` changed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::conns::IDLE_UPSTREAM_CONNECTION;
use super::upstream::{Pool, Upstream};
use super::{Kind, UpBody};
use crate::config::CoreConfig;

/// The pools, client and limits of one `[core]`.
pub struct Live {
    pub(super) web: Pool,
    pub(super) streaming: Pool,
    pub(super) client: Client<HttpConnector, UpBody>,
    pub(super) first_byte_timeout: Duration,
    pub(super) idle_timeout: Duration,
    pub(super) stream_idle_timeout: Duration,
    pub(super) max_body: u64,
    pub(super) trusted: Vec<ipnet::IpNet>,
    pub(super) health_check_interval: Duration,
    /// `buffer_responses` and `max_response_temp_file` (`spool`).
    pub(super) buffer: bool,
    pub(super) max_temp_file: u64,
    /// `buffer_requests` (`stored`).
    pub(super) buffer_requests: bool,
    /// `gzip`: core's responses compressed for clients that take it (`crate::compress`).
    pub gzip: bool,
    /// Connect timeout and idle connections kept per upstream (also decide whether the
    /// client is carried over).
    pub(super) connect_timeout: Duration,
    pub(super) max_idle: usize,
    upstream_settings: (usize, usize, u32, Duration),
}

impl Live {
    /// The pools of `config`, carrying over from `previous` what did not change.
    pub fn new(config: &CoreConfig, previous: Option<&Live>) -> Live {
        let upstream_settings = (
            config.max_connections_per_upstream,
            config.max_streams_per_upstream,
            config.breaker_failures,
            config.breaker_cooldown,
        );
        let client = match previous {
            Some(p)
                if p.connect_timeout == config.connect_timeout
                    && p.max_idle == config.max_idle_per_upstream =>
            {
                p.client.clone()
            }
            _ => client(config),
        };
        let kept = |kind: Kind| -> Vec<Arc<Upstream>> {
            match previous {
                Some(p) if p.upstream_settings == upstream_settings => {
                    p.pool(kind).upstreams.clone()
                }
                _ => Vec::new(),
            }
        };
        let pool = |addrs: &[SocketAddr], kind: Kind| {
            let cap = match kind {
                Kind::Web => config.max_connections_per_upstream,
                Kind::Streaming => config.max_streams_per_upstream,
            };
            Pool::with_kept(
                addrs,
                cap,
                config.breaker_failures,
                config.breaker_cooldown,
                &kept(kind),
            )
        };
        Live {
            web: pool(&config.web, Kind::Web),
            streaming: pool(&config.streaming, Kind::Streaming),
            client,
            first_byte_timeout: config.first_byte_timeout,
            idle_timeout: config.idle_timeout,
            stream_idle_timeout: config.stream_idle_timeout,
            max_body: config.max_request_body,
            trusted: config.trusted_proxies.clone(),
            health_check_interval: config.health_check_interval,
            gzip: config.gzip,
            buffer: config.buffer_responses,
            max_temp_file: config.max_response_temp_file,
            buffer_requests: config.buffer_requests,
            connect_timeout: config.connect_timeout,
            max_idle: config.max_idle_per_upstream,
            upstream_settings,
        }
    }

    /// The pool of a kind.
    pub fn pool(&self, kind: Kind) -> &Pool {
        match kind {
            Kind::Web => &self.web,
            Kind::Streaming => &self.streaming,
        }
    }
}

/// hyper-util's HTTP/1.1 client, for WebSocket handshakes and health checks (every other
/// request goes through `conns`): keep-alive pools per upstream, the connect timeout.
fn client(config: &CoreConfig) -> Client<HttpConnector, UpBody> {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(config.connect_timeout));
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(config.max_idle_per_upstream)
        // See `IDLE_UPSTREAM_CONNECTION` for why.
        .pool_idle_timeout(IDLE_UPSTREAM_CONNECTION)
        .pool_timer(TokioTimer::new())
        .build(connector)
}
