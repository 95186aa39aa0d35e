//! Shared test helpers: a real Garage, a real HTTP origin, an edge started in-process.

#![allow(dead_code)]

pub mod garage;
pub mod garage_cluster;
pub mod origin;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fediedge::serve::Running;

/// An edge started in a temp dir from a TOML config body (listeners on port 0 are added).
pub struct TestEdge {
    pub running: Running,
    pub dir: PathBuf,
    pub base: String,
    pub admin: String,
}

/// Writes `extra` (TOML) below the listener/data settings and starts the edge in `dir`.
pub async fn start_edge(dir: &Path, extra: &str) -> TestEdge {
    start_edge_listening(dir, "127.0.0.1:0", extra).await
}

/// [`start_edge`] on a given `listen` address (edges that name each other as peers).
pub async fn start_edge_listening(dir: &Path, listen: &str, extra: &str) -> TestEdge {
    let text = format!(
        "listen = \"{listen}\"\nadmin_listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n{extra}",
        dir.join("var").display()
    );
    let config =
        fediedge::config::from_str(&text, Path::new("test.toml")).expect("valid test config");
    let running = fediedge::serve::start(config).await.expect("edge starts");
    let base = format!("http://{}/system/", running.addr);
    let admin = format!("http://{}", running.admin_addr);
    TestEdge {
        running,
        dir: dir.to_owned(),
        base,
        admin,
    }
}

/// A fresh HTTP client (no connection reuse across tests).
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap()
}

/// Sends `raw` (a whole request) over TCP and returns the status line: for paths an HTTP
/// client library would normalise before sending.
pub async fn raw_status(addr: std::net::SocketAddr, raw: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(raw.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 1024];
    let n = s.read(&mut buf).await.unwrap();
    String::from_utf8_lossy(&buf[..n])
        .lines()
        .next()
        .unwrap_or("")
        .to_owned()
}

/// Polls `f` every 50 ms until it is true; panics after `limit`. For effects that happen in
/// the background (write-backs), not for timing.
pub async fn eventually(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Deterministic pseudo-random bytes.
pub fn bytes(n: usize, seed: u8) -> Vec<u8> {
    let mut x: u32 = 0x9E37_79B9 ^ seed as u32;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}
