//! The Redis reads: three pipelines of read-only commands into a [`Snapshot`].
//!
//! Only `SMEMBERS`, `ZCARD`, `GET`, `HMGET`, `LLEN` and `LINDEX` are sent (plus what
//! redis-rs sends to open a connection: `HELLO`/`AUTH`/`SELECT`/`CLIENT SETINFO`). Sidekiq's
//! own API prunes dead processes from the `processes` set when it lists them; we do not: a
//! member whose heartbeat hash has expired is reported dead and left where it is.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Value};

use super::parse::{self, Heartbeat};
use super::target::{Endpoint, Target};
use super::{findings, QueueStat, SidekiqError, Snapshot, FASP_QUEUE, REQUIRED_QUEUES};

/// How long to wait for Redis to accept a connection or answer a pipeline.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Milliseconds since the epoch, now.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn redis_error(target: &Target, e: impl std::fmt::Display) -> SidekiqError {
    SidekiqError::Redis {
        target: target.redacted(),
        message: target.scrub(&e.to_string()),
    }
}

/// Opens a connection to `target` (a URL, or the master the sentinels name).
pub async fn connect(target: &Target) -> Result<MultiplexedConnection, SidekiqError> {
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(TIMEOUT))
        .set_response_timeout(Some(TIMEOUT));
    match &target.endpoint {
        Endpoint::Url(url) => {
            let client = redis::Client::open(url.as_str()).map_err(|e| redis_error(target, e))?;
            client
                .get_multiplexed_async_connection_with_config(&config)
                .await
                .map_err(|e| redis_error(target, e))
        }
        Endpoint::Sentinel {
            sentinels,
            url,
            sentinel_auth,
        } => {
            // Sentinels without a password (Mastodon ≤ 4.3 sent none), or with the explicit
            // one; then, as Mastodon 4.4+ does by default, with the master's credentials.
            let first = sentinel_connect(target, sentinels, url, sentinel_auth.as_ref(), &config);
            match first.await {
                Ok(c) => Ok(c),
                Err(e) if sentinel_auth.is_none() && url.password().is_some() => {
                    let auth = (decode(url.username()), decode(url.password().unwrap_or("")));
                    sentinel_connect(target, sentinels, url, Some(&auth), &config)
                        .await
                        .map_err(|_| e)
                }
                Err(e) => Err(e),
            }
        }
    }
}

async fn sentinel_connect(
    target: &Target,
    sentinels: &[(String, u16)],
    url: &url::Url,
    auth: Option<&(String, String)>,
    config: &AsyncConnectionConfig,
) -> Result<MultiplexedConnection, SidekiqError> {
    use redis::sentinel::{SentinelClientBuilder, SentinelServerType};
    let addrs = sentinels
        .iter()
        .map(|(h, p)| redis::ConnectionAddr::Tcp(h.clone(), *p));
    let master = url.host_str().unwrap_or("mymaster");
    let mut builder = SentinelClientBuilder::new(addrs, master, SentinelServerType::Master)
        .map_err(|e| redis_error(target, e))?;
    let db = url.path().trim_matches('/');
    if !db.is_empty() {
        let db = db.parse::<i64>().map_err(|_| {
            SidekiqError::Settings("the db after the master name is not a number".into())
        })?;
        builder = builder.set_client_to_redis_db(db);
    }
    if !url.username().is_empty() {
        builder = builder.set_client_to_redis_username(decode(url.username()));
    }
    if let Some(pw) = url.password() {
        builder = builder.set_client_to_redis_password(decode(pw));
    }
    if matches!(url.scheme(), "rediss" | "valkeys") {
        // The master speaks TLS; the sentinels are asked in plain TCP.
        builder = builder.set_client_to_redis_tls_mode(redis::TlsMode::Secure);
    }
    if let Some((user, pw)) = auth {
        if !user.is_empty() {
            builder = builder.set_client_to_sentinel_username(user);
        }
        builder = builder.set_client_to_sentinel_password(pw);
    }
    let mut client = builder.build().map_err(|e| redis_error(target, e))?;
    client
        .get_async_connection_with_config(config)
        .await
        .map_err(|e| redis_error(target, e))
}

fn decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// Connects and reads one snapshot.
pub async fn read_snapshot(target: &Target) -> Result<Snapshot, SidekiqError> {
    let mut con = connect(target).await?;
    read_with(&mut con, target).await
}

/// Reads one snapshot over an open connection. Nothing is written.
pub async fn read_with(
    con: &mut MultiplexedConnection,
    target: &Target,
) -> Result<Snapshot, SidekiqError> {
    let err = |e: redis::RedisError| redis_error(target, e);
    let k = |s: &str| target.key(s);
    #[allow(clippy::type_complexity)]
    let (queue_set, identities, scheduled, retry, dead, processed, failed): (
        Vec<String>,
        Vec<String>,
        u64,
        u64,
        u64,
        Option<u64>,
        Option<u64>,
    ) = redis::pipe()
        .cmd("SMEMBERS")
        .arg(k("queues"))
        .cmd("SMEMBERS")
        .arg(k("processes"))
        .cmd("ZCARD")
        .arg(k("schedule"))
        .cmd("ZCARD")
        .arg(k("retry"))
        .cmd("ZCARD")
        .arg(k("dead"))
        .cmd("GET")
        .arg(k("stat:processed"))
        .cmd("GET")
        .arg(k("stat:failed"))
        .query_async(con)
        .await
        .map_err(err)?;

    // Heartbeats: one HMGET per member of `processes`.
    let mut identities = identities;
    identities.sort();
    let mut processes = Vec::new();
    let mut dead_processes = Vec::new();
    if !identities.is_empty() {
        let mut pipe = redis::pipe();
        for id in &identities {
            pipe.cmd("HMGET")
                .arg(k(id))
                .arg(&["info", "concurrency", "busy", "quiet"]);
        }
        let beats: Vec<Vec<Option<String>>> = pipe.query_async(con).await.map_err(err)?;
        for (id, fields) in identities.iter().zip(beats) {
            let mut f = fields.into_iter();
            let beat = Heartbeat {
                info: f.next().flatten(),
                concurrency: f.next().flatten(),
                busy: f.next().flatten(),
                quiet: f.next().flatten(),
            };
            match parse::process(id, &beat) {
                Some(p) => processes.push(p),
                None => dead_processes.push(id.clone()),
            }
        }
    }

    // Mastodon 4.4+ (Sidekiq 7+) also needs `fasp`.
    let needs_fasp = processes.iter().any(|p| {
        p.version
            .as_deref()
            .and_then(parse::major)
            .is_some_and(|m| m >= 7)
    });
    let mut names: Vec<String> = REQUIRED_QUEUES.iter().map(|q| q.to_string()).collect();
    if needs_fasp {
        names.push(FASP_QUEUE.to_owned());
    }
    let mut extra: Vec<String> = queue_set
        .iter()
        .chain(processes.iter().flat_map(|p| p.queues.iter()))
        .filter(|q| !names.contains(q))
        .cloned()
        .collect();
    extra.sort();
    extra.dedup();
    names.extend(extra);

    // Sizes and the oldest job of each queue (the list's last element: LPUSH, BRPOP).
    let mut pipe = redis::pipe();
    for q in &names {
        let key = k(&format!("queue:{q}"));
        pipe.cmd("LLEN").arg(&key).cmd("LINDEX").arg(&key).arg(-1);
    }
    let values: Vec<Value> = pipe.query_async(con).await.map_err(err)?;
    let now = now_ms();
    let mut queues = Vec::with_capacity(names.len());
    for (name, pair) in names.into_iter().zip(values.chunks(2)) {
        let size: u64 = redis::from_redis_value_ref(&pair[0]).map_err(|e| err(e.into()))?;
        let oldest: Option<Vec<u8>> =
            redis::from_redis_value_ref(&pair[1]).map_err(|e| err(e.into()))?;
        let (latency_seconds, unreadable_job) = match oldest {
            None => (0.0, false),
            Some(job) => match parse::latency_seconds(&String::from_utf8_lossy(&job), now) {
                Ok(l) => ((l * 1000.0).round() / 1000.0, false),
                Err(_) => (0.0, true),
            },
        };
        queues.push(QueueStat {
            exists: queue_set.contains(&name),
            processes: processes
                .iter()
                .filter(|p| !p.quiet && p.queues.contains(&name))
                .count(),
            name,
            size,
            latency_seconds,
            unreadable_job,
        });
    }

    let mut snapshot = Snapshot {
        queues,
        scheduled,
        retry,
        dead,
        processed: processed.unwrap_or(0),
        failed: failed.unwrap_or(0),
        processes,
        unserved: Vec::new(),
        findings: Vec::new(),
        dead_processes,
    };
    findings::analyse(&mut snapshot, needs_fasp, &target.redacted());
    Ok(snapshot)
}
