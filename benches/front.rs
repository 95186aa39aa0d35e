//! The front-door benchmark (issue 8 §8): fediedge and nginx side by side on this machine, the
//! same files, the same certificate, the same upstream, the same client load, in the same run.
//!
//! Not a timed test: it prints figures, ratios fediedge / nginx and whether each target is met.
//! Run it with `scripts/bench-front.sh` (installs nginx, h2load and wrk when missing, builds,
//! runs) or `cargo bench --bench front`. Method and results: `docs/benchmarks.md`.
//!
//! What runs:
//! - **files**: 256 × 4 KiB and 32 × 1 MiB objects in one directory.
//! - an **upstream** (core's place): an in-process hyper HTTP/1.1 server answering every
//!   request at once with a 1 KiB JSON body, keep-alive.
//! - **fediedge**: the release binary with the directory as its `fs` primary and a `[cache]`
//!   (warmed: every object answers from the memory tier), `[tls]` with a self-signed rcgen
//!   certificate, and `[core]` whose host is `127.0.0.1` with the upstream as `web` (so the
//!   router sends `/system/…` to media and the rest to the proxy, as on a real edge).
//! - **nginx**: one TLS server (`http2`) serving the same directory statically (`sendfile`,
//!   `open_file_cache`: nginx at its fastest, which is at least as fast as a `proxy_cache`
//!   hit), and one plain server whose `location /` is `proxy_pass` to the same upstream with
//!   `keepalive` (per worker) adding up to 256 idle connections, fediedge's
//!   `max_idle_per_upstream` default, and Mastodon's proxy headers.
//!
//! Loads (external clients, sharing the machine's cores with the server under test):
//! - **TLS 4 KiB, HTTP/1.1**: `h2load --h1`, 64 connections, over the 4 KiB objects (req/s).
//! - **TLS 4 KiB, HTTP/2**: `h2load`, 16 connections × 8 streams (req/s).
//! - **TLS 1 MiB**: `h2load --h1`, 16 connections, over the 1 MiB objects (bytes/s).
//! - **proxy**: `wrk --latency`, 64 connections, plain HTTP, one path to the upstream
//!   (req/s and p99 latency).
//! - **api** (issue 9 §7, `front/api.rs`): a cached ~10 KB `GET /api/v1/instance` through
//!   fediedge's `[core.cache]`, nginx `proxy_cache` and Varnish, with the proxy test's `wrk`
//!   load (req/s, p99; ratio against the better of nginx and Varnish).
//!
//! Each measurement runs in rounds; each round measures both servers, starting with a different
//! one. The best round is reported (the machine is shared: outside load only lowers a figure)
//! with the median, and the targets are checked on the best round.
//!
//! Knobs (environment): `FRONT_BENCH_SECS` (default 5), `FRONT_BENCH_ROUNDS` (default 3),
//! `FRONT_BENCH_STRICT=1` (exit 1 when a target is missed), `FRONT_BENCH_CLIENT_THREADS`
//! (h2load and wrk threads, default 1), `FRONT_BENCH_ONLY` (a comma-separated subset of
//! `tls-small-h1,tls-small-h2,tls-large,proxy,api`; default all), `FRONT_BENCH_ACCEPT_ENCODING`
//! (an `Accept-Encoding` wrk sends in the proxy and cached API tests, e.g. `gzip` as every
//! browser and app does; default none), `FEDIEDGE_BIN`, `NGINX_BIN`, `H2LOAD_BIN`, `WRK_BIN`,
//! `VARNISHD_BIN`.

#[path = "front/api.rs"]
mod api;
#[path = "common/process.rs"]
mod process;
#[path = "common/servers.rs"]
mod servers;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use http_body_util::Full;
use process::{find_program, free_addr, loadavg, version, Proc};

const SMALL_SIZE: usize = 4 * 1024;
const SMALL_COUNT: usize = 256;
const LARGE_SIZE: usize = 1024 * 1024;
const LARGE_COUNT: usize = 32;
const UPSTREAM_BODY: usize = 1024;
const PREFIX: &str = "/system/";
const MIB: f64 = 1024.0 * 1024.0;

const TARGET_TLS_SMALL: f64 = 1.3;
const TARGET_TLS_LARGE: f64 = 1.0;
const TARGET_PROXY: f64 = 1.2;

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let code = rt.block_on(async {
        tokio::select! {
            r = run() => match r {
                Ok(true) => 0,
                Ok(false) => 1,
                Err(e) => { eprintln!("front bench: error: {e:#}"); 2 }
            },
            _ = tokio::signal::ctrl_c() => { eprintln!("front bench: interrupted"); 130 }
        }
    });
    rt.shutdown_timeout(Duration::from_secs(1));
    std::process::exit(code);
}

struct Settings {
    secs: u64,
    rounds: usize,
    strict: bool,
    threads: u64,
    /// The measurements to run (`FRONT_BENCH_ONLY`), by `Test::key` and `api`.
    only: Vec<String>,
    /// `Accept-Encoding` for wrk (`FRONT_BENCH_ACCEPT_ENCODING`).
    accept_encoding: Option<String>,
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
            secs: num("FRONT_BENCH_SECS", 5).max(1),
            rounds: num("FRONT_BENCH_ROUNDS", 3).max(1) as usize,
            strict: std::env::var("FRONT_BENCH_STRICT").is_ok_and(|v| v == "1"),
            threads: num("FRONT_BENCH_CLIENT_THREADS", 1).max(1),
            only: std::env::var("FRONT_BENCH_ONLY")
                .unwrap_or_default()
                .split(',')
                .map(|w| w.trim().to_owned())
                .filter(|w| !w.is_empty())
                .collect(),
            accept_encoding: std::env::var("FRONT_BENCH_ACCEPT_ENCODING")
                .ok()
                .filter(|v| !v.is_empty()),
        }
    }

    fn wants(&self, key: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|w| w == key)
    }
}

/// One measurement of one server.
#[derive(Debug, Clone, Default)]
struct Figure {
    /// Requests answered 2xx per second.
    rps: f64,
    /// Bytes read per second, headers included.
    bytes_per_sec: f64,
    /// 99th percentile latency (wrk only).
    p99: Option<Duration>,
    /// Requests that failed or were not 2xx.
    errors: u64,
    /// The server's CPU time (user + system, whole process tree) per request, µs.
    cpu_us_per_req: f64,
    /// What the client negotiated (h2load: protocol and cipher).
    tls: String,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Test {
    TlsSmallH1,
    TlsSmallH2,
    TlsLarge,
    Proxy,
}

impl Test {
    const ALL: [Test; 4] = [
        Test::TlsSmallH1,
        Test::TlsSmallH2,
        Test::TlsLarge,
        Test::Proxy,
    ];

    /// The name `FRONT_BENCH_ONLY` knows it by.
    fn key(self) -> &'static str {
        match self {
            Test::TlsSmallH1 => "tls-small-h1",
            Test::TlsSmallH2 => "tls-small-h2",
            Test::TlsLarge => "tls-large",
            Test::Proxy => "proxy",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Test::TlsSmallH1 => "TLS 4 KiB, HTTP/1.1 (req/s)",
            Test::TlsSmallH2 => "TLS 4 KiB, HTTP/2 (req/s)",
            Test::TlsLarge => "TLS 1 MiB, HTTP/1.1 (MiB/s)",
            Test::Proxy => "proxy to a fast upstream (req/s)",
        }
    }

    fn value(self, f: &Figure) -> f64 {
        match self {
            Test::TlsLarge => f.bytes_per_sec / MIB,
            _ => f.rps,
        }
    }

    fn target(self) -> f64 {
        match self {
            Test::TlsSmallH1 | Test::TlsSmallH2 => TARGET_TLS_SMALL,
            Test::TlsLarge => TARGET_TLS_LARGE,
            Test::Proxy => TARGET_PROXY,
        }
    }
}

async fn run() -> anyhow::Result<bool> {
    let settings = Settings::from_env();
    let known: Vec<&str> = Test::ALL.iter().map(|t| t.key()).chain(["api"]).collect();
    if let Some(w) = settings.only.iter().find(|w| !known.contains(&w.as_str())) {
        bail!(
            "FRONT_BENCH_ONLY: unknown measurement {w:?} (known: {})",
            known.join(",")
        );
    }
    let tests: Vec<Test> = Test::ALL
        .into_iter()
        .filter(|t| settings.wants(t.key()))
        .collect();
    let tmp = tempfile::Builder::new().prefix("front-bench-").tempdir()?;
    let mut met = true;
    if !tests.is_empty() {
        met &= run_front(&settings, &tests, tmp.path()).await?;
    }
    if settings.wants("api") {
        if !tests.is_empty() {
            println!();
        }
        met &= api::run(&settings, tmp.path()).await?;
    }
    Ok(met)
}

/// The TLS and proxy measurements, fediedge against nginx.
async fn run_front(settings: &Settings, tests: &[Test], dir: &Path) -> anyhow::Result<bool> {
    let h2load = find_program("H2LOAD_BIN", "h2load")?;
    let wrk = find_program("WRK_BIN", "wrk")?;
    let media = dir.join("media");
    let (small, large) = write_objects(&media)?;
    let (cert, key) = certificate(dir)?;
    let upstream = start_upstream().await?;
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());

    let mut fediedge = start_fediedge(&dir.join("fediedge"), &media, &cert, &key, upstream)?;
    let mut nginx = start_nginx(&dir.join("nginx"), &media, &cert, &key, upstream, cores)?;
    fediedge.wait_ready().await?;
    nginx.wait_ready().await?;
    warm_fediedge(&fediedge, &small, &large).await?;
    check_proxy(&fediedge).await?;
    check_proxy(&nginx).await?;

    let lists = |server: &Server, keys: &[String], name: &str| -> anyhow::Result<PathBuf> {
        let file = dir.join(format!("{}-{name}.txt", server.name));
        let urls: Vec<String> = keys
            .iter()
            .map(|k| format!("https://127.0.0.1:{}{PREFIX}{k}", server.tls.port()))
            .collect();
        std::fs::write(&file, urls.join("\n") + "\n")?;
        Ok(file)
    };
    let servers = [&fediedge, &nginx];
    let mut inputs = Vec::new();
    for s in servers {
        inputs.push((lists(s, &small, "small")?, lists(s, &large, "large")?));
    }

    println!("front-door benchmark (issue 8 §8)");
    println!("machine: {cores} cores; load average {}", loadavg());
    println!("fediedge: {}", fediedge.version);
    println!("nginx: {}", nginx.version);
    println!("h2load: {}", version(&h2load, "--version"));
    println!("wrk: {}", version(&wrk, "-v"));
    println!(
        "{} s per measurement, {} rounds, client threads {}",
        settings.secs, settings.rounds, settings.threads
    );
    println!();

    // results[test][server] = rounds
    let mut results: Vec<[Vec<Figure>; 2]> = tests.iter().map(|_| Default::default()).collect();
    for round in 0..settings.rounds {
        for (t, &test) in tests.iter().enumerate() {
            for k in 0..2 {
                // Alternate which server goes first.
                let i = (k + round + t) % 2;
                let server = servers[i];
                let (small_urls, large_urls) = &inputs[i];
                let s = settings.secs;
                let th = settings.threads;
                let before = server.cpu_ticks();
                let mut f = match test {
                    Test::TlsSmallH1 => {
                        h2load_run(&h2load, small_urls, &["--h1", "-c", "64"], s, th).await?
                    }
                    Test::TlsSmallH2 => {
                        h2load_run(&h2load, small_urls, &["-c", "16", "-m", "8"], s, th).await?
                    }
                    Test::TlsLarge => {
                        h2load_run(&h2load, large_urls, &["--h1", "-c", "16"], s, th).await?
                    }
                    Test::Proxy => {
                        let ae = settings.accept_encoding.as_deref();
                        wrk_run(&wrk, server.plain, s, th, ae).await?
                    }
                };
                let ticks = server.cpu_ticks().saturating_sub(before);
                // CPU is read over the whole client run, h2load's 1 s warm-up included (at
                // about the same rate).
                let wall = s + u64::from(test != Test::Proxy);
                let requests = f.rps * wall as f64;
                if requests > 0.0 {
                    f.cpu_us_per_req = ticks as f64 * 1e6 / ticks_per_sec() / requests;
                }
                println!(
                    "round {} {:<34} {:<9} {:>12.1}{}  errors {}  CPU {:.1} µs/req {}",
                    round + 1,
                    test.name(),
                    server.name,
                    test.value(&f),
                    f.p99
                        .map(|p| format!("  p99 {:.2} ms", p.as_secs_f64() * 1e3))
                        .unwrap_or_default(),
                    f.errors,
                    f.cpu_us_per_req,
                    f.tls
                );
                results[t][i].push(f);
            }
        }
    }
    Ok(report(tests, &results, settings.strict))
}

fn report(tests: &[Test], results: &[[Vec<Figure>; 2]], strict: bool) -> bool {
    println!();
    println!("| test | fediedge best | nginx best | ratio best | ratio median | target | met | CPU per request, nginx ÷ fediedge (medians) |");
    println!("|---|---:|---:|---:|---:|---:|---|---:|");
    let mut all_met = true;
    for (t, &test) in tests.iter().enumerate() {
        let best = |runs: &[Figure]| {
            runs.iter()
                .max_by(|a, b| test.value(a).total_cmp(&test.value(b)))
                .cloned()
                .unwrap_or_default()
        };
        let median = |runs: &[Figure]| {
            let mut v: Vec<f64> = runs.iter().map(|f| test.value(f)).collect();
            v.sort_by(f64::total_cmp);
            match v.len() {
                0 => 0.0,
                n if n % 2 == 0 => (v[n / 2 - 1] + v[n / 2]) / 2.0,
                n => v[n / 2],
            }
        };
        // What each request costs the server itself, whatever the client's share of the cores
        // (the clients run on the same cores; see docs/benchmarks.md).
        let cpu = |runs: &[Figure]| {
            let mut v: Vec<f64> = runs.iter().map(|f| f.cpu_us_per_req).collect();
            v.sort_by(f64::total_cmp);
            v.get(v.len() / 2).copied().unwrap_or(0.0)
        };
        let cpu_ratio = cpu(&results[t][1]) / cpu(&results[t][0]).max(f64::MIN_POSITIVE);
        let (fe, ng) = (best(&results[t][0]), best(&results[t][1]));
        let ratio = test.value(&fe) / test.value(&ng).max(f64::MIN_POSITIVE);
        let ratio_median = median(&results[t][0]) / median(&results[t][1]).max(f64::MIN_POSITIVE);
        let errors = fe.errors + ng.errors;
        let mut met = ratio >= test.target() && errors == 0;
        let mut extra = String::new();
        if test == Test::Proxy {
            // p99 no worse than nginx's, in the round with the best req/s.
            if let (Some(a), Some(b)) = (fe.p99, ng.p99) {
                met &= a <= b;
                extra = format!(
                    " (p99 {:.2} ms vs {:.2} ms)",
                    a.as_secs_f64() * 1e3,
                    b.as_secs_f64() * 1e3
                );
            }
        }
        if errors > 0 {
            extra.push_str(&format!(" ({errors} errors)"));
        }
        all_met &= met;
        println!(
            "| {} | {:.1} | {:.1} | {:.2}× | {:.2}× | ≥ {:.1}×{} | {} | {:.2}× |",
            test.name(),
            test.value(&fe),
            test.value(&ng),
            ratio,
            ratio_median,
            test.target(),
            extra,
            if met { "yes" } else { "**no**" },
            cpu_ratio
        );
    }
    println!();
    println!(
        "targets: {}",
        if all_met { "all met" } else { "some missed" }
    );
    all_met || !strict
}

// The object set and the certificate.

fn write_objects(media: &Path) -> anyhow::Result<(Vec<String>, Vec<String>)> {
    let mut small = Vec::new();
    let mut large = Vec::new();
    for (list, count, size, kind) in [
        (&mut small, SMALL_COUNT, SMALL_SIZE, "small"),
        (&mut large, LARGE_COUNT, LARGE_SIZE, "large"),
    ] {
        for i in 0..count {
            let key = format!("media_attachments/files/{kind}/{i:04}.bin");
            let path = media.join(&key);
            std::fs::create_dir_all(path.parent().expect("a parent"))?;
            std::fs::write(&path, content(i, size))?;
            list.push(key);
        }
    }
    Ok((small, large))
}

fn content(seed: usize, size: usize) -> Vec<u8> {
    let mut x = 0x9E37_79B9u32 ^ seed as u32;
    (0..size)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// A self-signed certificate for `127.0.0.1` and `localhost` (ECDSA P-256, as rcgen makes
/// by default; both servers use the same files).
fn certificate(dir: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    let made = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])?;
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, made.cert.pem())?;
    std::fs::write(&key, made.signing_key.serialize_pem())?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))?;
    Ok((cert, key))
}

// The upstream.

async fn start_upstream() -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let body = Bytes::from(format!(
        "{{\"uri\":\"bench\",\"pad\":\"{}\"}}",
        "x".repeat(UPSTREAM_BODY - 24)
    ));
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            let body = body.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |_req| {
                    let resp = http::Response::builder()
                        .header("content-type", "application/json; charset=utf-8")
                        .header("cache-control", "max-age=0, private, must-revalidate")
                        .body(Full::new(body.clone()))
                        .expect("a response");
                    std::future::ready(Ok::<_, Infallible>(resp))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(addr)
}

// The servers.

struct Server {
    name: &'static str,
    version: String,
    /// The TLS listener (media).
    tls: SocketAddr,
    /// The plain listener (proxy; fediedge also media, for warming).
    plain: SocketAddr,
    proc: Proc,
}

impl Server {
    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.proc.child.try_wait()? {
                bail!(
                    "{} exited at start ({status}); log:\n{}",
                    self.name,
                    std::fs::read_to_string(&self.proc.log).unwrap_or_default()
                );
            }
            let tls = tokio::net::TcpStream::connect(self.tls).await.is_ok();
            let plain = tokio::net::TcpStream::connect(self.plain).await.is_ok();
            if tls && plain {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{} does not accept connections after 60 s", self.name);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// User + system CPU ticks of the server's processes (nginx: master and workers).
    fn cpu_ticks(&self) -> u64 {
        let root = self.proc.child.id();
        let mut pids = vec![root];
        if let Ok(d) = std::fs::read_dir("/proc") {
            for e in d.flatten() {
                let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                    continue;
                };
                if stat_field(pid, 1) == Some(root as u64) {
                    pids.push(pid);
                }
            }
        }
        pids.iter()
            .map(|&p| stat_field(p, 11).unwrap_or(0) + stat_field(p, 12).unwrap_or(0))
            .sum()
    }
}

/// Field `n` (0-based, after the command name) of `/proc/<pid>/stat`: 1 = ppid, 11 = utime,
/// 12 = stime.
fn stat_field(pid: u32, n: usize) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let close = stat.rfind(')')?;
    stat[close + 1..].split_whitespace().nth(n)?.parse().ok()
}

fn ticks_per_sec() -> f64 {
    100.0
}

fn start_fediedge(
    dir: &Path,
    media: &Path,
    cert: &Path,
    key: &Path,
    upstream: SocketAddr,
) -> anyhow::Result<Server> {
    let bin = std::env::var("FEDIEDGE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_BIN_EXE_fediedge")));
    std::fs::create_dir_all(dir)?;
    let (plain, tls, admin) = (free_addr()?, free_addr()?, free_addr()?);
    let config = format!(
        r#"listen = "{plain}"
admin_listen = "{admin}"
url_prefix = "{PREFIX}"
data_dir = "{var}"

[cache]
dir = "{cache}"
max_size = "4GiB"
memory_max_size = "64MiB"

[primary]
type = "fs"
root = "{media}"

[tls]
listen = "{tls}"
certificates = [{{ cert = "{cert}", key = "{key}" }}]

[core]
hosts = ["127.0.0.1"]
web = ["{upstream}"]
health_check_interval = "0s"
"#,
        var = dir.join("var").display(),
        cache = dir.join("cache").display(),
        media = media.display(),
        cert = cert.display(),
        key = key.display(),
    );
    let proc = servers::start_fediedge(&bin, dir, &config)?;
    Ok(Server {
        name: "fediedge",
        version: format!("{} (release build)", bin.display()),
        tls,
        plain,
        proc,
    })
}

fn start_nginx(
    dir: &Path,
    media: &Path,
    cert: &Path,
    key: &Path,
    upstream: SocketAddr,
    workers: usize,
) -> anyhow::Result<Server> {
    let bin = find_program("NGINX_BIN", "nginx")?;
    for d in ["tmp", "logs"] {
        std::fs::create_dir_all(dir.join(d))?;
    }
    let (plain, tls) = (free_addr()?, free_addr()?);
    let (m, c, k) = (media.display(), cert.display(), key.display());
    // nginx's `keepalive` is per worker: the same idle connections in all as fediedge's
    // `max_idle_per_upstream` default (256).
    let keepalive = (256 / workers).max(1);
    // TLS: nginx's defaults but for the session cache; http2 on the same listener. The proxy:
    // Mastodon's nginx proxy headers, HTTP/1.1 keep-alive to the upstream.
    let config = format!(
        r#"{head}  default_type application/octet-stream;
  sendfile on;
  tcp_nopush on;
  open_file_cache max=1000 inactive=60s;
  ssl_protocols TLSv1.2 TLSv1.3;
  ssl_session_cache shared:SSL:10m;
  upstream core {{
    server {upstream};
    keepalive {keepalive};
  }}
  server {{
    listen {tls} ssl http2 backlog=4096;
    ssl_certificate {c};
    ssl_certificate_key {k};
    location {PREFIX} {{
      alias {m}/;
      add_header Cache-Control "public, max-age=31536000, immutable";
      add_header X-Content-Type-Options nosniff;
    }}
  }}
  server {{
    listen {plain} backlog=4096;
    location / {{
{MASTODON_PROXY}{MASTODON_GZIP}      proxy_pass http://core;
    }}
  }}
}}
"#,
        head = servers::nginx_config_head(dir, workers),
        MASTODON_PROXY = servers::MASTODON_PROXY,
        MASTODON_GZIP = servers::MASTODON_GZIP,
    );
    let proc = servers::start_nginx(&bin, dir, &config)?;
    Ok(Server {
        name: "nginx",
        version: format!("{}, {workers} workers", version(&bin, "-v")),
        tls,
        plain,
        proc,
    })
}

/// GETs every object over fediedge's plain listener until each answers from the cache.
async fn warm_fediedge(server: &Server, small: &[String], large: &[String]) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    for pass in 0..5 {
        let mut not_hit = 0;
        for k in small.iter().chain(large) {
            let r = client
                .get(format!("http://{}{PREFIX}{k}", server.plain))
                .header("host", "127.0.0.1")
                .send()
                .await?;
            if r.status() != 200 {
                bail!("fediedge answered {} for {k}", r.status());
            }
            let hit = r
                .headers()
                .get("x-cache-status")
                .is_some_and(|v| v == "HIT");
            r.bytes().await?;
            not_hit += usize::from(!hit);
        }
        if not_hit == 0 {
            return Ok(());
        }
        if pass == 4 {
            bail!("fediedge: {not_hit} objects still not HIT after 5 passes");
        }
    }
    Ok(())
}

/// One request through the server's proxy must reach the upstream.
async fn check_proxy(server: &Server) -> anyhow::Result<()> {
    let r = reqwest::get(format!("http://{}/api/v1/instance", server.plain)).await?;
    let status = r.status();
    let body = r.bytes().await?;
    if status != 200 || !body.starts_with(b"{\"uri\":\"bench\"") {
        bail!("{}: the proxy answered {status}", server.name);
    }
    Ok(())
}

// The clients.

/// Runs a client to its end on a blocking thread (the runtime keeps serving the upstream).
async fn output(mut cmd: Command) -> anyhow::Result<std::process::Output> {
    Ok(tokio::task::spawn_blocking(move || cmd.output()).await??)
}

async fn h2load_run(
    bin: &Path,
    urls: &Path,
    args: &[&str],
    secs: u64,
    threads: u64,
) -> anyhow::Result<Figure> {
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .args(["-t", &threads.to_string()])
        .args(["-D", &secs.to_string()])
        .args(["--warm-up-time", "1"])
        .arg("-i")
        .arg(urls);
    let out = output(cmd).await?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "h2load failed ({}): {text}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    parse_h2load(&text).with_context(|| format!("cannot read h2load's output:\n{text}"))
}

/// Reads `finished in 6.00s, 12345.00 req/s, 50.12MB/s` (the rates are over the main
/// duration; the time includes the warm-up), the `requests:` and `status codes:` lines, and
/// the TLS lines.
fn parse_h2load(text: &str) -> Option<Figure> {
    let line = |start: &str| text.lines().find(|l| l.trim_start().starts_with(start));
    let finished: Vec<&str> = line("finished in")?.split(',').map(str::trim).collect();
    let rps: f64 = finished.get(1)?.strip_suffix(" req/s")?.parse().ok()?;
    let bytes_per_sec = size(finished.get(2)?.strip_suffix("/s")?)?;
    let numbers = |l: &str| -> Vec<u64> {
        l.split([',', ' '])
            .filter_map(|w| w.parse::<u64>().ok())
            .collect()
    };
    // total, started, done, succeeded, failed, errored, timeout
    let requests = numbers(line("requests:")?);
    let status = numbers(line("status codes:")?);
    let not_2xx: u64 = status.iter().skip(1).sum();
    let errors = requests.iter().skip(4).sum::<u64>() + not_2xx;
    let tls = ["TLS Protocol:", "Cipher:", "Application protocol:"]
        .iter()
        .filter_map(|k| line(k).map(|l| l.trim().to_owned()))
        .collect::<Vec<_>>()
        .join(", ");
    Some(Figure {
        rps,
        bytes_per_sec,
        p99: None,
        errors,
        cpu_us_per_req: 0.0,
        tls,
    })
}

async fn wrk_run(
    bin: &Path,
    addr: SocketAddr,
    secs: u64,
    threads: u64,
    accept_encoding: Option<&str>,
) -> anyhow::Result<Figure> {
    let mut cmd = Command::new(bin);
    cmd.args(["-t", &threads.to_string(), "-c", "64"]).args([
        "-d",
        &format!("{secs}s"),
        "--latency",
    ]);
    if let Some(ae) = accept_encoding {
        cmd.args(["-H", &format!("Accept-Encoding: {ae}")]);
    }
    cmd.arg(format!("http://{addr}/api/v1/instance"));
    let out = output(cmd).await?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!("wrk failed ({}): {text}", out.status);
    }
    parse_wrk(&text).with_context(|| format!("cannot read wrk's output:\n{text}"))
}

/// Reads `Requests/sec:`, `Transfer/sec:`, the `99%` latency, and the error lines.
fn parse_wrk(text: &str) -> Option<Figure> {
    let field = |start: &str| {
        text.lines()
            .find(|l| l.trim_start().starts_with(start))
            .map(|l| l.trim_start()[start.len()..].trim().to_owned())
    };
    let rps: f64 = field("Requests/sec:")?.parse().ok()?;
    let p99 = field("99%").and_then(|v| duration(&v))?;
    let transfer = field("Transfer/sec:").and_then(|v| size(&v)).unwrap_or(0.0);
    let non_2xx: u64 = field("Non-2xx or 3xx responses:")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let socket: u64 = field("Socket errors:")
        .map(|v| {
            v.split([',', ' '])
                .filter_map(|w| w.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or(0);
    Some(Figure {
        rps,
        bytes_per_sec: transfer,
        p99: Some(p99),
        errors: non_2xx + socket,
        cpu_us_per_req: 0.0,
        tls: String::new(),
    })
}

/// wrk's `588.00us`, `2.12ms`, `1.01s`.
fn duration(v: &str) -> Option<Duration> {
    let (n, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic())?);
    let n: f64 = n.parse().ok()?;
    let secs = match unit {
        "us" => n / 1e6,
        "ms" => n / 1e3,
        "s" => n,
        "m" => n * 60.0,
        _ => return None,
    };
    Some(Duration::from_secs_f64(secs))
}

/// wrk's and h2load's `1.23MB`, `456.78KB` (powers of 1024).
fn size(v: &str) -> Option<f64> {
    let (n, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic())?);
    let n: f64 = n.parse().ok()?;
    Some(
        n * match unit {
            "B" => 1.0,
            "KB" => 1024.0,
            "MB" => MIB,
            "GB" => MIB * 1024.0,
            _ => return None,
        },
    )
}
