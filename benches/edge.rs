//! The edge benchmark (issue 2 §13): fediedge, nginx and Varnish side by side on this machine,
//! against one origin, under the same client load, in the same run.
//!
//! Not a timed test: it prints figures, ratios fediedge / better peer, and whether each target
//! is met. Run it with `scripts/bench-edge.sh` (installs nginx and Varnish when missing, builds,
//! runs) or `cargo bench --bench edge`. Results and method: `docs/benchmarks.md`.
//!
//! What runs:
//! - an **origin**: an in-process hyper server holding the object set (4 KiB and 1 MiB
//!   objects, plus one slow "herd" object per server). It counts GETs per key. A herd object
//!   answers 500 ms late and trickles its body over about a second.
//! - **fediedge**: the release binary, `serve --config`, cache on, empty fs primary, the origin
//!   as an `http` fallback.
//! - **nginx**: `proxy_cache` + `proxy_cache_lock` as in Mastodon's object-storage-proxy doc.
//! - **Varnish**: a VCL whose backend is the origin, `-s malloc,256m`.
//!
//! All listen on free 127.0.0.1 ports and are stopped when the program ends (also on panic,
//! through [`Proc`]'s `Drop`). The servers are measured one at a time, each warmed first
//! (one pass over the objects, then a pass that must answer `X-Cache-Status: HIT`).
//!
//! The load generator is a minimal HTTP/1.1 keep-alive client written here on tokio (request
//! out, status line and headers parsed, body counted and dropped), so that it costs as little
//! CPU as possible: it shares the machine's cores with the server under test.
//!
//! Warm throughput is measured in rounds (every round measures every server once, starting
//! with a different one; each measurement waits up to 30 s for the machine to be quiet), and
//! the best and the median round are reported; targets are checked on the best round. The
//! machine is shared: load from outside the benchmark (reported as "CPU used by other
//! processes") can only lower a figure, so the best round is the closest to what a server can
//! do here, and the interleaving keeps that load from landing on one server only.
//!
//! Knobs (environment): `EDGE_BENCH_SECS` (seconds per measurement, default 5),
//! `EDGE_BENCH_ROUNDS` (default 5), `EDGE_BENCH_SERVERS` (default `fediedge,nginx,varnish`),
//! `EDGE_BENCH_RSS_CLIENTS` (default 1000), `EDGE_BENCH_STRICT=1` (exit 1 when a target is
//! missed), `FEDIEDGE_BIN` (default: the binary cargo built with this bench), `NGINX_BIN`,
//! `VARNISHD_BIN`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::{Buf, Bytes, BytesMut};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[path = "common/process.rs"]
mod process;
#[path = "common/servers.rs"]
mod servers;
use process::{descendants, find_program, free_addr, loadavg, version, Proc};

const SMALL_SIZE: usize = 4 * 1024;
const SMALL_COUNT: usize = 256;
const LARGE_SIZE: usize = 1024 * 1024;
const LARGE_COUNT: usize = 32;
const HERD_SIZE: usize = 512 * 1024;
const HERD_CLIENTS: usize = 50;
const HERD_HEADER_DELAY: Duration = Duration::from_millis(500);
const HERD_TRICKLE: Duration = Duration::from_millis(1000);
const HERD_CHUNKS: usize = 16;
/// Followers are sent this long after the leader, so that the leader is the one that starts
/// the fetch. Every time-to-first-byte is measured from the moment the *leader* was sent:
/// followers get no head start from being sent later.
const FOLLOWER_DELAY: Duration = Duration::from_millis(20);
const SMALL_CONNS: usize = 64;
const LARGE_CONNS: usize = 16;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);
const READ_SIZE: usize = 64 * 1024;
const PREFIX: &str = "/system/";
const LAST_MODIFIED: &str = "Tue, 14 Nov 2023 22:13:20 GMT";
const MIB: f64 = 1024.0 * 1024.0;

const TARGET_SMALL: f64 = 1.2;
const TARGET_LARGE: f64 = 1.0;
const TARGET_HERD: f64 = 1.05;
const TARGET_RSS_MIB: f64 = 32.0;

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let code = rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            r = tokio::time::timeout(Duration::from_secs(20 * 60), run()) => match r {
                Ok(Ok(true)) => 0,
                Ok(Ok(false)) => 1,
                Ok(Err(e)) => { eprintln!("edge bench: error: {e:#}"); 2 }
                Err(_) => { eprintln!("edge bench: gave up after 20 minutes"); 2 }
            },
            _ = tokio::signal::ctrl_c() => { eprintln!("edge bench: interrupted"); 130 }
            _ = term.recv() => { eprintln!("edge bench: terminated"); 143 }
        }
    });
    // `run`'s future, and with it every server guard, is dropped by now.
    rt.shutdown_timeout(Duration::from_secs(1));
    std::process::exit(code);
}

struct Settings {
    secs: u64,
    rounds: usize,
    strict: bool,
    servers: Vec<String>,
    rss_clients: usize,
}

impl Settings {
    fn from_env() -> Settings {
        let num = |k: &str, d: u64| {
            std::env::var(k)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(d)
        };
        Settings {
            secs: num("EDGE_BENCH_SECS", 5).max(1),
            rounds: num("EDGE_BENCH_ROUNDS", 5).max(1) as usize,
            strict: std::env::var("EDGE_BENCH_STRICT").is_ok_and(|v| v == "1"),
            servers: std::env::var("EDGE_BENCH_SERVERS")
                .unwrap_or_else(|_| "fediedge,nginx,varnish".into())
                .split(',')
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect(),
            rss_clients: num("EDGE_BENCH_RSS_CLIENTS", 1000).max(1) as usize,
        }
    }
}

async fn run() -> anyhow::Result<bool> {
    let settings = Settings::from_env();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let tmp = tempfile::Builder::new()
        .prefix("fediedge-edge-bench-")
        .tempdir()?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755))?;
    }
    let names: Vec<&str> = settings.servers.iter().map(String::as_str).collect();
    let origin = Arc::new(Origin::new(&names));
    let origin_addr = origin.clone().spawn().await?;

    println!("# fediedge edge benchmark (issue 2 §13)");
    println!("machine: {}", machine());
    println!("fediedge source: {}", source_revision());
    println!(
        "origin: http://{origin_addr}{PREFIX} ({SMALL_COUNT} × 4 KiB, {LARGE_COUNT} × 1 MiB, herd objects of {} KiB: {} ms before headers, body over {} ms)",
        HERD_SIZE / 1024,
        HERD_HEADER_DELAY.as_millis(),
        HERD_TRICKLE.as_millis()
    );
    println!(
        "load: {SMALL_CONNS} connections for 4 KiB, {LARGE_CONNS} for 1 MiB, {} s each; {} clients for the RSS run; client shares the {cores} cores",
        settings.secs, settings.rss_clients
    );
    println!("work dir: {}", tmp.path().display());
    println!("load average at the start: {}", loadavg());

    // Declared after `tmp`: dropped (stopped) before the directory is removed.
    let mut servers: Vec<Server> = Vec::new();
    for name in &settings.servers {
        let dir = tmp.path().join(name);
        std::fs::create_dir_all(&dir)?;
        let started = match name.as_str() {
            "fediedge" => start_fediedge(&dir, origin_addr),
            "nginx" => start_nginx(&dir, origin_addr, cores),
            "varnish" => start_varnish(&dir, origin_addr),
            other => bail!("unknown server {other:?} in EDGE_BENCH_SERVERS"),
        };
        let mut server = match started {
            Ok(s) => s,
            Err(e) if name != "fediedge" => {
                println!("{name}: not run: {e:#}");
                continue;
            }
            Err(e) => return Err(e),
        };
        server.wait_ready().await?;
        println!("{name}: {} on http://{}", server.version, server.addr);
        servers.push(server);
    }

    let small: Arc<Vec<String>> = Arc::new((0..SMALL_COUNT).map(|i| url(&small_key(i))).collect());
    let large: Arc<Vec<String>> = Arc::new((0..LARGE_COUNT).map(|i| url(&large_key(i))).collect());
    let all: Vec<String> = small.iter().chain(large.iter()).cloned().collect();
    let mut figures = Vec::new();
    for server in &servers {
        figures.push(prepare(server, &origin, &all).await?);
    }
    warm_rounds(&servers, &mut figures, &origin, &settings, &small, &large).await;
    rss_runs(&mut servers, &mut figures, &settings, &large).await?;
    println!("load average at the end: {}", loadavg());
    let met = report(&figures, &settings, cores);
    drop(servers);
    drop(tmp);
    Ok(met || !settings.strict)
}

/// The commit the benchmark was built from, `-dirty` when the working tree had changes.
fn source_revision() -> String {
    Command::new("git")
        .args(["describe", "--always", "--dirty", "--abbrev=12"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown (no git)".into())
}

/// CPU used on the machine by processes other than this program and the servers it started,
/// as a share of all cores, over an interval: the load from outside the benchmark. Only
/// user and system time of processes counts (not interrupts), so it slightly underestimates.
struct CpuMeter {
    at: Instant,
    busy: u64,
    ours: u64,
}

impl CpuMeter {
    fn start() -> CpuMeter {
        CpuMeter {
            at: Instant::now(),
            busy: machine_busy_ticks(),
            ours: our_ticks(),
        }
    }

    fn other_share(&self) -> f64 {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let busy = machine_busy_ticks().saturating_sub(self.busy);
        let ours = our_ticks().saturating_sub(self.ours);
        // USER_HZ is 100 on Linux.
        let capacity = self.at.elapsed().as_secs_f64() * 100.0 * cores;
        (busy.saturating_sub(ours) as f64 / capacity).clamp(0.0, 1.0)
    }
}

fn machine_busy_ticks() -> u64 {
    std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|t| {
            let line = t.lines().next()?.to_owned();
            let v: Vec<u64> = line
                .split_whitespace()
                .skip(1)
                .filter_map(|x| x.parse().ok())
                .collect();
            // user nice system idle iowait irq softirq steal: only process time (user, nice,
            // system) counts. Softirq time is left out: on loopback much of the servers' own TCP
            // work runs there, charged to no process.
            Some(v.iter().take(3).sum::<u64>())
        })
        .unwrap_or(0)
}

fn proc_ticks(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let rest: Vec<u64> = stat[stat.rfind(')')? + 1..]
                .split_whitespace()
                .skip(11)
                .take(2)
                .filter_map(|x| x.parse().ok())
                .collect();
            Some(rest.iter().sum())
        })
        .unwrap_or(0)
}

fn our_ticks() -> u64 {
    let me = std::process::id();
    proc_ticks(me) + descendants(me).into_iter().map(proc_ticks).sum::<u64>()
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kib| kib.parse::<u64>().ok())
        })
        .map(|kib| format!("{:.0} GiB RAM", kib as f64 / MIB))
        .unwrap_or_default();
    format!("{cores} × {cpu}, {mem}, Linux {kernel}")
}

// ---------------------------------------------------------------------------------------------
// The origin.

struct Object {
    data: Bytes,
    content_type: &'static str,
    etag: String,
    slow: bool,
}

struct Origin {
    objects: HashMap<String, Object>,
    gets: Mutex<HashMap<String, u64>>,
    total_gets: AtomicU64,
}

type OriginBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn small_key(i: usize) -> String {
    format!("media_attachments/files/small/{i:06}.jpg")
}
fn large_key(i: usize) -> String {
    format!("media_attachments/files/large/{i:06}.mp4")
}
fn herd_key(server: &str) -> String {
    format!("media_attachments/files/herd/{server}.mp4")
}

/// Deterministic pseudo-random bytes (xorshift), different for every key.
fn content(key: &str, size: usize) -> Bytes {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for b in key.bytes() {
        x = (x ^ u64::from(b)).wrapping_mul(0x0100_0000_01B3);
    }
    let mut out = Vec::with_capacity(size + 8);
    while out.len() < size {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(size);
    Bytes::from(out)
}

impl Origin {
    fn new(servers: &[&str]) -> Origin {
        let mut objects = HashMap::new();
        let mut add = |key: String, size: usize, content_type: &'static str, slow: bool| {
            let data = content(&key, size);
            let etag = format!("\"{:016x}\"", fnv(&data));
            objects.insert(
                key,
                Object {
                    data,
                    content_type,
                    etag,
                    slow,
                },
            );
        };
        for i in 0..SMALL_COUNT {
            add(small_key(i), SMALL_SIZE, "image/jpeg", false);
        }
        for i in 0..LARGE_COUNT {
            add(large_key(i), LARGE_SIZE, "video/mp4", false);
        }
        for s in servers {
            add(herd_key(s), HERD_SIZE, "video/mp4", true);
        }
        Origin {
            objects,
            gets: Mutex::new(HashMap::new()),
            total_gets: AtomicU64::new(0),
        }
    }

    fn gets(&self, key: &str) -> u64 {
        self.gets
            .lock()
            .unwrap()
            .get(key)
            .copied()
            .unwrap_or_default()
    }

    fn total_gets(&self) -> u64 {
        self.total_gets.load(Ordering::Relaxed)
    }

    async fn spawn(self: Arc<Self>) -> anyhow::Result<SocketAddr> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let origin = self.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let origin = origin.clone();
                        async move { Ok::<_, Infallible>(origin.answer(req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Ok(addr)
    }

    async fn answer(&self, req: Request<Incoming>) -> Response<OriginBody> {
        let plain = |code: u16| {
            Response::builder()
                .status(code)
                .body(Full::new(Bytes::new()).boxed())
                .expect("response")
        };
        let head = match *req.method() {
            hyper::Method::GET => false,
            hyper::Method::HEAD => true,
            _ => return plain(405),
        };
        let key = req
            .uri()
            .path()
            .strip_prefix(PREFIX)
            .unwrap_or_default()
            .to_owned();
        if !head {
            self.total_gets.fetch_add(1, Ordering::Relaxed);
            *self.gets.lock().unwrap().entry(key.clone()).or_default() += 1;
        }
        let Some(object) = self.objects.get(&key) else {
            return plain(404);
        };
        if object.slow {
            tokio::time::sleep(HERD_HEADER_DELAY).await;
        }
        let builder = Response::builder()
            .status(200)
            .header("content-type", object.content_type)
            .header("content-length", object.data.len())
            .header("etag", &object.etag)
            .header("last-modified", LAST_MODIFIED);
        let body = if head {
            Full::new(Bytes::new()).boxed()
        } else if object.slow {
            let data = object.data.clone();
            let piece = data.len().div_ceil(HERD_CHUNKS);
            let pause = HERD_TRICKLE / HERD_CHUNKS as u32;
            let chunks = futures_util::stream::unfold(0usize, move |at| {
                let data = data.clone();
                async move {
                    if at >= data.len() {
                        return None;
                    }
                    if at > 0 {
                        tokio::time::sleep(pause).await;
                    }
                    let end = (at + piece).min(data.len());
                    Some((Ok(Frame::data(data.slice(at..end))), end))
                }
            });
            StreamBody::new(chunks).boxed()
        } else {
            Full::new(object.data.clone()).boxed()
        };
        builder.body(body).expect("response")
    }
}

fn fnv(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    h
}

// ---------------------------------------------------------------------------------------------
// The servers under test.

/// A field of `/proc/<pid>/status` in KiB (`VmRSS`, `VmHWM`).
fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

struct Server {
    name: String,
    version: String,
    addr: SocketAddr,
    admin: Option<SocketAddr>,
    proc: Proc,
}

impl Server {
    /// The server's processes: the one we started and everything below it.
    fn pids(&self) -> Vec<u32> {
        let root = self.proc.child.id();
        let mut pids = vec![root];
        pids.extend(descendants(root));
        pids
    }

    fn rss_kib(&self) -> u64 {
        self.pids().iter().map(|&p| status_kib(p, "VmRSS")).sum()
    }

    fn hwm_kib(&self) -> u64 {
        self.pids().iter().map(|&p| status_kib(p, "VmHWM")).sum()
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.proc.child.try_wait()? {
                bail!(
                    "{} exited at start ({status}); its log {}:\n{}",
                    self.name,
                    self.proc.log.display(),
                    tail(&self.proc.log)
                );
            }
            if let Ok(Ok(_)) =
                tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(self.addr)).await
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} does not accept connections on {} after 60 s; log:\n{}",
                    self.name,
                    self.addr,
                    tail(&self.proc.log)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

fn start_fediedge(dir: &Path, origin: SocketAddr) -> anyhow::Result<Server> {
    let bin = std::env::var("FEDIEDGE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_BIN_EXE_fediedge")));
    let addr = free_addr()?;
    let admin = free_addr()?;
    std::fs::create_dir_all(dir.join("media"))?;
    let config = format!(
        r#"listen = "{addr}"
admin_listen = "{admin}"
url_prefix = "{PREFIX}"
data_dir = "{var}"

[cache]
dir = "{cache}"
max_size = "4GiB"

[primary]
type = "fs"
root = "{media}"

[[fallback]]
name = "origin"
type = "http"
url = "http://{origin}{PREFIX}"
max_concurrency = 16
first_byte_timeout = "10s"
"#,
        var = dir.join("var").display(),
        cache = dir.join("cache").display(),
        media = dir.join("media").display(),
    );
    let proc = servers::start_fediedge(&bin, dir, &config)?;
    Ok(Server {
        name: "fediedge".into(),
        version: format!("{} (release build)", bin.display()),
        addr,
        admin: Some(admin),
        proc,
    })
}

fn start_nginx(dir: &Path, origin: SocketAddr, workers: usize) -> anyhow::Result<Server> {
    let bin = find_program("NGINX_BIN", "nginx")?;
    let addr = free_addr()?;
    for d in ["cache", "tmp", "logs"] {
        std::fs::create_dir_all(dir.join(d))?;
    }
    let d = dir.display();
    // The cache location follows Mastodon's "object storage proxy" doc (proxy_cache,
    // proxy_cache_lock, the media headers), with a keep-alive upstream.
    let config = format!(
        r#"{head}  default_type application/octet-stream;
  sendfile on;
  tcp_nopush on;
  proxy_cache_path {d}/cache levels=1:2 keys_zone=CACHE:10m inactive=7d max_size=4g;
  upstream origin {{
    server {origin};
    keepalive 16;
  }}
  server {{
    listen {addr} backlog=4096;
    location {PREFIX} {{
      limit_except GET {{ deny all; }}
      proxy_http_version 1.1;
      proxy_set_header Connection '';
      proxy_set_header Authorization '';
      proxy_hide_header Set-Cookie;
      proxy_ignore_headers Set-Cookie;
      proxy_pass http://origin;
      proxy_intercept_errors off;
      proxy_cache CACHE;
      proxy_cache_valid 200 7d;
      proxy_cache_use_stale error timeout updating http_500 http_502 http_503 http_504;
      proxy_cache_lock on;
      expires 1y;
      add_header Cache-Control public;
      add_header Access-Control-Allow-Origin '*';
      add_header X-Cache-Status $upstream_cache_status;
      add_header X-Content-Type-Options nosniff;
      add_header Content-Security-Policy "default-src 'none'; form-action 'none'";
    }}
  }}
}}
"#,
        head = servers::nginx_config_head(dir, workers),
    );
    let proc = servers::start_nginx(&bin, dir, &config)?;
    Ok(Server {
        name: "nginx".into(),
        version: format!("{}, {workers} workers", version(&bin, "-v")),
        addr,
        admin: None,
        proc,
    })
}

fn start_varnish(dir: &Path, origin: SocketAddr) -> anyhow::Result<Server> {
    let bin = find_program("VARNISHD_BIN", "varnishd")?;
    let addr = free_addr()?;
    let vcl = format!(
        r#"vcl 4.1;

backend origin {{
  .host = "{host}";
  .port = "{port}";
  .first_byte_timeout = 60s;
  .between_bytes_timeout = 60s;
}}

sub vcl_recv {{
  if (req.method != "GET" && req.method != "HEAD") {{
    return (synth(405));
  }}
  unset req.http.Cookie;
  unset req.http.Authorization;
  return (hash);
}}

sub vcl_backend_response {{
  if (beresp.status == 200) {{
    set beresp.ttl = 7d;
  }}
  unset beresp.http.Set-Cookie;
}}

sub vcl_deliver {{
  if (obj.hits > 0) {{
    set resp.http.X-Cache-Status = "HIT";
  }} else {{
    set resp.http.X-Cache-Status = "MISS";
  }}
  set resp.http.Cache-Control = "public, max-age=315576000, immutable";
  set resp.http.Access-Control-Allow-Origin = "*";
  set resp.http.X-Content-Type-Options = "nosniff";
  set resp.http.Content-Security-Policy = "default-src 'none'; form-action 'none'";
}}
"#,
        host = origin.ip(),
        port = origin.port(),
    );
    let proc = servers::start_varnishd(&bin, dir, addr, &vcl)?;
    Ok(Server {
        name: "varnish".into(),
        version: version(&bin, "-V"),
        addr,
        admin: None,
        proc,
    })
}

// ---------------------------------------------------------------------------------------------
// The client: HTTP/1.1, keep-alive, one request at a time per connection.

struct Reply {
    status: u16,
    cache_status: String,
    x_varnish: String,
    body_len: u64,
    /// First byte of the response (status line).
    first_byte: Instant,
    /// First byte of the body, if it had one.
    first_body: Option<Instant>,
}

struct Conn {
    addr: SocketAddr,
    stream: Option<TcpStream>,
    buf: BytesMut,
}

enum Framing {
    Length(u64),
    Chunked,
    UntilClose,
}

fn eof() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "connection closed mid-response",
    )
}

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_owned())
}

/// Reads more bytes into `buf`; fails at end of stream.
async fn fill(stream: &mut TcpStream, buf: &mut BytesMut) -> io::Result<()> {
    buf.reserve(READ_SIZE);
    if stream.read_buf(buf).await? == 0 {
        return Err(eof());
    }
    Ok(())
}

/// Where body bytes go.
struct Sink<'a> {
    keep: Option<&'a mut Vec<u8>>,
    counter: Option<&'a AtomicU64>,
    len: u64,
    first: Option<Instant>,
}

impl Sink<'_> {
    fn take(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        self.first.get_or_insert_with(Instant::now);
        self.len += bytes.len() as u64;
        if let Some(k) = self.keep.as_deref_mut() {
            k.extend_from_slice(bytes);
        }
        if let Some(c) = self.counter {
            c.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        }
    }
}

impl Conn {
    fn new(addr: SocketAddr) -> Conn {
        Conn {
            addr,
            stream: None,
            buf: BytesMut::with_capacity(READ_SIZE),
        }
    }

    async fn connect(&mut self) -> io::Result<()> {
        if self.stream.is_none() {
            let s = TcpStream::connect(self.addr).await?;
            s.set_nodelay(true)?;
            self.stream = Some(s);
            self.buf.clear();
        }
        Ok(())
    }

    /// GETs `path`. A kept-alive connection the server had closed is reopened once.
    async fn get(
        &mut self,
        path: &str,
        keep: Option<&mut Vec<u8>>,
        counter: Option<&AtomicU64>,
    ) -> io::Result<Reply> {
        let reused = self.stream.is_some();
        let mut sink = Sink {
            keep,
            counter,
            len: 0,
            first: None,
        };
        match self.try_get(path, &mut sink).await {
            Err(e) if reused && sink.len == 0 && e.kind() == io::ErrorKind::UnexpectedEof => {
                self.stream = None;
                self.try_get(path, &mut sink).await
            }
            r => r,
        }
        .inspect_err(|_| self.stream = None)
    }

    async fn try_get(&mut self, path: &str, sink: &mut Sink<'_>) -> io::Result<Reply> {
        self.connect().await?;
        let stream = self.stream.as_mut().expect("connected");
        let buf = &mut self.buf;
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: fediedge-edge-bench\r\nAccept: */*\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await?;
        let mut first_byte = None;
        let header_end = loop {
            if let Some(i) = find(buf, b"\r\n\r\n") {
                break i + 4;
            }
            if buf.len() > 64 * 1024 {
                return Err(bad("response header block over 64 KiB"));
            }
            fill(stream, buf).await?;
            first_byte.get_or_insert_with(Instant::now);
        };
        let first_byte = first_byte.unwrap_or_else(Instant::now);
        let head = buf.split_to(header_end);
        let head = std::str::from_utf8(&head).map_err(|_| bad("non-UTF-8 header block"))?;
        let mut lines = head.split("\r\n");
        let status: u16 = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("bad status line"))?;
        let mut framing = Framing::UntilClose;
        let mut close = false;
        let mut cache_status = String::new();
        let mut x_varnish = String::new();
        for line in lines {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim();
            match name.trim().to_ascii_lowercase().as_str() {
                "content-length" if !matches!(framing, Framing::Chunked) => {
                    framing =
                        Framing::Length(value.parse().map_err(|_| bad("bad Content-Length"))?);
                }
                "transfer-encoding" if value.to_ascii_lowercase().contains("chunked") => {
                    framing = Framing::Chunked
                }
                "connection" if value.eq_ignore_ascii_case("close") => close = true,
                "x-cache-status" => cache_status = value.to_owned(),
                "x-varnish" => x_varnish = value.to_owned(),
                _ => {}
            }
        }
        if status == 304 || status == 204 {
            framing = Framing::Length(0);
        }
        match framing {
            Framing::Length(n) => read_exact_body(stream, buf, n, sink).await?,
            Framing::Chunked => loop {
                let line = read_line(stream, buf).await?;
                let size_text = line.split(';').next().unwrap_or_default().trim();
                let size = u64::from_str_radix(size_text, 16).map_err(|_| bad("bad chunk size"))?;
                if size == 0 {
                    while !read_line(stream, buf).await?.is_empty() {}
                    break;
                }
                read_exact_body(stream, buf, size, sink).await?;
                if !read_line(stream, buf).await?.is_empty() {
                    return Err(bad("chunk not followed by CRLF"));
                }
            },
            Framing::UntilClose => {
                loop {
                    let chunk = buf.split();
                    sink.take(&chunk);
                    buf.reserve(READ_SIZE);
                    if stream.read_buf(buf).await? == 0 {
                        break;
                    }
                }
                close = true;
            }
        }
        if close {
            self.stream = None;
        }
        Ok(Reply {
            status,
            cache_status,
            x_varnish,
            body_len: sink.len,
            first_byte,
            first_body: sink.first,
        })
    }
}

async fn read_exact_body(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    mut left: u64,
    sink: &mut Sink<'_>,
) -> io::Result<()> {
    loop {
        let take = (buf.len() as u64).min(left) as usize;
        if take > 0 {
            sink.take(&buf[..take]);
            buf.advance(take);
            left -= take as u64;
        }
        if left == 0 {
            return Ok(());
        }
        fill(stream, buf).await?;
    }
}

async fn read_line(stream: &mut TcpStream, buf: &mut BytesMut) -> io::Result<String> {
    loop {
        if let Some(i) = find(buf, b"\r\n") {
            let line = buf.split_to(i + 2);
            return Ok(String::from_utf8_lossy(&line[..i]).into_owned());
        }
        if buf.len() > 8 * 1024 {
            return Err(bad("line over 8 KiB"));
        }
        fill(stream, buf).await?;
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

// ---------------------------------------------------------------------------------------------
// Measurements.

fn url(key: &str) -> String {
    format!("{PREFIX}{key}")
}

#[derive(Default, Clone)]
struct Load {
    requests: u64,
    bytes: u64,
    errors: u64,
    not_hit: u64,
    connected: usize,
    secs: f64,
    /// Share of the machine's CPU used by processes outside the benchmark meanwhile.
    other_cpu: f64,
    /// CPU time (user + system) the server's processes used meanwhile.
    server_cpu_secs: f64,
    first_error: Option<String>,
}

impl Load {
    fn rps(&self) -> f64 {
        self.requests as f64 / self.secs
    }
    /// Server CPU time per request, in microseconds.
    fn cpu_us_per_request(&self) -> f64 {
        self.server_cpu_secs * 1e6 / self.requests.max(1) as f64
    }
    /// Server CPU time per GiB sent, in milliseconds.
    fn cpu_ms_per_gib(&self) -> f64 {
        self.server_cpu_secs * 1e3 / (self.bytes.max(1) as f64 / (MIB * 1024.0))
    }
    fn mib_s(&self) -> f64 {
        self.bytes as f64 / MIB / self.secs
    }
}

/// `conns` connections, each GETting `paths` in turn (from different offsets) for `secs`.
/// Requests count when complete; bytes count as they arrive.
async fn load(
    addr: SocketAddr,
    server_pids: &[u32],
    paths: Arc<Vec<String>>,
    conns: usize,
    dur: Duration,
    expect_len: u64,
) -> Load {
    let bytes = Arc::new(AtomicU64::new(0));
    let barrier = Arc::new(tokio::sync::Barrier::new(conns + 1));
    let start = Arc::new(Mutex::new(None::<Instant>));
    let mut tasks = Vec::with_capacity(conns);
    for t in 0..conns {
        let paths = paths.clone();
        let bytes = bytes.clone();
        let barrier = barrier.clone();
        let start = start.clone();
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::new(addr);
            let mut out = Load::default();
            // Spread the connects a little: 1,000 SYNs at once overflow listen backlogs.
            tokio::time::sleep(Duration::from_millis((t % 100) as u64 * 2)).await;
            let mut connected = false;
            for _ in 0..5 {
                match tokio::time::timeout(Duration::from_secs(5), conn.connect()).await {
                    Ok(Ok(())) => {
                        connected = true;
                        break;
                    }
                    Ok(Err(e)) => {
                        out.first_error.get_or_insert(format!("connect: {e}"));
                    }
                    Err(_) => {
                        out.first_error.get_or_insert("connect: timed out".into());
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            barrier.wait().await;
            if !connected {
                out.errors += 1;
                return out;
            }
            out.connected = 1;
            let begin = start
                .lock()
                .unwrap()
                .expect("start is set before the barrier");
            let deadline = tokio::time::Instant::from_std(begin + dur);
            let mut i = t * 7919;
            while tokio::time::Instant::now() < deadline {
                let path = &paths[i % paths.len()];
                i += 1;
                let r = tokio::time::timeout_at(deadline, conn.get(path, None, Some(&bytes))).await;
                match r {
                    Err(_) => break, // the run is over; this request does not count
                    Ok(Ok(reply)) if reply.status == 200 && reply.body_len == expect_len => {
                        out.requests += 1;
                        if !reply.cache_status.eq_ignore_ascii_case("HIT") {
                            out.not_hit += 1;
                        }
                    }
                    Ok(Ok(reply)) => {
                        out.errors += 1;
                        out.first_error.get_or_insert(format!(
                            "status {}, {} bytes",
                            reply.status, reply.body_len
                        ));
                    }
                    Ok(Err(e)) => {
                        out.errors += 1;
                        out.first_error.get_or_insert(e.to_string());
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            out
        }));
    }
    // Everyone has connected (or given up) before the clock starts.
    *start.lock().unwrap() = Some(Instant::now() + Duration::from_millis(5));
    barrier.wait().await;
    let meter = CpuMeter::start();
    let server_ticks: u64 = server_pids.iter().map(|&p| proc_ticks(p)).sum();
    let mut total = Load::default();
    for t in tasks {
        let r = t.await.expect("load task panicked");
        total.requests += r.requests;
        total.errors += r.errors;
        total.not_hit += r.not_hit;
        total.connected += r.connected;
        if total.first_error.is_none() {
            total.first_error = r.first_error;
        }
    }
    total.secs = dur.as_secs_f64();
    total.other_cpu = meter.other_share();
    // USER_HZ is 100.
    total.server_cpu_secs = server_pids
        .iter()
        .map(|&p| proc_ticks(p))
        .sum::<u64>()
        .saturating_sub(server_ticks) as f64
        / 100.0;
    total.bytes = bytes.load(Ordering::Relaxed);
    total
}

#[derive(Default, Clone)]
struct Herd {
    source_gets: u64,
    leader_ttfb: Duration,
    follower_p50: Duration,
    follower_p90: Duration,
    follower_max: Duration,
    leader_body: Duration,
    follower_body_p50: Duration,
    follower_done_p50: Duration,
    errors: usize,
    first_error: Option<String>,
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// 50 clients ask for one cold key on the slow origin: the leader first, the 49 followers 20 ms
/// later. Times are from the moment the leader was sent.
async fn herd(server: &Server, origin: &Origin) -> Herd {
    let key = herd_key(&server.name);
    let path = url(&key);
    let want = origin.objects[&key].data.clone();
    let before = origin.gets(&key);
    // Connections are opened first, so that the herd measures the cache, not TCP handshakes.
    let mut conns = Vec::new();
    for _ in 0..HERD_CLIENTS {
        let mut c = Conn::new(server.addr);
        let _ = c.connect().await;
        conns.push(c);
    }
    let t0 = Instant::now() + Duration::from_millis(50);
    let mut tasks = Vec::new();
    for (i, mut conn) in conns.into_iter().enumerate() {
        let path = path.clone();
        let want = want.clone();
        let at = if i == 0 { t0 } else { t0 + FOLLOWER_DELAY };
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await;
            let mut body = Vec::with_capacity(want.len());
            let r =
                tokio::time::timeout(REQUEST_TIMEOUT, conn.get(&path, Some(&mut body), None)).await;
            let done = Instant::now();
            match r {
                Ok(Ok(reply)) if reply.status == 200 && body == want[..] => Ok((
                    reply.first_byte - t0,
                    reply.first_body.map(|b| b - t0).unwrap_or_default(),
                    done - t0,
                )),
                Ok(Ok(reply)) => Err(format!(
                    "status {}, {} of {} bytes{}",
                    reply.status,
                    body.len(),
                    want.len(),
                    if body.len() == want.len() {
                        ", wrong bytes"
                    } else {
                        ""
                    }
                )),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("timed out".into()),
            }
        }));
    }
    let mut out = Herd::default();
    let mut followers = Vec::new();
    let mut follower_body = Vec::new();
    let mut follower_done = Vec::new();
    for (i, t) in tasks.into_iter().enumerate() {
        match t.await.expect("herd task panicked") {
            Ok((ttfb, body, done)) if i == 0 => {
                out.leader_ttfb = ttfb;
                out.leader_body = body;
                let _ = done;
            }
            Ok((ttfb, body, done)) => {
                followers.push(ttfb);
                follower_body.push(body);
                follower_done.push(done);
            }
            Err(e) => {
                out.errors += 1;
                out.first_error.get_or_insert(format!(
                    "{}: {e}",
                    if i == 0 { "leader" } else { "follower" }
                ));
            }
        }
    }
    for v in [&mut followers, &mut follower_body, &mut follower_done] {
        v.sort();
    }
    out.follower_p50 = percentile(&followers, 0.5);
    out.follower_p90 = percentile(&followers, 0.9);
    out.follower_max = followers.last().copied().unwrap_or_default();
    out.follower_body_p50 = percentile(&follower_body, 0.5);
    out.follower_done_p50 = percentile(&follower_done, 0.5);
    // A late second fetch (e.g. a follower that gave up waiting) would show up here.
    tokio::time::sleep(Duration::from_millis(300)).await;
    out.source_gets = origin.gets(&key) - before;
    out
}

/// One pass over the objects, then passes until every object answers HIT (at most 3).
/// Returns (objects, hits in the last pass).
async fn warm(server: &Server, paths: &[String]) -> anyhow::Result<(usize, usize)> {
    let mut conns: Vec<Conn> = (0..8).map(|_| Conn::new(server.addr)).collect();
    let mut hits = 0;
    for pass in 0..4 {
        let mut pass_hits = 0;
        for chunk in paths.chunks(conns.len()) {
            let mut futs = Vec::new();
            for (conn, path) in conns.iter_mut().zip(chunk) {
                futs.push(async move {
                    tokio::time::timeout(REQUEST_TIMEOUT, conn.get(path, None, None)).await
                });
            }
            for (r, path) in futures_util::future::join_all(futs)
                .await
                .into_iter()
                .zip(chunk)
            {
                let reply = r
                    .map_err(|_| anyhow::anyhow!("{}: warm-up GET {path} timed out", server.name))?
                    .with_context(|| format!("{}: warm-up GET {path}", server.name))?;
                if reply.status != 200 {
                    bail!(
                        "{}: warm-up GET {path}: status {}",
                        server.name,
                        reply.status
                    );
                }
                let varnish_hit =
                    server.name != "varnish" || reply.x_varnish.split_whitespace().count() == 2;
                if reply.cache_status.eq_ignore_ascii_case("HIT") && varnish_hit {
                    pass_hits += 1;
                }
            }
        }
        hits = pass_hits;
        if pass > 0 && hits == paths.len() {
            break;
        }
        if server.name == "fediedge" {
            wait_writebacks(server).await;
        }
    }
    Ok((paths.len(), hits))
}

/// fediedge copies what it fetched from the fallback into its primary in the background; let
/// that finish so it does not run during the measurements.
async fn wait_writebacks(server: &Server) {
    let Some(admin) = server.admin else { return };
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let mut conn = Conn::new(admin);
        let mut body = Vec::new();
        if let Ok(Ok(_)) = tokio::time::timeout(
            Duration::from_secs(5),
            conn.get("/metrics", Some(&mut body), None),
        )
        .await
        {
            let text = String::from_utf8_lossy(&body);
            let pending = text
                .lines()
                .filter(|l| l.starts_with("fediedge_writeback_pending"))
                .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
                .sum::<f64>();
            if pending == 0.0 {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[derive(Default, Clone)]
struct Rss {
    baseline_kib: u64,
    peak_kib: u64,
    hwm_kib: u64,
    load: Load,
}

impl Rss {
    fn growth_mib(&self) -> f64 {
        self.peak_kib.saturating_sub(self.baseline_kib) as f64 / 1024.0
    }
}

/// RSS of the server's processes: baseline now (warmed up), then the peak sampled every 20 ms
/// while `clients` connections fetch 1 MiB objects.
async fn rss(server: &Server, large: Arc<Vec<String>>, clients: usize, dur: Duration) -> Rss {
    tokio::time::sleep(Duration::from_millis(500)).await;
    let baseline_kib = server.rss_kib();
    let pids = server.pids();
    let peak = Arc::new(AtomicU64::new(baseline_kib));
    let stop = tokio_util::sync::CancellationToken::new();
    let sampler = {
        let peak = peak.clone();
        let stop = stop.clone();
        let pids = pids.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => {
                        let now: u64 = pids.iter().map(|&p| status_kib(p, "VmRSS")).sum();
                        peak.fetch_max(now, Ordering::Relaxed);
                    }
                }
            }
        })
    };
    let load = load(server.addr, &pids, large, clients, dur, LARGE_SIZE as u64).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.cancel();
    let _ = sampler.await;
    Rss {
        baseline_kib,
        peak_kib: peak.load(Ordering::Relaxed),
        hwm_kib: server.hwm_kib(),
        load,
    }
}

/// A server's figures over the whole run.
struct Figures {
    name: String,
    herd: Herd,
    warm_objects: usize,
    warm_hits: usize,
    /// One entry per round.
    small: Vec<Load>,
    large: Vec<Load>,
    warm_origin_gets: u64,
    rss: Rss,
}

impl Figures {
    fn small_med(&self) -> Load {
        median(&self.small, Load::rps)
    }
    fn large_med(&self) -> Load {
        median(&self.large, Load::mib_s)
    }
    /// The best round: load from outside the benchmark can only lower a figure, so the best
    /// round is the closest to what the server can do on this machine.
    fn small_best(&self) -> Load {
        best_round(&self.small, Load::rps)
    }
    fn large_best(&self) -> Load {
        best_round(&self.large, Load::mib_s)
    }
}

fn best_round(runs: &[Load], key: fn(&Load) -> f64) -> Load {
    runs.iter()
        .max_by(|a, b| key(a).total_cmp(&key(b)))
        .cloned()
        .unwrap_or_default()
}

/// Waits (at most 30 s) until processes outside the benchmark use less than 10% of the CPU,
/// so that a measurement does not start in the middle of someone else's compile.
async fn wait_quiet() -> f64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let meter = CpuMeter::start();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let other = meter.other_share();
        if other < 0.10 || Instant::now() > deadline {
            return other;
        }
    }
}

/// The round with the median value of `key`.
fn median(runs: &[Load], key: fn(&Load) -> f64) -> Load {
    let mut sorted: Vec<&Load> = runs.iter().collect();
    sorted.sort_by(|a, b| key(a).total_cmp(&key(b)));
    sorted
        .get(sorted.len() / 2)
        .map(|l| (*l).clone())
        .unwrap_or_default()
}

/// Cold herd and warm-up of one server.
async fn prepare(server: &Server, origin: &Origin, all: &[String]) -> anyhow::Result<Figures> {
    println!("\n## {}", server.name);
    let herd = herd(server, origin).await;
    println!(
        "herd: {} source GET(s), leader TTFB {:.0} ms, follower TTFB p50 {:.0} ms (p90 {:.0}, max {:.0}), errors {}{}",
        herd.source_gets,
        ms(herd.leader_ttfb),
        ms(herd.follower_p50),
        ms(herd.follower_p90),
        ms(herd.follower_max),
        herd.errors,
        herd.first_error.as_deref().map(|e| format!(" (first: {e})")).unwrap_or_default()
    );
    let (warm_objects, warm_hits) = warm(server, all).await?;
    println!("warm: {warm_hits}/{warm_objects} objects answered HIT after warm-up");
    Ok(Figures {
        name: server.name.clone(),
        herd,
        warm_objects,
        warm_hits,
        small: Vec::new(),
        large: Vec::new(),
        warm_origin_gets: 0,
        rss: Rss::default(),
    })
}

/// Warm throughput, in rounds: every round measures every server once, starting with a
/// different one each round, so that load from outside the benchmark (the machine is shared)
/// is spread over the servers instead of landing on one.
async fn warm_rounds(
    servers: &[Server],
    figures: &mut [Figures],
    origin: &Origin,
    settings: &Settings,
    small: &Arc<Vec<String>>,
    large: &Arc<Vec<String>>,
) {
    let dur = Duration::from_secs(settings.secs);
    for is_small in [true, false] {
        let (what, paths, conns, size) = if is_small {
            ("warm 4 KiB", small, SMALL_CONNS, SMALL_SIZE)
        } else {
            ("warm 1 MiB", large, LARGE_CONNS, LARGE_SIZE)
        };
        println!();
        for round in 0..settings.rounds {
            for k in 0..servers.len() {
                let i = (k + round) % servers.len();
                let quiet = wait_quiet().await;
                if quiet >= 0.10 {
                    println!(
                        "(outside load still {:.0}% after 30 s; measuring anyway)",
                        quiet * 100.0
                    );
                }
                let before = origin.total_gets();
                let pids = servers[i].pids();
                let l = load(
                    servers[i].addr,
                    &pids,
                    paths.clone(),
                    conns,
                    dur,
                    size as u64,
                )
                .await;
                figures[i].warm_origin_gets += origin.total_gets() - before;
                print_load(
                    &format!("{what}, round {}, {}", round + 1, servers[i].name),
                    &l,
                );
                if is_small {
                    figures[i].small.push(l);
                } else {
                    figures[i].large.push(l);
                }
            }
        }
    }
}

/// RSS under many clients, one server at a time.
async fn rss_runs(
    servers: &mut [Server],
    figures: &mut [Figures],
    settings: &Settings,
    large: &Arc<Vec<String>>,
) -> anyhow::Result<()> {
    let dur = Duration::from_secs(settings.secs);
    println!();
    for (server, f) in servers.iter_mut().zip(figures.iter_mut()) {
        wait_quiet().await;
        let rss = rss(server, large.clone(), settings.rss_clients, dur).await;
        println!(
            "RSS, {}: baseline {:.1} MiB, peak {:.1} MiB, growth {:.1} MiB (VmHWM {:.1} MiB) under {} clients ({} connected)",
            server.name,
            rss.baseline_kib as f64 / 1024.0,
            rss.peak_kib as f64 / 1024.0,
            rss.growth_mib(),
            rss.hwm_kib as f64 / 1024.0,
            settings.rss_clients,
            rss.load.connected
        );
        print_load(&format!("1 MiB, RSS run, {}", server.name), &rss.load);
        f.rss = rss;
        if let Some(status) = server.proc.child.try_wait()? {
            bail!(
                "{} exited during the run ({status}); log:\n{}",
                server.name,
                tail(&server.proc.log)
            );
        }
    }
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn print_load(what: &str, l: &Load) {
    println!(
        "{what}: {:.0} req/s, {:.1} MiB/s, {} requests, {} not HIT, {} errors, server CPU {:.2} s ({:.1} µs/request, {:.0} ms/GiB), other processes used {:.0}% of the CPU{}",
        l.rps(),
        l.mib_s(),
        l.requests,
        l.not_hit,
        l.errors,
        l.server_cpu_secs,
        l.cpu_us_per_request(),
        l.cpu_ms_per_gib(),
        l.other_cpu * 100.0,
        l.first_error
            .as_deref()
            .filter(|_| l.errors > 0)
            .map(|e| format!(" (first: {e})"))
            .unwrap_or_default()
    );
}

/// Prints the summary as Markdown (pasted into docs/benchmarks.md); true if every target is met.
fn report(figures: &[Figures], settings: &Settings, cores: usize) -> bool {
    let fe = figures.iter().find(|f| f.name == "fediedge");
    let peers: Vec<&Figures> = figures.iter().filter(|f| f.name != "fediedge").collect();
    println!("\n# Summary\n");
    println!(
        "Warm: {SMALL_CONNS} connections (4 KiB) / {LARGE_CONNS} connections (1 MiB), {} rounds of {} s per server (servers interleaved), after a warm-up pass; client and servers share {cores} cores.\n",
        settings.rounds, settings.secs
    );
    println!("| server | 4 KiB req/s, best round | median | all rounds | 1 MiB MiB/s, best round | median | all rounds | not-HIT / errors | warm-up HIT check | origin GETs while warm | CPU used by other processes (mean) |");
    println!("|---|---:|---:|---|---:|---:|---|---:|---:|---:|---:|");
    let rounds = |runs: &[Load], v: fn(&Load) -> f64| {
        runs.iter()
            .map(|l| format!("{:.0}", v(l)))
            .collect::<Vec<_>>()
            .join(" / ")
    };
    for f in figures {
        let runs: Vec<&Load> = f.small.iter().chain(&f.large).collect();
        println!(
            "| {} | {:.0} | {:.0} | {} | {:.0} | {:.0} | {} | {} / {} | {}/{} | {} | {:.0}% |",
            f.name,
            f.small_best().rps(),
            f.small_med().rps(),
            rounds(&f.small, Load::rps),
            f.large_best().mib_s(),
            f.large_med().mib_s(),
            rounds(&f.large, Load::mib_s),
            runs.iter().map(|l| l.not_hit).sum::<u64>(),
            runs.iter().map(|l| l.errors).sum::<u64>(),
            f.warm_hits,
            f.warm_objects,
            f.warm_origin_gets,
            100.0 * runs.iter().map(|l| l.other_cpu).sum::<f64>() / runs.len().max(1) as f64
        );
    }
    println!("\nServer CPU time (user + system of the server's processes, excluding softirq work) in the best round: what each request costs the server itself, whatever the client's share of the cores.\n");
    println!("| server | 4 KiB: CPU µs per request | 1 MiB: CPU ms per GiB |");
    println!("|---|---:|---:|");
    for f in figures {
        println!(
            "| {} | {:.1} | {:.0} |",
            f.name,
            f.small_best().cpu_us_per_request(),
            f.large_best().cpu_ms_per_gib()
        );
    }
    println!(
        "\nHerd: {HERD_CLIENTS} requests for one cold key; origin waits {} ms before headers, then trickles {} KiB over {} ms. TTFB = first response byte, measured from when the leader was sent (followers sent {} ms later).\n",
        HERD_HEADER_DELAY.as_millis(),
        HERD_SIZE / 1024,
        HERD_TRICKLE.as_millis(),
        FOLLOWER_DELAY.as_millis()
    );
    println!("| server | source GETs | leader TTFB ms | follower TTFB p50 ms | p90 | max | ratio p50/leader | follower first body byte p50 ms | follower complete p50 ms | errors |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for f in figures {
        let h = &f.herd;
        println!(
            "| {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2} | {:.0} | {:.0} | {} |",
            f.name,
            h.source_gets,
            ms(h.leader_ttfb),
            ms(h.follower_p50),
            ms(h.follower_p90),
            ms(h.follower_max),
            herd_ratio(h),
            ms(h.follower_body_p50),
            ms(h.follower_done_p50),
            h.errors
        );
    }
    println!(
        "\nRSS: {} concurrent clients on 1 MiB objects for {} s; baseline after warm-up vs peak (sampled every 20 ms), whole process tree.\n",
        settings.rss_clients, settings.secs
    );
    println!("| server | baseline MiB | peak MiB | growth MiB | VmHWM MiB | MiB/s during | clients connected | errors |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for f in figures {
        let r = &f.rss;
        println!(
            "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {} |",
            f.name,
            r.baseline_kib as f64 / 1024.0,
            r.peak_kib as f64 / 1024.0,
            r.growth_mib(),
            r.hwm_kib as f64 / 1024.0,
            r.load.mib_s(),
            r.load.connected,
            r.load.errors
        );
    }

    let Some(fe) = fe else {
        println!("\nfediedge was not run: no targets to check.");
        return false;
    };
    let best = |v: fn(&Figures) -> f64| -> Option<(f64, &str)> {
        peers
            .iter()
            .map(|p| (v(p), p.name.as_str()))
            .max_by(|a, b| a.0.total_cmp(&b.0))
    };
    println!("\n## Targets\n");
    println!("| target | fediedge | better peer | ratio | goal | met |");
    println!("|---|---:|---:|---:|---:|---|");
    let mut all_met = true;
    let mut line =
        |name: &str, mine: String, peer: String, ratio: String, goal: String, met: bool| {
            all_met &= met;
            println!(
                "| {name} | {mine} | {peer} | {ratio} | {goal} | {} |",
                if met { "yes" } else { "**no**" }
            );
        };
    let clean_warm = fe.small.iter().chain(&fe.large).all(|l| l.errors == 0);
    match best(|f| f.small_best().rps()) {
        Some((peer, who)) => {
            let r = fe.small_best().rps() / peer;
            line(
                "warm 4 KiB req/s (best round)",
                format!("{:.0}", fe.small_best().rps()),
                format!("{peer:.0} ({who})"),
                format!("{r:.2}×"),
                format!("≥ {TARGET_SMALL}×"),
                r >= TARGET_SMALL && clean_warm,
            );
        }
        None => line(
            "warm 4 KiB req/s (best round)",
            format!("{:.0}", fe.small_best().rps()),
            "n/a".into(),
            "n/a".into(),
            format!("≥ {TARGET_SMALL}×"),
            false,
        ),
    }
    match best(|f| f.large_best().mib_s()) {
        Some((peer, who)) => {
            let r = fe.large_best().mib_s() / peer;
            line(
                "warm 1 MiB bytes/s (best round)",
                format!("{:.1} MiB/s", fe.large_best().mib_s()),
                format!("{peer:.1} MiB/s ({who})"),
                format!("{r:.2}×"),
                format!("≥ {TARGET_LARGE}×"),
                r >= TARGET_LARGE && clean_warm,
            );
        }
        None => line(
            "warm 1 MiB bytes/s (best round)",
            format!("{:.1} MiB/s", fe.large_best().mib_s()),
            "n/a".into(),
            "n/a".into(),
            format!("≥ {TARGET_LARGE}×"),
            false,
        ),
    }
    line(
        "herd: source GETs",
        fe.herd.source_gets.to_string(),
        peers
            .iter()
            .map(|p| format!("{} ({})", p.herd.source_gets, p.name))
            .collect::<Vec<_>>()
            .join(", "),
        "".into(),
        "exactly 1".into(),
        fe.herd.source_gets == 1 && fe.herd.errors == 0,
    );
    let r = herd_ratio(&fe.herd);
    line(
        "herd: follower TTFB p50 / leader",
        format!("{r:.2}×"),
        peers
            .iter()
            .map(|p| format!("{:.2}× ({})", herd_ratio(&p.herd), p.name))
            .collect::<Vec<_>>()
            .join(", "),
        format!("{r:.2}×"),
        format!("≤ {TARGET_HERD}×"),
        r <= TARGET_HERD && fe.herd.errors == 0,
    );
    let g = fe.rss.growth_mib();
    line(
        &format!("RSS growth, {} clients × 1 MiB", settings.rss_clients),
        format!("{g:.1} MiB"),
        peers
            .iter()
            .map(|p| format!("{:.1} MiB ({})", p.rss.growth_mib(), p.name))
            .collect::<Vec<_>>()
            .join(", "),
        "".into(),
        format!("≤ {TARGET_RSS_MIB} MiB"),
        g <= TARGET_RSS_MIB && fe.rss.load.errors == 0,
    );
    if let (Some((s, sw)), Some((l, lw))) = (
        best(|f| f.small_med().rps()),
        best(|f| f.large_med().mib_s()),
    ) {
        println!(
            "\nOn the median round instead: 4 KiB {:.2}× ({sw}), 1 MiB {:.2}× ({lw}).",
            fe.small_med().rps() / s,
            fe.large_med().mib_s() / l
        );
    }
    println!(
        "\n{}",
        if all_met {
            "All targets met."
        } else {
            "Some targets are not met (see the table)."
        }
    );
    all_met
}

fn herd_ratio(h: &Herd) -> f64 {
    if h.leader_ttfb.is_zero() {
        return f64::INFINITY;
    }
    h.follower_p50.as_secs_f64() / h.leader_ttfb.as_secs_f64()
}
