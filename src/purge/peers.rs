//! Passing a purge on to the other edges (`[cache_buster] peers`), so that media deleted in
//! Mastodon leaves every edge's cache although Mastodon tells only one of them.
//!
//! A purge that came from Mastodon (without the [`FORWARDED`] mark) is queued for every peer.
//! One task per peer sends its queue in order: the configured method to `peer + path`, with
//! the URL's own `Host` (so the peer maps it to the same media key or core URL), the secret
//! header, and the mark; a peer never passes a marked purge on, so peers that name each other
//! do not loop.
//!
//! A peer that is down gets its purges when it comes back: a failed send (no answer, a 5xx)
//! is tried again, backing off from 1 s to 1 min, for up to [`GIVE_UP_AFTER`], and later
//! purges wait behind it. A `403` (the peer has another secret) can never succeed: it is
//! dropped at once and logged as an error. The queues are in memory, each bounded: what is
//! still queued when this edge stops is lost (docs/deploy.md says how to catch up by hand).

use std::time::{Duration, Instant};

use http::{header, HeaderName, HeaderValue, Method, StatusCode};
use tokio::sync::mpsc;

use crate::config::CacheBusterConfig;
use crate::metrics::Metrics;

/// The header that marks a purge passed on by another edge.
pub const FORWARDED: &str = "x-fediedge-purge";

/// How long a purge is tried against a peer that stays down.
pub const GIVE_UP_AFTER: Duration = Duration::from_secs(24 * 3600);

/// Purges waiting per peer; beyond this a new one is dropped (and logged).
const QUEUE_PER_PEER: usize = 100_000;

const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// One attempt's limit: connect, send and the peer's answer.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// A purge to pass on.
struct Job {
    host: String,
    path_and_query: String,
    since: Instant,
}

/// What every send needs.
#[derive(Clone)]
struct Sender {
    client: reqwest::Client,
    method: Method,
    header: HeaderName,
    secret: HeaderValue,
    metrics: Metrics,
}

/// The queues to the peers, one sending task each.
pub struct Peers {
    queues: Vec<(url::Url, mpsc::Sender<Job>)>,
    metrics: Metrics,
}

impl Peers {
    /// Starts one sending task per peer of `config` (none: nothing starts). Needs a runtime.
    pub fn start(config: &CacheBusterConfig, metrics: Metrics) -> Peers {
        let mut secret =
            HeaderValue::from_str(&config.secret).unwrap_or(HeaderValue::from_static(""));
        secret.set_sensitive(true);
        let client = reqwest::Client::builder()
            .timeout(ATTEMPT_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("a reqwest client with defaults builds");
        let sender = Sender {
            client,
            method: config.http_method.clone(),
            header: config.secret_header.clone(),
            secret,
            metrics: metrics.clone(),
        };
        let queues = config
            .peers
            .iter()
            .map(|peer| {
                let (tx, rx) = mpsc::channel(QUEUE_PER_PEER);
                tokio::spawn(run(peer.clone(), rx, sender.clone()));
                (peer.clone(), tx)
            })
            .collect();
        Peers { queues, metrics }
    }

    /// How many peers there are.
    pub fn len(&self) -> usize {
        self.queues.len()
    }

    /// True without peers.
    pub fn is_empty(&self) -> bool {
        self.queues.is_empty()
    }

    /// Queues the purge of `host` + `path_and_query` for every peer.
    pub fn pass_on(&self, host: &str, path_and_query: &str) {
        for (peer, tx) in &self.queues {
            let job = Job {
                host: host.to_owned(),
                path_and_query: path_and_query.to_owned(),
                since: Instant::now(),
            };
            match tx.try_send(job) {
                Ok(()) => self.metrics.purge_forwards_pending(1),
                Err(_) => {
                    tracing::error!(peer = %peer, host, path = path_and_query, "cache buster: the queue to this peer is full; purge not passed on");
                    self.metrics.purge_forward("dropped");
                }
            }
        }
    }
}

/// Sends one peer's purges in order, each until it is delivered, refused or given up.
async fn run(peer: url::Url, mut rx: mpsc::Receiver<Job>, s: Sender) {
    while let Some(job) = rx.recv().await {
        let mut backoff = FIRST_BACKOFF;
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            match send(&peer, &job, &s).await {
                Ok(StatusCode::OK) => {
                    tracing::info!(peer = %peer, host = job.host, path = job.path_and_query, attempts, "cache buster: purge passed on");
                    s.metrics.purge_forward("delivered");
                    break;
                }
                Ok(StatusCode::FORBIDDEN) => {
                    tracing::error!(peer = %peer, host = job.host, path = job.path_and_query, "cache buster: the peer refused the secret (is its [cache_buster] secret the same?); purge dropped");
                    s.metrics.purge_forward("dropped");
                    break;
                }
                outcome => {
                    s.metrics.purge_forward("failed");
                    let why = match outcome {
                        Ok(status) => format!("answered {status}"),
                        Err(e) => e,
                    };
                    if job.since.elapsed() >= GIVE_UP_AFTER {
                        tracing::error!(peer = %peer, host = job.host, path = job.path_and_query, attempts, error = why, "cache buster: peer unreachable for a day; purge dropped");
                        s.metrics.purge_forward("dropped");
                        break;
                    }
                    if attempts == 1 {
                        tracing::warn!(peer = %peer, host = job.host, path = job.path_and_query, error = why, "cache buster: passing a purge on failed; trying again until the peer answers");
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
        s.metrics.purge_forwards_pending(-1);
    }
}

async fn send(peer: &url::Url, job: &Job, s: &Sender) -> Result<StatusCode, String> {
    let url = peer
        .join(&job.path_and_query)
        .map_err(|e| format!("bad URL: {e}"))?;
    let resp = s
        .client
        .request(s.method.clone(), url)
        .header(header::HOST, &job.host)
        .header(&s.header, s.secret.clone())
        .header(FORWARDED, "forwarded")
        .send()
        .await
        .map_err(|e| e.to_string())?;
    Ok(resp.status())
}
