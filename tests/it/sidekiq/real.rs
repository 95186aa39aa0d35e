//! The real Sidekiq (Debian's `ruby-sidekiq`, 6.4: the 6.x layout Mastodon ≤ 4.3 runs, under
//! redis-namespace as with `REDIS_NAMESPACE`) enqueues jobs and heartbeats; the monitor reads
//! what it wrote. Installed by `scripts/install-test-deps.sh`; missing, the test fails.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fediedge::sidekiq::{read_snapshot, Target};

use super::server::RedisServer;

const WORKER: &str = r#"
require "sidekiq"
cfg = { url: ENV.fetch("REDIS_URL"), namespace: ENV.fetch("REDIS_NAMESPACE") }
Sidekiq.configure_server { |c| c.redis = cfg }
Sidekiq.configure_client { |c| c.redis = cfg }
class Block
  include Sidekiq::Worker
  def perform
    sleep 0.05 until File.exist?(ENV.fetch("RELEASE"))
  end
end
class Deliver
  include Sidekiq::Worker
  def perform(*); end
end
"#;

const PUSH: &str = r#"
require_relative "worker"
Sidekiq::Client.push("class" => "Block", "queue" => "default", "args" => [])
3.times { |i| Sidekiq::Client.push("class" => "Deliver", "queue" => "push", "args" => [i]) }
Sidekiq::Client.push("class" => "Deliver", "queue" => "pull", "args" => [])
Deliver.perform_in(3600, 1)
"#;

fn program(name: &str) -> String {
    let found = std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(name).is_file()));
    assert!(
        found,
        "{name} not found on PATH: run `bash scripts/install-test-deps.sh` (scripts/test.sh does)"
    );
    name.to_owned()
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn real_sidekiq_6_enqueues_and_heartbeats_under_a_namespace() {
    let redis = RedisServer::start();
    let dir = redis.dir().to_owned();
    std::fs::write(dir.join("worker.rb"), WORKER).unwrap();
    std::fs::write(dir.join("push.rb"), PUSH).unwrap();
    let env = [
        ("REDIS_URL", redis.url()),
        ("REDIS_NAMESPACE", "mastodon".to_owned()),
        ("RELEASE", dir.join("release").display().to_string()),
    ];
    let pushed_before = Instant::now();
    let out = Command::new(program("ruby"))
        .arg("push.rb")
        .current_dir(&dir)
        .envs(env.clone())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let log = std::fs::File::create(dir.join("sidekiq.log")).unwrap();
    let _sidekiq = Killed(
        Command::new(program("sidekiq"))
            .args([
                "-r",
                "./worker.rb",
                "-q",
                "default",
                "-q",
                "scheduler",
                "-c",
                "3",
            ])
            .args(["-t", "1"])
            .current_dir(&dir)
            .envs(env)
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap(),
    );

    let target = Target::from_mastodon_env(&{
        let p = dir.join(".env.production");
        std::fs::write(
            &p,
            format!("REDIS_URL={}\nREDIS_NAMESPACE=mastodon\n", redis.url()),
        )
        .unwrap();
        p
    })
    .unwrap();
    // Wait for the event: a heartbeat that reports the blocking job as busy (Sidekiq 6 beats
    // every 5 s).
    let started = Instant::now();
    let s = loop {
        let s = read_snapshot(&target).await.unwrap();
        if s.processes.len() == 1 && s.busy() == 1 {
            break s;
        }
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "no heartbeat with a busy thread: {s:?}\n{}",
            std::fs::read_to_string(dir.join("sidekiq.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let p = &s.processes[0];
    assert_eq!(p.concurrency, 3);
    assert_eq!(p.queues, ["default", "scheduler"]);
    assert!(p.identity.contains(':') && !p.hostname.is_empty(), "{p:?}");
    let q = |n: &str| s.queues.iter().find(|q| q.name == n).unwrap();
    assert_eq!(
        (q("push").size, q("pull").size, q("default").size),
        (3, 1, 0)
    );
    let latency = q("push").latency_seconds;
    assert!(
        latency > 0.0 && latency <= pushed_before.elapsed().as_secs_f64() + 0.01,
        "{latency}"
    );
    assert_eq!(s.scheduled, 1);
    assert_eq!(s.unserved, ["push", "ingress", "mailers", "pull"]);
    assert!(
        s.findings.iter().all(|f| f.rule == "queues-unserved"),
        "{:?}",
        s.findings
    );
}
