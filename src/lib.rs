//! fediedge: a media edge for fediverse instances.
//!
//! It answers media URLs, keeps hot media on local disk, reads through a chain of stores
//! (current first, then older ones) and copies whatever it finds in an older store into the
//! current one, verified, with one source fetch per key however many clients ask at once.
//!
//! # Layout
//!
//! - [`cli`]: command line, subcommands, exit codes. Nothing calls it.
//! - [`config`]: the TOML file, raw → validated; shared by `serve`, `migrate` and `doctor`.
//! - [`key`]: turning a request path into a safe store key.
//! - [`store`]: one trait over fs / S3 / HTTP-origin stores, plus the guard that adds
//!   concurrency limits, timeouts and metrics around each.
//! - [`cache`]: the local disk cache (size bound, LRU eviction, restart recovery, damage
//!   detection) with a small in-memory tier for hot objects.
//! - [`flight`]: one fetch per missing key; every requester reads the bytes as they land.
//! - [`negative`]: the short memory of keys found nowhere (404 storms stay at the edge).
//! - [`serve`]: assembles everything `fediedge serve` runs and starts it.
//! - [`listen`]: listeners and connections: accept, TLS (SNI, reload), HTTP/2 and HTTP/1.1,
//!   graceful drain on shutdown.
//! - [`router`]: Host and path → media, streaming or core (or 421).
//! - [`proxy`]: the guarded reverse proxy to core: pools, breakers, timeouts, headers.
//! - [`purge`]: Mastodon's cache buster: purge requests, the [`purge::Purge`] targets.
//! - [`edge`]: the media handler: GET/HEAD, Range, conditional requests, headers.
//! - [`admin`]: the admin handler: `/metrics`, `/healthz`, the status page at `/`.
//! - [`ledger`]: the SQLite file holding the durable write-back queue and the record of copies.
//! - [`writeback`]: workers that copy fetched objects into the primary.
//! - [`migrate`]: the bulk backfill (`fediedge migrate`).
//! - [`doctor`] and [`mastodon`]: configuration lints and live probes (`fediedge doctor`).
//! - [`sidekiq`]: a read-only monitor of Mastodon's Sidekiq in Redis (`fediedge queues`).
//! - [`status`]: alerts, the media canary and the status page.
//! - [`metrics`]: counters and histograms, rendered at `/metrics`.
#![warn(missing_docs)]

pub mod admin;
pub mod cache;
pub mod cli;
pub mod compress;
pub mod config;
pub mod corecache;
pub mod doctor;
pub mod edge;
pub mod flight;
pub mod key;
pub mod ledger;
pub mod listen;
pub mod mastodon;
pub mod metrics;
pub mod migrate;
pub mod negative;
pub mod proxy;
pub mod purge;
pub mod reload;
pub mod router;
pub mod seldom;
pub mod serve;
pub mod sidekiq;
pub mod status;
pub mod store;
#[cfg(test)]
mod testing;
pub mod writeback;
