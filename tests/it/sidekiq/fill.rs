//! Fills Redis the way each Sidekiq writes it, from sidekiq/sidekiq's own code:
//! `lib/sidekiq/client.rb` (`raw_push`: `SADD queues`, `LPUSH queue:NAME`), `job_util.rb`
//! (`created_at`/`enqueued_at`: float seconds up to 7.x, integer milliseconds from 8.0) and
//! `launcher.rb` (`❤`: `SADD processes`, `HSET identity info … busy beat rtt_us quiet rss`,
//! `EXPIRE identity 60`; `to_data` for `info`) at v6.5.12, v7.3.9, v8.0.9 and v8.1.6.

use redis::aio::MultiplexedConnection;
use serde_json::{json, Value};

/// A Sidekiq whose data layout is reproduced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sidekiq {
    /// Mastodon ≤ 4.3.
    V6_5,
    /// Mastodon 4.4.
    V7_3,
    /// Mastodon 4.5.
    V8_0,
    /// Mastodon 4.6 (`concurrency` moved out of `info`, 8.1.2+).
    V8_1,
}

/// Writes into one Redis, under an optional namespace (redis-namespace's `NS:key`).
pub struct Filler {
    pub con: MultiplexedConnection,
    pub ns: Option<String>,
    /// "Now" in epoch milliseconds; jobs are dated relative to it.
    pub now_ms: i64,
}

impl Filler {
    pub fn new(con: MultiplexedConnection, ns: Option<&str>) -> Filler {
        Filler {
            con,
            ns: ns.map(str::to_owned),
            now_ms: fediedge::sidekiq::read::now_ms(),
        }
    }

    fn key(&self, k: &str) -> String {
        match &self.ns {
            Some(ns) => format!("{ns}:{k}"),
            None => k.to_owned(),
        }
    }

    /// The timestamp `secs_ago` before now, in `v`'s format (JSON float s or integer ms).
    pub fn stamp(&self, v: Sidekiq, secs_ago: f64) -> Value {
        let ms = self.now_ms as f64 - secs_ago * 1000.0;
        match v {
            Sidekiq::V6_5 | Sidekiq::V7_3 => json!(ms / 1000.0),
            Sidekiq::V8_0 | Sidekiq::V8_1 => json!(ms.round() as i64),
        }
    }

    /// `Sidekiq::Client.push` of one job into `queue`, enqueued `secs_ago` seconds ago.
    pub async fn push(&mut self, v: Sidekiq, queue: &str, secs_ago: f64) {
        let at = self.stamp(v, secs_ago);
        let job = json!({
            "retry": true,
            "queue": queue,
            "class": "ActivityPub::DeliveryWorker",
            "args": ["{}", 1, "https://example.social/inbox"],
            "jid": format!("{:024x}", (self.now_ms as u128) * 7919 + secs_ago as u128),
            "created_at": at,
            "enqueued_at": at,
        });
        redis::pipe()
            .cmd("SADD")
            .arg(self.key("queues"))
            .arg(queue)
            .cmd("LPUSH")
            .arg(self.key(&format!("queue:{queue}")))
            .arg(job.to_string())
            .exec_async(&mut self.con)
            .await
            .unwrap();
    }

    /// A job in `schedule`, `retry` or `dead` (score = float epoch seconds in every version).
    pub async fn zadd(&mut self, set: &str, n: usize) {
        for i in 0..n {
            let job = json!({"class": "X", "jid": format!("{set}{i}"), "queue": "default"});
            let score = self.now_ms as f64 / 1000.0 + i as f64;
            redis::cmd("ZADD")
                .arg(self.key(set))
                .arg(score)
                .arg(job.to_string())
                .exec_async(&mut self.con)
                .await
                .unwrap();
        }
    }

    /// `stat:processed` and `stat:failed` (`INCRBY` in the heartbeat).
    pub async fn stats(&mut self, processed: u64, failed: u64) {
        redis::pipe()
            .cmd("INCRBY")
            .arg(self.key("stat:processed"))
            .arg(processed)
            .cmd("INCRBY")
            .arg(self.key("stat:failed"))
            .arg(failed)
            .exec_async(&mut self.con)
            .await
            .unwrap();
    }

    /// One heartbeat of a process of Sidekiq `v` serving `queues` (`NAME` or `NAME,WEIGHT`).
    /// Returns the identity.
    pub async fn heartbeat(
        &mut self,
        v: Sidekiq,
        host: &str,
        pid: u32,
        queues: &[&str],
        concurrency: u64,
        busy: u64,
    ) -> String {
        let identity = format!("{host}:{pid}:{:012x}", pid as u64 * 104729);
        let names: Vec<&str> = queues
            .iter()
            .map(|q| q.split(',').next().unwrap())
            .collect();
        let weights: serde_json::Map<String, Value> = queues
            .iter()
            .map(|q| {
                let mut it = q.split(',');
                let name = it.next().unwrap().to_owned();
                let w: u64 = it.next().map(|w| w.parse().unwrap()).unwrap_or(0);
                (name, json!(w))
            })
            .collect();
        let started = json!(self.now_ms as f64 / 1000.0 - 3600.0);
        let mut info = json!({
            "hostname": host,
            "started_at": started,
            "pid": pid,
            "tag": "mastodon",
            "concurrency": concurrency,
            "queues": names,
            "labels": [],
            "identity": identity,
        });
        let version = match v {
            Sidekiq::V6_5 => None,
            Sidekiq::V7_3 => Some("7.3.9"),
            Sidekiq::V8_0 => Some("8.0.9"),
            Sidekiq::V8_1 => Some("8.1.6"),
        };
        if let Some(version) = version {
            info["weights"] = json!([weights.clone()]);
            info["version"] = json!(version);
            info["embedded"] = json!(false);
        }
        if matches!(v, Sidekiq::V8_0 | Sidekiq::V8_1) {
            info["capsules"] = json!({"default": {
                "concurrency": concurrency, "mode": "weighted", "weights": weights,
            }});
        }
        let key = self.key(&identity);
        let mut hset = redis::cmd("HSET");
        hset.arg(&key);
        if v == Sidekiq::V8_1 {
            info.as_object_mut().unwrap().remove("concurrency");
            hset.arg("concurrency").arg(concurrency);
        }
        hset.arg("info")
            .arg(info.to_string())
            .arg("busy")
            .arg(busy)
            .arg("beat")
            .arg(self.now_ms as f64 / 1000.0)
            .arg("rtt_us")
            .arg(120)
            .arg("quiet")
            .arg("false")
            .arg("rss")
            .arg(204800);
        redis::pipe()
            .cmd("SADD")
            .arg(self.key("processes"))
            .arg(&identity)
            .add_command(hset)
            .cmd("EXPIRE")
            .arg(&key)
            .arg(60)
            .exec_async(&mut self.con)
            .await
            .unwrap();
        identity
    }

    /// Lets the heartbeat hash of `identity` expire now, as when a process died a minute ago
    /// (the `processes` set still names it: only a writer prunes it). Waits until it is gone.
    pub async fn expire_heartbeat(&mut self, identity: &str) {
        let key = self.key(identity);
        let _: () = redis::cmd("PEXPIRE")
            .arg(&key)
            .arg(1)
            .query_async(&mut self.con)
            .await
            .unwrap();
        loop {
            let exists: u64 = redis::cmd("EXISTS")
                .arg(&key)
                .query_async(&mut self.con)
                .await
                .unwrap();
            if exists == 0 {
                break;
            }
            tokio::task::yield_now().await;
        }
    }
}
