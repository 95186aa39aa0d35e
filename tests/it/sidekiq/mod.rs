//! The Sidekiq monitor against a real `redis-server`, filled the way Sidekiq 6.5, 7.3, 8.0 and
//! 8.1 write it (`fill.rs`), and by the real Sidekiq 6.4 of Debian (`real.rs`).

mod cli;
pub mod fill;
mod real;
mod serve;
pub mod server;
mod transport;

use std::path::Path;

use fediedge::doctor::Severity;
use fediedge::sidekiq::{read_snapshot, Snapshot, Target};

use fill::{Filler, Sidekiq};
use server::RedisServer;

fn queue<'a>(s: &'a Snapshot, name: &str) -> &'a fediedge::sidekiq::QueueStat {
    s.queues
        .iter()
        .find(|q| q.name == name)
        .unwrap_or_else(|| panic!("queue {name} missing: {:?}", s.queues))
}

fn rules(s: &Snapshot) -> Vec<(&'static str, Option<String>)> {
    s.findings.iter().map(|f| (f.rule, f.key.clone())).collect()
}

/// `latency` is `expected` seconds, give or take what a loaded machine adds while the test
/// runs (the fill and the read are a few round trips apart).
fn assert_latency(actual: f64, expected: f64) {
    assert!(
        actual >= expected - 0.01 && actual < expected + 30.0,
        "latency {actual}, expected about {expected}"
    );
}

fn env_target(dir: &Path, text: &str) -> Target {
    let path = dir.join(".env.production");
    std::fs::write(&path, text).unwrap();
    Target::from_mastodon_env(&path).unwrap()
}

/// Mastodon 4.3: Sidekiq 6.5 under `REDIS_NAMESPACE`, float-second timestamps, no `fasp`.
#[tokio::test]
async fn sidekiq_6_5_under_a_namespace() {
    let redis = RedisServer::start();
    let mut f = Filler::new(redis.connection().await, Some("mastodon"));
    f.push(Sidekiq::V6_5, "default", 300.0).await;
    f.push(Sidekiq::V6_5, "default", 5.0).await;
    f.push(Sidekiq::V6_5, "push", 42.5).await;
    f.zadd("schedule", 3).await;
    f.zadd("retry", 2).await;
    f.zadd("dead", 1).await;
    f.stats(1000, 7).await;
    let all = [
        "default,8",
        "push,6",
        "ingress,4",
        "mailers,2",
        "pull",
        "scheduler",
    ];
    f.heartbeat(Sidekiq::V6_5, "web1", 100, &all, 25, 3).await;
    // The same keys without the namespace belong to someone else and must not be read.
    let mut other = Filler::new(redis.connection().await, None);
    for _ in 0..5 {
        other.push(Sidekiq::V6_5, "default", 9000.0).await;
    }

    let t = env_target(
        redis.dir(),
        &format!("REDIS_URL={}\nREDIS_NAMESPACE=mastodon\n", redis.url()),
    );
    let s = read_snapshot(&t).await.unwrap();
    let d = queue(&s, "default");
    assert_eq!((d.size, d.processes), (2, 1));
    assert_latency(d.latency_seconds, 300.0);
    assert_latency(queue(&s, "push").latency_seconds, 42.5);
    assert_eq!(queue(&s, "mailers").size, 0);
    assert_eq!(queue(&s, "mailers").latency_seconds, 0.0);
    assert_eq!((s.scheduled, s.retry, s.dead), (3, 2, 1));
    assert_eq!((s.processed, s.failed), (1000, 7));
    assert_eq!(s.processes.len(), 1);
    let p = &s.processes[0];
    assert_eq!(
        (p.hostname.as_str(), p.concurrency, p.busy),
        ("web1", 25, 3)
    );
    assert_eq!(p.queues.len(), 6);
    // Sidekiq 6.5 is Mastodon ≤ 4.3: no `fasp` queue is needed.
    assert!(s.queues.iter().all(|q| q.name != "fasp"), "{:?}", s.queues);
    assert!(s.unserved.is_empty(), "{:?}", s.unserved);
    assert!(s.findings.is_empty(), "{:?}", s.findings);
}

/// Mastodon 4.4: Sidekiq 7.3 reports its version, so `fasp` is needed; `scheduler` in two
/// processes is an error; a queue no process serves is listed.
#[tokio::test]
async fn sidekiq_7_3_scheduler_twice_and_fasp_unserved() {
    let redis = RedisServer::start();
    let mut f = Filler::new(redis.connection().await, None);
    // Pushed in time order: the oldest first, so it ends up last in the list.
    f.push(Sidekiq::V7_3, "ingress", 61.0).await;
    f.push(Sidekiq::V7_3, "ingress", 12.0).await;
    f.push(Sidekiq::V7_3, "mailers", 3.0).await;
    let a = f
        .heartbeat(
            Sidekiq::V7_3,
            "app1",
            11,
            &["default,8", "push,6", "scheduler"],
            10,
            10,
        )
        .await;
    let b = f
        .heartbeat(
            Sidekiq::V7_3,
            "app2",
            22,
            &["pull", "scheduler", "mailers,2"],
            5,
            1,
        )
        .await;

    let s = read_snapshot(&Target::from_url(&redis.url(), None, None).unwrap())
        .await
        .unwrap();
    let i = queue(&s, "ingress");
    assert_eq!((i.size, i.processes), (2, 0));
    assert_latency(i.latency_seconds, 61.0);
    assert_eq!(queue(&s, "scheduler").processes, 2);
    assert_eq!(s.unserved, ["ingress", "fasp"]);
    let r = rules(&s);
    assert!(
        r.contains(&("queues-unserved", Some("ingress".into()))),
        "{r:?}"
    );
    assert!(
        r.contains(&("queues-unserved", Some("fasp".into()))),
        "{r:?}"
    );
    let multiple = s
        .findings
        .iter()
        .find(|f| f.rule == "queues-scheduler-multiple")
        .expect("scheduler twice is flagged");
    assert_eq!(multiple.severity, Severity::Error);
    assert!(multiple.message.contains(&a) && multiple.message.contains(&b));
    assert_eq!(s.busy(), 11);
    assert_eq!(s.concurrency(), 15);
}

/// Mastodon 4.5 → 4.6 upgrade: queues hold 7.x float-second and 8.x integer-millisecond jobs
/// at once, an 8.0 process keeps `concurrency` in `info`, an 8.1 one in its own field, and a
/// process whose heartbeat hash expired is dead although the `processes` set still names it.
#[tokio::test]
async fn sidekiq_8_mixed_timestamps_8_1_concurrency_and_a_dead_process() {
    let redis = RedisServer::start();
    let mut f = Filler::new(redis.connection().await, None);
    // Oldest (pushed first, so last in the list) is a float; newer ones integers.
    f.push(Sidekiq::V7_3, "default", 200.0).await;
    f.push(Sidekiq::V8_0, "default", 20.0).await;
    // And the other way round: the oldest is integer milliseconds.
    f.push(Sidekiq::V8_1, "push", 90.0).await;
    f.push(Sidekiq::V7_3, "push", 1.0).await;
    let all = [
        "default,8",
        "push,6",
        "ingress,4",
        "mailers,2",
        "pull",
        "fasp",
    ];
    f.heartbeat(Sidekiq::V8_0, "w1", 1, &all, 12, 2).await;
    f.heartbeat(Sidekiq::V8_1, "w2", 2, &["scheduler"], 7, 0)
        .await;
    let dead = f
        .heartbeat(Sidekiq::V8_1, "w3", 3, &["scheduler", "default"], 30, 30)
        .await;
    f.expire_heartbeat(&dead).await;

    let s = read_snapshot(&Target::from_url(&redis.url(), None, None).unwrap())
        .await
        .unwrap();
    assert_latency(queue(&s, "default").latency_seconds, 200.0);
    assert_latency(queue(&s, "push").latency_seconds, 90.0);
    assert_eq!(queue(&s, "default").size, 2);
    let ids: Vec<(&str, u64)> = s
        .processes
        .iter()
        .map(|p| (p.hostname.as_str(), p.concurrency))
        .collect();
    assert_eq!(ids, [("w1", 12), ("w2", 7)]);
    assert_eq!(
        queue(&s, "scheduler").processes,
        1,
        "the dead process does not count"
    );
    assert_eq!(queue(&s, "default").processes, 1);
    assert!(s.unserved.is_empty(), "{:?}", s.unserved);
    assert_eq!(rules(&s), [("queues-dead-process", None)]);
    assert!(s.findings[0].message.contains(&dead));
    // Read-only: the dead member is still in the set.
    let mut con = redis.connection().await;
    let still: bool = redis::cmd("SISMEMBER")
        .arg("processes")
        .arg(&dead)
        .query_async(&mut con)
        .await
        .unwrap();
    assert!(still);
}

/// The monitor only reads: the data's digest is unchanged and Redis counted no command
/// outside the read-only set (plus what opening a connection sends).
#[tokio::test]
async fn the_monitor_never_writes() {
    let redis = RedisServer::start();
    let mut f = Filler::new(redis.connection().await, None);
    f.push(Sidekiq::V8_1, "default", 10.0).await;
    f.zadd("retry", 2).await;
    f.stats(5, 1).await;
    let live = f.heartbeat(Sidekiq::V8_1, "h", 1, &["default"], 5, 1).await;
    let dead = f.heartbeat(Sidekiq::V8_1, "h", 2, &["push"], 5, 1).await;
    f.expire_heartbeat(&dead).await;
    let mut con = redis.connection().await;
    let digest = |mut c: redis::aio::MultiplexedConnection| async move {
        let d: String = redis::cmd("DEBUG")
            .arg("DIGEST")
            .query_async(&mut c)
            .await
            .unwrap();
        d
    };
    let before = digest(con.clone()).await;
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut con)
        .await
        .unwrap();

    let t = Target::from_url(&redis.url(), None, None).unwrap();
    let s = read_snapshot(&t).await.unwrap();
    assert_eq!(s.processes.len(), 1);
    assert_eq!(s.processes[0].identity, live);
    cli::run_json(&redis.url(), &[]);

    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut con)
        .await
        .unwrap();
    let allowed = [
        "smembers",
        "zcard",
        "get",
        "hmget",
        "llen",
        "lindex",
        "ping",
        "hello",
        "auth",
        "select",
        "client|setinfo",
        "info",
        "config|resetstat",
    ];
    let used: Vec<&str> = stats
        .lines()
        .filter_map(|l| l.strip_prefix("cmdstat_"))
        .map(|l| l.split(':').next().unwrap())
        .collect();
    assert!(
        used.contains(&"hmget") && used.contains(&"lindex"),
        "{used:?}"
    );
    for cmd in &used {
        assert!(allowed.contains(cmd), "the monitor sent {cmd}: {stats}");
    }
    assert_eq!(digest(con.clone()).await, before);
}
