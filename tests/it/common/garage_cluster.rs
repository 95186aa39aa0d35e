//! A real three-node Garage cluster (replication factor 3, one zone per node) for one test,
//! on free loopback ports in a temp dir, and [`Link`], a TCP forwarder that can cut one edge
//! off from it. Every node is killed when the [`GarageCluster`] is dropped.
//!
//! Nodes are real `garage server` processes (see [`super::garage`] for where the binary comes
//! from); [`GarageCluster::kill`] is a SIGKILL, a crash rather than a clean stop, and
//! [`GarageCluster::restart`] starts the same node again on its own metadata and data dirs.
//! Waits are on Garage's own answers (its CLI, its `/health`), never on timers.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::copy_bidirectional;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::garage::{create_key_and_bucket, garage_bin, write_node_config, NodeConfig};

/// What `/health` on a node's admin port says when every storage node is up.
const ALL_UP: &str = "Garage is fully operational";
/// Longest wait for a node to start or for the cluster to settle; a failure past it, not a
/// timing assertion.
const SETTLE: Duration = Duration::from_secs(90);

struct Node {
    child: Option<Child>,
    config: PathBuf,
    log: PathBuf,
    s3: u16,
    admin: u16,
    /// `<node id>@127.0.0.1:<rpc port>`.
    id: String,
}

/// Three Garage nodes holding bucket `media`, with one read/write key.
pub struct GarageCluster {
    nodes: Vec<Node>,
    bin: PathBuf,
    _dir: tempfile::TempDir,
    /// The bucket created for the test.
    pub bucket: String,
    /// Access key id.
    pub key_id: String,
    /// Secret key.
    pub secret: String,
}

impl GarageCluster {
    /// Starts three nodes, connects them, gives each a role in its own zone, applies the
    /// layout and creates bucket `media` with a read/write key.
    pub fn start() -> GarageCluster {
        let bin = garage_bin();
        let dir = tempfile::tempdir().unwrap();
        let secret: String = (0..32)
            .map(|i| format!("{:02x}", (i * 53 + 7) % 256))
            .collect();
        let mut nodes = Vec::new();
        for i in 0..3 {
            let d = dir.path().join(format!("node{i}"));
            std::fs::create_dir_all(&d).unwrap();
            let NodeConfig {
                path: config,
                s3,
                admin,
            } = write_node_config(&d, 3, &secret);
            nodes.push(Node {
                child: None,
                config,
                log: d.join("garage.log"),
                s3,
                admin,
                id: String::new(),
            });
        }
        let mut c = GarageCluster {
            nodes,
            bin,
            _dir: dir,
            bucket: "media".into(),
            key_id: String::new(),
            secret: String::new(),
        };
        for i in 0..3 {
            c.spawn(i);
        }
        for i in 0..3 {
            let mut tries = 1;
            while let Err(why) = c.wait_rpc_or_exit(i) {
                // Its ports may have been taken between `free_port` and Garage's bind (by
                // another test's socket: a CI run once lost node 1 so): new ones, once more.
                assert!(tries < 3, "garage node {i} did not start: {why}");
                tries += 1;
                let d = c.nodes[i].config.parent().unwrap().to_owned();
                let NodeConfig {
                    path: config,
                    s3,
                    admin,
                } = write_node_config(&d, 3, &secret);
                let node = &mut c.nodes[i];
                (node.config, node.s3, node.admin) = (config, s3, admin);
                c.spawn(i);
            }
            let id = c.cli(i, &["node", "id", "-q"]).unwrap().trim().to_owned();
            c.nodes[i].id = id;
        }
        c.connect_all();
        for i in 0..3 {
            let short = c.nodes[i].id.split('@').next().unwrap().to_owned();
            let zone = format!("dc{i}");
            c.cli(0, &["layout", "assign", "-z", &zone, "-c", "1G", &short])
                .unwrap();
        }
        c.cli(0, &["layout", "apply", "--version", "1"]).unwrap();
        c.wait_all_up_everywhere();
        (c.key_id, c.secret) = create_key_and_bucket(|args| c.cli(0, args));
        c
    }

    fn spawn(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .unwrap();
        let child = Command::new(&self.bin)
            .arg("-c")
            .arg(&node.config)
            .arg("server")
            // Its own level, whatever the test's `RUST_LOG`: the log shows each S3 request
            // and each peer connection (what a failing test's message points to).
            .env("RUST_LOG", "garage=info")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("cannot start garage");
        node.child = Some(child);
    }

    /// Connects every running node to every other one, in both directions.
    ///
    /// A node sends RPCs only over connections it opened itself; one it merely accepted does
    /// not count, and a failed dial is retried 30 s later (Garage's peering). Connecting only
    /// node 0 to the others left nodes 1 and 2 to dial on their own after start: until they
    /// had, node 1 answered S3 requests with `503 Could not reach quorum of 2 ... Not
    /// connected` (seen in its log), and had a dial failed on a loaded machine, that would
    /// have lasted a retry period or more. This is the likely cause of the migrate race test's
    /// flakiness (edge B's copies to node 1 failing and backing off, 2, 4, ... 64 s, past the
    /// test's wait; or reads through one node failing for every key).
    fn connect_all(&self) {
        let running: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| self.nodes[i].child.is_some())
            .collect();
        for &i in &running {
            for &j in &running {
                if i != j {
                    let peer = self.nodes[j].id.clone();
                    self.cli(i, &["node", "connect", &peer]).unwrap();
                }
            }
        }
    }

    /// Waits until every running node reports every storage node up: each node's own view
    /// (its own outgoing connections), not just node 0's.
    pub fn wait_all_up_everywhere(&self) {
        for i in 0..self.nodes.len() {
            if self.nodes[i].child.is_some() {
                self.wait_all_up(i);
            }
        }
    }

    /// Waits until node `i` answers on RPC; `Err` (with its log's end) if its process
    /// exited first.
    fn wait_rpc_or_exit(&mut self, i: usize) -> Result<(), String> {
        let started = Instant::now();
        while let Err(e) = self.cli(i, &["status"]) {
            if let Some(Ok(Some(status))) = self.nodes[i].child.as_mut().map(|c| c.try_wait()) {
                self.nodes[i].child = None;
                let log = std::fs::read_to_string(&self.nodes[i].log).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(5).collect();
                return Err(format!("exited ({status}): {}", tail.join(" / ")));
            }
            assert!(
                started.elapsed() < SETTLE,
                "garage node {i} did not start: {e}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// Waits until node `i` answers on RPC (`garage status` needs the server up).
    fn wait_rpc(&self, i: usize) {
        let started = Instant::now();
        while let Err(e) = self.cli(i, &["status"]) {
            assert!(
                started.elapsed() < SETTLE,
                "garage node {i} did not start: {e}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn cli(&self, i: usize, args: &[&str]) -> Result<String, String> {
        let out = Command::new(&self.bin)
            .arg("-c")
            .arg(&self.nodes[i].config)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// The first line of `/health` on node `i`'s admin port, `None` if it does not answer.
    pub fn health(&self, i: usize) -> Option<String> {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.nodes[i].admin)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        s.write_all(b"GET /health HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        let body = text.split("\r\n\r\n").nth(1)?;
        Some(body.lines().next().unwrap_or("").to_owned())
    }

    /// Waits until node `observer` reports every storage node up.
    pub fn wait_all_up(&self, observer: usize) {
        self.wait_health(observer, "every storage node up", |h| h == ALL_UP);
    }

    /// Waits until node `observer` reports that some storage node is unavailable (Garage
    /// notices a dead peer by its pings, some seconds after the crash).
    pub fn wait_degraded(&self, observer: usize) {
        self.wait_health(observer, "a storage node reported down", |h| {
            h.contains("unavailable")
        });
    }

    fn wait_health(&self, observer: usize, what: &str, ok: impl Fn(&str) -> bool) {
        let started = Instant::now();
        loop {
            let h = self.health(observer);
            if h.as_deref().is_some_and(&ok) {
                return;
            }
            assert!(
                started.elapsed() < SETTLE,
                "garage node {observer}: timed out waiting for {what}; /health says {h:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Crashes node `i` (SIGKILL) and waits for the process to be gone.
    pub fn kill(&mut self, i: usize) {
        let mut child = self.nodes[i].child.take().expect("node is running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Starts node `i` again on its own dirs and waits until every running node has it back.
    /// The nodes are told to connect to each other at once (Garage would reconnect by itself
    /// on its retry timers; `garage node connect` is what an operator would type), and every
    /// node's own view is waited for, not one: each sends RPCs only over the connections it
    /// opened (see [`GarageCluster::connect_all`]).
    pub fn restart(&mut self, i: usize) {
        self.spawn(i);
        self.wait_rpc(i);
        self.connect_all();
        self.wait_all_up_everywhere();
    }

    /// Node `i`'s S3 endpoint address.
    pub fn s3_addr(&self, i: usize) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.nodes[i].s3))
    }

    /// An S3 store TOML table body for the bucket, reached at `endpoint`.
    pub fn store_toml_at(&self, endpoint: &str) -> String {
        format!(
            "type = \"s3\"\nendpoint = \"{endpoint}\"\nbucket = \"{}\"\nregion = \"garage\"\naccess_key_id = \"{}\"\nsecret_access_key = \"{}\"\n",
            self.bucket, self.key_id, self.secret
        )
    }

    /// An S3 store TOML table body for the bucket through node `i`.
    pub fn store_toml(&self, i: usize) -> String {
        self.store_toml_at(&format!("http://{}", self.s3_addr(i)))
    }

    /// Node `i`'s log file (for a failing test's message).
    pub fn log(&self, i: usize) -> &Path {
        &self.nodes[i].log
    }
}

impl Drop for GarageCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// A TCP forwarder between one edge and one Garage node's S3 port, which a test can cut and
/// restore: a network partition for that edge only.
///
/// Cut, it forwards nothing: connections open at that moment go silent, new ones are accepted
/// and stay silent (as when packets are dropped, so the edge meets its timeouts rather than a
/// quick "connection refused"). Restored, the silent connections are closed and new ones are
/// forwarded again.
pub struct Link {
    /// Where the edge connects.
    pub addr: SocketAddr,
    up: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Link {
    /// Starts forwarding `127.0.0.1:<free port>` to `target`.
    pub async fn start(target: SocketAddr) -> Link {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (up, _) = watch::channel(true);
        let tx = up.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(forward(client, target, tx.subscribe()));
            }
        });
        Link { addr, up, task }
    }

    /// The `endpoint` value for an S3 store reached through this link.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops carrying bytes.
    pub fn cut(&self) {
        self.up.send_replace(false);
    }

    /// Carries bytes again.
    pub fn restore(&self) {
        self.up.send_replace(true);
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.task.abort();
        // Dropping `up` ends every connection task: their waits on it fail.
    }
}

async fn forward(mut client: TcpStream, target: SocketAddr, mut up: watch::Receiver<bool>) {
    if *up.borrow_and_update() {
        let Ok(mut server) = TcpStream::connect(target).await else {
            return;
        };
        tokio::select! {
            _ = copy_bidirectional(&mut client, &mut server) => return,
            _ = up.wait_for(|u| !*u) => {}
        }
    }
    // Cut: hold the client's connection open and silent until the link is restored.
    let _ = up.wait_for(|u| *u).await;
}
