//! A read-only monitor of Mastodon's Sidekiq, reading the data Sidekiq keeps in Redis.
//!
//! Sidekiq has no API but its Redis keys; this room reads them the way Sidekiq's own
//! `lib/sidekiq/api.rb` does, for every Sidekiq a supported Mastodon runs (6.5 for
//! Mastodon ≤ 4.3, 7.x for 4.4, 8.x for 4.5+), and never writes:
//!
//! - [`target`]: where Redis is: a URL, Sentinel, or a Mastodon `.env.production` (the way
//!   Mastodon builds its Sidekiq connection); redacted for display.
//! - [`parse`]: pure decoding of what Sidekiq stores: job timestamps (float seconds up to 7.x,
//!   integer milliseconds from 8.0, both in one queue during an upgrade) and process hashes.
//! - [`read`]: the Redis reads (`SMEMBERS`, `LLEN`, `LINDEX`, `ZCARD`, `GET`, `HMGET`), and
//!   nothing else, into a [`Snapshot`].
//! - [`findings`]: what is wrong (queues no live process serves, `scheduler` served twice …)
//!   as doctor-style findings.
//! - [`command`]: `fediedge queues`: the table, the JSON contract, `--watch`.
//! - [`metrics`]: `fediedge_sidekiq_*` series for `serve`'s `/metrics` (`[sidekiq]`).
//!
//! Docs: `docs/queues.md`.

pub mod command;
pub mod findings;
pub mod metrics;
pub mod parse;
pub mod read;
pub mod target;

pub use command::QueuesArgs;
pub use read::read_snapshot;
pub use target::Target;

use serde::Serialize;

use crate::doctor::Finding;

/// Queues every supported Mastodon needs served (`config/sidekiq.yml`).
pub const REQUIRED_QUEUES: &[&str] =
    &["default", "push", "ingress", "mailers", "pull", "scheduler"];

/// The queue Mastodon 4.4+ adds (`fasp`); required once the data shows Sidekiq 7 or later.
pub const FASP_QUEUE: &str = "fasp";

/// Errors of the Sidekiq monitor. Messages never contain a password.
#[derive(Debug, thiserror::Error)]
pub enum SidekiqError {
    /// The connection settings are unusable (bad URL, unreadable env file …).
    #[error("Redis settings: {0}")]
    Settings(String),
    /// Redis refused the connection or a command failed.
    #[error("Redis at {target}: {message}")]
    Redis {
        /// The redacted target.
        target: String,
        /// What went wrong (redis-rs errors do not carry passwords).
        message: String,
    },
}

/// One queue as the monitor sees it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QueueStat {
    /// Queue name (without `queue:` or a namespace).
    pub name: String,
    /// Jobs waiting (`LLEN queue:NAME`).
    pub size: u64,
    /// Seconds since the oldest waiting job was enqueued; 0 for an empty queue.
    pub latency_seconds: f64,
    /// How many live, non-quiet processes fetch from this queue.
    pub processes: usize,
    /// True if the queue is in Sidekiq's `queues` set (it was pushed to at least once).
    #[serde(skip)]
    pub exists: bool,
    /// True if the oldest job could not be read as Sidekiq job JSON (latency then 0).
    #[serde(skip)]
    pub unreadable_job: bool,
}

/// One live Sidekiq process (its heartbeat hash has not expired).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProcessStat {
    /// `hostname:pid:hex` as Sidekiq names it.
    pub identity: String,
    /// The host the process runs on.
    pub hostname: String,
    /// Queues the process fetches from.
    pub queues: Vec<String>,
    /// Worker threads (`-c`).
    pub concurrency: u64,
    /// Threads running a job at the last heartbeat.
    pub busy: u64,
    /// True if the process was quieted (TSTP, or shutting down): it fetches no new jobs.
    #[serde(skip)]
    pub quiet: bool,
    /// Sidekiq's version, when the process reports it (7.0.2+).
    #[serde(skip)]
    pub version: Option<String>,
}

/// Everything the monitor read at one moment.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    /// Every queue that exists, that a live process serves, or that Mastodon needs; by name.
    pub queues: Vec<QueueStat>,
    /// Jobs in the `schedule` sorted set (to run later).
    pub scheduled: u64,
    /// Jobs in the `retry` sorted set.
    pub retry: u64,
    /// Jobs in the `dead` sorted set (the morgue).
    pub dead: u64,
    /// `stat:processed`: jobs run since the counters were last reset.
    pub processed: u64,
    /// `stat:failed`.
    pub failed: u64,
    /// Live processes, by identity.
    pub processes: Vec<ProcessStat>,
    /// Queues that exist or that Mastodon needs, which no live process serves.
    pub unserved: Vec<String>,
    /// What is wrong, as doctor reports it.
    pub findings: Vec<Finding>,
    /// Members of the `processes` set whose heartbeat hash expired: dead, not counted.
    #[serde(skip)]
    pub dead_processes: Vec<String>,
}

impl Snapshot {
    /// Sum of `busy` over live processes.
    pub fn busy(&self) -> u64 {
        self.processes.iter().map(|p| p.busy).sum()
    }

    /// Sum of `concurrency` over live processes.
    pub fn concurrency(&self) -> u64 {
        self.processes.iter().map(|p| p.concurrency).sum()
    }
}
