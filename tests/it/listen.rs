//! The listener: graceful shutdown (issue 7 §3), in-process and with the real binary.

use std::io::BufRead;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::origin::{Behaviour, Origin};
use crate::common::{bytes, client, eventually, start_edge};

const BIN: &str = env!("CARGO_BIN_EXE_fediedge");
const KEY: &str = "media_attachments/files/000/000/007/original/slow.png";

/// Larger than what the kernel and both HTTP stacks buffer between a client that stops
/// reading and the edge: the edge cannot finish sending it until the client reads on.
pub const BIG: usize = 32 << 20;

/// An fs primary (served directly, no cache) holding `big.bin` and `small.txt`.
pub fn fs_primary(dir: &Path) -> String {
    let root = dir.join("primary");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("big.bin"), bytes(BIG, 7)).unwrap();
    std::fs::write(root.join("small.txt"), "small").unwrap();
    format!("[primary]\ntype = \"fs\"\nroot = \"{}\"\n", root.display())
}

/// An fs primary with a cache, and `origin` as an http fallback.
fn with_fallback(dir: &Path, origin: &Origin, first_byte: &str) -> String {
    format!(
        "[primary]\ntype = \"fs\"\nroot = \"{}\"\n[cache]\ndir = \"{}\"\nmax_size = \"64MiB\"\n[[fallback]]\nname = \"old\"\ntype = \"http\"\nurl = \"{}\"\nfirst_byte_timeout = \"{first_byte}\"\n",
        dir.join("primary").display(),
        dir.join("cache").display(),
        origin.url()
    )
}

pub fn assert_refused(addr: std::net::SocketAddr, result: std::io::Result<std::net::TcpStream>) {
    match result {
        Err(e) => assert_eq!(
            e.kind(),
            std::io::ErrorKind::ConnectionRefused,
            "connect to {addr}: {e}"
        ),
        Ok(_) => panic!("a new connection to {addr} was accepted during shutdown"),
    }
}

/// Reads the rest of `resp` after `first`; fails the test on an error mid-body.
pub async fn read_rest(mut resp: reqwest::Response, mut got: Vec<u8>) -> Vec<u8> {
    while let Some(chunk) = resp.chunk().await.expect("the body arrives whole") {
        got.extend_from_slice(&chunk);
    }
    got
}

#[tokio::test]
async fn a_response_under_way_completes_while_new_connects_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let edge = start_edge(dir.path(), &fs_primary(dir.path())).await;
    // An idle keep-alive connection: the drain must close it, or it would be cut.
    let keep_alive = reqwest::Client::new();
    let r = keep_alive
        .get(format!("{}small.txt", edge.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.text().await.unwrap(), "small");
    // A big response, read up to its first piece: the edge is still sending it.
    let mut slow = client()
        .get(format!("{}big.bin", edge.base))
        .send()
        .await
        .unwrap();
    assert_eq!(slow.status(), 200);
    let first = slow.chunk().await.unwrap().expect("a first piece");
    assert_eq!(edge.running.open_connections(), 2);

    let addr = edge.running.addr;
    let closed = edge.running.listeners_closed();
    let shutdown = tokio::spawn(edge.running.shutdown());
    closed.cancelled().await;
    assert_refused(addr, std::net::TcpStream::connect(addr));

    let got = read_rest(slow, first.to_vec()).await;
    assert_eq!(got.len(), BIG);
    assert!(got == bytes(BIG, 7), "the body arrived damaged");
    let stopped = shutdown.await.unwrap();
    assert!(stopped.clean(), "{stopped:?}");
}

#[tokio::test]
async fn the_drain_timeout_cuts_a_hung_response_and_shutdown_ends() {
    let dir = tempfile::tempdir().unwrap();
    let origin = Origin::start().await;
    origin.put_with(
        KEY,
        "never",
        Behaviour {
            hang: true,
            ..Behaviour::default()
        },
    );
    let config = format!(
        "drain_timeout = \"1s\"\n{}",
        with_fallback(dir.path(), &origin, "1h")
    );
    let edge = start_edge(dir.path(), &config).await;
    let hung = tokio::spawn(client().get(format!("{}{KEY}", edge.base)).send());
    eventually(Duration::from_secs(10), "the request at the origin", || {
        origin.gets(KEY) == 1
    })
    .await;
    let stopped = edge.running.shutdown().await;
    assert_eq!(stopped.connections_cut, 1, "{stopped:?}");
    assert_eq!(stopped.fetches_cut, 1, "{stopped:?}");
    assert!(hung.await.unwrap().is_err(), "the hung response was cut");
}

#[tokio::test]
async fn shutdown_waits_for_a_fetch_whose_client_left() {
    let dir = tempfile::tempdir().unwrap();
    let origin = Origin::start().await;
    let body = bytes(200_000, 9);
    // The origin holds the rest of the body until the shutdown has begun.
    let (open, gate) = tokio::sync::watch::channel(false);
    origin.put_with(
        KEY,
        body.clone(),
        Behaviour {
            pause_after: Some(10_000),
            gate: Some(gate),
            ..Behaviour::default()
        },
    );
    let edge = start_edge(dir.path(), &with_fallback(dir.path(), &origin, "30s")).await;
    let mut r = client()
        .get(format!("{}{KEY}", edge.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // The fetch is writing the body; the client leaves.
    r.chunk().await.unwrap().expect("a first piece");
    drop(r);
    eventually(
        Duration::from_secs(10),
        "the client connection closed",
        || edge.running.open_connections() == 0,
    )
    .await;
    let cache = edge.running.cache.clone().unwrap();
    let key = fediedge::key::Key::parse(KEY).unwrap();
    assert!(
        cache.lookup(&key).await.is_none(),
        "the fetch is still under way (the origin holds the rest)"
    );
    let closed = edge.running.listeners_closed();
    let shutdown = tokio::spawn(edge.running.shutdown());
    closed.cancelled().await;
    assert!(!shutdown.is_finished());
    open.send(true).unwrap();
    let stopped = shutdown.await.unwrap();
    assert!(stopped.clean(), "{stopped:?}");
    // Shutdown returned after the fetch had verified, staged and cached the body.
    let hit = cache
        .lookup(&key)
        .await
        .expect("cached before shutdown ended");
    assert_eq!(hit.meta.size, body.len() as u64);
    assert_eq!(origin.gets(KEY), 1);
}

/// Kills the child if the test fails before it exits.
pub struct Child(pub std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the real binary on `config`; returns it and its stderr lines as they come.
pub fn spawn_binary(config: &Path) -> (Child, tokio::sync::mpsc::UnboundedReceiver<String>) {
    let mut child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(config)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { return };
            eprintln!("fediedge: {line}");
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    (Child(child), rx)
}

/// Waits for a stderr line containing `what`; panics if the process ends first.
pub async fn line_with(
    lines: &mut tokio::sync::mpsc::UnboundedReceiver<String>,
    what: &str,
) -> String {
    while let Some(line) = lines.recv().await {
        if line.contains(what) {
            return line;
        }
    }
    panic!("fediedge ended without logging {what:?}");
}

/// The value of `field=` in a log line.
pub fn field(line: &str, name: &str) -> String {
    let prefix = format!("{name}=");
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {name} in {line:?}"))
        .to_owned()
}

/// Waits for the child to exit and checks it exited 0 (after a SIGTERM: a clean drain).
pub async fn exits_0(child: Child) {
    let status = tokio::task::spawn_blocking(move || {
        let mut child = child;
        child.0.wait().unwrap()
    })
    .await
    .unwrap();
    assert_eq!(status.code(), Some(0), "{status:?}");
}

/// Sends `signal` (e.g. `TERM`) to the child.
pub fn kill(child: &Child, signal: &str) {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(child.0.id().to_string())
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_drains_on_sigterm_and_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("fediedge.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n{}",
            dir.path().join("var").display(),
            fs_primary(dir.path())
        ),
    )
    .unwrap();
    let (child, mut lines) = spawn_binary(&config);
    let addr: std::net::SocketAddr = field(&line_with(&mut lines, "serving media").await, "addr")
        .parse()
        .unwrap();
    let mut slow = client()
        .get(format!("http://{addr}/system/big.bin"))
        .send()
        .await
        .unwrap();
    assert_eq!(slow.status(), 200);
    let first = slow.chunk().await.unwrap().expect("a first piece");

    kill(&child, "TERM");
    line_with(&mut lines, "stopped accepting").await;
    assert_refused(addr, std::net::TcpStream::connect(addr));
    let got = read_rest(slow, first.to_vec()).await;
    assert_eq!(got.len(), BIG);
    line_with(&mut lines, "everything under way finished").await;
    exits_0(child).await;
}
