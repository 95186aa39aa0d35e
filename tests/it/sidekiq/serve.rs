//! `serve` with `[sidekiq]`: `fediedge_sidekiq_*` series on `/metrics`, refreshed, with the
//! password nowhere.

use std::path::Path;
use std::time::{Duration, Instant};

use super::fill::{Filler, Sidekiq};
use super::server::RedisServer;
use crate::common::{client, start_edge};

async fn metrics(admin: &str) -> String {
    client()
        .get(format!("{admin}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Polls `/metrics` until it has every line of `want` (the poller reads Redis in the
/// background); panics with the last scrape after a minute.
async fn wait_for(admin: &str, want: &[&str]) -> String {
    let started = Instant::now();
    loop {
        let m = metrics(admin).await;
        if want.iter().all(|w| m.lines().any(|l| l == *w)) {
            return m;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{want:?} never in:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn serve_exports_sidekiq_series_and_follows_changes() {
    let pw = "metrics-pw-Jx4";
    let redis = RedisServer::start_with(Some(pw), &[]);
    let mut f = Filler::new(redis.connection().await, None);
    f.push(Sidekiq::V8_1, "default", 40.0).await;
    f.push(Sidekiq::V8_1, "default", 1.0).await;
    f.zadd("retry", 1).await;
    f.stats(50, 2).await;
    let five = ["default", "push", "ingress", "mailers", "pull"];
    f.heartbeat(Sidekiq::V8_1, "m1", 1, &five, 10, 3).await;

    let dir = tempfile::tempdir().unwrap();
    let extra = format!(
        "[sidekiq]\nredis_url = \"{}\"\ninterval = \"1s\"\n",
        redis.url()
    );
    let edge = start_edge(dir.path(), &extra).await;
    let config = fediedge::config::from_str(&extra, Path::new("t.toml")).unwrap();
    assert!(!format!("{config:?}").contains(pw));
    let m = wait_for(
        &edge.admin,
        &[
            "fediedge_sidekiq_up 1",
            "fediedge_sidekiq_queue_size{queue=\"default\"} 2",
            "fediedge_sidekiq_queue_unserved{queue=\"scheduler\"} 1",
            "fediedge_sidekiq_queue_unserved{queue=\"fasp\"} 1",
            "fediedge_sidekiq_queue_unserved{queue=\"default\"} 0",
            "fediedge_sidekiq_queue_processes{queue=\"push\"} 1",
            "fediedge_sidekiq_set_size{set=\"retry\"} 1",
            "fediedge_sidekiq_processed_total 50",
            "fediedge_sidekiq_processes 1",
            "fediedge_sidekiq_busy 3",
            "fediedge_sidekiq_concurrency 10",
            "fediedge_sidekiq_unserved 2",
        ],
    )
    .await;
    let latency: f64 = m
        .lines()
        .find_map(|l| l.strip_prefix("fediedge_sidekiq_queue_latency_seconds{queue=\"default\"} "))
        .unwrap()
        .parse()
        .unwrap();
    assert!((40.0..100.0).contains(&latency), "{latency}");
    assert!(!m.contains(pw));

    // A process for `scheduler` and `fasp` starts: the next read shows nothing unserved.
    f.heartbeat(Sidekiq::V8_1, "m2", 2, &["scheduler", "fasp"], 1, 0)
        .await;
    wait_for(
        &edge.admin,
        &[
            "fediedge_sidekiq_unserved 0",
            "fediedge_sidekiq_processes 2",
        ],
    )
    .await;

    // Redis goes away: `up` drops to 0 and the stale series go with it.
    drop(redis);
    let m = wait_for(&edge.admin, &["fediedge_sidekiq_up 0"]).await;
    assert!(!m.contains("fediedge_sidekiq_queue_size"), "{m}");
    edge.running.shutdown().await;
}

#[test]
fn sidekiq_section_is_checked_without_echoing_the_url() {
    let load = |t: &str| fediedge::config::from_str(t, Path::new("t.toml"));
    let e = load("[sidekiq]\nredis_url = \"http://:hunter2@h/\"\n").unwrap_err();
    let e = e.to_string();
    assert!(
        e.contains("sidekiq.redis_url") && !e.contains("hunter2"),
        "{e}"
    );
    let e = load("[sidekiq]\n").unwrap_err().to_string();
    assert!(e.contains("exactly one"), "{e}");
    let e = load("[sidekiq]\nredis_url = \"redis://h\"\nmastodon_env = \"/e\"\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("exactly one"), "{e}");
    let e = load("[sidekiq]\nredis_url = \"redis://h\"\nintervall = \"1s\"\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("intervall"), "{e}");
    let c = load("[sidekiq]\nmastodon_env = \"/home/mastodon/live/.env.production\"\n").unwrap();
    assert_eq!(c.sidekiq.unwrap().interval, Duration::from_secs(15));
}
