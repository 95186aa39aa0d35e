//! `fediedge queues` as a process: the JSON contract, the table, exit codes, no password.

use std::process::{Command, Output};

use serde_json::Value;

use super::fill::{Filler, Sidekiq};
use super::server::RedisServer;

const BIN: &str = env!("CARGO_BIN_EXE_fediedge");

fn queues(args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("queues")
        .args(args)
        .env_remove("FEDIEDGE_REDIS_URL")
        .output()
        .unwrap()
}

/// Runs `fediedge queues --redis URL --format json ARGS`; the parsed output and exit code.
pub fn run_json(url: &str, args: &[&str]) -> (Value, i32) {
    let out = queues(&[&["--redis", url, "--format", "json"], args].concat());
    let text = String::from_utf8_lossy(&out.stdout);
    let v = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{e}: {text}\n{}", String::from_utf8_lossy(&out.stderr)));
    (v, out.status.code().unwrap())
}

fn keys(v: &Value) -> Vec<&str> {
    let mut k: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    k.sort();
    k
}

/// The JSON contract, through the real binary, against a Redis with a password taken from a
/// Mastodon env file: the password appears nowhere in what it prints.
#[tokio::test]
async fn json_contract_from_a_mastodon_env_never_prints_the_password() {
    let pw = "Zq8-sidekiq-S3CRET";
    let redis = RedisServer::start_with(Some(pw), &[]);
    let mut f = Filler::new(redis.connection().await, None);
    f.push(Sidekiq::V8_1, "default", 75.0).await;
    f.push(Sidekiq::V8_1, "pull", 2.0).await;
    f.zadd("schedule", 4).await;
    f.stats(12, 3).await;
    let id = f
        .heartbeat(
            Sidekiq::V8_1,
            "node1",
            7,
            &["default,8", "push,6", "scheduler"],
            9,
            4,
        )
        .await;
    let env = redis.dir().join(".env.production");
    std::fs::write(
        &env,
        format!(
            "REDIS_HOST=127.0.0.1\nREDIS_PORT={}\nREDIS_PASSWORD={pw}\n",
            redis.port
        ),
    )
    .unwrap();
    let env = env.to_str().unwrap();

    let out = queues(&["--mastodon-env", env, "--format", "json"]);
    let text = String::from_utf8(out.stdout.clone()).unwrap();
    assert!(!text.contains(pw) && !String::from_utf8_lossy(&out.stderr).contains(pw));
    // Unserved required queues are errors: exit 2, as doctor's.
    assert_eq!(out.status.code(), Some(2), "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        keys(&v),
        [
            "dead",
            "failed",
            "findings",
            "processed",
            "processes",
            "queues",
            "retry",
            "scheduled",
            "unserved"
        ]
    );
    assert_eq!(
        (v["scheduled"].as_u64(), v["retry"].as_u64()),
        (Some(4), Some(0))
    );
    assert_eq!(
        (v["processed"].as_u64(), v["failed"].as_u64()),
        (Some(12), Some(3))
    );
    let default = v["queues"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["name"] == "default")
        .unwrap();
    assert_eq!(
        keys(default),
        ["latency_seconds", "name", "processes", "size"]
    );
    assert_eq!(
        (default["size"].as_u64(), default["processes"].as_u64()),
        (Some(1), Some(1))
    );
    let latency = default["latency_seconds"].as_f64().unwrap();
    assert!((75.0..105.0).contains(&latency), "{latency}");
    let p = &v["processes"][0];
    assert_eq!(
        keys(p),
        ["busy", "concurrency", "hostname", "identity", "queues"]
    );
    assert_eq!(p["identity"], id.as_str());
    assert_eq!(
        (p["concurrency"].as_u64(), p["busy"].as_u64()),
        (Some(9), Some(4))
    );
    assert_eq!(
        p["queues"],
        serde_json::json!(["default", "push", "scheduler"])
    );
    assert_eq!(
        v["unserved"],
        serde_json::json!(["ingress", "mailers", "pull", "fasp"])
    );
    let f0 = &v["findings"][0];
    assert_eq!(
        keys(f0),
        ["file", "fix", "key", "message", "rule", "severity"]
    );
    assert_eq!(f0["severity"], "error");

    // The table says the same, with the password hidden in the header.
    let out = queues(&["--mastodon-env", env]);
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(!table.contains(pw), "{table}");
    assert!(table.contains(":***@127.0.0.1"), "{table}");
    assert!(
        table.contains("unserved: ingress, mailers, pull, fasp"),
        "{table}"
    );
    assert!(table.contains(&id) && table.contains("4/9"), "{table}");
    assert_eq!(out.status.code(), Some(2));

    // A wrong password: an error, exit 2, neither password printed.
    let wrong = format!("redis://:not-{pw}@127.0.0.1:{}/0", redis.port);
    let out = queues(&["--redis", &wrong]);
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(2), "{all}");
    assert!(all.contains("error"), "{all}");
    assert!(!all.contains(pw), "{all}");
}

/// Everything served once, `scheduler` once: exit 0; an extra empty queue nobody serves is
/// only info; a quiet process is a warning (exit 1).
#[tokio::test]
async fn exit_codes_follow_the_worst_finding() {
    let redis = RedisServer::start();
    let mut f = Filler::new(redis.connection().await, None);
    let all = [
        "default",
        "push",
        "ingress",
        "mailers",
        "pull",
        "scheduler",
        "fasp",
    ];
    f.heartbeat(Sidekiq::V8_0, "n", 1, &all, 5, 0).await;
    let (v, code) = run_json(&redis.url(), &[]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["unserved"], serde_json::json!([]));

    let mut con = redis.connection().await;
    let quiet = f.heartbeat(Sidekiq::V8_0, "n", 2, &["default"], 5, 0).await;
    let _: () = redis::cmd("HSET")
        .arg(&quiet)
        .arg("quiet")
        .arg("true")
        .query_async(&mut con)
        .await
        .unwrap();
    let (v, code) = run_json(&redis.url(), &[]);
    assert_eq!(code, 1, "{v}");
    assert_eq!(v["findings"][0]["rule"], "queues-quiet-process");
}

/// `--watch --format json` prints one object per refresh and follows changes in Redis.
#[tokio::test]
async fn watch_prints_a_line_per_refresh() {
    use std::io::{BufRead, BufReader};
    let redis = RedisServer::start();
    let mut f = Filler::new(redis.connection().await, None);
    f.push(Sidekiq::V8_0, "push", 1.0).await;
    let mut child = Command::new(BIN)
        .args([
            "queues",
            "--redis",
            &redis.url(),
            "--format",
            "json",
            "--watch",
        ])
        .args(["--interval", "100ms"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let size = |v: &Value| {
        v["queues"]
            .as_array()
            .unwrap()
            .iter()
            .find(|q| q["name"] == "push")
            .map(|q| q["size"].as_u64().unwrap())
    };
    let first: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(size(&first), Some(1));
    f.push(Sidekiq::V8_0, "push", 0.5).await;
    // Wait for the event: a later refresh that sees the second job.
    let mut seen = false;
    for line in lines.by_ref().take(600) {
        let v: Value = serde_json::from_str(&line.unwrap()).unwrap();
        if size(&v) == Some(2) {
            seen = true;
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(seen, "no refresh showed the second job");
}
