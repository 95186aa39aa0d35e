//! The one integration test binary (see ARCHITECTURE.md, "Tests").

mod cli;
mod cluster;
mod common;
mod corecache;
mod destination;
mod disk;
mod doctor;
mod idempotency;
mod ledger;
mod listen;
mod listen_cap;
mod listen_tls;
mod migrate;
mod package;
mod proxy;
mod proxy_connect;
mod proxy_health;
mod proxy_pool;
mod proxy_streaming;
mod proxy_tls;
mod purge;
mod reload;
mod serve;
mod serve_s3;
mod sidekiq;
mod status;
