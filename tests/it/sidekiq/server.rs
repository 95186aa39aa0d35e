//! A real `redis-server` started for one test, in a temp dir, on a free loopback port; killed
//! when dropped.
//!
//! The binary is `$REDIS_SERVER_BIN`, else `redis-server` on the `PATH` (Debian's package,
//! installed by `scripts/install-test-deps.sh`, which the test command runs). A missing binary
//! fails the test: a Redis test that silently skips would count as passing.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running Redis with nothing in it.
pub struct RedisServer {
    child: Child,
    dir: tempfile::TempDir,
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// `requirepass`, if one was set.
    pub password: Option<String>,
}

pub use crate::common::garage::free_port;

fn redis_bin() -> PathBuf {
    if let Ok(p) = std::env::var("REDIS_SERVER_BIN") {
        return p.into();
    }
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("redis-server"))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "redis-server not found on PATH: run `bash scripts/install-test-deps.sh` \
             (scripts/test.sh does)"
        )
    })
}

impl RedisServer {
    /// Starts a Redis without a password.
    pub fn start() -> RedisServer {
        RedisServer::start_with(None, &[])
    }

    /// Starts a Redis with `requirepass` (if given) and extra `--option value` arguments.
    pub fn start_with(password: Option<&str>, extra: &[&str]) -> RedisServer {
        RedisServer::spawn(password, &|port, _| {
            let mut args = vec!["--port".to_owned(), port.to_string()];
            args.extend(extra.iter().map(|s| s.to_string()));
            args
        })
    }

    /// Starts `redis-server` with the arguments `args(port)` gives for a free port (a config
    /// file first, if any), waiting until its log says it is ready.
    pub fn spawn(password: Option<&str>, args: &dyn Fn(u16, &Path) -> Vec<String>) -> RedisServer {
        let bin = redis_bin();
        let mut last_log = String::new();
        // The free port may be taken between our probe and Redis's bind: try a few.
        for _ in 0..5 {
            let dir = tempfile::tempdir().unwrap();
            let port = free_port();
            let log = dir.path().join("redis.log");
            let mut cmd = Command::new(&bin);
            cmd.args(args(port, dir.path()))
                .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                .args(["--daemonize", "no", "--enable-debug-command", "yes"])
                .arg("--dir")
                .arg(dir.path())
                .arg("--logfile")
                .arg(&log)
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            if let Some(pw) = password {
                cmd.args(["--requirepass", pw]);
            }
            let child = cmd.spawn().expect("redis-server starts");
            let mut server = RedisServer {
                child,
                dir,
                port,
                password: password.map(str::to_owned),
            };
            if server.wait_ready(&log, Duration::from_secs(30)) {
                return server;
            }
            last_log = std::fs::read_to_string(&log).unwrap_or_default();
        }
        panic!("redis-server did not start: {last_log}");
    }

    /// Polls the log until Redis (or a sentinel) says it is ready, the process died, or
    /// `limit` passed.
    fn wait_ready(&mut self, log: &Path, limit: Duration) -> bool {
        let started = Instant::now();
        while started.elapsed() < limit {
            if let Ok(Some(_)) = self.child.try_wait() {
                return false;
            }
            let text = std::fs::read_to_string(log).unwrap_or_default();
            if text.contains("Ready to accept connections") || text.contains("+monitor master") {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// `redis://[:password@]127.0.0.1:PORT/0`.
    pub fn url(&self) -> String {
        match &self.password {
            Some(pw) => format!("redis://:{pw}@127.0.0.1:{}/0", self.port),
            None => format!("redis://127.0.0.1:{}/0", self.port),
        }
    }

    /// A connection for filling the database the way Sidekiq does.
    pub async fn connection(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    /// The temp dir Redis runs in (free for test files).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
